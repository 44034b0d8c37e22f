"""MoE fused ops: ``moe_gating_topk`` (routing) and ``moe_dispatch_ffn_combine`` (experts).

Entry points: ``torch.ops.ascend_graph.moe_gating_topk`` and
``torch.ops.ascend_graph.moe_dispatch_ffn_combine`` (also importable here as
:func:`moe_gating_topk` / :func:`moe_dispatch_ffn_combine`).

Contracts (what the fake impls promise and every implementation keeps):

``moe_gating_topk(logits[T, E], top_k, bias[E]?, scoring, n_group, topk_group,
renormalize, routed_scaling_factor, eps, router_weight[E, H]?) -> (weights[T, k], ids[T, k] int64)``
    With ``router_weight`` the first argument is the router's input ``x [T, H]`` instead
    of its logits, and the op computes them itself: ``logits =
    F.linear(x, router_weight.to(x.dtype)).float()`` (the GEMM accumulates in float32 and
    its result is rounded to ``x.dtype`` first, as ``F.linear`` returns it; a bias-free
    router linear, which is what the MoE routers of HF transformers and vLLM are). On CUDA
    that folds the router GEMM into the gating launch at decode sizes.
    ``scoring`` is ``"softmax"`` or ``"sigmoid"``. The experts are chosen on
    ``score + bias`` (DeepSeek-V3's correction bias; ``bias`` None means zeros); with
    ``n_group > 1`` the experts form ``n_group`` equal groups, each group is scored by the
    sum of its top-2 choice scores and only the best ``topk_group`` groups may be chosen.
    The weights are the *unbiased* scores of the chosen experts, divided by their sum
    (plus ``eps``) when ``renormalize``, times ``routed_scaling_factor``, all in float32.
    ``weights`` has the dtype of the first argument (``logits``, or ``x``); ``ids`` are int64 (what ``torch.topk`` gives, so the ops
    downstream of a fused router keep their dtypes).

``moe_dispatch_ffn_combine(x[T, H], topk_weights[T, k], topk_ids[T, k], w13[E, 2I, H],
w2[E, H, I], activation, active_mask[T]?, shared_gate[Is, H]?, shared_up[Is, H]?,
shared_down[H, Is]?, ep_group, ep_world_size, ep_rank, shared_expert_gate[1, H]?, w13_bias[E, 2I]?,
w2_bias[E, H]?, swiglu_alpha, swiglu_limit) -> out[T, H]``
    Weight layout is HF transformers' (``Qwen3MoeExperts``, ``DeepseekV3Experts``, ...):
    ``w13[e]`` stacks the gate rows on top of the up rows (``[gate; up]``, each ``I``
    rows), ``w2[e]`` is the down projection, both as ``nn.Linear`` stores them (out
    features first), so a model's parameters are used in place, never copied.
    ``out[t] = sum_j w[t, j] * down_e(act(gate_e(x[t])) * up_e(x[t]))`` with
    ``e = ids[t, j]``, accumulated in float32 and cast to ``x.dtype``; ids outside
    ``[0, E)`` (expert-parallel sentinels) contribute nothing. ``activation`` is one of
    :data:`ACTIVATIONS`. Tokens with ``active_mask`` False (padding rows of a bucket) do
    no expert work and get zeros (plus the shared experts' output, which is computed for
    every row). With shared experts given, ``out += down_s(act(gate_s(x)) * up_s(x))``,
    scaled per token by ``sigmoid(x @ shared_expert_gate.T)`` when that is given
    (Qwen2-MoE / Qwen3-Next's gated shared expert; DeepSeek-V3's are not gated).
    Expert biases (GptOss): ``gate_e(x); up_e(x)`` become ``x @ w13[e].T + w13_bias[e]`` and
    the down projection adds ``w2_bias[e]``. ``"clipped_swiglu"`` (GptOss; the NPU's
    ``npu_clipped_swiglu(interleaved=True)``) takes gate and up *interleaved* in ``w13[e]``'s
    rows (gate = even rows, up = odd rows), clamps ``gate <= limit`` and ``-limit <= up <=
    limit`` and gives ``(up + 1) * gate * sigmoid(alpha * gate)`` (``swiglu_alpha``,
    ``swiglu_limit``). ``w13`` and ``w2`` may be any strided views: GptOss stores them as
    ``[E, H, 2I]`` / ``[E, I, H]`` and the fusion hands the op their ``transpose(1, 2)``
    views, never a copy.
    With ``ep_world_size > 1`` ``w13``/``w2`` hold this rank's ``E / ep_world_size``
    experts and ``ids`` are global: the NPU binding runs MC2 dispatch/combine over
    ``ep_group``, elsewhere ``distributed/ep.py`` runs all-to-alls over torch.distributed.

``moe_dispatch_ffn_combine_list(x[T, H], topk_weights[T, k], topk_ids[T, k], w1: Tensor[],
w3: Tensor[], w2: Tensor[], activation, active_mask[T]?) -> out[T, H]``
    The same routed experts (one device, no shared experts, no biases) with one weight
    tensor per expert, as a ``ModuleList`` of expert MLPs holds them: ``w1[e]`` the gate
    ``[I, H]``, ``w3[e]`` the up ``[I, H]``, ``w2[e]`` the down ``[H, I]`` (``nn.Linear``
    layout); an empty ``w3`` means ``w1[e]`` stacks ``[gate; up]`` (``[2I, H]``). Every
    expert has the same shapes, dtype (x's) and device. Never stacked: stacking per call
    would copy all the experts' weights. ``activation`` is silu, gelu or gelu_tanh.

The output shapes depend on input shapes only, so one captured graph serves any routing.
Implementations: the CPU reference here (ground truth, any device), CUDA in
``kernels/triton/moe.py`` (``torch._grouped_mm``, or Triton where it is missing), NPU in
``kernels/npu/moe.py``. The list op: CUDA in ``kernels/triton/moe_list.py`` (Triton
reading each expert through a cached device table of the weights' addresses), NPU through
``npu_grouped_matmul``'s TensorList form, the CPU loop here.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import UnsupportedError
from .kernels.triton import moe as _cuda

__all__ = ["moe_gating_topk", "moe_dispatch_ffn_combine", "moe_dispatch_ffn_combine_list", "experts_list_reference", "expert_mlp", "ACTIVATIONS", "SCORINGS", "apply_activation", "gating_reference", "router_logits", "experts_reference"]

log = logging.getLogger("ascend_graph.ops.moe")

#: gated activations the experts may use: ``act(gate) * up`` (gate/up halves), and GptOss's
#: clipped SwiGLU on interleaved gate/up rows
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "clipped_swiglu")
#: GptOss's clipped SwiGLU constants (``GptOssExperts.alpha`` / ``.limit``)
SWIGLU_ALPHA, SWIGLU_LIMIT = 1.702, 7.0
SCORINGS = ("softmax", "sigmoid")


def apply_activation(gate_up: torch.Tensor, activation: str, alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT) -> torch.Tensor:
    """``act(gate) * up`` for ``gate_up = [gate | up]`` along the last dim (interleaved
    ``[g0, u0, g1, u1, ...]`` for ``"clipped_swiglu"``, as GptOss computes it)."""
    if activation == "clipped_swiglu":
        gate = gate_up[..., ::2].clamp(max=limit)
        up = gate_up[..., 1::2].clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))
    gate, up = gate_up.chunk(2, dim=-1)
    if activation == "silu":
        return F.silu(gate) * up
    if activation == "gelu":
        return F.gelu(gate) * up
    if activation == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    raise UnsupportedError("unknown MoE activation", expected=f"one of {ACTIVATIONS}", got=repr(activation))


def _check_gating(logits: torch.Tensor, top_k: int, scoring: str, n_group: int, topk_group: int, router_weight: Optional[torch.Tensor] = None) -> None:
    if logits.dim() != 2:
        raise UnsupportedError("moe_gating_topk takes 2-D router logits (or router inputs)", expected="[tokens, experts] (or [tokens, hidden])", got=tuple(logits.shape))
    if scoring not in SCORINGS:
        raise UnsupportedError("unknown MoE scoring function", expected=f"one of {SCORINGS}", got=repr(scoring))
    if router_weight is not None and (router_weight.dim() != 2 or router_weight.shape[1] != logits.shape[1] or not router_weight.is_floating_point()):
        raise UnsupportedError(
            "router_weight must be the router linear's float weight",
            expected=f"[experts, {logits.shape[1]}] (x is [tokens, hidden])",
            got=f"{tuple(router_weight.shape)} {router_weight.dtype}",
        )
    experts = logits.shape[1] if router_weight is None else router_weight.shape[0]
    if n_group < 1 or experts % n_group != 0 or not (1 <= topk_group <= n_group):
        raise UnsupportedError(
            "invalid expert groups",
            expected=f"n_group dividing {experts} experts and 1 <= topk_group <= n_group",
            got=f"n_group={n_group}, topk_group={topk_group}",
        )
    if not (1 <= top_k <= experts):
        raise UnsupportedError("top_k out of range", expected=f"1..{experts}", got=top_k)


def router_logits(x: torch.Tensor, router_weight: torch.Tensor) -> torch.Tensor:
    """The logits ``moe_gating_topk`` computes from ``x`` when given ``router_weight`` (float32)."""
    return F.linear(x, router_weight.to(x.dtype)).float()


def gating_reference(
    logits: torch.Tensor,
    top_k: int,
    bias: Optional[torch.Tensor],
    scoring: str,
    n_group: int,
    topk_group: int,
    renormalize: bool,
    routed_scaling_factor: float,
    eps: float,
    router_weight: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch routing, written as HF transformers writes it (the ground truth)."""
    _check_gating(logits, top_k, scoring, n_group, topk_group, router_weight)
    out_dtype = logits.dtype
    if router_weight is not None:
        logits = router_logits(logits, router_weight)
    scores = logits.softmax(dim=-1) if scoring == "softmax" else logits.sigmoid()
    choice = scores if bias is None else scores + bias
    if n_group > 1:
        t, e = choice.shape
        group_scores = choice.view(t, n_group, e // n_group).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = group_scores.topk(topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
        score_mask = group_mask.unsqueeze(-1).expand(t, n_group, e // n_group).reshape(t, e)
        choice = choice.masked_fill(score_mask == 0, float("-inf"))
    ids = choice.topk(top_k, dim=-1)[1]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + eps)
    weights = weights * routed_scaling_factor
    return weights.to(out_dtype), ids.to(torch.int64)


@torch.library.custom_op("ascend_graph::moe_gating_topk", mutates_args=())
def moe_gating_topk(
    logits: torch.Tensor,
    top_k: int,
    bias: Optional[torch.Tensor] = None,
    scoring: str = "softmax",
    n_group: int = 1,
    topk_group: int = 1,
    renormalize: bool = True,
    routed_scaling_factor: float = 1.0,
    eps: float = 0.0,
    router_weight: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits (or router input and weight) -> (top-k weights, top-k expert ids). See the module docstring."""
    return gating_reference(logits, top_k, bias, scoring, n_group, topk_group, renormalize, routed_scaling_factor, eps, router_weight)


@moe_gating_topk.register_fake
def _gating_fake(logits, top_k, bias=None, scoring="softmax", n_group=1, topk_group=1, renormalize=True, routed_scaling_factor=1.0, eps=0.0, router_weight=None):
    _check_gating(logits, top_k, scoring, n_group, topk_group, router_weight)
    t = logits.shape[0]
    return logits.new_empty((t, top_k)), logits.new_empty((t, top_k), dtype=torch.int64)


@moe_gating_topk.register_kernel("cuda")
def _gating_cuda(logits, top_k, bias=None, scoring="softmax", n_group=1, topk_group=1, renormalize=True, routed_scaling_factor=1.0, eps=0.0, router_weight=None):
    _check_gating(logits, top_k, scoring, n_group, topk_group, router_weight)
    from .kernels.triton import moe_gating  # one launch instead of ~8 (decode latency)

    args = (top_k, bias, scoring, n_group, topk_group, renormalize, routed_scaling_factor, eps)
    if router_weight is not None:
        if moe_gating.router_gating_supported(logits, router_weight, n_group, moe_gating.ROUTER_MAX_TOKENS):
            return moe_gating.router_gating_topk(logits, router_weight, *args)  # Triton router GEMM, then the gating kernel
        x, logits = logits, F.linear(logits, router_weight.to(logits.dtype))  # real M: cuBLAS
        if moe_gating.gating_supported(logits, n_group):
            return moe_gating.gating_topk(logits, *args)  # scores in fp32 whatever the logits' dtype
        return gating_reference(x, *args, router_weight)
    if moe_gating.gating_supported(logits, n_group):
        return moe_gating.gating_topk(logits, *args)
    return gating_reference(logits, *args)


def _check_experts(x, topk_weights, topk_ids, w13, w2, activation, active_mask, shared, ep_world_size, shared_expert_gate=None, w13_bias=None, w2_bias=None) -> None:
    if x.dim() != 2 or topk_ids.dim() != 2 or topk_weights.shape != topk_ids.shape or topk_ids.shape[0] != x.shape[0]:
        raise UnsupportedError(
            "moe_dispatch_ffn_combine shapes",
            expected="x [T, H], topk_weights and topk_ids [T, k]",
            got=f"x {tuple(x.shape)}, topk_weights {tuple(topk_weights.shape)}, topk_ids {tuple(topk_ids.shape)}",
        )
    if topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
        raise UnsupportedError("topk_ids must be integers", expected="int32 or int64", got=str(topk_ids.dtype))
    h = x.shape[1]
    if w13.dim() != 3 or w2.dim() != 3 or w13.shape[2] != h or w2.shape[1] != h or w13.shape[1] != 2 * w2.shape[2] or w13.shape[0] != w2.shape[0]:
        raise UnsupportedError(
            "expert weights must be stacked as HF stores them",
            expected=f"w13 [E, 2I, {h}] and w2 [E, {h}, I]",
            got=f"w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}",
        )
    if activation not in ACTIVATIONS:
        raise UnsupportedError("unknown MoE activation", expected=f"one of {ACTIVATIONS}", got=repr(activation))
    if active_mask is not None and (active_mask.dim() != 1 or active_mask.shape[0] != x.shape[0]):
        raise UnsupportedError("active_mask must be [T]", expected=f"[{x.shape[0]}] bool", got=tuple(active_mask.shape))
    given = [s is not None for s in shared]
    if any(given) and not all(given):
        raise UnsupportedError("shared experts need gate, up and down weights", expected="all three or none", got=given)
    if shared_expert_gate is not None and (not all(given) or tuple(shared_expert_gate.shape) != (1, h)):
        raise UnsupportedError(
            "shared_expert_gate scales the shared experts' output per token",
            expected=f"shared experts given and shared_expert_gate [1, {h}]",
            got=f"shared experts given: {all(given)}, shared_expert_gate {tuple(shared_expert_gate.shape)}",
        )
    if ep_world_size < 1:
        raise UnsupportedError("ep_world_size must be >= 1", expected=">= 1", got=ep_world_size)
    e = w13.shape[0]
    if (w13_bias is not None and tuple(w13_bias.shape) != (e, w13.shape[1])) or (w2_bias is not None and tuple(w2_bias.shape) != (e, h)):
        raise UnsupportedError(
            "expert biases are one row per expert",
            expected=f"w13_bias [{e}, {w13.shape[1]}], w2_bias [{e}, {h}]",
            got=f"w13_bias {None if w13_bias is None else tuple(w13_bias.shape)}, w2_bias {None if w2_bias is None else tuple(w2_bias.shape)}",
        )


def shared_experts_reference(x, shared_gate, shared_up, shared_down, activation: str, shared_expert_gate=None) -> torch.Tensor:
    """The shared (always-on) experts as one gated MLP, like ``DeepseekV3MLP``.

    With ``shared_expert_gate`` ([1, H], an ``nn.Linear(H, 1)`` weight) the output is
    scaled per token by ``sigmoid(x @ shared_expert_gate.T)``, as Qwen2-MoE and
    Qwen3-Next's ``shared_expert_gate`` does.
    """
    gate_up = torch.cat([F.linear(x, shared_gate), F.linear(x, shared_up)], dim=-1)
    out = F.linear(apply_activation(gate_up, activation), shared_down)
    if shared_expert_gate is not None:
        out = torch.sigmoid(F.linear(x, shared_expert_gate)) * out
    return out


def experts_reference(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    activation: str = "silu",
    active_mask: Optional[torch.Tensor] = None,
    shared_gate: Optional[torch.Tensor] = None,
    shared_up: Optional[torch.Tensor] = None,
    shared_down: Optional[torch.Tensor] = None,
    shared_expert_gate: Optional[torch.Tensor] = None,
    w13_bias: Optional[torch.Tensor] = None,
    w2_bias: Optional[torch.Tensor] = None,
    swiglu_alpha: float = SWIGLU_ALPHA,
    swiglu_limit: float = SWIGLU_LIMIT,
) -> torch.Tensor:
    """Plain-torch experts: a loop over the experts that were hit (eager only)."""
    t, h = x.shape
    e, k = w13.shape[0], topk_ids.shape[1]
    valid = (topk_ids >= 0) & (topk_ids < e)
    if active_mask is not None:
        valid = valid & active_mask.bool().unsqueeze(1)
    flat_ids = torch.where(valid, topk_ids, e).reshape(-1).long()
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=e + 1).tolist()
    flat_w = topk_weights.reshape(-1)
    out = torch.zeros(t, h, dtype=torch.float32, device=x.device)
    start = 0
    for expert, n in enumerate(counts[:e]):
        if n:
            rows = order[start : start + n]
            tokens = rows // k
            b13 = None if w13_bias is None else w13_bias[expert]
            b2 = None if w2_bias is None else w2_bias[expert]
            h = apply_activation(F.linear(x[tokens], w13[expert], b13), activation, swiglu_alpha, swiglu_limit)
            y = F.linear(h, w2[expert], b2)
            out.index_add_(0, tokens, y.float() * flat_w[rows].float().unsqueeze(1))
        start += n
    if shared_gate is not None:
        out += shared_experts_reference(x, shared_gate, shared_up, shared_down, activation, shared_expert_gate).float()
    return out.to(x.dtype)


@torch.library.custom_op("ascend_graph::moe_dispatch_ffn_combine", mutates_args=())
def moe_dispatch_ffn_combine(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    activation: str = "silu",
    active_mask: Optional[torch.Tensor] = None,
    shared_gate: Optional[torch.Tensor] = None,
    shared_up: Optional[torch.Tensor] = None,
    shared_down: Optional[torch.Tensor] = None,
    ep_group: str = "",
    ep_world_size: int = 1,
    ep_rank: int = 0,
    shared_expert_gate: Optional[torch.Tensor] = None,
    w13_bias: Optional[torch.Tensor] = None,
    w2_bias: Optional[torch.Tensor] = None,
    swiglu_alpha: float = SWIGLU_ALPHA,
    swiglu_limit: float = SWIGLU_LIMIT,
) -> torch.Tensor:
    """Routed experts (and optional shared experts) of one MoE layer. See the module docstring."""
    _check_experts(x, topk_weights, topk_ids, w13, w2, activation, active_mask, (shared_gate, shared_up, shared_down), ep_world_size, shared_expert_gate, w13_bias, w2_bias)
    if ep_world_size > 1:  # off the NPU: all-to-all over torch.distributed (gloo, NCCL)
        _check_ep_experts(w13_bias, w2_bias, activation)
        from ..distributed.ep import ep_dispatch_ffn_combine

        return ep_dispatch_ffn_combine(x, topk_weights, topk_ids, w13, w2, activation, active_mask, shared_gate, shared_up, shared_down, ep_group, ep_world_size, ep_rank, shared_expert_gate)
    return experts_reference(x, topk_weights, topk_ids, w13, w2, activation, active_mask, shared_gate, shared_up, shared_down, shared_expert_gate, w13_bias, w2_bias, swiglu_alpha, swiglu_limit)


def _check_ep_experts(w13_bias: Optional[torch.Tensor], w2_bias: Optional[torch.Tensor], activation: str) -> None:
    # distributed/ep.py runs the local experts without biases or the clipped SwiGLU
    if w13_bias is not None or w2_bias is not None or activation == "clipped_swiglu":
        raise UnsupportedError(
            "expert parallelism off the NPU runs experts without biases or the clipped SwiGLU",
            expected="w13_bias=None, w2_bias=None and activation silu/gelu with ep_world_size > 1",
            got=f"biases {w13_bias is not None}/{w2_bias is not None}, activation {activation!r}",
        )


@moe_dispatch_ffn_combine.register_fake
def _experts_fake(x, topk_weights, topk_ids, w13, w2, activation="silu", active_mask=None, shared_gate=None, shared_up=None, shared_down=None, ep_group="", ep_world_size=1, ep_rank=0, shared_expert_gate=None, w13_bias=None, w2_bias=None, swiglu_alpha=SWIGLU_ALPHA, swiglu_limit=SWIGLU_LIMIT):
    _check_experts(x, topk_weights, topk_ids, w13, w2, activation, active_mask, (shared_gate, shared_up, shared_down), ep_world_size, shared_expert_gate, w13_bias, w2_bias)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@moe_dispatch_ffn_combine.register_kernel("cuda")
def _experts_cuda(x, topk_weights, topk_ids, w13, w2, activation="silu", active_mask=None, shared_gate=None, shared_up=None, shared_down=None, ep_group="", ep_world_size=1, ep_rank=0, shared_expert_gate=None, w13_bias=None, w2_bias=None, swiglu_alpha=SWIGLU_ALPHA, swiglu_limit=SWIGLU_LIMIT):
    _check_experts(x, topk_weights, topk_ids, w13, w2, activation, active_mask, (shared_gate, shared_up, shared_down), ep_world_size, None, w13_bias, w2_bias)
    if ep_world_size > 1:  # NCCL all-to-all; the local experts come back here with ep_world_size 1
        _check_ep_experts(w13_bias, w2_bias, activation)
        from ..distributed.ep import ep_dispatch_ffn_combine

        return ep_dispatch_ffn_combine(x, topk_weights, topk_ids, w13, w2, activation, active_mask, shared_gate, shared_up, shared_down, ep_group, ep_world_size, ep_rank, shared_expert_gate)
    if w13_bias is not None or w2_bias is not None or activation == "clipped_swiglu":
        # the Triton kernels take neither biases nor interleaved gate/up: sort + grouped GEMMs
        out = _cuda.sorted_experts(x, topk_weights, topk_ids, w13, w2, activation, active_mask, w13_bias, w2_bias, swiglu_alpha, swiglu_limit)
    else:
        out = _cuda.dispatch_ffn_combine(x, topk_weights, topk_ids, w13, w2, activation, active_mask)
    if shared_gate is not None:
        out = (out.float() + shared_experts_reference(x, shared_gate, shared_up, shared_down, activation, shared_expert_gate).float()).to(x.dtype)
    return out


# -- experts held as per-expert tensors (a ModuleList of experts) ----------------------
#
# ``moe_dispatch_ffn_combine_list``: the same experts as ``moe_dispatch_ffn_combine`` (one
# device, no shared experts) with the weights given as one tensor per expert, the
# TensorList form of the NPU's grouped matmul. A model whose experts are a ``ModuleList``
# of MLPs (Mixtral's reference ``w1``/``w3``/``w2``, DeepSeek's original ``gate_proj``/
# ``up_proj``/``down_proj``) keeps each weight in its own allocation: stacking them into
# ``[E, 2I, H]`` would copy every expert's weights on every call. Gate and up come as two
# lists because that is how those modules hold them (concatenating them would be the same
# copy); an empty ``w3`` means ``w1[e]`` already stacks ``[gate; up]`` (a per-expert fused
# ``gate_up_proj``).


def _check_expert_lists(x, topk_weights, topk_ids, w1, w3, w2, activation, active_mask) -> None:
    if x.dim() != 2 or topk_ids.dim() != 2 or topk_weights.shape != topk_ids.shape or topk_ids.shape[0] != x.shape[0]:
        raise UnsupportedError(
            "moe_dispatch_ffn_combine_list shapes",
            expected="x [T, H], topk_weights and topk_ids [T, k]",
            got=f"x {tuple(x.shape)}, topk_weights {tuple(topk_weights.shape)}, topk_ids {tuple(topk_ids.shape)}",
        )
    if topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
        raise UnsupportedError("topk_ids must be integers", expected="int32 or int64", got=str(topk_ids.dtype))
    e = len(w1)
    if e < 1 or len(w2) != e or len(w3) not in (0, e):
        raise UnsupportedError(
            "one weight per expert in every list",
            expected="len(w1) == len(w2) >= 1 and len(w3) in (0, len(w1))",
            got=f"len(w1)={len(w1)}, len(w3)={len(w3)}, len(w2)={len(w2)}",
        )
    h = x.shape[1]
    i = w2[0].shape[1] if w2[0].dim() == 2 else -1
    gate_rows = i if w3 else 2 * i
    want = {"w1": (gate_rows, h), "w3": (i, h), "w2": (h, i)}
    # one pass over the E tensors per list when all is well (this runs on every call);
    # the loop below names the first offending tensor
    fine = {tuple(w.shape) for w in w1} == {want["w1"]} and {tuple(w.shape) for w in w2} == {want["w2"]}
    fine = fine and (not w3 or {tuple(w.shape) for w in w3} == {want["w3"]})
    fine = fine and {(w.dtype, w.device) for ws in (w1, w3, w2) for w in ws} == {(x.dtype, x.device)}
    for name, ws in () if fine else (("w1", w1), ("w3", w3), ("w2", w2)):
        for idx, w in enumerate(ws):
            if w.dim() != 2 or tuple(w.shape) != want[name]:
                raise UnsupportedError(
                    f"expert weights must all have one shape ({name}[{idx}])",
                    expected=f"w1[e] {list(want['w1'])}" + (f", w3[e] {list(want['w3'])}" if w3 else " ([gate; up] rows, w3 empty)") + f", w2[e] {list(want['w2'])}",
                    got=f"{name}[{idx}] {list(w.shape)}",
                )
            if w.dtype != x.dtype or w.device != x.device:
                raise UnsupportedError(
                    f"expert weights must have x's dtype and device ({name}[{idx}])",
                    expected=f"{x.dtype} on {x.device}",
                    got=f"{w.dtype} on {w.device}",
                )
    if activation not in ("silu", "gelu", "gelu_tanh"):
        # clipped_swiglu needs interleaved gate/up rows and the expert biases: stacked op only
        raise UnsupportedError("unknown activation for per-expert weights", expected="silu, gelu or gelu_tanh", got=repr(activation))
    if active_mask is not None and (active_mask.dim() != 1 or active_mask.shape[0] != x.shape[0]):
        raise UnsupportedError("active_mask must be [T]", expected=f"[{x.shape[0]}] bool", got=tuple(active_mask.shape))


def expert_mlp(h: torch.Tensor, w1: torch.Tensor, w3: Optional[torch.Tensor], w2: torch.Tensor, activation: str) -> torch.Tensor:
    """One expert's gated MLP on rows ``h``: ``w2(act(w1 h) * w3 h)`` (``w1`` = ``[gate; up]`` when ``w3`` is None)."""
    if w3 is None:
        return F.linear(apply_activation(F.linear(h, w1), activation), w2)
    return F.linear(_GATES[activation](F.linear(h, w1)) * F.linear(h, w3), w2)


#: the gate functions of the gated activations (``apply_activation`` on [gate | up] without the cat)
_GATES = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda g: F.gelu(g, approximate="tanh")}


def experts_list_reference(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w1: list[torch.Tensor],
    w3: list[torch.Tensor],
    w2: list[torch.Tensor],
    activation: str = "silu",
    active_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-expert weights: a loop over the experts that were hit, each reading its own tensors (no stack)."""
    t, h = x.shape
    e, k = len(w1), topk_ids.shape[1]
    valid = (topk_ids >= 0) & (topk_ids < e)
    if active_mask is not None:
        valid = valid & active_mask.bool().unsqueeze(1)
    flat_ids = torch.where(valid, topk_ids, e).reshape(-1).long()
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=e + 1).tolist()  # one host sync for all experts
    flat_w = topk_weights.reshape(-1)
    out = torch.zeros(t, h, dtype=torch.float32, device=x.device)
    start = 0
    for expert, n in enumerate(counts[:e]):
        if n:
            rows = order[start : start + n]
            tokens = rows // k
            y = expert_mlp(x[tokens], w1[expert], w3[expert] if w3 else None, w2[expert], activation)
            out.index_add_(0, tokens, y.float() * flat_w[rows].float().unsqueeze(1))
        start += n
    return out.to(x.dtype)


@torch.library.custom_op("ascend_graph::moe_dispatch_ffn_combine_list", mutates_args=())
def moe_dispatch_ffn_combine_list(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w1: list[torch.Tensor],
    w3: list[torch.Tensor],
    w2: list[torch.Tensor],
    activation: str = "silu",
    active_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Routed experts with one weight tensor per expert. See the comment above :func:`expert_mlp`.

    ``out[t] = sum_j w[t, j] * w2[e](act(w1[e] x[t]) * w3[e] x[t])`` with ``e = ids[t, j]``,
    accumulated in float32 and cast to ``x.dtype``; ids outside ``[0, E)`` and tokens with
    ``active_mask`` False contribute nothing (as ``moe_dispatch_ffn_combine``).
    """
    _check_expert_lists(x, topk_weights, topk_ids, w1, w3, w2, activation, active_mask)
    return experts_list_reference(x, topk_weights, topk_ids, w1, w3, w2, activation, active_mask)


@moe_dispatch_ffn_combine_list.register_fake
def _experts_list_fake(x, topk_weights, topk_ids, w1, w3, w2, activation="silu", active_mask=None):
    _check_expert_lists(x, topk_weights, topk_ids, w1, w3, w2, activation, active_mask)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@moe_dispatch_ffn_combine_list.register_kernel("cuda")
def _experts_list_cuda(x, topk_weights, topk_ids, w1, w3, w2, activation="silu", active_mask=None):
    _check_expert_lists(x, topk_weights, topk_ids, w1, w3, w2, activation, active_mask)
    from .kernels.triton import moe_list  # device pointer tables: the weights are never stacked

    if moe_list.list_supported(x, w1, w3, w2):
        return moe_list.list_experts(x, topk_weights, topk_ids, w1, w3, w2, activation, active_mask)
    log.debug("moe_dispatch_ffn_combine_list: per-expert strides differ; the reference loop runs")
    return experts_list_reference(x, topk_weights, topk_ids, w1, w3, w2, activation, active_mask)
