"""Device graphs behind one interface: CUDA graphs, NPU (ACL) graphs, and none (CPU).

Entry point: :func:`new_graph`. A :class:`DeviceGraph` captures a zero-argument
function once (its inputs are static buffers the caller owns) and replays it; both
return the function's outputs. On CUDA/NPU the outputs are the static tensors the
graph writes into on every replay; with :class:`NoGraph` (CPU, or graphs turned off)
replay simply runs the function again, so the bucketing and padding semantics around
it are identical everywhere and are tested on the CPU.

A capture that fails is contained (:func:`contained_capture`): the capture is ended,
the allocator's routing to the pool and the RNG generators' capture mode are undone
even where the driver invalidated the capture, and the current stream is restored, so
the process keeps serving and capturing (``torch.cuda.graph`` alone does not: see the
function's docstring). Captured graphs hold their outputs weakly and share one pool per
device (``runtime/pool.py``).

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
import logging
from typing import Any, Callable, Iterator, Sequence

import torch

from . import npu_updates
from .pool import capture_stream, weak_refs

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
    "contained_capture",
    "capture_stream",
]

log = logging.getLogger("ascend_graph.runtime")


class DeviceGraph:
    """Capture ``fn`` once, replay it many times.

    ``static_inputs``: the caller's buffers that ``fn`` reads and that the caller reloads
    before every replay (the runner's copied inputs). Only the NPU graph uses them.
    """

    kind = "none"

    def capture(self, fn: Callable[[], Any], pool: Any = None, static_inputs: Sequence[Any] = (), stream: Any = None) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def replay(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


class NoGraph(DeviceGraph):
    """No device graph: ``replay`` runs the function again (CPU, or graphs turned off)."""

    kind = "none"

    def __init__(self) -> None:
        self._fn: Callable[[], Any] | None = None

    def capture(self, fn: Callable[[], Any], pool: Any = None, static_inputs: Sequence[Any] = (), stream: Any = None) -> Any:
        self._fn = fn
        return fn()

    def replay(self) -> Any:
        assert self._fn is not None, "replay() before capture()"
        return self._fn()


class CudaGraph(DeviceGraph):
    """A CUDA graph captured with containment (:func:`contained_capture`); its outputs
    are held weakly (``runtime/pool.py``): valid until the next replay of a graph of the
    same pool."""

    kind = "cuda"

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.graph = torch.cuda.CUDAGraph()
        self.outputs: Any = None

    def capture(self, fn: Callable[[], Any], pool: Any = None, static_inputs: Sequence[Any] = (), stream: Any = None) -> Any:
        if stream is None:
            stream = capture_stream(torch.cuda, self.device)
        outputs = contained_capture(torch.cuda, self.device, self.graph, fn, pool=pool, stream=stream)
        self.outputs = weak_refs(outputs)
        return outputs

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

    def capture(self, fn: Callable[[], Any], pool: Any = None, static_inputs: Sequence[Any] = (), stream: Any = None) -> Any:
        api = self.torch_npu.npu
        if stream is None:
            stream = capture_stream(api, self.device)
        recorder = npu_updates.TaskCapture(self.torch_npu, self.device, static_inputs)  # host snapshot: before capture

        def recorded() -> Any:
            with recorder.active():
                return fn()

        outputs = contained_capture(api, self.device, self.graph, recorded, pool=pool, stream=stream)
        self.tasks, self._length_views = recorder.finish()
        if self.tasks:
            self._done = self.torch_npu.npu.Event()
        weak = self.torch_npu._C._weak_ref_tensor
        self.outputs = _map_tensors(outputs, lambda t: weak(t) if t.numel() else t)
        return outputs

    def replay(self) -> Any:
        if self.tasks:
            npu_updates.patch_tasks(self.torch_npu, self.device, self.tasks, self._length_views, self._done)
        self.graph.replay()
        return self.outputs


# --------------------------------------------------------------------------- containment

def contained_capture(api: Any, device: torch.device, graph: Any, fn: Callable[[], Any], *, pool: Any = None, stream: Any, error_mode: str = "thread_local") -> Any:
    """Capture ``fn`` into ``graph`` on ``stream``; returns ``fn``'s outputs.

    ``torch.cuda.graph`` leaves the process broken when a capture fails: its
    ``__exit__`` calls ``capture_end`` and, when that raises (a capture the driver
    invalidated: a synchronising call, an unjoined side stream), never restores the
    current stream; and ``capture_end`` raising before its bookkeeping leaves the
    allocator routing allocations to the dead capture's pool and the RNG generators in
    capture mode, so every later random op fails with "Offset increment outside graph
    capture encountered unexpectedly". Here, whatever fails:

    - the current stream is restored (the stream context's exit, which always runs);
    - a capture still open is ended (``capture_end``, so its pool and RNG bookkeeping run);
    - a capture that cannot be ended has its allocator routing removed
      (``endAllocateToPool``), the graph is reset (its per-capture RNG state dropped) and,
      back on the caller's stream, the RNG state repaired (:func:`_restore_rng`: a trivial
      capture, checked by a probe, else the generator's state saved before the capture
      put back);
    - a ``capture_begin`` that raises (torch 2.11 begins the stream capture and puts the
      RNG generator in capture mode before the allocator may refuse the pool) has its
      stream capture ended and the RNG state repaired the same way;
    - a pool a capture could not end is not captured into again: torch 2.11 (H200) still
      refused the next ``capture_begin`` into it ("already recording to mempool_id") after
      ``endAllocateToPool`` returned, so the device's shared pool is retired
      (:meth:`DevicePool.retire`: later captures go to a fresh pool, the graphs already in
      the old one keep replaying) and the failed graph is kept alive;
    - the original error is raised; the caller discards the graph.

    ``api`` is ``torch.cuda`` or ``torch_npu.npu`` (whose NPUGraph mirrors CUDAGraph).
    """
    prev = api.current_stream(device)
    _synchronize(api, device)  # work queued before the capture must not be recorded into it
    stream.wait_stream(prev)
    begin: dict[str, Any] = {"capture_error_mode": error_mode}
    if pool is not None:
        begin["pool"] = pool
    saved_rng = _save_rng(api, device)
    unended: BaseException | None = None  # capture_end's error, for a capture it could not end
    begun = False
    error: BaseException | None = None
    with api.stream(stream):
        try:
            graph.capture_begin(**begin)
            begun = True
        except BaseException as e:
            # capture_begin registers the RNG generators and begins the stream capture
            # before the allocator may refuse the pool (torch 2.11: "beginAllocateToPool:
            # already recording to mempool_id"): the generator is then in capture mode
            error = e
            _end_half_begun_capture(api, device, graph, e)
        if begun:
            try:
                outputs = fn()
            except BaseException as first:
                unended = _end_failed_capture(api, device, graph, stream, pool)
                error = first
            else:
                try:
                    graph.capture_end()
                except BaseException as e:
                    unended = error = e
                    _unroute_pool(api, device, graph, pool, e)
    if unended is not None or not begun:
        _drop_capture_state(graph)
        _restore_rng(api, device, saved_rng)
    if unended is not None or (not begun and "already recording" in str(error)):
        # Even where endAllocateToPool returned, torch 2.11 (H200) still refused the next
        # capture into the pool ("already recording to mempool_id"): a pool a capture
        # could not end is never captured into again
        _retire_pool(device, graph, pool)
    if error is not None:
        raise error
    prev.wait_stream(stream)
    return outputs


def _end_failed_capture(api: Any, device: torch.device, graph: Any, stream: Any, pool: Any) -> BaseException | None:
    """End a capture whose function raised, as ``torch.cuda.graph.__exit__`` would, but
    without letting a second error hide the first or leave state behind. Returns
    ``capture_end``'s error where the capture could not be ended cleanly, else None."""
    try:
        if hasattr(api, "set_stream") and api.current_stream(device) != stream:
            api.set_stream(stream)  # capture_end checks it runs on the capture stream
        graph.capture_end()
        return None
    except BaseException as e:  # the driver invalidated the capture: it has ended without bookkeeping
        _unroute_pool(api, device, graph, pool, e)
        return e


def _end_half_begun_capture(api: Any, device: torch.device, graph: Any, error: BaseException) -> None:
    """``capture_begin`` raised: end the stream capture it may have begun (its
    ``capture_end`` also runs the RNG epilogue), or turn graphs off if the stream stays
    captured."""
    log.warning("a capture could not begin (%s: %s); restoring the RNG state", type(error).__name__, error)
    capturing = getattr(api, "is_current_stream_capturing", None)
    if capturing is None or not capturing():
        return
    try:
        graph.capture_end()
    except Exception as e:
        log.warning("ending the half-begun capture raised (%s: %s)", type(e).__name__, e)
    if capturing():
        _disable_device(device, f"a capture that could not begin left its stream capturing ({type(error).__name__}: {error})")


def _unroute_pool(api: Any, device: torch.device, graph: Any, pool: Any, error: BaseException) -> None:
    """Remove the allocator's routing to the pool of a capture that could not be ended, as
    far as this torch allows (the caller retires the pool whatever the outcome: the routing
    was seen to outlive a removal that returned)."""
    log.warning("a failed capture could not be ended cleanly (%s: %s); restoring the allocator and RNG state", type(error).__name__, error)
    capturing = getattr(api, "is_current_stream_capturing", None)
    if capturing is not None and capturing():
        # the driver still records this stream: nothing on it can run until the process ends
        _disable_device(device, f"a capture could not be ended ({type(error).__name__}: {error})")
        return
    # The allocator still routes allocations to the pool for a capture that is gone, through
    # a filter that points at this graph object: removed, or a later capture could consult
    # it after the graph is freed. (graph.pool() refuses after a failed capture: the id
    # passed in is the one; a private pool's id is only known to a successful capture.)
    end_allocate = _end_allocate_to_pool(api)
    if end_allocate is None:
        log.warning("this torch has no endAllocateToPool binding: the failed capture's pool is retired")
        return
    try:
        end_allocate(_index(api, device), tuple(pool) if pool is not None else graph.pool())
    except Exception as e:
        if "not currently recording" not in str(e):  # that one: capture_end got as far as its own endAllocateToPool
            log.warning("removing the failed capture's pool routing raised (%s: %s)", type(e).__name__, e)


#: graphs whose capture could not be ended: the allocator's routing filter may still refer
#: to them, so they are never freed
_UNENDED: list[Any] = []


def _retire_pool(device: torch.device, graph: Any, pool: Any) -> None:
    """The allocator may still route to ``pool`` for a capture that is gone: any later
    ``capture_begin`` into that id raises ("already recording to mempool_id") after the
    RNG generator entered capture mode. Keep the graph alive and, when ``pool`` is the
    device's shared pool, have the device capture into a fresh one from now on (the
    graphs already captured keep replaying from the old one)."""
    from .pool import device_pool

    _UNENDED.append(graph)  # the routing may outlive endAllocateToPool (above): keep what it may point at
    shared = device_pool(device)
    if shared is not None and pool is not None and shared.current_handle is not None and tuple(pool) == tuple(shared.current_handle):
        shared.retire("a capture into it could not be ended")


def _drop_capture_state(graph: Any) -> None:
    """``reset()`` the graph whose capture could not be ended, now rather than when its last
    reference dies (the raised error's traceback keeps it alive): it removes the capture's
    per-capture RNG state from every generator the capture touched (newer torch keys the
    generator's capture state by capture id; a state left behind keeps the generator in
    capture mode) and the capture's entry in torch's table of captures in progress."""
    reset = getattr(graph, "reset", None)
    if reset is None:
        return
    try:
        reset()
    except Exception as e:  # reset only warns on driver errors; anything else is logged
        log.warning("reset of the failed graph raised (%s: %s)", type(e).__name__, e)


def _default_generator(api: Any, device: torch.device) -> Any:
    gens = getattr(api, "default_generators", None)
    if not gens:
        return None
    gen = gens[_index(api, device)]
    return gen if hasattr(gen, "clone_state") and hasattr(gen, "graphsafe_set_state") else None


def _save_rng(api: Any, device: torch.device) -> Any:
    """A copy of the default generator's state (seed, offset; not in capture mode), taken
    before a capture, to put back if the capture leaves the generator in capture mode."""
    gen = _default_generator(api, device)
    if gen is None:
        return None
    try:
        return gen.clone_state()
    except Exception:  # pragma: no cover - a generator that cannot be copied: the trivial capture remains
        return None


def _rng_stuck(api: Any, device: torch.device) -> bool:
    """Whether the device's default generator is still in capture mode: one random draw
    outside any capture raises exactly then (CUDAGeneratorState::increase)."""
    if api is not torch.cuda:
        return False  # no probe for other devices: the trivial capture is all there is
    try:
        torch.empty(1, device=device).uniform_()
    except RuntimeError as e:
        if "Offset increment outside graph capture" in str(e):
            return True
        raise
    return False


def _restore_rng(api: Any, device: torch.device, saved: Any) -> None:
    """Take the default generator out of capture mode after a capture whose end failed.

    First one trivial capture (its prologue and epilogue run on the generator's own state,
    so graphs captured earlier keep sharing that state); if a probe still finds the
    generator in capture mode, the state copied before the capture is put in its place
    (``graphsafe_set_state``: same seed and offset, not capturing; graphs captured earlier
    then advance their own copy). If neither works, device graphs are turned off."""
    try:
        _reset_rng_capture_state(api, device)
    except Exception as e:
        log.warning("the trivial capture meant to reset the RNG state failed (%s: %s)", type(e).__name__, e)
    if not _rng_stuck(api, device):
        return
    gen = _default_generator(api, device)
    if saved is not None and gen is not None:
        gen.graphsafe_set_state(saved)
        if not _rng_stuck(api, device):
            log.warning("RNG state of %s put back from its copy taken before the failed capture", device)
            return
    _disable_device(device, "the RNG generator stayed in capture mode after a failed capture")


def _reset_rng_capture_state(api: Any, device: torch.device) -> None:
    """One trivial capture: ``capture_begin`` registers the default generator with it and
    ``capture_end`` takes the generator out of capture mode, which a capture whose end
    failed left it in. No allocation happens inside (a private pool, released with it)."""
    new = getattr(api, "CUDAGraph", None) or api.NPUGraph
    graph = new()
    scratch = torch.zeros(1, device=device)
    stream = api.Stream(device)
    _synchronize(api, device)
    stream.wait_stream(api.current_stream(device))
    with api.stream(stream):
        graph.capture_begin(capture_error_mode="thread_local")
        scratch.add_(1)
        graph.capture_end()
    _synchronize(api, device)
    del graph


def _end_allocate_to_pool(api: Any) -> Callable[[int, Any], None] | None:
    if api is torch.cuda:
        return getattr(torch._C, "_cuda_endAllocateToPool", None)
    c = getattr(getattr(api, "_C", None), "_npu_endAllocateToPool", None)
    if c is not None:
        return c
    try:
        import torch_npu

        return getattr(torch_npu._C, "_npu_endAllocateToPool", None)
    except ImportError:
        return None


def _index(api: Any, device: torch.device) -> int:
    return device.index if device.index is not None else int(api.current_device())


def _synchronize(api: Any, device: torch.device) -> None:
    sync = getattr(api, "synchronize", None)
    if sync is not None:
        sync(device)


def _disable_device(device: torch.device, reason: str) -> None:
    from .pool import device_pool

    pool = device_pool(device)
    if pool is not None:
        pool.disable(reason)


def _map_tensors(outputs: Any, f: Callable[[torch.Tensor], Any]) -> Any:
    if isinstance(outputs, list):
        return [_map_tensors(o, f) for o in outputs]
    if isinstance(outputs, tuple):
        items = [_map_tensors(o, f) for o in outputs]
        return type(outputs)(*items) if hasattr(outputs, "_fields") else type(outputs)(items)
    return f(outputs) if isinstance(outputs, torch.Tensor) else outputs


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
    """The device's shared graph pool (``runtime/pool.py``; None where there are no graphs)."""
    from .pool import device_pool

    pool = device_pool(device)
    return None if pool is None else pool.handle


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

    ``collect`` first collects the young generations, where the garbage of the calls
    since the last collection is (tensors a capture would want back). Not a full
    collection: after Dynamo, AOT and inductor the heap holds most of a million objects,
    and a full collection took 0.47 s a capture on the H100 machine (a tenth of a lazily
    captured bucket's time); a loop of captures (warm-up of every bucket) runs one full
    collection before the loop instead.
    """
    if collect:
        gc.collect(1)
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
