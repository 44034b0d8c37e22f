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
    # The first graph is batch-dynamic (batch 2 is re-traced, cache/dynamic.py), and
    # bucket 4 runs in it: one entry
    assert len(store.digests()) == 1

    assert _build(cache_dir) == EXIT_OK  # rebuild: everything from the cache
    record = {r["name"]: r for r in store.build_records()}["agfactory_make"]
    assert [e["status"] for row in record["per_bucket"] for e in row["entries"]] == ["hit"]
    capsys.readouterr()

    assert main(["inspect", str(cache_dir)]) == EXIT_OK
    out, _ = capsys.readouterr()
    assert "1 entries" in out and "key factors:" in out and "post_pass.py" in out and "buckets [2, 4]" in out
    # serving options are listed beside the key, not in it; graph options in it
    assert "options recorded beside the key (not in it): " in out and "buckets=[2,4]" in out and "warmup=false" in out
    assert "options in the key (config factor): " in out and "codegen=\"fx\"" in out
    assert "a hit will rebuild" in out  # FX codegen: a hit runs the build (only inductor output loads)
    # the batch-dynamic entry names its frame: a later process traces it batch-dynamic first
    assert "first trace batch-dynamic in dim 0 of L[" in out

    assert main(["inspect", str(cache_dir), "--json"]) == EXIT_OK
    doc = json.loads(capsys.readouterr().out)
    assert doc["entries"][0]["factors"]["torch"] and doc["builds"][0]["buckets"] == [2, 4]
    assert {e["on_hit"] for e in doc["entries"]} == {"rebuild"}
    assert [list(e["frame"]["sources"].values()) for e in doc["entries"]] == [[2]]

    assert main(["verify", str(cache_dir)]) == EXIT_OK
    assert "1 ok, 0 corrupt, 0 stale" in capsys.readouterr().out

    assert main(["clear", str(cache_dir)]) == EXIT_OK
    assert "removed 1 entries" in capsys.readouterr().out
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
        ([], "required: command"),
        (["inspect"], "required: cache_dir"),
        (["build", "agfactory:make", "--buckets", "1", "--cache-dir", "X", "--lock-timeout", "-1"], "--lock-timeout must be >= 0"),
        (["build", "agfactory:make", "--buckets", "1", "--cache-dir", "X", "--lock-timeout", "soon"], "invalid float value"),
        (["build", "agfactory:make", "--buckets", "1", "--cache-dir", "X", "-o", "graphs=3"], "must be a bool"),
        (["build", "agfactory:make", "--buckets", "1", "--cache-dir", "X", "-o", "novalue"], "KEY=VALUE"),
        (["build", "agfactory:make", "--buckets", "1", "--cache-dir", "X", "-o", "fusions=7"], "must be a list"),
        (["build", "agfactory:make", "--buckets", "1", "--cache-dir", "X", "--device", "tpu"], "invalid choice"),
        (["build", "--hf-config", "missing.json", "--buckets", "1", "--cache-dir", "X", "--seq-len", "0"], "--seq-len must be >= 1"),
    ],
)
def test_usage_errors_exit_2_with_one_line(tmp_path, factory, capsys, argv, message):
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("ascend-graph: error: ") and message in err
    assert len(err.strip().splitlines()) == 1, err


def test_model_that_raises_exits_4(tmp_path, factory, capsys):
    assert _build(tmp_path / "cache", "agfactory:raising_model") == EXIT_BUILD_FAILED
    err = capsys.readouterr().err
    assert "model failed on purpose" in err and len([l for l in err.splitlines() if "error:" in l]) == 1


def test_help_documents_the_exit_codes(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for code in ("0 success", "1 verify found", "2 usage error", "3 cache locked, read-only", "4 build failed", "130 interrupted"):
        assert code in " ".join(out.split())


def test_cache_dir_that_is_a_file_exits_3_with_one_line(tmp_path, factory, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(["build", "agfactory:make", "--buckets", "1", "--cache-dir", str(tmp_path / "afile")]) == EXIT_LOCKED
    err = capsys.readouterr().err
    assert err.startswith("ascend-graph: error: cannot use") and len(err.strip().splitlines()) == 1


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


def test_locked_cache_exits_3_for_writers_and_is_read_while_locked(tmp_path, capsys):
    store = fake_entry(tmp_path)
    with store.lock(exclusive=True):
        # reading takes no lock: verify and inspect work while a writer holds it
        assert main(["verify", str(tmp_path), "--lock-timeout", "0.2"]) == EXIT_OK
        assert main(["inspect", str(tmp_path)]) == EXIT_OK
        capsys.readouterr()
        assert main(["clear", str(tmp_path), "--lock-timeout", "0.2"]) == EXIT_LOCKED
        assert "timed out waiting for the cache lock" in capsys.readouterr().err
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


# -- malformed manifests and build records ---------------------------------------------


@pytest.mark.parametrize(
    "changes,field",
    [
        ({"factors": ["torch", "2.13"]}, "factors"),
        ({"factors": {"torch": 213}}, "factors"),
        ({"files": ["graph.py"]}, "files"),
        ({"files": {"graph.py": "abc"}}, "files"),
        ({"files": {"../../etc/passwd": {"sha256": "0", "bytes": 1}}}, "files"),
        ({"buckets": [True, 2]}, "buckets"),
        ({"shapes": {"inputs": [{"name": "x", "dims": "s0"}]}}, "shapes"),
        ({"pass_records": [["attention", 1]]}, "pass_records"),
    ],
)
def test_manifest_resealed_with_wrong_types_is_corrupt(tmp_path, capsys, changes, field):
    store = fake_entry(tmp_path)
    digest = store.digests()[0]
    path = os.path.join(store.entry_dir(digest), "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    manifest.update(changes)
    from ascend_graph.cache.store import _manifest_checksum

    manifest["manifest_sha256"] = _manifest_checksum(manifest)  # re-sealed: the checksum holds
    with open(path, "w") as f:
        json.dump(manifest, f)
    assert main(["verify", str(tmp_path)]) == EXIT_PROBLEMS
    out = capsys.readouterr().out
    assert f"CORRUPT  {digest[:12]}: entry manifest field {field!r} is malformed" in out
    assert main(["inspect", str(tmp_path)]) == EXIT_OK
    assert f"entry {digest[:12]}  CORRUPT: entry manifest field {field!r} is malformed" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path), "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["entries"][0]["problem"]
    assert main(["clear", str(tmp_path), "--stale"]) == EXIT_OK
    assert store.digests() == []


@pytest.mark.parametrize("text", ['[1, 2]', '{"per_bucket": [3]}', "not json"])
def test_malformed_build_record_is_reported_not_a_traceback(tmp_path, capsys, text):
    store = fake_entry(tmp_path)
    os.makedirs(store.builds_dir, exist_ok=True)
    with open(os.path.join(store.builds_dir, "bad.json"), "w") as f:
        f.write(text)
    assert main(["inspect", str(tmp_path)]) == EXIT_OK
    assert "build record bad.json: CORRUPT:" in capsys.readouterr().out


# -- read-only caches ---------------------------------------------------------------------


def test_read_only_cache_is_inspected_and_verified_and_refuses_build_and_clear(tmp_path, factory, capsys):
    from tests.cache.helpers import read_only_view, tree

    src = tmp_path / "cache"
    assert _build(src) == EXIT_OK
    before = tree(src)
    with read_only_view(src, tmp_path / "ro") as ro:
        capsys.readouterr()
        assert main(["inspect", ro]) == EXIT_OK
        assert "1 entries" in capsys.readouterr().out
        assert main(["verify", ro]) == EXIT_OK
        assert "1 ok, 0 corrupt, 0 stale" in capsys.readouterr().out
        for argv in (["clear", ro], ["clear", ro, "--stale"], ["build", "agfactory:make", "--buckets", "2,4", "--cache-dir", ro]):
            assert main(argv) == EXIT_LOCKED
            err = capsys.readouterr().err
            assert err.startswith(f"ascend-graph: error: {ro} is read-only") and len(err.strip().splitlines()) == 1, err
    assert tree(src) == before  # nothing written, not even a lock file
