"""Whole models: tiny random-weight HF Qwen3, Qwen3-MoE, Qwen3-Next and DeepSeek-V3
compiled with backend="ascend" match eager for a prefill and decode steps with a KV
cache, at several batch and sequence lengths (so the bucketed runner pads and slices).

Most run the post-pass FX graph (codegen "fx": seconds per graph here); Qwen3 also
runs through inductor end to end.
"""

import pytest
import torch

import ascend_graph
from tests.models.tiny_hf import build, prefill_and_decode

ARCHS = ["qwen3", "qwen3_moe", "qwen3_next", "deepseek_v3"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_and_decode_match_eager(arch):
    torch._dynamo.reset()
    model = build(arch)
    compiled = torch.compile(model, backend="ascend", options={"codegen": "fx", "buckets": [1, 2, 4, 8]})
    for batch, seq in [(2, 5), (3, 9)]:
        err = prefill_and_decode(model, compiled, batch, seq, steps=2, seed=batch)
        assert err < 1e-4, f"{arch} batch {batch} seq {seq}: max |logit diff| {err}"
    st = ascend_graph.stats()
    assert st["graphs_compiled"] >= 2
    assert st["replays"] > 0 and st["eager_fallbacks"] == 0
    assert st["padding"]["padded_rows"] > 0  # batch 3 ran in bucket 4


@pytest.mark.slow
def test_qwen3_through_inductor():
    torch._dynamo.reset()
    model = build("qwen3")
    compiled = torch.compile(model, backend="ascend")
    err = prefill_and_decode(model, compiled, 3, 7, steps=2)
    assert err < 1e-4
    assert ascend_graph.stats()["fusions"]["attention"] > 0
