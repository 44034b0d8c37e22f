"""Cleanup passes: no-op view/reshape/expand/permute/slice/clone elimination, dead code.

Rules (each rewrite keeps the graph functional and adds no input/output aliasing):

- ``view(x, shape) -> x``           when ``shape == x.shape`` (also reshape, _unsafe_view, expand)
- ``permute(x, identity) -> x``, ``alias(x) -> x``
- ``slice(x, d, 0, end>=size, 1) -> x``
- ``clone(x) -> x``                 when no memory_format is asked, ``x`` is not mutated
                                    later, and the clone is not a graph output of a
                                    placeholder (that would alias an input)
- ``convert_element_type(x, x.dtype) -> x``
- dead code: nodes with no users and no side effects go.

Shapes are compared with sympy, so symbolic dims count as equal only when they are the
same expression.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from .base import GraphPass

__all__ = ["NoOpElimination", "DeadCodeElimination"]

aten = torch.ops.aten
prims = torch.ops.prims

_VIEWS = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.expand.default,
}


def _val(n: object):
    return n.meta.get("val") if isinstance(n, torch.fx.Node) else None


def _same_shape(a, shape) -> bool:
    if a is None:
        return False
    try:
        if len(a.shape) != len(shape):
            return False
        return all(_dim_eq(x, y) for x, y in zip(a.shape, shape))
    except TypeError:
        return False


def _dim_eq(x, y) -> bool:
    if isinstance(y, torch.fx.Node):
        y = y.meta.get("val")
    if isinstance(x, torch.SymInt) or isinstance(y, torch.SymInt):
        ex = x.node.expr if isinstance(x, torch.SymInt) else x
        ey = y.node.expr if isinstance(y, torch.SymInt) else y
        return bool(ex == ey)
    return x == y


def _is_mutated_later(node: torch.fx.Node) -> bool:
    for user in node.users:
        schema = getattr(user.target, "_schema", None)
        if schema is None:
            continue
        for i, arg in enumerate(schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                value = user.args[i] if i < len(user.args) else user.kwargs.get(arg.name)
                if value is node:
                    return True
    return False


def _noop_source(node: torch.fx.Node) -> torch.fx.Node | None:
    """The node this one can be replaced by, or None."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return None
    src = node.args[0]
    sval = _val(src)
    if node.target in _VIEWS:
        if len(node.args) >= 2 and _same_shape(sval, node.args[1]):
            return src
        return None
    if node.target is aten.alias.default:
        return src
    if node.target is aten.permute.default:
        dims = list(node.args[1])
        return src if dims == list(range(len(dims))) else None
    if node.target is aten.slice.Tensor:
        args = list(node.args) + [None] * (5 - len(node.args))
        dim, start, end, step = (args[1] or 0), args[2], args[3], args[4]
        dim = node.kwargs.get("dim", dim)
        start = node.kwargs.get("start", start)
        end = node.kwargs.get("end", end)
        step = node.kwargs.get("step", step)
        if sval is None or (step not in (None, 1)) or (start not in (None, 0)):
            return None
        size = sval.shape[dim]
        if end is None or (isinstance(end, int) and not isinstance(size, torch.SymInt) and end >= size):
            return src
        if isinstance(end, int) and end >= 2**62:
            return src
        return None
    if node.target is aten.clone.default:
        if node.kwargs.get("memory_format") is not None:
            return None
        if _is_mutated_later(node) or _is_mutated_later(src):
            return None
        if src.op == "placeholder" and any(u.op == "output" for u in node.users):
            return None
        return src
    if node.target is prims.convert_element_type.default:
        nval = _val(node)
        if sval is not None and nval is not None and sval.dtype == nval.dtype:
            return src
        return None
    return None


class NoOpElimination(GraphPass):
    """Remove views, permutes, slices, clones and casts that do nothing."""

    name = "noop_elimination"

    def __call__(self, graph: torch.fx.Graph) -> int:
        count = 0
        for node in list(graph.nodes):
            src = _noop_source(node)
            if src is None:
                continue
            nval, sval = _val(node), _val(src)
            if nval is not None and sval is not None and hasattr(nval, "dtype") and nval.dtype != sval.dtype:
                continue
            node.replace_all_uses_with(src)
            graph.erase_node(node)
            count += 1
        return count


class DeadCodeElimination(GraphPass):
    """Drop nodes whose results are unused and that have no side effects."""

    name = "dead_code_elimination"

    def __call__(self, graph: torch.fx.Graph) -> int:
        before = len(graph.nodes)
        graph.eliminate_dead_code()
        return before - len(graph.nodes)


def hoist_size_reads(graph: torch.fx.Graph) -> int:
    """Recompute every size read off an intermediate tensor from the graph's inputs.

    Under dynamic shapes AOT reads sizes where it finds them: ``sym_size.int(view, 2)``
    of a tensor inside a region a pattern should replace (the gated delta rule's chunk
    count ``(T + Mod(64 - Mod(T, 64), 64)) // 64`` is read off its padded views). Each
    such read is one more user of a node inside the region, and the matcher refuses a
    match whose inner nodes are used outside it. A read whose value is an expression in
    the inputs' symbols (sums, products, integer constants, floor division and modulo)
    is rebuilt from the inputs (``sym_size`` of an input tensor, or the input SymInt),
    right after the last placeholder; any other read stays. Returns the reads moved.
    """
    import operator

    import sympy

    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if not placeholders:
        return 0
    symbols: dict[Any, tuple[torch.fx.Node, int | None]] = {}
    for ph in placeholders:
        val = ph.meta.get("val")
        if isinstance(val, torch.SymInt) and isinstance(val.node.expr, sympy.Symbol):
            symbols.setdefault(val.node.expr, (ph, None))
        elif isinstance(val, torch.Tensor):
            for d, size in enumerate(val.shape):
                if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol):
                    symbols.setdefault(size.node.expr, (ph, d))
    reads = [
        n for n in graph.nodes
        if n.op == "call_function" and n.target is torch.ops.aten.sym_size.int and isinstance(n.args[0], torch.fx.Node)
        and n.args[0].op != "placeholder" and isinstance(n.meta.get("val"), torch.SymInt)
    ]
    if not reads:
        return 0
    from torch.utils._sympy.functions import FloorDiv, Mod, PythonMod

    state = {"at": placeholders[-1]}
    built: dict[Any, torch.fx.Node | int] = {}

    def emit(target, args, val):
        with graph.inserting_after(state["at"]):
            node = graph.call_function(target, args)
        node.meta["val"] = val
        state["at"] = node
        return node

    def value(x):
        return x.meta["val"] if isinstance(x, torch.fx.Node) else x

    def build(expr):  # a node (or int) computing expr from the inputs; None where it cannot
        if expr in built:
            return built[expr]
        if expr.is_Integer:
            out = int(expr)
        elif isinstance(expr, sympy.Symbol):
            if expr not in symbols:
                return None
            src, dim = symbols[expr]
            out = src if dim is None else emit(torch.ops.aten.sym_size.int, (src, dim), src.meta["val"].shape[dim])
        elif isinstance(expr, (sympy.Add, sympy.Mul)) or type(expr) in (FloorDiv, Mod, PythonMod):
            parts = [build(a) for a in expr.args]
            if any(p is None for p in parts):
                return None
            op = {sympy.Add: operator.add, sympy.Mul: operator.mul}.get(type(expr)) or (operator.floordiv if type(expr) is FloorDiv else operator.mod)
            if op in (operator.floordiv, operator.mod):
                out = emit(op, (parts[0], parts[1]), op(value(parts[0]), value(parts[1])))
            else:
                out = parts[0]
                for p in parts[1:]:
                    out = emit(op, (out, p), op(value(out), value(p))) if isinstance(out, torch.fx.Node) or isinstance(p, torch.fx.Node) else op(out, p)
        else:
            return None
        built[expr] = out
        return out

    moved = 0
    for read in reads:
        expr = read.meta["val"].node.expr
        if not expr.free_symbols <= set(symbols):
            continue
        new = build(expr)
        if new is None:
            continue
        if isinstance(new, torch.fx.Node):
            read.replace_all_uses_with(new)
        else:  # a constant: the users take the int
            for user in list(read.users):
                user.args, user.kwargs = torch.fx.node.map_arg((user.args, user.kwargs), lambda a: new if a is read else a)
        graph.erase_node(read)
        moved += 1
    return moved

