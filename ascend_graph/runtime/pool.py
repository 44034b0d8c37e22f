"""One device-graph memory pool per device, shared by every graph; outputs held weakly.

Entry points: :func:`device_pool` (the pool of a device, made on first use) and
:func:`weak_refs` (what a captured graph keeps of its outputs).

Why one pool: graphs are replayed one at a time on one stream, so the memory one graph
uses while it runs is free for the next. Captured into one allocator pool, largest
bucket first, the smaller buckets' graphs reuse the blocks the larger ones freed, and
the whole bucket list costs about what the largest bucket costs alone (vLLM and
vllm-ascend capture into one global pool the same way). Every compiled function's
runner, and the vLLM wrapper (``DevicePool.handle``), capture into the same pool.

Why weak outputs: a graph's outputs are the pool blocks its last kernels write. Held
strongly, they stay allocated after the capture, and every later capture must place its
own blocks elsewhere (Qwen3-1.7B's logits ``[bucket, 151936]`` alone came to 1.37 GB
over vLLM's 35 buckets). Held weakly (a tensor over the same memory that does not own
it: vLLM's ``weak_ref_tensors``, torch's cudagraph trees), the blocks go back to the
pool when the capture's own references die, and the next capture reuses them. The
price is the contract the runner already states: an output is valid until the next
replay of any graph of the pool; callers that keep outputs longer clone them
(``clone_outputs``, the default).

Why a keeper graph: the allocator frees a pool for good when the last graph captured
into it is destroyed, and any later capture into that id then fails with
``use_count > 0 INTERNAL ASSERT``. A failed first capture into a fresh pool does just
that. The pool therefore captures one trivial graph of its own first and keeps it for
its lifetime, so the id stays valid whatever happens to the graphs captured after it.

The pools are process-wide, one per device, as the allocator they stand for is.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

import torch

from .buckets import StreamLedger

__all__ = ["DevicePool", "device_pool", "capture_stream", "weak_ref", "weak_refs", "reset_pools", "graph_api"]

log = logging.getLogger("ascend_graph.runtime")

_lock = threading.RLock()
_pools: dict[torch.device, "DevicePool"] = {}
#: graph API module -> device -> its capture stream (weak: a test's stand-in API goes with it)
_streams: "weakref.WeakKeyDictionary[Any, dict[torch.device, Any]]" = weakref.WeakKeyDictionary()


def capture_stream(api: Any, device: torch.device) -> Any:
    """One side stream a device (and graph API) for every capture: graphs sharing a pool
    are captured on one stream (torch's note on ``torch.cuda.graph``), and on an NPU a
    stream a capture would be one stream fewer for graphs."""
    device = torch.device(device)
    with _lock:
        per_device = _streams.setdefault(api, {})
        stream = per_device.get(device)
        if stream is None:
            stream = per_device[device] = api.Stream(device)
        return stream


def graph_api(device: torch.device) -> Any:
    """The module holding a device's graph API: ``torch.cuda`` or ``torch_npu.npu``."""
    if device.type == "cuda":
        return torch.cuda
    if device.type == "npu":
        import torch_npu  # registers torch.npu

        return torch_npu.npu
    return None


def _canonical(device: torch.device) -> torch.device:
    device = torch.device(device)
    if device.index is None and device.type in ("cuda", "npu"):
        device = torch.device(device.type, graph_api(device).current_device())
    return device


class DevicePool:
    """The graph pool of one device: its id, the stream graphs are captured on, and the
    keeper graph that holds the id valid (see the module docstring).

    ``api`` is ``torch.cuda`` or ``torch_npu.npu`` (tests pass a stand-in).
    """

    def __init__(self, device: torch.device, api: Any) -> None:
        self.device = device
        self.api = api
        self._handle: Any = None
        self._keeper: tuple[Any, torch.Tensor] | None = None
        #: graphs captured into the pool (successful captures), for stats and estimates
        self.captures = 0
        #: why graphs are off on this device (a capture that could not be ended), or None
        self.disabled: str | None = None
        #: NPU: the streams every graph of the device holds, against one budget
        self.streams: StreamLedger | None = None
        #: pools retired after a failed capture (see :meth:`retire`), kept alive with their keepers
        self._retired: list[tuple[Any, Any]] = []
        self.retired = 0

    def stream_ledger(self, budget: int) -> StreamLedger:
        """The device's stream ledger; the smallest budget any compile asked for holds."""
        if self.streams is None:
            self.streams = StreamLedger(budget)
        else:
            self.streams.budget = min(self.streams.budget, budget)
        return self.streams

    @property
    def stream(self) -> Any:
        """The side stream every graph of the pool is captured on (torch's note on
        ``torch.cuda.graph``: graphs sharing a pool should share the capture stream)."""
        return capture_stream(self.api, self.device)

    @property
    def handle(self) -> Any:
        """The pool id to pass as ``pool=`` to a capture; the keeper graph is made first."""
        if self._handle is None:
            handle = self.api.graph_pool_handle()
            self._keeper = self._capture_keeper(handle)
            self._handle = handle
        return self._handle

    @property
    def current_handle(self) -> Any:
        """The pool id captures now go to (None before the first capture)."""
        return self._handle

    def retire(self, reason: str) -> None:
        """Capture into a fresh pool from now on; the old one (and its keeper graph) stays
        alive for the graphs captured into it. Used when a failed capture left the
        allocator routing to the pool (torch gives no way to query or clear that)."""
        log.warning("graph pool %s of %s retired (%s); later captures use a new pool", self._handle, self.device, reason)
        self._retired.append((self._handle, self._keeper))
        self._handle, self._keeper = None, None
        self.retired += 1

    def _capture_keeper(self, handle: Any) -> tuple[Any, torch.Tensor]:
        new = getattr(self.api, "CUDAGraph", None) or self.api.NPUGraph
        graph = new()
        scratch = torch.zeros(1, device=self.device)  # allocated outside the pool
        prev = self.api.current_stream(self.device)
        self.api.synchronize(self.device)
        self.stream.wait_stream(prev)
        if self.api is torch.cuda:
            self._prime_stream()
        with self.api.stream(self.stream):
            graph.capture_begin(pool=handle, capture_error_mode="thread_local")
            try:
                scratch.add_(1)
            finally:
                graph.capture_end()
        prev.wait_stream(self.stream)
        return graph, scratch

    def _prime_stream(self) -> None:
        """cuBLAS keeps one workspace per (handle, stream), allocated at its first GEMM on
        that stream. Made here, eagerly, it is ordinary memory; made by the first capture
        on the capture stream, it would land in (and never leave) a graph pool, counted
        as that capture's growth, or kept alive in a trial pool the estimate meant to drop."""
        with self.api.stream(self.stream):
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                a = torch.ones(16, 16, device=self.device, dtype=dtype)
                torch.mm(a, a)
                torch.addmm(a[0], a, a)  # the cuBLASLt path (bias epilogue)
        self.api.synchronize(self.device)

    def reserved_bytes(self) -> int:
        """Bytes the device's caching allocator holds (graph pools included)."""
        return int(self.api.memory_reserved(self.device))

    def disable(self, reason: str) -> None:
        log.error("device graphs are off on %s from now on: %s", self.device, reason)
        self.disabled = reason


def device_pool(device: torch.device) -> DevicePool | None:
    """The shared graph pool of ``device`` (None on devices without graphs)."""
    if torch.device(device).type not in ("cuda", "npu"):
        return None
    device = _canonical(device)
    with _lock:
        pool = _pools.get(device)
        if pool is None:
            pool = _pools[device] = DevicePool(device, graph_api(device))
        return pool


def reset_pools() -> None:
    """Forget every pool (their graphs' memory is released when the graphs die). For tests
    and for a process that rebuilds its engine."""
    with _lock:
        _pools.clear()


def weak_ref(t: Any) -> Any:
    """A tensor over ``t``'s memory that does not keep it allocated (anything else as is)."""
    if not isinstance(t, torch.Tensor) or t.numel() == 0 or t.device.type not in ("cuda", "npu"):
        return t
    if t.device.type == "npu":
        import torch_npu

        return torch_npu._C._weak_ref_tensor(t)
    storage = t.untyped_storage()
    # a storage with the same data pointer and no deleter: freeing t's storage is unaffected
    weak_storage = torch._C._construct_storage_from_data_pointer(storage.data_ptr(), t.device, storage.nbytes())
    out = torch.empty((), dtype=t.dtype, device=t.device)
    return out.set_(weak_storage, t.storage_offset(), t.shape, t.stride())


def weak_refs(outputs: Any) -> Any:
    """:func:`weak_ref` through lists and tuples (named tuples keep their type)."""
    if isinstance(outputs, list):
        return [weak_refs(o) for o in outputs]
    if isinstance(outputs, tuple):
        items = [weak_refs(o) for o in outputs]
        return type(outputs)(*items) if hasattr(outputs, "_fields") else type(outputs)(items)
    return weak_ref(outputs)
