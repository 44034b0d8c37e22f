"""CUDA implementation of ``moe_dispatch_ffn_combine``: picks the Triton fused path or grouped GEMMs.

Entry point: :func:`dispatch_ffn_combine` (attached to the op's ``cuda`` key by
``ascend_graph/ops/moe.py``).

Which path (by static shapes only, so one captured graph per bucket keeps one path):

- up to :data:`TRITON_MAX_TOKENS` tokens, or whenever ``torch._grouped_mm`` cannot run the
  operands (fp16/fp32, GPUs before SM80): the Triton kernels of ``moe_fused.py``, which
  read each selected expert once per block of its pairs and nothing of the others;
- above it, with bf16 on SM80+: sort + two ``torch._grouped_mm`` + ``index_add`` below,
  which wins once most experts are hit and the GEMMs have real M;
- operands of mixed dtypes: one batched GEMM over per-pair gathered weights (exact, but
  it reads each selected expert once per pair).

Invariants of the grouped-GEMM path:

- static shapes only (no ``nonzero``, no ``.tolist()``, no host sync), so the whole op is
  capturable in a CUDA graph and one graph serves any routing;
- the (token, slot) pairs are sorted by expert with masked-out pairs (ids outside
  ``[0, E)``, inactive tokens) given the sentinel id ``E``, so they sort to the tail and
  lie past ``offs[-1]``, where ``torch._grouped_mm`` does no work; the rows it leaves
  unwritten there are zeroed by a ``where`` before the combine;
- offsets are cumulative int32 on the device (``torch._grouped_mm``'s contract in torch
  2.9-2.13), counted with ``scatter_add`` rather than ``bincount`` (whose output size
  depends on the data);
- the combine accumulates in float32 and casts to ``x.dtype`` once.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

__all__ = ["dispatch_ffn_combine", "sorted_experts", "grouped_mm_supported", "TRITON_MAX_TOKENS"]

#: largest token count sent to the Triton path when ``torch._grouped_mm`` is available
#: (H100, Qwen3-30B-A3B shape: benchmarks/results/moe.md has the crossover measurement)
TRITON_MAX_TOKENS = 256

log = logging.getLogger("ascend_graph.ops.kernels.triton.moe")


def grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` runs these operands on this device."""
    if not hasattr(torch, "_grouped_mm") or x.device.type != "cuda":
        return False
    if x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16:
        return False
    return torch.cuda.get_device_capability(x.device) >= (8, 0)


def _act(h: torch.Tensor, activation: str, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    from ...moe import apply_activation

    return apply_activation(h, activation, alpha, limit)


def dispatch_ffn_combine(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    activation: str,
    active_mask: Optional[torch.Tensor],
) -> torch.Tensor:
    from . import moe_fused

    if moe_fused.triton_supported(x, w13, w2) and (x.shape[0] <= TRITON_MAX_TOKENS or not grouped_mm_supported(x, w13)):
        return moe_fused.fused_experts(x, topk_weights, topk_ids, w13, w2, activation, active_mask)
    return sorted_experts(x, topk_weights, topk_ids, w13, w2, activation, active_mask)


def sorted_experts(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    activation: str,
    active_mask: Optional[torch.Tensor],
    w13_bias: Optional[torch.Tensor] = None,
    w2_bias: Optional[torch.Tensor] = None,
    alpha: float = 1.702,
    limit: float = 7.0,
) -> torch.Tensor:
    """Sort + two ``torch._grouped_mm`` (or the batched-GEMM fallback) + ``index_add`` combine.

    Expert biases are gathered per sorted pair (``bias[expert of the pair]``, a static
    shape) and added after each GEMM, as HF's grouped experts do.
    """
    t, h = x.shape
    grouped = grouped_mm_supported(x, w13)
    e, k = w13.shape[0], topk_ids.shape[1]
    ids = topk_ids.long()
    valid = (ids >= 0) & (ids < e)
    if active_mask is not None:
        valid = valid & active_mask.bool().unsqueeze(1)
    flat = torch.where(valid, ids, e).reshape(-1)
    sorted_ids, perm = torch.sort(flat)
    tokens = perm // k
    pair_w = topk_weights.reshape(-1)[perm].float()
    dead = (sorted_ids >= e).unsqueeze(1)
    xs = x[tokens]
    safe = sorted_ids.clamp(max=e - 1)
    if grouped:
        counts = torch.zeros(e + 1, dtype=torch.int32, device=x.device).scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        offs = torch.cumsum(counts[:e], 0, dtype=torch.int32)
        hidden = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)
        # rows past offs[-1] are left unwritten: zero them before they can make NaNs
        hidden = torch.where(dead, 0, hidden)
        if w13_bias is not None:
            hidden = hidden + w13_bias[safe]
        y = torch._grouped_mm(_act(hidden, activation, alpha, limit), w2.transpose(1, 2), offs=offs)
    else:
        hidden = torch.bmm(w13[safe], xs.unsqueeze(-1)).squeeze(-1)
        if w13_bias is not None:
            hidden = hidden + w13_bias[safe]
        y = torch.bmm(w2[safe], _act(hidden, activation, alpha, limit).unsqueeze(-1)).squeeze(-1)
    if w2_bias is not None:
        y = y + w2_bias[safe]
    y = torch.where(dead, 0.0, y.float() * pair_w.unsqueeze(1))
    out = torch.zeros(t, h, dtype=torch.float32, device=x.device).index_add_(0, tokens, y)
    return out.to(x.dtype)
