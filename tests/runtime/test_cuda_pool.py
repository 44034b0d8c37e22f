"""One graph pool per device, weak graph outputs, the memory estimate, and capture
containment, with real CUDA graphs (run on the GPU machine).

Containment is tested the way the conformance run broke: a capture fails (a pageable
host-to-device copy, an exception raised in Python, a synchronising call that
invalidates the capture), then the same process draws random numbers, captures a plain
graph, and compiles, captures and replays another model that matches eager.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

import ascend_graph
from ascend_graph.backend import ascend_backend
from ascend_graph.runtime.pool import device_pool

pytestmark = pytest.mark.cuda

# --------------------------------------------------------------------------- ops that cannot be captured


@torch.library.custom_op("ascend_graph_test::pageable_add", mutates_args=())
def pageable_add(x: torch.Tensor) -> torch.Tensor:
    # a pageable host tensor copied to the device: allowed eagerly, refused in a capture
    return x + torch.ones(x.shape[-1]).to(x.device)


@torch.library.custom_op("ascend_graph_test::raise_in_capture", mutates_args=())
def raise_in_capture(x: torch.Tensor) -> torch.Tensor:
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError("raised in Python mid-capture")
    return x * 2


@torch.library.custom_op("ascend_graph_test::sync_in_capture", mutates_args=())
def sync_in_capture(x: torch.Tensor) -> torch.Tensor:
    y = x * 3
    if torch.cuda.is_current_stream_capturing():
        torch.cuda.synchronize()  # illegal in a capture: the driver invalidates it
    return y


for _op in (pageable_add, raise_in_capture, sync_in_capture):
    _op.register_fake(lambda x: torch.empty_like(x))

FAILING = {"pageable_copy": torch.ops.ascend_graph_test.pageable_add, "python_raise": torch.ops.ascend_graph_test.raise_in_capture, "invalidated": torch.ops.ascend_graph_test.sync_in_capture}


class Uncapturable(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.lin = nn.Linear(64, 64)
        self.op = op

    def forward(self, x):
        return self.op(torch.relu(self.lin(x)))


class Block(nn.Module):
    def __init__(self, width=64, vocab=256):
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, x):
        return self.head(self.down(torch.nn.functional.gelu(self.up(x))) + x)


def compile_with_runners(model, **options):
    runners = []

    def backend(gm, example_inputs):
        r = ascend_backend(gm, example_inputs, options=options)
        runners.append(r)
        return r

    torch._dynamo.reset()
    return torch.compile(model, backend=backend, dynamic=True), runners


def assert_process_healthy():
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    assert not torch.cuda.is_current_stream_capturing()
    torch.rand(16, device="cuda")  # "Offset increment outside graph capture" if the RNG is stuck
    g = torch.cuda.CUDAGraph()
    static = torch.zeros(8, device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        out = static + torch.rand(8, device="cuda")
    g.replay()
    torch.cuda.synchronize()
    assert out.shape == (8,)


@pytest.mark.parametrize("kind", list(FAILING))
def test_a_failed_capture_leaves_the_process_serving_and_capturing(kind):
    bad = Uncapturable(FAILING[kind]).cuda().eval()
    cm, _ = compile_with_runners(bad, buckets=[2, 4, 8])
    with torch.no_grad():
        for n in (3, 5, 3):
            x = torch.randn(n, 64, device="cuda")
            torch.testing.assert_close(cm(x), bad(x))  # served, from the eager run or eagerly
    st = ascend_graph.stats()
    assert st["capture_failures"] >= 1 and st["fallback_reasons"].get("capture_failed", 0) >= 1
    assert device_pool(torch.device("cuda")).disabled is None
    assert_process_healthy()

    # another model, compiled in the same process: captured into the same pool, replays equal eager
    ascend_graph.reset_stats()
    good = Block().cuda().eval()
    cm2, runners = compile_with_runners(good, buckets=[1, 2, 4, 8, 16])
    rng = random.Random(0)
    with torch.no_grad():
        for n in [3, 5] + [rng.randint(1, 16) for _ in range(20)]:
            x = torch.randn(n, 64, device="cuda")
            torch.testing.assert_close(cm2(x), good(x))
    st = ascend_graph.stats()
    dynamic = next(r for r in runners if r.plan is not None)
    assert dynamic.use_graphs and len(dynamic.entries) >= 3
    assert st["capture_failures"] == 0 and st["eager_fallbacks"] == 0
    assert_process_healthy()


def test_every_compiled_function_captures_into_the_one_device_pool():
    a, b = Block().cuda().eval(), Block(vocab=128).cuda().eval()
    cma, ra = compile_with_runners(a, buckets=[4, 8])
    with torch.no_grad():
        for n in (3, 5):
            cma(torch.randn(n, 64, device="cuda"))
    cmb, rb = compile_with_runners(b, buckets=[4, 8])
    with torch.no_grad():
        for n in (3, 5):
            cmb(torch.randn(n, 64, device="cuda"))
    pools = {id(r.pool) for r in ra + rb if r.use_graphs}
    assert pools == {id(device_pool(torch.device("cuda")))}


def test_outputs_are_held_weakly_and_cloned_unless_the_caller_consumes_them():
    # outputs [bucket, 65536] fp32: 16 MiB at bucket 64, 12 MiB at 48 (over 10 MiB, each
    # its own segment when held), large next to everything else the graphs allocate
    vocab = 65536
    model = Block(vocab=vocab).cuda().eval()
    buckets = [1, 2, 4, 8, 16, 32, 48, 64]
    cm, runners = compile_with_runners(model, buckets=buckets, clone_outputs=True)
    with torch.no_grad():
        ascend_graph.warmup(cm, torch.randn(5, 64, device="cuda"))
    st = ascend_graph.stats()
    sizes = [int(k.split(":")[1]) for k in st["buckets"]]
    assert sizes == sorted(buckets, reverse=True)  # largest first, the call's bucket included
    growth = [v["pool_bytes"] for v in st["buckets"].values()]
    # held strongly, every graph's logits would stay allocated: 2x the largest's output alone
    outputs_strong = sum(b * vocab * 4 for b in buckets)
    assert sum(growth) <= 1.25 * growth[0], growth
    assert sum(growth) < growth[0] + outputs_strong // 2
    # clone_outputs: an output survives the next call (another bucket's replay)
    with torch.no_grad():
        x1, x2 = torch.randn(20, 64, device="cuda"), torch.randn(60, 64, device="cuda")
        y1 = cm(x1)
        cm(x2)
        torch.testing.assert_close(y1, model(x1))


def test_estimate_is_within_ten_percent_of_the_real_pool_growth():
    # a fresh device pool: the earlier tests' pool has free blocks the captures below would
    # reuse (real growth below a fresh pool's), while the estimate trial-captures into its own
    import gc

    from ascend_graph.runtime import pool as pools

    torch._dynamo.reset()
    pools.reset_pools()
    gc.collect()
    torch.cuda.empty_cache()
    model = Block(width=256, vocab=32768).cuda().eval()
    buckets = [1, 2, 4] + list(range(8, 129, 8))
    cm, runners = compile_with_runners(model, buckets=buckets)
    with torch.no_grad():
        x = torch.randn(5, 256, device="cuda")
        estimate = ascend_graph.estimate_graph_memory(cm, x)
        assert ascend_graph.stats()["buckets_captured"] == 0  # trial captures only
        ascend_graph.reset_stats()
        ascend_graph.warmup(cm, x)
    st = ascend_graph.stats()
    real = sum(v["pool_bytes"] for v in st["buckets"].values())
    assert st["buckets_captured"] == len(buckets)
    assert real > 0 and abs(estimate - real) <= 0.10 * real, (estimate, real)
