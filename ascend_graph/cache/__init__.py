"""The graph cache: key -> load torch's artifacts or build them -> the same runtime.

Entry point: :func:`compile_with_cache`, called by the backend's cache hook when
``options["cache_dir"]`` is set (and, through ``torch.compile``, by ``ascend-graph
build``). For one Dynamo graph it:

1. computes the key (``key.py``: package, pass uuids, the hash of the options the
   compiled graph depends on, graph code and input shapes, torch / triton / torch_npu /
   CANN / Python versions, device). Serving options (buckets, warm-up, graphs on/off,
   output cloning, budgets) are not in it but recorded beside it; a runtime without a
   ``buckets`` option serves the buckets of the entry it loads;
2. reads and verifies the entry of that key (``store.py``; no lock, nothing written, so
   a read-only cache serves hits as well);
3. on a hit: restores the entry's compiled C++ kernels and hot-loads its torch
   artifacts into torch's local caches, then
   - inductor codegen (entries with an ``aot_cache_tag``): *loads* the compiled graph
     through AOTAutograd's cache under the entry's tag (``aot.py``). The AOT trace, our
     passes and inductor do not run; what they would have told the runtime and
     ``stats()`` comes from the manifest: the mutated inputs, the post-pass graph code
     and each pass's rewrite count (restored into ``stats()`` with 0 s of pass time,
     see ``PassManager.restore``);
   - otherwise (FX codegen, torchair, an entry without a tag, or torch declining to
     load): runs the build, which finds every FX graph and kernel already compiled,
     and compares the post-pass graph with the stored one;
4. on a miss: logs which key factor differs from the closest entry of the same graph
   (WARNING when there is one: passes, config, graph, versions, device), builds (under a
   new AOTAutograd tag for inductor codegen) while recording torch's artifacts and the
   kernels the build loaded, and writes the entry atomically under the exclusive lock
   (a read-only cache is not written: the miss is counted as ``read_only``);
5. a corrupt or truncated entry (a checksum fails) is logged, never read further, and
   replaced by the rebuild.

Invariants: a hit either loads exactly what the build that wrote the entry compiled
(its inductor FX graph and kernels, the runtime wrappers AOTAutograd saved for it) or
runs the build; it never mixes a stored graph with new metadata. The load is keyed
twice: by our key (which names the entry) and by AOTAutograd's own key of the Dynamo
graph and torch's configs, which carries our key in its tag. Without ``strict`` a
cache problem (miss, corrupt entry, lock timeout, unreadable directory) never fails a
compile: it is logged and the graph is built. With ``strict`` (``options["cache_strict"]``
once AscendConfig has that field, or the ``strict`` argument) anything but a verified
hit is a :class:`~ascend_graph.errors.CacheError` with expected and got. Device graphs
are never cached: the runtime captures them at startup (they hold device addresses).

``build`` is the backend's build step: ``build(aot_cache_tag)`` traces and compiles;
with a tag it lets AOTAutograd save to / load from its cache under that tag.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch.fx

from .. import _stats
from ..errors import CacheError
from . import aot
from .dynamic import frame_record
from .key import ENVIRONMENT_FACTORS, KEY_FACTORS, SERVING_OPTIONS, CacheKey, compute_key, environment_factors, graph_options, serving_options
from .store import (
    TORCH_ARTIFACTS,
    CacheStore,
    Entry,
    EntrySummary,
    KernelRecorder,
    TorchArtifactRecorder,
    load_torch_artifacts,
    restore_kernels,
    restore_triton,
)

__all__ = [
    "compile_with_cache",
    "CacheEvent",
    "record_events",
    "CacheStore",
    "CacheKey",
    "KEY_FACTORS",
    "ENVIRONMENT_FACTORS",
    "SERVING_OPTIONS",
    "environment_factors",
    "explain_miss",
]

log = logging.getLogger("ascend_graph.cache")

GRAPH_FILE = "graph.py"
POST_PASS_FILE = "post_pass.py"


@dataclass
class CacheEvent:
    """What happened to one graph: ``status`` is hit, miss, corrupt, mismatch or error.

    ``read_only``: a miss, corrupt entry or mismatch whose build was not stored because
    the cache is read-only (counted as ``read_only`` in ``stats()["cache"]``).

    On a hit ``detail`` says how: ``loaded`` (the compiled graph came from the entry;
    nothing was traced or compiled) or ``built`` (the build ran with the entry's
    artifacts hot-loaded).
    """

    graph_id: str
    digest: str
    status: str
    changed: tuple[str, ...] = ()
    compile_seconds: float = 0.0
    load_seconds: float = 0.0
    detail: str = ""
    #: the graph was built but not stored: the cache is read-only to this process
    read_only: bool = False


# Collectors opened by record_events(); a ContextVar so nested or concurrent builders
# each see their own events and nothing is kept on a module-level mutable list.
_collectors: contextvars.ContextVar[tuple[list[CacheEvent], ...]] = contextvars.ContextVar("ascend_graph_cache_collectors", default=())


@contextlib.contextmanager
def record_events() -> Iterator[list[CacheEvent]]:
    """Collect the :class:`CacheEvent` of every graph compiled inside the block."""
    events: list[CacheEvent] = []
    token = _collectors.set(_collectors.get() + (events,))
    try:
        yield events
    finally:
        _collectors.reset(token)


def _emit(event: CacheEvent) -> None:
    for events in _collectors.get():
        events.append(event)
    _stats.record_cache(event.status, event.changed, event.load_seconds, read_only=event.read_only)


def _short(value: str | None) -> str:
    if value is None:
        return "absent"
    return value if len(value) <= 24 else value[:16] + "..."


def explain_miss(key: CacheKey, candidates: Sequence[EntrySummary]) -> tuple[EntrySummary | None, dict[str, tuple[str | None, str | None]]]:
    """The closest entry of the same graph slot and the factors that differ from it.

    ``(None, {})`` when no readable entry has this slot (a graph never built here).
    Ties go to the newest entry.
    """
    same = [c for c in candidates if c.manifest is not None and c.slot == key.slot]
    if not same:
        return None, {}
    same.sort(key=lambda c: (len(key.diff(c.factors)), _negated_time(c)))
    best = same[0]
    return best, key.diff(best.factors)


def _negated_time(summary: EntrySummary) -> float:
    created = (summary.manifest or {}).get("created_unix", 0.0)
    return -float(created or 0.0)


def _describe_diff(diff: dict[str, tuple[str | None, str | None]]) -> str:
    return ", ".join(f"{name} (now {_short(now)}, entry {_short(then)})" for name, (now, then) in diff.items())


def compile_with_cache(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    ctx: Any,
    build: Callable[[str | None], Callable[..., Any]],
    *,
    strict: bool | None = None,
) -> Callable[..., Any]:
    """Compile one Dynamo graph through the cache at ``ctx.config.cache_dir`` (see the module docstring)."""
    if strict is None:
        strict = bool(getattr(ctx.config, "cache_strict", False))
    store = CacheStore(ctx.config.cache_dir)
    key = compute_key(gm, example_inputs, ctx)
    # which frame this graph is, and its batch inputs: a later process traces that frame
    # batch-dynamic from the start (cache/dynamic.py); not part of the key
    frame = frame_record(gm, ctx.shapes, ctx.config)
    digest = key.digest
    try:
        # Reading takes no lock and writes nothing: a read-only cache is read like any other.
        if store.is_cache():
            store.check_format()
        else:
            store.ensure()
        read_only = not store.writable()
        entry, problems = store.read_entry(digest)
        candidates = [] if entry is not None or problems else [s for s in store.summaries() if s.digest != digest]
    except (CacheError, OSError) as e:
        if strict:
            raise e if isinstance(e, CacheError) else CacheError("graph cache is unreadable", expected=f"a readable cache at {store.root}", got=str(e)) from e
        log.warning("graph cache %s is unusable (%s); compiling %s without it", store.root, e, ctx.graph_id)
        _emit(CacheEvent(ctx.graph_id, digest, "error", detail=str(e)))
        return build(None)

    if entry is not None:
        start = time.perf_counter()
        try:
            restored = restore_kernels(entry.kernels) + restore_triton(entry.triton)
            counts = load_torch_artifacts(entry.torch_artifacts) if entry.torch_artifacts else {}
        except (CacheError, OSError) as e:
            # Checksums held, yet torch cannot read it (say, a torch build with the same
            # version string): the entry is as good as corrupt.
            problems = [f"{TORCH_ARTIFACTS}: {e}"]
            entry = None
        else:
            load_seconds = time.perf_counter() - start
            _adopt_buckets(ctx, entry)
            log.info("graph cache hit for %s (%s): %d kernels restored, torch artifacts %s, in %.2f s", ctx.graph_id, digest[:12], restored, counts, load_seconds)
            tag = _load_tag(entry, ctx)
            compiled, artifacts, recorder, seconds, aot_counts = _run(build, tag)
            if ctx.post_pass_code is None:
                # AOTAutograd loaded the compiled graph: nothing was traced or compiled.
                _restore(ctx, entry)
                log.info("graph cache loaded %s (%s) without tracing or compiling in %.2f s", ctx.graph_id, digest[:12], seconds)
                _emit(CacheEvent(ctx.graph_id, digest, "hit", compile_seconds=seconds, load_seconds=load_seconds, detail="loaded"))
                return compiled
            if tag is not None:
                log.info(
                    "graph cache hit for %s (%s) was rebuilt: torch's AOTAutograd cache did not load it (%s; TORCH_LOGS=+aot says why)",
                    ctx.graph_id, digest[:12], aot_counts.describe(),
                )
            cached_code = entry.text(POST_PASS_FILE)
            if cached_code is not None and ctx.post_pass_code != cached_code:
                # The key matched but our passes produced another graph: some input of
                # the passes is missing from the key. Correctness is unaffected (we built
                # it); record it so the gap gets found, and keep the entry current. It is
                # written without a tag: until the key is fixed, its hits rebuild and
                # compare rather than load.
                log.warning("graph cache entry %s matched %s but the post-pass graph differs from the stored one; the cache key misses a factor; entry %s", digest[:12], ctx.graph_id, "kept (read-only cache)" if read_only else "rewritten")
                written = None if read_only else _save(store, key, gm, ctx, artifacts, recorder.collect(), seconds, None, frame, replace=True)
                _emit(CacheEvent(ctx.graph_id, digest, "mismatch", compile_seconds=seconds, load_seconds=load_seconds, read_only=read_only))
                return _amend_after_first_call(compiled, store, key.digest, written, recorder)
            else:
                _emit(CacheEvent(ctx.graph_id, digest, "hit", compile_seconds=seconds, load_seconds=load_seconds, detail="built"))
            return compiled

    if problems:
        detail = "; ".join(problems)
        if strict:
            raise CacheError(f"graph cache entry {digest[:12]} for {ctx.graph_id} is corrupt", expected="every checksum of the manifest to hold", got=detail, hint="run `ascend-graph verify` and rebuild")
        log.warning("graph cache entry %s for %s is corrupt (%s); not loaded, rebuilding", digest[:12], ctx.graph_id, detail)
        status, changed = "corrupt", ()
    else:
        closest, diff = explain_miss(key, candidates)
        changed = tuple(diff)
        if strict:
            if closest is None:
                raise CacheError(f"graph cache has no entry for {ctx.graph_id}", expected=f"entry {digest[:12]} in {store.root}", got=f"{len(candidates)} entries of other graphs", hint="build it with `ascend-graph build`")
            raise CacheError(
                f"graph cache entry for {ctx.graph_id} was built for another setup",
                expected={name: now for name, (now, _) in diff.items()},
                got={name: then for name, (_, then) in diff.items()},
                hint=f"entry {closest.digest[:12]}; rebuild with `ascend-graph build`",
            )
        if closest is None:
            log.info("graph cache miss for %s: no entry for this graph in %s; building it", ctx.graph_id, store.root)
            changed = ("new",)
            detail = "no entry for this graph"
        else:
            detail = _describe_diff(diff)
            log.warning("graph cache miss for %s: entry %s was built with a different %s; rebuilding", ctx.graph_id, closest.digest[:12], detail)
        status = "miss"

    compiled, artifacts, recorder, seconds, tag = _build(build, ctx, digest)
    if read_only:
        # A read-only cache (an image layer, a read-only mount) is never written, not even
        # a lock file: the graph is built and served from this process only.
        log.warning("graph cache %s is read-only: %s was compiled and is not stored", store.root, ctx.graph_id)
        written = None
    else:
        # replace: an entry whose checksums hold but that torch could not read must go too.
        written = _save(store, key, gm, ctx, artifacts, recorder.collect(), seconds, tag, frame, replace=bool(problems))
    _emit(CacheEvent(ctx.graph_id, digest, status, changed=changed, compile_seconds=seconds, detail=detail, read_only=read_only))
    return _amend_after_first_call(compiled, store, digest, written, recorder)


class _AmendAfterFirstCall:
    """The compiled graph, which adds to its entry what its first call compiled or tuned.

    Some kernel files only appear when the graph first runs: inductor benchmarks a
    pointwise kernel's configs at its first launch and writes ``.best_config``, and our
    ops JIT-compile their Triton kernels at their first call. After the first call
    returns, the files that appeared since the build started are added to the entry
    this process wrote (under the exclusive lock, only if the entry on disk is still that
    one: same ``build_id``), so the next start restores them instead of redoing the
    work. A failure to write is logged; the call's result is never affected. Later calls
    go straight to the compiled graph.
    """

    def __init__(self, compiled: Callable[..., Any], store: CacheStore, digest: str, written: tuple[dict[str, Any], dict[str, bytes]], recorder: KernelRecorder):
        self.compiled = compiled
        self.store = store
        self.digest = digest
        self.manifest, self.files = written
        self.recorder: KernelRecorder | None = recorder
        if getattr(compiled, "_boxed_call", False):
            self._boxed_call = True

    def __call__(self, *args: Any) -> Any:
        out = self.compiled(*args)
        recorder, self.recorder = self.recorder, None
        if recorder is not None:
            self._amend(recorder)
            self.files = {}
        return out

    def _amend(self, recorder: KernelRecorder) -> None:
        late = recorder.collect(known=self.files.keys())
        if not late:
            return
        try:
            with self.store.lock(exclusive=True):
                on_disk = self.store.summary(self.digest).manifest or {}
                if on_disk.get("build_id") != self.manifest["build_id"]:
                    log.info("graph cache entry %s was replaced meanwhile; %d kernel files of the first run not added", self.digest[:12], len(late))
                    return
                manifest = dict(self.manifest)
                manifest["kernels"] = sum(1 for n in (*self.files, *late) if n.startswith(("kernels/", "triton/")))
                manifest["first_run_files"] = len(late)
                self.store.write_entry(self.digest, manifest, {**self.files, **late}, replace=True)
        except (CacheError, OSError) as e:
            log.warning("could not add the first run's %d kernel files to graph cache entry %s (%s)", len(late), self.digest[:12], e)
            return
        log.info("graph cache entry %s: %d kernel files of the first run added", self.digest[:12], len(late))


def _amend_after_first_call(compiled: Callable[..., Any], store: CacheStore, digest: str, written: tuple[dict[str, Any], dict[str, bytes]] | None, recorder: KernelRecorder) -> Callable[..., Any]:
    if written is None:
        return compiled
    return _AmendAfterFirstCall(compiled, store, digest, written, recorder)


def _aot_reason(ctx: Any) -> str | None:
    """Why a build or hit of this graph cannot go through AOTAutograd's cache (None: it can)."""
    if ctx.codegen != "inductor":
        return f"codegen {ctx.codegen!r} does not produce inductor output code"
    return aot.supported()


def _load_tag(entry: Entry, ctx: Any) -> str | None:
    """The AOTAutograd tag to load ``entry`` with, or None to rebuild it (see the module docstring)."""
    m = entry.manifest
    tag = m.get("aot_cache_tag")
    if not tag:
        return None
    if any(k not in m for k in ("mutated_inputs", "pass_records")) or entry.text(POST_PASS_FILE) is None:
        return None
    reason = _aot_reason(ctx)
    if reason is not None:
        log.info("graph cache hit for %s is rebuilt, not loaded: %s", ctx.graph_id, reason)
        return None
    return str(tag)


def _adopt_buckets(ctx: Any, entry: Entry) -> None:
    """A runtime without explicit buckets serves the buckets the entry was built for.

    The bucket list is not in the key (the compiled graph does not depend on it), so an
    entry is loaded whatever buckets the runtime asks for; a runtime that asks for none
    gets the build's rather than the default list, which a build for a small model
    would not have meant.
    """
    built = entry.manifest.get("buckets")
    if ctx.config.buckets is None and built:
        ctx.config = ctx.config.replace(buckets=tuple(int(b) for b in built))
        log.info("graph cache: %s serves the entry's buckets %s (no buckets option given)", ctx.graph_id, list(ctx.config.buckets))


def _restore(ctx: Any, entry: Entry) -> None:
    """Fill ``ctx`` with what the build reported (the forward compiler did not run)."""
    m = entry.manifest
    ctx.mutated_inputs = frozenset(int(i) for i in m["mutated_inputs"])
    ctx.post_pass_code = entry.text(POST_PASS_FILE)
    records = [dict(r) for r in m["pass_records"]]
    ctx.pass_records = records
    if ctx.pass_manager is not None:
        ctx.pass_counts = ctx.pass_manager.restore(records)
    else:
        ctx.pass_counts = {}
        for r in records:
            ctx.pass_counts[r["name"]] = ctx.pass_counts.get(r["name"], 0) + int(r["rewrites"])


def _run(build: Callable[[str | None], Callable[..., Any]], tag: str | None) -> tuple[Callable[..., Any], TorchArtifactRecorder, KernelRecorder, float, aot.AOTCounters]:
    """``build(tag)``, recording torch's artifacts, the kernels it used and what AOTAutograd's cache did."""
    start = time.perf_counter()
    artifacts = TorchArtifactRecorder()
    with artifacts.record(), KernelRecorder() as kernels_recorder, aot.AOTCounters.during() as aot_counts:
        compiled = build(tag)
    seconds = time.perf_counter() - start
    return compiled, artifacts, kernels_recorder, seconds, aot_counts


def _build(build: Callable[[str | None], Callable[..., Any]], ctx: Any, digest: str) -> tuple[Callable[..., Any], TorchArtifactRecorder, KernelRecorder, float, str | None]:
    """Build under a new AOTAutograd tag (inductor codegen); returns the tag the entry loads with.

    The tag is kept only when AOTAutograd saved an entry under it and the build ran our
    forward compiler (the manifest needs what it reported); otherwise hits of this
    entry rebuild.
    """
    reason = _aot_reason(ctx)
    tag = aot.new_tag(digest) if reason is None else None
    compiled, artifacts, recorder, seconds, aot_counts = _run(build, tag)
    if tag is not None and not (aot_counts.saved and artifacts.counts.get("aot_autograd") and ctx.post_pass_code is not None):
        log.info("graph cache entry for %s will be rebuilt on a hit, not loaded: torch's AOTAutograd cache did not save it (%s)", ctx.graph_id, aot_counts.describe())
        tag = None
    elif reason is not None:
        log.debug("graph cache entry for %s will be rebuilt on a hit: %s", ctx.graph_id, reason)
    return compiled, artifacts, recorder, seconds, tag


def _save(
    store: CacheStore,
    key: CacheKey,
    gm: torch.fx.GraphModule,
    ctx: Any,
    artifacts: TorchArtifactRecorder,
    kernels: dict[str, bytes],
    build_seconds: float,
    aot_cache_tag: str | None,
    frame: dict[str, Any] | None,
    *,
    replace: bool = False,
) -> tuple[dict[str, Any], dict[str, bytes]] | None:
    """Write the entry; returns its manifest and files, or None when it was not written.

    ``kernels``: entry file name -> bytes, from :meth:`KernelRecorder.collect`;
    ``frame``: the graph's frame record (:func:`~ascend_graph.cache.dynamic.frame_record`).
    """
    files: dict[str, bytes] = {GRAPH_FILE: gm.code.encode()}
    if ctx.post_pass_code is not None:
        files[POST_PASS_FILE] = ctx.post_pass_code.encode()
    if artifacts.data is not None:
        files[TORCH_ARTIFACTS] = artifacts.data
    files.update(kernels)
    now = time.time()
    manifest = {
        "factors": dict(key.factors),
        "slot": key.slot,
        "graph_id": ctx.graph_id,
        "codegen": ctx.codegen,
        "buckets": list(ctx.config.buckets) if ctx.config.buckets else None,
        "shapes": ctx.shapes.describe(),
        "passes": list(ctx.pass_manager.names) if ctx.pass_manager is not None else [],
        "config": ctx.config.describe(),
        # the options the key hashes, and those recorded beside it (see key.SERVING_OPTIONS)
        "graph_options": graph_options(ctx.config, ctx.codegen),
        "serving_options": serving_options(ctx.config, ctx.codegen),
        "created": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(timespec="seconds"),
        "created_unix": now,
        "timings": {"build_seconds": round(build_seconds, 3)},
        "torch_artifacts": artifacts.counts,
        "kernels": len(kernels),
        "mutated_inputs": sorted(ctx.mutated_inputs),
        "pass_records": list(getattr(ctx, "pass_records", [])),
        # names this build's entry: a first-run amendment only ever extends its own entry
        "build_id": uuid.uuid4().hex,
    }
    if aot_cache_tag is not None:
        manifest["aot_cache_tag"] = aot_cache_tag
    if frame is not None:
        manifest["frame"] = frame
    start = time.perf_counter()
    try:
        with store.lock(exclusive=True):
            if not store.write_entry(key.digest, manifest, files, replace=replace):
                return None
    except (CacheError, OSError) as e:
        log.warning("could not write graph cache entry %s for %s (%s); the compiled graph is used anyway", key.digest[:12], ctx.graph_id, e)
        return None
    log.info("graph cache entry %s written for %s (%d files, %.2f s)", key.digest[:12], ctx.graph_id, len(files), time.perf_counter() - start)
    return manifest, files
