"""The norm/RoPE/SwiGLU ops: references against HF's own modules, fake impls, the Triton
kernels (CPU interpreter in a subprocess; CUDA on the GPU machine), the NPU binding cases."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from ascend_graph.errors import UnsupportedError
from ascend_graph.ops import norm_rope as ops

transformers = pytest.importorskip("transformers")


def test_rms_norm_reference_is_hf_llama_and_gemma():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    x = torch.randn(3, 5, 72, dtype=torch.bfloat16)
    llama = LlamaRMSNorm(72, eps=1e-6).to(torch.bfloat16)
    gemma = Gemma3RMSNorm(72, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        llama.weight.normal_()
        gemma.weight.normal_()
        assert torch.equal(ops.rms_norm(x, llama.weight, 1e-6), llama(x))
        assert torch.equal(ops.rms_norm(x, gemma.weight, 1e-6, True), gemma(x))
        r = torch.randn_like(x)
        y, s = ops.add_rms_norm(x, r, llama.weight, 1e-6)
        assert torch.equal(s, x + r) and torch.equal(y, llama(x + r))


def test_rope_reference_is_hf_neox_and_gptj_pairs():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(0)
    q, k = torch.randn(2, 5, 3, 16), torch.randn(2, 5, 1, 16)
    ang = torch.randn(2, 5, 8)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    hq, hk = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    oq, ok = ops.qk_norm_rope(q, k, None, None, cos, sin, 1e-6)
    torch.testing.assert_close(oq, hq.transpose(1, 2))
    torch.testing.assert_close(ok, hk.transpose(1, 2))
    # interleaved: pair (2i, 2i+1) is the complex number rotated by angle i
    oq, _ = ops.qk_norm_rope(q, k, None, None, cos, sin, 1e-6, False, True)
    z = torch.view_as_complex(q.view(2, 5, 3, 8, 2).contiguous()) * torch.polar(torch.ones_like(ang), ang).unsqueeze(2)
    torch.testing.assert_close(oq, torch.view_as_real(z).flatten(-2))
    # vLLM's table (one column per frequency) gives the same as HF's duplicated one
    hq2, _ = ops.qk_norm_rope(q, k, None, None, ang.cos(), ang.sin(), 1e-6, False, False, 16)
    torch.testing.assert_close(hq2, hq.transpose(1, 2))
    # partial rotary (R = 8 < D = 16): the last 8 dims pass through
    oq, _ = ops.qk_norm_rope(q, k, None, None, cos[..., :8], sin[..., :8], 1e-6)
    assert torch.equal(oq[..., 8:], q[..., 8:])


def test_cache_op_writes_slots_and_skips_padding():
    torch.manual_seed(0)
    T, Hq, Hk, D = 5, 4, 2, 16
    qkv = torch.randn(T, (Hq + 2 * Hk) * D)
    qw, kw = torch.randn(D), torch.randn(D)
    cos, sin = torch.randn(T, D), torch.randn(T, D)
    kc, vc = torch.zeros(3, 4, Hk, D), torch.zeros(3, 4, Hk, D)
    slots = torch.tensor([0, 5, -1, 11, 2])
    q = ops.qk_norm_rope_cache(qkv, qw, kw, cos, sin, kc, vc, slots, Hq, Hk, 1e-6)
    q_ref, k_ref = ops.qk_norm_rope_reference(qkv[:, : Hq * D].view(T, Hq, D), qkv[:, Hq * D : (Hq + Hk) * D].view(T, Hk, D), qw, kw, cos, sin, 1e-6)
    torch.testing.assert_close(q, q_ref)
    torch.testing.assert_close(kc[1, 1], k_ref[1])
    torch.testing.assert_close(vc[2, 3], qkv[3, (Hq + Hk) * D :].view(Hk, D))
    assert int((kc.flatten(0, 1).abs().sum((-1, -2)) > 0).sum()) == 4  # the padded token wrote nothing


def test_fake_impls_and_opcheck():
    x, w = torch.randn(3, 7, 40), torch.randn(40)
    torch.library.opcheck(ops.rms_norm, (x, w, 1e-5, False))
    torch.library.opcheck(ops.add_rms_norm, (x, torch.randn_like(x), w, 1e-5, True))
    torch.library.opcheck(ops.silu_and_mul, (torch.randn(3, 10),))
    torch.library.opcheck(ops.silu_mul, (torch.randn(3, 5), torch.randn(3, 5)))
    q, k, cs = torch.randn(2, 3, 4, 16), torch.randn(2, 3, 2, 16), torch.randn(2, 3, 12)
    torch.library.opcheck(ops.qk_norm_rope, (q, k, torch.randn(16), None, cs, cs, 1e-6, False, False))
    torch.library.opcheck(ops.norm_rope, (q, torch.randn(16), cs[..., :6], cs[..., :6], 1e-6, False, False, 12))
    kc = torch.zeros(2, 4, 2, 16)
    torch.library.opcheck(ops.qk_norm_rope_cache, (torch.randn(3, 128), None, None, torch.randn(3, 16), torch.randn(3, 16), kc, kc.clone(), torch.tensor([1, -1, 6]), 4, 2, 1e-6))


def test_bad_shapes_are_typed_errors():
    with pytest.raises(UnsupportedError, match="weight must be"):
        ops.rms_norm(torch.randn(3, 8), torch.randn(7), 1e-6)
    with pytest.raises(UnsupportedError, match="R even"):
        ops.qk_norm_rope(torch.randn(2, 4, 16), torch.randn(2, 2, 16), None, None, torch.randn(2, 18), torch.randn(2, 18), 1e-6)


_TRITON_SCRIPT = textwrap.dedent(
    """
    import torch
    from ascend_graph.ops import norm_rope as ops
    from ascend_graph.ops.kernels.triton import norm_rope as tk
    torch.manual_seed(0)
    worst = 0.0
    def err(a, b):
        global worst
        worst = max(worst, (a.float() - b.float()).abs().max().item())
    x, r, w = torch.randn(3, 37), torch.randn(3, 37), torch.randn(37)
    for gemma in (False, True):
        err(tk.rms_norm(x, w, 1e-6, gemma), ops.rms_norm_reference(x, w, 1e-6, gemma))
        y, s = tk.add_rms_norm(x, r, w, 1e-6, gemma)
        err(y, ops.rms_norm_reference(x + r, w, 1e-6, gemma)); err(s, x + r)
    g = torch.randn(2, 3, 50)
    err(tk.silu_mul(g[..., :25], g[..., 25:]), torch.nn.functional.silu(g[..., :25]) * g[..., 25:])
    q, k = torch.randn(2, 3, 5, 24), torch.randn(2, 3, 2, 24)
    for R in (24, 16):
        hc, hs = torch.randn(1, 3, R // 2), torch.randn(1, 3, R // 2)  # batch-broadcast tables
        tables = ((torch.cat((hc, hc), -1), torch.cat((hs, hs), -1), 0), (hc, hs, R))  # HF's, vLLM's halves
        for cs, sn, rdim in tables:
            for inter in (False, True):
                for qw, kw in ((torch.randn(24), torch.randn(24)), (None, None)):
                    for gemma in (False, True):
                        a = tk.qk_norm_rope(q, k, qw, kw, cs, sn, 1e-6, gemma, inter, rdim)
                        b = ops.qk_norm_rope_reference(q, k, qw, kw, cs, sn, 1e-6, gemma, inter, rdim)
                        err(a[0], b[0]); err(a[1], b[1])
                        err(tk.norm_rope(k, kw, cs, sn, 1e-6, gemma, inter, rdim), b[1])
    T, Hq, Hk, D = 4, 3, 2, 24
    qkv = torch.randn(T, (Hq + 2 * Hk) * D)
    cs, sn = torch.randn(T, D // 2), torch.randn(T, D // 2)
    k1, v1 = torch.zeros(2, 4, Hk, D), torch.zeros(2, 4, Hk, D)
    k2, v2 = k1.clone(), v1.clone()
    slots = torch.tensor([7, -1, 0, 3])
    qw = torch.randn(D)
    qa = tk.qk_norm_rope_cache(qkv, qw, None, cs, sn, k1, v1, slots, Hq, Hk, 1e-6, False, False, D)
    qb = ops.qk_norm_rope_cache_reference(qkv, qw, None, cs, sn, k2, v2, slots, Hq, Hk, 1e-6, False, False, D)
    err(qa, qb); err(k1, k2); err(v1, v2)
    print("WORST", worst)
    """
)


def test_triton_kernels_match_reference_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    worst = float(proc.stdout.split("WORST")[-1])
    assert worst < 1e-4


def test_npu_binding_cases_have_our_fake_shapes():
    """The META_CHECKS rows claim our fake impls' shapes: hold them to the fakes here."""
    from ascend_graph.ops.kernels.npu import norm_rope as npu

    expected, args, _ = npu._case_rms()
    assert [tuple(ops.rms_norm(args[0].float(), args[1].float(), 1e-6).shape)] == expected
    expected, args, _ = npu._case_add_rms()
    y, s = ops.add_rms_norm(args[0].float(), args[1].float(), args[2].float(), 1e-6)
    assert [tuple(y.shape), tuple(s.shape)] == [expected[0], expected[2]]
    expected, args, _ = npu._case_swiglu()
    assert [tuple(ops.silu_and_mul(args[0].float()).shape)] == expected


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernels_match_reference(dtype):
    torch.manual_seed(0)
    dev = "cuda"
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
    x, r = torch.randn(7, 4097, device=dev, dtype=dtype), torch.randn(7, 4097, device=dev, dtype=dtype)
    w = torch.randn(4097, device=dev, dtype=dtype)
    for gemma in (False, True):
        torch.testing.assert_close(ops.rms_norm(x, w, 1e-6, gemma), ops.rms_norm_reference(x, w, 1e-6, gemma), **tol)
        y, s = ops.add_rms_norm(x, r, w, 1e-6, gemma)
        torch.testing.assert_close(y, ops.rms_norm_reference(x + r, w, 1e-6, gemma), **tol)
        torch.testing.assert_close(s, x + r, **tol)
    g = torch.randn(5, 2 * 3001, device=dev, dtype=dtype)
    torch.testing.assert_close(ops.silu_and_mul(g), F.silu(g[:, :3001]) * g[:, 3001:], **tol)
    q, k = torch.randn(3, 1, 32, 128, device=dev, dtype=dtype), torch.randn(3, 1, 8, 128, device=dev, dtype=dtype)
    qw, kw = torch.randn(128, device=dev, dtype=dtype), torch.randn(128, device=dev, dtype=dtype)
    for R, inter in ((128, False), (64, False), (64, True)):
        hc, hs = torch.randn(3, 1, R // 2, device=dev, dtype=dtype), torch.randn(3, 1, R // 2, device=dev, dtype=dtype)
        cs, sn = torch.cat((hc, hc), -1), torch.cat((hs, hs), -1)
        a = ops.qk_norm_rope(q, k, qw, kw, cs, sn, 1e-6, False, inter)
        b = ops.qk_norm_rope_reference(q, k, qw, kw, cs, sn, 1e-6, False, inter)
        torch.testing.assert_close(a[0], b[0], **tol)
        torch.testing.assert_close(a[1], b[1], **tol)
        torch.testing.assert_close(ops.norm_rope(q, qw, hc, hs, 1e-6, False, inter, R), ops.qk_norm_rope_reference(q, k, qw, kw, hc, hs, 1e-6, False, inter, R)[0], **tol)
    T, Hq, Hk, D = 9, 32, 8, 128
    qkv = torch.randn(T, (Hq + 2 * Hk) * D, device=dev, dtype=dtype)
    cs, sn = torch.randn(T, D // 2, device=dev, dtype=dtype), torch.randn(T, D // 2, device=dev, dtype=dtype)
    k1 = torch.zeros(4, 16, Hk, D, device=dev, dtype=dtype)
    v1, k2, v2 = k1.clone(), k1.clone(), k1.clone()
    slots = torch.tensor([3, -1, 17, 40, 63, 0, 5, 22, 9], device=dev)
    qa = ops.qk_norm_rope_cache(qkv, qw, kw, cs, sn, k1, v1, slots, Hq, Hk, 1e-6, False, False, D)
    qb = ops.qk_norm_rope_cache_reference(qkv, qw, kw, cs, sn, k2, v2, slots, Hq, Hk, 1e-6, False, False, D)
    torch.testing.assert_close(qa, qb, **tol)
    torch.testing.assert_close(k1, k2, **tol)
    assert torch.equal(v1, v2)
