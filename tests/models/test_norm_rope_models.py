"""Whole HF models with the norm_rope family on: every norm, residual add + norm, q/k norm +
RoPE and SiLU-mul of tiny random-weight Qwen3, Llama, Gemma3 and DeepSeek-V3 fuse, and
the logits equal eager's (prefill and one decode step over a DynamicCache), in bf16.

``codegen: "fx"`` forces the family on the CPU (with inductor codegen the CPU policy
skips it: test_norm_rope_fusion.py). The references compute what HF computes, op for
op, so the fused graph gives eager's logits exactly; the tolerance is bf16's anyway.
"""

from __future__ import annotations

import pytest
import torch

import ascend_graph
from tests.models import tiny_hf

transformers = pytest.importorskip("transformers")


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=tiny_hf.VOCAB, hidden_size=64, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)


def _gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=tiny_hf.VOCAB, hidden_size=64, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
    cfg._attn_implementation = "sdpa"
    return Gemma3ForCausalLM(cfg)


# per graph (prefill or decode): what fuses, counted from the models' code
#   Qwen3/Llama (2 layers): input norm, 2 x (q/k norm + RoPE, residual add + norm, SiLU-mul),
#   residual add + norm before the next layer and the final one -> 1 + 3*2 + 2 = 9
#   Gemma3 (2 layers): 4 norms a layer (2 of them after a residual add), q/k norm + RoPE;
#   the MLP is gelu -> 11
#   DeepSeek-V3 (3 layers, MLA): the norms (q_a/kv_a included), residual adds + norms and
#   SiLU-muls (18), plus the interleaved RoPE of q_rot/k_rot, one a layer -> 21
CASES = {
    "qwen3": (lambda: tiny_hf.build("qwen3"), 9),
    "llama": (_llama, 9),
    "gemma3": (_gemma3, 11),
    "deepseek_v3": (lambda: tiny_hf.build("deepseek_v3"), 21),
}


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(CASES))
def test_family_fuses_and_matches_eager(arch):
    make, per_graph = CASES[arch]
    torch.manual_seed(0)
    model = make().to(torch.bfloat16).eval()
    torch._dynamo.reset()
    ascend_graph.reset_stats()
    compiled = torch.compile(model, backend="ascend", options={"codegen": "fx", "graphs": False, "fusions": ("norm_rope",)}, dynamic=False)
    ids = torch.randint(0, tiny_hf.VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids, use_cache=True)
        out = compiled(ids, use_cache=True)
        nxt = ref.logits[:, -1:].argmax(-1)
        ref2 = model(nxt, past_key_values=ref.past_key_values, use_cache=True)
        out2 = compiled(nxt, past_key_values=out.past_key_values, use_cache=True)
    tol = dict(atol=2e-2, rtol=1.6e-2)  # bf16
    torch.testing.assert_close(out.logits, ref.logits, **tol)
    torch.testing.assert_close(out2.logits, ref2.logits, **tol)
    stats = ascend_graph.stats()
    assert stats["graphs_compiled"] == 2
    assert stats["fusions"]["norm_rope"] == 2 * per_graph
