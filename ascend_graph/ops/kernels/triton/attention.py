"""CUDA implementations of the attention contracts (``ops/attention.py``).

- dense attention: ``torch.nn.functional.scaled_dot_product_attention`` (flash or
  memory-efficient backend, chosen by torch); bottom-right causal masks, windows and
  combined masks are built as a bool mask; sinks fall back to the reference (SDPA has
  no sink term).
- paged attention (TND): a Triton split-KV ("flash-decoding") kernel. Grid = (query
  token, KV head, split); each program walks its slice of the request's KV through
  the block table, handles every query head of its GQA group at once (K/V read once
  per group), and writes a partial (max, sum, acc). A second kernel merges the splits
  (and the sink logit). When one split covers the context (:func:`plan_splits`: the
  grid fills the GPU without splitting) the kernel finishes the softmax itself: one
  launch, no partials. The number of splits is a function of static shapes only (token
  count, KV heads, block-table width, SM count), so the launch is CUDA-graph safe and
  never reads device data on the host.
- reshape_and_cache: one Triton program per token, skipping ``slot < 0``.

Both take the caches by strides (block, slot, head; the head dim contiguous), so the
per-layer views of a cross-layer cache (``runtime/kv_layout.py``: block stride
``num_layers x`` a block, or the packed K|V layout's head stride ``D + Dv``) are read
and written in place, with no copy.

Triton is imported lazily by the callers (``ops/attention.py``); this module imports it
at the top because it is only loaded on CUDA (or under ``TRITON_INTERPRET=1`` for tests).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ....errors import UnsupportedError

__all__ = ["paged_attention_cuda", "reshape_and_cache_cuda", "plan_splits"]

log = logging.getLogger("ascend_graph.ops.triton.attention")


# --------------------------------------------------------------------------- dense


# --------------------------------------------------------------------------- paged


@triton.jit
def _paged_tile(q, KC, VC, BT, r, kvh, pos, lo, end, m_i, l_i, acc, scale,
                stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
                d, dv, D: tl.constexpr, DV: tl.constexpr, PAGE: tl.constexpr, PRECISION: tl.constexpr):
    """One KV tile of online softmax: positions ``pos`` of request ``r``, KV head ``kvh``."""
    in_range = pos < end
    keep = in_range & (pos >= lo)
    page = tl.load(BT + r * stride_bt + pos // PAGE, mask=in_range, other=0).to(tl.int64)
    slot = pos % PAGE
    k_ptr = KC + page[None, :] * stride_kb + slot[None, :] * stride_ks + kvh * stride_kh + d[:, None]
    kt = tl.load(k_ptr, mask=in_range[None, :] & (d[:, None] < D), other=0.0)
    qk = tl.dot(q, kt, input_precision=PRECISION) * scale
    qk = tl.where(keep[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(qk - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v_ptr = VC + page[:, None] * stride_vb + slot[:, None] * stride_vs + kvh * stride_vh + dv[None, :]
    vv = tl.load(v_ptr, mask=in_range[:, None] & (dv[None, :] < DV), other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _paged_split_kernel(
    Q, KC, VC, BT, CU, KVLEN, ACC, ML, SINKS, OUT,
    scale, window, num_reqs,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    stride_at, stride_ah, stride_as,
    stride_mt, stride_mh, stride_ms,
    stride_ot, stride_oh,
    tokens_per_split,
    DIRECT: tl.constexpr, HAS_SINKS: tl.constexpr,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr,
    D: tl.constexpr, D_P: tl.constexpr, DV: tl.constexpr, DV_P: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, R_P: tl.constexpr, PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    t = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    # Which request owns token t: count the cumulative ends <= t (R_P >= num_reqs).
    ridx = tl.arange(0, R_P)
    ends = tl.load(CU + 1 + ridx, mask=ridx < num_reqs, other=2147483647)
    r = tl.sum((ends <= t).to(tl.int32), axis=0)
    valid = r < num_reqs
    r_safe = tl.where(valid, r, 0)
    q_end = tl.load(CU + r_safe + 1)
    kv_len = tl.load(KVLEN + r_safe)
    # Keys visible to this token: positions [lo, hi) (bottom-right causal, optional window).
    hi = kv_len - (q_end - t) + 1
    hi = tl.where(valid, hi, 0)
    lo = tl.where(window > 0, tl.maximum(hi - window, 0), 0)

    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, hi)
    start = tl.maximum(start, (lo // BLOCK_N) * BLOCK_N)

    g = tl.arange(0, GROUP_P)
    heads = kvh * GROUP + g
    gmask = g < GROUP
    d = tl.arange(0, D_P)
    dv = tl.arange(0, DV_P)
    q = tl.load(Q + t * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=gmask[:, None] & (d[None, :] < D), other=0.0)

    m_i = tl.full([GROUP_P], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_P], tl.float32)
    acc = tl.zeros([GROUP_P, DV_P], tl.float32)
    n_off = tl.arange(0, BLOCK_N)
    if INTERPRET:
        # The CPU interpreter hands out program ids as 1-element arrays, which range()
        # cannot take; a while loop is the same walk (compiled code keeps the for loop,
        # which Triton software-pipelines).
        n0 = start
        while n0 < end:
            m_i, l_i, acc = _paged_tile(q, KC, VC, BT, r_safe, kvh, n0 + n_off, lo, end, m_i, l_i, acc, scale,
                                        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
                                        d, dv, D, DV, PAGE, PRECISION)
            n0 += BLOCK_N
    else:
        for n0 in range(start, end, BLOCK_N):
            m_i, l_i, acc = _paged_tile(q, KC, VC, BT, r_safe, kvh, n0 + n_off, lo, end, m_i, l_i, acc, scale,
                                        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
                                        d, dv, D, DV, PAGE, PRECISION)

    if DIRECT:
        # One split covers the whole context: finish the softmax here (the sink logit
        # joins the denominator), no partials, no merge launch.
        m_max = m_i
        if HAS_SINKS:
            sink = tl.load(SINKS + heads, mask=gmask, other=float("-inf")).to(tl.float32)
            m_max = tl.maximum(m_max, sink)
        m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
        w = tl.exp(m_i - m_max)
        denom = l_i * w
        if HAS_SINKS:
            denom += tl.exp(sink - m_max)
        o = acc * (w / tl.where(denom > 0, denom, 1.0))[:, None]
        o_ptr = OUT + t * stride_ot + heads[:, None] * stride_oh + dv[None, :]
        tl.store(o_ptr, o.to(OUT.dtype.element_ty), mask=gmask[:, None] & (dv[None, :] < DV))
    else:
        acc_ptr = ACC + t * stride_at + heads[:, None] * stride_ah + split * stride_as + dv[None, :]
        tl.store(acc_ptr, acc, mask=gmask[:, None] & (dv[None, :] < DV))
        ml_ptr = ML + t * stride_mt + heads * stride_mh + split * stride_ms
        tl.store(ml_ptr, m_i, mask=gmask)
        tl.store(ml_ptr + 1, l_i, mask=gmask)


@triton.jit
def _paged_reduce_kernel(
    ACC, ML, SINKS, OUT,
    num_splits,
    stride_at, stride_ah, stride_as,
    stride_mt, stride_mh, stride_ms,
    stride_ot, stride_oh,
    HAS_SINKS: tl.constexpr, DV: tl.constexpr, DV_P: tl.constexpr, S_P: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, S_P)
    smask = s < num_splits
    ml = ML + t * stride_mt + h * stride_mh + s * stride_ms
    m = tl.load(ml, mask=smask, other=float("-inf"))
    l = tl.load(ml + 1, mask=smask, other=0.0)
    m_max = tl.max(m, axis=0)
    if HAS_SINKS:
        sink = tl.load(SINKS + h).to(tl.float32)
        m_max = tl.maximum(m_max, sink)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp(m - m_max)
    denom = tl.sum(w * l, axis=0)
    if HAS_SINKS:
        denom += tl.exp(sink - m_max)
    dv = tl.arange(0, DV_P)
    acc = tl.load(ACC + t * stride_at + h * stride_ah + s[:, None] * stride_as + dv[None, :], mask=smask[:, None] & (dv[None, :] < DV), other=0.0)
    o = tl.sum(acc * w[:, None], axis=0)
    o = o / tl.where(denom > 0, denom, 1.0)
    tl.store(OUT + t * stride_ot + h * stride_oh + dv, o.to(OUT.dtype.element_ty), mask=dv < DV)


@functools.lru_cache(maxsize=16)
def _sm_count(device_index: int) -> int:
    if not torch.cuda.is_available():
        return 132  # TRITON_INTERPRET on the CPU: any value; splits still exercised
    return torch.cuda.get_device_properties(device_index).multi_processor_count


#: Split-plan constants, picked by ``benchmarks/attention_decode.py --sweep`` on an H100
#: (see benchmarks/results/attention.md): the grid is grown by splitting the KV until it
#: holds about ``PROGRAMS_PER_SM`` programs per SM, but no split walks fewer than
#: ``MIN_SPLIT_TILES`` KV tiles (a shorter one costs more in its merge than it reads).
PROGRAMS_PER_SM = 1
MIN_SPLIT_TILES = 2


def plan_splits(
    num_tokens: int,
    num_kv_heads: int,
    max_kv: int,
    block_n: int,
    sm_count: int,
    *,
    programs_per_sm: float = PROGRAMS_PER_SM,
    min_split_tiles: int = MIN_SPLIT_TILES,
) -> tuple[int, int]:
    """(splits, tokens_per_split) from static shapes only (CUDA-graph safe).

    With ``T * Nkv`` programs already about filling the GPU (batch 16 x 8 KV heads on
    132 SMs) there is one split, and the kernel finishes the softmax itself: one launch,
    no partials, no merge. Below that (batch 1-8 decode) the KV is split so the grid
    reaches ``programs_per_sm * sm_count`` programs (rounded down: a split that would
    only part-fill a second wave is not worth its merge), each split at least
    ``min_split_tiles`` tiles of ``block_n`` keys.
    """
    base = max(1, num_tokens * num_kv_heads)
    want = max(1, int(programs_per_sm * sm_count) // base)
    max_splits = max(1, max_kv // (max(1, min_split_tiles) * block_n))
    splits = min(want, max_splits)
    per = math.ceil(math.ceil(max_kv / splits) / block_n) * block_n
    splits = max(1, math.ceil(max_kv / per))
    return splits, per


def _interpreting() -> bool:
    # Read per launch (not at import) so tests can switch the interpreter on.
    return os.environ.get("TRITON_INTERPRET") == "1"


def _p2(x: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(int(x)))


def paged_attention_cuda(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens_kv: torch.Tensor,
    sinks: Optional[torch.Tensor],
    scale: float,
    window: int,
    *,
    num_splits: Optional[int] = None,
) -> torch.Tensor:
    t, nq, d = q.shape
    _, page, nkv, _ = k_cache.shape
    dv = v_cache.shape[3]
    group = nq // nkv
    _require_unit_last_stride(k_cache=k_cache, v_cache=v_cache)
    out = torch.empty(t, nq, dv, dtype=q.dtype, device=q.device)
    if t == 0:
        return out
    q = q if q.stride(-1) == 1 else q.contiguous()
    block_table = block_table if block_table.stride(-1) == 1 else block_table.contiguous()
    block_n = 64 if max(d, dv) <= 128 else 32
    max_kv = block_table.shape[1] * page
    if num_splits is None:
        splits, per = plan_splits(t, nkv, max_kv, block_n, _sm_count(q.device.index or 0))
    else:
        per = math.ceil(math.ceil(max_kv / num_splits) / block_n) * block_n
        splits = max(1, math.ceil(max_kv / per))
    direct = splits == 1
    if direct:  # the kernel writes `out` itself; the partial buffers are never touched
        acc = ml = out.new_empty(0, 0, 0, dtype=torch.float32)
    else:
        acc = torch.empty(t, nq, splits, dv, dtype=torch.float32, device=q.device)
        ml = torch.empty(t, nq, splits, 2, dtype=torch.float32, device=q.device)
    num_reqs = seq_lens_kv.shape[0]
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    sink_arg = sinks if sinks is not None else out
    _paged_split_kernel[(t, nkv, splits)](
        q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens_kv, acc, ml, sink_arg, out,
        float(scale), int(window), num_reqs,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_table.stride(0),
        acc.stride(0), acc.stride(1), acc.stride(2),
        ml.stride(0), ml.stride(1), ml.stride(2),
        out.stride(0), out.stride(1),
        per,
        DIRECT=direct, HAS_SINKS=sinks is not None,
        GROUP=group, GROUP_P=_p2(group, 16), D=d, D_P=_p2(d, 16), DV=dv, DV_P=_p2(dv, 16),
        PAGE=page, BLOCK_N=block_n, R_P=_p2(num_reqs, 2), PRECISION=precision, INTERPRET=_interpreting(),
        num_warps=4, num_stages=2,
    )
    if direct:
        return out
    _paged_reduce_kernel[(t, nq)](
        acc, ml, sink_arg, out,
        splits,
        acc.stride(0), acc.stride(1), acc.stride(2),
        ml.stride(0), ml.stride(1), ml.stride(2),
        out.stride(0), out.stride(1),
        HAS_SINKS=sinks is not None, DV=dv, DV_P=_p2(dv, 16), S_P=_p2(splits, 2),
        num_warps=4,
    )
    return out


def _require_unit_last_stride(**caches: torch.Tensor) -> None:
    """The kernels address a cache as block/slot/head strides plus a contiguous head
    dim: any per-layer or cross-layer view of :mod:`ascend_graph.runtime.kv_layout`
    qualifies. A cache strided in its last dim is refused rather than copied (a write
    into a copy would be lost)."""
    bad = {name: tuple(c.stride()) for name, c in caches.items() if c.stride(-1) != 1 and c.shape[-1] > 1}
    if bad:
        raise UnsupportedError("paged KV caches need a contiguous last (head) dim", expected="stride(-1) == 1", got=bad)


# --------------------------------------------------------------------------- cache write


@triton.jit
def _reshape_and_cache_kernel(
    K, V, KC, VC, SLOT,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    NKV: tl.constexpr, NKV_P: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr,
    DV: tl.constexpr, DV_P: tl.constexpr, PAGE: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(SLOT + t).to(tl.int64)
    write = slot >= 0  # padded token (slot < 0): every store below is masked off
    slot = tl.maximum(slot, 0)
    blk = slot // PAGE
    off = slot % PAGE
    h = tl.arange(0, NKV_P)
    d = tl.arange(0, D_P)
    km = (h[:, None] < NKV) & (d[None, :] < D) & write
    k = tl.load(K + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=km)
    tl.store(KC + blk * stride_kcb + off * stride_kcs + h[:, None] * stride_kch + d[None, :], k.to(KC.dtype.element_ty), mask=km)
    e = tl.arange(0, DV_P)
    vm = (h[:, None] < NKV) & (e[None, :] < DV) & write
    v = tl.load(V + t * stride_vt + h[:, None] * stride_vh + e[None, :], mask=vm)
    tl.store(VC + blk * stride_vcb + off * stride_vcs + h[:, None] * stride_vch + e[None, :], v.to(VC.dtype.element_ty), mask=vm)


def reshape_and_cache_cuda(k, v, k_cache, v_cache, slot_mapping) -> None:
    t, nkv, d = k.shape
    dv = v.shape[2]
    if t == 0:
        return
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    _require_unit_last_stride(k_cache=k_cache, v_cache=v_cache)
    _reshape_and_cache_kernel[(t,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NKV=nkv, NKV_P=_p2(nkv), D=d, D_P=_p2(d), DV=dv, DV_P=_p2(dv), PAGE=k_cache.shape[1],
    )
