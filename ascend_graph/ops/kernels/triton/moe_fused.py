"""Triton fused-MoE experts for small token counts: only the selected experts are read.

Entry point: :func:`fused_experts` (``moe_dispatch_ffn_combine``'s contract without shared
experts; chosen by :func:`ascend_graph.ops.kernels.triton.moe.dispatch_ffn_combine`).
On the CPU the kernels run under ``TRITON_INTERPRET=1`` (how the tests check them).

Two pipelines, chosen by the token-count bucket's :class:`MoeConfig`.

One launch for the experts (``naive`` with ``ffn_chunk``; 1-2 tokens), three in all:

- ``_zero_kernel`` zeroes an fp32 ``y[T, H]``;
- ``_ffn_kernel``, one program per (pair, chunk of ``ffn_chunk`` intermediate units):
  the chunk's gate and up rows over the whole hidden size, the activation, then the
  chunk's columns of the down projection times the routing weight, added atomically into
  ``y[token]``. A unit's activation needs only its own gate and up rows, so no program
  waits for another and the gate/up and down weight streams run in one launch (on an
  H100 at one token: 33.1 us against 35.4-35.6 us for the two-launch path below);
- ``_combine_kernel`` casts ``y`` to ``x.dtype``.

Four launches otherwise (three with ``naive``):

1. ``_align_kernel`` (one program): the ``P = T*k`` (token, slot) pairs are grouped by
   expert into blocks of ``BM`` pair slots. ``sorted_pairs[MAX_BLOCKS*BM]`` lists the pair
   index of every slot (``P`` = empty slot) and ``block_expert[MAX_BLOCKS]`` the expert of
   every block (``-1`` = unused block). ``MAX_BLOCKS = P // BM + min(P, E)`` bounds
   ``sum_e ceil(count_e / BM)`` for any routing, so every shape is static: no host sync,
   one captured graph serves any routing. Pairs with an id outside ``[0, E)`` or an
   inactive token are never placed, so they do no work.
   With ``naive`` blocks (one token: its top-k ids are distinct, so each expert still
   has one pair) this step is skipped and block ``b`` is pair ``b``.
2. ``_w13_kernel``: per (block, N-tile, K-split) the gate and up tiles of the block's
   expert are streamed once for all pairs of the block; without split-K the activation
   ``act(gate) * up`` is applied in the epilogue and stored in ``x.dtype``; with split-K
   the fp32 partial gate/up sums are atomically added into a zeroed buffer and the
   activation moves into the next kernel's prologue.
3. ``_w2_kernel``: per (block, N-tile) the down projection of the block's expert,
   times the routing weight, into an fp32 per-pair buffer ``[P, H]``.
4. ``_combine_kernel``: ``out[t] = sum_j y[t*k + j]`` in fp32 over the valid slots only
   (rows of invalid pairs are never written and never read), cast to ``x.dtype``.

Programmatic dependent launch (``MoeConfig.pdl``, SM90+): every launch waits
(``gdc_wait``) for its predecessor before reading or writing what that may still use, and
lets its successor launch once all its programs are past the wait, so launch latencies
and ramps overlap the previous kernel's tail. That is why the one-launch path zeroes
``y`` with a kernel: a memset node would end the chain (1.3 us more at 1 token).
With ``w2_prefetch`` the down projection's programs prefetch their weight tile into L2
before their wait (off: measured slower).

The intermediate buffers are indexed by pair, not by sorted slot, so their size is
``P`` rows whatever the padding. Block sizes come from :data:`CONFIGS` (measured on an
H100 by ``benchmarks/moe_layer.py --sweep``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .moe_gating import pdl_launch
from ....errors import UnsupportedError

__all__ = ["MoeConfig", "CONFIGS", "config_for", "align_blocks", "max_blocks", "fused_experts", "triton_supported"]

_ACT_IDS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    """Launch parameters of one token-count bucket."""

    block_m: int = 16
    #: one program per pair (skip the align kernel); only sensible when pairs rarely share experts
    naive: bool = False
    w13_n: int = 32
    w13_k: int = 128
    split_k: int = 1
    w13_warps: int = 4
    w13_stages: int = 4
    w2_n: int = 32
    w2_k: int = 128
    w2_warps: int = 4
    w2_stages: int = 4
    #: programmatic dependent launch between the op's launches (honoured on SM90+ only)
    pdl: bool = True
    #: with ``pdl``: each down-projection program prefetches its weight tile into L2
    #: before waiting for the gate/up kernel (weights do not depend on it). Off: on an
    #: H100 it cost 1.5-6 us at 1-8 tokens (the prefetches compete with the gate/up
    #: kernel's own weight stream, which is the critical path)
    w2_prefetch: bool = False
    #: with ``naive``: one launch for gate/up, activation and down projection
    #: (:func:`_ffn_kernel`), each program owning ``ffn_chunk`` intermediate units of one
    #: pair; 0 = the two-launch path
    ffn_chunk: int = 0
    ffn_k: int = 128
    ffn_n: int = 128
    ffn_warps: int = 4
    ffn_stages: int = 4

#: (max tokens, config) in increasing order; the last entry serves any larger count.
#: Measured on an H100 (Qwen3-30B-A3B shape, benchmarks/moe_layer.py --sweep): at 1-2 tokens
#: one program per pair (the align launch costs more than the rare shared expert), narrow
#: gate/up tiles so ~400 programs stream weights; from 4 tokens wide 64x256 tiles; split-K
#: over the hidden size never won (its zeroing and fp32 atomics cost more than the extra
#: programs gave), nor did folding the combine into a one-token down projection (one
#: program per output tile walking the k experts in turn: too few bytes in flight, 89 us
#: against 37 us). fp32 operands get smaller tiles (:func:`_fit_dtype`).
CONFIGS: tuple[tuple[int, MoeConfig], ...] = (
    (1, MoeConfig(naive=True, ffn_chunk=64, ffn_k=128, ffn_n=128)),
    (2, MoeConfig(naive=True, ffn_chunk=64, ffn_k=128, ffn_n=128, ffn_stages=3)),
    (4, MoeConfig(w13_n=64, w13_k=256, w13_stages=3, w2_n=32, w2_k=128)),
    (8, MoeConfig(w13_n=64, w13_k=256, w13_stages=3, w2_n=64, w2_k=128)),
    (32, MoeConfig(w13_n=64, w13_k=256, w13_stages=3, w2_n=32, w2_k=256)),
    (64, MoeConfig(block_m=64, w13_n=64, w13_k=128, w2_n=128, w2_k=128)),
    (1 << 62, MoeConfig(block_m=64, w13_n=64, w13_k=64, w13_stages=3, w2_n=64, w2_k=64, w2_stages=3)),
)


def _fit_dtype(cfg: MoeConfig, dtype: torch.dtype) -> MoeConfig:
    """The configs are tuned for 2-byte operands; 4-byte ones get tiles whose pipelined
    shared-memory buffers still fit (a 64x256 gate+up tile in fp32 needs ~440 KB)."""
    if dtype.itemsize <= 2:
        return cfg
    return dataclasses.replace(
        cfg,
        w13_n=min(cfg.w13_n, 32), w13_k=min(cfg.w13_k, 64), w13_stages=min(cfg.w13_stages, 3),
        w2_n=min(cfg.w2_n, 64), w2_k=min(cfg.w2_k, 64), w2_stages=min(cfg.w2_stages, 3),
        ffn_k=min(cfg.ffn_k, 64), ffn_n=min(cfg.ffn_n, 64), ffn_stages=min(cfg.ffn_stages, 3),
    )


def config_for(tokens: int) -> MoeConfig:
    for limit, cfg in CONFIGS:
        if tokens <= limit:
            return cfg
    return CONFIGS[-1][1]


def max_blocks(pairs: int, experts: int, block_m: int) -> int:
    """Static bound on ``sum_e ceil(count_e / block_m)`` over all routings of ``pairs``."""
    return pairs // block_m + min(pairs, experts)


def triton_supported(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether :func:`fused_experts` takes these operands (same float dtype throughout)."""
    return x.dtype in (torch.bfloat16, torch.float16, torch.float32) and w13.dtype == x.dtype and w2.dtype == x.dtype


# --------------------------------------------------------------------------- kernels


# The pair count P (tokens x top-k) is only a bound (``pairs < P``), never a stride or an
# offset, so Triton's "divisible by 16" specialisation of it buys nothing, and it flips
# from one batch bucket to the next (17 tokens x 8 slots x batch 1, 2, 4, 8): a new compile
# of each expert kernel per bucket at capture time (session 13, H100: 3-4 per bucket for
# Qwen3-Next). Not specialised on alignment, one compile serves every bucket.
_PAIR_COUNT = ["P"]


@triton.jit
def _pair_expert(ids_ptr, mask_ptr, p, P, E, stride_it, stride_ik, TOPK: tl.constexpr, HAS_MASK: tl.constexpr):
    """Expert of pair ``p`` (token ``p // TOPK``, slot ``p % TOPK``), or ``E`` if the pair does no work."""
    inb = p < P
    t = p // TOPK
    e = tl.load(ids_ptr + t.to(tl.int64) * stride_it + (p % TOPK) * stride_ik, mask=inb, other=E).to(tl.int32)
    ok = inb & (e >= 0) & (e < E)
    if HAS_MASK:
        ok = ok & (tl.load(mask_ptr + t, mask=inb, other=0) != 0)
    return tl.where(ok, e, E)


@triton.jit
def _align_kernel(
    ids_ptr, mask_ptr, sorted_ptr, block_expert_ptr,
    P, E, NUM_SLOTS, NUM_BLOCKS,
    stride_it, stride_ik,
    TOPK: tl.constexpr, E_P2: tl.constexpr, BM: tl.constexpr, CH: tl.constexpr, HAS_MASK: tl.constexpr,
    P_P2: tl.constexpr, NB_P2: tl.constexpr, USE_PDL: tl.constexpr,
):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()  # the ids come from the previous kernel
        tl.extra.cuda.gdc_launch_dependents()
    # Loop bounds are constexpr powers of two (P <= P_P2, NUM_BLOCKS <= NB_P2; the tails are
    # masked): one compile per power of two of the pair count, and the CPU interpreter,
    # whose runtime scalars range() cannot take, runs the same code.
    ex = tl.arange(0, E_P2)
    lane = tl.arange(0, CH)
    # every slot starts empty (sentinel P); placed pairs overwrite theirs after the barrier
    for s0 in range(0, NB_P2 * BM, CH):
        tl.store(sorted_ptr + s0 + lane, P, mask=s0 + lane < NUM_SLOTS)
    counts = tl.zeros([E_P2], dtype=tl.int32)
    for p0 in range(0, P_P2, CH):
        e = _pair_expert(ids_ptr, mask_ptr, p0 + lane, P, E, stride_it, stride_ik, TOPK, HAS_MASK)
        counts += tl.sum((e[:, None] == ex[None, :]).to(tl.int32), axis=0)
    counts = tl.where(ex < E, counts, 0)
    nblk = (counts + BM - 1) // BM
    blk_end = tl.cumsum(nblk, axis=0)
    blk_start = blk_end - nblk
    used = tl.sum(nblk, axis=0)
    tl.debug_barrier()
    # slot of a pair = its expert's first slot + how many earlier pairs chose that expert
    seen = tl.zeros([E_P2], dtype=tl.int32)
    for p0 in range(0, P_P2, CH):
        p = p0 + lane
        e = _pair_expert(ids_ptr, mask_ptr, p, P, E, stride_it, stride_ik, TOPK, HAS_MASK)
        hot = ((e[:, None] == ex[None, :]) & (ex[None, :] < E)).to(tl.int32)
        rank = tl.cumsum(hot, axis=0) - hot + seen[None, :]
        slot = tl.sum(hot * (blk_start[None, :] * BM + rank), axis=1)
        tl.store(sorted_ptr + slot, p, mask=e < E)
        seen += tl.sum(hot, axis=0)
    # block b belongs to the expert whose block range holds it: the number of experts ending at or before b
    for b0 in range(0, NB_P2, CH):
        b = b0 + lane
        owner = tl.sum((blk_end[None, :] <= b[:, None]).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + b, tl.where(b < used, owner, -1), mask=b < NUM_BLOCKS)


@triton.jit
def _block_rows(sorted_ptr, block_expert_ptr, ids_ptr, mask_ptr, pid_m, P, E, stride_it, stride_ik,
                TOPK: tl.constexpr, BM: tl.constexpr, NAIVE: tl.constexpr, HAS_MASK: tl.constexpr):
    """(expert, pair index of each of the block's BM rows); expert < 0 means no work."""
    r = tl.arange(0, BM)
    if NAIVE:
        e = _pair_expert(ids_ptr, mask_ptr, pid_m, P, E, stride_it, stride_ik, TOPK, HAS_MASK)
        pairs = tl.where(r == 0, pid_m, P)
        e = tl.where(e < E, e, -1)
    else:
        e = tl.load(block_expert_ptr + pid_m)
        pairs = tl.load(sorted_ptr + pid_m * BM + r)
    return e, pairs


@triton.jit
def _prefetch_l2(ptrs):
    # fire-and-forget: the line is on its way into L2 when the real load asks for it
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // dummy $0", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _act(g, ACT: tl.constexpr):
    if ACT == 0:
        return g * tl.sigmoid(g)
    elif ACT == 1:
        return 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    else:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        return g * tl.sigmoid(2.0 * inner)  # 0.5 * (1 + tanh(z)) == sigmoid(2z)


@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST only under TRITON_INTERPRET: Triton 3.6's interpreter multiplies bf16 dot
    # operands as raw bits (garbage); fp32 operands give the same products exactly.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _gate_up(x_ptr, w_ptr, e, tok, rmask, n, nmask, k_lo, H, N, stride_xt, stride_xh, stride_we, stride_wn, stride_wh,
             BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, K_PER: tl.constexpr, EVEN_K: tl.constexpr,
             DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 ``(x W_gate[n]^T, x W_up[n]^T)`` of the rows ``tok`` over ``[k_lo, k_lo + K_PER)`` of
    the hidden size, for expert ``e`` of a ``[E, 2N, H]`` gate/up weight (up rows ``N`` below gate)."""
    kk = tl.arange(0, BK)
    a_ptrs = x_ptr + tok[:, None] * stride_xt + (k_lo + kk)[None, :] * stride_xh
    wg_ptrs = w_ptr + e.to(tl.int64) * stride_we + n[None, :] * stride_wn + (k_lo + kk)[:, None] * stride_wh
    wu_ptrs = wg_ptrs + N * stride_wn
    acc_g = tl.zeros([BM, BN], dtype=tl.float32)
    acc_u = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K_PER, BK):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=rmask[:, None], other=0.0)
            wg = tl.load(wg_ptrs, mask=nmask[None, :], other=0.0)
            wu = tl.load(wu_ptrs, mask=nmask[None, :], other=0.0)
        else:
            kin = (k_lo + k0 + kk < H) & (k0 + kk < K_PER)
            a = tl.load(a_ptrs, mask=rmask[:, None] & kin[None, :], other=0.0)
            wg = tl.load(wg_ptrs, mask=nmask[None, :] & kin[:, None], other=0.0)
            wu = tl.load(wu_ptrs, mask=nmask[None, :] & kin[:, None], other=0.0)
        acc_g = _mma(a, wg, acc_g, DOT_PRECISION, UPCAST)
        acc_u = _mma(a, wu, acc_u, DOT_PRECISION, UPCAST)
        a_ptrs += BK * stride_xh
        wg_ptrs += BK * stride_wh
        wu_ptrs += BK * stride_wh
    return acc_g, acc_u


@triton.jit(do_not_specialize_on_alignment=_PAIR_COUNT)
def _w13_kernel(
    x_ptr, w_ptr, out_ptr, sorted_ptr, block_expert_ptr, ids_ptr, mask_ptr,
    P, E, N, H,
    stride_xt, stride_xh, stride_we, stride_wn, stride_wh, stride_op, stride_it, stride_ik,
    TOPK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr, K_PER: tl.constexpr,
    NAIVE: tl.constexpr, HAS_MASK: tl.constexpr, ACT: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    if USE_PDL:
        # the routing (ids, or the align kernel's blocks) comes from the previous kernel;
        # once every program is past this point the down projection may launch: it reads
        # nothing of ours before its own wait
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    e, pairs = _block_rows(sorted_ptr, block_expert_ptr, ids_ptr, mask_ptr, pid_m, P, E, stride_it, stride_ik, TOPK, BM, NAIVE, HAS_MASK)
    if e < 0:
        return
    rmask = pairs < P
    tok = (pairs // TOPK).to(tl.int64)
    n = pid_n * BN + tl.arange(0, BN)
    nmask = n < N
    acc_g, acc_u = _gate_up(x_ptr, w_ptr, e, tok, rmask, n, nmask, pid_k * K_PER, H, N, stride_xt, stride_xh, stride_we, stride_wn, stride_wh,
                            BM, BN, BK, K_PER, EVEN_K, DOT_PRECISION, UPCAST)
    o_ptrs = out_ptr + pairs.to(tl.int64)[:, None] * stride_op + n[None, :]
    omask = rmask[:, None] & nmask[None, :]
    if SPLIT_K == 1:
        h = _act(acc_g, ACT) * acc_u
        tl.store(o_ptrs, h.to(out_ptr.dtype.element_ty), mask=omask)
    else:
        tl.atomic_add(o_ptrs, acc_g, mask=omask, sem="relaxed")
        tl.atomic_add(o_ptrs + N, acc_u, mask=omask, sem="relaxed")


@triton.jit(do_not_specialize_on_alignment=_PAIR_COUNT)
def _w2_kernel(
    a_ptr, w_ptr, y_ptr, tw_ptr, sorted_ptr, block_expert_ptr, ids_ptr, mask_ptr,
    P, E, N,
    stride_ap, stride_we, stride_wn, stride_wk, stride_yp, stride_tt, stride_tk, stride_it, stride_ik,
    TOPK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, KD: tl.constexpr,
    NAIVE: tl.constexpr, HAS_MASK: tl.constexpr, ACT: tl.constexpr, ACT_IN_PROLOGUE: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    USE_PDL: tl.constexpr, PREFETCH: tl.constexpr, LINE: tl.constexpr, LINES_P2: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # Under PDL this runs while the gate/up kernel still does: the routing it reads here
    # (ids, or the align kernel's blocks) is two launches back, complete before any
    # gate/up program let us launch (they wait for their predecessor first).
    e, pairs = _block_rows(sorted_ptr, block_expert_ptr, ids_ptr, mask_ptr, pid_m, P, E, stride_it, stride_ik, TOPK, BM, NAIVE, HAS_MASK)
    if e < 0:
        return
    rmask = pairs < P
    pr = pairs.to(tl.int64)
    n = pid_n * BN + tl.arange(0, BN)
    nmask = n < N
    if USE_PDL:
        if PREFETCH:
            # one L2 prefetch per 128-byte line of this program's weight tile
            line = tl.minimum(tl.arange(0, LINES_P2) * LINE, KD - 1)
            nn = tl.minimum(n, N - 1)
            _prefetch_l2(w_ptr + e.to(tl.int64) * stride_we + nn[:, None] * stride_wn + line[None, :] * stride_wk)
        tl.extra.cuda.gdc_wait()  # the hidden activations are the previous kernel's output
        tl.extra.cuda.gdc_launch_dependents()
    kk = tl.arange(0, BK)
    a_ptrs = a_ptr + pr[:, None] * stride_ap + kk[None, :]
    w_ptrs = w_ptr + e.to(tl.int64) * stride_we + n[None, :] * stride_wn + kk[:, None] * stride_wk
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, KD, BK):
        if EVEN_K:
            amask = rmask[:, None]
            wmask = nmask[None, :]
        else:
            kin = k0 + kk < KD
            amask = rmask[:, None] & kin[None, :]
            wmask = nmask[None, :] & kin[:, None]
        if ACT_IN_PROLOGUE:
            g = tl.load(a_ptrs, mask=amask, other=0.0)
            u = tl.load(a_ptrs + KD, mask=amask, other=0.0)
            a = (_act(g, ACT) * u).to(w_ptr.dtype.element_ty)
        else:
            a = tl.load(a_ptrs, mask=amask, other=0.0)
        w = tl.load(w_ptrs, mask=wmask, other=0.0)
        acc = _mma(a, w, acc, DOT_PRECISION, UPCAST)
        a_ptrs += BK
        w_ptrs += BK * stride_wk
    tw = tl.load(tw_ptr + (pr // TOPK) * stride_tt + (pr % TOPK) * stride_tk, mask=rmask, other=0.0).to(tl.float32)
    acc = acc * tw[:, None]
    tl.store(y_ptr + pr[:, None] * stride_yp + n[None, :], acc, mask=rmask[:, None] & nmask[None, :])


@triton.jit(do_not_specialize_on_alignment=_PAIR_COUNT)
def _ffn_kernel(
    x_ptr, w13_ptr, w2_ptr, y_ptr, tw_ptr, ids_ptr, mask_ptr,
    P, E, I,
    stride_xt, stride_xh, s13e, s13n, s13h, s2e, s2n, s2k, stride_yt, stride_tt, stride_tk, stride_it, stride_ik,
    H: tl.constexpr, TOPK: tl.constexpr, BM: tl.constexpr, CHUNK: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
    HAS_MASK: tl.constexpr, ACT: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, USE_PDL: tl.constexpr,
):
    """Program (pair p, chunk c): ``h = act(x W_gate[c]) * (x W_up[c])`` for the chunk's
    ``CHUNK`` intermediate units (a tile of ``BC >= CHUNK``) over the whole hidden size, then its share of the down
    projection, ``W_down[:, c] h`` times the routing weight, added atomically into the
    zeroed fp32 row ``y[token]``. No program waits for another: the activation of a unit
    needs only that unit's gate and up rows."""
    pid = tl.program_id(0)
    c = tl.program_id(1)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()  # the routing and the zeroed y come from the previous kernels
        tl.extra.cuda.gdc_launch_dependents()
    e, pairs = _block_rows(y_ptr, y_ptr, ids_ptr, mask_ptr, pid, P, E, stride_it, stride_ik, TOPK, BM, True, HAS_MASK)
    if e < 0:
        return
    rmask = pairs < P
    tok = (pairs // TOPK).to(tl.int64)
    ci = tl.arange(0, BC)
    i = c * CHUNK + ci
    imask = (ci < CHUNK) & (i < I)
    acc_g, acc_u = _gate_up(x_ptr, w13_ptr, e, tok, rmask, i, imask, 0, H, I, stride_xt, stride_xh, s13e, s13n, s13h,
                            BM, BC, BK, H, EVEN_K, DOT_PRECISION, UPCAST)
    # rounded to the operand dtype, as the two-launch path stores it between its launches
    h = (_act(acc_g, ACT) * acc_u).to(w2_ptr.dtype.element_ty)
    tw = tl.load(tw_ptr + tok * stride_tt + (pairs % TOPK) * stride_tk, mask=rmask, other=0.0).to(tl.float32)
    n = tl.arange(0, BN)
    w_ptrs = w2_ptr + e.to(tl.int64) * s2e + n[None, :] * s2n + i[:, None] * s2k
    y_ptrs = y_ptr + tok[:, None] * stride_yt + n[None, :]
    for n0 in range(0, H, BN):
        if EVEN_N:
            w = tl.load(w_ptrs, mask=imask[:, None], other=0.0)
            ymask = rmask[:, None]
        else:
            nin = n0 + n < H
            w = tl.load(w_ptrs, mask=imask[:, None] & nin[None, :], other=0.0)
            ymask = rmask[:, None] & nin[None, :]
        y = _mma(h, w, tl.zeros([BM, BN], dtype=tl.float32), DOT_PRECISION, UPCAST) * tw[:, None]
        tl.atomic_add(y_ptrs, y, mask=ymask, sem="relaxed")
        w_ptrs += BN * s2n
        y_ptrs += BN


@triton.jit
def _zero_kernel(y_ptr, N, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    """Zeroes ``y`` as one launch of the op's PDL chain (a memset node would break it). It
    writes only after its wait: ``y`` may reuse memory that the previous kernel still reads."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.zeros([BLOCK], dtype=y_ptr.dtype.element_ty), mask=offs < N)


@triton.jit
def _combine_kernel(
    y_ptr, out_ptr, ids_ptr, mask_ptr, E, H,
    stride_yp, stride_ot, stride_oh, stride_it, stride_ik,
    TOPK: tl.constexpr, BH: tl.constexpr, SUMMED: tl.constexpr, HAS_MASK: tl.constexpr, USE_PDL: tl.constexpr,
):
    """``out[t] = sum`` of the fp32 rows ``y[t*k + j]`` of the token's valid slots; with
    ``SUMMED``, ``y[t]`` is that sum already (the one-launch path) and is only cast."""
    t = tl.program_id(0)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    h = tl.program_id(1) * BH + tl.arange(0, BH)
    hmask = h < H
    active = True
    if HAS_MASK:
        active = tl.load(mask_ptr + t) != 0
    if SUMMED:
        acc = tl.load(y_ptr + t.to(tl.int64) * stride_yp + h, mask=hmask & active, other=0.0)
    else:
        acc = tl.zeros([BH], dtype=tl.float32)
        for j in tl.static_range(TOPK):
            e = tl.load(ids_ptr + t.to(tl.int64) * stride_it + j * stride_ik)
            ok = active & (e >= 0) & (e < E)
            acc += tl.load(y_ptr + (t.to(tl.int64) * TOPK + j) * stride_yp + h, mask=hmask & ok, other=0.0)
    tl.store(out_ptr + t.to(tl.int64) * stride_ot + h * stride_oh, acc.to(out_ptr.dtype.element_ty), mask=hmask)


# --------------------------------------------------------------------------- launchers


def _interpreting() -> bool:
    # read per launch, not at import, so a test process can switch the interpreter on
    return os.environ.get("TRITON_INTERPRET") == "1"


def _mask_arg(active_mask: Optional[torch.Tensor], ids: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if active_mask is None:
        return ids, False  # any pointer: never read
    if active_mask.dtype == torch.bool:
        active_mask = active_mask.view(torch.uint8)  # same bytes, a type Triton loads everywhere
    return active_mask.contiguous(), True


def align_blocks(topk_ids: torch.Tensor, num_experts: int, block_m: int, active_mask: Optional[torch.Tensor] = None, pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_pairs [MAX_BLOCKS*BM] int32, block_expert [MAX_BLOCKS] int32); see the module docstring."""
    t, k = topk_ids.shape
    p = t * k
    nb = max_blocks(p, num_experts, block_m)
    sorted_pairs = torch.empty(nb * block_m, dtype=torch.int32, device=topk_ids.device)
    block_expert = torch.empty(nb, dtype=torch.int32, device=topk_ids.device)
    mask, has_mask = _mask_arg(active_mask, topk_ids)
    _align_kernel[(1,)](
        topk_ids, mask, sorted_pairs, block_expert,
        p, num_experts, nb * block_m, nb,
        topk_ids.stride(0), topk_ids.stride(1),
        TOPK=k, E_P2=triton.next_power_of_2(num_experts), BM=block_m, CH=32, HAS_MASK=has_mask,
        P_P2=triton.next_power_of_2(p), NB_P2=triton.next_power_of_2(nb), USE_PDL=bool(pdl_kw := pdl_launch(pdl, topk_ids.device)),
        num_warps=4, **pdl_kw,
    )
    return sorted_pairs, block_expert


def fused_experts(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    activation: str,
    active_mask: Optional[torch.Tensor],
    config: Optional[MoeConfig] = None,
) -> torch.Tensor:
    """Routed experts of ``moe_dispatch_ffn_combine`` with the Triton kernels above."""
    t, h = x.shape
    e, k = w13.shape[0], topk_ids.shape[1]
    inter = w2.shape[2]
    p = t * k
    cfg = _fit_dtype(config or config_for(t), x.dtype)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if p == 0:
        return out
    bm = cfg.block_m
    mask, has_mask = _mask_arg(active_mask, topk_ids)
    if cfg.naive:
        n_blocks = p
        sorted_pairs = block_expert = topk_ids  # unused pointers
    else:
        sorted_pairs, block_expert = align_blocks(topk_ids, e, bm, active_mask, cfg.pdl)
        n_blocks = block_expert.shape[0]
    if activation not in _ACT_IDS:
        # the clipped SwiGLU (interleaved gate/up, expert biases) runs in the sorted path
        raise UnsupportedError("activation not in the fused Triton experts", expected=f"one of {tuple(_ACT_IDS)}", got=repr(activation))
    act = _ACT_IDS[activation]
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    pdl = pdl_launch(cfg.pdl, x.device)
    common = dict(TOPK=k, BM=bm, HAS_MASK=has_mask, ACT=act, DOT_PRECISION=precision, UPCAST=_interpreting(), USE_PDL=bool(pdl))
    if cfg.naive and cfg.ffn_chunk:
        chunks = triton.cdiv(inter, cfg.ffn_chunk)
        if pdl:  # zeroed by a launch of the PDL chain (a memset node would break the chain)
            y = torch.empty(t, h, dtype=torch.float32, device=x.device)
            _zero_kernel[(triton.cdiv(t * h, 1024),)](y, t * h, BLOCK=1024, USE_PDL=True, num_warps=4, **pdl)
        else:
            y = torch.zeros(t, h, dtype=torch.float32, device=x.device)
        _ffn_kernel[(p, chunks)](
            x, w13, w2, y, topk_weights, topk_ids, mask,
            p, e, inter,
            x.stride(0), x.stride(1), w13.stride(0), w13.stride(1), w13.stride(2), w2.stride(0), w2.stride(1), w2.stride(2),
            y.stride(0), topk_weights.stride(0), topk_weights.stride(1), topk_ids.stride(0), topk_ids.stride(1),
            H=h, CHUNK=cfg.ffn_chunk, BC=max(16, triton.next_power_of_2(cfg.ffn_chunk)), BK=cfg.ffn_k, BN=cfg.ffn_n, EVEN_K=h % cfg.ffn_k == 0, EVEN_N=h % cfg.ffn_n == 0,
            num_warps=cfg.ffn_warps, num_stages=cfg.ffn_stages, **common, **pdl,
        )
        summed = True
    else:
        split = cfg.split_k
        if split == 1:
            hidden = torch.empty(p, inter, dtype=x.dtype, device=x.device)
        else:
            hidden = torch.zeros(p, 2 * inter, dtype=torch.float32, device=x.device)
        _w13_kernel[(n_blocks, triton.cdiv(inter, cfg.w13_n), split)](
            x, w13, hidden, sorted_pairs, block_expert, topk_ids, mask,
            p, e, inter, h,
            x.stride(0), x.stride(1), w13.stride(0), w13.stride(1), w13.stride(2), hidden.stride(0), topk_ids.stride(0), topk_ids.stride(1),
            BN=cfg.w13_n, BK=cfg.w13_k, SPLIT_K=split, K_PER=triton.cdiv(triton.cdiv(h, split), cfg.w13_k) * cfg.w13_k, EVEN_K=h % (cfg.w13_k * split) == 0,
            NAIVE=cfg.naive, num_warps=cfg.w13_warps, num_stages=cfg.w13_stages, **common, **pdl,
        )
        y = torch.empty(p, h, dtype=torch.float32, device=x.device)
        line = max(1, 128 // w2.element_size())  # elements per 128-byte line
        _w2_kernel[(n_blocks, triton.cdiv(h, cfg.w2_n))](
            hidden, w2, y, topk_weights, sorted_pairs, block_expert, topk_ids, mask,
            p, e, h,
            hidden.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), y.stride(0), topk_weights.stride(0), topk_weights.stride(1),
            topk_ids.stride(0), topk_ids.stride(1),
            BN=cfg.w2_n, BK=cfg.w2_k, KD=inter, ACT_IN_PROLOGUE=split > 1, EVEN_K=inter % cfg.w2_k == 0,
            PREFETCH=cfg.w2_prefetch, LINE=line, LINES_P2=triton.next_power_of_2(triton.cdiv(inter, line)),
            NAIVE=cfg.naive, num_warps=cfg.w2_warps, num_stages=cfg.w2_stages, **common, **pdl,
        )
        summed = False
    bh = min(1024, triton.next_power_of_2(h))
    _combine_kernel[(t, triton.cdiv(h, bh))](
        y, out, topk_ids, mask, e, h,
        y.stride(0), out.stride(0), out.stride(1), topk_ids.stride(0), topk_ids.stride(1),
        TOPK=k, BH=bh, SUMMED=summed, HAS_MASK=has_mask, USE_PDL=bool(pdl), num_warps=4, **pdl,
    )
    return out
