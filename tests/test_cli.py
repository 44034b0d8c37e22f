"""The ascend-graph CLI: build / inspect / verify / clear, exit codes and messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ascend_graph.cache.store import CacheStore
from ascend_graph.cli import EXIT_BUILD_FAILED, EXIT_LOCKED, EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, main, resize_batch
from tests.cache.helpers import fake_entry, flip_byte, rewrite_manifest, write_factory


@pytest.fixture
def factory(tmp_path, monkeypatch):
    write_factory(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    yield
    sys.modules.pop("agfactory", None)


def _build(cache_dir, model="agfactory:make", *extra):
    return main(["build", model, "--buckets", "2,4", "--cache-dir", str(cache_dir), "-o", "codegen=fx", "-o", "fusions=[]", *extra])


def test_build_then_inspect_then_verify_then_clear(tmp_path, factory, capsys):
    cache_dir = tmp_path / "cache"
    assert _build(cache_dir) == EXIT_OK
    out, err = capsys.readouterr()
    assert "[1/2] bucket 2: compiling" in err and "[2/2] bucket 4: done" in err
    assert "bucket   seconds" in out and "total" in out
    store = CacheStore(str(cache_dir))
    # Dynamo compiles bucket 2 static, then bucket 4 as a dynamic-batch graph
    assert len(store.digests()) == 2

    assert _build(cache_dir) == EXIT_OK  # rebuild: everything from the cache
    record = {r["name"]: r for r in store.build_records()}["agfactory_make"]
    assert [e["status"] for row in record["per_bucket"] for e in row["entries"]] == ["hit", "hit"]
    capsys.readouterr()

    assert main(["inspect", str(cache_dir)]) == EXIT_OK
    out, _ = capsys.readouterr()
    assert "2 entries" in out and "factors:" in out and "post_pass.py" in out and "buckets [2, 4]" in out
    assert "a hit will rebuild" in out  # FX codegen: a hit runs the build (only inductor output loads)

    assert main(["inspect", str(cache_dir), "--json"]) == EXIT_OK
    doc = json.loads(capsys.readouterr().out)
    assert doc["entries"][0]["factors"]["torch"] and doc["builds"][0]["buckets"] == [2, 4]
    assert {e["on_hit"] for e in doc["entries"]} == {"rebuild"}

    assert main(["verify", str(cache_dir)]) == EXIT_OK
    assert "2 ok, 0 corrupt, 0 stale" in capsys.readouterr().out

    assert main(["clear", str(cache_dir)]) == EXIT_OK
    assert "removed 2 entries" in capsys.readouterr().out
    assert store.digests() == [] and store.is_cache()


def test_build_accepts_kwargs_example_inputs(tmp_path, factory):
    assert _build(tmp_path / "cache", "agfactory:make_kwargs") == EXIT_OK


def test_resize_batch_repeats_rows_along_the_batch_dim():
    import torch

    ids = torch.tensor([[1, 2], [3, 4]])
    out = resize_batch({"ids": ids, "flag": False, "scale": torch.ones(5)}, 5)
    assert out["ids"].tolist() == [[1, 2], [3, 4], [1, 2], [3, 4], [1, 2]]
    assert out["flag"] is False and out["scale"].shape == (5,)  # dim 0 != batch: untouched
    assert resize_batch((ids,), 1)[0].tolist() == [[1, 2]]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["build", "--buckets", "1", "--cache-dir", "X"], "exactly one of MODEL"),
        (["build", "agfactory:make", "--buckets", "1,x", "--cache-dir", "X"], "--buckets must be"),
        (["build", "agfactory:make", "--buckets", "0", "--cache-dir", "X"], "positive"),
        (["build", "nomodule_here:make", "--buckets", "1", "--cache-dir", "X"], "cannot import 'nomodule_here'"),
        (["build", "agfactory", "--buckets", "1", "--cache-dir", "X"], "MODULE:FACTORY"),
        (["build", "agfactory:missing", "--buckets", "1", "--cache-dir", "X"], "no callable 'missing'"),
        (["build", "agfactory:boom", "--buckets", "1", "--cache-dir", "X"], "factory failed on purpose"),
        (["build", "agfactory:not_a_pair", "--buckets", "1", "--cache-dir", "X"], "must return (model, example_inputs)"),
        (["build", "agfactory:make", "--buckets", "1", "--cache-dir", "X", "-o", "no_such_option=1"], "unknown option"),
        (["build", "agfactory:make", "--buckets", "1", "--cache-dir", "X", "-o", "buckets=[1]"], "set by --buckets"),
        (["build", "--hf-config", "missing.json", "--buckets", "1", "--cache-dir", "X"], "cannot read HF config"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_usage_errors_exit_2_with_one_line(tmp_path, factory, capsys, argv, message):
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "ascend-graph: error: " in err and message in err


def test_model_that_raises_exits_4(tmp_path, factory, capsys):
    assert _build(tmp_path / "cache", "agfactory:raising_model") == EXIT_BUILD_FAILED
    assert "model failed on purpose" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["inspect", "verify", "clear"])
def test_missing_or_foreign_directory_exits_2(tmp_path, capsys, command):
    assert main([command, str(tmp_path / "nope")]) == EXIT_USAGE
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "precious.txt").write_text("keep me")
    assert main([command, str(tmp_path)]) == EXIT_USAGE
    assert "not an ascend-graph cache" in capsys.readouterr().err
    assert (tmp_path / "precious.txt").exists()


def test_verify_reports_corruption_and_exits_1(tmp_path, capsys):
    store = fake_entry(tmp_path)
    digest = store.digests()[0]
    assert main(["verify", str(tmp_path)]) == EXIT_OK
    flip_byte(os.path.join(store.entry_dir(digest), "graph.py"))
    capsys.readouterr()
    assert main(["verify", str(tmp_path)]) == EXIT_PROBLEMS
    out = capsys.readouterr().out
    assert f"CORRUPT  {digest[:12]}: graph.py: sha256 mismatch" in out
    assert main(["verify", str(tmp_path), "--json"]) == EXIT_PROBLEMS
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and doc["entries"][0]["status"] == "corrupt"


def test_verify_reports_entries_of_other_versions_and_clear_stale_removes_them(tmp_path, capsys):
    store = fake_entry(tmp_path, digest="aa" * 16)
    fake_entry(tmp_path, digest="bb" * 16)
    rewrite_manifest(store, "bb" * 16, factors={"torch": "1.0.0", "device": "cpu:x86_64:OTHER"})
    assert main(["verify", str(tmp_path)]) == EXIT_PROBLEMS
    out = capsys.readouterr().out
    assert "STALE    bbbbbbbbbbbb: built for another setup: torch (here" in out and "entry 1.0.0" in out
    assert "device (here" in out
    assert main(["verify", str(tmp_path), "--checksums-only"]) == EXIT_OK
    capsys.readouterr()
    assert main(["clear", str(tmp_path), "--stale"]) == EXIT_OK
    assert "removed 1 entries" in capsys.readouterr().out
    assert store.digests() == ["aa" * 16]


def test_locked_cache_exits_3(tmp_path, capsys):
    store = fake_entry(tmp_path)
    with store.lock(exclusive=True):
        assert main(["verify", str(tmp_path), "--lock-timeout", "0.2"]) == EXIT_LOCKED
        assert "timed out waiting for the cache lock" in capsys.readouterr().err
        assert main(["clear", str(tmp_path), "--lock-timeout", "0.2"]) == EXIT_LOCKED
    with store.build_lock():
        assert main(["build", "agfactory:make", "--buckets", "1", "--cache-dir", str(tmp_path), "--lock-timeout", "0.2"]) == EXIT_LOCKED
    assert f"held by pid {os.getpid()}" in capsys.readouterr().err


def test_cache_of_another_format_exits_3(tmp_path, capsys):
    fake_entry(tmp_path)
    (tmp_path / "ascend-graph-cache.json").write_text('{"format": 99}')
    assert main(["verify", str(tmp_path)]) == EXIT_LOCKED
    assert "another format" in capsys.readouterr().err


def test_console_entry_point_runs_as_a_module(tmp_path):
    fake_entry(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "ascend_graph.cli", "verify", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_OK, proc.stderr
    assert "1 ok" in proc.stdout
