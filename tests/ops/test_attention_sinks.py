"""Dense attention with sinks through SDPA's fused kernels (kernels/triton/attention_sinks.py)
equals the plain reference: masks (bool with an empty row, additive broadcast over the
batch), bottom-right causal with a window, GQA, decode; on the CPU and (marked) CUDA."""

from __future__ import annotations

import pytest
import torch

from ascend_graph.ops.attention import attention_reference, dense_attention_sdpa

CASES = [
    # nq, nkv, sq, skv, causal, window, mask
    (4, 2, 17, 17, True, -1, None),
    (4, 2, 5, 9, True, 3, None),
    (4, 4, 17, 17, False, -1, "bool"),
    (4, 2, 17, 17, False, -1, "float"),
    (4, 2, 1, 9, True, -1, None),
]


def _case(nq, nkv, sq, skv, mask_kind, dtype, device):
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype=dtype, device=device)

    q, k, v = r(3, sq, nq, 16).transpose(1, 2), r(3, skv, nkv, 16).transpose(1, 2), r(3, skv, nkv, 16).transpose(1, 2)
    mask = None
    if mask_kind == "bool":
        mask = (torch.rand(3, 1, sq, skv, generator=g) > 0.3).to(device)
        mask[1] = False  # a padded request: every row empty, zeros out (the sink takes it all)
    elif mask_kind == "float":
        mask = torch.zeros(1, 1, sq, skv).masked_fill(torch.rand(sq, skv, generator=g) > 0.7, float("-inf")).to(dtype=dtype, device=device)
    return q, k, v, mask, r(nq) * 2


def _check(device, dtype, tol):
    for nq, nkv, sq, skv, causal, window, mask_kind in CASES:
        q, k, v, mask, sinks = _case(nq, nkv, sq, skv, mask_kind, dtype, device)
        ref = attention_reference(q, k, v, mask, sinks, 0.25, causal, window)
        out = dense_attention_sdpa(q, k, v, mask, sinks, 0.25, causal, window)
        assert out.shape == ref.shape and out.stride() == ref.stride() and out.dtype == ref.dtype
        torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sinks_through_fused_kernel_equal_reference(dtype):
    _check("cpu", dtype, 1e-5 if dtype == torch.float32 else 2e-2)


def test_sinks_change_the_output():
    """The rescale is not a no-op: without sinks the result differs (a test that can fail)."""
    q, k, v, mask, sinks = _case(4, 2, 17, 17, None, torch.float32, "cpu")
    with_sinks = dense_attention_sdpa(q, k, v, mask, sinks, 0.25, True, -1)
    without = dense_attention_sdpa(q, k, v, mask, None, 0.25, True, -1)
    assert (with_sinks - without).abs().max() > 1e-3


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sinks_cuda_efficient_kernel_equal_reference(dtype):
    _check("cuda", dtype, 1e-4 if dtype == torch.float32 else 2e-2)
