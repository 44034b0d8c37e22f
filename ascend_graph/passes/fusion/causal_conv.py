"""Fusion family ``causal_conv1d``: causal depthwise conv1d subgraphs -> the fused ops.

Entry point: :func:`make_pass` (the pass manager calls it with the compile's config).

What is matched, as HF transformers writes it when no causal-conv1d kernel package is
installed (Qwen3-Next's gated delta net, Mamba, Mamba2 and LFM2 share the same two
fallbacks, ``causal_conv1d_fn`` and ``causal_conv1d_update``; RecurrentGemma writes the
older sum form), after AOT tracing to ATen:

- prefill: ``act(conv1d(x, w, b, padding=K-1, groups=C)[..., :L])``
  -> ``ascend_graph.causal_conv1d(x, w, b, activation=act)`` (no state: the cache write
  HF does next to it, a slice of ``x`` copied into the cache, is left as it is);
- decode (cat form): ``cat = cat([state, x], -1)``; outputs
  ``act(conv1d(cat, w, b, padding=0, groups=C)[..., -L:])`` and ``cat[..., -S:]`` (the
  new state, written back by the graph's trailing ``copy_``)
  -> ``auto_functionalized(ascend_graph.causal_conv1d_update, x, state, ...)``;
- decode (sum form): ``sum(cat([state, x], -1) * w[:, 0, :], -1) (+ b)`` and
  ``cat[..., 1:]`` -> the same update op.

Invariants: the replacement graph stays functional (the in-place update enters as
``auto_functionalized``, which inductor re-inplaces into the graph's write-back
``copy_``, and the FX path runs on a clone); the metadata of every fused op is either
absent or a device tensor. Patterns are traced with example shapes, but the matcher
retraces each candidate with its real shapes, so the conv's padding, groups, stride and
the slice bounds are compared exactly: ``padding != K-1``, a slice from the other end,
or ``groups != C`` does not match. ``extra_check`` adds the semantic limits: floating
point, depthwise weight ``[C, 1, K]`` with ``C`` equal to the input's channels (no depth
multiplier), one dtype across input, state and weight (the kernels cast nothing).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from ...config import AscendConfig
from ...ops import causal_conv as _ops  # noqa: F401  (registers the ops the replacements call)
from .. import pattern as pat
from ..base import GraphPass

__all__ = ["make_pass", "FUSIONS"]

aten = torch.ops.aten
FAMILY = "causal_conv1d"

# -------------------------------------------------------------------------------------
# patterns and replacements (module-level plain functions: that is what gets traced)
# w is the conv weight as the graph has it, [C, 1, K]; x is [B, C, L]; state [B, C, S].


def _prefill(x, w):
    # conv1d(x, w, padding=K-1, groups=C)[..., :L]  ->  causal conv of x
    return F.conv1d(x, w, None, padding=w.shape[-1] - 1, groups=x.shape[1])[:, :, : x.shape[-1]]


def _prefill_bias(x, w, b):
    return F.conv1d(x, w, b, padding=w.shape[-1] - 1, groups=x.shape[1])[:, :, : x.shape[-1]]


def _prefill_silu(x, w):
    return F.silu(_prefill(x, w))


def _prefill_bias_silu(x, w, b):
    return F.silu(_prefill_bias(x, w, b))


def _conv_prefill(x, w, b, activation):
    return torch.ops.ascend_graph.causal_conv1d.default(x, w.squeeze(1), b, None, None, None, None, activation)


def _r_prefill(x, w):
    return _conv_prefill(x, w, None, "")


def _r_prefill_bias(x, w, b):
    return _conv_prefill(x, w, b, "")


def _r_prefill_silu(x, w):
    return _conv_prefill(x, w, None, "silu")


def _r_prefill_bias_silu(x, w, b):
    return _conv_prefill(x, w, b, "silu")


def _update(x, state, w):
    # cat([state, x]); new state = cat[..., -S:]; out = valid conv of cat, last L columns
    cat = torch.cat([state, x], dim=-1)
    out = F.conv1d(cat, w, None, padding=0, groups=x.shape[1])[:, :, -x.shape[-1] :]
    return out, cat[:, :, -state.shape[-1] :]


def _update_bias(x, state, w, b):
    cat = torch.cat([state, x], dim=-1)
    out = F.conv1d(cat, w, b, padding=0, groups=x.shape[1])[:, :, -x.shape[-1] :]
    return out, cat[:, :, -state.shape[-1] :]


def _update_silu(x, state, w):
    out, new_state = _update(x, state, w)
    return F.silu(out), new_state


def _update_bias_silu(x, state, w, b):
    out, new_state = _update_bias(x, state, w, b)
    return F.silu(out), new_state


def _sum_update(x, state, w):
    # RecurrentGemma: sum(cat([state, x]) * w[:, 0, :], -1); new state = cat[..., 1:]
    cat = torch.cat([state, x], dim=-1)
    return torch.sum(cat * w[:, 0, :], dim=-1), cat[:, :, 1:]


def _sum_update_bias(x, state, w, b):
    cat = torch.cat([state, x], dim=-1)
    return torch.sum(cat * w[:, 0, :], dim=-1) + b, cat[:, :, 1:]


def _fused_update(x, state, w, b, activation):
    from torch._higher_order_ops.auto_functionalize import auto_functionalized

    result = auto_functionalized(
        torch.ops.ascend_graph.causal_conv1d_update.default,
        x=x,
        conv_state=state,
        weight=w.squeeze(1),
        bias=b,
        cache_indices=None,
        num_accepted_tokens=None,
        activation=activation,
    )
    return result[0], result[1]


def _r_update(x, state, w):
    return _fused_update(x, state, w, None, "")


def _r_update_bias(x, state, w, b):
    return _fused_update(x, state, w, b, "")


def _r_update_silu(x, state, w):
    return _fused_update(x, state, w, None, "silu")


def _r_update_bias_silu(x, state, w, b):
    return _fused_update(x, state, w, b, "silu")


def _r_sum_update(x, state, w):
    out, new_state = _fused_update(x, state, w, None, "")
    return out.squeeze(-1), new_state


def _r_sum_update_bias(x, state, w, b):
    out, new_state = _fused_update(x, state, w, b, "")
    return out.squeeze(-1), new_state


# -------------------------------------------------------------------------------------
# example inputs (odd sizes; the matcher generalises them) and checks

_C, _K, _B, _L = 6, 4, 2, 5


def _ex_prefill(bias: bool) -> Callable[[], list[torch.Tensor]]:
    def build() -> list[torch.Tensor]:
        out = [torch.randn(_B, _C, _L), torch.randn(_C, 1, _K)]
        return out + [torch.randn(_C)] if bias else out

    return build


def _ex_update(bias: bool, state_len: int = _K) -> Callable[[], list[torch.Tensor]]:
    def build() -> list[torch.Tensor]:
        out = [torch.randn(_B, _C, 1), torch.randn(_B, _C, state_len), torch.randn(_C, 1, _K)]
        return out + [torch.randn(_C)] if bias else out

    return build


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _check(match: pat.Match) -> bool:
    """Depthwise [C, 1, K] weight matching x's C channels; one floating dtype throughout."""
    x, w = _val(match.kwargs.get("x")), _val(match.kwargs.get("w"))
    if x is None or w is None or x.dim() != 3 or w.dim() != 3:
        return False
    if not (x.is_floating_point() and w.dtype == x.dtype):
        return False
    if w.shape[1] != 1 or w.shape[0] != x.shape[1]:
        return False
    for name in ("state", "b"):
        other = _val(match.kwargs.get(name))
        if name in match.kwargs and (other is None or other.dtype != x.dtype):
            return False
    state = _val(match.kwargs.get("state"))
    if state is not None and (state.dim() != 3 or state.shape[1] != x.shape[1] or state.shape[2] < w.shape[2] - 1):
        return False
    return True


def _prefill_ints_hold(match: pat.Match) -> bool:
    """The ints a retrace-free prefill row leaves as wildcards: a depthwise conv (groups C,
    stride and dilation 1, padding K-1, not transposed) whose output is cut to x's length
    from the start: ``[..., :L]``."""
    x, w = _val(match.kwargs.get("x")), _val(match.kwargs.get("w"))
    for node in match.nodes:
        if node.op != "call_function":
            continue
        a = node.args
        if node.target is aten.convolution.default:
            stride, padding, dilation, transposed, out_pad, groups = a[3:9]
            if list(stride) != [1] or list(dilation) != [1] or transposed or list(out_pad) != [0]:
                return False
            if len(padding) != 1 or not pat.known_eq(padding[0], w.shape[-1] - 1) or not pat.known_eq(groups, x.shape[1]):
                return False
        elif node.target is aten.slice.Tensor:
            dim, start, end = (list(a[1:4]) + [0, 0, None])[:3]
            step = a[4] if len(a) > 4 else 1
            if dim not in (2, -1) or start != 0 or step != 1 or end is None or not pat.known_eq(end, x.shape[-1]):
                return False
    return True


def _prefill_check(match: pat.Match) -> bool:
    return _check(match) and _prefill_ints_hold(match)


def _row(name: str, pattern, replacement, example) -> pat.Fusion:
    if name.startswith("prefill"):
        # retrace-free: under dynamic shapes the re-trace at the graph's shapes matched only
        # graphs whose batch was static (Bamba and LFM2 fused one graph of two under
        # dynamic=True); the ints that decide the computation are checked instead
        return pat.Fusion(name=name, pattern=pattern, replacement=replacement, example_inputs=example, extra_check=_prefill_check, retrace=False)
    return pat.Fusion(name=name, pattern=pattern, replacement=replacement, example_inputs=example, extra_check=_check)


# Order matters only among rows that can match the same node: rows with the activation
# or bias come first, so the largest subgraph is fused.
FUSIONS: tuple[pat.Fusion, ...] = (
    # act(conv1d(x, w, b, pad=K-1, groups=C)[..., :L]) -> causal_conv1d(x, w, b, act)
    _row("prefill_bias_silu", _prefill_bias_silu, _r_prefill_bias_silu, _ex_prefill(True)),
    _row("prefill_silu", _prefill_silu, _r_prefill_silu, _ex_prefill(False)),
    _row("prefill_bias", _prefill_bias, _r_prefill_bias, _ex_prefill(True)),
    _row("prefill", _prefill, _r_prefill, _ex_prefill(False)),
    # (act(conv1d(cat(s, x), w, b, groups=C)[..., -L:]), cat[..., -S:]) -> update(x, s)
    _row("update_bias_silu", _update_bias_silu, _r_update_bias_silu, _ex_update(True)),
    _row("update_silu", _update_silu, _r_update_silu, _ex_update(False)),
    _row("update_bias", _update_bias, _r_update_bias, _ex_update(True)),
    _row("update", _update, _r_update, _ex_update(False)),
    # (sum(cat(s, x) * w[:, 0, :], -1) + b, cat[..., 1:]) -> update(x, s), S = K-1
    _row("sum_update_bias", _sum_update_bias, _r_sum_update_bias, _ex_update(True, _K - 1)),
    _row("sum_update", _sum_update, _r_sum_update, _ex_update(False, _K - 1)),
)


#: view ops that only re-describe their input (no copy, no compute)
_VIEW_OPS = frozenset(
    {
        aten.squeeze.dim,
        aten.squeeze.dims,
        aten.unsqueeze.default,
        aten.select.int,
        aten.permute.default,
        aten.view.default,
        aten.t.default,
        aten.transpose.int,
        aten.slice.Tensor,
        aten.expand.default,
    }
)


def hoist_input_views(graph: torch.fx.Graph) -> int:
    """Move view chains of graph inputs up to just after the placeholders; returns moves.

    Why: a multi-output replacement (the decode rows) is inserted at the pattern's first
    output, but AOT places a weight's ``squeeze``/``unsqueeze`` views right before their
    one use, the conv, which can come later; the rewritten graph would then use a node
    before defining it. A view of an input has the same value wherever it is computed in
    a functional graph (the write-back ``copy_`` nodes come last), so moving these views
    up changes nothing but the order.
    """
    placeholders = [n for n in graph.nodes if n.op in ("placeholder", "get_attr")]
    if not placeholders:
        return 0
    anchor = placeholders[-1]
    ready = set(placeholders)
    moved = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _VIEW_OPS:
            continue
        if not all(a in ready for a in node.all_input_nodes):
            continue
        ready.add(node)
        if node.prev is not anchor:
            anchor.append(node)
            moved += 1
        anchor = node
    return moved


class CausalConvPass(pat.PatternPass):
    """The family's PatternPass, with input views hoisted first (see :func:`hoist_input_views`)."""

    def __call__(self, graph: torch.fx.Graph) -> int:
        hoist_input_views(graph)
        return super().__call__(graph)


def make_pass(config: AscendConfig) -> GraphPass | None:
    """The family's pass, or None when the config leaves the family out."""
    if FAMILY not in config.fusions:
        return None
    # Cheap: the matcher behind it is built once per process for this row set (pattern.py).
    return CausalConvPass("fuse_causal_conv1d", FAMILY, FUSIONS, explain_node=config.explain_node)
