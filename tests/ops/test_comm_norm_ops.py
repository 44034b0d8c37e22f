"""ascend_graph::moe_combine_add_rms_norm: the CPU reference is the MoE op then
add_rms_norm (EP over real ranks: tests/passes/test_moe_norm_fusion.py); fake shapes."""

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import ascend_graph.ops  # noqa: F401

ops = torch.ops.ascend_graph


def _inputs(dtype=torch.bfloat16, t=11, h=40, i=18, e=6, k=2):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(t, h, generator=g).to(dtype)
    w = torch.rand(t, k, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    w13 = (torch.randn(e, 2 * i, h, generator=g) * 0.2).to(dtype)
    w2 = (torch.randn(e, h, i, generator=g) * 0.2).to(dtype)
    residual = torch.randn(t, h, generator=g).to(dtype)
    gamma = (1 + 0.1 * torch.randn(h, generator=g)).to(dtype)
    active = torch.arange(t) % 4 != 1
    return x, w, ids, w13, w2, residual, gamma, active


def test_reference_is_moe_then_add_rms_norm():
    x, w, ids, w13, w2, residual, gamma, active = _inputs()
    normed, s = ops.moe_combine_add_rms_norm(x, w, ids, w13, w2, residual, gamma, 1e-6, "silu", active)
    y = ops.moe_dispatch_ffn_combine(x, w, ids, w13, w2, "silu", active)
    ref_normed, ref_s = ops.add_rms_norm(y, residual, gamma, 1e-6, False)
    torch.testing.assert_close(s, ref_s, atol=0, rtol=0)
    torch.testing.assert_close(normed, ref_normed, atol=0, rtol=0)
    # and against plain torch: s = residual + moe(x), normed = gamma * rms(s)
    h = ref_s.float()
    torch.testing.assert_close(normed.float(), gamma.float() * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)), atol=3e-2, rtol=3e-2)
    assert torch.equal(s[~active], residual[~active])  # padding rows: no expert work, the residual passes


def test_fake_shapes_with_ep():
    x, w, ids, w13, w2, residual, gamma, _ = _inputs()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        normed, s = ops.moe_combine_add_rms_norm(*[mode.from_tensor(a) for a in (x, w, ids, w13[:3], w2[:3], residual, gamma)], 1e-6, "silu", None, "g", 2, 1)
    assert normed.shape == s.shape == x.shape and normed.dtype == s.dtype == x.dtype
