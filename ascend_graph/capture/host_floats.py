"""Python floats of the model's modules, made constants of the graph again, with a guard.

Under ``dynamic=True`` (Dynamo's ``specialize_float=False``) every float attribute of a
module the graph reads (RMSNorm's ``variance_epsilon``, an attention ``scaling``, GptOss's
clipped-SwiGLU ``alpha`` and ``limit``) becomes a graph input: a 0-dim float64 CPU tensor
created on every call and read back with ``.item()`` inside the graph. Two things follow:

- fusions whose ops take floats cannot match (the Ascend ops take ``alpha``/``limit``/
  ``epsilon`` as attributes, not tensors);
- a captured device graph bakes the value the kernels got at capture: a later value is
  silently ignored on replay. Dynamo itself specializes floats whenever inductor's CUDA
  graphs are on (``torch/_dynamo/variables/builder.py``, for this reason).

:func:`specialize_in_dynamo` (installed when the backend module is imported) has Dynamo
make them constants in its first trace for ``backend="ascend"``: at the end of a trace
Dynamo replaces every float input whose symbol its ``TensorifyState`` names by the value,
guarded (``self.alpha == 1.702``: a changed value recompiles), and drops the input
(``OutputGraph.remove_tensorify_specialized_graphargs``, what it does after torch's own
tensorify restart). The hook answers for module-attribute symbols while Dynamo traces for
this backend with ``specialize_floats`` on; caller floats (they may change per call) and
other backends' traces are left as Dynamo has them. Before it, every such graph cost an
aborted Dynamo trace (Qwen3-Next and Bamba under ``dynamic=True`` on the H100: 10.0 s and
11.5 s of their compile).

Where Dynamo still passes module floats (a torch without that hook):
:func:`restart_to_specialize` marks the same symbols and raises the same restart as soon
as the backend gets the graph, before any AOT trace (AOTAutograd's tensorify pass,
``torch/fx/passes/_tensorify_python_scalars.py``, would find them unread and ask for it
from inside its capture, a wasted trace of the whole graph). Where there is no re-trace
either (a direct call, a graph-cache hit), :func:`specialize_module_floats` puts the
example value in the graph in place of every ``.item()`` of such an input and
:class:`FloatGuard` checks the values on every call (one ``.item()`` of a CPU tensor each,
about 0.2 us), running the unspecialized graph eagerly when one differs, counted as an
eager fallback.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Sequence

import torch
import torch.fx

from .. import _stats

log = logging.getLogger("ascend_graph.capture")

__all__ = ["FloatGuard", "restart_to_specialize", "specialize_in_dynamo", "specialize_module_floats"]


def _module_attribute(node: torch.fx.Node) -> bool:
    """Whether Dynamo made this input from a float attribute of an nn.Module."""
    ga = node.meta.get("grapharg")
    if ga is None or not getattr(ga, "pass_arg_as_tensor", False):
        return False  # not a tensorified Python scalar
    return _module_attribute_source(getattr(ga, "source", None))


def _module_attribute_source(src: Any) -> bool:
    """Whether a Dynamo source is an attribute of an nn.Module (``self.eps``)."""
    base = getattr(src, "base", None)
    if base is None or not hasattr(src, "member"):
        return False  # not an attribute (a local, a global, an argument)
    try:
        gs = base.guard_source
        gs = gs() if callable(gs) else gs  # a property on torch 2.13, a method before
    except Exception:  # a source kind this torch does not give a guard source
        return False
    return any(getattr(gs, m, lambda: False)() for m in ("is_unspecialized_nn_module", "is_specialized_nn_module"))


def _module_float_inputs(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> dict[str, tuple[int, float, torch.fx.Node]]:
    """placeholder name -> (input index, example value, node) of every module float input."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    chosen: dict[str, tuple[int, float, torch.fx.Node]] = {}
    for i, (node, ex) in enumerate(zip(placeholders, example_inputs)):
        if not (isinstance(ex, torch.Tensor) and type(ex) is torch.Tensor and ex.dim() == 0 and ex.dtype == torch.float64 and ex.device.type == "cpu"):
            continue  # a FakeTensor (a precompile) has no value to take
        if not node.users or not all(u.op == "call_method" and u.target == "item" and len(u.args) == 1 and not u.kwargs for u in node.users):
            continue
        value = float(ex.item())
        if not math.isfinite(value) or not _module_attribute(node):
            continue
        chosen[node.name] = (i, value, node)
    return chosen


def _float_symbol(node: torch.fx.Node) -> str | None:
    """The name of the SymFloat Dynamo read from this input (``.item()``), e.g. ``zf0``."""
    ex = node.meta.get("example_value")
    memo = getattr(ex, "item_memo", None)
    expr = getattr(getattr(memo, "node", None), "_expr", None)
    name = getattr(expr, "name", None)
    return name if isinstance(name, str) else None


def tracing_tx(current_tx: Callable[[], Any]) -> Any:
    """The translator Dynamo is tracing with in this thread, or None. ``current_tx`` is
    ``InstructionTranslator.current_tx``, which raises in a thread that never traced
    (a direct ``compile_graph`` call there, a read of Dynamo's state after a trace)."""
    try:
        return current_tx()
    except AttributeError:
        return None


def _tensorify_internals() -> tuple[Any, Any, Any] | None:
    """(TensorifyState, the restart exception, the current-tx getter), or None on a torch without them."""
    try:
        from torch._dynamo.exc import TensorifyScalarRestartAnalysis
        from torch._dynamo.symbolic_convert import InstructionTranslator, TensorifyState
    except ImportError:  # pragma: no cover - another torch
        return None
    if not all(hasattr(TensorifyState, m) for m in ("specialize", "should_specialize")) or not hasattr(InstructionTranslator, "current_tx"):
        return None  # pragma: no cover - another torch
    return TensorifyState, TensorifyScalarRestartAnalysis, InstructionTranslator.current_tx


def restart_to_specialize(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """Raise Dynamo's tensorify restart for the module float inputs of ``gm``; return when
    there is nothing to do.

    Returns (and :func:`specialize_module_floats` then does the work, with a
    :class:`FloatGuard`) when: no input is a module float; the backend was not called by
    Dynamo's trace (no current instruction translator: a direct call, a test); an input's
    symbol is unknown; or every symbol is marked already (Dynamo re-traced and kept the
    inputs: asking again would loop).
    """
    chosen = _module_float_inputs(gm, example_inputs)
    if not chosen:
        return
    internals = _tensorify_internals()
    if internals is None:
        return
    state, restart, current_tx = internals
    if tracing_tx(current_tx) is None:
        return
    names = [_float_symbol(node) for _, _, node in chosen.values()]
    if any(n is None for n in names) or all(state.should_specialize(n) for n in names):
        return
    for n in names:
        state.specialize(n)
    log.info("module floats %s made constants: Dynamo re-traces the frame with them guarded", ", ".join(sorted(chosen)))
    raise restart(restart_reason="ascend-graph: module floats specialized (graph constants, guarded)")


class _SpecializeForOurs(set):
    """Dynamo's ``TensorifyState.force_specializations`` (the float symbols a re-trace makes
    constants), which also holds, while Dynamo traces for a backend ``wants`` accepts, every
    float symbol whose sources are all module attributes."""

    wants: Callable[[Any], bool] = staticmethod(lambda compiler_fn: False)

    def __contains__(self, name: object) -> bool:
        if set.__contains__(self, name):
            return True
        try:
            return isinstance(name, str) and _module_float_of_ours(name, type(self).wants)
        except Exception as e:  # noqa: BLE001 - a torch laid out otherwise: Dynamo's own answer
            log.debug("module float lookup for %s failed: %s: %s", name, type(e).__name__, e)
            return False


def _module_float_of_ours(name: str, wants: Callable[[Any], bool]) -> bool:
    internals = _tensorify_internals()
    if internals is None:
        return False
    tx = tracing_tx(internals[2])
    if tx is None or not wants(getattr(tx.output, "compiler_fn", None)):
        return False
    for symbol, sources in tx.output.shape_env.var_to_sources.items():
        if str(symbol) == name:
            return bool(sources) and all(_module_attribute_source(src) for src in sources)
    return False


def specialize_in_dynamo(wants: Callable[[Any], bool]) -> bool:
    """Have Dynamo make module floats constants in its first trace for the backends
    ``wants(compiler_fn)`` accepts; returns whether this torch allowed it.

    Dynamo already does this after a tensorify restart: at the end of a trace
    (``OutputGraph.remove_tensorify_specialized_graphargs``) it replaces each float input
    whose symbol ``TensorifyState`` names by its value, with a guard, and drops the input.
    Answering for module-attribute symbols from the start gives the graph the restart would
    have given, without the aborted trace: one whole Dynamo trace per graph (Qwen3-Next and
    Bamba under ``dynamic=True`` on the H100: 10.0 and 11.5 s of their compile,
    ``compile_attempt_0`` in torch's ``compile_times``). AOTAutograd's tensorify pass asks
    the same set, so it no longer restarts for them either. Floats the caller passes and
    every other backend's traces are left as Dynamo has them. Idempotent.
    """
    internals = _tensorify_internals()
    current = getattr(internals[0], "force_specializations", None) if internals else None
    if not isinstance(current, set):
        return False  # pragma: no cover - another torch
    if not isinstance(current, _SpecializeForOurs):
        internals[0].force_specializations = _SpecializeForOurs(current)
    _SpecializeForOurs.wants = staticmethod(wants)
    return True


def specialize_module_floats(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[torch.fx.GraphModule, tuple[tuple[int, float, str], ...]]:
    """A copy of ``gm`` with module float inputs replaced by their example values.

    Returns ``(graph_module, guards)``; ``guards`` is ``(input index, value, name)`` per
    specialized input, empty (and ``gm`` itself returned) when there is none. The copy
    shares ``gm``'s parameters; ``gm`` is left as it was (the guard's fallback runs it).
    The input stays in the signature, unused, so callers pass the same arguments.
    """
    chosen = {name: (i, value) for name, (i, value, _) in _module_float_inputs(gm, example_inputs).items()}
    if not chosen:
        return gm, ()
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, Any] = {}
    for node in gm.graph.nodes:
        if node.op == "call_method" and node.target == "item" and node.args[0].op == "placeholder" and node.args[0].name in chosen:
            env[node] = chosen[node.args[0].name][1]  # users get the float itself
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    out = torch.fx.GraphModule(gm, graph)
    out.meta.update(getattr(gm, "meta", {}))
    guards = tuple(sorted((i, v, name) for name, (i, v) in chosen.items()))
    return out, guards


class FloatGuard:
    """Calls ``compiled`` while every guarded input holds its specialized value; else runs
    ``fallback`` (the unspecialized Dynamo graph, eagerly) and counts it."""

    def __init__(self, compiled: Callable[..., Any], guards: tuple[tuple[int, float, str], ...], fallback: Callable[..., Any]):
        self.compiled = compiled
        self.guards = guards
        self.fallback = fallback

    def __call__(self, *args: Any) -> Any:
        for i, value, name in self.guards:
            if args[i].item() != value:
                _stats.record_fallback(f"module float {name} changed from {value!r} (specialized at compile)")
                with torch.no_grad():
                    return self.fallback(*args)
        return self.compiled(*args)

    def __getattr__(self, name: str) -> Any:
        # the runner's attributes (tests and the vLLM wrapper read them) stay reachable
        if name in ("compiled", "guards", "fallback"):
            raise AttributeError(name)
        return getattr(self.compiled, name)
