"""Triton kernels of ``moe_gating_topk``: scoring, grouped top-k and renormalisation in one launch,
after a Triton router GEMM for small token counts.

Entry points: :func:`gating_topk` (router logits given) and :func:`router_gating_topk`
(hidden states and the router weight given), with the contract of
``ascend_graph/ops/moe.py`` (``gating_reference`` is the ground truth). On the CPU they
run under ``TRITON_INTERPRET=1``.

Why kernels: the plain-torch routing is about eight launches (softmax, topk, gather, sum,
add, div, mul, casts), and at one decode token cuBLAS runs the 1 x 2048 x 128 router GEMM
in ~5 us on an H100 (two programs read the 0.5 MB weight); together they were ~8 us of a
~25 us MoE layer floor.

Selection (:func:`_select`, shared by both kernels) works on a ``[rows, E]`` tile: scores
in float32 (softmax or sigmoid), the choice score adds the correction bias, groups are
ranked by the sum of their two best choice scores and all but the best ``topk_group``
are masked, then the ``top_k`` experts are taken one max at a time (descending, like
``torch.topk``). The weights are the unbiased scores, renormalised and scaled in float32.

Router GEMM (:func:`router_gating_topk`; the op uses it up to :data:`ROUTER_MAX_TOKENS`
tokens): the ``[E, H]`` router weight is split over ``E / block_e`` expert blocks and
``split_k`` slices of ``H``, one program each (128 programs at the default split). Each
program stores its fp32 partial logits; the gating kernel, launched next, sums them in a
fixed order (deterministic), rounds them to ``x.dtype`` as ``F.linear`` would, and
selects. With ``two_launch=False`` the program that takes the last ticket of an atomic
counter (zeroed per call) sums and selects instead: one launch, but measured 3-4 us
slower (the counter's memset node ends the PDL chain, and the last program waits on the
others). With one program (``block_e >= E`` and ``split_k == 1``) there is no scratch.

Programmatic dependent launch (``pdl``, SM90+, all kernels): a kernel waits for the
previous one before reading its input and lets the next kernel (the experts op's first
launch) start as soon as every program has begun, so that launch's latency overlaps
this kernel.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["gating_topk", "gating_supported", "router_gating_topk", "router_gating_supported", "RouterConfig", "router_config_for", "ROUTER_MAX_TOKENS", "pdl_supported", "pdl_launch"]

#: largest token count whose router GEMM the op runs in Triton (:func:`router_gating_topk`);
#: above it cuBLAS does the GEMM, then :func:`gating_topk`. Measured on an H100
#: (Qwen3-30B-A3B layer, benchmarks/results/moe.md): 2-3 us faster than cuBLAS + the
#: gating kernel at 1-32 tokens (the router kernel takes at most 32 tokens).
ROUTER_MAX_TOKENS = 32
#: the router kernel's own limit (its [tokens, experts] accumulator tile)
_TILE_MAX_TOKENS = 32


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    """Launch parameters of the router GEMM kernel."""

    #: experts per program (>= 16: the tensor-core tile)
    block_e: int = 16
    #: slices of the hidden size, one program each
    split_k: int = 16
    block_k: int = 128
    num_warps: int = 4
    #: programmatic dependent launch (honoured on SM90+ only)
    pdl: bool = True
    #: with several programs: they only store their partial logits and the gating kernel,
    #: launched next, sums them and selects (no zeroed counter, no last-program selection)
    two_launch: bool = True


def router_config_for(tokens: int) -> RouterConfig:
    """Measured on an H100 (Qwen3-30B-A3B router, 128 x 2048 bf16; benchmarks/moe_layer.py --variants 1,2,4,8,16,32 --router-splits)."""
    return RouterConfig()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch: Hopper and later, compiled (not interpreted) Triton."""
    return device.type == "cuda" and not _interpreting() and torch.cuda.get_device_capability(device) >= (9, 0)


def pdl_launch(on: bool, device: torch.device) -> dict:
    """Launch keywords for programmatic dependent launch, where asked for and the device has it."""
    return {"launch_pdl": True} if on and pdl_supported(device) else {}


def gating_supported(logits: torch.Tensor, n_group: int) -> bool:
    """Whether :func:`gating_topk` takes this problem (a 2-D float row per token, whole groups)."""
    e = logits.shape[-1]
    return logits.dtype in (torch.float32, torch.float16, torch.bfloat16) and e % n_group == 0 and e <= 4096


def router_gating_supported(x: torch.Tensor, router_weight: torch.Tensor, n_group: int, max_tokens: int = _TILE_MAX_TOKENS) -> bool:
    """Whether :func:`router_gating_topk` takes this problem (few tokens, float operands, E <= 512)."""
    floats = (torch.float32, torch.float16, torch.bfloat16)
    e = router_weight.shape[0]
    return x.shape[0] <= min(max_tokens, _TILE_MAX_TOKENS) and x.dtype in floats and router_weight.dtype in floats and e % n_group == 0 and e <= 512


@triton.jit
def _select(
    logit, scores_rows, ex, em, bias_ptr, w_ptr, ids_ptr, stride_wt, stride_it,
    scaling, eps,
    TOPK: tl.constexpr, E_P2: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr,
    N_GROUP: tl.constexpr, NG_P2: tl.constexpr, TOPK_GROUP: tl.constexpr, RENORM: tl.constexpr, TOPK_P2: tl.constexpr,
    E,
):
    """Score ``logit [R, E_P2]`` (fp32, -inf past E), pick, weigh, store rows ``scores_rows`` (masked < 0)."""
    neg = float("-inf")
    emask = em[None, :]
    if SIGMOID:
        scores = tl.sigmoid(logit)
    else:
        z = tl.exp(logit - tl.max(logit, axis=1)[:, None])
        scores = z / tl.sum(z, axis=1)[:, None]
    scores = tl.where(emask, scores, 0.0)
    choice = scores
    if HAS_BIAS:
        choice = choice + tl.load(bias_ptr + ex, mask=em, other=0.0).to(tl.float32)[None, :]
    choice = tl.where(emask, choice, neg)
    exr = ex[None, :]
    if N_GROUP > 1:
        gsize = E // N_GROUP
        grp = exr // gsize
        keep = choice != choice  # all False (choice is never NaN: -inf or finite)
        gi = tl.arange(0, NG_P2)[None, :]
        gscore = tl.where(gi < N_GROUP, 0.0, neg) + tl.zeros_like(tl.sum(choice, axis=1))[:, None]
        for g in tl.static_range(N_GROUP):
            c = tl.where(grp == g, choice, neg)
            first = tl.argmax(c, axis=1)
            top1 = tl.max(c, axis=1)
            top2 = tl.max(tl.where(exr == first[:, None], neg, c), axis=1)
            gscore = tl.where(gi == g, (top1 + top2)[:, None], gscore)
        for _ in tl.static_range(TOPK_GROUP):
            best = tl.argmax(gscore, axis=1)
            keep = keep | (grp == best[:, None])
            gscore = tl.where(gi == best[:, None], neg, gscore)
        choice = tl.where(keep & emask, choice, neg)
    kk = tl.arange(0, TOPK_P2)[None, :]
    wv = tl.zeros_like(tl.sum(choice, axis=1))[:, None] + tl.zeros([1, TOPK_P2], dtype=tl.float32)
    iv = wv.to(tl.int64)
    for j in tl.static_range(TOPK):
        best, idx = tl.max(choice, axis=1, return_indices=True)
        idx = idx[:, None]
        if HAS_BIAS:  # the weight is the unbiased score: one more reduction
            best = tl.sum(tl.where(exr == idx, scores, 0.0), axis=1)
        wv = tl.where(kk == j, best[:, None], wv)
        iv = tl.where(kk == j, idx.to(tl.int64), iv)
        choice = tl.where(exr == idx, neg, choice)
    if RENORM:
        wv = wv / (tl.sum(wv, axis=1)[:, None] + eps)
    wv = wv * scaling
    rows = scores_rows[:, None].to(tl.int64)
    ok = (rows >= 0) & (kk < TOPK)
    tl.store(w_ptr + rows * stride_wt + kk, wv.to(w_ptr.dtype.element_ty), mask=ok)
    tl.store(ids_ptr + rows * stride_it + kk, iv, mask=ok)


@triton.jit
def _gating_kernel(
    logits_ptr, bias_ptr, w_ptr, ids_ptr,
    E, stride_lt, stride_le, stride_ls, stride_wt, stride_it,
    scaling, eps,
    TOPK: tl.constexpr, E_P2: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr,
    N_GROUP: tl.constexpr, NG_P2: tl.constexpr, TOPK_GROUP: tl.constexpr, RENORM: tl.constexpr, TOPK_P2: tl.constexpr,
    PARTS: tl.constexpr, ROUND: tl.constexpr, USE_PDL: tl.constexpr,
):
    """One program per token: a ``[1, E]`` tile. ``PARTS == 0``: ``logits`` are the logits;
    else ``PARTS`` fp32 partial sums of them (the router kernel's split-K slices,
    ``stride_ls`` apart), added in a fixed order and, with ``ROUND``, rounded to the
    weights' dtype (``x.dtype``) as ``F.linear`` would round the logits."""
    t = tl.program_id(0).to(tl.int64)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()  # the logits come from the previous kernel
        tl.extra.cuda.gdc_launch_dependents()
    ex = tl.arange(0, E_P2)
    em = ex < E
    row = tl.zeros([1], dtype=tl.int64) + t
    ptrs = logits_ptr + row[:, None] * stride_lt + ex[None, :] * stride_le
    if PARTS == 0:
        logit = tl.load(ptrs, mask=em[None, :], other=float("-inf")).to(tl.float32)
    else:
        logit = tl.zeros([1, E_P2], dtype=tl.float32)
        for s in tl.static_range(PARTS):
            logit += tl.load(ptrs + s * stride_ls, mask=em[None, :], other=0.0)
        if ROUND:
            logit = logit.to(w_ptr.dtype.element_ty).to(tl.float32)
        logit = tl.where(em[None, :], logit, float("-inf"))
    _select(logit, row, ex, em, bias_ptr, w_ptr, ids_ptr, stride_wt, stride_it, scaling, eps,
            TOPK, E_P2, SIGMOID, HAS_BIAS, N_GROUP, NG_P2, TOPK_GROUP, RENORM, TOPK_P2, E)


@triton.jit
def _router_gating_kernel(
    x_ptr, rw_ptr, bias_ptr, part_ptr, count_ptr, w_ptr, ids_ptr,
    T, E, H, K_PER,
    stride_xt, stride_xh, stride_re, stride_rh, stride_wt, stride_it,
    scaling, eps,
    TOPK: tl.constexpr, E_P2: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr,
    N_GROUP: tl.constexpr, NG_P2: tl.constexpr, TOPK_GROUP: tl.constexpr, RENORM: tl.constexpr, TOPK_P2: tl.constexpr,
    TM: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr, K_ITERS: tl.constexpr, NUM_E: tl.constexpr, SPLIT_K: tl.constexpr,
    ROUND: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, USE_PDL: tl.constexpr,
    PARTIAL_ONLY: tl.constexpr,
):
    pid_e = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = tl.arange(0, TM)
    rmask = rows < T
    ecol = pid_e * BE + tl.arange(0, BE)
    ecm = ecol < E
    kk = tl.arange(0, BK)
    k_lo = pid_k * K_PER
    if USE_PDL:
        tl.extra.cuda.gdc_wait()  # x comes from the previous kernel
        tl.extra.cuda.gdc_launch_dependents()
    acc = tl.zeros([TM, BE], dtype=tl.float32)
    for it in range(K_ITERS):  # K_ITERS * BK >= K_PER; the tail is masked
        k = k_lo + it * BK + kk
        kin = (k < H) & (it * BK + kk < K_PER)
        a = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xt + k[None, :] * stride_xh, mask=rmask[:, None] & kin[None, :], other=0.0)
        w = tl.load(rw_ptr + ecol[None, :].to(tl.int64) * stride_re + k[:, None] * stride_rh, mask=ecm[None, :] & kin[:, None], other=0.0)
        if UPCAST:  # fp32 x (or the interpreter): exact products in fp32
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w.to(a.dtype), acc, input_precision=DOT_PRECISION)
    ex = tl.arange(0, E_P2)
    em = ex < E
    out_rows = tl.where(rmask, rows, -1)
    if NUM_E * SPLIT_K == 1:
        logit = acc  # BE == E_P2: this program holds every logit
        if ROUND:
            logit = logit.to(x_ptr.dtype.element_ty).to(tl.float32)
        logit = tl.where(em[None, :], logit, float("-inf"))
        _select(logit, out_rows, ex, em, bias_ptr, w_ptr, ids_ptr, stride_wt, stride_it, scaling, eps,
                TOPK, E_P2, SIGMOID, HAS_BIAS, N_GROUP, NG_P2, TOPK_GROUP, RENORM, TOPK_P2, E)
    elif PARTIAL_ONLY:
        # partials [SPLIT_K, TM, E_P2] fp32 for the gating kernel, launched next, to sum
        tl.store(part_ptr + (pid_k * TM + rows[:, None]) * E_P2 + ecol[None, :], acc, mask=ecm[None, :])
    else:
        # partials [SPLIT_K, TM, E_P2] fp32; the last program to arrive sums and selects
        tl.store(part_ptr + (pid_k * TM + rows[:, None]) * E_P2 + ecol[None, :], acc, mask=ecm[None, :])
        tl.debug_barrier()
        ticket = tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu")
        if ticket == NUM_E * SPLIT_K - 1:
            logit = tl.zeros([TM, E_P2], dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                logit += tl.load(part_ptr + (s * TM + rows[:, None]) * E_P2 + ex[None, :], mask=em[None, :], other=0.0, cache_modifier=".cg")
            if ROUND:
                logit = logit.to(x_ptr.dtype.element_ty).to(tl.float32)
            logit = tl.where(em[None, :], logit, float("-inf"))
            _select(logit, out_rows, ex, em, bias_ptr, w_ptr, ids_ptr, stride_wt, stride_it, scaling, eps,
                    TOPK, E_P2, SIGMOID, HAS_BIAS, N_GROUP, NG_P2, TOPK_GROUP, RENORM, TOPK_P2, E)


def _select_args(top_k, bias, scoring, n_group, topk_group, renormalize, e_p2) -> dict:
    return dict(
        TOPK=top_k, E_P2=e_p2, SIGMOID=scoring == "sigmoid", HAS_BIAS=bias is not None,
        N_GROUP=n_group, NG_P2=triton.next_power_of_2(n_group), TOPK_GROUP=topk_group, RENORM=renormalize,
        TOPK_P2=triton.next_power_of_2(top_k),
    )


def gating_topk(
    logits: torch.Tensor,
    top_k: int,
    bias: Optional[torch.Tensor],
    scoring: str,
    n_group: int,
    topk_group: int,
    renormalize: bool,
    routed_scaling_factor: float,
    eps: float,
    pdl: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    t, e = logits.shape
    w = torch.empty(t, top_k, dtype=logits.dtype, device=logits.device)
    ids = torch.empty(t, top_k, dtype=torch.int64, device=logits.device)
    if t:
        select = _select_args(top_k, bias, scoring, n_group, topk_group, renormalize, triton.next_power_of_2(e))
        _launch_gating(logits, e, logits.stride(0), logits.stride(1), 0, 0, False, bias, w, ids, select, routed_scaling_factor, eps, pdl_launch(pdl, logits.device))
    return w, ids


def _launch_gating(src, e, stride_t, stride_e, stride_s, parts, round_logits, bias, w, ids, select, scaling, eps, pdl_kw) -> None:
    """:func:`_gating_kernel`, one program per token, on ``e`` logits (``parts == 0``) or on
    the router kernel's ``parts`` fp32 partial sums, ``stride_s`` apart."""
    _gating_kernel[(w.shape[0],)](
        src, bias if bias is not None else src, w, ids,
        e, stride_t, stride_e, stride_s, w.stride(0), ids.stride(0),
        float(scaling), float(eps),
        **select, PARTS=parts, ROUND=round_logits, USE_PDL=bool(pdl_kw),
        num_warps=1 if e <= 512 else 4, **pdl_kw,  # one warp: shuffle-only reductions
    )


def router_gating_topk(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    top_k: int,
    bias: Optional[torch.Tensor],
    scoring: str,
    n_group: int,
    topk_group: int,
    renormalize: bool,
    routed_scaling_factor: float,
    eps: float,
    config: Optional[RouterConfig] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``moe_gating_topk(x, ..., router_weight=router_weight)``: the router GEMM kernel, then
    (``two_launch``, the default) the gating kernel on its partials (see the module docstring)."""
    t, h = x.shape
    e = router_weight.shape[0]
    cfg = config or router_config_for(t)
    w = torch.empty(t, top_k, dtype=x.dtype, device=x.device)
    ids = torch.empty(t, top_k, dtype=torch.int64, device=x.device)
    if t == 0:
        return w, ids
    e_p2 = max(16, triton.next_power_of_2(e))  # >= 16: a tensor-core tile when one program holds every expert
    block_e = min(max(triton.next_power_of_2(cfg.block_e), 16), e_p2)
    num_e = triton.cdiv(e, block_e)
    # a K tile of at most 32 KB in fp32 (the dot's operands), so wide expert blocks fit shared memory
    bk = min(triton.next_power_of_2(cfg.block_k), max(16, 8192 // block_e))
    split = max(1, min(cfg.split_k, triton.cdiv(h, bk)))
    k_per = triton.cdiv(triton.cdiv(h, split), bk) * bk
    split = triton.cdiv(h, k_per)
    tm = max(16, triton.next_power_of_2(t))
    several = num_e * split > 1
    two = several and cfg.two_launch
    if several:
        part = torch.empty(split, tm, e_p2, dtype=torch.float32, device=x.device)
        count = part if two else torch.zeros(1, dtype=torch.int32, device=x.device)
    else:
        part = count = w  # never read
    extra = pdl_launch(cfg.pdl, x.device)
    select = _select_args(top_k, bias, scoring, n_group, topk_group, renormalize, e_p2)
    bias_arg = bias if bias is not None else x
    _router_gating_kernel[(num_e, split)](
        x, router_weight, bias_arg, part, count, w, ids,
        t, e, h, k_per,
        x.stride(0), x.stride(1), router_weight.stride(0), router_weight.stride(1), w.stride(0), ids.stride(0),
        float(routed_scaling_factor), float(eps),
        **select,
        TM=tm, BE=block_e, BK=bk, K_ITERS=k_per // bk, NUM_E=num_e, SPLIT_K=split,
        ROUND=x.dtype != torch.float32, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        UPCAST=x.dtype == torch.float32 or _interpreting(), USE_PDL=bool(extra), PARTIAL_ONLY=two,
        num_warps=cfg.num_warps if tm * e_p2 <= 4096 else max(cfg.num_warps, 8), num_stages=2, **extra,
    )
    if two:  # the partials [split, tm, e_p2]: token t's row at t * e_p2
        _launch_gating(part, e, e_p2, 1, tm * e_p2, split, x.dtype != torch.float32, bias, w, ids, select, routed_scaling_factor, eps, extra)
    return w, ids
