"""MoE fusion: routers -> ``moe_gating_topk``, experts -> ``moe_dispatch_ffn_combine``.

Entry point: :func:`make_pass` (family ``"moe"``), a :class:`MoEFusion` pass that runs two
pattern tables (``passes/pattern.py`` rows) over the functional ATen graph:

1. **experts** (:func:`expert_fusions`, built per variant found in the graph): HF transformers' default experts forward
   (``grouped_mm_experts_forward``, what ``@use_experts_implementation`` picks unless the
   user asks for another): flatten the (token, slot) pairs, ``sort`` by expert, count
   per expert with ``histc`` (float input on CPU/MPS, int on CUDA), ``cumsum`` to int32
   offsets, gather the tokens, grouped GEMM, ``act(gate) * up``, grouped GEMM, weight,
   un-permute, ``view(T, k, H).sum(1)``. Under ``torch.compile`` the grouped GEMM is
   ``aten._grouped_mm`` for bf16 and ``transformers::grouped_mm_fallback`` otherwise, and
   the activation decomposes differently for fp32 and for half types, so each row
   is one (GEMM op, histc input, dtype class, activation) combination.
2. **routers** (:data:`ROUTER_FUSIONS`): softmax -> top-k [-> renormalise] (Qwen-MoE,
   Mixtral, OLMoE ...) and DeepSeek-V3's sigmoid + correction bias + grouped top-k
   (top-2-sum group scores, ``topk_group`` of ``n_group`` groups) -> gather [->
   renormalise with eps] -> routed scaling. ``top_k``, ``n_group``, ``topk_group`` and
   the scaling factor are pattern arguments (``scalar_workaround``): the matcher binds
   them from the graph and passes them to the replacement.

Why not a loop over experts. HF's eager experts loop iterates over ``nonzero()`` of
the routing (data-dependent): Dynamo breaks the graph there, so no loop ever reaches
this pass as E unrolled copies. A model that loops ``for e in range(E)`` with
``torch.where(mask)`` / ``index_add_`` has a data-dependent shape per expert, which the
pattern matcher cannot express as one pattern of E copies, and matching one unit per
expert would only replace E GEMM pairs by E opaque ops. Such graphs are left as they
are (a negative test holds that). Matching the grouped form whole keeps every rewrite
sound: each row is a complete, traced copy of the code it replaces, and the matcher
re-checks every integer (expert count, top-k, intermediate size) against the shapes.

Counting: ``__call__`` returns the MoE layers fused: a layer whose experts and router
both fuse counts once (``experts + max(0, routers - experts)``); both numbers are
logged.

Invariants: the fused ops have output shapes that depend on input shapes only (one
graph serves any routing); no row matches a graph whose values it would change: ids
outside ``[0, E)`` are dropped by both the HF code and the op, and the replacement casts
to the dtype the pattern produced (``promote(x, weights)``).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ...config import AscendConfig
from ...ops import moe as _moe_ops  # noqa: F401  (registers the ops)
from ..base import GraphPass
from ..pattern import Fusion, Match, PatternPass

__all__ = ["make_pass", "MoEFusion", "ROUTER_FUSIONS", "expert_fusions", "expert_variants"]

log = logging.getLogger("ascend_graph.passes.fusion.moe")

_ops = torch.ops.ascend_graph


# -- experts ------------------------------------------------------------------------


def _mm_grouped(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(a, b, offs=offs)


def _mm_hf_fallback(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return torch.ops.transformers.grouped_mm_fallback(a, b, offs=offs)


_GROUPED_MMS: dict[str, Callable[..., torch.Tensor]] = {"aten_grouped_mm": _mm_grouped, "hf_fallback": _mm_hf_fallback}

_ACT_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
}


def _make_experts_pattern(mm: str, histc_float: bool, activation: str):
    """HF ``grouped_mm_experts_forward`` (transformers 5.x), no bias, gated, not transposed."""
    grouped_mm, act = _GROUPED_MMS[mm], _ACT_FNS[activation]

    def pattern(x, topk_weights, topk_ids, w13, w2):
        num_top_k, num_tokens, hidden = topk_ids.size(-1), x.size(0), x.size(-1)
        num_experts = w13.size(0)
        sample_weights = topk_weights.reshape(-1)
        expert_ids_g, perm = torch.sort(topk_ids.reshape(-1))
        xs = x[perm // num_top_k]
        ws = sample_weights[perm]
        hist_in = expert_ids_g.float() if histc_float else expert_ids_g.int()
        offsets = torch.cumsum(torch.histc(hist_in, bins=num_experts, min=0, max=num_experts - 1), dim=0, dtype=torch.int32)
        sentinel = (expert_ids_g >= num_experts).unsqueeze(-1)
        xs = xs.masked_fill(sentinel, 0.0)
        h = grouped_mm(xs.to(w13.dtype), w13.transpose(-2, -1), offsets).masked_fill(sentinel, 0.0)
        gate, up = h.chunk(2, dim=-1)
        h = act(gate) * up
        y = grouped_mm(h.to(w2.dtype), w2.transpose(-2, -1), offsets).masked_fill(sentinel, 0.0)
        y = y * ws.unsqueeze(-1)
        # HF writes ``inv = empty_like(perm); inv[perm] = arange(S)``: this is its functional form
        inv = torch.empty_like(perm).index_put((perm,), torch.arange(perm.size(0), device=perm.device))
        return y[inv].view(num_tokens, num_top_k, hidden).sum(dim=1)

    pattern.__name__ = pattern.__qualname__ = f"_experts_hf_{mm}_{'histc_f' if histc_float else 'histc_i'}_{activation}"
    return pattern


def _make_experts_replacement(activation: str):
    def replacement(x, topk_weights, topk_ids, w13, w2):
        out = _ops.moe_dispatch_ffn_combine(x, topk_weights, topk_ids, w13, w2, activation)
        # the HF code sums in promote(x, weights) and casts afterwards: keep its dtype
        return out.to(torch.promote_types(x.dtype, topk_weights.dtype))

    replacement.__name__ = replacement.__qualname__ = f"_experts_fused_{activation}"
    return replacement


def _experts_inputs(dtype: torch.dtype) -> Callable[[], list[torch.Tensor]]:
    def build():
        # meta tensors: the CUDA histc variant (int input) has no CPU kernel, and
        # nothing here needs values. T=6, k=2, E=4, H=16, I=8 (16-byte aligned rows).
        dev = "meta"
        return [
            torch.empty(6, 16, dtype=dtype, device=dev),
            torch.empty(6, 2, dtype=dtype, device=dev),
            torch.empty(6, 2, dtype=torch.int64, device=dev),
            torch.empty(4, 16, 16, dtype=dtype, device=dev),
            torch.empty(4, 16, 8, dtype=dtype, device=dev),
        ]

    return build


def _experts_check(match: Match) -> bool:
    x, w, ids, w13, w2 = (match.kwargs[n].meta.get("val") for n in ("x", "topk_weights", "topk_ids", "w13", "w2"))
    if any(v is None for v in (x, w, ids, w13, w2)):
        return False
    return (
        x.dim() == 2
        and ids.dim() == 2
        and not ids.dtype.is_floating_point
        and w.is_floating_point()
        and w13.dtype == x.dtype == w2.dtype
        and x.device == w13.device == w2.device
    )


def expert_fusions(mm: str, histc_float: bool, dtype: torch.dtype) -> list[Fusion]:
    """The experts rows for one (grouped-GEMM op, histc input, dtype class): one per activation."""
    rows = []
    for activation in _ACT_FNS:
        pattern = _make_experts_pattern(mm, histc_float, activation)
        name = f"{pattern.__name__}_{str(dtype).removeprefix('torch.')}"
        rows.append(Fusion(name, pattern, _make_experts_replacement(activation), _experts_inputs(dtype), _experts_check))
    return rows


# -- routers ------------------------------------------------------------------------


def _softmax_topk_renorm(logits, top_k):
    # Qwen2/3-MoE, Mixtral, OLMoE with norm_topk_prob: softmax(fp32) -> topk -> v / sum(v)
    values, ids = torch.topk(torch.softmax(logits, dim=-1), top_k, dim=-1)
    return values / values.sum(dim=-1, keepdim=True), ids


def _softmax_topk_renorm_fused(logits, top_k):
    return _ops.moe_gating_topk(logits, top_k, None, "softmax", 1, 1, True, 1.0, 0.0)


def _softmax_topk(logits, top_k):
    # the same routers without renormalisation
    values, ids = torch.topk(torch.softmax(logits, dim=-1), top_k, dim=-1)
    return values, ids


def _softmax_topk_fused(logits, top_k):
    return _ops.moe_gating_topk(logits, top_k, None, "softmax", 1, 1, False, 1.0, 0.0)


def _deepseek_scores(logits, bias, top_k, n_group, topk_group):
    """DeepseekV3TopkRouter (transformers 5.x) up to the chosen ids."""
    num_experts = logits.size(-1)
    scores = logits.sigmoid()
    choice = scores + bias
    group_scores = choice.view(-1, n_group, num_experts // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    # HF: ``zeros_like(...).scatter_(1, group_idx, 1)``, in its functional form
    group_mask = torch.zeros_like(group_scores).scatter(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, num_experts // n_group).reshape(-1, num_experts)
    choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
    ids = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]
    return scores.gather(1, ids), ids


def _sigmoid_grouped_renorm(logits, bias, top_k, n_group, topk_group, scale):
    # sigmoid + correction bias, grouped top-k, renormalise (+1e-20), routed scaling
    weights, ids = _deepseek_scores(logits, bias, top_k, n_group, topk_group)
    weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scale, ids


def _sigmoid_grouped_renorm_fused(logits, bias, top_k, n_group, topk_group, scale):
    return _ops.moe_gating_topk(logits, top_k, bias, "sigmoid", n_group, topk_group, True, scale, 1e-20)


def _sigmoid_grouped(logits, bias, top_k, n_group, topk_group, scale):
    weights, ids = _deepseek_scores(logits, bias, top_k, n_group, topk_group)
    return weights * scale, ids


def _sigmoid_grouped_fused(logits, bias, top_k, n_group, topk_group, scale):
    return _ops.moe_gating_topk(logits, top_k, bias, "sigmoid", n_group, topk_group, False, scale, 0.0)


def _softmax_inputs():
    # T=6, E=17; top_k=11 is the scalar_workaround sample. A sample must be a value no
    # other literal of the trace has and no real router uses: where a model's value
    # equals another argument's sample the bindings conflict and the row does not match
    # (never a wrong match, only a missed one).
    return [torch.empty(6, 17), 11]


def _grouped_inputs():
    # T=5, E=39 in n_group=13 groups of 3, topk_group=7, top_k=11, scale=2.3 (see above;
    # real routers use top_k 2-8, n_group 1/8, topk_group 1-4)
    return [torch.empty(5, 39), torch.empty(39), 11, 13, 7, 2.3]


def _router_check(match: Match) -> bool:
    logits = match.kwargs["logits"].meta.get("val")
    return logits is not None and logits.dim() == 2 and logits.is_floating_point()


_SOFTMAX_WORKAROUND = {"top_k": 11}
_GROUPED_WORKAROUND = {"top_k": 11, "n_group": 13, "topk_group": 7, "scale": 2.3}

#: routers; the renormalising rows come first (the plain ones are their prefixes)
ROUTER_FUSIONS: list[Fusion] = [
    Fusion("softmax_topk_renorm", _softmax_topk_renorm, _softmax_topk_renorm_fused, _softmax_inputs, _router_check, _SOFTMAX_WORKAROUND),
    Fusion("softmax_topk", _softmax_topk, _softmax_topk_fused, _softmax_inputs, _router_check, _SOFTMAX_WORKAROUND),
    Fusion("sigmoid_grouped_topk_renorm", _sigmoid_grouped_renorm, _sigmoid_grouped_renorm_fused, _grouped_inputs, _router_check, _GROUPED_WORKAROUND),
    Fusion("sigmoid_grouped_topk", _sigmoid_grouped, _sigmoid_grouped_fused, _grouped_inputs, _router_check, _GROUPED_WORKAROUND),
]


_GROUPED_MM_TARGETS = {"aten_grouped_mm": "aten._grouped_mm", "hf_fallback": "transformers.grouped_mm_fallback"}


@functools.lru_cache(maxsize=None)
def _expert_pass(mm: str, histc_float: bool, dtype: torch.dtype, explain_node: str | None) -> PatternPass:
    # Built once per process and kept (rows and their matchers are immutable): tracing a
    # row costs ~0.5 s, so only the variants a graph can contain are ever built.
    return PatternPass(f"moe_experts_{mm}", "moe", expert_fusions(mm, histc_float, dtype), explain_node)


def expert_variants(graph: torch.fx.Graph) -> set[tuple[str, bool, torch.dtype]]:
    """(grouped-GEMM op, histc on float input, dtype class) of each grouped GEMM + histc the graph holds.

    Only selects which rows to try (the matcher decides what fuses), so a cheap scan of
    node targets and dtypes is enough.
    """
    mms, histc_float = set(), set()
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        target = str(getattr(node.target, "_overloadpacket", node.target))
        for kind, name in _GROUPED_MM_TARGETS.items():
            if target == name:
                val = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
                if val is None:
                    continue
                # fp16 and bf16 decompose the activation alike; fp32/fp64 alike. The
                # meta kernel of aten._grouped_mm takes bf16 only (so do Dynamo-traced HF
                # models): its fp32 form (HF outside Dynamo, CPU) has no row.
                if val.dtype in (torch.float16, torch.bfloat16):
                    mms.add((kind, torch.bfloat16 if kind == "aten_grouped_mm" else val.dtype))
                elif kind == "hf_fallback":
                    mms.add((kind, torch.float32))
        if target == "aten.histc" and isinstance(node.args[0], torch.fx.Node):
            val = node.args[0].meta.get("val")
            if val is not None:
                histc_float.add(val.is_floating_point())
    return {(kind, hf, dtype) for kind, dtype in mms for hf in histc_float}


class MoEFusion(GraphPass):
    """Experts rows, then router rows; returns the MoE layers fused (see the module docstring)."""

    name = "moe_fusion"
    family = "moe"

    def __init__(self, routers: PatternPass, explain_node: str | None = None):
        self.routers = routers
        self.explain_node = explain_node

    def __call__(self, graph: torch.fx.Graph) -> int:
        n_experts = 0
        for mm, histc_float, dtype in sorted(expert_variants(graph), key=str):
            n_experts += _expert_pass(mm, histc_float, dtype, self.explain_node)(graph)
        has_topk = any(n.target is torch.ops.aten.topk.default for n in graph.nodes)
        n_routers = self.routers(graph) if has_topk else 0
        log.debug("moe: %d experts blocks and %d routers fused", n_experts, n_routers)
        return n_experts + max(0, n_routers - n_experts)

    def uuid_sources(self) -> list[Any]:
        # the module holds every pattern, replacement and check
        return super().uuid_sources()


def make_pass(config: AscendConfig) -> GraphPass | None:
    if "moe" not in config.fusions:
        return None
    return MoEFusion(PatternPass("moe_routers", "moe", ROUTER_FUSIONS, config.explain_node), config.explain_node)
