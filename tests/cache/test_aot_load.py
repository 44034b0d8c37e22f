"""A verified hit of an inductor entry loads the compiled graph: no AOT trace, no passes, no inductor.

One process, one small graph (the cross-process case is test_warm_start.py): build
(miss) -> hit that loads -> a hit whose AOTAutograd entry cannot be found rebuilds and
compares -> a changed pass source misses, rebuilds and never loads the old graph.
Only the first build compiles C++; the later builds find its kernels by source hash.
"""

from __future__ import annotations

import torch
import pytest

import ascend_graph
import ascend_graph.cache as cache
from ascend_graph.cache.store import CacheStore
from ascend_graph.passes.manager import PassManager

from .helpers import MLP, rewrite_manifest

INDUCTOR = {"codegen": "inductor", "fusions": []}


def _compile(model, cache_dir, x):
    torch._dynamo.reset()
    ascend_graph.reset_stats()
    compiled = torch.compile(model, backend="ascend", options={"cache_dir": str(cache_dir), **INDUCTOR})
    with cache.record_events() as events, torch.no_grad():
        out = compiled(x)
    return out, events, ascend_graph.stats()


def _aot_hits():
    from torch._dynamo.utils import counters

    return counters["aot_autograd"]["autograd_cache_hit"]


@pytest.mark.slow
def test_hit_loads_and_invalidation_still_rebuilds(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(5))

    cold, events, built = _compile(model, tmp_path, x)
    assert [(e.status, e.changed) for e in events] == [("miss", ("new",))]
    store = CacheStore(str(tmp_path))
    (digest,) = store.digests()
    entry, _ = store.read_entry(digest)
    m = entry.manifest
    assert m["aot_cache_tag"].startswith(f"ascend-graph:{digest}:")
    assert m["torch_artifacts"].get("aot_autograd") == 1
    assert m["mutated_inputs"] == []
    assert [r["name"] for r in m["pass_records"]] == m["passes"]
    torch.testing.assert_close(cold, model(x))

    # hit: loaded from the entry; the passes did not run, their counts are restored
    hits = _aot_hits()
    warm, events, st = _compile(model, tmp_path, x)
    assert [(e.status, e.detail) for e in events] == [("hit", "loaded")]
    assert _aot_hits() == hits + 1
    assert torch.equal(warm, cold)
    assert {k: v["rewrites"] for k, v in st["passes"].items()} == {k: v["rewrites"] for k, v in built["passes"].items()}
    assert {k: v["runs"] for k, v in st["passes"].items()} == {k: v["runs"] for k, v in built["passes"].items()}
    assert all(v["seconds"] == 0.0 for v in st["passes"].values())

    # torch cannot find the entry's AOTAutograd result (another tag): the hit rebuilds
    # under that tag and compares the post-pass graph (equal: still a hit)
    rewrite_manifest(store, digest, aot_cache_tag=f"ascend-graph:{digest}:another-build")
    again, events, st = _compile(model, tmp_path, x)
    assert [(e.status, e.detail) for e in events] == [("hit", "built")]
    assert torch.equal(again, cold)
    assert any(v["seconds"] > 0.0 for v in st["passes"].values())

    # a changed pass source: a miss that names it, and a build (never the old graph)
    monkeypatch.setattr(PassManager, "uuid", lambda self: "a-changed-pass")
    hits = _aot_hits()
    changed, events, st = _compile(model, tmp_path, x)
    assert [(e.status, e.changed) for e in events] == [("miss", ("passes",))]
    assert _aot_hits() == hits
    assert any(v["seconds"] > 0.0 for v in st["passes"].values())
    torch.testing.assert_close(changed, model(x))
    tags = {store.read_entry(d)[0].manifest["aot_cache_tag"] for d in store.digests()}
    assert len(tags) == 2
