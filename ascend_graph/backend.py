"""The ``ascend`` Dynamo backend: capture -> passes -> codegen -> runtime.

``torch.compile(model, backend="ascend", options={...})`` finds
:func:`ascend_backend` through the ``torch_dynamo_backends`` entry point (no import of
this package needed). For each graph Dynamo hands over (several when the user's code
has graph breaks):

1. ``options`` -> :class:`AscendConfig` (unknown keys are an error);
2. inputs checked: devices cpu/cuda/npu, no complex or quantized dtypes; float
   attributes of modules become constants, guarded (``capture/host_floats.py``: Dynamo
   makes them constants in its trace for this backend; where it did not, the backend asks
   for the re-trace that does);
3. shape analysis (``capture/shapes.py``) on the Dynamo graph: the batch symbol;
4. AOT trace to functional ATen (``capture/trace.py``); inside, the pass manager runs
   and the code generator (inductor, or the FX graph as is) compiles the result. With
   ``cache_dir``, the graph cache wraps this step (``cache/__init__.py``): on a verified
   hit with inductor codegen the compiled graph is loaded and steps 4's trace, passes
   and codegen do not run (Dynamo's trace, steps 1-3 and 5 always do);
5. the runtime (``runtime/runner.py``) wraps it: buckets, padding, device graphs.

Inference only: the trace runs under ``no_grad`` and outputs never require grad.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx

from . import _stats, plugins, precompile
from .capture.host_floats import FloatGuard, restart_to_specialize, specialize_in_dynamo, specialize_module_floats
from .cache.dynamic import seed_from_cache
from .capture.shapes import ShapeInfo, analyze_graph
from .capture.torch_fixes import apply as _apply_torch_fixes
from .capture.trace import aot_trace, make_boxed_func
from .config import AscendConfig
from .errors import ConfigError, UnsupportedError
from .passes.manager import PassManager, build_pass_manager

__all__ = ["ascend_backend", "compile_graph", "CompileContext"]

log = logging.getLogger("ascend_graph.backend")

# before Dynamo's first trace: torch.compile(..., backend="ascend") imports this module
# through the entry point when it is called (capture/torch_fixes.py says what and why)
_apply_torch_fixes()

_graph_ids = itertools.count()

SUPPORTED_DEVICES = ("cpu", "cuda", "npu")
_UNSUPPORTED_DTYPES = {
    torch.complex32,
    torch.complex64,
    torch.complex128,
    torch.quint8,
    torch.qint8,
    torch.qint32,
    torch.quint4x2,
}


def ascend_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Callable[..., Any]:
    """Dynamo backend entry point (``torch.compile(..., backend="ascend", options=...)``)."""
    options = kwargs.pop("options", None)
    mode = kwargs.pop("mode", None)
    if options is not None and not isinstance(options, Mapping):
        # checked before the merge with vLLM's options below, which would be a bare TypeError
        raise ConfigError("torch.compile options must be a dict", expected="options={name: value}", got=type(options).__name__)
    if kwargs:
        raise ConfigError(
            f"unexpected torch.compile argument(s) {sorted(kwargs)} for backend='ascend'",
            expected="options={...}",
            got=sorted(kwargs),
        )
    if mode not in (None, "default"):
        raise ConfigError(
            f"torch.compile mode={mode!r} is not a mode of backend='ascend'",
            expected="no mode (device graphs are on by default; options={'graphs': False} turns them off)",
            got=repr(mode),
        )
    # A host program compiling right now (vLLM: CompilationConfig(backend="ascend")) gives
    # option defaults and its own op fusions through its adapter's entry point
    # (plugins.py); explicit options win. The core imports no adapter.
    host = plugins.host_compile()
    config = AscendConfig.from_options({**(host.options if host else {}), **(options or {})})
    pass_manager = host.pass_manager(config) if host is not None and host.pass_manager is not None else None
    if config.cache_dir and host is None:
        # A static first graph is traced again batch-dynamic, so a server meets the entry
        # `ascend-graph build` wrote whatever its first batch (cache/dynamic.py says why).
        from .cache.dynamic import restart_batch_dynamic

        restart_batch_dynamic(gm, example_inputs, analyze_graph(gm, example_inputs, config.batch_input, config.batch_dim), config)
    return compile_graph(gm, example_inputs, config, pass_manager=pass_manager, wrap_runtime=host.runtime if host is not None else True)


class CompileContext:
    """Per-compile state handed down the pipeline (never stored on classes or modules)."""

    def __init__(self, config: AscendConfig, device: torch.device, shapes: ShapeInfo, graph_id: str):
        self.config = config
        self.device = device
        self.shapes = shapes
        self.graph_id = graph_id
        self.pass_manager: PassManager | None = None
        self.pass_counts: dict[str, int] = {}
        #: per pass run: name, family, rewrites, seconds (PassManager.last_records)
        self.pass_records: list[dict[str, Any]] = []
        #: set by the forward compiler; None after a graph-cache hit loaded the compiled
        #: graph until the cache restores it (with the fields above) from the manifest
        self.post_pass_code: str | None = None
        self.mutated_inputs: frozenset[int] = frozenset()
        self.codegen: str = resolve_codegen(config, device)
        #: modules defining the ascend_graph custom ops of the post-pass graph (a load imports them)
        self.op_modules: tuple[str, ...] = ()
        #: whether the compiled graph is served by the bucketed runner
        self.wrap_runtime = True

    _STATE = ("graph_id", "pass_counts", "pass_records", "mutated_inputs", "codegen", "op_modules", "wrap_runtime")

    def state(self) -> dict[str, Any]:
        """What the runtime needs of this context, picklable (precompile.py saves it)."""
        out = {name: getattr(self, name) for name in self._STATE}
        out.update(config=self.config, device=str(self.device), shapes=self.shapes)
        return out

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "CompileContext":
        ctx = cls(state["config"], torch.device(state["device"]), state["shapes"], state["graph_id"])
        for name in cls._STATE:
            setattr(ctx, name, state[name])
        return ctx


def _config_for(compiler_fn: Any) -> tuple[AscendConfig, bool] | None:
    """``(config, under a host)`` of a compile Dynamo is tracing for this backend, or None
    for another backend: the backend Dynamo holds, unwrapped (its debug wrapper,
    ``torch.compile``'s wrapper with the options, a ``functools.partial``), is
    :func:`ascend_backend`. Options the backend would refuse give None too (it says why
    when it is called)."""
    options: Any = None
    fn = compiler_fn
    for _ in range(8):
        if fn is None:
            return None
        if fn is ascend_backend:
            break
        if isinstance(fn, functools.partial):
            options = fn.keywords.get("options", options)
            fn = fn.func
            continue
        kwargs = getattr(fn, "kwargs", None)
        if options is None and isinstance(kwargs, dict):
            options = kwargs.get("options")
        fn = getattr(fn, "_torchdynamo_orig_backend", None) or getattr(fn, "compiler_fn", None) or getattr(fn, "__wrapped__", None)
    else:
        return None
    if options is not None and not isinstance(options, Mapping):
        return None
    try:
        host = plugins.host_compile()
        return AscendConfig.from_options({**(host.options if host else {}), **(options or {})}), host is not None
    except Exception:  # noqa: BLE001 - a bad option: the backend raises it when called
        return None


def _specializes_floats(compiler_fn: Any) -> bool:
    """Whether Dynamo is tracing for this backend with ``specialize_floats`` on."""
    found = _config_for(compiler_fn)
    return found is not None and found[0].specialize_floats


def _batch_dynamic_cache_dir(compiler_fn: Any) -> str | None:
    """The ``cache_dir`` whose records make this compile's first trace batch-dynamic: an
    ``ascend`` compile with ``cache_dir``, outside a host (which owns its shapes: see
    :func:`ascend_backend`)."""
    found = _config_for(compiler_fn)
    if found is None or found[1]:
        return None
    return found[0].cache_dir or None


# Module floats become constants in Dynamo's first trace for this backend (no re-trace:
# capture/host_floats.py); other backends' traces are left as they are
specialize_in_dynamo(_specializes_floats)
# With cache_dir, a frame the cache holds a batch-dynamic entry of is traced batch-dynamic
# the first time (no static trace thrown away: cache/dynamic.py)
seed_from_cache(_batch_dynamic_cache_dir)


def resolve_codegen(config: AscendConfig, device: torch.device) -> str:
    if config.codegen != "auto":
        return config.codegen
    return "fx" if device.type == "npu" else "inductor"


def check_inputs(example_inputs: Sequence[Any]) -> torch.device:
    """The graph's device; an unsupported device or dtype is an UnsupportedError."""
    devices = set()
    for i, x in enumerate(example_inputs):
        if not isinstance(x, torch.Tensor):
            continue
        if x.device.type not in SUPPORTED_DEVICES:
            raise UnsupportedError(
                f"graph input {i} is on device {x.device}",
                expected=f"tensors on one of {SUPPORTED_DEVICES}",
                got=str(x.device),
            )
        if x.dtype in _UNSUPPORTED_DTYPES:
            raise UnsupportedError(
                f"graph input {i} has dtype {x.dtype}",
                expected="real floating point (float32/float16/bfloat16/float64), integer or bool tensors",
                got=str(x.dtype),
            )
        devices.add(x.device)
    accel = sorted({d for d in devices if d.type != "cpu"}, key=str)
    if len(accel) > 1:
        raise UnsupportedError("graph inputs are on several accelerators", expected="one device", got=[str(d) for d in accel])
    return accel[0] if accel else torch.device("cpu")


def mutated_inputs(aten_gm: torch.fx.GraphModule, offset: int = 0) -> frozenset[int]:
    """Dynamo-input indices the graph writes (input mutations kept in-graph as copy_)."""
    placeholders = [n for n in aten_gm.graph.nodes if n.op == "placeholder"]
    index = {n: i - offset for i, n in enumerate(placeholders)}
    out = set()
    for n in aten_gm.graph.nodes:
        if n.op == "call_function" and n.target is torch.ops.aten.copy_.default and n.args[0] in index:
            out.add(index[n.args[0]])
    return frozenset(i for i in out if i >= 0)


def custom_op_modules(gm: torch.fx.GraphModule) -> tuple[str, ...]:
    """The modules that define the ``ascend_graph::*`` custom ops ``gm`` calls."""
    from torch._library.custom_ops import OPDEFS

    out = set()
    for n in gm.graph.nodes:
        op = getattr(n.target, "_schema", None)
        if n.op == "call_function" and op is not None and op.name.startswith("ascend_graph::"):
            opdef = OPDEFS.get(op.name)
            if opdef is not None:
                out.add(opdef._init_fn.__module__)
    return tuple(sorted(out))


def _codegen(ctx: CompileContext, gm: torch.fx.GraphModule, inputs: Sequence[Any]) -> Callable[..., Any]:
    if ctx.codegen == "inductor":
        from torch._inductor.compile_fx import compile_fx_inner

        # config.inductor_config is patched in by compile_graph, around the trace as well
        return compile_fx_inner(gm, list(inputs), is_inference=True)
    if ctx.codegen == "fx":
        return make_boxed_func(gm.forward)
    return plugins.codegen(ctx.codegen)(gm, inputs, ctx.config)


def compile_graph(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    config: AscendConfig,
    *,
    wrap_runtime: bool = True,
    pass_manager: PassManager | None = None,
) -> Callable[..., Any]:
    """Compile one Dynamo graph; returns the callable Dynamo will call."""
    start = time.perf_counter()
    device = check_inputs(example_inputs)
    original, guards = gm, ()
    if config.specialize_floats and not precompile.requested():
        # not under torch's aot_compile: what it saves must be the graph as Dynamo gave it
        gm, guards = specialize_module_floats(gm, example_inputs)
    shapes = analyze_graph(gm, example_inputs, config.batch_input, config.batch_dim)
    ctx = CompileContext(config, device, shapes, graph_id=f"g{next(_graph_ids):03d}")
    ctx.pass_manager = pass_manager if pass_manager is not None else build_pass_manager(config)

    n_lifted = len(list(gm.parameters())) + len(list(gm.buffers()))

    def fw_compiler(aten_gm: torch.fx.GraphModule, aten_inputs: Sequence[Any]) -> Callable[..., Any]:
        ctx.mutated_inputs = mutated_inputs(aten_gm, offset=n_lifted)
        ctx.pass_counts = ctx.pass_manager(aten_gm, ctx.graph_id)
        ctx.pass_records = list(ctx.pass_manager.last_records)
        ctx.post_pass_code = aten_gm.code
        ctx.op_modules = custom_op_modules(aten_gm)
        return _codegen(ctx, aten_gm, aten_inputs)

    def build(aot_cache_tag: str | None = None) -> Callable[..., Any]:
        # With a tag (inductor codegen, graph cache on), AOTAutograd may save the result
        # to, or load it from, its own cache under that tag: see cache/aot.py. A load
        # never calls fw_compiler; the graph cache then restores ctx from its manifest.
        if guards:
            # about to trace a graph whose module floats we specialized: under Dynamo,
            # have it re-trace them as guarded constants now, before this trace (AOT's
            # tensorify pass would ask the same after it). A graph-cache hit never gets
            # here: it loads, and FloatGuard checks the values.
            restart_to_specialize(original, example_inputs)
        if aot_cache_tag is None:
            return aot_trace(gm, example_inputs, fw_compiler)
        from .cache.aot import keyed, serializable

        with keyed(aot_cache_tag):
            return aot_trace(gm, example_inputs, serializable(fw_compiler))

    with _inductor_patches(config):
        compiled, aot_precompile = _build(gm, example_inputs, ctx, fw_compiler, build)
    seconds = time.perf_counter() - start
    result = _finish(compiled, ctx, shapes, seconds, wrap_runtime, aot_precompile)
    return FloatGuard(result, guards, original.forward) if guards else result


def _inductor_patches(config: AscendConfig) -> Any:
    # around the AOT trace too, not only inductor's lowering: some settings act while
    # AOTAutograd functionalizes (enable_auto_functionalized_v2, which vLLM turns off)
    from torch._inductor import config as inductor_config

    return inductor_config.patch(dict(config.inductor_config))


def _build(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], ctx: CompileContext, fw_compiler: Callable[..., Any], build: Callable[..., Any]) -> tuple[Callable[..., Any], bool]:
    config = ctx.config
    aot_precompile = precompile.requested()
    if aot_precompile:
        # torch's aot_compile (vLLM's default on torch >= 2.10) saves what we return:
        # build a bundled, serializable result (precompile.py). The artifact is the
        # host's to keep, so our graph cache stays out of it.
        precompile.check_codegen(ctx.codegen)
        from .cache.aot import keyed, new_tag, serializable

        with keyed(new_tag(_precompile_digest(ctx))):
            compiled = aot_trace(gm, example_inputs, serializable(fw_compiler))
    # --- cache hook (owned by ascend_graph/cache) ---
    elif config.cache_dir:
        from .cache import compile_with_cache

        compiled = compile_with_cache(gm, example_inputs, ctx, build)
    else:
        compiled = build()
    # --- end cache hook ---
    return compiled, aot_precompile


def _finish(compiled: Callable[..., Any], ctx: CompileContext, shapes: ShapeInfo, seconds: float, wrap_runtime: bool, aot_precompile: bool) -> Callable[..., Any]:
    _stats.record_compile(seconds)
    log.info("compiled %s (%s, batch symbol %s) in %.2f s; rewrites %s", ctx.graph_id, ctx.codegen, shapes.batch_symbol, seconds, {k: v for k, v in ctx.pass_counts.items() if v})
    ctx.wrap_runtime = wrap_runtime
    runner = compiled
    if wrap_runtime:
        from .runtime.runner import make_runner

        runner = make_runner(compiled, ctx)
    if aot_precompile:
        _stats.record_precompiled("built")
        return precompile.PrecompiledGraph(compiled, ctx.state(), runner)
    return runner


def _precompile_digest(ctx: CompileContext) -> str:
    # in torch's cache keys (with a nonce): an AOTAutograd entry of another pass set or
    # config is never loaded in place of this build
    return f"{ctx.config.compute_hash()[:16]}-{ctx.pass_manager.uuid()}"
