"""Whole HF models with the norm_rope family on: every norm, residual add + norm, q/k norm +
RoPE and SiLU-mul of tiny random-weight Qwen3, Llama, Gemma3, DeepSeek-V3 (interleaved
RoPE), Phi-3 and Qwen3-Next (partial rotary) fuse, and the logits equal eager's (prefill
and one decode step over a DynamicCache), in bf16; over a StaticCache, the q/k norm +
RoPE fuses in front of the cache's index_copy_ and the written caches equal eager's.

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


def _phi3_partial():
    # partial rotary (R = 8 of D = 16): cat(rope(x[..., :R]), x[..., R:]); fused qkv and gate_up projections
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(vocab_size=tiny_hf.VOCAB, hidden_size=64, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     max_position_embeddings=512, partial_rotary_factor=0.5, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = "sdpa"
    return Phi3ForCausalLM(cfg)


# per graph (prefill or decode): what fuses, counted from the models' code
#   Qwen3/Llama (2 layers): input norm, 2 x (q/k norm + RoPE, residual add + norm, SiLU-mul),
#   residual add + norm before the next layer and the final one -> 1 + 3*2 + 2 = 9
#   Gemma3 (2 layers): 4 norms a layer (2 of them after a residual add), q/k norm + RoPE;
#   the MLP is gelu -> 11
#   Qwen3-Next (4 layers, 2 of them full attention): every other row's rewrites (norms,
#   residual adds + norms, SiLU-muls: 19) plus the partial q/k norm + RoPE of the two
#   attention layers, each taking its q/k norms with it -> 21
#   Phi-3 (2 layers): as Llama, the RoPE partial and the MLP's chunk form (up * silu(gate)) -> 9
#   DeepSeek-V3 (3 layers, MLA): the norms (q_a/kv_a included), residual adds + norms and
#   SiLU-muls (18), plus the interleaved RoPE of q_rot/k_rot, one a layer -> 21
CASES = {
    "qwen3": (lambda: tiny_hf.build("qwen3"), 9),
    "llama": (_llama, 9),
    "gemma3": (_gemma3, 11),
    "deepseek_v3": (lambda: tiny_hf.build("deepseek_v3"), 21),
    "phi3_partial_rotary": (_phi3_partial, 9),
    "qwen3_next": (lambda: tiny_hf.build("qwen3_next"), 21),
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


@pytest.mark.slow
def test_static_cache_decode_fuses_in_front_of_the_index_copy(tmp_path):
    """HF's StaticCache: each layer's q/k norm + RoPE feeds ``keys.index_copy_(2,
    cache_position, k)``. The q/k norm + RoPE still fuses (the write stays as traced: no op
    takes separate q/k/v into a heads-first position-indexed cache, see the family's
    docstring); logits and the written caches equal eager's."""
    import copy

    from transformers import StaticCache

    torch.manual_seed(0)
    model = tiny_hf.build("qwen3").to(torch.bfloat16).eval()
    ids = torch.randint(0, tiny_hf.VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    cache = StaticCache(config=model.config, max_cache_len=11)
    with torch.no_grad():
        first = model(ids, past_key_values=cache, use_cache=True)  # eager prefill fills (and allocates) the cache
    ref_cache = copy.deepcopy(cache)
    nxt = first.logits[:, -1:].argmax(-1)
    pos = torch.tensor([5])
    torch._dynamo.reset()
    ascend_graph.reset_stats()
    opts = {"codegen": "fx", "graphs": False, "fusions": ("norm_rope",), "dump_dir": str(tmp_path)}
    compiled = torch.compile(model, backend="ascend", options=opts, dynamic=False)
    with torch.no_grad():
        ref = model(nxt, past_key_values=ref_cache, cache_position=pos, use_cache=True)
        out = compiled(nxt, past_key_values=cache, cache_position=pos, use_cache=True)
    torch.testing.assert_close(out.logits, ref.logits, atol=2e-2, rtol=1.6e-2)
    for a, b in zip(cache.layers, ref_cache.layers):
        # the fused op computes HF's ops rounding for rounding: the written keys are exact
        torch.testing.assert_close(a.keys, b.keys, atol=0, rtol=0)
        torch.testing.assert_close(a.values, b.values, atol=0, rtol=0)
    stats = ascend_graph.stats()
    assert stats["graphs_compiled"] == 1
    assert stats["fusions"]["norm_rope"] == 9  # as with the DynamicCache: q/k norm + RoPE of both layers included
    (after,) = tmp_path.glob("*fuse_norm_rope.after.py")
    code = after.read_text()
    # index_copy_ traces to index_put(cache, [None, None, cache_position], k) + copy_ back: k and v, two layers
    assert code.count("ascend_graph.qk_norm_rope.default(") == 2 and code.count("aten.index_put.default(") == 4
    assert "rsqrt" not in code


@pytest.mark.cuda
@pytest.mark.parametrize("arch", ["deepseek_v3", "phi3_partial_rotary"])
def test_cuda_inductor_interleaved_and_partial_rotary_models(arch):
    """On CUDA the family applies under inductor codegen: the interleaved (DeepSeek-V3) and
    partial (Phi-3) RoPE rows run the Triton kernel inside inductor's graph (the
    de-interleave after the interleaved op is inductor's to fold into the following cat)
    and the logits of prefill and one decode step match eager's within bf16 tolerance."""
    make, per_graph = CASES[arch]
    torch.manual_seed(0)
    model = make().to(device="cuda", dtype=torch.bfloat16).eval()
    torch._dynamo.reset()
    ascend_graph.reset_stats()
    compiled = torch.compile(model, backend="ascend", options={"graphs": False, "fusions": ("norm_rope",)}, dynamic=False)
    ids = torch.randint(0, tiny_hf.VOCAB, (2, 5), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        ref = model(ids, use_cache=True)
        out = compiled(ids, use_cache=True)
        nxt = ref.logits[:, -1:].argmax(-1)
        ref2 = model(nxt, past_key_values=ref.past_key_values, use_cache=True)
        out2 = compiled(nxt, past_key_values=out.past_key_values, use_cache=True)
    tol = dict(atol=5e-2, rtol=5e-2)  # bf16; the kernels round once where HF rounds per op
    torch.testing.assert_close(out.logits, ref.logits, **tol)
    torch.testing.assert_close(out2.logits, ref2.logits, **tol)
    stats = ascend_graph.stats()
    assert "norm_rope" not in stats["skipped"]
    assert stats["fusions"]["norm_rope"] == 2 * per_graph
