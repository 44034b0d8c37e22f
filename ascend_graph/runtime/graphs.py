"""Device graphs behind one interface: CUDA graphs, NPU (ACL) graphs, and none (CPU).

Entry point: :func:`new_graph`. A :class:`DeviceGraph` captures a zero-argument
function once (its inputs are static buffers the caller owns) and replays it; both
return the function's outputs. On CUDA/NPU the outputs are the static tensors the
graph writes into on every replay; with :class:`NoGraph` (CPU, or graphs turned off)
replay simply runs the function again, so the bucketing and padding semantics around
it are identical everywhere and are tested on the CPU.

Capture is done with gc frozen and the allocator's cache-emptying held off
(:func:`capture_guard`): a collection or an ``empty_cache`` in the middle of a capture
can free memory a graph still points at (vLLM and SGLang do the same).

The NPU graph is written against torch_npu's real API (``torch.npu.NPUGraph``,
``torch.npu.graph(graph, pool=...)``, ``torch.npu.graph_pool_handle()``), imported only
when an NPU graph is made. Kernels whose arguments are host arrays (FIA's sequence
lengths) are captured as task groups and patched before every replay
(``runtime/npu_updates.py``); ``capture(..., static_inputs=...)`` names the buffers whose
values those arrays are read from. It has not run on an NPU: none exists on this
project's machines.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Any, Callable, Iterator, Sequence

import torch

from . import npu_updates

__all__ = [
    "DeviceGraph",
    "CudaGraph",
    "NpuGraph",
    "NoGraph",
    "new_graph",
    "graph_pool_handle",
    "supports_graphs",
    "pool_reserved_bytes",
    "capture_guard",
    "synchronize",
]


class DeviceGraph:
    """Capture ``fn`` once, replay it many times.

    ``static_inputs``: the caller's buffers that ``fn`` reads and that the caller reloads
    before every replay (the runner's copied inputs). Only the NPU graph uses them.
    """

    kind = "none"

    def capture(self, fn: Callable[[], Any], pool: Any = None, static_inputs: Sequence[Any] = ()) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def replay(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


class NoGraph(DeviceGraph):
    """No device graph: ``replay`` runs the function again (CPU, or graphs turned off)."""

    kind = "none"

    def __init__(self) -> None:
        self._fn: Callable[[], Any] | None = None

    def capture(self, fn: Callable[[], Any], pool: Any = None, static_inputs: Sequence[Any] = ()) -> Any:
        self._fn = fn
        return fn()

    def replay(self) -> Any:
        assert self._fn is not None, "replay() before capture()"
        return self._fn()


class CudaGraph(DeviceGraph):
    kind = "cuda"

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.graph = torch.cuda.CUDAGraph()
        self.outputs: Any = None

    def capture(self, fn: Callable[[], Any], pool: Any = None, static_inputs: Sequence[Any] = ()) -> Any:
        # A side stream, as torch.cuda.graph does by default; "thread_local" so a
        # helper thread's CUDA calls elsewhere do not invalidate this capture.
        with torch.cuda.device(self.device):
            with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
                self.outputs = fn()
        return self.outputs

    def replay(self) -> Any:
        self.graph.replay()
        return self.outputs


class NpuGraph(DeviceGraph):
    """ACL graph through torch_npu (``torch.npu.NPUGraph``); mirrors CudaGraph.

    A capture runs inside a :class:`~ascend_graph.runtime.npu_updates.TaskCapture`:
    bindings whose kernels take host arrays register task groups with it, and
    :meth:`replay` patches those tasks with the values the ``static_inputs`` hold now
    (one device-to-host read per replay) before replaying. A graph without such
    kernels replays with no extra work.

    ``torch_npu`` is the module to use (tests pass a recording stand-in); by default
    the installed one.
    """

    kind = "npu"

    def __init__(self, device: torch.device, torch_npu: Any = None) -> None:
        if torch_npu is None:
            import torch_npu  # registers torch.npu

        self.torch_npu = torch_npu
        self.device = device
        self.graph = torch_npu.npu.NPUGraph()
        self.outputs: Any = None
        self.tasks: list[npu_updates.GraphTask] = []
        self._length_views: tuple[torch.Tensor, ...] = ()
        self._done: Any = None  # the event the replay stream waits on after patching

    def capture(self, fn: Callable[[], Any], pool: Any = None, static_inputs: Sequence[Any] = ()) -> Any:
        recorder = npu_updates.TaskCapture(self.torch_npu, self.device, static_inputs)  # host snapshot: before capture
        with self.torch_npu.npu.graph(self.graph, pool=pool):
            with recorder.active():
                self.outputs = fn()
        self.tasks, self._length_views = recorder.finish()
        if self.tasks:
            self._done = self.torch_npu.npu.Event()
        return self.outputs

    def replay(self) -> Any:
        if self.tasks:
            npu_updates.patch_tasks(self.torch_npu, self.device, self.tasks, self._length_views, self._done)
        self.graph.replay()
        return self.outputs


def supports_graphs(device: torch.device) -> bool:
    return device.type in ("cuda", "npu")


def new_graph(device: torch.device, enabled: bool = True) -> DeviceGraph:
    if not enabled or device.type == "cpu":
        return NoGraph()
    if device.type == "cuda":
        return CudaGraph(device)
    if device.type == "npu":
        return NpuGraph(device)
    return NoGraph()


def graph_pool_handle(device: torch.device) -> Any:
    """A new memory pool shared by every graph of one runner (None where there are no graphs)."""
    if device.type == "cuda":
        return torch.cuda.graph_pool_handle()
    if device.type == "npu":
        return torch.npu.graph_pool_handle()
    return None


def pool_reserved_bytes(device: torch.device) -> int:
    """Bytes the caching allocator holds on ``device`` (graph pools included)."""
    if device.type == "cuda":
        return int(torch.cuda.memory_reserved(device))
    if device.type == "npu":
        return int(torch.npu.memory_reserved(device))
    return 0


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)


@contextlib.contextmanager
def capture_guard(device: torch.device, collect: bool = True) -> Iterator[None]:
    """gc frozen and cache-emptying held off for the duration of a capture.

    ``collect`` runs one full collection first; a loop of captures (warm-up of every
    bucket) collects once, before the loop, not once a bucket (a full collection of a
    large model's heap costs a large part of a second).
    """
    if collect:
        gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    module = getattr(torch, device.type, None) if device.type in ("cuda", "npu") else None
    original = getattr(module, "empty_cache", None) if module is not None else None
    if original is not None:
        # empty_cache() during a capture would release blocks a graph still owns.
        setattr(module, "empty_cache", lambda: None)
    try:
        yield
    finally:
        if original is not None:
            setattr(module, "empty_cache", original)
        if was_enabled:
            gc.enable()
