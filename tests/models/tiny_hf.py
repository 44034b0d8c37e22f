"""Tiny random-weight HF models (no downloads) and an eager-vs-compiled driver.

The four architectures the backend is held to: Qwen3 (dense), Qwen3-MoE, Qwen3-Next
(hybrid gated-delta-net + full attention, MoE) and DeepSeek-V3 (MLA + grouped-routing
MoE). Sizes are odd on purpose so shape bugs do not hide behind powers of two.
"""

from __future__ import annotations

import torch

VOCAB = 131


def qwen3_config():
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=88, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
    )


def qwen3_moe_config():
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=88, moe_intermediate_size=24,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_experts=6, num_experts_per_tok=2, decoder_sparse_step=1, norm_topk_prob=True,
        max_position_embeddings=512,
    )


def qwen3_next_config():
    from transformers import Qwen3NextConfig

    return Qwen3NextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=88, moe_intermediate_size=24,
        shared_expert_intermediate_size=24, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_experts=6, num_experts_per_tok=2,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
        linear_value_head_dim=16, linear_conv_kernel_dim=4, full_attention_interval=2,
        decoder_sparse_step=1, max_position_embeddings=512,
    )


def deepseek_v3_config():
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=88, moe_intermediate_size=24,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=32, kv_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
        n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
        routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=512,
    )


def build(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny random-weight causal LM of one of the four architectures, in eval mode."""
    import transformers

    configs = {
        "qwen3": (qwen3_config, "Qwen3ForCausalLM"),
        "qwen3_moe": (qwen3_moe_config, "Qwen3MoeForCausalLM"),
        "qwen3_next": (qwen3_next_config, "Qwen3NextForCausalLM"),
        "deepseek_v3": (deepseek_v3_config, "DeepseekV3ForCausalLM"),
    }
    make_config, cls_name = configs[arch]
    config = make_config()
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(config).to(dtype).eval()
    return model


def prefill_and_decode(model, compiled, batch: int, seq: int, steps: int, seed: int = 0):
    """Run a prefill then ``steps`` greedy decode steps with a KV cache, eager and compiled.

    Returns the largest absolute logit difference over all steps. Both paths are fed
    the same tokens (the eager path's argmax), so one divergence does not cascade.
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    worst = 0.0
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=True)
        out = compiled(input_ids=ids, use_cache=True)
        worst = max(worst, (ref.logits - out.logits).abs().max().item())
        ref_cache, out_cache = ref.past_key_values, out.past_key_values
        nxt = ref.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            ref = model(input_ids=nxt, past_key_values=ref_cache, use_cache=True)
            out = compiled(input_ids=nxt, past_key_values=out_cache, use_cache=True)
            worst = max(worst, (ref.logits - out.logits).abs().max().item())
            ref_cache, out_cache = ref.past_key_values, out.past_key_values
            nxt = ref.logits[:, -1:].argmax(-1)
    return worst
