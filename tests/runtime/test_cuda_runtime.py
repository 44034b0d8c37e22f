"""The bucketed runner with real CUDA graphs (run on the GPU machine)."""

import random

import pytest
import torch
from torch import nn

import ascend_graph
from ascend_graph.backend import ascend_backend

pytestmark = pytest.mark.cuda


class Block(nn.Module):
    def __init__(self, n_slots=256):
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)
        self.register_buffer("cache", torch.zeros(n_slots + 1, 64))  # last row: trash for slot -1
        self.n_slots = n_slots

    def forward(self, x, slot_mapping):
        torch._check(slot_mapping.shape[0] == x.shape[0])  # one slot a token: one batch symbol
        y = self.down(torch.nn.functional.gelu(self.up(x))) + x
        idx = torch.where(slot_mapping < 0, torch.full_like(slot_mapping, self.n_slots), slot_mapping)
        self.cache.index_copy_(0, idx, y)
        return y.softmax(-1)


def compile_with_runners(model, **options):
    runners = []

    def backend(gm, example_inputs):
        r = ascend_backend(gm, example_inputs, options=options)
        runners.append(r)
        return r

    torch._dynamo.reset()
    return torch.compile(model, backend=backend), runners


def test_replay_equals_eager_for_every_bucket_and_random_batches():
    model = Block().cuda().eval()
    buckets = [1, 2, 4, 8, 16, 24, 32]
    cm, runners = compile_with_runners(model, buckets=buckets)
    rng = random.Random(0)
    sizes = buckets + [rng.randint(1, 32) for _ in range(40)]
    with torch.no_grad():
        for n in [3, 5] + sizes:  # two first sizes: a static graph, then the dynamic one
            x = torch.randn(n, 64, device="cuda")
            slots = torch.randperm(256, device="cuda")[:n]
            ref_cache = model.cache.clone()
            out = cm(x, slots)
            ref = model(x, slots)  # eager writes the same rows again
            torch.testing.assert_close(out, ref)
            torch.testing.assert_close(model.cache[:256], ref_cache[:256].index_copy(0, slots, model.cache[slots]))
    st = ascend_graph.stats()
    # batch 1 gets a static graph of its own (Dynamo specialises size 1)
    dynamic = next(r for r in runners if r.plan is not None)
    assert dynamic.use_graphs
    assert set(dynamic.entries) == {(b,) for b in buckets if b > 1}
    assert st["eager_fallbacks"] == 0 and st["capture_failures"] == 0


def test_static_input_addresses_are_stable_and_parameters_never_copied():
    model = Block().cuda().eval()
    cm, runners = compile_with_runners(model, buckets=[4, 8])
    with torch.no_grad():
        for n in (3, 5, 6, 7, 2):
            cm(torch.randn(n, 64, device="cuda"), torch.arange(n, device="cuda"))
    runner = next(r for r in runners if r.plan is not None)
    entry = runner.entries[(8,)]
    ptrs = [a.data_ptr() if isinstance(a, torch.Tensor) else None for a in entry.static_args]
    with torch.no_grad():
        cm(torch.randn(7, 64, device="cuda"), torch.arange(7, device="cuda"))
    assert ptrs == [a.data_ptr() if isinstance(a, torch.Tensor) else None for a in entry.static_args]
    params = {p.data_ptr() for p in model.parameters()} | {model.cache.data_ptr()}
    in_place = {entry.static_args[i].data_ptr() for i in runner.in_place}
    assert in_place <= params and model.cache.data_ptr() in in_place


def test_buckets_share_one_pool_captured_largest_first():
    model = Block().cuda().eval()
    cm, runners = compile_with_runners(model, buckets=[1, 2, 4, 8, 16, 32, 64])
    with torch.no_grad():
        cm(torch.randn(3, 64, device="cuda"), torch.arange(3, device="cuda"))
        ascend_graph.reset_stats()
        ascend_graph.warmup(cm, torch.randn(5, 64, device="cuda"), torch.arange(5, device="cuda"))
    st = ascend_graph.stats()
    sizes = [int(k.split(":")[1]) for k in st["buckets"]]
    assert sizes == [64, 32, 16, 8, 4, 2, 1]  # largest first, the call's own bucket included
    pools = [v["pool_bytes"] for v in st["buckets"].values()]
    assert runners[-1].pool is not None
    # one shared pool: all buckets together cost about what the largest does alone
    assert sum(pools) <= 1.25 * max(pools[0], 2 << 20)
