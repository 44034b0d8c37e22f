"""FIA padding in the graph: paged attention's metadata made to hold at any padded shape.

Entry point: :func:`make_pass` (family ``"padding"``; rewrites are counted in
``stats()["padding"]["rewrites"]``). It runs after the fusion families (DESIGN.md:
cleanup -> fusion -> padding -> cleanup) when the attention family is on, since the op
whose contract it keeps is that family's ``ascend_graph::paged_attention``.

Why: FIA (the NPU's paged attention, TND) requires ``q.shape[0] == cu_seqlens_q[-1]``
(error 561002, vllm-ascend's most reported padding bug) and a KV length per request.
The runtime pads the metadata it is given with :func:`~ascend_graph.runtime.padding.plan_fia`,
but a graph can also *compute* its metadata from inputs (``F.pad(query_lens.cumsum(0),
(1, 0))``: zero-padded query lengths give empty dummy requests and ``cu[-1] < T``), or
be run by a runtime that pads the way vLLM does (``query_start_loc`` tail repeating its
last value, ``seq_lens`` padded with 0). For each ``paged_attention`` node the pass
routes ``cu_seqlens_q`` and ``seq_lens_kv`` through
:func:`~ascend_graph.runtime.padding.fia_pad_metadata`, the planner's in-graph rule
(padded tokens spread over the trailing empty requests, their KV lengths raised to 1),
traced to ATen with the graph's own fake values, so inductor fuses it and a captured
graph replays it with no host synchronisation and no argument patching.

Rules:

- ``paged_attention(q, ..., cu, lens, ...) -> paged_attention(q, ..., cu', lens', ...)``
  with ``cu', lens' = fia_pad_metadata(cu, lens, q.size(0))``;
- one inserted computation per distinct ``(cu, lens, q.size(0))``: the layers of a model
  share it (a rewrite is counted per attention node rewired);
- left alone: a ``cu_seqlens_q`` that is an ``arange`` (possibly scaled or cast): a
  uniform batch's metadata, consistent at every size by construction (the decode
  benchmark's ``arange(T + 1)``), so it costs nothing there;
- left alone on an NPU (:func:`_patched_at_replay`): ``cu_seqlens_q`` and ``seq_lens_kv``
  both graph inputs on an ``npu`` device. FIA takes them as host arrays, and inside an
  ACL graph the runtime patches them before each replay from the runner's static
  buffers, applying the same rule on the host (``runtime/npu_updates.py``,
  :func:`~ascend_graph.runtime.padding.fia_pad_lengths`); computed in the graph they
  could not be patched and the bucket would get no graph (docs/npu_graphs.md). Logged
  at debug, not counted as a rewrite.

The rewrite is an identity on metadata that already holds (the runner's), so it never
changes a correct batch; it keeps the graph functional and adds no aliasing.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Optional

import torch
import torch.fx
from torch._guards import detect_fake_mode

from ..config import AscendConfig
from ..ops import attention as _attention_ops  # noqa: F401  (registers ascend_graph::paged_attention)
from ..runtime import padding as planner
from .base import GraphPass
from .pattern import fwd_only

__all__ = ["FiaPaddingPass", "make_pass"]

log = logging.getLogger("ascend_graph.passes.padding")

aten = torch.ops.aten
prims = torch.ops.prims

#: (positional index, schema name) of the arguments the pass reads or rewrites
_Q, _CU, _LENS = (0, "q"), (4, "cu_seqlens_q"), (5, "seq_lens_kv")

#: ops a uniform ``arange`` may pass through and stay uniform (cast, scale by a constant)
_SCALED = {aten.mul.Tensor, aten.mul.Scalar}
_THROUGH = {prims.convert_element_type.default, aten._to_copy.default} | _SCALED
#: ``arange`` as traced (inductor's decompositions turn it into ``prims.iota``)
_ARANGE = {aten.arange.default, aten.arange.start, aten.arange.start_step, prims.iota.default}


def _paged_attention_op() -> Any:
    return torch.ops.ascend_graph.paged_attention.default


def _get(node: torch.fx.Node, which: tuple[int, str]) -> Any:
    i, name = which
    return node.args[i] if i < len(node.args) else node.kwargs[name]


def _set(node: torch.fx.Node, which: tuple[int, str], value: Any) -> None:
    i, name = which
    if i < len(node.args):
        node.update_arg(i, value)
    else:
        node.update_kwarg(name, value)


def _is_arange(node: Any) -> bool:
    """``cu`` is ``arange(...)`` (optionally cast or multiplied by a number): uniform."""
    while isinstance(node, torch.fx.Node) and node.op == "call_function":
        if node.target in _ARANGE:
            return True
        if node.target not in _THROUGH:
            return False
        if node.target in _SCALED and isinstance(node.args[1], torch.fx.Node):
            return False  # scaled by a tensor: not a constant step
        node = node.args[0]
    return False


def _patched_at_replay(cu: Any, lens: Any) -> bool:
    """Both lengths are graph inputs on an NPU: the runtime applies the FIA rule to them on
    the host when it patches them into a captured ACL graph, so the graph must read them
    as they are (a view of the runner's static buffers). A module-level predicate so CPU
    tests can stand in for an NPU device (CPU torch has none)."""
    return all(
        isinstance(n, torch.fx.Node) and n.op == "placeholder" and getattr(n.meta.get("val"), "device", None) is not None and n.meta["val"].device.type == "npu"
        for n in (cu, lens)
    )


def _num_tokens(graph: torch.fx.Graph, q: torch.fx.Node) -> tuple[Any, str]:
    """``q.size(0)`` as a graph value (an int, or a ``sym_size`` node) and a key for it."""
    size = q.meta["val"].shape[0]
    if isinstance(size, int):
        return size, str(size)
    node = graph.call_function(aten.sym_size.int, (q, 0))
    node.meta["val"] = size
    return node, str(size.node.expr)


def _insert(graph: torch.fx.Graph, cu: torch.fx.Node, lens: torch.fx.Node, num_tokens: Any) -> tuple[torch.fx.Node, torch.fx.Node]:
    """Trace :func:`fia_pad_metadata` on the graph's fake values and inline it here."""
    t = num_tokens.meta["val"] if isinstance(num_tokens, torch.fx.Node) else num_tokens
    vals = [cu.meta["val"], lens.meta["val"]]
    with detect_fake_mode(vals) or contextlib.nullcontext():
        traced = fwd_only(planner.fia_pad_metadata, vals + [t])
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    env = dict(zip(placeholders, (cu, lens, num_tokens)))
    out = graph.graph_copy(traced.graph, env)
    return out[0], out[1]


class FiaPaddingPass(GraphPass):
    """Routes every paged attention's ``cu_seqlens_q`` / ``seq_lens_kv`` through the FIA rule."""

    name = "fia_padding"
    family = "padding"

    def __call__(self, graph: torch.fx.Graph) -> int:
        target = _paged_attention_op()
        inserted: dict[tuple, tuple[torch.fx.Node, torch.fx.Node]] = {}
        rewrites = 0
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target is not target:
                continue
            q, cu, lens = _get(node, _Q), _get(node, _CU), _get(node, _LENS)
            if not all(isinstance(x, torch.fx.Node) and "val" in x.meta for x in (q, cu, lens)):
                continue
            if _is_arange(cu):
                log.debug("%s: cu_seqlens_q is an arange (uniform by construction); left alone", node.name)
                continue
            if _patched_at_replay(cu, lens):
                log.debug("%s: cu_seqlens_q / seq_lens_kv are NPU graph inputs (FIA rule applied at replay); left alone", node.name)
                continue
            with graph.inserting_before(node):
                num_tokens, t_key = _num_tokens(graph, q)
                key = (cu, lens, t_key)
                if key not in inserted:
                    inserted[key] = _insert(graph, cu, lens, num_tokens)
                elif isinstance(num_tokens, torch.fx.Node):
                    graph.erase_node(num_tokens)  # the first node's sym_size serves
            new_cu, new_lens = inserted[key]
            _set(node, _CU, new_cu)
            _set(node, _LENS, new_lens)
            rewrites += 1
        return rewrites

    def uuid_sources(self) -> list[Any]:
        return super().uuid_sources() + [planner.fia_pad_metadata]


def make_pass(config: AscendConfig) -> Optional[GraphPass]:
    """The FIA padding pass, with the attention family (the op it serves is that family's)."""
    if "attention" not in config.fusions:
        return None
    return FiaPaddingPass()
