"""Triton's cache files and autotuning results travel with an entry (the CUDA warm start).

No GPU here: Triton's cache directory is a temporary one (``triton_cache_dir`` is patched),
and a custom op stands in for a kernel JIT-compiled at a graph's first run by writing
into it, as Triton does.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import ascend_graph.cache as cache
from ascend_graph.cache import store as store_mod
from ascend_graph.cache.store import TRITON_DIR_PLACEHOLDER, CacheStore, KernelRecorder, restore_triton
from ascend_graph.errors import CacheError

from .helpers import FX

_TRITON_DIR: list[str] = []  # where the test op "compiles" to (set by the fixture)
_KERNEL_HASH = "c0ffee" * 8


@torch.library.custom_op("ag_test_cache::jit_like", mutates_args=())
def _jit_like(x: torch.Tensor) -> torch.Tensor:
    """At its first call in a process, "compiles" a kernel into Triton's cache dir, as a JIT does."""
    root = _TRITON_DIR[0]
    path = os.path.join(root, _KERNEL_HASH, "k.cubin")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"\x7fELF cubin")
        with open(os.path.join(root, _KERNEL_HASH, "__grp__k.json"), "w") as f:
            json.dump({"child_paths": {"k.cubin": path}}, f)
    return x * 2


@_jit_like.register_fake
def _(x):
    return torch.empty_like(x)


class JitModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.ops.ag_test_cache.jit_like(self.lin(x))


@pytest.fixture
def triton_dir(tmp_path, monkeypatch):
    root = tmp_path / "triton-a"
    root.mkdir()
    monkeypatch.setattr(store_mod, "triton_cache_dir", lambda: str(_TRITON_DIR[0]))
    _TRITON_DIR[:] = [str(root)]
    yield root
    _TRITON_DIR.clear()


def test_recorder_keeps_new_triton_files_with_the_directory_replaced(tmp_path, triton_dir):
    (triton_dir / "old").mkdir()
    (triton_dir / "old" / "a.cubin").write_bytes(b"before")
    with KernelRecorder() as rec:
        kdir = triton_dir / "abc123"
        kdir.mkdir()
        (kdir / "k.cubin").write_bytes(b"cubin")
        (kdir / "__launcher.so").write_bytes(b"so")
        (kdir / "tmp.pid_1_x").write_bytes(b"partial")  # Triton's temporary: not kept
        (kdir / "__grp__k.json").write_text(json.dumps({"child_paths": {"k.cubin": str(kdir / "k.cubin")}}))
    files = rec.collect()
    assert sorted(n for n in files if n.startswith("triton/")) == ["triton/abc123/__grp__k.json", "triton/abc123/__launcher.so", "triton/abc123/k.cubin"]
    assert str(triton_dir).encode() not in files["triton/abc123/__grp__k.json"]
    assert TRITON_DIR_PLACEHOLDER in files["triton/abc123/__grp__k.json"]

    # restored into another process's (here: another) Triton dir, the group names that dir
    other = tmp_path / "triton-b"
    _TRITON_DIR[:] = [str(other)]
    stored = {n[len("triton/"):]: d for n, d in files.items() if n.startswith("triton/")}
    assert restore_triton(stored) == 3
    group = json.loads((other / "abc123" / "__grp__k.json").read_text())
    assert group["child_paths"]["k.cubin"] == str(other / "abc123" / "k.cubin")
    assert (other / "abc123" / "k.cubin").read_bytes() == b"cubin"
    assert restore_triton(stored) == 0  # present files are left alone


def test_restore_refuses_a_path_outside_the_triton_dir(triton_dir):
    with pytest.raises(CacheError, match="escapes"):
        restore_triton({"../evil.so": b"x"})


def test_first_run_kernels_are_added_to_the_entry_and_restored_on_a_hit(tmp_path, triton_dir):
    torch.manual_seed(0)
    model = JitModel().eval()
    x = torch.randn(3, 8)
    cache_dir = tmp_path / "cache"
    torch._dynamo.reset()
    with cache.record_events() as events, torch.no_grad():
        compiled = torch.compile(model, backend="ascend", options={"cache_dir": str(cache_dir), **FX})
        cold = compiled(x)
    assert [e.status for e in events] == ["miss"]
    store = CacheStore(str(cache_dir))
    (digest,) = store.digests()
    entry, problems = store.read_entry(digest)
    assert not problems
    # the kernel appeared during the first call, after the entry was written: amended
    assert sorted(entry.triton) == [f"{_KERNEL_HASH}/__grp__k.json", f"{_KERNEL_HASH}/k.cubin"]
    assert entry.manifest["first_run_files"] == 2
    assert store.verify(digest) == []

    # a new process (new Triton dir, fresh Dynamo): the hit restores the kernel before the run
    _TRITON_DIR[:] = [str(tmp_path / "triton-new")]
    torch._dynamo.reset()
    with cache.record_events() as events, torch.no_grad():
        warm = torch.compile(model, backend="ascend", options={"cache_dir": str(cache_dir), **FX})(x)
    assert [e.status for e in events] == ["hit"]
    grp = json.loads((tmp_path / "triton-new" / _KERNEL_HASH / "__grp__k.json").read_text())
    assert grp["child_paths"]["k.cubin"] == str(tmp_path / "triton-new" / _KERNEL_HASH / "k.cubin")
    torch.testing.assert_close(warm, cold)
    (digest_after,) = store.digests()
    assert store.read_entry(digest_after)[0].manifest["build_id"] == entry.manifest["build_id"]  # a hit never rewrites


def test_first_run_files_never_overwrite_an_entry_another_build_replaced(tmp_path, triton_dir, monkeypatch):
    torch.manual_seed(0)
    model = JitModel().eval()
    cache_dir = tmp_path / "cache"
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="ascend", options={"cache_dir": str(cache_dir), **FX})
    real_amend = cache._AmendAfterFirstCall._amend

    def replaced_first(self, recorder):
        # another process rebuilt the same graph between our build and our first call
        store = CacheStore(str(cache_dir))
        with store.lock(exclusive=True):
            entry, _ = store.read_entry(self.digest)
            store.write_entry(self.digest, {**entry.manifest, "build_id": "other"}, entry.files, replace=True)
        real_amend(self, recorder)

    monkeypatch.setattr(cache._AmendAfterFirstCall, "_amend", replaced_first)
    with torch.no_grad():
        compiled(torch.randn(3, 8))
    store = CacheStore(str(cache_dir))
    (digest,) = store.digests()
    entry, _ = store.read_entry(digest)
    assert entry.manifest["build_id"] == "other" and entry.triton == {}
