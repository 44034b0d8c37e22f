"""Triton kernel of ``moe_gating_topk``: one launch for scoring, grouped top-k and renormalisation.

Entry point: :func:`gating_topk`, with the contract of ``ascend_graph/ops/moe.py``
(``gating_reference`` is the ground truth). On the CPU it runs under ``TRITON_INTERPRET=1``.

Why a kernel: the plain-torch routing is about eight launches (softmax, topk, gather, sum,
add, div, mul, casts); at one decode token each costs more than its work, and together
they are a third of the MoE layer's ~25 us bandwidth floor on an H100.

One program per token: the row of ``E`` logits is scored in float32 (softmax or
sigmoid), the choice score adds the correction bias, groups are ranked by the sum of
their two best choice scores and all but the best ``topk_group`` are masked, then the
``top_k`` experts are taken one argmax at a time (descending, like ``torch.topk``).
The weights are the unbiased scores, renormalised and scaled in float32.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["gating_topk", "gating_supported"]


def gating_supported(logits: torch.Tensor, n_group: int) -> bool:
    """Whether :func:`gating_topk` takes this problem (a 2-D float row per token, whole groups)."""
    e = logits.shape[-1]
    return logits.dtype in (torch.float32, torch.float16, torch.bfloat16) and e % n_group == 0 and e <= 4096


@triton.jit
def _gating_kernel(
    logits_ptr, bias_ptr, w_ptr, ids_ptr,
    E, stride_lt, stride_le, stride_wt, stride_it,
    scaling, eps,
    TOPK: tl.constexpr, E_P2: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr,
    N_GROUP: tl.constexpr, NG_P2: tl.constexpr, TOPK_GROUP: tl.constexpr, RENORM: tl.constexpr, TOPK_P2: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    ex = tl.arange(0, E_P2)
    em = ex < E
    neg = float("-inf")
    logit = tl.load(logits_ptr + t * stride_lt + ex * stride_le, mask=em, other=neg).to(tl.float32)
    if SIGMOID:
        scores = tl.sigmoid(logit)
    else:
        z = tl.exp(logit - tl.max(logit, axis=0))
        scores = z / tl.sum(z, axis=0)
    scores = tl.where(em, scores, 0.0)
    choice = scores
    if HAS_BIAS:
        choice = choice + tl.load(bias_ptr + ex, mask=em, other=0.0).to(tl.float32)
    choice = tl.where(em, choice, neg)
    if N_GROUP > 1:
        gsize = E // N_GROUP
        grp = ex // gsize
        keep = ex < 0  # all False
        gi = tl.arange(0, NG_P2)
        gscore = tl.where(gi < N_GROUP, 0.0, neg)
        for g in tl.static_range(N_GROUP):
            c = tl.where(grp == g, choice, neg)
            first = tl.argmax(c, axis=0)
            top1 = tl.max(c, axis=0)
            top2 = tl.max(tl.where(ex == first, neg, c), axis=0)
            gscore = tl.where(gi == g, top1 + top2, gscore)
        for _ in tl.static_range(TOPK_GROUP):
            best = tl.argmax(gscore, axis=0)
            keep = keep | (grp == best)
            gscore = tl.where(gi == best, neg, gscore)
        choice = tl.where(keep & em, choice, neg)
    kk = tl.arange(0, TOPK_P2)
    wv = tl.zeros([TOPK_P2], dtype=tl.float32)
    iv = tl.zeros([TOPK_P2], dtype=tl.int64)
    for j in tl.static_range(TOPK):
        idx = tl.argmax(choice, axis=0)
        wv = tl.where(kk == j, tl.sum(tl.where(ex == idx, scores, 0.0), axis=0), wv)
        iv = tl.where(kk == j, idx.to(tl.int64), iv)
        choice = tl.where(ex == idx, neg, choice)
    if RENORM:
        wv = wv / (tl.sum(wv, axis=0) + eps)
    wv = wv * scaling
    tl.store(w_ptr + t * stride_wt + kk, wv.to(w_ptr.dtype.element_ty), mask=kk < TOPK)
    tl.store(ids_ptr + t * stride_it + kk, iv, mask=kk < TOPK)


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
) -> tuple[torch.Tensor, torch.Tensor]:
    t, e = logits.shape
    w = torch.empty(t, top_k, dtype=logits.dtype, device=logits.device)
    ids = torch.empty(t, top_k, dtype=torch.int64, device=logits.device)
    if t:
        _gating_kernel[(t,)](
            logits, bias if bias is not None else logits, w, ids,
            e, logits.stride(0), logits.stride(1), w.stride(0), ids.stride(0),
            float(routed_scaling_factor), float(eps),
            TOPK=top_k, E_P2=triton.next_power_of_2(e), SIGMOID=scoring == "sigmoid", HAS_BIAS=bias is not None,
            N_GROUP=n_group, NG_P2=triton.next_power_of_2(n_group), TOPK_GROUP=topk_group, RENORM=renormalize,
            TOPK_P2=triton.next_power_of_2(top_k), num_warps=1 if e <= 512 else 4,  # one warp: shuffle-only reductions
        )
    return w, ids
