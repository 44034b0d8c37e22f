"""NPU stream budget from the graph: streams counted from the captured graph's code, one
ledger a device, buckets trimmed to it, and a capture that fails for want of streams
drops its bucket with advice naming the option. No NPU here: the runner runs with a
recording stand-in for the device graph (the planning is the same code as on an NPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ascend_graph
import ascend_graph.ops.attention  # noqa: F401  (registers ascend_graph::paged_attention)
from ascend_graph.backend import ascend_backend
from ascend_graph.runtime import graphs
from ascend_graph.runtime.buckets import STREAM_ADVICE, GraphStreams, StreamLedger, count_graph_streams, is_stream_exhaustion, plan_buckets


def traced_code(fn, *args) -> str:
    return torch.fx.symbolic_trace(fn).code


def test_streams_are_counted_from_the_graph_code():
    def f(x, cache, bt, cu, lens):
        a = torch.ops._c10d_functional.all_reduce.default(x, "sum", "tp_group")
        b = torch.ops._c10d_functional.all_gather_into_tensor.default(a, 2, "tp_group")  # same group
        c = torch.ops._c10d_functional.all_to_all_single.default(b, [1, 1], [1, 1], "ep_group")
        q = c.view(-1, 2, 4)
        o1 = torch.ops.ascend_graph.paged_attention(q, cache, cache, bt, cu, lens, None, 0.5, 0)
        o2 = torch.ops.ascend_graph.paged_attention(q, cache, cache, bt, cu, lens, None, 0.5, 0)
        return o1 + o2

    use = count_graph_streams(traced_code(f))
    assert use.comm_groups == frozenset({"tp_group", "ep_group"})
    assert use.user_streams == frozenset() and use.fia_tasks == 2
    assert use.cost() == 1 + 2  # the capture stream and one a communication group
    assert use.cost(comm_streams_per_group=7) == 1 + 14  # A3's AICPU expansion at 8 ranks
    # the planner trims by what this graph costs: 9 streams hold three captures of it
    assert plan_buckets([1, 2, 4, 8, 16, 32], stream_budget=9, stream_cost=use.cost()).sizes == (1, 4, 32)


def test_multi_stream_scopes_cost_one_stream_a_label():
    # TorchAir's npu_stream_switch as it appears in a graph (the op is TorchAir's, not here)
    code = """
def forward(self, x):
    scope_enter = torch.ops.air.scope_enter.default([('_user_stream_label', 'shared_expert'), ('_user_stream_priority', '0')])
    y = torch.ops.aten.mul.Tensor(x, 2)
    scope_exit = torch.ops.air.scope_exit.default()
    scope_enter_1 = torch.ops.air.scope_enter.default([('_user_stream_label', 'shared_expert')])
    scope_exit_1 = torch.ops.air.scope_exit.default()
    scope_enter_2 = torch.ops.air.scope_enter.default([('_user_stream_label', 'prefetch')])
    scope_exit_2 = torch.ops.air.scope_exit.default()
    scope_enter_3 = torch.ops.air.scope_enter.default([('_super_kernel_scope', 'sk')])
    d = torch.ops.npu.npu_moe_distribute_dispatch_v2.default(x, group_ep='ep8', ep_world_size=8)
    return y
"""
    use = count_graph_streams(code)
    assert use.user_streams == frozenset({"shared_expert", "prefetch"})
    assert use.comm_groups == frozenset({"ep8"})
    assert use.cost() == 1 + 2 + 1


def test_a_plain_graph_costs_one_stream():
    assert count_graph_streams(traced_code(lambda x: x.relu() * 2)) == GraphStreams()
    assert GraphStreams().cost() == 1


@pytest.mark.parametrize(
    "message",
    [
        "capture_begin: NPU function error: AclmdlRICaptureBegin, error code is 207008",
        "rtStreamWaitEvent execution failed, reason=driver error:resource alloc fail ... runtime result = 207005",
        "[SqCqManage]Alloc sq cq fail, stream_id=1984, retCode=0x7020023",
        "New capture stream failed, stream_id=1987, event_id=[-1->70037]",
        "error code is 207007",
    ],
)
def test_stream_exhaustion_is_recognised(message):
    assert is_stream_exhaustion(RuntimeError(message))


@pytest.mark.parametrize(
    "message",
    ["Capture must end on the same stream it began on.", "NPU out of memory. Tried to allocate 2.00 GiB", "error code is 207001", "stream capture invalidated"],
)
def test_other_capture_failures_are_not_stream_exhaustion(message):
    assert not is_stream_exhaustion(RuntimeError(message))


def test_ledger_holds_every_graph_to_one_budget():
    ledger = StreamLedger(5)
    assert ledger.fits(3)
    ledger.take(3)
    assert ledger.fits(2) and not ledger.fits(3)
    ledger.release(3)
    assert ledger.fits(5)
    ledger.close("the device ran out at 2")
    assert not ledger.fits(1)


# --------------------------------------------------------------------------- through the runner


class Recording(graphs.NoGraph):
    """A device graph: a capture records, a replay runs. ``fail_at``: the capture number
    that fails as an NPU out of streams does."""

    captures = 0
    fail_at: int | None = None

    def capture(self, fn, pool=None, static_inputs=(), stream=None):
        Recording.captures += 1
        if Recording.captures == Recording.fail_at:
            raise RuntimeError("capture_begin: AclmdlRICaptureBegin(capture_stream_, capture_mode), error code is 207008")
        self._fn = fn
        return None


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(self.lin(x))


@pytest.fixture
def npu_like(monkeypatch):
    from ascend_graph.runtime import runner as R

    Recording.captures, Recording.fail_at = 0, None
    monkeypatch.setattr(R, "supports_graphs", lambda device: True)
    monkeypatch.setattr(R, "stream_budget_applies", lambda device: True)
    monkeypatch.setattr(R, "new_graph", lambda device, enabled=True: Recording())
    runners = []

    def compile(model, **options):
        def backend(gm, example_inputs):
            r = ascend_backend(gm, example_inputs, options={"codegen": "fx", **options})
            runners.append(r)
            return r

        torch._dynamo.reset()
        return torch.compile(model, backend=backend, dynamic=True), runners

    return compile


def test_buckets_are_trimmed_to_the_budget_keeping_smallest_and_largest(npu_like):
    model = Toy()
    cm, runners = npu_like(model, buckets=[1, 2, 4, 8, 16], stream_budget=3)
    with torch.no_grad():
        x = torch.randn(5, 8)
        torch.testing.assert_close(ascend_graph.warmup(cm, x), model(x))
    (runner,) = [r for r in runners if r.plan is not None]
    assert runner.plan.sizes == (1, 4, 16)  # budget 3 at one stream a graph: ends kept, middle sampled
    assert runner.streams is not None and runner.streams.used == 3 and runner.streams.budget == 3
    st = ascend_graph.stats()
    assert st["buckets_captured"] == 3 and st["capture_failures"] == 0


def test_a_capture_out_of_streams_drops_its_bucket_with_advice_and_closes_the_ledger(npu_like):
    model = Toy()
    Recording.fail_at = 3  # the third capture (largest first: 16, 8, then 4) finds no stream
    cm, runners = npu_like(model, buckets=[2, 4, 8, 16], stream_budget=100)
    with torch.no_grad():
        x = torch.randn(5, 8)
        torch.testing.assert_close(ascend_graph.warmup(cm, x), model(x))
        for n in (3, 2, 7):  # 3 -> bucket 4 is gone: served by 8; 2 -> 2 skipped: served by 8
            x = torch.randn(n, 8)
            torch.testing.assert_close(cm(x), model(x))
    (runner,) = [r for r in runners if r.plan is not None]
    st = ascend_graph.stats()
    failed = {k.split(":")[1]: v["failed"] for k, v in st["buckets"].items() if "failed" in v}
    assert set(failed) == {"4", "2"}
    assert "207008" in failed["4"] and "stream_budget" in failed["4"]
    assert "ran out of streams" in failed["2"] and "stream_budget" in failed["2"]
    assert runner.streams.closed is not None and runner.streams.used == 2
    assert sorted(k[0] for k in runner.entries) == [8, 16] and st["eager_fallbacks"] == 0
    assert STREAM_ADVICE in failed["2"]
