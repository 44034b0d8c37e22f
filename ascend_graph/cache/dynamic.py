"""A frame's first graph is batch-dynamic, so a warm start meets a built entry whatever its first batch.

Entry point: :func:`restart_batch_dynamic`, called by the backend (``ascend_backend``)
for a graph Dynamo hands over directly, when ``cache_dir`` is set. This is the one
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

import inspect
import logging
from typing import Any, Sequence

import torch
import torch.fx

__all__ = ["restart_batch_dynamic", "supported"]

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
    tx = current_tx()
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

