"""The attention contracts: the CPU ops against attention written out in float64
(tests/attention_reference.py: on the CPU the op *is* SDPA, so SDPA cannot be its
reference), fake impls, the Triton kernels (under TRITON_INTERPRET=1 on the CPU, natively
on CUDA) against the package's reference, itself held to the float64 math here."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ascend_graph.errors import UnsupportedError
from ascend_graph.ops import attention as ops
from tests.attention_reference import assert_close_f64, attention_f64, causal_keep


def _rand(*shape, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(*shape, dtype=dtype, device=device, generator=g)


def _paged_case(device="cpu", dtype=torch.float32, nq=6, nkv=2, d=48, dv=32, page=8, q_lens=(3, 1, 5), kv_lens=(13, 1, 30)):
    r, max_blocks, num_blocks = len(q_lens), 5, 20
    kc, vc = _rand(num_blocks, page, nkv, d, dtype=dtype, device=device, seed=1), _rand(num_blocks, page, nkv, dv, dtype=dtype, device=device, seed=2)
    bt = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(3))[: r * max_blocks].view(r, max_blocks).int().to(device)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    t = int(cu[-1]) + 2  # two padded rows past cu[-1]
    q = _rand(t, nq, d, dtype=dtype, device=device, seed=4)
    return q, kc, vc, bt, cu, torch.tensor(kv_lens, dtype=torch.int32, device=device)


# --------------------------------------------------------------------------- dense


@pytest.mark.parametrize("nkv", [5, 1])
def test_dense_matches_float64_math_with_gqa_and_mask(nkv):
    q, k, v = _rand(2, 5, 3, 16), _rand(2, nkv, 11, 16, seed=1), _rand(2, nkv, 11, 16, seed=2)
    mask = _rand(2, 1, 3, 11, seed=3) > -0.5
    mask[..., 0] = True
    out = ops.attention(q, k, v, mask, None, 0.3, False, -1)
    assert_close_f64(out, attention_f64(q, k, v, scale=0.3, keep=mask))
    # an additive (float) mask is added to the scores
    bias = _rand(2, 1, 3, 11, seed=4)
    assert_close_f64(ops.attention(q, k, v, bias, None, 0.3, False, -1), attention_f64(q, k, v, scale=0.3, bias=bias))
    # SDPA's layout: [B, S, N, D] storage, BNSD view
    assert out.transpose(1, 2).is_contiguous()


def test_dense_causal_is_bottom_right_and_window_limits_keys():
    q, k, v = _rand(1, 2, 3, 16), _rand(1, 2, 7, 16, seed=1), _rand(1, 2, 7, 16, seed=2)
    causal = ops.attention(q, k, v, None, None, 0.25, True, -1)
    assert_close_f64(causal, attention_f64(q, k, v, scale=0.25, keep=causal_keep(3, 7)))
    window = ops.attention(q, k, v, None, None, 0.25, True, 2)
    assert_close_f64(window, attention_f64(q, k, v, scale=0.25, keep=causal_keep(3, 7, window=2)))
    assert not torch.allclose(causal, window)
    # causal and a mask together: both apply
    mask = _rand(1, 1, 3, 7, seed=3) > 0
    mask[..., -1] = True
    both = ops.attention(q, k, v, mask, None, 0.25, True, -1)
    assert_close_f64(both, attention_f64(q, k, v, scale=0.25, keep=causal_keep(3, 7) & mask))
    # one query (decode): bottom-right causal sees every key, a window shorter than the keys does not
    q1 = q[:, :, -1:]
    everything = attention_f64(q1, k, v, scale=0.25)
    assert_close_f64(ops.attention(q1, k, v, None, None, 0.25, True, -1), everything)
    assert_close_f64(ops.attention(q1, k, v, None, None, 0.25, True, 7), everything)
    assert_close_f64(ops.attention(q1, k, v, None, None, 0.25, True, 2), attention_f64(q1, k[:, :, -2:], v[:, :, -2:], scale=0.25))


def test_dense_sinks_enlarge_the_denominator_only():
    q, k, v = _rand(1, 2, 4, 16), _rand(1, 2, 4, 16, seed=1), _rand(1, 2, 4, 16, seed=2)
    sinks = torch.tensor([0.5, -1.0])
    out = ops.attention(q, k, v, None, sinks, 0.25, False, -1)
    logits = (q.double() @ k.double().transpose(-1, -2)) * 0.25
    num = torch.exp(logits)
    den = num.sum(-1, keepdim=True) + torch.exp(sinks.double()).view(1, 2, 1, 1)
    assert_close_f64(out, (num / den) @ v.double())
    assert_close_f64(out, attention_f64(q, k, v, scale=0.25, sinks=sinks))


def test_package_reference_matches_float64_math_and_zeroes_empty_rows():
    """ops.attention_reference is the ground truth of the CUDA/NPU tests: hold it to the
    float64 math too, including a row that may see no key (zeros, as FIA gives)."""
    q, k, v = _rand(2, 6, 5, 16), _rand(2, 2, 9, 16, seed=1), _rand(2, 2, 9, 8, seed=2)
    mask = _rand(2, 1, 5, 9, seed=3) > 0
    mask[0, 0, 2] = False  # query 2 of batch 0 sees nothing
    sinks = torch.linspace(-1, 1, 6)
    for m, s, causal, window in ((mask, None, False, -1), (None, sinks, True, 3), (mask, sinks, True, -1)):
        keep = causal_keep(5, 9, window=window if window > 0 else None) if causal else None
        if m is not None:
            keep = m if keep is None else keep & m
        got = ops.attention_reference(q, k, v, m, s, 0.2, causal, window)
        assert_close_f64(got, attention_f64(q, k, v, scale=0.2, keep=keep, sinks=s))
    empty = ops.attention_reference(q, k, v, mask, None, 0.2, False, -1)[0, :, 2]
    assert torch.count_nonzero(empty) == 0


def test_dense_mla_value_dim_and_fake_shape():
    q, k, v = _rand(2, 4, 5, 48), _rand(2, 4, 5, 48, seed=1), _rand(2, 4, 5, 32, seed=2)
    out = ops.attention(q, k, v, None, None, 0.2, True, -1)
    assert out.shape == (2, 4, 5, 32)
    with torch._subclasses.FakeTensorMode() as mode:
        fake = ops.attention(*(mode.from_tensor(x) for x in (q, k, v)), None, None, 0.2, True, -1)
    assert fake.shape == out.shape and fake.stride() == out.stride()


def test_dense_rejects_bad_head_counts():
    with pytest.raises(UnsupportedError) as e:
        ops.attention(_rand(1, 5, 2, 16), _rand(1, 2, 2, 16), _rand(1, 2, 2, 16), None, None, 1.0, False, -1)
    assert e.value.got == (5, 2)


# --------------------------------------------------------------------------- paged / cache


def test_paged_matches_float64_math_per_request_and_zeroes_padding():
    q, kc, vc, bt, cu, kl = _paged_case()
    out = ops.paged_attention(q, kc, vc, bt, cu, kl, None, 0.2, -1)
    assert out.shape == (q.shape[0], 6, 32)
    assert torch.count_nonzero(out[int(cu[-1]) :]) == 0
    # each request: its query rows against its first kv_len cache slots, gathered by hand
    # (block j of request r is cache block bt[r, j]; slot p is block p // 8, offset p % 8)
    for r, (start, end, kv_len) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), kl.tolist())):
        slots = torch.arange(kv_len)
        blocks = bt[r].long()[slots // 8]
        k = kc[blocks, slots % 8].transpose(0, 1)[None]  # [1, Nkv, kv_len, D]
        v = vc[blocks, slots % 8].transpose(0, 1)[None]
        qr = q[start:end].transpose(0, 1)[None]
        ref = attention_f64(qr, k, v, scale=0.2, keep=causal_keep(end - start, kv_len))
        assert_close_f64(out[start:end], ref[0].transpose(0, 1))


def test_reshape_and_cache_skips_negative_slots_in_graph():
    kc, vc = torch.zeros(3, 4, 2, 8), torch.zeros(3, 4, 2, 8)
    k, v = _rand(4, 2, 8), _rand(4, 2, 8, seed=1)
    slots = torch.tensor([5, -1, 0, 11])
    torch.ops.ascend_graph.reshape_and_cache(k, v, kc, vc, slots)
    torch.testing.assert_close(kc.view(12, 2, 8)[[5, 0, 11]], k[[0, 2, 3]])
    torch.testing.assert_close(vc.view(12, 2, 8)[[5, 0, 11]], v[[0, 2, 3]])
    assert torch.count_nonzero(kc.view(12, 2, 8)[[1, 2, 3, 4, 6, 7, 8, 9, 10]]) == 0


_INTERPRET_SCRIPT = textwrap.dedent(
    """
    import torch
    from tests.ops.test_attention_ops import _paged_case
    from ascend_graph.ops import attention as ops
    from ascend_graph.ops.kernels.triton import attention as K
    q, kc, vc, bt, cu, kl = _paged_case()
    sinks = torch.tensor([0.5, -1.0, 0.0, 2.0, 1.0, -3.0])
    for window, s, splits in [(-1, None, 1), (7, sinks, 3), (-1, None, 4)]:
        ref = ops.paged_attention_reference(q, kc, vc, bt, cu, kl, s, 0.2, window)
        out = K.paged_attention_cuda(q, kc, vc, bt, cu, kl, s, 0.2, window, num_splits=splits)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    k, v = torch.randn(4, 2, 48), torch.randn(4, 2, 32)
    slots = torch.tensor([3, -1, 17, 40])
    a, b, c, d = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    ops.reshape_and_cache_reference(k, v, a, b, slots)
    K.reshape_and_cache_cuda(k, v, c, d, slots)
    assert torch.equal(a, c) and torch.equal(b, d)
    print("INTERPRETED-OK")
    """
)


def test_triton_kernels_under_interpreter():
    """The Triton paged kernel (1, 3, 4 splits; window; sinks; GQA; Dv != D; padded rows)
    and the cache write, run by Triton's CPU interpreter against the references."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root)
    proc = subprocess.run([sys.executable, "-c", _INTERPRET_SCRIPT], env=env, capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0 and "INTERPRETED-OK" in proc.stdout, proc.stderr[-3000:]


# --------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_paged_cuda_matches_reference(dtype):
    q, kc, vc, bt, cu, kl = _paged_case("cuda", dtype)
    for window in (-1, 7):
        out = ops.paged_attention(q, kc, vc, bt, cu, kl, None, 0.2, window)
        ref = ops.paged_attention_reference(q, kc, vc, bt, cu, kl, None, 0.2, window)
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
        torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


@pytest.mark.cuda
def test_paged_cuda_long_context_splits():
    q, kc, vc, bt, cu, kl = _paged_case("cuda", torch.bfloat16, nq=16, nkv=8, d=128, dv=128, page=16, q_lens=(1, 1), kv_lens=(70, 1))
    kc2 = _rand(600, 16, 8, 128, dtype=torch.bfloat16, device="cuda")
    vc2 = _rand(600, 16, 8, 128, dtype=torch.bfloat16, device="cuda", seed=5)
    bt2 = torch.randperm(600, device="cuda")[:512].view(2, 256).int()
    kl2 = torch.tensor([4093, 2000], dtype=torch.int32, device="cuda")
    q2 = q[:2].contiguous()
    cu2 = torch.tensor([0, 1, 2], dtype=torch.int32, device="cuda")
    out = ops.paged_attention(q2, kc2, vc2, bt2, cu2, kl2, None, 0.088, -1)
    ref = ops.paged_attention_reference(q2, kc2, vc2, bt2, cu2, kl2, None, 0.088, -1)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


@pytest.mark.cuda
def test_dense_and_cache_cuda_match_reference():
    q, k, v = (_rand(2, 8, 5, 64, dtype=torch.bfloat16, device="cuda", seed=i) for i in range(3))
    k, v = k[:, :2].contiguous(), v[:, :2].contiguous()
    mask = torch.rand(2, 1, 5, 5, device="cuda") > 0.3
    mask[..., 0] = True
    # GQA with a mask: kv heads expanded (the memory-efficient backend, not math)
    for causal, window, m in ((True, -1, None), (True, 3, None), (False, -1, None), (False, -1, mask), (True, -1, mask)):
        out = ops.attention(q, k, v, m, None, 0.125, causal, window)
        ref = ops.attention_reference(q, k, v, m, None, 0.125, causal, window)
        torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    q1 = q[:, :, -1:]
    torch.testing.assert_close(ops.attention(q1, k, v, mask[:, :, -1:], None, 0.125, True, -1), ops.attention_reference(q1, k, v, mask[:, :, -1:], None, 0.125, True, -1), atol=2e-2, rtol=2e-2)
    kc, vc = torch.zeros(3, 4, 2, 8, device="cuda"), torch.zeros(3, 4, 2, 8, device="cuda")
    kk, vv = _rand(4, 2, 8, device="cuda"), _rand(4, 2, 8, device="cuda", seed=1)
    slots = torch.tensor([5, -1, 0, 11], device="cuda")
    ops.reshape_and_cache(kk, vv, kc, vc, slots)
    torch.testing.assert_close(kc.view(12, 2, 8)[[5, 0, 11]], kk[[0, 2, 3]])


def test_split_plan_is_one_launch_when_the_grid_fills_the_gpu():
    """plan_splits (pure, static shapes): batch 16 x 8 KV heads on 132 SMs -> one split
    (the kernel finishes the softmax itself, no merge launch); batch 1 at 4k -> 16 splits
    of 4 tiles; never a split below the 2-tile floor; never more splits than tiles."""
    pytest.importorskip("triton")
    from ascend_graph.ops.kernels.triton.attention import plan_splits

    assert plan_splits(16, 8, 512, 64, 132) == (1, 512)
    assert plan_splits(64, 8, 4096, 64, 132) == (1, 4096)
    assert plan_splits(1, 8, 4096, 64, 132) == (16, 256)
    assert plan_splits(1, 8, 128, 64, 132) == (1, 128)  # 2 tiles: one split
    for t in range(1, 20):
        for ctx in (64, 200, 1000, 4096, 32768):
            splits, per = plan_splits(t, 8, ctx, 64, 132)
            assert splits >= 1 and per % 64 == 0 and splits * per >= ctx and (splits - 1) * per < ctx
            assert splits == 1 or per >= 2 * 64
