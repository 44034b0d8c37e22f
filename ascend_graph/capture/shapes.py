"""Shape analysis: which input/output dims are sympy expressions of the batch symbol.

Entry point: :func:`analyze_graph` on the graph Dynamo hands the backend. Each
placeholder's example value (a fake tensor with SymInt sizes, or a SymInt) gives one
expression per dim. The batch symbol is, by default, the symbol of dim 0 of the first
non-parameter tensor input whose dim 0 is symbolic (token ids in HF models, the
flattened token count in vLLM graphs); ``AscendConfig.batch_input`` / ``batch_dim``
override it.

Padding (runtime/padding.py) substitutes a bucket size for the batch symbol in these
expressions, so a ``s*(1+k)`` token dim of an MTP verify batch pads to
``bucket*(1+k)``. Invariant: the result never holds a live reference to a fake tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import sympy
import torch
import torch.fx

from ..errors import CaptureError, ConfigError

__all__ = ["ShapeInfo", "ValueShape", "analyze_graph", "analyze_values", "to_expr"]


def to_expr(size: Any) -> sympy.Expr:
    """A dim (int, SymInt or sympy expression) as a sympy expression."""
    if isinstance(size, torch.SymInt):
        return sympy.sympify(size.node.expr)
    if isinstance(size, sympy.Expr):
        return size
    return sympy.Integer(int(size))


@dataclass(frozen=True)
class ValueShape:
    """One graph input or output."""

    index: int
    name: str
    kind: str  # "tensor", "symint", "param" (tensor that is a parameter or buffer), "other"
    dims: tuple[sympy.Expr, ...] = ()  # per dim for tensors; (expr,) for a symint
    strides: tuple[sympy.Expr, ...] = ()  # per dim for tensors: the layout the graph was traced with
    dtype: torch.dtype | None = None
    device: torch.device | None = None

    @property
    def free_symbols(self) -> frozenset[sympy.Symbol]:
        out: set[sympy.Symbol] = set()
        for d in self.dims:
            out |= d.free_symbols
        return frozenset(out)

    def depends_on(self, symbol: sympy.Symbol | None) -> bool:
        return symbol is not None and symbol in self.free_symbols

    def batch_dims(self, symbol: sympy.Symbol | None) -> tuple[int, ...]:
        if symbol is None:
            return ()
        return tuple(i for i, d in enumerate(self.dims) if symbol in d.free_symbols)


@dataclass(frozen=True)
class ShapeInfo:
    """Result of the analysis: inputs, outputs, the batch symbol and the other symbols."""

    inputs: tuple[ValueShape, ...]
    outputs: tuple[ValueShape, ...]
    batch_symbol: sympy.Symbol | None
    other_symbols: tuple[sympy.Symbol, ...]
    #: for each symbol, where its value can be read at call time: (input index, dim or -1 for a symint input)
    symbol_sources: Mapping[sympy.Symbol, tuple[int, int]] = field(default_factory=dict)

    @property
    def is_dynamic(self) -> bool:
        return self.batch_symbol is not None

    def batch_inputs(self) -> tuple[int, ...]:
        return tuple(v.index for v in self.inputs if v.depends_on(self.batch_symbol))

    def bind(self, args: Sequence[Any]) -> dict[sympy.Symbol, int]:
        """Values of every symbol for one call's actual arguments."""
        values: dict[sympy.Symbol, int] = {}
        for sym, (idx, dim) in self.symbol_sources.items():
            a = args[idx]
            values[sym] = int(a) if dim < 0 else int(a.shape[dim])
        return values

    def evaluate(self, shape: ValueShape, values: Mapping[sympy.Symbol, int]) -> tuple[int, ...]:
        """Concrete dims of ``shape`` under ``values`` (every free symbol must be bound)."""
        return self._eval(shape, shape.dims, values)

    def evaluate_strides(self, shape: ValueShape, values: Mapping[sympy.Symbol, int]) -> tuple[int, ...]:
        """Concrete strides of a tensor input under ``values``."""
        return self._eval(shape, shape.strides, values)

    def _eval(self, shape: ValueShape, exprs: Sequence[sympy.Expr], values: Mapping[sympy.Symbol, int]) -> tuple[int, ...]:
        out = []
        for d in exprs:
            v = d.subs(values) if d.free_symbols else d
            if not v.is_number:
                raise CaptureError(
                    f"dim {d} of {shape.name} has symbols with no value",
                    expected=f"values for {sorted(map(str, d.free_symbols))}",
                    got=sorted(map(str, values)),
                )
            out.append(int(v))
        return tuple(out)

    def describe(self) -> dict[str, Any]:
        """JSON-friendly summary (used in dumps and the cache manifest)."""

        def one(v: ValueShape) -> dict[str, Any]:
            return {"name": v.name, "kind": v.kind, "dims": [str(d) for d in v.dims]}

        return {
            "batch_symbol": str(self.batch_symbol) if self.batch_symbol is not None else None,
            "other_symbols": [str(s) for s in self.other_symbols],
            "inputs": [one(v) for v in self.inputs if v.kind != "param"],
            "outputs": [one(v) for v in self.outputs],
        }


def _value_shape(index: int, name: str, value: Any, is_param: bool) -> ValueShape:
    if isinstance(value, torch.Tensor):
        return ValueShape(
            index=index,
            name=name,
            kind="param" if is_param else "tensor",
            dims=tuple(to_expr(s) for s in value.shape),
            strides=tuple(to_expr(s) for s in value.stride()),
            dtype=value.dtype,
            device=value.device,
        )
    if isinstance(value, torch.SymInt):
        return ValueShape(index=index, name=name, kind="symint", dims=(to_expr(value),))
    return ValueShape(index=index, name=name, kind="other")


def _placeholder_name(node: torch.fx.Node) -> str:
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    local = getattr(source, "local_name", None)
    if local:
        return str(local)
    return node.name


def _is_param(node: torch.fx.Node, value: Any) -> bool:
    if isinstance(value, torch.nn.Parameter):
        return True
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    text = source.name() if source is not None and callable(getattr(source, "name", None)) else str(source or "")
    return "_parameters" in text or "_buffers" in text


def analyze_graph(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    batch_input: str | int | None = None,
    batch_dim: int = 0,
) -> ShapeInfo:
    """Analyse a Dynamo graph: one ValueShape per placeholder and per output."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = []
    for i, node in enumerate(placeholders):
        value = node.meta.get("example_value", example_inputs[i] if i < len(example_inputs) else None)
        if value is None and i < len(example_inputs):
            value = example_inputs[i]
        inputs.append(_value_shape(i, _placeholder_name(node), value, _is_param(node, value)))
    output_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    outs = output_node.args[0]
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    outputs = []
    for i, o in enumerate(outs):
        value = o.meta.get("example_value", o.meta.get("val")) if isinstance(o, torch.fx.Node) else o
        outputs.append(_value_shape(i, getattr(o, "name", f"out{i}"), value, False))
    return analyze_values(inputs, outputs, batch_input, batch_dim)


def analyze_values(
    inputs: Sequence[ValueShape],
    outputs: Sequence[ValueShape],
    batch_input: str | int | None = None,
    batch_dim: int = 0,
) -> ShapeInfo:
    """Pick the batch symbol and find where each symbol can be read at call time."""
    batch_symbol = _pick_batch_symbol(inputs, batch_input, batch_dim)
    sources: dict[sympy.Symbol, tuple[int, int]] = {}
    for v in inputs:
        if v.kind == "symint" and isinstance(v.dims[0], sympy.Symbol):
            sources.setdefault(v.dims[0], (v.index, -1))
    for v in inputs:
        if v.kind in ("tensor", "param"):
            for d, expr in enumerate(v.dims):
                if isinstance(expr, sympy.Symbol):
                    sources.setdefault(expr, (v.index, d))
    all_symbols: set[sympy.Symbol] = set()
    for v in list(inputs) + list(outputs):
        all_symbols |= v.free_symbols
    unbound = sorted((s for s in all_symbols if s not in sources), key=str)
    input_symbols: set[sympy.Symbol] = set()
    for v in inputs:
        input_symbols |= v.free_symbols
    missing = [s for s in unbound if s in input_symbols]
    if missing:
        # A symbol only ever seen inside an expression (say 2*s0) cannot be read back.
        raise CaptureError(
            "input dims use symbols that no input dim or int input equals",
            expected="every symbol readable from a dim or an int input",
            got=[str(s) for s in missing],
        )
    others = tuple(sorted((s for s in sources if s != batch_symbol), key=str))
    return ShapeInfo(tuple(inputs), tuple(outputs), batch_symbol, others, sources)


def _pick_batch_symbol(inputs: Sequence[ValueShape], batch_input: str | int | None, batch_dim: int) -> sympy.Symbol | None:
    tensors = [v for v in inputs if v.kind == "tensor"]
    if batch_input is None:
        # The first tensor input's dim: token ids in HF models, the flattened token count
        # in vLLM graphs. If Dynamo specialised it (a size-1 batch), the graph is static:
        # another input's symbolic dim (a cache's slot count) is not a batch.
        if not tensors:
            return None
        rank = len(tensors[0].dims)
        if rank <= batch_dim and not (rank == 0 and batch_dim == 0):
            # Returning None here would turn bucketing off without a word (one graph per
            # batch size): a batch_dim past the batch input's rank is a user error. A 0-d
            # first input under the default batch_dim=0 is not one: that graph has no
            # batch (a scalar argument), as before.
            raise ConfigError(
                f"batch_dim {batch_dim} is out of range for the batch input {tensors[0].name!r}",
                expected=f"batch_dim < {len(tensors[0].dims)} (its rank), or options['batch_input'] naming another input",
                got=f"batch_dim={batch_dim} for dims {[str(d) for d in tensors[0].dims]}",
            )
        if rank == 0 or not tensors[0].dims[batch_dim].free_symbols:
            return None
        return _single_symbol(tensors[0], batch_dim)
    if isinstance(batch_input, int):
        chosen = [v for v in inputs if v.index == batch_input]
    else:
        chosen = [v for v in inputs if v.name == batch_input]
    if not chosen:
        raise ConfigError(
            f"batch_input {batch_input!r} is not an input of this graph",
            expected=f"one of {[v.name for v in tensors]} or an index < {len(inputs)}",
            got=repr(batch_input),
        )
    v = chosen[0]
    if v.kind != "tensor" or len(v.dims) <= batch_dim:
        raise ConfigError(
            f"batch_input {batch_input!r} has no dim {batch_dim}",
            expected=f"a tensor input with more than {batch_dim} dims",
            got=f"{v.kind} with dims {[str(d) for d in v.dims]}",
        )
    if not v.dims[batch_dim].free_symbols:
        return None  # static batch: this graph was specialised to one size
    return _single_symbol(v, batch_dim)


def _single_symbol(v: ValueShape, dim: int) -> sympy.Symbol:
    expr = v.dims[dim]
    if len(expr.free_symbols) == 1:
        # s0, or an expression of one symbol such as 3*s0 (an MTP verify batch of 1+k tokens a request)
        return next(iter(expr.free_symbols))
    raise CaptureError(
        f"dim {dim} of input {v.name!r} is {expr}, an expression of several symbols",
        expected="the batch dim to be a function of one symbol (s0 or (1+k)*s0)",
        got=str(expr),
        hint="set options['batch_input'] to an input whose batch dim is a plain symbol",
    )
