"""Two `ascend-graph build` processes on one cache: one waits, the cache stays consistent."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from ascend_graph.cache.store import CacheStore

from .helpers import write_factory


def test_two_builders_one_waits_and_the_cache_is_consistent(tmp_path):
    factory_dir = write_factory(tmp_path)
    cache_dir = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": factory_dir + os.pathsep + os.environ.get("PYTHONPATH", ""), "AG_TEST_SLEEP": "3"}
    cmd = [sys.executable, "-m", "ascend_graph.cli", "build", "agfactory:slow", "--buckets", "2,4", "--cache-dir", str(cache_dir), "-o", "codegen=fx", "-o", "fusions=[]"]
    first = subprocess.Popen(cmd + ["--name", "first"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # the second starts once the first holds the build lock (its lock file names its pid)
    lock = cache_dir / ".build.lock"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (lock.exists() and lock.read_text().strip() == str(first.pid)):
        time.sleep(0.05)
    second = subprocess.Popen(cmd + ["--name", "second"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out1, err1 = first.communicate(timeout=600)
    out2, err2 = second.communicate(timeout=600)
    assert first.returncode == 0, err1[-2000:]
    assert second.returncode == 0, err2[-2000:]
    assert f"waiting for the build lock held by pid {first.pid}" in err2
    assert "waiting" not in err1

    store = CacheStore(str(cache_dir))
    digests = store.digests()
    assert digests and all(store.verify(d) == [] for d in digests)
    assert store.leftovers() == []
    records = {r["name"]: r for r in store.build_records()}
    # the second builder found every graph the first one wrote
    built_by_first = [e["key"] for row in records["first"]["per_bucket"] for e in row["entries"]]
    statuses_second = [e["status"] for row in records["second"]["per_bucket"] for e in row["entries"]]
    assert sorted(built_by_first) == digests
    assert statuses_second and set(statuses_second) == {"hit"}
