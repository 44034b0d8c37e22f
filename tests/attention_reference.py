"""Attention written out in float64 for the tests: the independent reference.

On the CPU both the op (``ascend_graph.attention``) and the graphs it replaces run
``F.scaled_dot_product_attention``, so comparing the two proves nothing about either.
This module spells the math out step by step instead (explicit kv-head index, score
matmul, mask, max-subtracted exp, row sum, matmul with V), in float64, and shares no code
with the package or with SDPA.
"""

from __future__ import annotations

import torch


def causal_keep(sq: int, skv: int, *, window: int | None = None, top_left: bool = False, device="cpu") -> torch.Tensor:
    """[Sq, Skv] bool: which key each query may see.

    Bottom-right alignment (the op's and FIA's: the last query sees every key) puts query
    i at key position i + Skv - Sq; SDPA's own ``is_causal`` is top-left (query i at key
    position i). ``window`` keeps only the last ``window`` keys up to that position.
    """
    offset = 0 if top_left else skv - sq
    qpos = torch.arange(sq, device=device)[:, None] + offset
    kpos = torch.arange(skv, device=device)[None, :]
    keep = kpos <= qpos
    if window is not None:
        keep = keep & (kpos > qpos - window)
    return keep


def attention_f64(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    keep: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + bias, masked to ``keep``) v, in float64; [B, Nq, Sq, Dv].

    q [B, Nq, Sq, D], k [B, Nkv, Skv, D], v [B, Nkv, Skv, Dv]; query head h reads kv head
    h // (Nq // Nkv). ``keep`` (bool) and ``bias`` (additive) broadcast to
    [B, Nq, Sq, Skv]. ``sinks`` [Nq]: one extra logit per head in the denominator only.
    A row that may see no key (and has no sink) is zero.
    """
    b, nq, sq, _ = q.shape
    nkv, skv = k.shape[1], k.shape[2]
    kv_head = torch.arange(nq, device=q.device) // (nq // nkv)
    k64 = k.double().index_select(1, kv_head)
    v64 = v.double().index_select(1, kv_head)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), k64) * scale
    if bias is not None:
        scores = scores + bias.double()
    allowed = torch.ones(b, nq, sq, skv, dtype=torch.bool, device=q.device)
    if keep is not None:
        allowed = allowed & keep
    scores = torch.where(allowed, scores, torch.full_like(scores, float("-inf")))
    if sinks is not None:
        sink = sinks.double().view(1, nq, 1, 1).expand(b, nq, sq, 1)
        row_max = torch.maximum(scores.amax(-1, keepdim=True), sink)
    else:
        row_max = scores.amax(-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.where(allowed, torch.exp(scores - row_max), torch.zeros_like(scores))
    denom = weights.sum(-1, keepdim=True)
    if sinks is not None:
        denom = denom + torch.exp(sink - row_max)
    weights = weights / torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.einsum("bhqk,bhkd->bhqd", weights, v64)


#: tolerance of an op's output against the float64 reference, by the op's dtype
TOLERANCE = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def assert_close_f64(out: torch.Tensor, ref64: torch.Tensor, **tol) -> None:
    """``out`` (any float dtype) against the float64 reference, at ``out``'s tolerance."""
    assert ref64.dtype == torch.float64
    torch.testing.assert_close(out.double(), ref64, **(tol or TOLERANCE[out.dtype]))
