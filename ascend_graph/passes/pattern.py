"""The one module that touches ``torch._inductor.pattern_matcher``.

A fusion is data: a :class:`Fusion` row (pattern function, replacement function,
example inputs, extra_check). A family file builds a list of rows and a
:class:`PatternPass` over them; the pass registers the rows into its own
``PatternMatcherPass`` the first time it runs (tracing patterns costs ~0.1-1 s each, so
built matchers are memoised per row set for the life of the process: they are
immutable once built).

What the pattern matcher needs from us, and what changed across torch 2.11-2.13, is
kept here: ``register_replacement``'s keywords, ``fwd_only`` tracing, and the
``TORCHINDUCTOR_PATTERN_MATCH_DEBUG`` switch behind ``AscendConfig.explain_node``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch
import torch.fx

from .base import GraphPass, source_hash

if TYPE_CHECKING:
    from torch._inductor import pattern_matcher as pm
    from torch._inductor.pattern_matcher import Match

__all__ = ["Fusion", "Path", "PatternPass", "Match", "fwd_only", "explain", "as_the_graph_holds"]

log = logging.getLogger("ascend_graph.passes.pattern")


# The pattern matcher (and inductor's lowering, which it imports) is imported when a
# pass first runs, not with this module: building a pass manager imports every family
# (their sources are part of the graph cache key), and a warm start that loads every
# graph from the cache runs no pass, so it never pays the ~1 s import on a 2-core CPU.


def _pm() -> Any:
    from torch._inductor import pattern_matcher

    return pattern_matcher


def fwd_only(fn: Callable[..., Any], args: Sequence[Any], *rest: Any, **kwargs: Any) -> torch.fx.GraphModule:
    """Inductor's ``pattern_matcher.fwd_only``: ``fn`` traced as the matcher traces patterns."""
    return _pm().fwd_only(fn, args, *rest, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "Match":  # inductor's Match, for callers that use it at run time
        return _pm().Match
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def known_eq(a: Any, b: Any) -> bool:
    """``a == b`` provably, for ints, SymInts or the graph nodes computing them (a
    retrace-free row's checks read sizes both ways: as written and as the graph's values)."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    a, b = (v.meta.get("val") if isinstance(v, torch.fx.Node) else v for v in (a, b))
    if a is None or b is None:
        return False
    try:
        return bool(statically_known_true(a == b))
    except Exception:  # values that do not compare (a tensor against an int, say)
        return False


def _always(match: "pm.Match") -> bool:
    return True


@dataclass(frozen=True)
class Fusion:
    """One row of a fusion table.

    ``pattern`` and ``replacement`` are plain module-level functions in plain torch;
    ``example_inputs`` builds the tensors they are traced with (shapes are not burned
    in: the matcher generalises sizes). ``extra_check`` gets the match and decides the
    semantic limits (dtype, head size, token limits) the structure cannot express.
    ``scalar_workaround`` names float/int arguments of the pattern with a sample value.
    ``exact`` matches the pattern as traced, every int included, instead of a generic
    match re-traced at the graph's shapes: for rows built per size (the row's sizes are
    part of it, so no int may come from the example inputs by accident) whose re-trace
    would be costly (``nonzero`` makes the fake-tensor re-trace take seconds).
    ``retrace=False`` matches the generic pattern traced from the example inputs (ints
    are wildcards, as in the first match) without that re-trace: for patterns over ops
    whose arguments record sizes (functionalized mutations record the mutated view's
    size and stride), which the re-trace turns into size computations the graph lacks.
    ``requires`` names ops the traced pattern contains (a test holds every row to it): a
    graph without all of them cannot match the row, so the row is not traced for that
    graph (tracing costs ~0.05 s a row: attention's 94 rows took 4.5 s of every process's
    first compile, most of them forms the model does not use).
    ``requires_path`` (a :class:`Path`) names a chain of ops the traced pattern contains
    (the same test holds every row to it): ops that occur anywhere in a graph (a router's
    softmax and an MoE's ``bmm``) can still rule a row out when no chain joins them.
    ``symbolic`` rows have example inputs with symbolic sizes (fake tensors of the graph's
    own shape environment, made under its fake mode): the pattern is traced once with
    them, every argument the trace computes from a size (a symbol, or an expression of
    symbols) is a wildcard, and every other int, float and dtype must match as traced. For
    rows built per region under ``dynamic=True``, where the graph's view sizes are
    symbolic expressions no int-exact row can match and a re-trace per match would cost
    a full trace of the region each time.
    """

    name: str
    pattern: Callable[..., Any]
    replacement: Callable[..., Any]
    example_inputs: Callable[[], Sequence[Any]]
    extra_check: Callable[["pm.Match"], bool] = _always
    scalar_workaround: Mapping[str, float | int] = field(default_factory=dict)
    exclusive_arg_names: tuple[str, ...] = ()
    exact: bool = False
    retrace: bool = True
    requires: tuple[Any, ...] = ()
    requires_path: "Path | None" = None
    symbolic: bool = False
    #: the pattern already traced in ``fwd_only``'s normal form, for a row whose pattern
    #: only replays a trace (the gated delta prefill rows): spares tracing it twice
    traced: Callable[[], torch.fx.GraphModule] | None = None


@dataclass(frozen=True)
class Path:
    """A chain ``src -> ... -> dst`` of at most ``hops`` edges in which every node between
    the two ends has a target in ``through``.

    A graph that a pattern holding such a chain matches holds it too (a match maps the
    pattern's nodes onto the graph's, same targets, same edges), so a graph without one
    cannot match the row: :meth:`PatternPass.rows_for` then leaves the row untraced.
    """

    src: Any
    dst: Any
    through: frozenset[Any]
    hops: int

    def holds(self, graph: torch.fx.Graph) -> bool:
        for start in graph.nodes:
            if start.op != "call_function" or start.target is not self.src:
                continue
            frontier, seen = [start], {start}
            for _ in range(self.hops):
                nxt = []
                for n in frontier:
                    for user in n.users:
                        if user.target is self.dst:
                            return True
                        if user not in seen and user.target in self.through:
                            seen.add(user)
                            nxt.append(user)
                if not nxt:
                    break
                frontier = nxt
        return False


#: row identities -> (the rows, their matcher). The entry keeps the rows alive: an id is
#: only unique while its object lives, and rows built on demand (MoE loops, gated-delta
#: prefill, vLLM ops) would otherwise be freed and their ids reused by new rows, which
#: would then be handed a stale matcher (seen: a suite where later MoE rows matched nothing).
_built: dict[tuple[int, ...], tuple[tuple[Fusion, ...], pm.PatternMatcherPass]] = {}
_built_lock = threading.Lock()


def traced_pattern(f: Fusion, inputs: Sequence[Any] | None = None) -> torch.fx.GraphModule:
    """``f``'s pattern traced as the matcher traces it (``fwd_only``, no grad), from its
    example inputs unless given. Arguments named in ``scalar_workaround`` are traced with
    their sample values where the example inputs leave them out, as register_replacement
    allows."""
    if f.traced is not None:
        return f.traced()
    inputs = list(f.example_inputs()) if inputs is None else list(inputs)
    argnames = list(inspect.signature(f.pattern).parameters)
    given = iter(inputs)
    args = [f.scalar_workaround[a] if a in f.scalar_workaround and len(inputs) < len(argnames) else next(given) for a in argnames]
    with torch.no_grad():
        return fwd_only(f.pattern, args)


_as_traced: dict[tuple, torch.fx.GraphModule] = {}
_as_traced_lock = threading.RLock()


def as_the_graph_holds(fn: Callable[..., Any], key: tuple, *metas: tuple[tuple[int, ...], torch.dtype]) -> torch.fx.GraphModule:
    """``fn`` traced the way ``capture/trace.py`` traces a model (inductor's decompositions,
    on fake tensors of the given (shape, dtype)s), memoised per ``key``. For functions
    without mutation: the inputs reach ``fn`` as the fake tensors themselves (no
    functional wrapper), as AOT's Python functionalization hands them to an op.

    A pattern calls the returned module where it calls an op whose trace depends on
    whether its input is real: patterns are traced on real tensors, a model's graph on
    fake ones. ``F.one_hot`` is one: torch 2.11 runs its C++ kernel on a real tensor (a
    host read of the min and max, which no trace may hold: ``fwd_only`` raised) and its
    fake-tensor branch (iota, eq, convert) on the graph's, so a pattern calling
    ``F.one_hot`` itself could not match a graph of 2.11 (the GPU machine, session 10).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing, make_fx

    from ..capture.trace import decompositions

    with _as_traced_lock:
        gm = _as_traced.get(key)
        if gm is None:
            with disable_proxy_modes_tracing(), FakeTensorMode():
                inputs = [torch.empty(shape, dtype=dtype) for shape, dtype in metas]
                gm = make_fx(fn, decompositions(), tracing_mode="real")(*inputs)
            _as_traced[key] = gm
    return gm


class _SizeArg:
    """Stands for a size the traced pattern computed (a symbol or an expression of them)."""

    def __repr__(self) -> str:
        return "<size>"


_SYM_TYPES = (torch.SymInt, torch.SymFloat, torch.SymBool)


def _sizes_as_wildcards(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm`` with every use of a symbolic value (``sym_size``, arithmetic on sizes) replaced
    by a :class:`_SizeArg` and those nodes, and the runtime asserts on them, erased: what
    is left is the pattern's tensor ops, their size arguments wildcards. Works on a copy
    (``gm`` may be a memoised trace), which is never recompiled (a wildcard has no code)."""
    copy = torch.fx.Graph()
    copy.output(copy.graph_copy(gm.graph, {}))
    gm = torch.fx.GraphModule(gm, copy)
    graph = gm.graph
    sym = {n for n in graph.nodes if n.op == "call_function" and isinstance(n.meta.get("val"), _SYM_TYPES)}
    for n in list(graph.nodes):
        if n.op != "call_function":
            continue
        if n in sym or not any(a in sym for a in n.all_input_nodes):
            continue
        if not isinstance(n.meta.get("val"), (torch.Tensor, list, tuple)):
            graph.erase_node(n)  # an assert on sizes (_assert_scalar and its kin)
            continue
        n.args, n.kwargs = torch.fx.node.map_arg((n.args, n.kwargs), lambda a: _SizeArg() if a in sym else a)
    for n in reversed(list(graph.nodes)):
        if n in sym and not n.users:
            graph.erase_node(n)
    return gm


def _build(fusions: Sequence[Fusion], pass_name: str) -> pm.PatternMatcherPass:
    key = tuple(id(f) for f in fusions)
    with _built_lock:
        entry = _built.get(key)
        if entry is not None:
            return entry[1]
        pm = _pm()
        matcher = pm.PatternMatcherPass(pass_name=pass_name)
        for f in fusions:
            inputs = list(f.example_inputs())
            # Patterns are traced in inference mode, on the CPU (fake tensors stand in
            # for the real device at match time: the matcher compares structure).
            with torch.no_grad():
                search_pattern = None
                if f.symbolic:
                    search_pattern = pm.fx_to_pattern(
                        _sizes_as_wildcards(traced_pattern(f, inputs)), ignore_types=(_SizeArg, torch.device),
                        argnames=list(inspect.signature(f.pattern).parameters), exclusive_arg_names=f.exclusive_arg_names,
                    )
                elif f.exact or not f.retrace:
                    # gen_pattern's wildcards; an exact row still leaves devices open (patterns are
                    # traced on the CPU: a factory op's device=cpu must match a graph's cuda or npu)
                    ignore = (torch.device,) if f.exact else (int, float, list, torch.device, torch.dtype)
                    search_pattern = pm.fx_to_pattern(
                        traced_pattern(f, inputs), ignore_types=ignore, argnames=list(inspect.signature(f.pattern).parameters),
                        scalar_workaround=dict(f.scalar_workaround) or None, exclusive_arg_names=f.exclusive_arg_names,
                    )
                pm.register_replacement(
                    f.pattern,
                    f.replacement,
                    inputs,
                    pm.fwd_only,
                    matcher,
                    extra_check=f.extra_check,
                    scalar_workaround=dict(f.scalar_workaround) or None,
                    exclusive_arg_names=f.exclusive_arg_names,
                    search_fn_pattern=search_pattern,
                )
        _built[key] = (tuple(fusions), matcher)
        return matcher


@contextlib.contextmanager
def explain(node_name: str | None):
    """Log, at WARNING on ``torch._inductor.pattern_matcher``, why ``node_name`` matched or not."""
    if not node_name:
        yield
        return
    old = os.environ.get("TORCHINDUCTOR_PATTERN_MATCH_DEBUG")
    os.environ["TORCHINDUCTOR_PATTERN_MATCH_DEBUG"] = node_name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TORCHINDUCTOR_PATTERN_MATCH_DEBUG", None)
        else:
            os.environ["TORCHINDUCTOR_PATTERN_MATCH_DEBUG"] = old


class PatternPass(GraphPass):
    """A pass that applies one family's fusion table with the inductor pattern matcher."""

    def __init__(self, name: str, family: str, fusions: Sequence[Fusion], explain_node: str | None = None):
        self.name = name
        self.family = family
        self.fusions = tuple(fusions)
        self.explain_node = explain_node

    @functools.cached_property
    def matcher(self) -> pm.PatternMatcherPass:
        """The matcher of every row (:meth:`__call__` applies the one of the rows the graph can match)."""
        return _build(self.fusions, self.name)

    def rows_for(self, graph: torch.fx.Graph) -> tuple[Fusion, ...]:
        """The rows whose ``requires`` ops are all in ``graph`` and whose ``requires_path``
        it holds (the others cannot match it)."""
        if not any(f.requires or f.requires_path for f in self.fusions):
            return self.fusions
        targets = {n.target for n in graph.nodes if n.op == "call_function"}
        paths: dict[Path, bool] = {}  # rows share a few paths: each is walked once

        def has(path: Path | None) -> bool:
            if path is None:
                return True
            if path not in paths:
                paths[path] = path.holds(graph)
            return paths[path]

        return tuple(f for f in self.fusions if all(t in targets for t in f.requires) and has(f.requires_path))

    def __call__(self, graph: torch.fx.Graph) -> int:
        if not self.fusions:
            return 0
        if graph.owning_module is None:
            raise TypeError(f"{self.name}: the graph must belong to a GraphModule")
        rows = self.rows_for(graph)
        if not rows:
            return 0
        with explain(self.explain_node):
            count = _build(rows, self.name).apply(graph)  # memoised per row set
        if count:
            # The matcher inserts a replacement before the match's first output; a pattern
            # input defined after that output (DeepSeek-V3's routed scaling under
            # dynamic=True: a 0-dim tensor cast to fp32 just before the final multiply,
            # after the top-k ids) would then be used before its definition.
            _pm().stable_topological_sort(graph)
        return count

    def uuid_sources(self) -> list[Any]:
        out: list[Any] = super().uuid_sources()
        for f in self.fusions:
            out += [f.pattern, f.replacement, f.extra_check]
        return out
