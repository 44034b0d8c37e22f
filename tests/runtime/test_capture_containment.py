"""A failed capture is contained: the state machine of runtime/graphs.py's
contained_capture against a recording stand-in of the graph API, and the runner serving
through a failed capture. (The same on a real GPU: tests/runtime/test_cuda_pool.py.)"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import ascend_graph
from ascend_graph.backend import ascend_backend
from ascend_graph.runtime import graphs
from ascend_graph.runtime import pool as pools
from ascend_graph.runtime.buckets import default_sizes
from ascend_graph.runtime.graphs import contained_capture

CPU = torch.device("cpu")


class Stream:
    def __init__(self, api: "FakeApi", name: str) -> None:
        self.api, self.name = api, name

    def wait_stream(self, other: "Stream") -> None:
        pass

    def __repr__(self) -> str:
        return self.name


class Graph:
    """CUDAGraph's capture half. ``end_fails``: capture_end raises as a capture the driver
    invalidated does (the capture is over, its bookkeeping not done)."""

    def __init__(self, api: "FakeApi", name: str, end_fails: bool = False, still_capturing: bool = False) -> None:
        self.api, self.name, self.end_fails, self.still_capturing = api, name, end_fails, still_capturing

    def capture_begin(self, pool=None, capture_error_mode="global"):
        assert not self.api.capturing, "a capture began while another was open"
        self.api.log.append(("begin", self.name, pool, self.api.current.name))
        self.stream = self.api.current
        self.api.capturing = True
        self.api.rng_capture_mode = True  # CUDAGeneratorState::capture_prologue
        self.begun_pool = self.routing_id(pool)
        self.api.routing.append(self.begun_pool)  # allocator: beginAllocateToPool

    def capture_end(self):
        if self.api.current is not self.stream:
            raise RuntimeError("Capture must end on the same stream it began on.")
        if self.end_fails:
            self.api.capturing = self.still_capturing
            self.api.log.append(("end_failed", self.name))
            raise RuntimeError("operation not permitted when stream is capturing (invalidated)")
        self.api.capturing = False
        self.api.routing.remove(self.begun_pool)  # endAllocateToPool
        self.api.rng_capture_mode = False  # capture_epilogue
        self.api.log.append(("end", self.name))

    def reset(self):
        self.api.log.append(("reset", self.name))

    def pool(self):
        if self.end_fails:
            raise RuntimeError("Called CUDAGraph::pool() without a preceding successful capture.")
        return (0, id(self))

    def routing_id(self, pool):
        return tuple(pool) if pool is not None else (0, id(self))


class FakeApi:
    """torch.cuda as contained_capture uses it."""

    def __init__(self) -> None:
        self.log: list = []
        self.default = Stream(self, "default")
        self.current = self.default
        self.capturing = False
        self.rng_capture_mode = False
        self.routing: list = []  # pools the allocator routes capture allocations to
        self.next_graph: dict = {}
        self._C = self

    # streams
    def current_stream(self, device=None):
        return self.current

    def set_stream(self, s):
        self.current = s

    @contextlib.contextmanager
    def stream(self, s):
        prev, self.current = self.current, s
        try:
            yield
        finally:
            self.current = prev

    def Stream(self, device=None):
        return Stream(self, "side" if not any(e[0] == "stream" for e in self.log) else "rng")

    def synchronize(self, device=None):
        pass

    def current_device(self):
        return 0

    def is_current_stream_capturing(self):
        return self.capturing

    # graphs
    def NPUGraph(self):
        return Graph(self, "trivial")

    def _npu_endAllocateToPool(self, device, pool):
        self.log.append(("end_allocate", pool))
        self.routing.remove(tuple(pool))


def side(api: FakeApi) -> Stream:
    api.log.append(("stream",))
    return Stream(api, "side")


def test_a_function_that_raises_ends_its_capture_and_leaves_nothing_behind():
    api = FakeApi()
    g = Graph(api, "g")

    def boom():
        assert api.current.name == "side"
        raise ValueError("raised in Python mid-capture")

    with pytest.raises(ValueError, match="mid-capture"):
        contained_capture(api, CPU, g, boom, pool=("shared",), stream=side(api))
    assert [e[0] for e in api.log if e[0] != "stream"] == ["begin", "end"]
    assert api.current is api.default and not api.capturing
    assert api.routing == [] and not api.rng_capture_mode


def test_a_function_that_left_another_stream_current_still_ends_on_the_capture_stream():
    api = FakeApi()
    g = Graph(api, "g")

    def switch_and_raise():
        api.set_stream(Stream(api, "elsewhere"))  # a kernel helper that forgot to switch back
        raise RuntimeError("mid-capture")

    with pytest.raises(RuntimeError, match="mid-capture"):
        contained_capture(api, CPU, g, switch_and_raise, stream=side(api))
    assert ("end", "g") in api.log and api.current is api.default
    assert api.routing == [] and not api.rng_capture_mode


@pytest.mark.parametrize("fn_raises", [False, True])
def test_an_invalidated_capture_gets_its_allocator_routing_and_rng_state_back(fn_raises):
    api = FakeApi()
    g = Graph(api, "g", end_fails=True)

    def fn():
        if fn_raises:
            raise RuntimeError("Cannot copy between CPU and CUDA tensors during CUDA graph capture")
        return torch.ones(2)

    with pytest.raises(RuntimeError) as e:
        contained_capture(api, CPU, g, fn, pool=("shared",), stream=side(api))
    # the error the caller sees is the first one (the function's), else capture_end's
    assert ("Cannot copy" in str(e.value)) == fn_raises
    kinds = [x[0] for x in api.log if x[0] != "stream"]
    # the failed end, the routing removed, the graph reset (its RNG capture state dropped),
    # then one trivial capture that ends cleanly
    assert kinds == ["begin", "end_failed", "end_allocate", "reset", "begin", "end"]
    assert api.log[-2][1] == "trivial" and api.log[-2][2] is None  # its own private pool
    assert api.current is api.default and not api.capturing
    assert api.routing == [] and not api.rng_capture_mode


class Generator:
    """The default generator's state swap (``clone_state`` / ``graphsafe_set_state``)."""

    def __init__(self, api: "FakeApi") -> None:
        self.api = api

    def clone_state(self):
        self.api.log.append(("clone_state",))
        return ("state", self.api.rng_capture_mode)

    def graphsafe_set_state(self, state):
        self.api.log.append(("set_state", state))
        self.api.rng_capture_mode = state[1]


def test_rng_left_in_capture_mode_by_the_trivial_capture_gets_the_saved_state_back(monkeypatch):
    """Seen on torch 2.11 (H200): after a capture the driver invalidated, the generator was
    still in capture mode after the trivial capture. A probe finds that, and the state
    copied before the capture (not capturing) is put in its place."""
    api = FakeApi()
    api.default_generators = (Generator(api),)
    monkeypatch.setattr(graphs, "_rng_stuck", lambda api_, device: api_.rng_capture_mode)
    monkeypatch.setattr(graphs, "_reset_rng_capture_state", lambda api_, device: api_.log.append(("trivial_no_effect",)))
    g = Graph(api, "g", end_fails=True)
    with pytest.raises(RuntimeError, match="invalidated"):
        contained_capture(api, CPU, g, lambda: torch.ones(1), pool=("shared",), stream=side(api))
    kinds = [x[0] for x in api.log if x[0] != "stream"]
    assert kinds == ["clone_state", "begin", "end_failed", "end_allocate", "reset", "trivial_no_effect", "set_state"]
    assert not api.rng_capture_mode and api.routing == [] and api.current is api.default


def test_rng_that_nothing_repairs_turns_graphs_off(monkeypatch):
    api = FakeApi()
    disabled = []
    monkeypatch.setattr(graphs, "_disable_device", lambda device, reason: disabled.append(reason))
    monkeypatch.setattr(graphs, "_rng_stuck", lambda api_, device: True)
    monkeypatch.setattr(graphs, "_reset_rng_capture_state", lambda api_, device: None)
    with pytest.raises(RuntimeError):
        contained_capture(api, CPU, Graph(api, "g", end_fails=True), lambda: torch.ones(1), stream=side(api))
    assert disabled == ["the RNG generator stayed in capture mode after a failed capture"]


def test_a_capture_that_cannot_be_ended_turns_graphs_off_for_the_device(monkeypatch):
    api = FakeApi()
    disabled = []
    monkeypatch.setattr(graphs, "_disable_device", lambda device, reason: disabled.append(reason))
    g = Graph(api, "g", end_fails=True, still_capturing=True)
    with pytest.raises(RuntimeError):
        contained_capture(api, CPU, g, lambda: torch.ones(1), stream=side(api))
    assert len(disabled) == 1 and "could not be ended" in disabled[0]
    assert api.current is api.default


class SharedPool:
    """The device pool's retire protocol, as contained_capture uses it."""

    def __init__(self, handle):
        self.current_handle = handle
        self.reasons: list = []

    def retire(self, reason):
        self.reasons.append(reason)
        self.current_handle = None


@pytest.mark.parametrize("binding", ["missing", "raises"])
def test_a_pool_whose_routing_cannot_be_removed_is_retired(monkeypatch, binding):
    """Seen on torch 2.11 (H200): after an invalidated capture the allocator still routed to
    the shared pool, and the next capture into it failed in capture_begin ("already
    recording to mempool_id") with the RNG generator left in capture mode. The shared pool
    is now retired (later captures go to a fresh one) and the graph kept alive."""
    api = FakeApi()
    if binding == "missing":
        monkeypatch.setattr(graphs, "_end_allocate_to_pool", lambda api_: None)
    else:
        def refuses(device, pool):
            raise TypeError("incompatible function arguments")
        monkeypatch.setattr(graphs, "_end_allocate_to_pool", lambda api_: refuses)
    shared = SharedPool(("shared",))
    monkeypatch.setattr(pools, "device_pool", lambda device: shared)
    g = Graph(api, "g", end_fails=True)
    with pytest.raises(RuntimeError, match="invalidated"):
        contained_capture(api, CPU, g, lambda: torch.ones(1), pool=("shared",), stream=side(api))
    assert shared.current_handle is None and len(shared.reasons) == 1
    assert graphs._UNENDED[-1] is g
    assert not api.rng_capture_mode and api.current is api.default


def test_a_pool_a_capture_could_not_end_is_retired_even_when_its_routing_was_removed(monkeypatch):
    """torch 2.11 (H200): endAllocateToPool returned, yet the next capture into the pool
    still raised "already recording to mempool_id". The pool is not captured into again."""
    api = FakeApi()
    shared = SharedPool(("shared",))
    monkeypatch.setattr(pools, "device_pool", lambda device: shared)
    with pytest.raises(RuntimeError, match="invalidated"):
        contained_capture(api, CPU, Graph(api, "g", end_fails=True), lambda: torch.ones(1), pool=("shared",), stream=side(api))
    assert ("end_allocate", ("shared",)) in api.log and shared.current_handle is None
    assert shared.reasons == ["a capture into it could not be ended"]


def test_a_capture_refused_by_a_routed_pool_retires_it(monkeypatch):
    api = FakeApi()
    shared = SharedPool(("shared",))
    monkeypatch.setattr(pools, "device_pool", lambda device: shared)
    with pytest.raises(RuntimeError, match="already recording"):
        contained_capture(api, CPU, RefusesPool(api, "g"), lambda: None, pool=("shared",), stream=side(api))
    assert shared.current_handle is None and not api.rng_capture_mode


class RefusesPool(Graph):
    """capture_begin as torch 2.11's: the RNG prologue and the stream capture begin, then
    the allocator refuses a pool that is still routed."""

    def capture_begin(self, pool=None, capture_error_mode="global"):
        self.stream = self.api.current
        self.api.capturing = True
        self.api.rng_capture_mode = True
        self.begun_pool = self.routing_id(pool)
        raise RuntimeError("beginAllocateToPool: already recording to mempool_id")

    def capture_end(self):
        self.api.capturing = False
        self.api.rng_capture_mode = False
        self.api.log.append(("end", self.name))


def test_a_capture_that_cannot_begin_ends_its_stream_capture_and_restores_rng():
    api = FakeApi()
    g = RefusesPool(api, "g")
    ran = []
    with pytest.raises(RuntimeError, match="already recording"):
        contained_capture(api, CPU, g, lambda: ran.append(1), pool=("shared",), stream=side(api))
    assert ran == []  # the function never ran
    assert ("end", "g") in api.log and ("reset", "g") in api.log
    assert not api.capturing and not api.rng_capture_mode and api.current is api.default


def test_a_successful_capture_returns_outputs_and_restores_the_stream():
    api = FakeApi()
    g = Graph(api, "g")
    out = contained_capture(api, CPU, g, lambda: torch.full((2,), 3.0), pool=("shared",), stream=side(api))
    torch.testing.assert_close(out, torch.full((2,), 3.0))
    assert [e[0] for e in api.log if e[0] != "stream"] == ["begin", "end"]
    assert api.log[1][2] == ("shared",) and api.current is api.default


# --------------------------------------------------------------------------- the runner serves through it


class Recurrent(nn.Module):
    """A non-idempotent in-place state update: a call must run exactly once."""

    def forward(self, x, state):
        state.mul_(0.5).add_(x.sum(0))
        return x * state.sum()


class FailsOnce(graphs.NoGraph):
    """A device graph (a capture records, a replay runs) whose first capture fails."""

    failures = 0

    def capture(self, fn, pool=None, static_inputs=(), stream=None):
        if FailsOnce.failures == 0:
            FailsOnce.failures += 1
            raise RuntimeError("simulated: capture invalidated")
        self._fn = fn
        return None  # a device graph's outputs hold nothing until it is replayed


def test_the_call_whose_capture_failed_is_served_once_from_its_eager_run(monkeypatch):
    from ascend_graph.runtime import runner as R

    FailsOnce.failures = 0
    monkeypatch.setattr(R, "supports_graphs", lambda device: True)
    monkeypatch.setattr(R, "new_graph", lambda device, enabled=True: FailsOnce())
    torch._dynamo.reset()
    model = Recurrent()
    cm = torch.compile(model, backend=ascend_backend, options={"codegen": "fx", "buckets": [2, 4, 8]}, dynamic=True)
    s_ref, s_out = torch.ones(3), torch.ones(3)
    with torch.no_grad():
        for n in (3, 3, 3):  # bucket 4 fails: served from its eager run; then 8 is captured, replayed
            x = torch.randn(n, 3)
            torch.testing.assert_close(cm(x, s_out), model(x, s_ref))
            torch.testing.assert_close(s_out, s_ref)  # the state moved exactly once
    st = ascend_graph.stats()
    assert st["capture_failures"] == 1 and st["fallback_reasons"] == {"capture_failed": 1}
    failed = [k for k, v in st["buckets"].items() if "failed" in v]
    ok = sorted(k.split(":")[1] for k, v in st["buckets"].items() if "failed" not in v)
    assert len(failed) == 1 and failed[0].endswith(":4") and ok == ["8"] and st["replays"] == 2


def test_weak_refs_keep_structure_and_leave_cpu_tensors_alone():
    t = torch.ones(2)
    out = pools.weak_refs((t, [t, 3], None))
    assert out[0] is t and out[1][0] is t and out[1][1] == 3 and out[2] is None


# --------------------------------------------------------------------------- the estimate's arithmetic


class TrialApi(FakeApi):
    """The graph API the estimate uses: pool handles and a cache to empty."""

    def __init__(self) -> None:
        super().__init__()
        self.handles = 0
        self.emptied = 0

    def graph_pool_handle(self):
        self.handles += 1
        return (0, self.handles)

    def empty_cache(self):
        self.emptied += 1


class Recording(graphs.NoGraph):
    """A device graph that records; its capture grows the fake pool: 1000 bytes a row the
    first time into a pool, 10 bytes every later time (smaller graphs reuse the blocks)."""

    reserved = {"n": 0}
    seen_pools: set = set()

    def capture(self, fn, pool=None, static_inputs=(), stream=None):
        self._fn = fn
        rows = static_inputs[0].shape[0]
        Recording.reserved["n"] += 1000 * rows if pool not in Recording.seen_pools else 10
        Recording.seen_pools.add(pool)
        return None


def test_estimate_is_the_first_capture_plus_the_later_samples_per_further_bucket(monkeypatch):
    from ascend_graph.runtime import runner as R

    api = TrialApi()
    Recording.reserved["n"], Recording.seen_pools = 0, set()
    monkeypatch.setattr(R, "supports_graphs", lambda device: True)
    monkeypatch.setattr(R, "new_graph", lambda device, enabled=True: Recording())
    monkeypatch.setattr(R, "graph_api", lambda device: api)
    monkeypatch.setattr(R, "pool_reserved_bytes", lambda device: Recording.reserved["n"])
    torch._dynamo.reset()
    model = Recurrent()
    cm = torch.compile(model, backend=ascend_backend, options={"codegen": "fx", "max_batch": 256}, dynamic=True)
    s_ref, s_out = torch.ones(3), torch.ones(3)
    x = torch.randn(3, 3)
    with torch.no_grad():
        estimate = ascend_graph.estimate_graph_memory(cm, x, s_out)
        model(x, s_ref)
    torch.testing.assert_close(s_out, s_ref)  # the call ran exactly once; trial captures only record
    # vLLM's 35 buckets: samples 256 (first into the trial pool: 256 rows * 1000), then 248
    # and one a halving, 10 bytes each as they reuse its blocks
    samples = [256, 248, 128, 64, 32, 16, 8, 4, 2, 1]
    assert R.estimate_samples(default_sizes(256)) == samples
    assert estimate == 256 * 1000 + 10 * (len(samples) - 1)
    assert api.emptied == 1 and api.handles == 1
    st = ascend_graph.stats()
    assert st["buckets_captured"] == 0 and st["capture_failures"] == 0


def test_estimate_without_device_graphs_is_zero_and_serves_the_call():
    torch._dynamo.reset()
    model = Recurrent()
    cm = torch.compile(model, backend=ascend_backend, options={"codegen": "fx", "buckets": [2, 4]}, dynamic=True)
    s_ref, s_out = torch.ones(3), torch.ones(3)
    x = torch.randn(3, 3)
    with torch.no_grad():
        assert ascend_graph.estimate_graph_memory(cm, x, s_out) == 0
        model(x, s_ref)
    torch.testing.assert_close(s_out, s_ref)


def test_estimate_samples_keep_both_ends_and_about_one_a_halving():
    from ascend_graph.runtime.runner import estimate_samples

    assert estimate_samples([1]) == [1]
    assert estimate_samples([4, 1, 2]) == [4, 2, 1]
    many = estimate_samples(default_sizes(4096))
    assert many[0] == 4096 and many[1] == 4080 and many[-1] == 1 and len(many) == 10
    assert many == sorted(many, reverse=True)
