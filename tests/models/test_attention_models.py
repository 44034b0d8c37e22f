"""Whole HF models: every attention layer fused, outputs equal to eager (prefill + decode).

Tiny random-weight models built from configs (no weights downloaded). Each test compiles
a prefill graph and a decode graph (one new token over a DynamicCache), so the exact
expected count is ``2 * attention layers``. ``codegen: "fx"`` runs the post-pass graph
as is; one test goes through inductor.
"""

from __future__ import annotations

import pytest
import torch

import ascend_graph

transformers = pytest.importorskip("transformers")

VOCAB = 96


def _compiled_vs_eager(model, n_attention: int, *, codegen: str = "fx", seq: int = 7, atol: float = 2e-5, decode_vs_unfused: bool = False):
    """Prefill and one decode step, compiled vs eager; with ``decode_vs_unfused`` the
    decode step is compared with the same compile without fusions instead (for models
    whose compiled decode differs from eager before any fusion)."""
    torch._dynamo.reset()
    model = model.eval()
    compiled = torch.compile(model, backend="ascend", options={"codegen": codegen, "graphs": False}, dynamic=False)
    ids = torch.randint(0, VOCAB, (2, seq), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids, use_cache=True)
        out = compiled(ids, use_cache=True)
        torch.testing.assert_close(out.logits, ref.logits, atol=atol, rtol=1e-4)
        nxt = ref.logits[:, -1:].argmax(-1)
        out2 = compiled(nxt, past_key_values=out.past_key_values, use_cache=True)
        stats = ascend_graph.stats()
        if decode_vs_unfused:
            torch._dynamo.reset()
            unfused = torch.compile(model, backend="ascend", options={"codegen": codegen, "graphs": False, "fusions": ()}, dynamic=False)
            base = unfused(ids, use_cache=True)
            ref2 = unfused(nxt, past_key_values=base.past_key_values, use_cache=True)
        else:
            ref2 = model(nxt, past_key_values=ref.past_key_values, use_cache=True)
        torch.testing.assert_close(out2.logits, ref2.logits, atol=atol, rtol=1e-4)
    # one prefill graph and one decode graph, each with every attention layer fused
    assert stats["graphs_compiled"] == 2
    assert stats["fusions"]["attention"] == 2 * n_attention


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_qwen3_every_layer_fused(impl):
    """GQA (4 query / 2 KV heads); one sliding-window layer (window 4 < 9 tokens) and one full."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
        use_sliding_window=True, sliding_window=4, max_window_layers=1,
        layer_types=["sliding_attention", "full_attention"], attn_implementation=impl,
    )
    _compiled_vs_eager(Qwen3ForCausalLM(cfg), 2, seq=9)


def test_qwen3_moe_every_layer_fused():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=128, attn_implementation="sdpa",
    )
    _compiled_vs_eager(Qwen3MoeForCausalLM(cfg), 2)


def test_qwen3_next_full_attention_layers_fused():
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3NextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, num_experts=4, num_experts_per_tok=2, linear_num_value_heads=2, linear_num_key_heads=2,
        linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4, max_position_embeddings=128,
        layer_types=["linear_attention", "full_attention"], attn_implementation="sdpa",
    )
    # Its compiled decode step differs from eager with no fusion at all (linear-attention
    # cache states; reported to the lead), so decode is held to the unfused compile.
    _compiled_vs_eager(Qwen3NextForCausalLM(cfg), 1, atol=5e-5, decode_vs_unfused=True)


def test_deepseek_v3_mla_fused():
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    cfg = DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1,
        num_experts_per_tok=2, n_group=1, topk_group=1, q_lora_rank=32, kv_lora_rank=32,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=128,
        rope_scaling=None, attn_implementation="sdpa",
    )
    # q/k head dim 48 (= 32 + 16), v head dim 32: MLA
    _compiled_vs_eager(DeepseekV3ForCausalLM(cfg), 2)


def test_qwen3_inductor_end_to_end():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
        attn_implementation="sdpa",
    )
    _compiled_vs_eager(Qwen3ForCausalLM(cfg), 2, codegen="inductor", atol=1e-4)
