"""The conformance architectures: tiny random-weight HF models (no downloads).

One entry per architecture family the backend is held to (issue #18's matrix): dense
decoders (Llama, Qwen3, Gemma3, Mistral), MoE (Mixtral, Qwen3-MoE, DeepSeek-V3 with
MLA and grouped routing, GptOss with attention sinks and clipped-SwiGLU experts with
biases), an encoder-only model (XLM-RoBERTa, the bge-m3 class), hybrids (Bamba:
Mamba-2 + attention; LFM2: short convolutions + attention; Qwen3-Next: gated delta
net + attention + MoE).

Each :class:`Arch` says how many rewrites of each fusion family one compiled graph of
the model should hold (``expected``): every attention layer, every MoE layer, every
causal convolution (Mamba-2 / short-conv / GDN mixers) and every gated delta rule. The
conformance benchmark and the model tests compare ``stats()["fusions"]`` per graph with
it. Sizes are odd where the kernels allow (head dims stay multiples of 16: FIA's rule).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

VOCAB = 131


@dataclass(frozen=True)
class Arch:
    name: str
    make: Callable[[], torch.nn.Module]
    #: fusion family -> rewrites per compiled graph
    expected: dict[str, int] = field(default_factory=dict)
    #: "causal" (a ``*ForCausalLM``: compare logits) or "encoder" (compare last_hidden_state)
    kind: str = "causal"


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256))


def _qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256))


def _gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    # one sliding layer (window 8 < 17 tokens) and one global
    cfg = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, max_position_embeddings=256, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
    )
    return Gemma3ForCausalLM(cfg)


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=8))


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_local_experts=6, num_experts_per_tok=2, max_position_embeddings=256,
    )
    return MixtralForCausalLM(cfg)


def _qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=88, moe_intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_experts=6, num_experts_per_tok=2, decoder_sparse_step=1, norm_topk_prob=True,
        max_position_embeddings=256,
    )
    return Qwen3MoeForCausalLM(cfg)


def _deepseek_v3():
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    # MLA: q/k head dim 32 + 16 = 48, v head dim 32 (multiples of 16); sigmoid grouped routing
    cfg = DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=88, moe_intermediate_size=24, num_hidden_layers=3, first_k_dense_replace=1,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=32,
        v_head_dim=32, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
        routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=256, rope_scaling=None,
    )
    model = DeepseekV3ForCausalLM(cfg)
    for name, buf in model.named_buffers():
        if "e_score_correction_bias" in name:
            torch.nn.init.normal_(buf, std=0.1)  # zeros would hide a dropped bias
    return model


def _gpt_oss():
    from transformers import GptOssConfig, GptOssForCausalLM

    cfg = GptOssConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=256,
    )
    return GptOssForCausalLM(cfg)


def _xlm_roberta():
    from transformers import XLMRobertaConfig, XLMRobertaModel

    cfg = XLMRobertaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=88, max_position_embeddings=64)
    return XLMRobertaModel(cfg, add_pooling_layer=False)


def _bamba():
    from transformers import BambaConfig, BambaForCausalLM

    # layer 0 Mamba-2, layer 1 attention
    cfg = BambaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        attn_layer_indices=[1], mamba_n_heads=4, mamba_d_head=32, mamba_n_groups=1, mamba_d_state=16, mamba_d_conv=4, mamba_expand=2,
        mamba_chunk_size=16, max_position_embeddings=256,
    )
    return BambaForCausalLM(cfg)


def _lfm2():
    from transformers import Lfm2Config, Lfm2ForCausalLM

    cfg = Lfm2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, conv_L_cache=3, layer_types=["conv", "full_attention"],
    )
    return Lfm2ForCausalLM(cfg)


def _qwen3_next():
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    cfg = Qwen3NextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=88, moe_intermediate_size=24, shared_expert_intermediate_size=24,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=6, num_experts_per_tok=2,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
        layer_types=["linear_attention", "full_attention"], decoder_sparse_step=1, max_position_embeddings=256,
    )
    return Qwen3NextForCausalLM(cfg)


ARCHS: dict[str, Arch] = {
    a.name: a
    for a in [
        Arch("llama", _llama, {"attention": 2}),
        Arch("qwen3", _qwen3, {"attention": 2}),
        Arch("gemma3", _gemma3, {"attention": 2}),
        Arch("mistral", _mistral, {"attention": 2}),
        Arch("mixtral", _mixtral, {"attention": 2, "moe": 2}),
        Arch("qwen3_moe", _qwen3_moe, {"attention": 2, "moe": 2}),
        Arch("deepseek_v3", _deepseek_v3, {"attention": 3, "moe": 2}),
        Arch("gpt_oss", _gpt_oss, {"attention": 2, "moe": 2}),
        Arch("xlm_roberta", _xlm_roberta, {"attention": 2}, kind="encoder"),
        Arch("bamba", _bamba, {"attention": 1, "causal_conv1d": 1}),
        Arch("lfm2", _lfm2, {"attention": 1, "causal_conv1d": 1}),
        Arch("qwen3_next", _qwen3_next, {"attention": 1, "causal_conv1d": 1, "gated_delta_rule": 1, "moe": 2}),
    ]
}

#: attention implementation per architecture (GptOss has no SDPA form: its sinks need eager)
ATTN_IMPL = {"gpt_oss": "eager"}


def build_arch(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    """The tiny model of ``name`` in ``dtype``, eval mode, seeded."""
    arch = ARCHS[name]
    torch.manual_seed(seed)
    model = arch.make()
    model.config._attn_implementation = ATTN_IMPL.get(name, "sdpa")
    return model.to(dtype).eval()


def forward_output(arch: Arch, model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The tensor compared with eager: logits (decoders) or the last hidden state (encoders)."""
    if arch.kind == "encoder":
        return model(input_ids=ids).last_hidden_state
    return model(input_ids=ids, use_cache=False).logits
