"""Pure parts of the cache: keys, locks, atomic writes, checksums (no compile)."""

from __future__ import annotations

import os

import pytest
import torch

from ascend_graph.cache import key as key_mod
from ascend_graph.cache.key import KEY_FACTORS, CacheKey, cann_version, device_factor
from ascend_graph.cache.store import CacheStore
from ascend_graph.errors import CacheError

from .helpers import fake_entry, flip_byte, rewrite_manifest, truncate


def _key(**changes):
    factors = {name: f"v-{name}" for name in KEY_FACTORS}
    factors.update(changes)
    return CacheKey(factors=factors, slot="s")


def test_digest_is_a_function_of_the_factors_only():
    assert _key().digest == _key().digest
    assert _key(torch="2.14").digest != _key().digest
    assert CacheKey(factors=_key().factors, slot="other").digest == _key().digest


def test_diff_names_each_changed_factor_with_both_values():
    diff = _key(torch="9", device="cuda:x").diff(_key().factors)
    assert diff == {"torch": ("9", "v-torch"), "device": ("cuda:x", "v-device")}
    assert _key().diff(_key().factors) == {}


def test_cann_version_read_from_the_install_info_without_importing(tmp_path):
    info = tmp_path / f"{os.uname().machine}-linux" / "ascend_toolkit_install.info"
    info.parent.mkdir()
    info.write_text("package_name=Ascend-cann-toolkit\nversion=8.1.RC1\n")
    assert cann_version(str(tmp_path)) == "8.1.RC1"
    assert cann_version(str(tmp_path / "missing")) == "none"


def test_device_factor_names_the_cpu_isa():
    f = device_factor(torch.device("cpu"))
    assert f.startswith("cpu:") and f.endswith(torch.backends.cpu.get_cpu_capability())


def test_versions_are_read_without_importing_torch_npu():
    import sys

    key_mod.environment_factors(torch.device("cpu"))
    assert "torch_npu" not in sys.modules


def test_write_entry_is_atomic_and_checksummed(tmp_path):
    store = fake_entry(tmp_path)
    digest = store.digests()[0]
    assert store.verify(digest) == []
    entry, problems = store.read_entry(digest)
    assert problems == [] and entry.text("graph.py").startswith("def forward")
    assert store.leftovers() == []  # no temporary directory survives a write


def test_failed_write_leaves_no_entry_and_no_temporary(tmp_path, monkeypatch):
    store = fake_entry(tmp_path)

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("ascend_graph.cache.store._fsync_dir", fail)
    with pytest.raises(OSError, match="disk full"):
        with store.lock(exclusive=True):
            store.write_entry("cd" * 16, {"factors": {}}, {"graph.py": b"x"})
    assert not os.path.exists(store.entry_dir("cd" * 16))
    assert store.leftovers() == []


@pytest.mark.parametrize("damage", ["truncate", "flip"])
@pytest.mark.parametrize("name", ["graph.py", "manifest.json"])
def test_damaged_file_is_reported(tmp_path, damage, name):
    store = fake_entry(tmp_path)
    digest = store.digests()[0]
    path = os.path.join(store.entry_dir(digest), name)
    (truncate if damage == "truncate" else flip_byte)(path)
    problems = store.verify(digest)
    assert problems, f"{damage} of {name} went unnoticed"
    entry, read_problems = store.read_entry(digest)
    assert entry is None and read_problems


def test_a_missing_file_is_reported(tmp_path):
    store = fake_entry(tmp_path)
    digest = store.digests()[0]
    os.remove(os.path.join(store.entry_dir(digest), "post_pass.py"))
    assert any("post_pass.py" in p for p in store.verify(digest))


def test_corrupt_entry_is_replaced_by_a_new_write(tmp_path):
    store = fake_entry(tmp_path)
    digest = store.digests()[0]
    flip_byte(os.path.join(store.entry_dir(digest), "graph.py"))
    with store.lock(exclusive=True):
        store.write_entry(digest, {"factors": {}}, {"graph.py": b"new"})
    assert store.verify(digest) == []
    assert store.read_entry(digest)[0].text("graph.py") == "new"


def test_lock_timeout_is_a_cache_error_naming_the_holder(tmp_path):
    store = CacheStore(str(tmp_path))
    store.ensure()
    with store.lock(exclusive=True):
        with pytest.raises(CacheError) as e:
            store.lock(exclusive=False, timeout=0.2).acquire()
    assert f"pid {os.getpid()}" in str(e.value.got)
    # shared locks do not exclude each other
    with store.lock(exclusive=False), store.lock(exclusive=False, timeout=0.2):
        pass


def test_another_format_is_refused(tmp_path):
    store = CacheStore(str(tmp_path))
    store.ensure()
    (tmp_path / "ascend-graph-cache.json").write_text('{"format": 99}')
    with pytest.raises(CacheError) as e:
        store.ensure()
    assert e.value.expected == "format 1"


def test_kernel_paths_cannot_escape_the_inductor_cache(tmp_path):
    from ascend_graph.cache.store import restore_kernels

    with pytest.raises(CacheError):
        restore_kernels({"../../etc/evil.so": b"x"})


def test_rewrite_manifest_helper_keeps_the_entry_valid(tmp_path):
    store = fake_entry(tmp_path)
    digest = store.digests()[0]
    rewrite_manifest(store, digest, factors={"torch": "0.0"})
    assert store.verify(digest) == []
    assert store.summary(digest).factors["torch"] == "0.0"
