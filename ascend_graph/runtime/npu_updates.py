"""Host-side kernel arguments inside captured ACL graphs: task groups, patched at replay.

Why: FIA (``npu_fused_infer_attention_score_v2``) in TND layout takes the per-request
query and KV lengths as *host* int arrays (``SymInt[]? actual_seq_qlen`` /
``actual_seq_kvlen``). An ACL graph records a kernel launch with the arrays it was
launched with, so a replay would attend over the capture-time lengths. torch_npu's
answer (its own ``_GraphDispatchMode`` in ``torch_npu/npu/graphs.py``, and vllm-ascend's
``full_graph_fia`` / ``update_graph_params``) is a *task group*: at capture the call is
issued as the ``.out`` overload between ``graph_task_group_begin(stream)`` and
``handle = graph_task_group_end(stream)``; before a replay the same call is re-issued
with the new lengths between ``graph_task_update_begin(update_stream, handle)`` and
``graph_task_update_end(update_stream)``.

How the pieces meet:

- :class:`~ascend_graph.runtime.graphs.NpuGraph` opens a :class:`TaskCapture` around
  its capture (:func:`active_capture` is the capture context; it is set only there,
  never by the user). The capture snapshots the runner's integer static buffers to the
  host *before* capture begins, since a device-to-host read inside a capture is not
  allowed, and those snapshots are the capture-time lengths.
- A binding (``ops/kernels/npu/attention.py``) that finds a capture active calls
  :meth:`TaskCapture.task_group` with the call to issue, the device tensors it reads and
  writes, and its *length sources*: device views into the runner's static buffers
  (``query_start_loc[1:]``, ``seq_lens``). A length tensor computed inside the graph is
  refused with :class:`~ascend_graph.errors.CaptureError`: its replay-time value exists
  only once the graph has run up to that kernel, too late to patch it.
- :func:`patch_tasks`, called by ``NpuGraph.replay`` before ``graph.replay()``, reads
  every length source with **one device-to-host read per replay** (the static metadata
  buffers, which the runner has just loaded with the new batch; vllm-ascend reads its
  host lists at the same point), then on the update stream (after it waits for the
  replay stream, so a still-running previous replay is never patched under it) patches
  every task, records an event, and makes the replay stream wait on it.
- Paged attention's tasks (``"paged_attention"``) get FIA's padding rule applied on the
  host to the lengths patched in (and to the capture-time ones):
  :func:`~ascend_graph.runtime.padding.fia_pad_lengths`, the planner's rule, at the
  query's token count recorded at capture (static per graph). So metadata padded the
  vLLM way (``query_start_loc`` tail repeating its last value, ``seq_lens`` 0) still gives
  FIA ``T == cu[-1]`` and a KV length per request; the runner's planned metadata comes
  through unchanged. This is why ``passes/padding.py`` leaves the attention's metadata
  alone on an NPU: computed in the graph, it could not be patched at all.

The update stream is one per device and process, shared by every graph (the main model
and an MTP drafter must not use separate update streams: vllm-ascend #13600).

Not verified on an NPU (none exists on this project's machines): the calls, names and
keywords are held to the torch-npu 2.13.0 wheel by ``tests/ops/test_npu_contract.py``,
and the protocol is tested on the CPU with a recording fake of torch_npu.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from ..errors import CaptureError
from . import padding as planner

__all__ = [
    "GraphTask",
    "TaskCapture",
    "active_capture",
    "patch_tasks",
    "update_stream",
    "GRAPH_API",
    "NPU_METHODS",
]

log = logging.getLogger("ascend_graph.runtime.npu_updates")

#: ``torch_npu.npu`` functions the task-group path needs (torch-npu 2.13.0 exports each
#: in ``torch_npu/npu/__init__.py``; checked by the contract test).
GRAPH_API = (
    "graph_task_group_begin",
    "graph_task_group_end",
    "graph_task_update_begin",
    "graph_task_update_end",
    "current_stream",
    "stream",
    "Stream",
    "Event",
)

#: Methods called on torch_npu objects (not visible to an AST scan of ``torch_npu.X``
#: calls): the contract test checks each against the wheel's class, and the CPU tests'
#: fake torch_npu implements exactly these.
NPU_METHODS = {
    "Stream": ("wait_stream", "wait_event"),
    "Event": ("record",),
    "NPUGraph": ("replay", "capture_begin", "capture_end", "pool"),
}

_INT_DTYPES = (torch.int32, torch.int64)

_active: contextvars.ContextVar[Optional["TaskCapture"]] = contextvars.ContextVar("ascend_graph_npu_capture", default=None)


def active_capture() -> Optional["TaskCapture"]:
    """The capture in progress in this context, or None (eager calls, CPU, CUDA)."""
    return _active.get()


@dataclass
class GraphTask:
    """One kernel launch recorded in a task group, re-issued with new lengths at replay.

    ``issue(*tensors, *host_lengths)`` makes the call; ``lengths`` are the device views
    whose current values are the host arrays of the next replay; ``rule``, when set, maps
    those host arrays to the ones issued (FIA's padding rule for paged attention).
    ``sources`` (set by :meth:`TaskCapture.finish`) index ``lengths`` into the graph's
    distinct length views, so a replay reads each shared view once without re-deriving
    which views are shared.
    """

    name: str
    handle: Any
    issue: Callable[..., Any]
    tensors: tuple[Optional[torch.Tensor], ...]
    lengths: tuple[torch.Tensor, ...]
    rule: Optional[Callable[..., list[list[int]]]] = None
    sources: tuple[int, ...] = ()


def _fia_lengths(num_tokens: int, qlen: list[int], kvlen: list[int]) -> list[list[int]]:
    return list(planner.fia_pad_lengths(qlen, kvlen, num_tokens))


@functools.lru_cache(maxsize=None)
def _fia_rule(num_tokens: int) -> Callable[..., list[list[int]]]:
    """FIA's rule on a paged attention task's ``(actual_seq_qlen, actual_seq_kvlen)`` at
    the ``num_tokens`` query tokens the graph was captured with; one object per token
    count, so :func:`apply_rules` runs it once for every layer sharing the metadata."""
    return functools.partial(_fia_lengths, num_tokens)


#: task name -> the host rule of its lengths, made from the task's tensors at capture
#: (paged attention: ``tensors[0]`` is the query, its dim 0 the graph's token count)
_HOST_RULES: dict[str, Callable[[Sequence[Optional[torch.Tensor]]], Callable[..., list[list[int]]]]] = {
    "paged_attention": lambda tensors: _fia_rule(int(tensors[0].shape[0])),
}


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class TaskCapture:
    """Per-graph capture state; :func:`active_capture` returns it while a capture runs.

    ``static_inputs`` are the runner's buffers whose values change between replays; the
    int32/int64 ones are copied to the host here (before the capture begins), once per
    storage, so bindings can read capture-time lengths without a sync inside the capture.
    """

    def __init__(self, torch_npu: Any, device: Any, static_inputs: Sequence[Any] = ()) -> None:
        self.torch_npu = torch_npu
        self.device = device
        self.tasks: list[GraphTask] = []
        self._host: dict[int, torch.UntypedStorage] = {}
        for t in static_inputs:
            if isinstance(t, torch.Tensor) and t.dtype in _INT_DTYPES and t.numel() > 0:
                key = _storage_key(t)
                if key not in self._host:
                    self._host[key] = t.untyped_storage().cpu()
        self._workspace: Optional[torch.Tensor] = None
        self._checked: set[tuple[str, ...]] = set()

    @contextlib.contextmanager
    def active(self) -> Iterator["TaskCapture"]:
        token = _active.set(self)
        try:
            yield self
        finally:
            _active.reset(token)

    # -- used by bindings during the capture ----------------------------------------

    def require(self, ops: Sequence[str] = ()) -> None:
        """Raise :class:`CaptureError` unless torch_npu has the task-group API and ``ops``
        (dotted names under ``torch_npu``, e.g. ``"npu_fused_infer_attention_score_v2.out"``).

        The runner catches it like any capture failure: the bucket is dropped (counted in
        ``stats()["capture_failures"]``) and served without a graph.
        """
        key = tuple(ops)
        if key in self._checked:
            return
        missing = [f"torch_npu.npu.{n}" for n in GRAPH_API if not hasattr(self.torch_npu.npu, n)]
        for dotted in ops:
            obj: Any = self.torch_npu
            for part in dotted.split("."):
                obj = getattr(obj, part, None)
                if obj is None:
                    missing.append(f"torch_npu.{dotted}")
                    break
        if missing:
            raise CaptureError(
                f"torch_npu lacks {missing}, which a kernel with host-side lengths needs inside a captured graph",
                expected=[f"torch_npu.npu.{n}" for n in GRAPH_API] + [f"torch_npu.{o}" for o in ops],
                got=f"missing {missing} (torch_npu {getattr(self.torch_npu, '__version__', 'unknown')})",
                hint="use torch-npu 2.13.0 or newer, or set graphs=False; the runner serves this bucket without a graph",
            )
        self._checked.add(key)

    def host_values(self, t: torch.Tensor) -> list[int]:
        """``t``'s capture-time values, from the snapshot taken before the capture began."""
        host = self._host.get(_storage_key(t)) if isinstance(t, torch.Tensor) else None
        if host is None:
            raise CaptureError(
                "a host-length argument of a captured kernel is not one of the runner's static input buffers",
                expected="a view of an int32/int64 graph input (query_start_loc, seq_lens) that the runner reloads before each replay",
                got=f"tensor shape={tuple(t.shape)} dtype={t.dtype} computed inside the graph" if isinstance(t, torch.Tensor) else repr(t),
                hint="pass the metadata input to the attention op directly (no arithmetic or dtype cast in the graph); "
                "the runner serves this bucket without a graph",
            )
        view = torch.empty(0, dtype=t.dtype).set_(host, t.storage_offset(), t.size(), t.stride())
        return [int(x) for x in view.tolist()]

    def shared_workspace(self, workspace: torch.Tensor) -> torch.Tensor:
        """One workspace for every task of this graph, the largest asked for: the tasks run
        one after another on the graph's stream (vllm-ascend keeps the max over layers)."""
        cur = self._workspace
        if cur is not None and cur.numel() * cur.element_size() >= workspace.numel() * workspace.element_size():
            return cur
        self._workspace = workspace
        return workspace

    def task_group(self, name: str, issue: Callable[..., Any], tensors: Sequence[Optional[torch.Tensor]], lengths: Sequence[torch.Tensor]) -> Any:
        """Issue ``issue(*tensors, *capture-time lengths)`` as one task group and register it.

        A task with a host rule (``_HOST_RULES``: paged attention's FIA padding) is issued
        with the rule applied, here and at every replay."""
        host = [self.host_values(t) for t in lengths]
        make_rule = _HOST_RULES.get(name)
        rule = make_rule(tensors) if make_rule is not None else None
        if rule is not None:
            host = rule(*host)
        stream = self.torch_npu.npu.current_stream()
        self.torch_npu.npu.graph_task_group_begin(stream)
        try:
            result = issue(*tensors, *host)
        finally:
            handle = self.torch_npu.npu.graph_task_group_end(stream)
        self.tasks.append(GraphTask(name=name, handle=handle, issue=issue, tensors=tuple(tensors), lengths=tuple(lengths), rule=rule))
        return result

    def finish(self) -> tuple[list[GraphTask], tuple[torch.Tensor, ...]]:
        """After the capture: the tasks, with their device tensors held weakly, and the
        graph's distinct length views (every task's ``sources`` index into them).

        The graph owns the tasks' memory (its pool); a strong reference per task would keep
        every layer's output and workspace out of the shared pool for every bucket (the
        reason torch_npu and vllm-ascend weak-reference them). Length views stay strong:
        they are the runner's buffers, read at every replay. Views shared by several tasks
        (every layer reads the same ``query_start_loc``) are listed once.
        """
        weak = self.torch_npu._C._weak_ref_tensor
        order: dict[tuple, int] = {}
        views: list[torch.Tensor] = []
        for task in self.tasks:
            task.tensors = tuple(None if t is None else weak(t) for t in task.tensors)
            index = []
            for t in task.lengths:
                key = (_storage_key(t), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
                if key not in order:
                    order[key] = len(views)
                    views.append(t)
                index.append(order[key])
            task.sources = tuple(index)
        self._workspace = None
        return self.tasks, tuple(views)


# --------------------------------------------------------------------------- replay

_streams_lock = threading.Lock()
_update_streams: "weakref.WeakKeyDictionary[Any, dict[str, Any]]" = weakref.WeakKeyDictionary()


def update_stream(torch_npu: Any, device: Any) -> Any:
    """The process-wide update stream of ``device`` (one per device, shared by all graphs)."""
    with _streams_lock:
        per_device = _update_streams.setdefault(torch_npu, {})
        stream = per_device.get(str(device))
        if stream is None:
            stream = per_device[str(device)] = torch_npu.npu.Stream(device=device)
        return stream


def read_lengths(views: Sequence[torch.Tensor]) -> list[list[int]]:
    """The graph's distinct length views as host lists, with one device-to-host read."""
    if not views:
        return []
    flat = torch.cat([v.reshape(-1).to(torch.int64) for v in views]).tolist()  # the one D2H read
    values, at = [], 0
    for v in views:
        values.append(flat[at : at + v.numel()])
        at += v.numel()
    return values


def apply_rules(tasks: Sequence[GraphTask], values: Sequence[list[int]]) -> list[list[list[int]]]:
    """Each task's host lengths, its host rule applied; the rule runs once per distinct
    (sources, rule), since every layer of a model reads the same metadata."""
    done: dict[tuple, list[list[int]]] = {}
    out = []
    for task in tasks:
        lengths = [values[i] for i in task.sources]
        if task.rule is None:
            out.append(lengths)
            continue
        key = (task.sources, id(task.rule))
        if key not in done:
            done[key] = task.rule(*lengths)
        out.append(done[key])
    return out


def patch_tasks(torch_npu: Any, device: Any, tasks: Sequence[GraphTask], views: Sequence[torch.Tensor], done: Any) -> None:
    """Re-issue every task with the lengths its sources hold now; order the replay after it.

    Call right before ``graph.replay()`` on the replay stream. ``views`` are the graph's
    distinct length views (:meth:`TaskCapture.finish`); ``done`` is an
    ``torch_npu.npu.Event`` owned by the graph.
    """
    if not tasks:
        return
    host = apply_rules(tasks, read_lengths(views))  # the one host read, then FIA's rule on the host
    replay_stream = torch_npu.npu.current_stream()
    upd = update_stream(torch_npu, device)
    # never patch a task while an earlier replay of the graph may still be running it
    upd.wait_stream(replay_stream)
    with torch_npu.npu.stream(upd):
        for task, lengths in zip(tasks, host):
            torch_npu.npu.graph_task_update_begin(upd, task.handle)
            task.issue(*task.tensors, *lengths)
            torch_npu.npu.graph_task_update_end(upd)
    done.record(upd)
    replay_stream.wait_event(done)
