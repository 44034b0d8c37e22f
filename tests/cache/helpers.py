"""Shared pieces of the cache tests: a tiny model, a factory module, fake entries."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import textwrap

import torch

from ascend_graph.cache.store import MANIFEST, CacheStore, _manifest_checksum

#: Options of every in-process cache test: the FX graph as is (seconds, not minutes, on
#: 2 cores) and no fusion families, so the key does not move while others edit passes.
FX = {"codegen": "fx", "fusions": []}


class MLP(torch.nn.Module):
    def __init__(self, act: str = "relu"):
        super().__init__()
        self.up = torch.nn.Linear(8, 24)
        self.down = torch.nn.Linear(24, 8)
        self.act = act

    def forward(self, x):
        h = self.up(x)
        h = torch.relu(h) if self.act == "relu" else torch.nn.functional.gelu(h)
        return self.down(h) * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def compile_and_run(model, cache_dir, batch=3, **options):
    """A fresh Dynamo compile of ``model`` with the cache, run once; returns the output."""
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="ascend", options={"cache_dir": str(cache_dir), **FX, **options})
    x = torch.randn(batch, 8, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        return compiled(x), model(x)


FACTORY_SOURCE = textwrap.dedent(
    '''
    import os
    import time
    import torch

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up = torch.nn.Linear(8, 24)
            self.down = torch.nn.Linear(24, 8)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))

    def make():
        torch.manual_seed(0)
        return MLP().eval(), (torch.randn(3, 8),)

    def make_kwargs():
        torch.manual_seed(0)
        return MLP().eval(), {"x": torch.randn(3, 8)}

    def slow():
        # Holds the build lock for a while so a second builder has to wait.
        time.sleep(float(os.environ.get("AG_TEST_SLEEP", "0")))
        return make()

    def boom():
        raise RuntimeError("factory failed on purpose")

    def not_a_pair():
        return 3

    class Raises(torch.nn.Module):
        def forward(self, x):
            raise ValueError("model failed on purpose")

    def raising_model():
        return Raises(), (torch.randn(2, 8),)
    '''
)


def write_factory(directory) -> str:
    path = os.path.join(str(directory), "agfactory.py")
    with open(path, "w") as f:
        f.write(FACTORY_SOURCE)
    return str(directory)


def fake_entry(root, digest="ab" * 16, factors=None, files=None) -> CacheStore:
    """Write an entry without compiling anything (for store and CLI tests)."""
    import torch as _torch

    from ascend_graph.cache import environment_factors

    store = CacheStore(str(root))
    store.ensure()
    base = {"passes": "p", "config": "c:fx", "graph": "g"}
    base.update(environment_factors(_torch.device("cpu")))
    base.update(factors or {})
    manifest = {"factors": base, "slot": "s", "graph_id": "g000", "codegen": "fx", "buckets": [1, 2], "shapes": {"batch_symbol": "s0", "inputs": [{"name": "x", "dims": ["s0", "8"]}]}, "timings": {"build_seconds": 1.0}, "created_unix": 0.0}
    with store.lock(exclusive=True):
        store.write_entry(digest, manifest, files or {"graph.py": b"def forward(x): return x\n", "post_pass.py": b"# post\n"})
    return store


def rewrite_manifest(store: CacheStore, digest: str, **changes) -> None:
    """Change manifest fields and re-seal its checksum (an entry from another machine)."""
    path = os.path.join(store.entry_dir(digest), MANIFEST)
    with open(path) as f:
        manifest = json.load(f)
    for k, v in changes.items():
        if isinstance(v, dict) and isinstance(manifest.get(k), dict):
            manifest[k].update(v)
        else:
            manifest[k] = v
    manifest["manifest_sha256"] = _manifest_checksum(manifest)
    with open(path, "w") as f:
        json.dump(manifest, f)


def flip_byte(path: str, offset: int = -5) -> None:
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        data[offset] ^= 0x01
        f.seek(0)
        f.write(bytes(data))


def truncate(path: str) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


@contextlib.contextmanager
def read_only_view(src, mountpoint):
    """``src`` seen read-only at ``mountpoint``, really: writes fail even for root.

    Root ignores file modes, so a chmod proves nothing when the tests run as root: the
    view is a read-only bind mount (``mount --bind`` + ``remount,ro,bind``), as a
    read-only volume or image layer would be. Not root: file modes are enough, so the
    view is a copy without write permission.
    """
    os.makedirs(str(mountpoint), exist_ok=True)
    if os.geteuid() != 0:
        shutil.copytree(str(src), str(mountpoint), dirs_exist_ok=True)
        for parent, dirs, files in os.walk(str(mountpoint)):
            for name in dirs + files:
                os.chmod(os.path.join(parent, name), 0o555)
        os.chmod(str(mountpoint), 0o555)
        yield str(mountpoint)
        return
    subprocess.run(["mount", "--bind", str(src), str(mountpoint)], check=True, capture_output=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(mountpoint)], check=True, capture_output=True)
        probe = os.path.join(str(mountpoint), ".write-probe")
        try:
            open(probe, "w").close()
        except OSError:
            pass
        else:  # pragma: no cover - the mount did not become read-only
            os.remove(probe)
            raise AssertionError(f"{mountpoint} is writable after remount,ro")
        yield str(mountpoint)
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False, capture_output=True)


def tree(root) -> dict[str, int]:
    """Every file under ``root`` with its size (to show that nothing was written)."""
    out = {}
    for parent, _, files in os.walk(str(root)):
        for name in files:
            path = os.path.join(parent, name)
            out[os.path.relpath(path, str(root))] = os.path.getsize(path)
    return out
