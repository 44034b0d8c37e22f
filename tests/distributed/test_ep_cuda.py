"""EP on CUDA with NCCL, on the one GPU the project has: a world of one rank exercises
both paths and the static path captured in a CUDA graph (the NCCL all-to-alls inside it)
and replayed on new routings. Two or more GPUs: ``benchmarks/ep_dispatch.py --device cuda``."""

import datetime

import pytest
import torch
import torch.distributed as dist

from ascend_graph.distributed import groups
from ascend_graph.distributed.ep import ep_dispatch_ffn_combine

from .spawn import free_port

op = torch.ops.ascend_graph.moe_dispatch_ffn_combine


@pytest.fixture
def nccl_world_of_one():
    assert not dist.is_initialized()
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1, timeout=datetime.timedelta(seconds=60), device_id=torch.device("cuda", 0))
    try:
        yield
    finally:
        groups.registry().clear()
        dist.destroy_process_group()


def _inputs(seed, t=37, e=16, k=4, h=256, i=128):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).bfloat16().cuda()
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).cuda()
    w = torch.rand(t, k, generator=g).bfloat16().cuda()
    gw = torch.Generator().manual_seed(0)
    w13 = (torch.randn(e, 2 * i, h, generator=gw) * 0.05).bfloat16().cuda()
    w2 = (torch.randn(e, h, i, generator=gw) * 0.05).bfloat16().cuda()
    active = (torch.arange(t) % 5 != 2).cuda()
    return x, w, ids, w13, w2, active


@pytest.mark.cuda
def test_nccl_paths_eager_and_static_path_captured(nccl_world_of_one):
    pg = groups.acquire()
    x, w, ids, w13, w2, active = _inputs(0)
    kw = dict(ep_group=pg.group_name, ep_world_size=1, ep_rank=0)
    ref = op(x, w, ids, w13, w2, "silu", active)
    for static in (False, True):
        got = ep_dispatch_ffn_combine(x, w, ids, w13, w2, "silu", active, static_shapes=static, **kw)
        torch.testing.assert_close(got, ref, atol=2e-2, rtol=2e-2)
    # capture: static_shapes None must pick the static path (no host read while capturing)
    static_in = [a.clone() for a in (x, w, ids, active)]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ep_dispatch_ffn_combine(static_in[0], static_in[1], static_in[2], w13, w2, "silu", static_in[3], **kw)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ep_dispatch_ffn_combine(static_in[0], static_in[1], static_in[2], w13, w2, "silu", static_in[3], **kw)
    for seed in (1, 2, 3):  # new routings replayed through the same graph
        x2, w2_, ids2, _, _, active2 = _inputs(seed)
        for buf, new in zip(static_in, (x2, w2_, ids2, active2)):
            buf.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, op(x2, w2_, ids2, w13, w2, "silu", active2), atol=2e-2, rtol=2e-2)
    groups.release(pg)
