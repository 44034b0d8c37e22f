"""A read-only cache (an image layer, a read-only mount) serves hits and compiles misses without writing.

The view is a read-only bind mount (tests/cache/helpers.py ``read_only_view``): the tests
run as root, who ignores file modes, so only a read-only file system really refuses
writes.
"""

from __future__ import annotations

import torch

import ascend_graph
from ascend_graph.cache import record_events
from tests.cache.helpers import MLP, compile_and_run, read_only_view, tree


def test_read_only_cache_hits_and_compiles_misses_without_writing(tmp_path):
    src = tmp_path / "cache"
    torch.manual_seed(0)
    model = MLP().eval()
    with record_events() as events:
        out, ref = compile_and_run(model, src)
    assert [e.status for e in events] == ["miss"]
    before = tree(src)
    with read_only_view(src, tmp_path / "ro") as ro:
        ascend_graph.reset_stats()
        with record_events() as events:
            out, ref = compile_and_run(model, ro)
        torch.testing.assert_close(out, ref)
        assert [e.status for e in events] == ["hit"] and not events[0].read_only
        cache = ascend_graph.stats()["cache"]
        assert cache["hits"] == 1 and cache["errors"] == 0 and cache["read_only"] == 0

        # a graph the cache does not hold: compiled here, not stored, counted
        torch.manual_seed(0)
        other = MLP(act="gelu").eval()
        with record_events() as events:
            out, ref = compile_and_run(other, ro, batch=5)
        torch.testing.assert_close(out, ref)
        assert [(e.status, e.read_only) for e in events] == [("miss", True)]
        cache = ascend_graph.stats()["cache"]
        assert cache["misses"] == 1 and cache["read_only"] == 1 and cache["errors"] == 0
    assert tree(src) == before  # nothing written: no entry, no lock file
