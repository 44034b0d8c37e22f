"""NPU bindings of the MoE ops, and the MC2 communication-buffer check.

Entry points: :func:`register` (attaches the bindings to the ``npu`` key; called by
``register_all``), :data:`META_CHECKS` (held against torch-npu 2.13.0's meta
registrations by ``tests/ops/test_npu_contract.py``), :func:`mc2_buffer_bytes` and
:func:`check_comm_buffer` (pure; tested here without an NPU).

Mapping (torch_npu names and keywords from ``CustomFunctions.h``):

- ``moe_gating_topk``: with ``router_weight``, the router GEMM first (``F.linear``, a
  matmul on the NPU), then as with logits: plain softmax top-k -> ``npu_moe_gating_top_k_softmax``; sigmoid,
  a correction bias or expert groups -> ``npu_moe_gating_top_k`` (``norm_type`` 1 =
  sigmoid, ``group_select_mode`` 1 = groups scored by their top-2 sum, as DeepSeek-V3).
  The kernels give int32 ids; we widen them to int64 (our contract). The weights are
  taken from the kernel's normalised scores (``out_flag=True`` -> ``y2``) gathered at the
  chosen ids, then renormalised and scaled in torch, so our weight semantics do not rest
  on how each CANN version treats ``renorm``/``routed_scaling_factor``.
- ``moe_dispatch_ffn_combine``, one device: ``npu_moe_init_routing_v2`` (sort the pairs
  by expert, per-expert counts, inactive tokens kept out through ``active_num``),
  ``npu_grouped_matmul`` twice (``group_list_type=1``: counts), ``npu_swiglu`` for SiLU,
  ``npu_moe_finalize_routing`` (weighted un-permute). Weights are HF-layout
  ``[E, N, K]`` and passed as transposed views, which the GMM reads without a copy.
- ``moe_dispatch_ffn_combine_list`` (per-expert weights, a ``ModuleList`` of experts): the
  same routing and finalize, with ``npu_grouped_matmul``'s TensorList form: ``weight`` is
  the list of the experts' own ``[N, K]`` tensors as ``[K, N]`` views (``split_item=2``,
  ``group_type=0``: one x, one weight per group, one y), never stacked; separate gate and
  up lists take one GMM each.
- expert parallel (``ep_world_size > 1``): ``npu_moe_distribute_dispatch_v2`` /
  ``npu_moe_distribute_combine_v2`` with ``x_active_mask`` and ``global_bs=0`` (every
  rank has the same padded token count, so the shapes stay static), after checking the
  HCCL window is large enough (:func:`check_comm_buffer`).

Nothing here has run on an NPU (none exists on this project's machines).
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from ....errors import ConfigError

__all__ = ["register", "META_CHECKS", "mc2_buffer_bytes", "check_comm_buffer", "CommBufferError", "gating_topk_npu", "dispatch_ffn_combine_npu", "dispatch_ffn_combine_list_npu"]

log = logging.getLogger("ascend_graph.ops.npu.moe")

_MB = 1024 * 1024
#: HCCL's default window when HCCL_BUFFSIZE is unset (MB)
HCCL_DEFAULT_BUFFSIZE_MB = 200


class CommBufferError(ConfigError):
    """The HCCL window (HCCL_BUFFSIZE) is smaller than MC2 dispatch/combine needs."""


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def mc2_buffer_bytes(tokens: int, hidden: int, top_k: int, num_experts: int, ep_world_size: int, dtype: torch.dtype = torch.bfloat16, shared_experts: int = 0) -> int:
    """Bytes of HCCL window one rank needs for MC2 dispatch + combine.

    CANN's documented requirement for ``MoeDistributeDispatch``/``Combine`` (A3)::

        2 * (local_experts * max_bs * ep_world * Align512(Align32(h * dsize) + 64)
             + (top_k + shared_experts) * max_bs * Align512(h * dsize))

    with ``max_bs`` the tokens per rank (the largest bucket) and ``local_experts =
    num_experts / ep_world_size``. A pure function, so the requirement is known (and
    checked) before any graph is captured.
    """
    if min(tokens, hidden, top_k, num_experts, ep_world_size) < 1 or num_experts % ep_world_size:
        raise ConfigError(
            "invalid MC2 sizes",
            expected="positive sizes and num_experts divisible by ep_world_size",
            got=dict(tokens=tokens, hidden=hidden, top_k=top_k, num_experts=num_experts, ep_world_size=ep_world_size),
        )
    dsize = torch.empty((), dtype=dtype).element_size()
    local = num_experts // ep_world_size
    row = _align(hidden * dsize, 512)
    window = local * tokens * ep_world_size * _align(_align(hidden * dsize, 32) + 64, 512) + (top_k + shared_experts) * tokens * row
    return 2 * window


def check_comm_buffer(tokens: int, hidden: int, top_k: int, num_experts: int, ep_world_size: int, dtype: torch.dtype, configured_mb: int) -> int:
    """Raise :class:`CommBufferError` unless ``configured_mb`` MB holds MC2's window; returns the MB needed."""
    need = mc2_buffer_bytes(tokens, hidden, top_k, num_experts, ep_world_size, dtype)
    need_mb = -(-need // _MB)
    if configured_mb < need_mb:
        raise CommBufferError(
            f"HCCL window too small for MoE dispatch/combine of {tokens} tokens x hidden {hidden}, top-{top_k}, {num_experts} experts over EP {ep_world_size}",
            expected=f">= {need_mb} MB",
            got=f"{configured_mb} MB",
            hint=f"export HCCL_BUFFSIZE={need_mb} (MB) before the process starts, or lower the largest bucket (tokens per rank)",
        )
    return need_mb


def hccl_buffsize_mb() -> int:
    """The window HCCL will allocate: ``HCCL_BUFFSIZE`` (MB), which HCCL itself reads at init."""
    value = os.environ.get("HCCL_BUFFSIZE")
    if value is None:
        return HCCL_DEFAULT_BUFFSIZE_MB
    try:
        return int(value)
    except ValueError:
        raise ConfigError("HCCL_BUFFSIZE is not an integer", expected="MB as an integer", got=repr(value)) from None


# -- bindings -----------------------------------------------------------------------


def gating_topk_npu(logits, top_k, bias=None, scoring="softmax", n_group=1, topk_group=1, renormalize=True, routed_scaling_factor=1.0, eps=0.0, router_weight=None):
    import torch_npu

    out_dtype = logits.dtype
    if router_weight is not None:
        # the router GEMM as its own matmul (the gating kernels take logits), then as below
        logits = torch.nn.functional.linear(logits, router_weight.to(logits.dtype)).float()
    if scoring == "softmax" and bias is None and n_group == 1:
        weights, ids, _row_idx = torch_npu.npu_moe_gating_top_k_softmax(logits, k=top_k)
        weights = weights.float()
    else:
        _y, ids, scores = torch_npu.npu_moe_gating_top_k(
            logits.float(),
            k=top_k,
            bias=None if bias is None else bias.float(),
            k_group=topk_group,
            group_count=n_group,
            group_select_mode=1,
            renorm=0,
            norm_type=0 if scoring == "softmax" else 1,
            out_flag=True,
            routed_scaling_factor=1.0,
            eps=1e-20,
        )
        weights = scores.gather(1, ids.long())
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + eps)
    return (weights * routed_scaling_factor).to(out_dtype), ids.long()


def _act_npu(h: torch.Tensor, activation: str, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    if activation == "silu":
        import torch_npu

        return torch_npu.npu_swiglu(h, dim=-1)
    if activation == "clipped_swiglu":
        import torch_npu

        # GptOss's form: interleaved gate/up, (clamp(up) + 1) * clamp(gate) * sigmoid(alpha * gate)
        return torch_npu.npu_clipped_swiglu(h, dim=-1, alpha=alpha, limit=limit, bias=1.0, interleaved=True)
    from ...moe import apply_activation

    return apply_activation(h, activation)


def _gmm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    import torch_npu

    # HF stores [E, N, K]; the GMM wants [E, K, N]: a transposed view, read in place.
    # Expert biases ([E, N], GptOss) are the GMM's own per-group bias.
    if bias is None:
        return torch_npu.npu_grouped_matmul([x], [w.transpose(1, 2)], group_list=counts, split_item=2, group_type=0, group_list_type=1)[0]
    return torch_npu.npu_grouped_matmul([x], [w.transpose(1, 2)], bias=[bias], group_list=counts, split_item=2, group_type=0, group_list_type=1)[0]


def _route_npu(x: torch.Tensor, topk_weights: torch.Tensor, ids: torch.Tensor, e: int, active_mask: Optional[torch.Tensor]):
    """One device: sort the (token, slot) pairs by expert; (rows, row index, per-expert counts, weights)."""
    import torch_npu

    t, k = ids.shape
    weights = topk_weights
    if active_mask is not None:
        # inactive tokens route to expert E: outside active_expert_range, so no GMM row
        ids = torch.where(active_mask.bool().unsqueeze(1), ids, e)
        weights = torch.where(active_mask.bool().unsqueeze(1), weights, 0)
    expanded_x, expanded_row_idx, counts, _ = torch_npu.npu_moe_init_routing_v2(
        x, ids, active_num=t * k, expert_num=e, expert_tokens_num_type=1, expert_tokens_num_flag=True, quant_mode=-1, active_expert_range=[0, e], row_idx_type=0
    )
    return expanded_x, expanded_row_idx, counts, weights


def _finalize_npu(y: torch.Tensor, expanded_row_idx: torch.Tensor, weights: torch.Tensor, k: int) -> torch.Tensor:
    """The weighted un-permute: ``out[t] = sum_j w[t, j] * y[row of (t, j)]``."""
    import torch_npu

    return torch_npu.npu_moe_finalize_routing(
        y,
        skip1=None,
        skip2=None,
        bias=None,
        scales=weights.to(y.dtype),
        expanded_src_to_dst_row=expanded_row_idx,
        export_for_source_row=None,
        drop_pad_mode=2,
        k=k,
    )


def _gmm_list(x: torch.Tensor, ws: list[torch.Tensor], counts: torch.Tensor) -> torch.Tensor:
    import torch_npu

    # The TensorList form ("single x, multiple weights, single y"): one [K, N] weight per
    # group, each expert's own nn.Linear weight [N, K] passed as its transposed view (no
    # copy, no stack); split_item=2 gives one output of all rows, group_list the counts.
    return torch_npu.npu_grouped_matmul([x], [w.t() for w in ws], group_list=counts, split_item=2, group_type=0, group_list_type=1)[0]


def dispatch_ffn_combine_list_npu(x, topk_weights, topk_ids, w1, w3, w2, activation="silu", active_mask=None):
    k = topk_ids.shape[1]
    expanded_x, expanded_row_idx, counts, weights = _route_npu(x, topk_weights, topk_ids.int(), len(w1), active_mask)
    if w3:
        # gate and up are separate tensors: two GMMs; joining them for npu_swiglu would copy
        # the [rows, 2I] activations, the plain product does not
        from ...moe import _GATES

        h = _GATES[activation](_gmm_list(expanded_x, w1, counts)) * _gmm_list(expanded_x, w3, counts)
    else:
        h = _act_npu(_gmm_list(expanded_x, w1, counts), activation)
    out = _finalize_npu(_gmm_list(h, w2, counts), expanded_row_idx, weights, k)
    return out.to(x.dtype)


def dispatch_ffn_combine_npu(x, topk_weights, topk_ids, w13, w2, activation="silu", active_mask=None, shared_gate=None, shared_up=None, shared_down=None, ep_group="", ep_world_size=1, ep_rank=0, shared_expert_gate=None, w13_bias=None, w2_bias=None, swiglu_alpha=1.702, swiglu_limit=7.0):
    import torch_npu

    t, h = x.shape
    k = topk_ids.shape[1]
    ids = topk_ids.int()
    if ep_world_size > 1:
        e_global = w13.shape[0] * ep_world_size
        check_comm_buffer(t, h, k, e_global, ep_world_size, x.dtype, hccl_buffsize_mb())
        mask = None if active_mask is None else active_mask.bool()
        expand_x, _scales, assist, counts, ep_counts, tp_counts, _ = torch_npu.npu_moe_distribute_dispatch_v2(
            x, ids, group_ep=ep_group, ep_world_size=ep_world_size, ep_rank_id=ep_rank, moe_expert_num=e_global, x_active_mask=mask, global_bs=0, expert_token_nums_type=1
        )
        y = _gmm(_act_npu(_gmm(expand_x, w13, counts, w13_bias), activation, swiglu_alpha, swiglu_limit), w2, counts, w2_bias)
        out = torch_npu.npu_moe_distribute_combine_v2(
            y, ids, assist, ep_counts, topk_weights.float(),
            group_ep=ep_group, ep_world_size=ep_world_size, ep_rank_id=ep_rank, moe_expert_num=e_global, tp_send_counts=tp_counts, x_active_mask=mask, global_bs=0,
        )
    else:
        expanded_x, expanded_row_idx, counts, weights = _route_npu(x, topk_weights, ids, w13.shape[0], active_mask)
        y = _gmm(_act_npu(_gmm(expanded_x, w13, counts, w13_bias), activation, swiglu_alpha, swiglu_limit), w2, counts, w2_bias)
        out = _finalize_npu(y, expanded_row_idx, weights, k)
    if shared_gate is not None:
        from ...moe import shared_experts_reference

        out = out + shared_experts_reference(x, shared_gate, shared_up, shared_down, activation, shared_expert_gate)
    return out.to(x.dtype)


def register() -> None:
    from ... import moe as ops

    ops.moe_gating_topk.register_kernel("npu", gating_topk_npu)
    ops.moe_dispatch_ffn_combine.register_kernel("npu", dispatch_ffn_combine_npu)
    ops.moe_dispatch_ffn_combine_list.register_kernel("npu", dispatch_ffn_combine_list_npu)


# -- contract checks ----------------------------------------------------------------


def _fake_shapes(fn, *args, **kwargs) -> list[tuple[int, ...]]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        out = fn(*fake, **kwargs)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [tuple(o.shape) for o in outs]


_T, _H, _I, _E, _K = 7, 64, 32, 16, 4


def _check_gating_softmax():
    from ... import moe as ops

    logits = torch.randn(_T, _E)
    shapes = _fake_shapes(ops.moe_gating_topk, logits, _K)
    # torch_npu's third output (row_idx) is [T, k] too
    return shapes + [shapes[0]], (logits,), {"k": _K}


def _check_gating_grouped():
    from ... import moe as ops

    logits, bias = torch.randn(_T, _E), torch.randn(_E)
    shapes = _fake_shapes(ops.moe_gating_topk, logits, _K, bias, "sigmoid", 4, 2, True, 2.5, 1e-20)
    kwargs = dict(k=_K, bias=bias, k_group=2, group_count=4, group_select_mode=1, renorm=0, norm_type=1, out_flag=True, routed_scaling_factor=1.0, eps=1e-20)
    return shapes + [(_T, _E)], (logits,), kwargs


def _check_init_routing():
    # our experts op keeps x's shape; the routing step expands T*k rows of hidden H
    x, ids = torch.randn(_T, _H), torch.randint(0, _E, (_T, _K), dtype=torch.int32)
    kwargs = dict(active_num=_T * _K, expert_num=_E, expert_tokens_num_type=1, expert_tokens_num_flag=True, quant_mode=-1, active_expert_range=[0, _E], row_idx_type=0)
    return [(_T * _K, _H), (_T * _K,), (_E,), (_T * _K,)], (x, ids), kwargs


def _check_finalize():
    from ... import moe as ops

    x = torch.randn(_T, _H)
    w, ids = torch.rand(_T, _K), torch.randint(0, _E, (_T, _K))
    w13, w2 = torch.randn(_E, 2 * _I, _H), torch.randn(_E, _H, _I)
    shapes = _fake_shapes(ops.moe_dispatch_ffn_combine, x, w, ids, w13, w2)
    rows = torch.randn(_T * _K, _H)
    row_idx = torch.arange(_T * _K, dtype=torch.int32)
    return shapes, (rows, None, None, None, w, row_idx, None), {"drop_pad_mode": 2, "k": _K}


def _check_dispatch_combine():
    from ... import moe as ops

    ep, e_global = 4, 32
    x = torch.randn(_T, _H)
    w, ids = torch.rand(_T, _K), torch.randint(0, e_global, (_T, _K), dtype=torch.int32)
    shapes = _fake_shapes(ops.moe_dispatch_ffn_combine, x, w, ids, torch.randn(e_global // ep, 2 * _I, _H), torch.randn(e_global // ep, _H, _I))
    a = _T * ep * min(e_global // ep, _K)
    expand_x = torch.randn(a, _H)
    assist = torch.zeros(max(_T * _K, a * 128), dtype=torch.int32)
    ep_counts = torch.zeros(ep * (e_global // ep), dtype=torch.int32)
    kwargs = dict(group_ep="ep", ep_world_size=ep, ep_rank_id=1, moe_expert_num=e_global, tp_send_counts=torch.zeros(0, dtype=torch.int32), x_active_mask=torch.ones(_T, dtype=torch.bool), global_bs=0)
    return shapes, (expand_x, ids, assist, ep_counts, w), kwargs


def _check_gmm_list():
    # the list form as _gmm_list calls it: rows [P, H] x E views [H, I] -> [P, I]
    rows = torch.randn(_T * _K, _H, dtype=torch.bfloat16)
    ws = [torch.randn(_I, _H, dtype=torch.bfloat16).t() for _ in range(_E)]
    counts = torch.zeros(_E, dtype=torch.int64)
    return [(_T * _K, _I)], ([rows], ws), dict(group_list=counts, split_item=2, group_type=0, group_list_type=1)


def _check_finalize_list():
    from ... import moe as ops

    x = torch.randn(_T, _H)
    w, ids = torch.rand(_T, _K), torch.randint(0, _E, (_T, _K))
    w1 = [torch.randn(_I, _H) for _ in range(_E)]
    shapes = _fake_shapes(ops.moe_dispatch_ffn_combine_list, x, w, ids, w1, w1, [torch.randn(_H, _I) for _ in range(_E)])
    rows = torch.randn(_T * _K, _H)
    row_idx = torch.arange(_T * _K, dtype=torch.int32)
    return shapes, (rows, None, None, None, w, row_idx, None), {"drop_pad_mode": 2, "k": _K}


#: (torch_npu op, build) pairs; build() -> (expected output shapes, args, kwargs)
META_CHECKS = [
    ("npu_moe_gating_top_k_softmax", _check_gating_softmax),
    ("npu_moe_gating_top_k", _check_gating_grouped),
    ("npu_moe_init_routing_v2", _check_init_routing),
    ("npu_moe_finalize_routing", _check_finalize),
    ("npu_moe_distribute_combine_v2", _check_dispatch_combine),
    ("npu_grouped_matmul", _check_gmm_list),
    ("npu_moe_finalize_routing", _check_finalize_list),
]
