"""moe_dispatch_ffn_combine with expert biases and GptOss's clipped SwiGLU: the CPU
reference equals transformers' GptOss experts computed by hand; the CUDA path's
sort + GEMM implementation (run here on the CPU through its batched-GEMM branch) equals
the reference, padded rows included; weights given as transposed views are read in place."""

from __future__ import annotations

import pytest
import torch

from ascend_graph.ops import moe as moe_ops
from ascend_graph.ops.kernels.triton import moe as cuda_moe

T, H, I, E, K = 9, 16, 8, 4, 2


def _gpt_oss_inputs(dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(dtype=dtype, device=device)

    x = r(T, H)
    gate_up = r(E, H, 2 * I, scale=3.0)  # GptOss layout [E, H, 2I]; large enough to hit the clamps
    gate_up_bias, down, down_bias = r(E, 2 * I), r(E, I, H), r(E, H)
    ids = torch.randint(0, E, (T, K), generator=g).to(device)
    w = torch.rand(T, K, generator=g).to(dtype=dtype, device=device)
    return x, w, ids, gate_up, gate_up_bias, down, down_bias


def _gpt_oss_by_hand(x, w, ids, gate_up, gate_up_bias, down, down_bias, alpha=1.702, limit=7.0):
    """transformers' GptOssExperts.forward, token by token."""
    out = torch.zeros_like(x, dtype=torch.float32)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gu = x[t] @ gate_up[e] + gate_up_bias[e]
            gate, up = gu[::2].clamp(max=limit), gu[1::2].clamp(min=-limit, max=limit)
            h = (up + 1) * (gate * torch.sigmoid(gate * alpha))
            out[t] += ((h @ down[e] + down_bias[e]) * w[t, j]).float()
    return out.to(x.dtype)


def _op(x, w, ids, gate_up, gate_up_bias, down, down_bias, active=None):
    # the fusion's call: GptOss's [E, H, 2I] / [E, I, H] as transposed views (no copy)
    return torch.ops.ascend_graph.moe_dispatch_ffn_combine(
        x, w, ids, gate_up.transpose(1, 2), down.transpose(1, 2), "clipped_swiglu", active,
        None, None, None, "", 1, 0, None, gate_up_bias, down_bias, 1.702, 7.0,
    )


def test_reference_equals_gpt_oss_experts():
    args = _gpt_oss_inputs()
    torch.testing.assert_close(_op(*args), _gpt_oss_by_hand(*args), atol=1e-4, rtol=1e-4)


def test_biases_and_clamps_matter():
    """Dropping a bias or the clamp changes the result (the test can fail)."""
    x, w, ids, gu, gub, dn, dnb = _gpt_oss_inputs()
    ref = _op(x, w, ids, gu, gub, dn, dnb)
    assert (ref - _op(x, w, ids, gu, torch.zeros_like(gub), dn, dnb)).abs().max() > 1e-3
    assert (ref - _op(x, w, ids, gu, gub, dn, torch.zeros_like(dnb))).abs().max() > 1e-3
    loose = torch.ops.ascend_graph.moe_dispatch_ffn_combine(x, w, ids, gu.transpose(1, 2), dn.transpose(1, 2), "clipped_swiglu", None, None, None, None, "", 1, 0, None, gub, dnb, 1.702, 1e4)
    assert (ref - loose).abs().max() > 1e-3


def test_padded_rows_get_zeros():
    args = _gpt_oss_inputs()
    active = torch.tensor([True] * 6 + [False] * 3)
    out = _op(*args, active=active)
    assert torch.equal(out[6:], torch.zeros_like(out[6:]))
    torch.testing.assert_close(out[:6], _gpt_oss_by_hand(*args)[:6], atol=1e-4, rtol=1e-4)


def test_sorted_experts_path_with_biases_equals_reference():
    x, w, ids, gu, gub, dn, dnb = _gpt_oss_inputs()
    active = torch.tensor([True] * 7 + [False] * 2)
    out = cuda_moe.sorted_experts(x, w, ids, gu.transpose(1, 2), dn.transpose(1, 2), "clipped_swiglu", active, gub, dnb, 1.702, 7.0)
    torch.testing.assert_close(out, _op(x, w, ids, gu, gub, dn, dnb, active=active), atol=1e-4, rtol=1e-4)


def test_bad_bias_shape_is_a_typed_error():
    x, w, ids, gu, gub, dn, dnb = _gpt_oss_inputs()
    with pytest.raises(moe_ops.UnsupportedError) as e:
        _op(x, w, ids, gu, gub[:, :-1], dn, dnb)
    assert "w13_bias" in str(e.value.expected)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_equals_reference(dtype):
    args = _gpt_oss_inputs(dtype, "cuda")
    ref = _op(*[a.cpu() for a in args]).float()
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(_op(*args).float().cpu(), ref, atol=tol * ref.abs().max().item(), rtol=tol)
