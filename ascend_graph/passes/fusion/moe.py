"""MoE fusion: routers -> ``moe_gating_topk``, experts -> ``moe_dispatch_ffn_combine`` (or ``_list``).

Entry point: :func:`make_pass` (family ``"moe"``), a :class:`MoEFusion` pass that runs these
pattern tables (``passes/pattern.py`` rows) over the functional ATen graph, in the
order 1, 3, 2, 4:

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
   them from the graph and passes them to the replacement. Rows for each router with its
   bias-free linear included come first: they hand the op ``x`` and ``router_weight`` (it
   computes the logits itself, folding the GEMM into the gating launch on CUDA); where the
   linear has a bias or its logits another user, the logits-only rows match instead.
3. **experts as a loop over experts** (:func:`loop_fusion`, :data:`LOOP_FORMS`): Dynamo
   unrolls ``for e in range(E)``, so a row is the whole unrolled loop for one expert
   count E and intermediate size I (built for the pairs of stacked ``w13 [E, 2I, H]`` /
   ``w2 [E, H, I]`` a graph reads per expert), matched *exactly* (``Fusion.exact``):
   copy ``e`` must read ``w13[e]``, ``w2[e]`` and expert ``e``'s routing, literally.
   Forms: HF's one_hot mask + ``torch.where(mask[e])`` + ``index_add_``; Mixtral's
   reference ``torch.where(ids == e)`` + ``index_add_``; and two nonzero-free dense
   forms, ``acc + ffn_e(x) * (w * (ids == e)).sum(-1)`` (or ``torch.where(ids == e, w,
   0)``). The accumulator must be zeros of x's shape and dtype.
   What reaches this pass: the ``torch.where(mask)`` forms have data-dependent row
   counts, so Dynamo breaks the graph at each ``nonzero`` (and, the break being inside
   a loop, runs the whole frame eagerly) unless
   ``torch._dynamo.config.capture_dynamic_output_shape_ops`` is set; with it they are one
   graph, and the trivially true ``0 <= u <= numel`` asserts AOT adds on each row count
   are dropped first (:func:`drop_nonzero_size_asserts`). The dense forms are one graph
   either way. HF's own eager experts (``for expert_idx in expert_hit``, iterating a
   ``nonzero()`` result) never are: iterating a tensor of data-dependent length breaks
   the graph even with that flag, so it cannot reach any backend whole.
   **Experts held as a ModuleList** (:func:`list_loop_fusion`, :data:`LIST_LOOP_FORMS`):
   the same four forms, and transformers 4.x ``MixtralSparseMoeBlock``'s own loop
   (``hidden_states[None, top_x].reshape(-1, hidden_dim)``), with each expert's own
   ``nn.Linear`` weights (one graph input per expert and projection; separate gate/up
   as Mixtral's ``w1``/``w3``, or one ``[gate; up]`` per expert) fuse
   to ``moe_dispatch_ffn_combine_list``, which takes the weights as lists: stacking them
   for the stacked op would copy every expert's weights on every call. A row's pattern
   takes the E experts' weights as separate arguments, so the exact match binds copy
   ``e``'s weights to the id it is masked with (a table in any order fuses, in that
   order). Rows are built per (form, E, I, layout, activation, dtypes) found in the graph
   (:func:`list_loop_variants`); they apply where :func:`list_loop_policy` allows (not on
   the CPU under inductor, whose compiled loop is as fast there: counted in
   ``stats()["skipped"]``).
4. **shared experts** (:func:`shared_fusions`), after the rows above: where the graph
   adds a shared-expert MLP of the same input to a routed-only experts op (DeepSeek-V3's
   plain ``routed + shared(x)`` on 3-D states; Qwen2-MoE / Qwen3-Next's ``routed +
   sigmoid(x @ g.T) * shared(x)`` on 2-D ones), the MLP (and gate) move into the op.

Counting: ``__call__`` returns the MoE layers fused: a layer whose experts and router
both fuse counts once (``experts + max(0, routers - experts)``); folded shared experts
belong to a layer already counted. All three numbers are logged.

Invariants: the fused ops have output shapes that depend on input shapes only (one
graph serves any routing); no row matches a graph whose values it would change: ids
outside ``[0, E)`` are dropped by both the HF code and the op, and the replacement casts
to the dtype the pattern produced (``promote(x, weights)``). The dense loop forms run
every expert on every token and multiply the unrouted ones by zero; the fused op skips
them, so the two differ only where an unrouted expert's output is inf or NaN.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F

from ... import _stats
from ...config import AscendConfig
from ...ops import moe as _moe_ops  # noqa: F401  (registers the ops)
from ..base import GraphPass
from ..cleanup import hoist_size_reads
from ..pattern import Fusion, PatternPass, as_the_graph_holds, known_eq

if TYPE_CHECKING:
    from torch._inductor.pattern_matcher import Match

from .norm_rope import _graph_device as graph_device  # the device a graph runs on, as that family's policy reads it

__all__ = ["make_pass", "MoEFusion", "ROUTER_FUSIONS", "LOOP_FORMS", "expert_fusions", "expert_variants", "loop_fusion", "loop_variants", "LIST_LOOP_FORMS", "list_loop_fusion", "list_loop_variants", "list_loop_policy", "drop_nonzero_size_asserts", "shared_fusions", "shared_variants"]

aten = torch.ops.aten
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


def _experts_ints_hold(match: Match) -> bool:
    """The ints a retrace-free experts row leaves as wildcards: histc over [0, E) in E bins,
    the sentinel ``ids >= E``, ``perm // k``, zeros for the sentinel rows, gate/up split
    in halves of the last dim, the sum over the k slots of ``[T, k, H]``."""
    x, ids, w13 = (match.kwargs[n].meta.get("val") for n in ("x", "topk_ids", "w13"))
    e, k, hidden = w13.shape[0], ids.shape[-1], x.shape[-1]
    for node in match.nodes:
        if node.op != "call_function":
            continue
        t, a = node.target, node.args
        if t is aten.histc.default:
            bins, lo, hi = (list(a[1:]) + [100, 0, 0])[:3]
            if not (known_eq(bins, e) and lo == 0 and known_eq(hi, e - 1)):
                return False
        elif t is aten.ge.Scalar and not known_eq(a[1], e):
            return False
        elif t is aten.div.Tensor_mode and not known_eq(a[1], k):
            return False
        elif t is aten.scalar_tensor.default and a[0] != 0:
            return False
        elif t is aten.split.Tensor:
            inp = a[0].meta.get("val")
            dim = a[2] if len(a) > 2 else 0
            if inp is None or dim not in (-1, inp.dim() - 1) or not known_eq(a[1] * 2 if isinstance(a[1], int) else None, inp.shape[-1]):
                return False
        elif t is aten.cumsum.default and a[1] != 0:
            return False
        elif t is aten.sum.dim_IntList:
            inp = a[0].meta.get("val")
            if list(a[1]) != [1] or inp is None or inp.dim() != 3 or not (known_eq(inp.shape[0], x.shape[0]) and known_eq(inp.shape[1], k) and known_eq(inp.shape[2], hidden)):
                return False
    return True


def _experts_generic_check(match: Match) -> bool:
    return _experts_check(match) and _experts_ints_hold(match)


def sink_input_nodes(graph: torch.fx.Graph) -> int:
    """Move each node computed from graph inputs alone (a weight's transpose, an ``iota``)
    to just before its first user, and drop the matcher's cached mutation regions.

    The matcher refuses a match whose nodes lie in different mutation regions (an op
    that writes in place between them) and caches each node's region in its meta. An
    earlier pass's topological sort can leave an expert weight's transpose at the top of
    the graph, before an op that writes a cache in place (our causal conv updates its
    state), while the experts come after it: Qwen3-Next's experts never fused once its
    causal conv had (its experts fused 2/2 with the MoE family alone). Such a node computes
    from inputs only, so it may sit anywhere before its users. Returns the nodes moved."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    moved = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or not node.users or getattr(getattr(node.target, "_schema", None), "is_mutable", False):
            continue
        if any(i.op not in ("placeholder", "get_attr") for i in node.all_input_nodes):
            continue
        first = min(node.users, key=lambda u: order.get(u, len(order)))
        if order.get(first, len(order)) > order[node] + 1:
            first.prepend(node)
            moved += 1
    for node in graph.nodes:
        node.meta.pop("mutation_region_id", None)  # inductor recomputes it where it is missing
    return moved


def _make_clipped_experts_pattern(mm: str, histc_float: bool):
    """HF ``grouped_mm_experts_forward`` as GptOss configures it (``has_bias``,
    ``is_transposed``: weights ``[E, H, 2I]`` / ``[E, I, H]``) with its ``_apply_gate``:
    interleaved gate/up, ``gate <= limit``, ``-limit <= up <= limit``,
    ``(up + 1) * gate * sigmoid(gate * alpha)``. The biases are gathered per sorted pair
    with the ids clamped below E (HF's in-place ``clamp_``, in functional form)."""
    grouped_mm = _GROUPED_MMS[mm]

    def pattern(x, topk_weights, topk_ids, w13, w13_bias, w2, w2_bias, limit, alpha):
        num_top_k, num_tokens, hidden = topk_ids.size(-1), x.size(0), x.size(-1)
        num_experts = w13.size(0)
        sample_weights = topk_weights.reshape(-1)
        expert_ids_g, perm = torch.sort(topk_ids.reshape(-1))
        xs = x[perm // num_top_k]
        ws = sample_weights[perm]
        hist_in = expert_ids_g.float() if histc_float else expert_ids_g.int()
        offsets = torch.cumsum(torch.histc(hist_in, bins=num_experts, min=0, max=num_experts - 1), dim=0, dtype=torch.int32)
        sentinel = (expert_ids_g >= num_experts).unsqueeze(-1)
        ids_in_range = expert_ids_g.clamp(max=num_experts - 1)
        xs = xs.masked_fill(sentinel, 0.0)
        h = (grouped_mm(xs.to(w13.dtype), w13, offsets) + w13_bias[ids_in_range]).masked_fill(sentinel, 0.0)
        gate = h[..., ::2].clamp(min=None, max=limit)
        up = h[..., 1::2].clamp(min=-limit, max=limit)
        h = (up + 1) * (gate * torch.sigmoid(gate * alpha))
        y = (grouped_mm(h.to(w2.dtype), w2, offsets) + w2_bias[ids_in_range]).masked_fill(sentinel, 0.0)
        y = y * ws.unsqueeze(-1)
        inv = torch.empty_like(perm).index_put((perm,), torch.arange(perm.size(0), device=perm.device))
        return y[inv].view(num_tokens, num_top_k, hidden).sum(dim=1)

    pattern.__name__ = pattern.__qualname__ = f"_experts_hf_{mm}_{'histc_f' if histc_float else 'histc_i'}_bias_clipped_swiglu"
    return pattern


def _clipped_experts_replacement(x, topk_weights, topk_ids, w13, w13_bias, w2, w2_bias, limit, alpha):
    # GptOss's [E, H, 2I] / [E, I, H] weights reach the op as transposed views: no copy
    out = _ops.moe_dispatch_ffn_combine(
        x, topk_weights, topk_ids, w13.transpose(1, 2), w2.transpose(1, 2), "clipped_swiglu", None, None, None, None, "", 1, 0, None, w13_bias, w2_bias, alpha, limit
    )
    return out.to(torch.promote_types(x.dtype, topk_weights.dtype))


def _clipped_experts_inputs(dtype: torch.dtype) -> Callable[[], list[Any]]:
    def build():
        # meta, as _experts_inputs; T=6, k=2, E=4, H=16, I=8; limit and alpha are the
        # scalar_workaround samples (values no real model uses, see _softmax_inputs)
        dev = "meta"
        return [
            torch.empty(6, 16, dtype=dtype, device=dev),
            torch.empty(6, 2, dtype=dtype, device=dev),
            torch.empty(6, 2, dtype=torch.int64, device=dev),
            torch.empty(4, 16, 16, dtype=dtype, device=dev),
            torch.empty(4, 16, dtype=dtype, device=dev),
            torch.empty(4, 8, 16, dtype=dtype, device=dev),
            torch.empty(4, 16, dtype=dtype, device=dev),
            6.3,
            1.37,
        ]

    return build


def _clipped_ints_hold(match: Match) -> bool:
    """The wildcard ints and floats of a retrace-free clipped-SwiGLU row: the experts'
    (``_experts_ints_hold``), ids clamped to ``E-1`` for the bias gather, gate = the even
    columns (``[..., 0::2]``, clamped above) and up = the odd ones (``[..., 1::2]``, clamped
    to ``[-limit, limit]``), and ``up + 1``."""
    if not _experts_ints_hold(match):
        return False
    w13 = match.kwargs["w13"].meta.get("val")
    limit = match.kwargs.get("limit")
    e = w13.shape[0]
    if not all(isinstance(match.kwargs.get(n), (int, float)) for n in ("limit", "alpha")):
        # the op takes them as floats; under dynamic=True Dynamo passes GptOss's alpha and
        # limit as 0-dim tensor inputs, which have no value at compile time
        return False
    for node in match.nodes:
        if node.op != "call_function":
            continue
        t, a = node.target, node.args
        inp = a[0].meta.get("val") if a and isinstance(a[0], torch.fx.Node) else None
        if t is aten.clamp_max.default and inp is not None and not inp.is_floating_point() and not known_eq(a[1], e - 1):
            return False
        if t is aten.clamp_min.default and a[1] != -limit:
            return False
        if t is aten.add.Tensor and not isinstance(a[1], torch.fx.Node) and a[1] != 1:
            return False
        if t is aten.slice.Tensor:
            dim, start, _end = (list(a[1:4]) + [0, 0, None])[:3]
            step = a[4] if len(a) > 4 else 1
            users = list(node.users)
            if inp is None or dim not in (-1, inp.dim() - 1) or step != 2 or len(users) != 1:
                return False
            user = users[0]
            while user.target is torch.ops.prims.convert_element_type.default and len(user.users) == 1:
                user = next(iter(user.users))  # half models upcast the halves first
            want = 1 if user.target is aten.clamp_min.default else 0  # up, else gate
            if start != want:
                return False
    return True


def _clipped_experts_check(match: Match) -> bool:
    if not _experts_check(match) or not _clipped_ints_hold(match):
        return False
    b13, b2 = (match.kwargs[n].meta.get("val") for n in ("w13_bias", "w2_bias"))
    w13 = match.kwargs["w13"].meta.get("val")
    return b13 is not None and b2 is not None and b13.dim() == 2 and b2.dim() == 2 and b13.dtype == b2.dtype == w13.dtype


def expert_fusions(mm: str, histc_float: bool, dtype: torch.dtype) -> list[Fusion]:
    """The experts rows for one (grouped-GEMM op, histc input, dtype class): one per
    activation, and GptOss's biased clipped-SwiGLU experts."""
    rows = []
    for activation in _ACT_FNS:
        pattern = _make_experts_pattern(mm, histc_float, activation)
        name = f"{pattern.__name__}_{str(dtype).removeprefix('torch.')}"
        # retrace=False: under dynamic shapes the graph computes the token count, the
        # arange and the views' sizes from symbolic sizes, which a re-trace at the
        # graph's shapes writes otherwise (it matched static graphs only, and the experts
        # of every dynamic MoE graph stayed HF's: on CUDA in fp32 its grouped-GEMM
        # fallback syncs to the host, so no bucket could be captured). The ints that
        # decide what is computed are checked by _experts_ints_hold.
        rows.append(Fusion(name, pattern, _make_experts_replacement(activation), _experts_inputs(dtype), _experts_generic_check, retrace=False))
    pattern = _make_clipped_experts_pattern(mm, histc_float)
    rows.append(
        Fusion(
            f"{pattern.__name__}_{str(dtype).removeprefix('torch.')}", pattern, _clipped_experts_replacement,
            _clipped_experts_inputs(dtype), _clipped_experts_check, {"limit": 6.3, "alpha": 1.37}, retrace=False,
        )
    )
    return rows


# -- experts as a loop over experts -------------------------------------------------
#
# Dynamo unrolls ``for e in range(E)`` into E copies of one expert's body, so a row is
# the whole unrolled loop for one expert count E (and intermediate size I): every copy
# must read ``w13[e]``, ``w2[e]`` and the routing of expert ``e`` for the same ``e``,
# which the exact match checks literally. Rows are built for the (E, I) pairs a graph
# holds. The accumulator is a pattern input that ``_loop_check`` requires to be zeros
# of x's shape and dtype (a loop adding into anything else stays as it is).


def _expert_ffn(h, w13_e, w2_e, act):
    if isinstance(w13_e, tuple):
        # a ModuleList expert's own gate and up weights (Mixtral's w1, w3): see the list rows
        gate, up = F.linear(h, w13_e[0]), F.linear(h, w13_e[1])
    else:
        gate, up = F.linear(h, w13_e).chunk(2, dim=-1)
    return F.linear(act(gate) * up, w2_e)


def _one_hot(ids: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``F.one_hot(ids, num_classes)`` as a model's graph holds it (see ``as_the_graph_holds``).

    Under Dynamo (a model written with these loop functions, as the tests' are) it is
    ``F.one_hot`` itself, which the model's graph then gets the usual way."""
    if torch.compiler.is_compiling():
        return F.one_hot(ids, num_classes=num_classes)
    gm = as_the_graph_holds(
        functools.partial(F.one_hot, num_classes=num_classes), ("one_hot", num_classes, ids.dim()), ((2,) * ids.dim(), torch.int64)
    )
    return gm(ids)


def _loop_onehot_where(acc, x, topk_weights, topk_ids, w13, w2, num_experts, act):
    # HF's eager experts (``Qwen3MoeExperts.forward`` ...) over range(E) instead of
    # the experts hit: one_hot mask, torch.where per expert, index_add_
    mask = _one_hot(topk_ids, num_experts).permute(2, 1, 0)
    for e in range(num_experts):
        pos, tok = torch.where(mask[e])
        y = _expert_ffn(x[tok], w13[e], w2[e], act) * topk_weights[tok, pos, None]
        acc = acc.index_add(0, tok, y.to(acc.dtype))
    return acc


def _loop_eq_where(acc, x, topk_weights, topk_ids, w13, w2, num_experts, act):
    # the Mixtral reference loop: torch.where(ids == e) gives (token, slot) pairs
    for e in range(num_experts):
        tok, pos = torch.where(topk_ids == e)
        y = _expert_ffn(x[tok], w13[e], w2[e], act) * topk_weights[tok, pos, None]
        acc = acc.index_add(0, tok, y.to(acc.dtype))
    return acc


def _loop_dense_mul(acc, x, topk_weights, topk_ids, w13, w2, num_experts, act):
    # nonzero-free: every expert on every token, weighted by its routing weight
    # (zero where the token did not pick it): sum_e (sum_j w[t,j] [ids[t,j]==e]) ffn_e(x)
    for e in range(num_experts):
        weight = (topk_weights * (topk_ids == e)).sum(dim=-1, keepdim=True)
        acc = acc + _expert_ffn(x, w13[e], w2[e], act) * weight
    return acc


def _loop_dense_where(acc, x, topk_weights, topk_ids, w13, w2, num_experts, act):
    # the same with the mask as torch.where(ids == e, w, 0)
    for e in range(num_experts):
        weight = torch.where(topk_ids == e, topk_weights, 0.0).sum(dim=-1, keepdim=True)
        acc = acc + _expert_ffn(x, w13[e], w2[e], act) * weight
    return acc


#: loop form -> (body, accumulates by index_add into acc's dtype)
LOOP_FORMS: dict[str, tuple[Callable[..., torch.Tensor], bool]] = {
    "onehot_where": (_loop_onehot_where, True),
    "eq_where": (_loop_eq_where, True),
    "dense_mul": (_loop_dense_mul, False),
    "dense_where": (_loop_dense_where, False),
}


def _make_loop_pattern(form: str, num_experts: int, activation: str):
    body, act = LOOP_FORMS[form][0], _ACT_FNS[activation]

    def pattern(acc, x, topk_weights, topk_ids, w13, w2):
        return body(acc, x, topk_weights, topk_ids, w13, w2, num_experts, act)

    pattern.__name__ = pattern.__qualname__ = f"_loop_{form}_{activation}_e{num_experts}"
    return pattern


def _make_loop_replacement(form: str, activation: str):
    index_add = LOOP_FORMS[form][1]

    def replacement(acc, x, topk_weights, topk_ids, w13, w2):
        out = _ops.moe_dispatch_ffn_combine(x, topk_weights, topk_ids, w13, w2, activation)
        # index_add_ keeps acc's dtype (== x's, see _loop_check); the dense sum promotes
        return out.to(acc.dtype if index_add else torch.promote_types(acc.dtype, topk_weights.dtype))

    replacement.__name__ = replacement.__qualname__ = f"_loop_{form}_fused_{activation}"
    return replacement


def _loop_inputs(num_experts: int, inter: int, dtype: torch.dtype, weights_dtype: torch.dtype) -> Callable[[], list[torch.Tensor]]:
    def build():
        # real tensors (the exact trace runs nonzero); T=5, k=2, H=8. Distinct experts per
        # token, as top-k gives them.
        g = torch.Generator().manual_seed(0)
        ids = torch.stack([torch.randperm(num_experts, generator=g)[:2] for _ in range(5)]) if num_experts >= 2 else torch.zeros(5, 1, dtype=torch.int64)
        return [
            torch.zeros(5, 8, dtype=dtype),
            torch.randn(5, 8, generator=g).to(dtype),
            torch.rand(5, ids.shape[1], generator=g).to(weights_dtype),
            ids,
            torch.randn(num_experts, 2 * inter, 8, generator=g).to(dtype),
            torch.randn(num_experts, 8, inter, generator=g).to(dtype),
        ]

    return build


def _is_zeros_like(node: Any, like: torch.Tensor) -> bool:
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return False
    if node.target is torch.ops.aten.full.default:
        fill = node.args[1] if len(node.args) > 1 else None
    elif node.target is torch.ops.aten.zeros.default:
        fill = 0
    else:
        return False
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    val = node.meta.get("val")
    same_shape = val is not None and val.dim() == like.dim() and all(statically_known_true(a == b) for a, b in zip(val.shape, like.shape))
    return fill == 0 and same_shape and val.dtype == like.dtype


def _loop_check(match: Match) -> bool:
    x = match.kwargs["x"].meta.get("val")
    return _experts_check(match) and x is not None and _is_zeros_like(match.kwargs["acc"], x)


def loop_fusion(form: str, num_experts: int, inter: int, activation: str, dtype: torch.dtype, weights_dtype: torch.dtype) -> Fusion:
    """The row for one unrolled loop: form, expert count, intermediate size, activation, dtypes."""
    pattern = _make_loop_pattern(form, num_experts, activation)
    name = f"{pattern.__name__}_i{inter}_{str(dtype).removeprefix('torch.')}_{str(weights_dtype).removeprefix('torch.')}"
    return Fusion(name, pattern, _make_loop_replacement(form, activation), _loop_inputs(num_experts, inter, dtype, weights_dtype), _loop_check, exact=True)


@functools.lru_cache(maxsize=None)
def _loop_pass(form: str, num_experts: int, inter: int, activation: str, dtype: torch.dtype, weights_dtype: torch.dtype, explain_node: str | None) -> PatternPass:
    return PatternPass(f"moe_loop_{form}", "moe", [loop_fusion(form, num_experts, inter, activation, dtype, weights_dtype)], explain_node)


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def loop_variants(graph: torch.fx.Graph) -> set[tuple[str, int, int, str, torch.dtype, torch.dtype]]:
    """(form, E, I, activation, dtype, weights dtype) of each loop row worth trying on ``graph``.

    Only selects which rows to build (the exact match decides what fuses): stacked
    expert weights ``w13 [E, 2I, H]`` / ``w2 [E, H, I]`` read per expert by ``select``,
    the mask ops of each form, the activations' marker ops, the top-k value dtypes.
    """
    aten = torch.ops.aten
    stacked = []
    for node in graph.nodes:
        if node.op == "call_function" and node.target is aten.select.int and node.args[1] == 0:
            val = _val(node.args[0])
            if val is not None and val.dim() == 3 and val.is_floating_point() and all(isinstance(d, int) for d in val.shape):
                stacked.append(val)
    forms, acts, weight_dtypes = _loop_markers(graph)
    if not forms or not stacked:
        return set()
    pairs = set()
    for a in stacked:
        for b in stacked:
            e, two_i, h = a.shape
            if b.shape == (e, h, two_i // 2) and two_i % 2 == 0 and a.dtype == b.dtype:
                pairs.add((e, two_i // 2, a.dtype))
    return {(form, e, i, act, dtype, wd) for form in forms for e, i, dtype in pairs for act in acts for wd in weight_dtypes | {dtype}}


def _loop_markers(graph: torch.fx.Graph) -> tuple[set[str], list[str], set[torch.dtype]]:
    """(loop forms, activations, top-k value dtypes) an unrolled expert loop of ``graph`` may have:
    the mask ops of each form, the activations' marker ops, the top-k nodes."""
    aten = torch.ops.aten
    forms, targets, weight_dtypes = set(), set(), set()
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        targets.add(node.target)
        if node.target is aten.nonzero.default and isinstance(node.args[0], torch.fx.Node):
            if node.args[0].target is aten.select.int:
                forms.add("onehot_where")
            elif node.args[0].target is aten.eq.Scalar:
                forms.add("eq_where")
        elif node.target is aten.eq.Scalar:
            users = {u.target for u in node.users}
            if aten.mul.Tensor in users:
                forms.add("dense_mul")
            if aten.where.self in users:
                forms.add("dense_where")
        elif node.target is aten.topk.default:
            val = _val(node)
            if val is not None and val[0].is_floating_point():
                weight_dtypes.add(val[0].dtype)
    acts = ["silu"] + (["gelu"] if aten.erf.default in targets else []) + (["gelu_tanh"] if aten.tanh.default in targets else [])
    return forms, acts, weight_dtypes


def drop_nonzero_size_asserts(graph: torch.fx.Graph) -> int:
    """Erase the runtime asserts ``0 <= u`` and ``u <= numel`` on each ``nonzero``'s row count ``u``.

    AOT capture adds them for every unbacked size; both hold for any ``nonzero`` output,
    so they check nothing, but as extra users of ``nonzero`` they keep an unrolled
    expert loop from matching. Other asserts on ``u`` stay. Returns the asserts erased.
    """
    import operator

    from torch.fx.experimental.symbolic_shapes import statically_known_true

    aten, erased = torch.ops.aten, 0
    for nz in [n for n in graph.nodes if n.op == "call_function" and n.target is aten.nonzero.default]:
        src = _val(nz.args[0])
        if src is None:
            continue
        for size in [u for u in nz.users if u.target is aten.sym_size.int and u.args[1] == 0]:
            for cmp in list(size.users):
                if cmp.target is operator.ge and cmp.args == (size, 0):
                    trivial = True
                elif cmp.target is operator.le and cmp.args[0] is size and isinstance(cmp.args[1], (int, torch.SymInt)):
                    trivial = statically_known_true(cmp.args[1] >= src.numel())
                else:
                    trivial = False
                asserts = [a for a in cmp.users if a.target is aten._assert_scalar.default]
                if not trivial or len(asserts) != len(cmp.users):
                    continue
                for a in asserts:
                    graph.erase_node(a)
                    erased += 1
                graph.erase_node(cmp)
            if not size.users:
                graph.erase_node(size)
    return erased


# -- experts as a loop over a ModuleList of experts ---------------------------------
#
# The same unrolled loops with each expert's weights its own tensors (``self.experts[e].w1``
# ...: one graph input per expert and projection) instead of ``w13[e]`` of a stacked one.
# A row's pattern takes the E experts' weights as separate arguments, so the exact match
# binds copy ``e``'s weights to ``w1_e`` / ``w3_e`` / ``w2_e`` (whatever order the graph has
# its inputs in); the replacement hands them to ``moe_dispatch_ffn_combine_list`` as lists,
# never stacked. Two expert layouts: separate gate and up (Mixtral's ``w1``/``w3``,
# ``gate_proj``/``up_proj``; ``split``) or one ``[gate; up]`` weight per expert.


def _loop_onehot_where_hf4(acc, x, topk_weights, topk_ids, w13, w2, num_experts, act):
    # transformers 4.x MixtralSparseMoeBlock (and the remote-code MoE blocks copied from it):
    # the one_hot form with ``hidden_states[None, top_x].reshape(-1, hidden_dim)``. The
    # reshape records H as a literal, so these rows are built per hidden size.
    mask = _one_hot(topk_ids, num_experts).permute(2, 1, 0)
    for e in range(num_experts):
        pos, tok = torch.where(mask[e])
        y = _expert_ffn(x[None, tok].reshape(-1, x.shape[-1]), w13[e], w2[e], act) * topk_weights[tok, pos, None]
        acc = acc.index_add(0, tok, y.to(acc.dtype))
    return acc


#: the ModuleList rows' forms: the stacked rows' forms and Mixtral's 4.x block
LIST_LOOP_FORMS: dict[str, tuple[Callable[..., torch.Tensor], bool]] = {**LOOP_FORMS, "onehot_where_hf4": (_loop_onehot_where_hf4, True)}


def _list_weight_names(num_experts: int, split: bool) -> list[str]:
    names = [f"w1_{e}" for e in range(num_experts)]
    if split:
        names += [f"w3_{e}" for e in range(num_experts)]
    return names + [f"w2_{e}" for e in range(num_experts)]


def _unpack_weights(weights: tuple[Any, ...], num_experts: int, split: bool) -> tuple[list[Any], list[Any], list[Any]]:
    e = num_experts
    w1, rest = list(weights[:e]), list(weights[e:])
    w3, w2 = (rest[:e], rest[e:]) if split else ([], rest)
    return w1, w3, w2


def _with_signature(fn: Callable[..., Any], num_experts: int, split: bool, name: str) -> Callable[..., Any]:
    # the matcher names a pattern's inputs by its signature: one name per expert weight
    import inspect

    params = ["acc", "x", "topk_weights", "topk_ids", *_list_weight_names(num_experts, split)]
    fn.__signature__ = inspect.Signature([inspect.Parameter(p, inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in params])
    fn.__name__ = fn.__qualname__ = name
    return fn


def _make_list_loop_pattern(form: str, num_experts: int, split: bool, activation: str):
    body, act = LIST_LOOP_FORMS[form][0], _ACT_FNS[activation]

    def pattern(acc, x, topk_weights, topk_ids, *weights):
        w1, w3, w2 = _unpack_weights(weights, num_experts, split)
        # the loop bodies index w13[e]: a list of (gate, up) pairs selects _expert_ffn's split form
        return body(acc, x, topk_weights, topk_ids, list(zip(w1, w3)) if split else w1, w2, num_experts, act)

    return _with_signature(pattern, num_experts, split, f"_list_loop_{form}_{activation}_e{num_experts}{'_split' if split else ''}")


def _make_list_loop_replacement(form: str, num_experts: int, split: bool, activation: str):
    index_add = LIST_LOOP_FORMS[form][1]

    def replacement(acc, x, topk_weights, topk_ids, *weights):
        w1, w3, w2 = _unpack_weights(weights, num_experts, split)
        out = _ops.moe_dispatch_ffn_combine_list(x, topk_weights, topk_ids, w1, w3, w2, activation)
        return out.to(acc.dtype if index_add else torch.promote_types(acc.dtype, topk_weights.dtype))

    return _with_signature(replacement, num_experts, split, f"_list_loop_{form}_fused_{activation}_e{num_experts}{'_split' if split else ''}")


def _list_loop_inputs(num_experts: int, inter: int, hidden: int, split: bool, dtype: torch.dtype, weights_dtype: torch.dtype) -> Callable[[], list[torch.Tensor]]:
    def build():
        # real tensors (the exact trace runs nonzero), as _loop_inputs; T=5, k=2; H is the
        # graph's own (the hf4 form records it), the other forms use 8
        h = hidden
        g = torch.Generator().manual_seed(0)
        ids = torch.stack([torch.randperm(num_experts, generator=g)[:2] for _ in range(5)]) if num_experts >= 2 else torch.zeros(5, 1, dtype=torch.int64)
        gate_rows = inter if split else 2 * inter
        weights = [torch.randn(gate_rows, h, generator=g).to(dtype) for _ in range(num_experts)]
        if split:
            weights += [torch.randn(inter, h, generator=g).to(dtype) for _ in range(num_experts)]
        weights += [torch.randn(h, inter, generator=g).to(dtype) for _ in range(num_experts)]
        return [torch.zeros(5, h, dtype=dtype), torch.randn(5, h, generator=g).to(dtype), torch.rand(5, ids.shape[1], generator=g).to(weights_dtype), ids, *weights]

    return build


def _list_loop_check(num_experts: int, split: bool) -> Callable[[Match], bool]:
    names = _list_weight_names(num_experts, split)

    def check(match: Match) -> bool:
        x, w, ids = (_val(match.kwargs[n]) for n in ("x", "topk_weights", "topk_ids"))
        weights = [_val(match.kwargs[n]) for n in names]
        if x is None or w is None or ids is None or any(v is None for v in weights):
            return False
        w1, w3, w2 = _unpack_weights(tuple(weights), num_experts, split)
        # one shape per projection across the experts (the op's contract), x's dtype and device
        same = all(len({tuple(v.shape) for v in group}) == 1 for group in (w1, w3, w2) if group)
        typed = all(v.dim() == 2 and v.dtype == x.dtype and v.device == x.device for v in weights)
        return (
            same
            and typed
            and x.dim() == 2
            and ids.dim() == 2
            and not ids.dtype.is_floating_point
            and w.is_floating_point()
            and _is_zeros_like(match.kwargs["acc"], x)
        )

    return check


def list_loop_fusion(form: str, num_experts: int, inter: int, hidden: int, split: bool, activation: str, dtype: torch.dtype, weights_dtype: torch.dtype) -> Fusion:
    """The row for one unrolled loop over per-expert weights (see the section comment)."""
    pattern = _make_list_loop_pattern(form, num_experts, split, activation)
    name = f"{pattern.__name__}_i{inter}_h{hidden}_{str(dtype).removeprefix('torch.')}_{str(weights_dtype).removeprefix('torch.')}"
    return Fusion(
        name, pattern, _make_list_loop_replacement(form, num_experts, split, activation),
        _list_loop_inputs(num_experts, inter, hidden, split, dtype, weights_dtype), _list_loop_check(num_experts, split), exact=True,
    )


@functools.lru_cache(maxsize=None)
def _list_loop_pass(form: str, num_experts: int, inter: int, hidden: int, split: bool, activation: str, dtype: torch.dtype, weights_dtype: torch.dtype, explain_node: str | None) -> PatternPass:
    return PatternPass(f"moe_list_loop_{form}", "moe", [list_loop_fusion(form, num_experts, inter, hidden, split, activation, dtype, weights_dtype)], explain_node)


#: why the ModuleList rows leave a CPU graph alone where inductor compiles it (stats()["skipped"]["moe"])
LIST_LOOP_CPU_INDUCTOR_SKIP = (
    "ModuleList experts on cpu+inductor: inductor's compiled expert loop is as fast or faster "
    "than the list op's CPU loop (benchmarks/moe_list.py --compiled)"
)


def list_loop_policy(device_type: str | None, codegen: str) -> str | None:
    """None where the ModuleList rows apply; else the reason they are skipped (goes to stats()).

    Measured (``benchmarks/moe_list.py --compiled``, one CPU thread, fp32, E=8, k=2, 1-128
    tokens): with the FX graph run as is, the fused block is 1.03-1.67x faster than the
    unfused one; under inductor it is 0.63-0.75x at H=256/I=512 and 0.79x (1 token) to
    0.97-1.01x (17-128 tokens) at H=1024/I=3584, so on the CPU the rows apply only where
    the graph is not handed to inductor. CUDA (Triton pointer-table kernels) and the NPU
    (grouped matmul over the list) apply them.
    """
    resolved = codegen if codegen != "auto" else ("fx" if device_type == "npu" else "inductor")
    if device_type == "cpu" and resolved == "inductor":
        return LIST_LOOP_CPU_INDUCTOR_SKIP
    return None


_TRANSPOSES = (torch.ops.aten.t.default, torch.ops.aten.permute.default, torch.ops.aten.transpose.int)


def list_loop_variants(graph: torch.fx.Graph) -> set[tuple[str, int, int, int, bool, str, torch.dtype, torch.dtype]]:
    """(form, E, I, H, split, activation, dtype, weights dtype) of each list-loop row worth trying.

    Only selects which rows to build (the exact match decides what fuses): the expert
    count from the masks (``ids == e`` literals up to E - 1, or the one_hot mask's
    ``[E, k, T]``), the intermediate size from the 2-D weight inputs read transposed by a
    linear (at least E down weights ``[H, I]`` and E gate(-up) weights ``[I, H]`` twice,
    or ``[2I, H]``), the markers of :func:`_loop_markers`.
    """
    aten = torch.ops.aten
    experts: set[int] = set()
    eq_max: dict[torch.fx.Node, int] = {}
    weights: dict[tuple[int, int, torch.dtype], int] = {}
    hf4 = False  # x[None, tok]: an index of an unsqueeze at dim 0 (Mixtral 4.x's gather)
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is aten.index.Tensor and isinstance(node.args[0], torch.fx.Node) and node.args[0].target is aten.unsqueeze.default and node.args[0].args[1] == 0:
            hf4 = True
        elif node.target is aten.eq.Scalar and isinstance(node.args[1], int) and not isinstance(node.args[1], bool):
            eq_max[node.args[0]] = max(eq_max.get(node.args[0], -1), node.args[1])
        elif node.target is aten.select.int and node.args[1] == 0:
            val = _val(node.args[0])
            if val is not None and val.dim() == 3 and not val.is_floating_point() and isinstance(val.shape[0], int):
                experts.add(val.shape[0])
        elif node.target in _TRANSPOSES and isinstance(node.args[0], torch.fx.Node) and node.args[0].op in ("placeholder", "get_attr"):
            val = _val(node.args[0])
            if val is not None and val.dim() == 2 and val.is_floating_point() and all(isinstance(d, int) for d in val.shape):
                key = (val.shape[0], val.shape[1], val.dtype)
                weights[key] = weights.get(key, 0) + 1
    experts |= {m + 1 for m in eq_max.values() if m >= 1}
    forms, acts, weight_dtypes = _loop_markers(graph)
    if not forms or not experts:
        return set()
    layouts = set()
    for (h, i, dtype), n_down in weights.items():
        for e in experts:
            if n_down < e:
                continue
            if weights.get((i, h, dtype), 0) >= 2 * e:
                layouts.add((e, i, h, True, dtype))
            if weights.get((2 * i, h, dtype), 0) >= e:
                layouts.add((e, i, h, False, dtype))
    if "onehot_where" in forms and hf4:
        forms.add("onehot_where_hf4")
    # H matters to the hf4 rows only (the others' example H is 8 whatever the graph's)
    return {
        (form, e, i, h if form == "onehot_where_hf4" else 8, split, act, dtype, wd)
        for form in forms for e, i, h, split, dtype in layouts for act in acts for wd in weight_dtypes | {dtype}
    }


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


def _scaled_gating(first, top_k, bias, n_group, topk_group, renormalize, scale, eps, router_weight=None):
    """``moe_gating_topk`` with the routed scaling inside where it is a Python number.

    Under ``dynamic=True`` Dynamo does not specialise float attributes such as
    DeepSeek-V3's ``routed_scaling_factor``: the matcher binds ``scale`` to a 0-dim
    tensor input (or a SymFloat), which the op's ``float`` argument cannot take. The
    weights are float32 either way, so scaling them after the op is the same product
    the pattern computes.
    """
    if isinstance(scale, (int, float)):
        return _ops.moe_gating_topk(first, top_k, bias, "sigmoid", n_group, topk_group, renormalize, scale, eps, router_weight)
    weights, ids = _ops.moe_gating_topk(first, top_k, bias, "sigmoid", n_group, topk_group, renormalize, 1.0, eps, router_weight)
    return weights * scale, ids


def _sigmoid_grouped_renorm_fused(logits, bias, top_k, n_group, topk_group, scale):
    return _scaled_gating(logits, top_k, bias, n_group, topk_group, True, scale, 1e-20)


def _sigmoid_grouped(logits, bias, top_k, n_group, topk_group, scale):
    weights, ids = _deepseek_scores(logits, bias, top_k, n_group, topk_group)
    return weights * scale, ids


def _sigmoid_grouped_fused(logits, bias, top_k, n_group, topk_group, scale):
    return _scaled_gating(logits, top_k, bias, n_group, topk_group, False, scale, 0.0)


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


# Router GEMM folded in: the rows above with their logits computed by a bias-free
# ``F.linear(x, router_weight)``, the way HF routers write it; the replacement hands
# ``router_weight`` to the op, which computes ``F.linear(x, w).float()`` itself (one
# launch at decode sizes on CUDA instead of a cuBLAS GEMM and the gating kernel).
# Half-precision models: Qwen/Mixtral-style routers run the linear in the model dtype,
# score in fp32 (``softmax(dtype=float)``) and cast the weights back to the model dtype;
# DeepSeek-V3's runs the linear itself in fp32 (``F.linear(x.float(), w.float())``, so
# the op gets ``x.float()`` and the half weight, whose conversion is exact) and keeps
# fp32 weights. Float32 models have no casts. Where the logits have another user (an
# auxiliary loss, ``output_router_logits``) these rows do not match and the plain ones do.


def _linear_softmax_renorm_half(x, router_weight, top_k):
    weights, ids = _softmax_topk_renorm(F.linear(x, router_weight).float(), top_k)
    return weights.to(x.dtype), ids


def _linear_softmax_half(x, router_weight, top_k):
    weights, ids = _softmax_topk(F.linear(x, router_weight).float(), top_k)
    return weights.to(x.dtype), ids


def _linear_softmax_renorm_fp32(x, router_weight, top_k):
    return _softmax_topk_renorm(F.linear(x, router_weight), top_k)


def _linear_softmax_fp32(x, router_weight, top_k):
    return _softmax_topk(F.linear(x, router_weight), top_k)


def _linear_softmax_renorm_fused(x, router_weight, top_k):
    return _ops.moe_gating_topk(x, top_k, None, "softmax", 1, 1, True, 1.0, 0.0, router_weight)


def _linear_softmax_fused(x, router_weight, top_k):
    return _ops.moe_gating_topk(x, top_k, None, "softmax", 1, 1, False, 1.0, 0.0, router_weight)


def _linear_sigmoid_grouped_renorm_half(x, router_weight, bias, top_k, n_group, topk_group, scale):
    return _sigmoid_grouped_renorm(F.linear(x.float(), router_weight.float()), bias, top_k, n_group, topk_group, scale)


def _linear_sigmoid_grouped_half(x, router_weight, bias, top_k, n_group, topk_group, scale):
    return _sigmoid_grouped(F.linear(x.float(), router_weight.float()), bias, top_k, n_group, topk_group, scale)


def _linear_sigmoid_grouped_renorm_fp32(x, router_weight, bias, top_k, n_group, topk_group, scale):
    return _sigmoid_grouped_renorm(F.linear(x, router_weight), bias, top_k, n_group, topk_group, scale)


def _linear_sigmoid_grouped_fp32(x, router_weight, bias, top_k, n_group, topk_group, scale):
    return _sigmoid_grouped(F.linear(x, router_weight), bias, top_k, n_group, topk_group, scale)


def _linear_sigmoid_grouped_renorm_fused(x, router_weight, bias, top_k, n_group, topk_group, scale):
    return _scaled_gating(x.float(), top_k, bias, n_group, topk_group, True, scale, 1e-20, router_weight)


def _linear_sigmoid_grouped_fused(x, router_weight, bias, top_k, n_group, topk_group, scale):
    return _scaled_gating(x.float(), top_k, bias, n_group, topk_group, False, scale, 0.0, router_weight)


def _linear_softmax_inputs(dtype: torch.dtype) -> Callable[[], list[Any]]:
    # T=6, H=19, E=17, top_k=11 (see _softmax_inputs)
    return lambda: [torch.empty(6, 19, dtype=dtype), torch.empty(17, 19, dtype=dtype), 11]


def _linear_grouped_inputs(dtype: torch.dtype) -> Callable[[], list[Any]]:
    # T=5, H=21, E=39 (see _grouped_inputs); the correction bias stays fp32, as HF keeps it
    return lambda: [torch.empty(5, 21, dtype=dtype), torch.empty(39, 21, dtype=dtype), torch.empty(39), 11, 13, 7, 2.3]


def _linear_check(dtypes: tuple[torch.dtype, ...]) -> Callable[[Match], bool]:
    def check(match: Match) -> bool:
        x, w = (match.kwargs[n].meta.get("val") for n in ("x", "router_weight"))
        if x is None or w is None:
            return False
        return x.dim() == 2 and w.dim() == 2 and w.shape[1] == x.shape[1] and x.dtype == w.dtype and x.dtype in dtypes

    return check


_SOFTMAX_WORKAROUND = {"top_k": 11}
_GROUPED_WORKAROUND = {"top_k": 11, "n_group": 13, "topk_group": 7, "scale": 2.3}
_HALF, _FP32 = (torch.bfloat16, torch.float16), (torch.float32,)

#: routers; the rows with the router linear folded in come first (the others match their
#: tails), and the renormalising rows before the plain ones (which are their prefixes)
ROUTER_FUSIONS: list[Fusion] = [
    Fusion("linear_softmax_topk_renorm_bf16", _linear_softmax_renorm_half, _linear_softmax_renorm_fused, _linear_softmax_inputs(torch.bfloat16), _linear_check(_HALF), _SOFTMAX_WORKAROUND),
    Fusion("linear_softmax_topk_bf16", _linear_softmax_half, _linear_softmax_fused, _linear_softmax_inputs(torch.bfloat16), _linear_check(_HALF), _SOFTMAX_WORKAROUND),
    Fusion("linear_softmax_topk_renorm_fp32", _linear_softmax_renorm_fp32, _linear_softmax_renorm_fused, _linear_softmax_inputs(torch.float32), _linear_check(_FP32), _SOFTMAX_WORKAROUND),
    Fusion("linear_softmax_topk_fp32", _linear_softmax_fp32, _linear_softmax_fused, _linear_softmax_inputs(torch.float32), _linear_check(_FP32), _SOFTMAX_WORKAROUND),
    Fusion("linear_sigmoid_grouped_topk_renorm_bf16", _linear_sigmoid_grouped_renorm_half, _linear_sigmoid_grouped_renorm_fused, _linear_grouped_inputs(torch.bfloat16), _linear_check(_HALF), _GROUPED_WORKAROUND),
    Fusion("linear_sigmoid_grouped_topk_bf16", _linear_sigmoid_grouped_half, _linear_sigmoid_grouped_fused, _linear_grouped_inputs(torch.bfloat16), _linear_check(_HALF), _GROUPED_WORKAROUND),
    Fusion("linear_sigmoid_grouped_topk_renorm_fp32", _linear_sigmoid_grouped_renorm_fp32, _linear_sigmoid_grouped_renorm_fused, _linear_grouped_inputs(torch.float32), _linear_check(_FP32), _GROUPED_WORKAROUND),
    Fusion("linear_sigmoid_grouped_topk_fp32", _linear_sigmoid_grouped_fp32, _linear_sigmoid_grouped_fused, _linear_grouped_inputs(torch.float32), _linear_check(_FP32), _GROUPED_WORKAROUND),
    Fusion("softmax_topk_renorm", _softmax_topk_renorm, _softmax_topk_renorm_fused, _softmax_inputs, _router_check, _SOFTMAX_WORKAROUND),
    Fusion("softmax_topk", _softmax_topk, _softmax_topk_fused, _softmax_inputs, _router_check, _SOFTMAX_WORKAROUND),
    Fusion("sigmoid_grouped_topk_renorm", _sigmoid_grouped_renorm, _sigmoid_grouped_renorm_fused, _grouped_inputs, _router_check, _GROUPED_WORKAROUND),
    Fusion("sigmoid_grouped_topk", _sigmoid_grouped, _sigmoid_grouped_fused, _grouped_inputs, _router_check, _GROUPED_WORKAROUND),
]


# -- shared experts -------------------------------------------------------------------
#
# After the experts rows, a layer's routed output is one ``moe_dispatch_ffn_combine``
# node; where the graph adds a shared-expert MLP of the same input to it (DeepSeek-V3:
# ``routed + shared(x)``; Qwen2-MoE / Qwen3-Next: ``routed + sigmoid(x @ g.T) * shared(x)``)
# the shared MLP moves into the op. DeepSeek writes it on the 3-D hidden states and
# views the routed output back, Qwen on the flattened 2-D ones: one row each.


def _shared_mlp(x, shared_gate, shared_up, shared_down, act):
    return F.linear(act(F.linear(x, shared_gate)) * F.linear(x, shared_up), shared_down)


def _make_shared_rows(activation: str) -> list[tuple[str, Callable[..., Any], Callable[..., Any]]]:
    act = _ACT_FNS[activation]

    def plain_2d(x, topk_weights, topk_ids, w13, w2, shared_gate, shared_up, shared_down):
        routed = _ops.moe_dispatch_ffn_combine(x, topk_weights, topk_ids, w13, w2, activation)
        return routed + _shared_mlp(x, shared_gate, shared_up, shared_down, act)

    def plain_2d_fused(x, topk_weights, topk_ids, w13, w2, shared_gate, shared_up, shared_down):
        return _ops.moe_dispatch_ffn_combine(x, topk_weights, topk_ids, w13, w2, activation, None, shared_gate, shared_up, shared_down)

    def sigmoid_2d(x, topk_weights, topk_ids, w13, w2, shared_gate, shared_up, shared_down, shared_expert_gate):
        routed = _ops.moe_dispatch_ffn_combine(x, topk_weights, topk_ids, w13, w2, activation)
        return routed + torch.sigmoid(F.linear(x, shared_expert_gate)) * _shared_mlp(x, shared_gate, shared_up, shared_down, act)

    def sigmoid_2d_fused(x, topk_weights, topk_ids, w13, w2, shared_gate, shared_up, shared_down, shared_expert_gate):
        return _ops.moe_dispatch_ffn_combine(x, topk_weights, topk_ids, w13, w2, activation, None, shared_gate, shared_up, shared_down, "", 1, 0, shared_expert_gate)

    def plain_3d(x, topk_weights, topk_ids, w13, w2, shared_gate, shared_up, shared_down):
        # DeepseekV3MoE: experts on x.view(-1, H), viewed back, plus shared_experts(x)
        routed = _ops.moe_dispatch_ffn_combine(x.view(-1, x.size(-1)), topk_weights, topk_ids, w13, w2, activation).view(x.shape)
        return routed + _shared_mlp(x, shared_gate, shared_up, shared_down, act)

    def plain_3d_fused(x, topk_weights, topk_ids, w13, w2, shared_gate, shared_up, shared_down):
        x2 = x.view(-1, x.size(-1))
        return _ops.moe_dispatch_ffn_combine(x2, topk_weights, topk_ids, w13, w2, activation, None, shared_gate, shared_up, shared_down).view(x.shape)

    def sigmoid_3d(x, topk_weights, topk_ids, w13, w2, shared_gate, shared_up, shared_down, shared_expert_gate):
        routed = _ops.moe_dispatch_ffn_combine(x.view(-1, x.size(-1)), topk_weights, topk_ids, w13, w2, activation).view(x.shape)
        return routed + torch.sigmoid(F.linear(x, shared_expert_gate)) * _shared_mlp(x, shared_gate, shared_up, shared_down, act)

    def sigmoid_3d_fused(x, topk_weights, topk_ids, w13, w2, shared_gate, shared_up, shared_down, shared_expert_gate):
        x2 = x.view(-1, x.size(-1))
        out = _ops.moe_dispatch_ffn_combine(x2, topk_weights, topk_ids, w13, w2, activation, None, shared_gate, shared_up, shared_down, "", 1, 0, shared_expert_gate)
        return out.view(x.shape)

    rows = [("sigmoid_2d", sigmoid_2d, sigmoid_2d_fused), ("plain_2d", plain_2d, plain_2d_fused), ("sigmoid_3d", sigmoid_3d, sigmoid_3d_fused), ("plain_3d", plain_3d, plain_3d_fused)]
    for kind, pattern, replacement in rows:
        pattern.__name__ = pattern.__qualname__ = f"_shared_{kind}_{activation}"
        replacement.__name__ = replacement.__qualname__ = f"_shared_{kind}_fused_{activation}"
    return rows


def _shared_inputs(kind: str, dtype: torch.dtype) -> Callable[[], list[torch.Tensor]]:
    def build():
        # meta tensors; T=6, H=16, k=2, E=4, I=8, shared intermediate 12
        dev = "meta"
        x = torch.empty(1, 6, 16, dtype=dtype, device=dev) if kind.endswith("3d") else torch.empty(6, 16, dtype=dtype, device=dev)
        out = [
            x,
            torch.empty(6, 2, dtype=dtype, device=dev),
            torch.empty(6, 2, dtype=torch.int64, device=dev),
            torch.empty(4, 16, 16, dtype=dtype, device=dev),
            torch.empty(4, 16, 8, dtype=dtype, device=dev),
            torch.empty(12, 16, dtype=dtype, device=dev),
            torch.empty(12, 16, dtype=dtype, device=dev),
            torch.empty(16, 12, dtype=dtype, device=dev),
        ]
        if kind.startswith("sigmoid"):
            out.append(torch.empty(1, 16, dtype=dtype, device=dev))
        return out

    return build


def _shared_check(match: Match) -> bool:
    names = ("x", "w13", "shared_gate", "shared_up", "shared_down")
    x, w13, g, u, d = (match.kwargs[n].meta.get("val") for n in names)
    gate = match.kwargs["shared_expert_gate"].meta.get("val") if "shared_expert_gate" in match.kwargs else None
    if any(v is None for v in (x, w13, g, u, d)) or ("shared_expert_gate" in match.kwargs and gate is None):
        return False
    h = x.shape[-1]
    shapes_ok = g.dim() == u.dim() == d.dim() == 2 and g.shape == u.shape and g.shape[1] == h and d.shape[0] == h and d.shape[1] == g.shape[0]
    gate_ok = gate is None or (gate.dim() == 2 and gate.shape[0] == 1 and gate.shape[1] == h and gate.dtype == x.dtype)
    return shapes_ok and gate_ok and g.dtype == u.dtype == d.dtype == x.dtype == w13.dtype and g.device == x.device


def shared_fusions(activation: str, dtype: torch.dtype) -> list[Fusion]:
    """Shared-expert folding rows for one activation and dtype class (gated first: the plain ones do not match them)."""
    out = []
    for kind, pattern, replacement in _make_shared_rows(activation):
        out.append(Fusion(f"{pattern.__name__}_{str(dtype).removeprefix('torch.')}", pattern, replacement, _shared_inputs(kind, dtype), _shared_check))
    return out


@functools.lru_cache(maxsize=None)
def _shared_pass(activation: str, dtype: torch.dtype, explain_node: str | None) -> PatternPass:
    return PatternPass("moe_shared_experts", "moe", shared_fusions(activation, dtype), explain_node)


def shared_variants(graph: torch.fx.Graph) -> set[tuple[str, torch.dtype]]:
    """(activation, dtype class) of each routed-only ``moe_dispatch_ffn_combine`` in the graph."""
    out = set()
    for node in graph.nodes:
        if node.op == "call_function" and node.target is _ops.moe_dispatch_ffn_combine.default:
            args = list(node.args) + [None] * 13
            activation = args[5] if args[5] is not None else node.kwargs.get("activation", "silu")
            shared = args[7] if args[7] is not None else node.kwargs.get("shared_gate")
            val = _val(node.args[0])
            if shared is None and val is not None and activation in _ACT_FNS:
                out.add((activation, torch.float32 if val.dtype in (torch.float32, torch.float64) else val.dtype))
    return out


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

    def __init__(self, routers: PatternPass, explain_node: str | None = None, codegen: str = "auto"):
        self.routers = routers
        self.explain_node = explain_node
        self.codegen = codegen  # the ModuleList rows' per-device policy (list_loop_policy)

    def __call__(self, graph: torch.fx.Graph) -> int:
        n_experts = 0
        variants = sorted(expert_variants(graph), key=str)
        if variants:
            # Mixtral's first MoE layer never fused under dynamic=True: AOT read T*k off
            # topk_ids.reshape(-1), one more user of a node inside the pattern
            hoist_size_reads(graph)
            sink_input_nodes(graph)
        for mm, histc_float, dtype in variants:
            n_experts += _expert_pass(mm, histc_float, dtype, self.explain_node)(graph)
        loops = loop_variants(graph)
        if loops and any(n.target is torch.ops.aten.nonzero.default for n in graph.nodes):
            drop_nonzero_size_asserts(graph)
        for variant in sorted(loops, key=str):
            n_experts += _loop_pass(*variant, self.explain_node)(graph)
        list_loops = list_loop_variants(graph)
        reason = list_loop_policy(graph_device(graph), self.codegen) if list_loops else None
        if reason is not None:
            _stats.record_skip("moe", reason)
            list_loops = set()
        if list_loops and not loops and any(n.target is torch.ops.aten.nonzero.default for n in graph.nodes):
            drop_nonzero_size_asserts(graph)
        for variant in sorted(list_loops, key=str):
            n_experts += _list_loop_pass(*variant, self.explain_node)(graph)
        has_topk = any(n.target is torch.ops.aten.topk.default for n in graph.nodes)
        n_routers = self.routers(graph) if has_topk else 0
        # shared experts fold into an experts op already counted: not counted again
        n_shared = sum(_shared_pass(act, dtype, self.explain_node)(graph) for act, dtype in sorted(shared_variants(graph), key=str))
        log.debug("moe: %d experts blocks, %d routers, %d shared experts fused", n_experts, n_routers, n_shared)
        return n_experts + max(0, n_routers - n_experts)

    def uuid_sources(self) -> list[Any]:
        # the module holds every pattern, replacement and check
        return super().uuid_sources()


def make_pass(config: AscendConfig) -> GraphPass | None:
    if "moe" not in config.fusions:
        return None
    return MoEFusion(PatternPass("moe_routers", "moe", ROUTER_FUSIONS, config.explain_node), config.explain_node, config.codegen)
