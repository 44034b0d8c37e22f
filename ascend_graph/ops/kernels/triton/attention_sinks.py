"""Dense attention with learned per-head sink logits through SDPA's fused kernels.

Entry point: :func:`sdpa_with_sinks`, called by ``ops/attention.py``'s
``dense_attention_sdpa`` for the dense op when ``sinks`` is given (GptOss), on the CPU and
on CUDA.

A sink is a virtual key with logit ``sinks[h]`` and a zero value: it adds ``exp(sink)``
to each row's softmax denominator and nothing to the numerator. With ``lse`` the row's
log-sum-exp over the real keys (which the fused kernels return beside their output),

    out_sinks = out * Z / (Z + exp(sink)) = out * sigmoid(lse - sink),    Z = exp(lse)

so one fused SDPA call plus one elementwise rescale gives the exact result, without the
``[B, N, Sq, Skv]`` score tensor the eager form materialises. Kernels: the CPU flash
kernel (``_scaled_dot_product_flash_attention_for_cpu``, which takes a mask and returns
the log-sum-exp) and CUDA's memory-efficient kernel (``compute_log_sumexp=True``; it takes
an additive bias, which must be 16-element aligned in its last dim, as SDPA itself pads
it). A row that attends to nothing has ``lse = -inf``: its rescale is 0, its output 0,
as the reference gives. Neither kernel broadcasts KV heads: GQA expands them first.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["sdpa_with_sinks"]

#: the memory-efficient kernel reads its bias in 16-element aligned rows
_BIAS_ALIGN = 16


def _additive(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def sdpa_with_sinks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    sinks: torch.Tensor,
    scale: float,
    is_causal: bool,
    gqa: bool,
) -> torch.Tensor:
    """``[B, Nq, Sq, Dv]`` attention with sinks; ``mask`` already holds any bottom-right
    causal/window rule (``is_causal`` is SDPA's own, top-left, used only for square scores)."""
    if gqa:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    b, n, sq, _ = q.shape
    skv = k.shape[2]
    bias = _additive(mask, q.dtype)
    if q.device.type == "cuda":
        if bias is not None:
            pad = (-skv) % _BIAS_ALIGN
            bias = bias.expand(b, n, sq, skv)
            if pad:
                bias = F.pad(bias, (0, pad))[..., :skv]
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, is_causal, scale=scale)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, attn_mask=bias, scale=scale)
    # efficient attention pads the log-sum-exp's query dim to a multiple of 32
    lse = lse[..., :sq].float().unsqueeze(-1)
    keep = torch.sigmoid(lse - sinks.float().view(1, n, 1, 1))
    return (out.float() * keep).to(q.dtype)
