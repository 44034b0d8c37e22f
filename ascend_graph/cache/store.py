"""On-disk graph cache: layout, locking, atomic writes, checksums, torch artifacts.

Entry point: :class:`CacheStore` (used by :func:`ascend_graph.cache.compile_with_cache`
and by the ``ascend-graph`` CLI). Layout of a cache directory::

    DIR/ascend-graph-cache.json     marker + format version (``clear`` refuses a dir without it)
    DIR/.lock                       flock: exclusive to write/remove an entry (reading takes none)
    DIR/.build.lock                 flock: held by ``ascend-graph build`` for its whole run
    DIR/entries/<digest>/           one entry per compiled Dynamo graph
        manifest.json               key factors, slot, buckets, shapes, timings, file checksums;
                                    for a hit that loads: aot_cache_tag, mutated_inputs, pass_records
        graph.py                    the Dynamo graph's code (what the "graph" factor hashes)
        post_pass.py                the ATen graph after our passes (restored by a hit that
                                    loads; compared with the new one by a hit that rebuilds)
        torch_artifacts.bin         torch.compiler.save_cache_artifacts() of this graph's build:
                                    inductor's FX-graph entry and, for inductor codegen, the
                                    AOTAutograd entry a hit loads (cache/aot.py)
        kernels/<xx>/<key>*.so      inductor's compiled C++ kernels (see below)
        kernels/<xx>/<key>.best_config  inductor's autotuning result of a Triton kernel
        triton/<hash>/<file>        Triton's cache files the build and the first run made:
                                    cubins and their metadata, compiled launchers
    DIR/builds/<name>.json          one record per ``ascend-graph build`` (buckets, timings)
    DIR/.tmp-*                      an entry being written (renamed into entries/ when complete)

Invariants:

- An entry directory appears complete or not at all: it is written into ``.tmp-*`` in
  the same parent, fsynced, then ``os.rename``d, under the exclusive lock.
- Every file of an entry has its sha256 and size in the manifest, and the manifest
  carries a checksum of itself; an entry whose checks fail is never read further (its
  torch artifacts are never deserialized) and is replaced by the rebuild.
- Two processes never write one cache at once (``fcntl.flock``; no dependency).
  Reading takes no lock, so a read-only cache (a container image layer, a read-only
  mount) is read like any other: an entry appears and is replaced by renames, and a
  reader that meets an entry mid-replacement sees a checksum fail and reads it again
  once (:meth:`CacheStore.read_entry`). :meth:`CacheStore.writable` says whether this
  process may write; callers that may not never try (no lock file is created).
- A manifest is only used when every field a reader touches has its type (a manifest
  re-sealed with ``factors`` or ``files`` of another type is corrupt, not a crash).

Why kernels are stored: torch's mega-cache (``save_cache_artifacts``) bundles Triton
kernels into inductor's FX-graph entries, but not the C++ kernels of the CPU backend.
On a warm start with an empty ``TORCHINDUCTOR_CACHE_DIR`` the FX-graph cache hits and
then every C++ kernel is compiled again, which is most of a CPU compile. Inductor skips
that compile when ``<cache_dir>/<key[1:3]>/<key>.so`` exists (``CppCodeCache.load_async``),
so the entry keeps those files and restores them before the build. The keys are hashes of
source and compiler command line, so a restored file is only ever used by the kernel it
was built from. This relies on inductor's cache layout: ``tests/cache`` checks it on the
installed torch (a warm start must compile no C++).

On CUDA the same gap has three parts, measured on an H100 (BENCHMARKS.md, warm start):
kernels that inductor does not launch statically are compiled by Triton again (its cache
is keyed by source and options, but a fresh ``TRITON_CACHE_DIR`` is empty), their
launchers are compiled again with the host C compiler, and pointwise kernels with several
configs are benchmarked again because their autotuning result (``.best_config``, written
at the first *run*, after the compile) is not among the artifacts. So the entry also keeps
the files that appear in Triton's cache dir and inductor's ``.best_config`` files; those
of the first run are added to the entry after that run (``compile_with_cache``). Triton's
group files name their members by absolute path; the stored copy has the directory
replaced by a placeholder, which a restore replaces by the directory of the process.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Iterator, Mapping

from ..errors import CacheError

__all__ = [
    "CacheStore",
    "Entry",
    "EntrySummary",
    "FORMAT_VERSION",
    "MARKER",
    "TorchArtifactRecorder",
    "load_torch_artifacts",
    "KernelRecorder",
    "restore_kernels",
]

log = logging.getLogger("ascend_graph.cache")

FORMAT_VERSION = 1
MARKER = "ascend-graph-cache.json"
ENTRIES = "entries"
BUILDS = "builds"
LOCK = ".lock"
BUILD_LOCK = ".build.lock"
MANIFEST = "manifest.json"
TORCH_ARTIFACTS = "torch_artifacts.bin"
KERNELS = "kernels"
TRITON = "triton"

#: How often a waiting process retries a held lock (flock has no timeout of its own).
_LOCK_POLL_SECONDS = 0.05

#: How long a reader waits before reading an entry that failed its checks again (a
#: replacement by a concurrent writer is two renames).
_REREAD_SECONDS = 0.2


# -- small helpers --------------------------------------------------------------------


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _manifest_checksum(manifest: Mapping[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return sha256_bytes(json.dumps(body, sort_keys=True).encode())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory."""
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{os.path.basename(path)}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def dir_size(path: str) -> int:
    total = 0
    for parent, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(parent, name))
    return total


# -- manifest schema ------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _str_map(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items())


def _safe_name(name: Any) -> bool:
    """A relative path inside the entry directory (``a/b``), never absolute or with ``..``."""
    if not isinstance(name, str) or not name or name.startswith("/") or "\\" in name:
        return False
    return all(p not in ("", ".", "..") for p in name.split("/"))


def _files(v: Any) -> bool:
    return isinstance(v, dict) and all(
        _safe_name(k) and isinstance(m, dict) and isinstance(m.get("sha256"), str) and _is_int(m.get("bytes")) for k, m in v.items()
    )


def _shapes(v: Any) -> bool:
    if not isinstance(v, dict) or not isinstance(v.get("inputs", []), list):
        return False
    return all(
        isinstance(i, dict) and isinstance(i.get("name"), str) and isinstance(i.get("dims"), list) and all(isinstance(d, str) for d in i["dims"])
        for i in v.get("inputs", [])
    )


def _brief(v: Any) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


#: Every manifest field a reader (the cache, ``inspect``, ``verify``) touches: its check and
#: what it should be. Fields not here are informational; a field here that is absent is
#: fine (older entries) unless it is in ``_REQUIRED_FIELDS``.
_MANIFEST_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "key": (lambda v: isinstance(v, str), "a string"),
    "factors": (_str_map, "an object of string values"),
    "files": (_files, "an object of relative file names -> {sha256: string, bytes: int}"),
    "slot": (lambda v: isinstance(v, str), "a string"),
    "graph_id": (lambda v: isinstance(v, str), "a string"),
    "codegen": (lambda v: isinstance(v, str), "a string"),
    "buckets": (lambda v: v is None or (isinstance(v, list) and all(_is_int(b) and b > 0 for b in v)), "null or a list of positive ints"),
    "shapes": (_shapes, "an object with inputs [{name, dims: [string]}]"),
    "timings": (lambda v: isinstance(v, dict), "an object"),
    "torch_artifacts": (lambda v: isinstance(v, dict), "an object"),
    "config": (lambda v: isinstance(v, dict), "an object"),
    "graph_options": (lambda v: isinstance(v, dict), "an object"),
    "serving_options": (lambda v: isinstance(v, dict), "an object"),
    "created": (lambda v: isinstance(v, str), "a string"),
    "created_unix": (_is_number, "a number"),
    "kernels": (_is_int, "an int"),
    "first_run_files": (_is_int, "an int"),
    "mutated_inputs": (lambda v: isinstance(v, list) and all(_is_int(i) for i in v), "a list of ints"),
    "pass_records": (lambda v: isinstance(v, list) and all(isinstance(r, dict) and isinstance(r.get("name"), str) and _is_int(r.get("rewrites")) for r in v), "a list of {name, rewrites, ...}"),
    "aot_cache_tag": (lambda v: isinstance(v, str), "a string"),
    "build_id": (lambda v: isinstance(v, str), "a string"),
    "frame": (lambda v: isinstance(v, dict) and isinstance(v.get("code"), dict) and isinstance(v.get("sources"), dict), "an object {code, batch_dim, sources}"),
}
_REQUIRED_FIELDS = ("key", "factors", "files")


# -- locking --------------------------------------------------------------------------


class FileLock:
    """An ``fcntl.flock`` lock on one file, shared or exclusive, with a timeout.

    flock locks belong to an open file description, so each acquisition opens the file
    anew; a second acquisition in the same process therefore waits like any other
    process would (callers never nest the same lock). The holder's pid is written into
    the file so a waiting process can say whom it waits for.
    """

    def __init__(self, path: str, *, exclusive: bool, timeout: float | None, what: str):
        self.path = path
        self.exclusive = exclusive
        self.timeout = timeout
        self.what = what
        self._fd: int | None = None

    def _holder(self) -> str:
        with contextlib.suppress(OSError, ValueError):
            with open(self.path, encoding="utf-8") as f:
                text = f.read().strip()
            if text:
                return f"pid {int(text)}"
        return "another process"

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        mode = fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH
        start = time.monotonic()
        announced = False
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    os.close(fd)
                    raise
            waited = time.monotonic() - start
            if not announced:
                log.warning("waiting for the %s held by %s (%s)", self.what, self._holder(), self.path)
                announced = True
            if self.timeout is not None and waited >= self.timeout:
                os.close(fd)
                raise CacheError(
                    f"timed out waiting for the {self.what}",
                    expected=f"the lock free within {self.timeout:g} s",
                    got=f"held by {self._holder()} ({self.path})",
                    hint="another build or compile is writing this cache; wait for it or raise the timeout",
                )
            time.sleep(_LOCK_POLL_SECONDS)
        if self.exclusive:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if self.exclusive:
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


# -- entries --------------------------------------------------------------------------


@dataclass
class EntrySummary:
    """What ``inspect`` and a miss explanation need: the manifest, or why it is unreadable."""

    digest: str
    path: str
    manifest: dict[str, Any] | None
    problem: str | None = None

    @property
    def factors(self) -> dict[str, str]:
        return dict((self.manifest or {}).get("factors", {}))

    @property
    def slot(self) -> str | None:
        return (self.manifest or {}).get("slot")


@dataclass
class Entry:
    """A verified entry, read into memory."""

    digest: str
    manifest: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict)

    def text(self, name: str) -> str | None:
        data = self.files.get(name)
        return data.decode("utf-8") if data is not None else None

    @property
    def torch_artifacts(self) -> bytes | None:
        return self.files.get(TORCH_ARTIFACTS)

    @property
    def kernels(self) -> dict[str, bytes]:
        """Inductor cache-dir files (C++ binaries, autotuning results), by path inside that dir."""
        return self._under(KERNELS)

    @property
    def triton(self) -> dict[str, bytes]:
        """Triton cache-dir files, by path inside that dir (group files with the placeholder)."""
        return self._under(TRITON)

    def _under(self, top: str) -> dict[str, bytes]:
        prefix = top + "/"
        return {name[len(prefix):]: data for name, data in self.files.items() if name.startswith(prefix)}


class CacheStore:
    """One cache directory (see the module docstring for its layout)."""

    def __init__(self, root: str, *, lock_timeout: float | None = 300.0):
        self.root = os.path.abspath(os.path.expanduser(root))
        self.lock_timeout = lock_timeout

    # -- directory ------------------------------------------------------------------

    @property
    def entries_dir(self) -> str:
        return os.path.join(self.root, ENTRIES)

    @property
    def builds_dir(self) -> str:
        return os.path.join(self.root, BUILDS)

    def entry_dir(self, digest: str) -> str:
        return os.path.join(self.entries_dir, digest)

    def writable(self) -> bool:
        """Whether this process may write the cache (False on a read-only mount or without permission).

        ``os.access`` reports a read-only file system even to root, who otherwise ignores
        file modes.
        """
        target = self.entries_dir if os.path.isdir(self.entries_dir) else self.root
        return os.access(target, os.W_OK | os.X_OK)

    def is_cache(self) -> bool:
        return os.path.isfile(os.path.join(self.root, MARKER))

    def ensure(self) -> None:
        """Create the directory and its marker; refuse a directory of another format."""
        os.makedirs(self.entries_dir, exist_ok=True)
        marker = os.path.join(self.root, MARKER)
        if os.path.exists(marker):
            self.check_format()
            return
        write_file_atomic(marker, json.dumps({"tool": "ascend-graph", "format": FORMAT_VERSION}, indent=1).encode())

    def check_format(self) -> None:
        marker = os.path.join(self.root, MARKER)
        try:
            with open(marker, encoding="utf-8") as f:
                fmt = json.load(f).get("format")
        except (OSError, ValueError, AttributeError) as e:
            raise CacheError("cache marker is unreadable", expected=f"a JSON file {MARKER}", got=f"{marker}: {e}") from None
        if fmt != FORMAT_VERSION:
            raise CacheError("cache directory has another format", expected=f"format {FORMAT_VERSION}", got=f"format {fmt} in {marker}", hint="clear it or use another --cache-dir")

    # -- locks ----------------------------------------------------------------------

    def lock(self, *, exclusive: bool, timeout: float | None = -1.0) -> FileLock:
        t = self.lock_timeout if timeout == -1.0 else timeout
        return FileLock(os.path.join(self.root, LOCK), exclusive=exclusive, timeout=t, what="cache lock")

    def build_lock(self, timeout: float | None = None) -> FileLock:
        return FileLock(os.path.join(self.root, BUILD_LOCK), exclusive=True, timeout=timeout, what="build lock")

    # -- reading --------------------------------------------------------------------

    def digests(self) -> list[str]:
        try:
            names = os.listdir(self.entries_dir)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if not n.startswith("."))

    def summary(self, digest: str) -> EntrySummary:
        path = self.entry_dir(digest)
        try:
            manifest = self._read_manifest(path)
        except CacheError as e:
            return EntrySummary(digest, path, None, problem=e.what + (f" ({e.got})" if e.got else ""))
        return EntrySummary(digest, path, manifest)

    def summaries(self) -> list[EntrySummary]:
        return [self.summary(d) for d in self.digests()]

    def _read_manifest(self, path: str) -> dict[str, Any]:
        file = os.path.join(path, MANIFEST)
        try:
            with open(file, "rb") as f:
                manifest = json.loads(f.read().decode("utf-8"))
        except FileNotFoundError:
            raise CacheError("entry has no manifest", expected=MANIFEST, got="missing") from None
        except (OSError, ValueError) as e:
            raise CacheError("entry manifest is unreadable", expected="valid JSON", got=str(e)[:120]) from None
        if not isinstance(manifest, dict):
            raise CacheError("entry manifest is unreadable", expected="a JSON object", got=type(manifest).__name__)
        want = manifest.get("manifest_sha256")
        if want != _manifest_checksum(manifest):
            raise CacheError("entry manifest checksum mismatch", expected=want, got=_manifest_checksum(manifest))
        if manifest.get("format") != FORMAT_VERSION:
            raise CacheError("entry has another format", expected=FORMAT_VERSION, got=manifest.get("format"))
        for name, (check, expected) in _MANIFEST_FIELDS.items():
            if (name in manifest or name in _REQUIRED_FIELDS) and not check(manifest.get(name)):
                raise CacheError(f"entry manifest field {name!r} is malformed", expected=expected, got=_brief(manifest.get(name)))
        return manifest

    def verify(self, digest: str) -> list[str]:
        """Problems of one entry (empty when every checksum holds); takes no lock (see :meth:`read_entry`)."""
        problems: list[str] = []
        for attempt in range(2):
            problems = []
            self._check(digest, problems, keep=None)
            if not problems:
                return []
            if attempt == 0:
                time.sleep(_REREAD_SECONDS)
        return problems

    def _check(self, digest: str, problems: list[str], keep: dict[str, bytes] | None) -> dict[str, Any] | None:
        path = self.entry_dir(digest)
        try:
            manifest = self._read_manifest(path)
        except CacheError as e:
            problems.append(str(e))
            return None
        if manifest.get("key") != digest:
            problems.append(f"manifest key {manifest.get('key')!r} does not match the entry directory {digest!r}")
        for name, meta in sorted(manifest.get("files", {}).items()):
            file = os.path.join(path, name)
            try:
                with open(file, "rb") as f:
                    data = f.read()
            except OSError as e:
                problems.append(f"{name}: unreadable ({e.strerror or e})")
                continue
            if len(data) != meta.get("bytes"):
                problems.append(f"{name}: size {len(data)} bytes, manifest says {meta.get('bytes')} (truncated?)")
            elif sha256_bytes(data) != meta.get("sha256"):
                problems.append(f"{name}: sha256 mismatch (corrupt)")
            elif keep is not None:
                keep[name] = data
        return manifest

    def read_entry(self, digest: str) -> tuple[Entry | None, list[str]]:
        """The verified entry, or ``(None, problems)``; takes no lock.

        A writer replaces an entry by two renames, so a reader can meet the old manifest
        with the new files (or none): a check that fails is therefore repeated once,
        after the time a replacement takes, before the entry is called corrupt.
        """
        problems: list[str] = []
        for attempt in range(2):
            if not os.path.isdir(self.entry_dir(digest)):
                return None, []
            problems = []
            files: dict[str, bytes] = {}
            manifest = self._check(digest, problems, keep=files)
            if not problems and manifest is not None:
                return Entry(digest, manifest, files), []
            if attempt == 0:
                time.sleep(_REREAD_SECONDS)
        return None, problems

    # -- writing --------------------------------------------------------------------

    def write_entry(self, digest: str, manifest: dict[str, Any], files: Mapping[str, bytes], *, replace: bool = False) -> bool:
        """Write one entry atomically; the caller holds the exclusive lock. Returns whether it wrote.

        An existing valid entry of the same digest is kept (another process built the
        same graph first; both builds are equivalent) unless ``replace``. An invalid one
        is always replaced.
        """
        final = self.entry_dir(digest)
        if not replace and os.path.isdir(final) and not self.verify(digest):
            log.info("cache entry %s was written meanwhile by another process; kept", digest[:12])
            return False
        os.makedirs(self.entries_dir, exist_ok=True)
        tmp = os.path.join(self.entries_dir, f".tmp-{digest[:12]}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.makedirs(tmp)
        try:
            # JSON-native values only, so the checksum of what is read back equals this one.
            manifest = json.loads(json.dumps(dict(manifest), default=str))
            manifest["format"] = FORMAT_VERSION
            manifest["key"] = digest
            manifest["files"] = {}
            for name, data in sorted(files.items()):
                file = os.path.join(tmp, name)
                os.makedirs(os.path.dirname(file), exist_ok=True)
                with open(file, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                manifest["files"][name] = {"sha256": sha256_bytes(data), "bytes": len(data)}
            manifest["manifest_sha256"] = _manifest_checksum(manifest)
            with open(os.path.join(tmp, MANIFEST), "wb") as f:
                f.write(json.dumps(manifest, indent=1, sort_keys=True).encode())
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            if os.path.isdir(final):
                self._remove(final)
            os.rename(tmp, final)
            _fsync_dir(self.entries_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return True

    def _remove(self, path: str) -> None:
        # Rename first so that the entry disappears at once even if rmtree is interrupted.
        trash = os.path.join(os.path.dirname(path), f".tmp-trash-{os.path.basename(path)[:12]}-{uuid.uuid4().hex[:8]}")
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def remove_entry(self, digest: str) -> None:
        """Remove one entry; the caller holds the exclusive lock."""
        path = self.entry_dir(digest)
        if os.path.isdir(path):
            self._remove(path)

    def leftovers(self) -> list[str]:
        """Temporary directories of writers that died (only meaningful under a lock)."""
        try:
            return sorted(os.path.join(self.entries_dir, n) for n in os.listdir(self.entries_dir) if n.startswith(".tmp-"))
        except FileNotFoundError:
            return []

    def write_build_record(self, name: str, record: Mapping[str, Any]) -> str:
        path = os.path.join(self.builds_dir, f"{name}.json")
        write_file_atomic(path, json.dumps(record, indent=1, sort_keys=True, default=str).encode())
        return path

    def build_records(self) -> list[dict[str, Any]]:
        out = []
        try:
            names = sorted(os.listdir(self.builds_dir))
        except FileNotFoundError:
            return []
        for name in names:
            if not name.endswith(".json") or name.startswith("."):
                continue
            try:
                with open(os.path.join(self.builds_dir, name), encoding="utf-8") as f:
                    record = json.load(f)
            except (OSError, ValueError) as e:
                record = {"problem": f"unreadable: {e}"}
            if not isinstance(record, dict):
                record = {"problem": f"malformed: a JSON {type(record).__name__}, not an object"}
            elif not (isinstance(record.get("per_bucket", []), list) and all(isinstance(r, dict) and _is_int(r.get("bucket")) and _is_number(r.get("seconds")) for r in record.get("per_bucket", []))):
                record = {"problem": "malformed: per_bucket is not a list of {bucket, seconds}"}
            record["_file"] = name
            out.append(record)
        return out

    def clear(self, digests: list[str] | None = None) -> int:
        """Remove the given entries (all of them, the build records and leftovers when None).

        The caller holds the exclusive lock. Returns the number of entries removed.
        """
        targets = self.digests() if digests is None else digests
        for digest in targets:
            self.remove_entry(digest)
        if digests is None:
            for path in self.leftovers():
                shutil.rmtree(path, ignore_errors=True)
            shutil.rmtree(self.builds_dir, ignore_errors=True)
        return len(targets)


# -- torch's compile artifacts --------------------------------------------------------


class TorchArtifactRecorder:
    """Collects the torch compile artifacts (``torch.compiler.save_cache_artifacts``) of one build.

    ``save_cache_artifacts`` returns everything recorded in the process so far, so an
    entry would carry every earlier graph's artifacts too. The build therefore runs
    inside ``CacheArtifactManager.with_fresh_cache()`` (torch/compiler/_cache.py), and
    what it recorded is handed back to the outer recorder afterwards, so a user's own
    ``save_cache_artifacts()`` still sees our compiles. This is the one place the cache
    touches that internal class.
    """

    def __init__(self) -> None:
        self.data: bytes | None = None
        self.counts: dict[str, int] = {}

    @contextlib.contextmanager
    def record(self) -> Iterator["TorchArtifactRecorder"]:
        from torch.compiler._cache import CacheArtifactManager

        with CacheArtifactManager.with_fresh_cache():
            yield self
            recorded = [a for artifacts in CacheArtifactManager._new_cache_artifacts.values() for a in artifacts]
            result = CacheArtifactManager.serialize()
        if result is not None:
            self.data, info = result
            self.counts = {kind: len(keys) for kind, keys in info.artifacts.items()}
        for artifact in recorded:
            if artifact not in CacheArtifactManager._seen_artifacts:
                CacheArtifactManager._new_cache_artifacts[artifact.type()].append(artifact)
                CacheArtifactManager._seen_artifacts.add(artifact)


def load_torch_artifacts(data: bytes) -> dict[str, int]:
    """Hot-load artifacts into torch's local caches; returns counts per artifact kind."""
    import torch

    info = torch.compiler.load_cache_artifacts(data)
    if info is None:
        raise CacheError("torch could not deserialize the cache artifacts", expected="artifacts written by this torch", got=f"{len(data)} bytes")
    return {kind: len(keys) for kind, keys in info.artifacts.items()}


# -- inductor's compiled C++ kernels --------------------------------------------------


def _code_caches() -> list[Any]:
    from torch._inductor import codecache

    names = ("CppCodeCache", "CppPythonBindingsCodeCache", "CppWrapperCodeCache")
    return [getattr(codecache, n) for n in names if hasattr(codecache, n)]


def _inductor_cache_dir() -> str:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return cache_dir()


def triton_cache_dir() -> str | None:
    """Triton's cache directory in this process (``TRITON_CACHE_DIR``), None without Triton."""
    try:
        from triton import knobs
    except ImportError:
        return None
    return str(knobs.cache.dir)


#: Stands for Triton's cache directory inside a stored group file (see the module docstring).
TRITON_DIR_PLACEHOLDER = b"<ascend-graph:triton-cache-dir>"
_TRITON_GROUP_PREFIX = "__grp__"


def _is_triton_group(rel: str) -> bool:
    return rel.rsplit("/", 1)[-1].startswith(_TRITON_GROUP_PREFIX)


class KernelRecorder:
    """Finds the compiled kernels a build (and its first run) used, and reads them.

    Inductor's cache dir: C++ binaries that appear during the build (this includes the
    little programs inductor compiles once per process to probe the CPU's vector ISA,
    which no code cache lists), the keys new to the in-process code caches (a kernel
    whose binary was already on disk from an earlier process is used, not created), and
    autotuning results (``.best_config``). Triton's cache dir: every file that appears.
    What was on disk before the recorder started and is not a new code-cache key stays
    out: a kernel shared with an earlier graph of this process stays with that graph's
    entry. ``collect`` can be called again later (after the first run) for the files
    that appeared meanwhile.
    """

    _BINARY_SUFFIXES = (".so", ".o", ".best_config")

    def __init__(self) -> None:
        self.keys_before: set[str] = set()
        self.files_before: set[str] = set()
        self.triton_root: str | None = None
        self.triton_before: set[str] = set()

    @classmethod
    def _binaries(cls, root: str) -> set[str]:
        out: set[str] = set()
        try:
            subdirs = [e for e in os.scandir(root) if e.is_dir() and len(e.name) == 2]
        except FileNotFoundError:
            return out
        for sub in subdirs:
            with contextlib.suppress(OSError):
                out.update(f"{sub.name}/{e.name}" for e in os.scandir(sub.path) if e.name.endswith(cls._BINARY_SUFFIXES))
        return out

    @staticmethod
    def _triton_files(root: str | None) -> set[str]:
        """``<hash>/<file>`` of Triton's finished cache files (not its temporaries or locks)."""
        out: set[str] = set()
        if root is None:
            return out
        try:
            subdirs = [e for e in os.scandir(root) if e.is_dir() and not e.name.startswith((".", "tmp"))]
        except FileNotFoundError:
            return out
        for sub in subdirs:
            with contextlib.suppress(OSError):
                out.update(
                    f"{sub.name}/{e.name}" for e in os.scandir(sub.path)
                    if e.is_file() and not e.name.startswith(("tmp.", ".")) and e.name != "lock"
                )
        return out

    def __enter__(self) -> "KernelRecorder":
        self.keys_before = {k for c in _code_caches() for k in c.cache}
        self.files_before = self._binaries(_inductor_cache_dir())
        self.triton_root = triton_cache_dir()
        self.triton_before = self._triton_files(self.triton_root)
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def collect(self, known: Collection[str] = frozenset()) -> dict[str, bytes]:
        """``{entry file name: bytes}`` of what the build used: ``kernels/<rel>`` and ``triton/<rel>``.

        Names in ``known`` (an entry's files already) are not read again.
        """
        root = _inductor_cache_dir()
        files = self._binaries(root)
        wanted = files - self.files_before
        new_keys = {k for c in _code_caches() for k in c.cache} - self.keys_before
        wanted |= {rel for rel in files if rel.split("/", 1)[1].split(".", 1)[0] in new_keys}
        # Every entry keeps the vector-ISA probes: a process that loads only this entry
        # would otherwise compile them again (about ten C++ builds), whichever graph of
        # the build process happened to compile them first.
        wanted |= _isa_probes(root, files)
        out: dict[str, bytes] = {}
        for rel in sorted(wanted):
            if f"{KERNELS}/{rel}" in known:
                continue
            with contextlib.suppress(OSError):
                with open(os.path.join(root, rel), "rb") as f:
                    out[f"{KERNELS}/{rel}"] = f.read()
        if self.triton_root is not None:
            for rel in sorted(self._triton_files(self.triton_root) - self.triton_before):
                if f"{TRITON}/{rel}" in known:
                    continue
                with contextlib.suppress(OSError):
                    with open(os.path.join(self.triton_root, rel), "rb") as f:
                        data = f.read()
                    if _is_triton_group(rel):
                        data = data.replace(os.path.abspath(self.triton_root).encode(), TRITON_DIR_PLACEHOLDER)
                    out[f"{TRITON}/{rel}"] = data
        return out


def _isa_probe_sources() -> frozenset[str]:
    """The C++ programs inductor compiles to probe the CPU's vector ISA (``VecISA.*_code``)."""
    try:
        from torch._inductor import cpu_vec_isa
    except ImportError:  # pragma: no cover
        return frozenset()
    out: set[str] = set()
    for cls in vars(cpu_vec_isa).values():
        if isinstance(cls, type):
            out.update(v for k, v in vars(cls).items() if k.endswith("_code") and isinstance(v, str))
    return frozenset(out)


def _isa_probes(root: str, binaries: Collection[str]) -> set[str]:
    """The ``<xx>/<key>.so`` among ``binaries`` that are vector-ISA probes (their ``<key>.cpp`` is a probe program)."""
    sources = _isa_probe_sources()
    out: set[str] = set()
    for rel in binaries:
        if not rel.endswith(".so"):
            continue
        source = os.path.join(root, rel[: -len(".so")] + ".cpp")
        with contextlib.suppress(OSError, UnicodeDecodeError):
            with open(source, encoding="utf-8") as f:
                if f.read() in sources:
                    out.add(rel)
    return out


def _restore_into(root: str, files: Mapping[str, bytes], what: str, expected: str, fix: Callable[[str, bytes], bytes] | None = None) -> int:
    """Write ``files`` (``<subdir>/<name>`` -> bytes) under ``root``; returns how many were written.

    A path with any other shape is refused (it could escape ``root``); files already present
    are left alone (both caches key their files by content hashes).
    """
    written = 0
    for rel, data in files.items():
        parts = rel.split("/")
        if len(parts) != 2 or any(p in ("", ".", "..") for p in parts):
            raise CacheError(f"{what} path in a cache entry escapes the {what} directory", expected=expected, got=rel)
        path = os.path.join(root, *parts)
        if os.path.exists(path):
            continue
        write_file_atomic(path, fix(rel, data) if fix is not None else data)
        os.chmod(path, 0o755)
        written += 1
    return written


def restore_kernels(kernels: Mapping[str, bytes]) -> int:
    """Put stored kernel binaries where inductor looks for them; returns how many were written.

    Files already present are left alone (same key, same source and command line).
    """
    return _restore_into(_inductor_cache_dir(), kernels, "kernel", "<xx>/<key>.so")


def restore_triton(files: Mapping[str, bytes]) -> int:
    """Put stored Triton cache files into this process's Triton cache dir; returns how many were written.

    Group files get this directory in place of the placeholder. Files already present are
    left alone (Triton's keys hash source, options and target). Without Triton nothing is
    written.
    """
    if not files:
        return 0
    root = triton_cache_dir()
    if root is None:
        log.info("%d Triton cache files in the entry are not restored: Triton is not installed", len(files))
        return 0
    here = os.path.abspath(root).encode()

    def fix(rel: str, data: bytes) -> bytes:
        return data.replace(TRITON_DIR_PLACEHOLDER, here) if _is_triton_group(rel) else data

    return _restore_into(root, files, "Triton cache", "<hash>/<file>", fix)
