"""TorchAir as the NPU code generator, and our fusions inside TorchAir's own graph modes.

Entry points:

- :func:`compile_with_torchair` (``options={"codegen": "torchair", "torchair_mode": ...}``):
  the backend calls it with the post-pass ATen graph. It hands that graph to TorchAir's
  *FX compiler*, ``pkg.get_compiler(CompilerConfig)``: the object TorchAir itself passes
  to ``aot_module_simplified`` as its forward/inference compiler (``npu_fx_compiler.py``,
  ``_compile_graph_with_aot``). ``get_npu_backend`` is the wrong layer here: it returns a
  Dynamo backend that runs its own AOT trace, and our graph is already traced.
  ``max-autotune`` (GE graph) and ``reduce-overhead`` (ACL graph, deprecated by TorchAir)
  use the ``torchair`` package; ``npugraph_ex`` (ACL graph) uses the ``npugraph_ex``
  package, which is what ``torch.compile(backend="npugraph_ex")`` runs in torch_npu 2.13.
- :func:`register_patterns` (every ``Fusion`` row, via ``register_replacement``) and
  :func:`torchair_pass` (the whole pass manager as a TorchAir custom pass), for users
  who call TorchAir directly.

Which layer runs our passes (never twice): under ``codegen="torchair"`` our backend's
AOT ``fw_compiler`` runs them before calling TorchAir, so the config built here leaves
``post_grad_custom_pre_pass``/``post_grad_custom_post_pass`` unset. TorchAir's
``_optimize_fx`` then adds only its own passes (noop removal, view recovery, its
pattern fusions, view -> reshape). For direct TorchAir users the hook is the *pre* pass:
the post pass runs after every ``aten.view`` became ``aten.reshape``, which our patterns
(traced with ``view``) no longer match. There TorchAir's AOT trace uses its own
decomposition table, so a subgraph it decomposes differently from inductor may not match.

Who captures: TorchAir owns the device graph in all three modes (a GE graph, or an ACL
graph captured per input shape); our bucketed runtime keeps bucketing and padding, so
TorchAir sees at most one shape per bucket, and must not capture an NPUGraph of its own
around TorchAir's. ``max_graphs`` is the ACL capture limit; ``frozen_parameter`` is on
(our runtime assumes parameters never move) except with ``debug``, where TorchAir then
re-checks parameter addresses as our runtime does in debug mode.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.fx

from ..capture.trace import make_boxed_func
from ..config import AscendConfig
from ..errors import UnsupportedError
from ..passes.pattern import PatternPass

__all__ = ["compile_with_torchair", "compiler_settings", "apply_settings", "package_for", "load_package", "register_patterns", "register_fusions", "torchair_pass"]

log = logging.getLogger("ascend_graph.integrations.torchair")



def package_for(mode: str) -> str:
    """The package that implements ``mode``; both ship inside torch_npu."""
    return "npugraph_ex" if mode == "npugraph_ex" else "torchair"


def compiler_settings(config: AscendConfig) -> dict[str, Any]:
    """``{dotted CompilerConfig attribute: value}`` for ``config.torchair_mode`` (pure)."""
    frozen = not config.debug
    if config.torchair_mode == "npugraph_ex":  # npugraph_ex's CompilerConfig is flat
        return {"frozen_parameter": frozen, "capture_limit": config.max_graphs}
    settings: dict[str, Any] = {"mode": config.torchair_mode, "experimental_config.frozen_parameter": frozen}
    if config.torchair_mode == "reduce-overhead":
        settings["debug.aclgraph.static_capture_size_limit"] = config.max_graphs
    return settings


def apply_settings(compiler_config: Any, settings: Mapping[str, Any]) -> Any:
    """Set each dotted attribute; TorchAir's ``NpuBaseConfig.__setattr__`` validates it."""
    for dotted, value in settings.items():
        *parents, leaf = dotted.split(".")
        target = compiler_config
        for part in parents:
            target = getattr(target, part)
        setattr(target, leaf, value)
    return compiler_config


def load_package(name: str) -> Any:
    """Import ``torchair`` or ``npugraph_ex``; an UnsupportedError says what is missing."""
    try:
        import torch_npu  # noqa: F401  (installs the lazy ``torchair``/``npugraph_ex`` modules)
    except Exception as e:  # ImportError, or OSError when CANN's libraries are missing
        raise UnsupportedError(
            f"codegen='torchair' needs torch_npu, which ships {name}",
            expected="an importable torch_npu (torch-npu matching this torch, CANN installed, an Ascend NPU)",
            got=f"{type(e).__name__}: {e}",
            hint="on a machine without an Ascend NPU use codegen='auto' (inductor) or 'fx'",
        ) from e
    try:
        return importlib.import_module(name)
    except Exception as e:
        raise UnsupportedError(
            f"torch_npu {getattr(torch_npu, '__version__', '?')} has no usable {name!r} package",
            expected=f"torch_npu with {name} (torch_npu/dynamo/{name})",
            got=f"{type(e).__name__}: {e}",
            hint="upgrade torch-npu, " + ("or use torchair_mode='reduce-overhead'" if name == "npugraph_ex" else "or use codegen='fx'"),
        ) from e


def _mark_static_inputs(example_inputs: Sequence[Any]) -> None:
    """Mark parameters as TorchAir does (``_mark_static_inputs_attr``) so ACL graphs never copy them.

    That marking lives in TorchAir's AOT wrapper, which we bypass; the indices come from
    the AOT metadata of the trace we are inside (what inductor's cudagraphs use too).
    """
    ctx = torch._guards.TracingContext.try_get()
    indices = ctx.fw_metadata.static_input_indices if ctx is not None and ctx.fw_metadata is not None else ()
    for i in indices:
        if i < len(example_inputs) and isinstance(example_inputs[i], torch.Tensor):
            example_inputs[i]._torchair_is_parameter = True


def compile_with_torchair(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], config: AscendConfig) -> Callable[..., Any]:
    """Compile the post-pass functional ATen graph with TorchAir; returns a boxed callable."""
    pkg = load_package(package_for(config.torchair_mode))
    compiler_config = apply_settings(pkg.CompilerConfig(), compiler_settings(config))
    inputs = list(example_inputs)
    if config.torchair_mode != "max-autotune":  # TorchAir skips this for GE graphs too
        _mark_static_inputs(inputs)
    log.info("TorchAir (%s) compiles a graph of %d nodes", config.torchair_mode, len(gm.graph.nodes))
    return make_boxed_func(pkg.get_compiler(compiler_config)(gm, inputs))


# -- our fusions inside TorchAir, for users who call TorchAir directly -----------------


def _exclusive_check(fusion: Any) -> Callable[[Any], bool]:
    """TorchAir's ``register_replacement`` has no ``exclusive_arg_names``: enforce it here.

    Inductor's ``ExclusiveKeywordArg`` fails a match whose exclusive args bind one node
    twice; the same rule as an extra_check: the bound nodes are pairwise distinct.
    """
    names = tuple(fusion.exclusive_arg_names)

    def check(match: Any) -> bool:
        if names and len({id(match.kwargs.get(n)) for n in names}) != len(names):
            return False
        return fusion.extra_check(match)

    return check


def register_fusions(fusions: Iterable[Any], pkg: Any) -> int:
    """Register ``Fusion`` rows into ``pkg``'s global pattern pass; returns how many were handed over.

    Idempotent (``skip_duplicates=True``). Patterns are traced with ``fwd_only``, as our
    own ``PatternPass`` does, in inference mode.
    """
    from torch._inductor.pattern_matcher import fwd_only

    count = 0
    for f in fusions:
        with torch.no_grad():
            pkg.register_replacement(
                f.pattern,
                f.replacement,
                list(f.example_inputs()),
                trace_fn=fwd_only,
                extra_check=_exclusive_check(f),
                scalar_workaround=dict(f.scalar_workaround) or None,
                skip_duplicates=True,
            )
        count += 1
    return count


def _rows(graph_pass: Any) -> list[Any]:
    """A pass's Fusion rows, and those of PatternPasses it holds (MoE's router table).

    Rows a pass builds per graph (MoE's expert variants) cannot be registered ahead of
    time; ``torchair_pass`` runs them.
    """
    held = [v for v in vars(graph_pass).values() if isinstance(v, PatternPass)]
    return [*getattr(graph_pass, "fusions", ()), *(f for p in held for f in p.fusions)]


def register_patterns(config: AscendConfig | None = None, packages: Sequence[str] | None = None) -> dict[str, int]:
    """Register every fusion of every family pass into TorchAir's pattern passes.

    ``torchair`` (GE and reduce-overhead modes) and ``npugraph_ex`` keep separate global
    pattern passes; by default both are filled (npugraph_ex skipped where torch_npu has
    none). Returns ``{package: rows registered}``. TorchAir applies them when its
    ``pattern_fusion_pass`` option is on (the default).
    """
    from ..passes.manager import fusion_passes

    rows = [f for p in fusion_passes(config or AscendConfig()) for f in _rows(p)]
    out: dict[str, int] = {}
    for name in packages or ("torchair", "npugraph_ex"):
        try:
            pkg = load_package(name)
        except UnsupportedError:
            if packages or name == "torchair":
                raise
            log.info("torch_npu has no %s package; its pattern pass is not filled", name)
            continue
        out[name] = register_fusions(rows, pkg)
    return out


def torchair_pass(config: AscendConfig | None = None) -> Callable[[torch.fx.GraphModule, Any, Any], None]:
    """Our pass manager as a TorchAir custom pass ``fn(gm, example_inputs, compiler_config)``.

    Set it as ``post_grad_custom_pre_pass`` (see the module docstring for why not post).
    """
    from ..passes.manager import build_pass_manager

    manager = build_pass_manager(config or AscendConfig())

    def ascend_graph_passes(gm: torch.fx.GraphModule, example_inputs: Any = None, compiler_config: Any = None) -> None:
        manager(gm, "torchair")

    return ascend_graph_passes
