"""compile_with_cache through torch.compile: hits, misses per key factor, corruption, strict."""

from __future__ import annotations

import logging
import os

import pytest
import torch

import ascend_graph.cache as cache
from ascend_graph.cache import key as key_mod
from ascend_graph.cache.store import CacheStore
from ascend_graph.errors import CacheError
from ascend_graph.passes.manager import PassManager

from .helpers import MLP, compile_and_run, flip_byte, truncate


@pytest.fixture
def model():
    torch.manual_seed(0)
    return MLP().eval()


def _statuses(events):
    return [(e.status, e.changed) for e in events]


def test_round_trip_miss_then_hit(tmp_path, model):
    with cache.record_events() as first:
        out, ref = compile_and_run(model, tmp_path)
    torch.testing.assert_close(out, ref)
    assert _statuses(first) == [("miss", ("new",))]
    store = CacheStore(str(tmp_path))
    (digest,) = store.digests()
    entry, _ = store.read_entry(digest)
    assert entry.text("post_pass.py") and entry.text("graph.py")
    assert entry.manifest["factors"]["device"].startswith("cpu:")
    assert set(entry.manifest["factors"]) == set(key_mod.KEY_FACTORS)

    with cache.record_events() as second:
        out, ref = compile_and_run(model, tmp_path)
    torch.testing.assert_close(out, ref)
    assert _statuses(second) == [("hit", ())]
    assert store.digests() == [digest]


def _rebuild_reason(tmp_path, model, caplog, **options):
    with caplog.at_level(logging.WARNING, logger="ascend_graph.cache"), cache.record_events() as events:
        out, ref = compile_and_run(model, tmp_path, **options)
    torch.testing.assert_close(out, ref)
    assert len(events) == 1 and events[0].status == "miss"
    return events[0].changed, caplog.text


def test_pass_source_change_invalidates(tmp_path, model, caplog, monkeypatch):
    compile_and_run(model, tmp_path)
    monkeypatch.setattr(PassManager, "uuid", lambda self: "a-changed-pass")
    changed, text = _rebuild_reason(tmp_path, model, caplog)
    assert changed == ("passes",)
    assert "different passes" in text and "a-changed-pass" in text


def test_config_change_invalidates(tmp_path, model, caplog):
    compile_and_run(model, tmp_path)
    changed, text = _rebuild_reason(tmp_path, model, caplog, inductor_config={"max_autotune": False})
    assert changed == ("config",)
    assert "different config" in text


def test_options_outside_the_hash_do_not_invalidate(tmp_path, model):
    compile_and_run(model, tmp_path, buckets=[1, 2, 4])
    serving = dict(
        debug=True, buckets=[4, 8], warmup=True, graphs=False, clone_outputs=False, max_graphs=3,
        max_batch=16, memory_budget_bytes=1 << 20, stream_budget=100, num_speculative_tokens=0, cache_strict=True,
    )
    with cache.record_events() as events:
        compile_and_run(model, tmp_path, **serving)
    assert _statuses(events) == [("hit", ())]
    (entry,) = [CacheStore(str(tmp_path)).read_entry(d)[0] for d in CacheStore(str(tmp_path)).digests()]
    # recorded beside the key: the options of the compile that wrote the entry
    assert entry.manifest["serving_options"]["buckets"] == [1, 2, 4] and "buckets" not in entry.manifest["graph_options"]
    assert set(entry.manifest["graph_options"]) >= {"codegen", "fusions", "cleanup", "inductor_config"}


def test_runtime_without_buckets_serves_the_entry_buckets(tmp_path, model, caplog):
    compile_and_run(model, tmp_path, buckets=[4, 8])
    with caplog.at_level(logging.INFO, logger="ascend_graph.cache"), cache.record_events() as events:
        out, ref = compile_and_run(model, tmp_path)  # no buckets option
    torch.testing.assert_close(out, ref)
    assert _statuses(events) == [("hit", ())]
    assert "serves the entry's buckets [4, 8]" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ascend_graph.cache"):
        compile_and_run(model, tmp_path, buckets=[2, 16])  # explicit buckets win
    assert "serves the entry's buckets" not in caplog.text


@pytest.mark.parametrize("factor,value", [("torch", "9.9.9"), ("triton", "0.0.1"), ("cann", "8.0.RC9"), ("device", "cpu:x86_64:OTHER")])
def test_version_or_device_change_invalidates(tmp_path, model, caplog, monkeypatch, factor, value):
    compile_and_run(model, tmp_path)
    real = key_mod.environment_factors
    monkeypatch.setattr(key_mod, "environment_factors", lambda device: {**real(device), factor: value})
    changed, text = _rebuild_reason(tmp_path, model, caplog)
    assert changed == (factor,)
    assert f"different {factor} (now {value}" in text
    # both entries are kept: switching back finds the old one
    assert len(CacheStore(str(tmp_path)).digests()) == 2


def test_graph_change_invalidates(tmp_path, caplog):
    torch.manual_seed(0)
    compile_and_run(MLP("relu").eval(), tmp_path)
    changed, text = _rebuild_reason(tmp_path, MLP("gelu").eval(), caplog)
    assert changed == ("graph",)


def test_stats_count_hits_and_rebuild_reasons(tmp_path, model, monkeypatch):
    import ascend_graph

    compile_and_run(model, tmp_path)
    compile_and_run(model, tmp_path)
    monkeypatch.setattr(PassManager, "uuid", lambda self: "changed")
    compile_and_run(model, tmp_path)
    s = ascend_graph.stats()["cache"]
    assert s["hits"] == 1 and s["misses"] == 2
    assert s["rebuilds"] == {"new": 1, "passes": 1}


def _strict_backend(tmp_path):
    """A backend like "ascend" whose cache hook runs strict (the `strict` argument)."""
    from ascend_graph import backend as be
    from ascend_graph.capture.shapes import analyze_graph
    from ascend_graph.capture.trace import aot_trace, make_boxed_func
    from ascend_graph.config import AscendConfig
    from ascend_graph.passes.manager import build_pass_manager

    config = AscendConfig.from_options({"cache_dir": str(tmp_path), "codegen": "fx", "fusions": []})

    def backend(gm, example_inputs):
        from ascend_graph.cache.dynamic import restart_batch_dynamic

        shapes = analyze_graph(gm, example_inputs)
        restart_batch_dynamic(gm, example_inputs, shapes, config)  # as "ascend" does with cache_dir
        ctx = be.CompileContext(config, torch.device("cpu"), shapes, graph_id="strict")
        ctx.pass_manager = build_pass_manager(config)

        def fw(aten_gm, inputs):
            ctx.pass_manager(aten_gm, ctx.graph_id)
            ctx.post_pass_code = aten_gm.code
            return make_boxed_func(aten_gm.forward)

        return cache.compile_with_cache(gm, example_inputs, ctx, lambda tag: aot_trace(gm, example_inputs, fw), strict=True)

    return backend


def _run_strict(tmp_path, model):
    """Run under the strict backend; Dynamo's BackendCompilerFailed is unwrapped to our error."""
    from torch._dynamo.exc import BackendCompilerFailed

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=_strict_backend(tmp_path))
    try:
        with torch.no_grad():
            return compiled(torch.randn(3, 8))
    except BackendCompilerFailed as e:
        raise e.inner_exception from None


def test_strict_refuses_another_version_with_expected_and_got(tmp_path, model, monkeypatch):
    compile_and_run(model, tmp_path)
    _run_strict(tmp_path, model)  # the same setup: a verified hit is fine under strict
    real = key_mod.environment_factors
    monkeypatch.setattr(key_mod, "environment_factors", lambda device: {**real(device), "torch": "9.9.9"})
    with pytest.raises(CacheError) as e:
        _run_strict(tmp_path, model)
    assert e.value.expected == {"torch": "9.9.9"}
    assert e.value.got == {"torch": torch.__version__}


def test_strict_refuses_a_missing_entry(tmp_path, model):
    with pytest.raises(CacheError, match="no entry"):
        _run_strict(tmp_path, model)


@pytest.mark.parametrize("damage", [truncate, flip_byte], ids=["truncated", "flipped"])
@pytest.mark.parametrize("name", ["post_pass.py", "manifest.json"])
def test_corrupt_entry_is_rebuilt_never_loaded(tmp_path, model, caplog, monkeypatch, damage, name):
    compile_and_run(model, tmp_path)
    store = CacheStore(str(tmp_path))
    (digest,) = store.digests()
    damage(os.path.join(store.entry_dir(digest), name))

    loaded = []
    monkeypatch.setattr(cache, "load_torch_artifacts", lambda data: loaded.append(data) or {})
    monkeypatch.setattr(cache, "restore_kernels", lambda kernels: loaded.append(kernels) or 0)
    with caplog.at_level(logging.WARNING, logger="ascend_graph.cache"), cache.record_events() as events:
        out, ref = compile_and_run(model, tmp_path)
    torch.testing.assert_close(out, ref)
    assert [e.status for e in events] == ["corrupt"]
    assert "corrupt" in caplog.text and "not loaded" in caplog.text
    assert loaded == []
    assert store.verify(digest) == []  # the rebuild replaced it
    with cache.record_events() as again:
        compile_and_run(model, tmp_path)
    assert [e.status for e in again] == ["hit"]


def test_unusable_cache_dir_falls_back_to_a_plain_compile(tmp_path, model, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="ascend_graph.cache"), cache.record_events() as events:
        out, ref = compile_and_run(model, blocker)
    torch.testing.assert_close(out, ref)
    assert [e.status for e in events] == ["error"]
    assert "unusable" in caplog.text


def test_post_pass_mismatch_is_reported_and_entry_rewritten(tmp_path, model, caplog):
    from .helpers import rewrite_manifest

    compile_and_run(model, tmp_path)
    store = CacheStore(str(tmp_path))
    (digest,) = store.digests()
    path = os.path.join(store.entry_dir(digest), "post_pass.py")
    with open(path, "a") as f:
        f.write("# edited\n")
    data = open(path, "rb").read()
    import hashlib

    rewrite_manifest(store, digest, files={"post_pass.py": {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}})
    with caplog.at_level(logging.WARNING, logger="ascend_graph.cache"), cache.record_events() as events:
        compile_and_run(model, tmp_path)
    assert [e.status for e in events] == ["mismatch"]
    assert "misses a factor" in caplog.text
    assert "# edited" not in store.read_entry(digest)[0].text("post_pass.py")


def test_corrupt_torch_artifacts_are_never_deserialized(tmp_path, model, monkeypatch):
    import hashlib

    from .helpers import rewrite_manifest

    compile_and_run(model, tmp_path)
    store = CacheStore(str(tmp_path))
    (digest,) = store.digests()
    # give the (fx) entry an artifacts file with a valid checksum, then damage it
    data = b"torch artifacts " * 64
    path = os.path.join(store.entry_dir(digest), "torch_artifacts.bin")
    with open(path, "wb") as f:
        f.write(data)
    rewrite_manifest(store, digest, files={"torch_artifacts.bin": {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}})
    assert store.verify(digest) == []
    flip_byte(path, offset=100)
    loaded = []
    monkeypatch.setattr(cache, "load_torch_artifacts", lambda data: loaded.append(data) or {})
    with cache.record_events() as events:
        compile_and_run(model, tmp_path)
    assert [e.status for e in events] == ["corrupt"]
    assert loaded == []
