"""Triton (CUDA) kernels of ``ops/norm_rope.py``: RMSNorm (with the residual add),
SiLU-and-mul, and q/k per-head RMSNorm + RoPE (with the paged KV write).

Each kernel reads its inputs once and writes its outputs once (memory-bound ops: the
achieved bandwidth is the figure of merit; ``benchmarks/norm_rope.py`` measures it).
Arithmetic is fp32 inside; the Llama-form RMSNorm rounds the normalised value to the
input dtype before the weight multiply, as HF does, so results stay within one bf16
ulp of the plain-torch references.

- RMSNorm: one program per row (``N`` up to 16k in one block; decode has few rows, so
  the row is the unit of parallelism).
- SiLU-and-mul: a 2-D grid of (row, column block).
- q/k norm + RoPE: one program per (token, head) over the q heads then the k heads
  (one launch for both, where HF runs ~6-12 small kernels); the rotation partner of
  element ``d`` is loaded with a second (cached) gather from the same head, so the head
  is normalised and rotated in registers. With the cache write, k heads also copy their
  v head, and both go to the slot ``slot_mapping[t]`` (skipped where it is negative).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _p2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _warps(block: int) -> int:
    return 1 if block <= 256 else 2 if block <= 1024 else 4 if block <= 4096 else 8 if block <= 8192 else 16


# --------------------------------------------------------------------------- RMSNorm


@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, N, sx, sr, sy, ss, eps, HAS_RES: tl.constexpr, GEMMA: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * sx + cols, mask=mask, other=0.0)
    if HAS_RES:
        # the residual sum is rounded to the input dtype, as the graph's add is
        x = (x.to(tl.float32) + tl.load(r_ptr + row * sr + cols, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(s_ptr + row * ss + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / N + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if GEMMA:
        y = xf * rstd * (1.0 + w)
    else:
        y = (xf * rstd).to(x.dtype).to(tl.float32) * w
    tl.store(y_ptr + row * sy + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _launch_rms(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, gemma: bool):
    N = x.shape[-1]
    x2 = _rows(x)
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    r2 = _rows(residual) if residual is not None else x2
    s = torch.empty((M, N), dtype=x.dtype, device=x.device) if residual is not None else y
    block = _p2(N)
    if M:
        _rms_norm_kernel[(M,)](
            x2, r2, weight, y, s, N, x2.stride(0), r2.stride(0), y.stride(0), s.stride(0), float(eps),
            HAS_RES=residual is not None, GEMMA=bool(gemma), BLOCK=block, num_warps=_warps(block),
        )
    return y.view(x.shape), s.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool = False) -> torch.Tensor:
    return _launch_rms(x, None, weight, eps, gemma)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool = False):
    return _launch_rms(x, residual, weight, eps, gemma)


# --------------------------------------------------------------------------- SiLU and mul


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, y_ptr, D, sg, su, sy, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    g = tl.load(g_ptr + row * sg + cols, mask=mask, other=0.0)
    u = tl.load(u_ptr + row * su + cols, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    # silu rounded to the input dtype before the multiply (eager's two ops)
    a = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
    tl.store(y_ptr + row * sy + cols, (a * u.to(tl.float32)).to(y_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for same-shape operands whose last dim is contiguous (views allowed)."""
    D = gate.shape[-1]
    g2, u2 = gate.reshape(-1, D), up.reshape(-1, D)
    if g2.stride(-1) != 1:
        g2 = g2.contiguous()
    if u2.stride(-1) != 1:
        u2 = u2.contiguous()
    M = g2.shape[0]
    y = torch.empty((M, D), dtype=gate.dtype, device=gate.device)
    block = min(_p2(D), 2048)
    if M:
        _silu_mul_kernel[(M, triton.cdiv(D, block))](g2, u2, y, D, g2.stride(0), u2.stride(0), y.stride(0), BLOCK=block, num_warps=_warps(block))
    return y.view(*gate.shape[:-1], D)


# --------------------------------------------------------------------------- q/k norm + RoPE


@triton.jit
def _norm_rope_head(src, dst, w_ptr, cos_row, sin_row, D, R, eps, HAS_W: tl.constexpr, GEMMA: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_D: tl.constexpr):
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    x = tl.load(src + d, mask=dm, other=0.0)
    in_rot = d < R
    if INTERLEAVED:
        partner = d ^ 1
        sign = tl.where((d % 2) == 0, -1.0, 1.0)
        cidx = d // 2
    else:
        half = R // 2
        partner = tl.where(d < half, d + half, d - half)
        sign = tl.where(d < half, -1.0, 1.0)
        cidx = tl.where(d < half, d, d - half)  # both halves share frequency d mod R/2
    pm = dm & in_rot
    xp = tl.load(src + partner, mask=pm, other=0.0)
    xf = x.to(tl.float32)
    xpf = xp.to(tl.float32)
    if HAS_W:
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / D + eps)
        w = tl.load(w_ptr + d, mask=dm, other=0.0).to(tl.float32)
        wp = tl.load(w_ptr + partner, mask=pm, other=0.0).to(tl.float32)
        if GEMMA:
            xf = (xf * rstd * (1.0 + w)).to(x.dtype).to(tl.float32)
            xpf = (xpf * rstd * (1.0 + wp)).to(x.dtype).to(tl.float32)
        else:
            xf = ((xf * rstd).to(x.dtype).to(tl.float32) * w).to(x.dtype).to(tl.float32)
            xpf = ((xpf * rstd).to(x.dtype).to(tl.float32) * wp).to(x.dtype).to(tl.float32)
    c = tl.load(cos_row + cidx, mask=pm, other=1.0).to(tl.float32)
    s = tl.load(sin_row + cidx, mask=pm, other=0.0).to(tl.float32)
    out = tl.where(in_rot, xf * c + sign * xpf * s, xf)
    tl.store(dst + d, out.to(dst.dtype.element_ty), mask=dm)


@triton.jit
def _qk_norm_rope_kernel(
    q_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, vo_ptr, slot_ptr,
    Hq, D, R, eps,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sc_t, ss_t, sqo_t, sqo_h, sko_t, sko_h, block_size, sko_b, svo_t, svo_h, svo_b,
    HAS_QW: tl.constexpr, HAS_KW: tl.constexpr, GEMMA: tl.constexpr, INTERLEAVED: tl.constexpr, CACHE: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    cos_row = cos_ptr + t * sc_t
    sin_row = sin_ptr + t * ss_t
    if h < Hq:
        _norm_rope_head(q_ptr + t * sq_t + h * sq_h, qo_ptr + t * sqo_t + h * sqo_h, qw_ptr, cos_row, sin_row, D, R, eps, HAS_QW, GEMMA, INTERLEAVED, BLOCK_D)
    else:
        j = h - Hq
        if CACHE:
            slot = tl.load(slot_ptr + t).to(tl.int64)
            if slot >= 0:
                blk = slot // block_size
                off = slot % block_size
                _norm_rope_head(k_ptr + t * sk_t + j * sk_h, ko_ptr + blk * sko_b + off * sko_t + j * sko_h, kw_ptr, cos_row, sin_row, D, R, eps, HAS_KW, GEMMA, INTERLEAVED, BLOCK_D)
                d = tl.arange(0, BLOCK_D)
                v = tl.load(v_ptr + t * sv_t + j * sv_h + d, mask=d < D)
                tl.store(vo_ptr + blk * svo_b + off * svo_t + j * svo_h + d, v.to(vo_ptr.dtype.element_ty), mask=d < D)
        else:
            _norm_rope_head(k_ptr + t * sk_t + j * sk_h, ko_ptr + t * sko_t + j * sko_h, kw_ptr, cos_row, sin_row, D, R, eps, HAS_KW, GEMMA, INTERLEAVED, BLOCK_D)


def _heads(x: torch.Tensor) -> torch.Tensor:
    """``[..., H, D] -> [T, H, D]`` without a copy where the strides allow; D contiguous."""
    x3 = x.reshape(-1, x.shape[-2], x.shape[-1])
    return x3 if x3.stride(-1) == 1 else x3.contiguous()


def _table(c: torch.Tensor, lead: tuple[int, ...]) -> torch.Tensor:
    """cos/sin ``[..., R]`` (dims of 1 broadcast over ``lead``) -> ``[T, R]`` (a view where the strides allow)."""
    c2 = c.expand(*lead, c.shape[-1]).reshape(-1, c.shape[-1])
    return c2 if c2.stride(-1) == 1 else c2.contiguous()


def _launch_qk(q3, k3, v3, qw, kw, cos2, sin2, qo, ko, vo, slots, eps, gemma, interleaved, R):
    """Only the first R/2 table columns are read: one per frequency, in either table layout."""
    T, Hq, D = q3.shape
    Hk = k3.shape[1]
    cache = slots is not None
    if cache:
        block_size, sko_b, sko_t, sko_h = ko.shape[1], ko.stride(0), ko.stride(1), ko.stride(2)
        svo_b, svo_t, svo_h = vo.stride(0), vo.stride(1), vo.stride(2)
        sv_t, sv_h = v3.stride(0), v3.stride(1)
    else:
        block_size, sko_b, sko_t, sko_h = 1, 0, ko.stride(0), ko.stride(1)
        svo_b = svo_t = svo_h = sv_t = sv_h = 0
        v3, vo, slots = q3, qo, cos2  # unused pointers (CACHE is off)
    block_d = _p2(D)
    if T:
        _qk_norm_rope_kernel[(T, Hq + Hk)](
            q3, k3, v3, qw if qw is not None else q3, kw if kw is not None else q3, cos2, sin2, qo, ko, vo, slots,
            Hq, D, R, float(eps),
            q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1), sv_t, sv_h, cos2.stride(0), sin2.stride(0),
            qo.stride(0), qo.stride(1), sko_t, sko_h, block_size, sko_b, svo_t, svo_h, svo_b,
            HAS_QW=qw is not None, HAS_KW=kw is not None, GEMMA=bool(gemma), INTERLEAVED=bool(interleaved), CACHE=cache,
            BLOCK_D=block_d, num_warps=1 if block_d <= 128 else 2,
        )


def qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps, gemma=False, interleaved=False, rotary_dim=0):
    q3, k3 = _heads(q), _heads(k)
    qo = torch.empty(q3.shape, dtype=q.dtype, device=q.device)
    ko = torch.empty(k3.shape, dtype=k.dtype, device=k.device)
    lead = tuple(q.shape[:-2])
    _launch_qk(q3, k3, None, q_weight, k_weight, _table(cos, lead), _table(sin, lead), qo, ko, None, None, eps, gemma, interleaved, rotary_dim or cos.shape[-1])
    return qo.view(q.shape), ko.view(k.shape)


def norm_rope(x, weight, cos, sin, eps, gemma=False, interleaved=False, rotary_dim=0):
    """One tensor: the q/k kernel with no k heads (one program per (token, head))."""
    x3 = _heads(x)
    out = torch.empty(x3.shape, dtype=x.dtype, device=x.device)
    lead = tuple(x.shape[:-2])
    none = x3[:, :0]
    _launch_qk(x3, none, None, weight, None, _table(cos, lead), _table(sin, lead), out, none, None, None, eps, gemma, interleaved, rotary_dim or cos.shape[-1])
    return out.view(x.shape)


def qk_norm_rope_cache(qkv, q_weight, k_weight, cos, sin, k_cache, v_cache, slot_mapping, num_q_heads, num_kv_heads, eps, gemma=False, interleaved=False, rotary_dim=0):
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    T, width = qkv.shape
    D = width // (num_q_heads + 2 * num_kv_heads)
    q3 = qkv[:, : num_q_heads * D].view(T, num_q_heads, D)
    k3 = qkv[:, num_q_heads * D : (num_q_heads + num_kv_heads) * D].view(T, num_kv_heads, D)
    v3 = qkv[:, (num_q_heads + num_kv_heads) * D :].view(T, num_kv_heads, D)
    qo = torch.empty((T, num_q_heads, D), dtype=qkv.dtype, device=qkv.device)
    _launch_qk(q3, k3, v3, q_weight, k_weight, _table(cos, (T,)), _table(sin, (T,)), qo, k_cache, v_cache, slot_mapping, eps, gemma, interleaved, rotary_dim or cos.shape[-1])
    return qo
