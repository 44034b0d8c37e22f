"""The examples run, and what they print is true (they are run in-process, small)."""

from __future__ import annotations

import importlib.util
import os

import torch

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mtp_draft_step_matches_eager_on_real_rows_across_buckets():
    """The MTP draft step (transformers' MtpLayer, paged Qwen3 block) compiled with
    backend="ascend": every drafted token, every real row's logits and the drafter's KV
    cache equal the unpadded eager run; batches are served from drafter buckets that are
    multiples of 1+k tokens, padded with whole dummy requests."""
    mtp = _load("mtp_draft")
    torch._dynamo.reset()
    k = 2
    q = 1 + k
    batches = [3, 5, 2, 7, 4]
    # the attention family alone (the FIA padding pass comes with it): the other families'
    # pattern tables take a minute to build on a small CPU and find nothing here
    result = mtp.run(batches, k=k, codegen="fx", token_buckets=[q * b for b in (2, 4, 8)], fusions=["attention"])
    worst, st = result["worst"], result["stats"]
    assert worst["tokens_differ"] == 0 and worst["logits"] < 1e-4 and worst["cache"] < 1e-5
    assert st["eager_fallbacks"] == 0 and st["replays"] == len(batches)
    requests = sorted({int(key.split(":")[1].split("x")[0]) for key in st["buckets"]})
    assert requests == [2, 4, 8]  # request buckets of 2*q, 4*q and 8*q tokens
    # padded rows are whole dummy requests: 3->4, 5->8, 2->2, 7->8, 4->4
    assert st["padding"]["real_rows"] == sum(batches) and st["padding"]["padded_rows"] == 1 + 3 + 0 + 1 + 0
    assert st["padding"]["rewrites"] == 1  # the FIA padding pass over the one paged attention
