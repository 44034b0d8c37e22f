"""Communication + norm contracts: an expert-parallel MoE combine fused with the next
layer's residual add + RMSNorm.

``moe_combine_add_rms_norm(x, topk_weights, topk_ids, w13, w2, residual, weight, eps,
activation, active_mask, ep_group, ep_world_size, ep_rank) -> (normed, s)`` with
``s = moe_dispatch_ffn_combine(x, ...) + residual`` and ``normed = rms_norm(s) * weight``
(the Llama form; ``x, residual [T, H]``, ``weight [H]``). The CPU reference is literally
those two ops in sequence (the EP combine of ``distributed/ep.py`` when
``ep_world_size > 1``, then ``add_rms_norm``), so it runs wherever they run.

Mirrors ``npu_moe_distribute_combine_add_rms_norm`` (torch-npu 2.13.0): the MC2 combine
that takes ``npu_moe_distribute_dispatch_v2``'s outputs (``expand_x`` after the experts,
``assist_info`` as ``expand_idx``, ``ep_send_counts``, ``tp_send_counts``), the routing
weights as ``expert_scales``, ``x_active_mask``, plus ``residual_x [T, 1, H]``,
``gamma [H]`` and ``norm_eps``, and returns ``(y, rstd, x)`` of ``[T, 1, H]``,
``[T, 1, 1]``, ``[T, 1, H]``. Every argument of our contract maps onto that call; the
NPU binding is ``ops/kernels/npu/comm_norm.py``. Not in the contract: shared experts
(the kernel's ``shared_expert_x`` semantics are not documented in the wheel, so the
fusion row leaves MoE calls with shared experts alone), the Gemma norm (the kernel has
no ``1 + w`` form), quantized communication. Numerics: the kernel adds the combined
rows to the residual before rounding them to the activation dtype; the reference rounds
the MoE output first (one bf16 rounding apart).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import moe as _moe
from . import norm_rope as _norm

__all__ = ["moe_combine_add_rms_norm"]


@torch.library.custom_op("ascend_graph::moe_combine_add_rms_norm", mutates_args=())
def moe_combine_add_rms_norm(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    activation: str = "silu",
    active_mask: Optional[torch.Tensor] = None,
    ep_group: str = "",
    ep_world_size: int = 1,
    ep_rank: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``add_rms_norm(moe_dispatch_ffn_combine(x, ...), residual, weight, eps)``; mirrors
    ``npu_moe_distribute_combine_add_rms_norm``."""
    y = _moe.moe_dispatch_ffn_combine(x, topk_weights, topk_ids, w13, w2, activation, active_mask, ep_group=ep_group, ep_world_size=ep_world_size, ep_rank=ep_rank)
    return _norm.add_rms_norm(y, residual, weight, eps, False)


@moe_combine_add_rms_norm.register_fake
def _(x, topk_weights, topk_ids, w13, w2, residual, weight, eps, activation="silu", active_mask=None, ep_group="", ep_world_size=1, ep_rank=0):
    y = _moe.moe_dispatch_ffn_combine(x, topk_weights, topk_ids, w13, w2, activation, active_mask, ep_group=ep_group, ep_world_size=ep_world_size, ep_rank=ep_rank)
    return _norm.add_rms_norm(y, residual, weight, eps, False)
