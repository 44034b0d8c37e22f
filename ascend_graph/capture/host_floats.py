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

:func:`specialize_module_floats` puts the example value in the graph in place of every
``.item()`` of such an input (module attributes only: a float the caller passes may
change per call) and returns the guards. What follows on torch 2.11-2.13: AOTAutograd's
tensorify pass (``torch/fx/passes/_tensorify_python_scalars.py``) finds those float
symbols no longer read, marks them to specialize and has Dynamo re-trace the frame, so
the graph that is compiled has the floats as constants and Dynamo guards their values
(``self.alpha == 1.702``): a changed value recompiles. The cost is one more Dynamo trace;
the aborted attempt stops in AOT's capture, before our passes.

Where a torch passes the specialized graph on without that re-trace, :class:`FloatGuard`
checks the values on every call (one ``.item()`` of a CPU tensor each, about 0.2 us,
against the ~2.5 us Dynamo spends making each of those tensors) and runs the
unspecialized graph eagerly when one differs, counted as an eager fallback. Floats that
Dynamo specialized itself never reach here.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.fx

from .. import _stats

__all__ = ["FloatGuard", "specialize_module_floats"]


def _module_attribute(node: torch.fx.Node) -> bool:
    """Whether Dynamo made this input from a float attribute of an nn.Module."""
    ga = node.meta.get("grapharg")
    if ga is None or not getattr(ga, "pass_arg_as_tensor", False):
        return False  # not a tensorified Python scalar
    src = getattr(ga, "source", None)
    base = getattr(src, "base", None)
    if base is None or not hasattr(src, "member"):
        return False  # not an attribute (a local, a global, an argument)
    try:
        gs = base.guard_source
        gs = gs() if callable(gs) else gs  # a property on torch 2.13, a method before
    except Exception:  # a source kind this torch does not give a guard source
        return False
    return any(getattr(gs, m, lambda: False)() for m in ("is_unspecialized_nn_module", "is_specialized_nn_module"))


def specialize_module_floats(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[torch.fx.GraphModule, tuple[tuple[int, float, str], ...]]:
    """A copy of ``gm`` with module float inputs replaced by their example values.

    Returns ``(graph_module, guards)``; ``guards`` is ``(input index, value, name)`` per
    specialized input, empty (and ``gm`` itself returned) when there is none. The copy
    shares ``gm``'s parameters; ``gm`` is left as it was (the guard's fallback runs it).
    The input stays in the signature, unused, so callers pass the same arguments.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    chosen: dict[str, tuple[int, float]] = {}
    for i, (node, ex) in enumerate(zip(placeholders, example_inputs)):
        if not (isinstance(ex, torch.Tensor) and type(ex) is torch.Tensor and ex.dim() == 0 and ex.dtype == torch.float64 and ex.device.type == "cpu"):
            continue  # a FakeTensor (a precompile) has no value to take
        if not node.users or not all(u.op == "call_method" and u.target == "item" and len(u.args) == 1 and not u.kwargs for u in node.users):
            continue
        value = float(ex.item())
        if not math.isfinite(value) or not _module_attribute(node):
            continue
        chosen[node.name] = (i, value)
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
