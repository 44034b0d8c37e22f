"""TP on CUDA with NCCL, on the one GPU the project has: a world of one rank, torch's
functional all_reduce + wait_tensor, then residual add + RMSNorm, compiled the default
way (inductor codegen; the norm_rope family applies on CUDA with its Triton kernels):
the post-pass graph is all_reduce -> ``add_rms_norm``, the outputs equal eager.
The 2-rank proof runs on the CPU (gloo): tests/distributed/test_tp_norm.py."""

import pytest
import torch
import torch.distributed._functional_collectives as funcol

import ascend_graph
from ascend_graph.distributed import groups

from .test_ep_cuda import nccl_world_of_one  # noqa: F401  (fixture)


def _hf_norm(x, w, eps=1e-6):
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


@pytest.mark.cuda
def test_all_reduce_then_add_rms_norm_fuses_on_cuda(nccl_world_of_one, tmp_path):  # noqa: F811
    pg = groups.acquire()

    def fn(x, w, residual, gamma):
        y = funcol.all_reduce(x @ w.t(), "sum", pg.group_name)
        s = residual + y
        return _hf_norm(s, gamma), s

    g = torch.Generator().manual_seed(0)
    x = torch.randn(257, 384, generator=g).bfloat16().cuda()
    w = (torch.randn(1000, 384, generator=g) * 0.05).bfloat16().cuda()
    residual = torch.randn(257, 1000, generator=g).bfloat16().cuda()
    gamma = (1 + 0.1 * torch.randn(1000, generator=g)).bfloat16().cuda()
    torch._dynamo.reset()
    ascend_graph.reset_stats()
    options = {"fusions": ["norm_rope"], "graphs": False, "dump_dir": str(tmp_path), "debug": True}
    compiled = torch.compile(fn, backend="ascend", options=options, dynamic=False, fullgraph=True)
    with torch.no_grad():
        got = compiled(x, w, residual, gamma)
        ref = fn(x, w, residual, gamma)
    after = "".join(p.read_text() for p in sorted(tmp_path.glob("*fuse_norm_rope.after.py")))
    assert ascend_graph.stats()["fusions"]["norm_rope"] == 1
    assert after.count("torch.ops.ascend_graph.add_rms_norm.default(") == 1 and "wait_tensor" in after and "rsqrt" not in after
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
    groups.release(pg)
