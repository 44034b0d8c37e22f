"""A frame's first graph is batch-dynamic, so a warm start meets a built entry whatever its first batch.

Entry points: :func:`seed_from_cache`, installed by the backend at import: a frame the
cache holds a batch-dynamic entry of (its manifest's ``frame`` record, from
:func:`frame_record`) is traced batch-dynamic the first time; and
:func:`restart_batch_dynamic`, called by the backend (``ascend_backend``) for a graph
Dynamo hands over directly, when ``cache_dir`` is set: a static first graph of a frame
with no record is traced again batch-dynamic. This is the one
module that touches Dynamo's automatic-dynamic state (``torch._dynamo.pgo``) and its
restart signal; ``tests/cache/test_first_graph_dynamic.py`` checks both on the installed
torch.

Why: Dynamo traces a frame's first call with static shapes, so a process whose first
call has batch 3 compiles a graph specialised to 3, which no cache entry holds (a
build meets batch 1, then the batch-dynamic graph). Two ways out were weighed:

- let a static graph of any size load the batch-dynamic entry: the compiled graph of
  the dynamic entry is keyed (ours and AOTAutograd's key) by the *dynamic* Dynamo graph,
  which a static trace does not have (its sizes are baked into views and constants),
  so the static graph would have to be re-traced into the dynamic one, which only
  Dynamo can do;
- make the first graph batch-dynamic (chosen): then a build and a server trace the
  same graph. Dynamo has one mechanism that turns a static dim dynamic without a user
  mark, automatic dynamic: the frame's state records each input's sizes, and a call
  whose size differs marks that dim dynamic for the next trace. The backend, given a
  static first graph with a batch of 2 or more, records in that state what a second
  call of another batch size would, and asks Dynamo to trace the frame again (its
  restart signal). The re-trace is the graph Dynamo would have traced at the second
  call, so a build (batch 1, then 2) and a server starting at batch 3 or at the
  largest bucket meet the same batch-dynamic graph and so the same entry.

Invariants:

- Batch 1 keeps its static graph: Dynamo specialises sizes 0 and 1 even in a dynamic
  dim, so a restart would trace the same graph again. ``ascend-graph build`` compiles
  bucket 1 as that static graph, so a first call of batch 1 hits it.
- At most one restart per frame: once the state holds the batch dim as dynamic, a
  static graph (the model specialised the batch, say by branching on it) is compiled
  as it is.
- Only the batch dims change: the same inputs that ``ascend-graph build`` resizes
  (tensors whose batch dim equals the batch input's), never parameters or buffers.
- Dynamo's "excluded sizes" (a guard that sends the old static size to the old static
  graph) are cleared: that static graph is never installed here.
- Without the internals this needs (another torch), nothing is restarted and the
  static graph is compiled as before (logged once); correctness never depends on it.
"""

from __future__ import annotations

import collections
import functools
import inspect
import logging
import os
from typing import Any, Callable, Sequence

import torch
import torch.fx

from ..capture.host_floats import tracing_tx

__all__ = ["restart_batch_dynamic", "supported", "frame_record", "seed_from_cache"]

log = logging.getLogger("ascend_graph.cache")


def _internals() -> tuple[Any, Any, Any] | None:
    """(pgo module, current-tx getter, restart exception class), or None on a torch without them."""
    try:
        from torch._dynamo import exc, pgo
        from torch._dynamo.symbolic_convert import InstructionTranslator
    except ImportError:  # pragma: no cover - torch without PGO state
        return None
    restart = getattr(exc, "TensorifyScalarRestartAnalysis", None)
    needed = ("get_code_state", "CodeId", "FrameStateSizeEntry", "auto_dynamic")
    if restart is None or not all(hasattr(pgo, n) for n in needed) or not hasattr(InstructionTranslator, "current_tx"):
        return None
    return pgo, InstructionTranslator.current_tx, restart


def supported() -> str | None:
    """None when a static first graph can be re-traced batch-dynamic here, else why not."""
    if _internals() is None:
        return "this torch lacks Dynamo's automatic-dynamic state or its restart signal"
    return None


def _source_name(node: torch.fx.Node) -> str | None:
    source = getattr(node.meta.get("grapharg"), "source", None)
    if source is None:
        return None
    name = getattr(source, "name", None)
    # a property on torch >= 2.12, a method before
    return str(name() if callable(name) else name)


def _code_id(pgo: Any, tx: Any) -> Any:
    make = pgo.CodeId.make
    if "closure" in inspect.signature(make).parameters:
        return make(tx.f_code, getattr(tx, "closure", None))
    return make(tx.f_code)


def restart_batch_dynamic(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], shapes: Any, config: Any) -> None:
    """Raise Dynamo's restart for a static graph whose batch could be dynamic; return otherwise.

    ``shapes``: the graph's :class:`~ascend_graph.capture.shapes.ShapeInfo`; ``config``:
    its :class:`~ascend_graph.config.AscendConfig` (``batch_input``, ``batch_dim``). Returns
    (nothing to do) for a batch-dynamic graph, a batch of 0 or 1, a graph without a
    tensor input, automatic dynamic off (``torch.compile(dynamic=False)``), a frame whose
    batch dim is already dynamic in Dynamo's state, or a torch without the internals.
    """
    if shapes.batch_symbol is not None or not torch._dynamo.config.automatic_dynamic_shapes:
        return
    internals = _internals()
    if internals is None:
        log.info("first graph stays static: %s", supported())
        return
    pgo, current_tx, restart = internals
    tx = tracing_tx(current_tx)
    if tx is None:
        return
    batch_dim = config.batch_dim
    tensors = [v for v in shapes.inputs if v.kind == "tensor" and len(v.dims) > batch_dim]
    if config.batch_input is not None:
        # the configured batch input decides the batch size (same rule as capture/shapes.py)
        chosen = [v for v in tensors if config.batch_input in (v.name, v.index)]
        tensors = chosen + [v for v in tensors if v not in chosen] if chosen else []
    if not tensors:
        return
    batch = int(tensors[0].dims[batch_dim])
    if batch < 2:
        return
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    state = pgo.get_code_state()[_code_id(pgo, tx)].automatic_dynamic
    widened: list[str] = []
    for v in tensors:
        if int(v.dims[batch_dim]) != batch or v.index >= len(placeholders):
            continue
        name = _source_name(placeholders[v.index])
        value = example_inputs[v.index] if v.index < len(example_inputs) else None
        if name is None or name not in state or not isinstance(value, torch.Tensor):
            continue
        entry = state[name]
        if entry.is_size_dynamic(batch_dim):
            return  # restarted before and Dynamo specialised anyway: keep this graph
        if not isinstance(entry.size, tuple) or len(entry.size) <= batch_dim or not isinstance(entry.stride, tuple):
            continue
        # What Dynamo records for a call of another batch size with the same layout: its
        # stride record (InferStride terms) does not change with the size of a dim.
        size = list(entry.size)
        size[batch_dim] = batch + 1
        entry |= pgo.FrameStateSizeEntry.make_tensor(tuple(size), tuple(entry.stride))
        if hasattr(entry, "excluded_sizes"):
            entry.excluded_sizes = None
        widened.append(name)
    if not widened:
        return
    # The re-trace may take another path (a branch on the batch size now guards instead
    # of folding): it must not replay the first trace's speculation log.
    speculation = getattr(tx, "speculation_log", None)
    if speculation is not None and hasattr(speculation, "clear"):
        speculation.clear()
    log.info("graph of batch %d re-traced with a dynamic batch dim (%s), as a second call would be: one graph for every batch, the one `ascend-graph build` caches", batch, ", ".join(widened))
    raise restart(restart_reason="ascend-graph: the first graph is batch-dynamic (graph cache)")


# -- the first trace already batch-dynamic: no static trace to throw away ---------------
#
# The restart above costs a whole Dynamo trace (about a quarter of a warm start from the
# cache on a 2-core CPU: the static trace is thrown away). A batch-dynamic entry records
# its frame (``frame_record``: Dynamo's code id of the traced frame and the sources of its
# batch inputs); a later process seeds Dynamo's automatic-dynamic state of that frame
# with those batch dims before the frame's first input is wrapped (``seed_from_cache``),
# which is what a PGO profile of an earlier run does. The first trace is then the
# batch-dynamic graph itself. Where the state cannot be seeded (no record, another torch),
# the restart still does it.


def _closure_fields(closure: Any) -> list[str | None]:
    """The functions a frame closes over, as names and lines (Dynamo's ``CodeId`` keeps
    only ``hash()`` of them, which differs from one process to the next)."""
    out: list[str | None] = []
    for cell in closure or ():
        try:
            content = cell.cell_contents
        except ValueError:  # an empty cell
            out.append(None)
            continue
        code = getattr(content, "__code__", None) if callable(content) else None
        out.append(None if code is None else f"{code.co_name}:{code.co_firstlineno}:{os.path.basename(code.co_filename)}")
    return out


def _frame_fields(code_id: Any, tx: Any) -> dict[str, Any]:
    """What identifies the frame ``tx`` traces across processes: ``code_id``, Dynamo's
    ``CodeId`` of it (the file's hash where it has one, torch >= 2.12, else the path), and
    its closure."""
    fields: dict[str, Any] = {"name": str(code_id.name), "firstlineno": int(code_id.firstlineno)}
    file_hash = getattr(code_id, "file_hash", None)
    if file_hash is not None:
        fields["file_hash"] = str(file_hash)
    else:
        fields["filename"] = str(code_id.filename)
    fields["closure"] = _closure_fields(getattr(tx, "closure", None))
    return fields


def frame_record(gm: torch.fx.GraphModule, shapes: Any, config: Any) -> dict[str, Any] | None:
    """For a batch-dynamic graph Dynamo is compiling now: its frame and batch inputs,
    ``{"code": {...}, "batch_dim": d, "sources": {source name: rank}}``; None otherwise
    (a static graph, no frame being traced, a torch without the internals)."""
    if shapes.batch_symbol is None:
        return None
    internals = _internals()
    if internals is None:
        return None
    pgo, current_tx, _ = internals
    tx = tracing_tx(current_tx)
    if tx is None:
        return None
    batch_dim = config.batch_dim
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    sources: dict[str, int] = {}
    for v in shapes.inputs:
        if v.kind != "tensor" or len(v.dims) <= batch_dim or v.dims[batch_dim] != shapes.batch_symbol or v.index >= len(placeholders):
            continue
        name = _source_name(placeholders[v.index])
        if name is not None:
            sources[name] = len(v.dims)
    if not sources:
        return None
    try:
        code = _frame_fields(_code_id(pgo, tx), tx)
    except Exception:  # noqa: BLE001 - a CodeId of another shape: no record, the restart serves
        return None
    return {"code": code, "batch_dim": int(batch_dim), "sources": sources}


def _records_for(cache_dir: str, code: dict[str, Any]) -> list[dict[str, Any]]:
    from .store import CacheStore

    out = []
    store = CacheStore(cache_dir)
    try:
        summaries = store.summaries() if store.is_cache() else []
    except Exception:  # noqa: BLE001 - an unreadable cache is the cache's to report, at compile
        return []
    for s in summaries:
        record = (s.manifest or {}).get("frame")
        if isinstance(record, dict) and record.get("code") == code and isinstance(record.get("sources"), dict):
            out.append(record)
    return out


def _seed(state: Any, code: dict[str, Any], cache_dir: str, pgo: Any) -> list[str]:
    """Mark the recorded batch dims of the frame ``code``'s inputs dynamic in its fresh ``state``."""
    seeded = []
    for record in _records_for(cache_dir, code):
        batch_dim = record.get("batch_dim")
        for name, rank in record["sources"].items():
            if not isinstance(name, str) or not isinstance(rank, int) or not isinstance(batch_dim, int) or not 0 <= batch_dim < rank:
                continue
            if name in state.automatic_dynamic:
                continue
            # the batch dim dynamic, every other size and stride what the call brings
            size = tuple(pgo.auto_dynamic if d == batch_dim else pgo.auto_unset for d in range(rank))
            state.automatic_dynamic[name] = pgo.FrameStateSizeEntry(size=size)
            seeded.append(name)
    return seeded


_seeding: tuple[Any, Any, Callable[[Any], str | None]] | None = None  # (pgo, current_tx, cache_dir_for)


class _SeedingCodeState(collections.defaultdict):  # type: ignore[type-arg]
    """Dynamo's code-state map (CodeId -> CodeState) that seeds a frame's state when
    Dynamo first asks for it; pickles and copies as the plain ``defaultdict`` it holds
    (Dynamo writes the map to its PGO cache)."""

    def __missing__(self, code_id: Any) -> Any:
        state = super().__missing__(code_id)
        if _seeding is None:
            return state
        pgo, current_tx, cache_dir_for = _seeding
        tx = tracing_tx(current_tx)
        if tx is None:  # no trace running: Dynamo reads the map after a trace too
            return state
        try:
            cache_dir = cache_dir_for(tx.output.compiler_fn)
            # the state asked for is the frame being traced (the only one whose inputs Dynamo wraps)
            if cache_dir and torch._dynamo.config.automatic_dynamic_shapes and _code_id(pgo, tx) == code_id:
                seeded = _seed(state, _frame_fields(code_id, tx), cache_dir, pgo)
                if seeded:
                    log.info("first trace of %s is batch-dynamic (%s), as the cache's entry for this frame was built", code_id, ", ".join(seeded))
        except Exception as e:  # noqa: BLE001 - never break a trace: the restart still serves
            log.debug("could not seed the dynamic state of %s from the cache: %s", code_id, e)
        return state

    def __reduce__(self) -> Any:
        return (collections.defaultdict, (self.default_factory,), None, None, iter(self.items()))


def seed_from_cache(cache_dir_for: Callable[[Any], str | None]) -> bool:
    """Install the seeding (once per process); returns whether this torch allows it.

    ``cache_dir_for(compiler_fn)``: the ``cache_dir`` of an ``ascend`` compile whose
    first graphs should be batch-dynamic, for the backend Dynamo is tracing for, else
    None (another backend, no cache, a host such as vLLM that keeps its own shapes).
    Dynamo creates a frame's automatic-dynamic state when it first wraps one of the
    frame's inputs; the map installed here seeds it then from the cache's records.
    """
    global _seeding
    internals = _internals()
    if internals is None or not all(hasattr(internals[0], n) for n in ("auto_unset", "CodeState", "get_code_state", "_CODE_STATE")):
        return False
    pgo, current_tx, _ = internals
    installed = _seeding is not None
    _seeding = (pgo, current_tx, cache_dir_for)
    if installed:
        return True
    original = pgo.get_code_state

    @functools.wraps(original)
    def get_code_state() -> Any:
        state = original()
        if type(state) is collections.defaultdict and pgo._CODE_STATE is state:
            state = pgo._CODE_STATE = _SeedingCodeState(state.default_factory, state)
        return state

    pgo.get_code_state = get_code_state
    return True
