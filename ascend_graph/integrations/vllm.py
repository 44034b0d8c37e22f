"""vLLM adapters: the three ways ascend-graph plugs into vLLM (checked against vLLM 0.32.0).

1. ``CompilationConfig(mode=CompilationMode.DYNAMO_TRACE_ONCE, backend="ascend")``:
   vLLM hands the whole Dynamo graph to the ``ascend`` Dynamo backend. vLLM passes no
   options to a string backend (only ``guard_filter_fn``, which ``torch.compile`` pops),
   so the backend learns vLLM's settings from the current vLLM config:
   :func:`options_from_vllm`. :func:`ascend_vllm_backend` is that backend with the
   lookup built in (usable today as ``backend="ascend_graph.integrations.vllm.ascend_vllm_backend"``).
2. A platform's ``get_compile_backend()`` names :class:`AscendGraphCompiler` (a vLLM
   ``CompilerInterface``): vLLM's piecewise ``VllmBackend`` calls ``compile``/``load`` on
   each piece. Mode 3 rejects any backend string but ``""/eager/inductor``, and
   ``make_compiler`` resolves the *platform's* compile backend (vLLM issue #35084), so
   this route needs a platform plugin (or vllm-ascend) naming the class.
3. ``CompilationConfig(inductor_passes={"post_grad_custom_post_pass": AscendFusionPass()})``:
   vLLM appends the pass to its ``PostGradPassManager`` (it asserts ``InductorPass``).
   A platform's ``get_static_graph_wrapper_cls()`` may name :class:`AscendGraphWrapper`.

Everything here is glue: the pipeline is ``backend.compile_graph`` and the pass manager;
the only vLLM-specific logic is the fusion table for vLLM's own ops (below) and the
reading of vLLM's config and forward context. vLLM is imported lazily, so importing
this module needs vLLM only where a vLLM class is subclassed (the classes are built on
first attribute access).

vLLM ops matched (``VLLM_FUSIONS``), as they appear in a vLLM 0.32 graph after AOT
tracing with inductor's decompositions:

- ``vllm_ir.rms_norm(x, w, eps)`` (what ``RMSNorm.forward_native`` emits: an opaque vLLM
  IR op that vLLM's own ``VllmIRLoweringPass`` lowers only under ``VLLM_COMPILE``)
  -> ``ascend_graph::rms_norm`` (mirrors ``npu_rms_norm``);
- ``SiluAndMul.forward_native`` (``silu(x[..., :d]) * x[..., d:]``, decomposed to
  neg/exp/add/div * slice) -> ``ascend_graph::silu_and_mul`` (mirrors ``npu_swiglu``).

Both are rows of the ``norm_rope`` family and follow its per-device policy (skipped,
and counted in ``stats()["skipped"]``, on the CPU with inductor codegen, where inductor's
fused loops beat the ops' plain-torch references). vLLM's CPU graphs hold the native
forms (no ``vllm_ir`` ops): the family's own rows match those.

- ``_C.rotary_embedding`` (in place; vLLM's op under any backend string but "inductor")
  -> vLLM's native rope math, only where our codegen is inductor (pass
  ``vllm_rope_native``, before the families: see :class:`VllmRopeNativePass`);
- ``vllm::unified_kv_cache_update`` + ``vllm::unified_attention_with_output`` (family
  ``attention``) -> ``ascend_graph::vllm_attention_context`` (the layer's KV cache and
  metadata from vLLM's forward context at run time) + ``reshape_and_cache`` +
  ``paged_attention`` (TND, FIA contract);
- ``vllm::moe_forward`` / ``moe_forward_shared`` (family ``moe``) -> ``moe_gating_topk`` +
  ``moe_dispatch_ffn_combine`` with the layer's weights and routing config
  (``integrations/vllm_ops.py`` has the forms matched and what each refuses).

Not matched yet: ``vllm_ir.fused_add_rms_norm.maybe_inplace`` (it reaches the graph
as ``auto_functionalized_v2`` over two mutated inputs; the replacement must write both
back, which the graph contract does not cover yet); Qwen3's q/k RMSNorm + rotary
embedding before attention (the norms are ``vllm_ir.rms_norm`` and fuse as above; the
rotary embedding is plain ATen ops: no qk-norm + rope op exists in ``ascend_graph.ops``).
"""

from __future__ import annotations

import hashlib
import logging
import sys
from typing import Any, Callable, Sequence

import torch
import torch.fx

from .. import _stats
from .._version import __version__
from ..config import AscendConfig
from ..errors import CaptureError
from ..passes.base import GraphPass
from ..passes.manager import PassManager, build_pass_manager
from ..ops import norm_rope as _norm_rope_ops  # noqa: F401  (registers the ops the rows produce)
from ..passes.pattern import Fusion
from ..plugins import HostCompile
from ..runtime import graphs as device_graphs

__all__ = [
    "options_from_vllm",
    "host_compile",
    "ascend_vllm_backend",
    "vllm_ops_pass",
    "vllm_ops_passes",
    "vllm_pass_manager",
    "VLLM_FUSIONS",
    "AscendGraphCompiler",
    "AscendFusionPass",
    "AscendGraphWrapper",
]

log = logging.getLogger("ascend_graph.integrations.vllm")

_INSTALL_HINT = "pip install vllm (see docs/vllm.md for a CPU development install)"


def _require_vllm() -> None:
    try:
        import vllm.config  # noqa: F401
    except ImportError as e:  # pragma: no cover - exercised only without vLLM
        raise ImportError(f"ascend_graph.integrations.vllm needs vLLM: {e}; {_INSTALL_HINT}") from e


# --------------------------------------------------------------------------------------
# 1. vLLM's config -> AscendConfig options
# --------------------------------------------------------------------------------------


def _current_vllm_config() -> Any:
    """The vLLM config of the running compile, or None (never imports vLLM itself).

    vLLM sets its "current config" around model construction and, on GPU workers, around
    the profiling run that compiles the model; vLLM 0.32's CPU worker compiles outside
    it (``CPUWorker.determine_available_memory`` -> ``profile_run``). Every compile runs
    inside a forward context, though, and the model being compiled holds its config:
    with no current config, the nearest caller whose ``self`` carries a ``VllmConfig``
    (vLLM's ``@support_torch_compile`` model) gives it. A test notices when vLLM sets
    the current config there itself (``test_cpu_worker_compiles_outside_current_config``).
    """
    if "vllm.config" not in sys.modules:
        return None
    from vllm.config import VllmConfig, get_current_vllm_config_or_none

    config = get_current_vllm_config_or_none()
    if config is not None:
        return config
    forward_context = sys.modules.get("vllm.forward_context")
    if forward_context is None or not forward_context.is_forward_context_available():
        return None
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        config = owner.__dict__.get("vllm_config") if hasattr(owner, "__dict__") else None
        if isinstance(config, VllmConfig):
            return config
        frame = frame.f_back
    return None


def options_from_vllm(vllm_config: Any = None) -> dict[str, Any]:
    """``torch.compile`` options for backend ``"ascend"`` taken from a vLLM config.

    ``vllm_config`` defaults to vLLM's current config (set while vLLM compiles a model);
    with none, ``{}``. Keys: ``buckets`` (vLLM's ``cudagraph_capture_sizes``),
    ``max_batch`` (``max_cudagraph_capture_size``), ``num_speculative_tokens``, and
    ``graphs=False`` where vLLM captures whole-model graphs itself (FULL modes: a graph
    captured inside vLLM's capture would nest).
    """
    if vllm_config is None:
        vllm_config = _current_vllm_config()
    if vllm_config is None:
        return {}
    cc = vllm_config.compilation_config
    options: dict[str, Any] = {}
    sizes = sorted(set(cc.cudagraph_capture_sizes or ()))
    if sizes:
        options["buckets"] = sizes
        options["max_batch"] = int(cc.max_cudagraph_capture_size or sizes[-1])
    spec = getattr(vllm_config, "speculative_config", None)
    k = getattr(spec, "num_speculative_tokens", None) if spec is not None else None
    if k:
        options["num_speculative_tokens"] = int(k)
    mode = cc.cudagraph_mode
    if mode is not None and mode.has_full_cudagraphs():
        options["graphs"] = False
    device = getattr(getattr(vllm_config, "device_config", None), "device_type", None)
    inductor = _inductor_settings(cc.inductor_compile_config or {}, cpu=device == "cpu")
    if inductor:
        options["inductor_config"] = inductor
    return options


#: What vLLM's CPU platform patches into inductor for its own default compile
#: (``CpuPlatform.check_and_update_config``: mode 3 becomes DYNAMO_TRACE_ONCE + inductor with
#: these). A mode-2 ``backend="ascend"`` compile does not get them from vLLM; we apply the
#: same so that our graph is compiled as vLLM's default one is (``cpp.dynamic_threads``
#: matters most: without it every kernel call re-reads the OpenMP thread count).
VLLM_CPU_INDUCTOR = {"dce": True, "size_asserts": False, "nan_asserts": False, "epilogue_fusion": True, "cpp.dynamic_threads": True}


def _inductor_settings(vllm_inductor: dict[str, Any], cpu: bool) -> dict[str, Any]:
    """vLLM's own inductor settings (``CompilationConfig.inductor_compile_config``: e.g.
    ``enable_auto_functionalized_v2=False``, which keeps its mutating C ops reinplaceable),
    plus, on the CPU, what its CPU platform adds for its default compile. Only plain keys
    inductor knows; applied around our AOT trace and inductor's lowering."""
    from torch._inductor import config as inductor_config

    known = inductor_config.get_config_copy()
    wanted = {**(VLLM_CPU_INDUCTOR if cpu else {}), **{k: v for k, v in vllm_inductor.items() if _is_plain_inductor_key(k, v)}}
    return {k: v for k, v in wanted.items() if k in known}


def host_compile() -> HostCompile | None:
    """The core's host hook (entry point ``ascend_graph.hosts: vllm`` through ``vllm_host``, plugins.py).

    While vLLM compiles a model (a current vLLM config is set), the ``ascend`` backend
    takes its option defaults from :func:`options_from_vllm` and runs the vLLM op
    fusions after the fusion families, whatever vLLM's capture sizes are (the CPU
    platform sets none). Outside vLLM: None. Never imports vLLM.
    """
    vllm_config = _current_vllm_config()
    if vllm_config is None:
        return None
    options = options_from_vllm(vllm_config)
    # no capture sizes (vLLM's CPU platform): vLLM captures nothing and pads nothing, so
    # our runner would only pad and copy; the compiled graph serves vLLM's batches as is
    return HostCompile("vllm", options, vllm_pass_manager, runtime="buckets" in options)


def _compile_with_vllm_passes(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], config: AscendConfig, wrap_runtime: bool = True) -> Callable[..., Any]:
    """``compile_graph`` with the vLLM op fusions appended to its pass manager."""
    from .. import backend

    return backend.compile_graph(gm, example_inputs, config, wrap_runtime=wrap_runtime, pass_manager=vllm_pass_manager(config))


def ascend_vllm_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Callable[..., Any]:
    """The ``ascend`` Dynamo backend, named by its qualified name (kept for earlier configs).

    ``backend="ascend"`` does the same through :func:`host_compile`.
    """
    from ..backend import ascend_backend

    return ascend_backend(gm, example_inputs, **kwargs)


# --------------------------------------------------------------------------------------
# vLLM op fusions: contracts, fusion rows, the pass
# --------------------------------------------------------------------------------------


_EPS = 1e-6  # sample value only: the eps argument is generalised by scalar_workaround
_HALF = 37  # sample split point: generalised by scalar_workaround (odd, so it is unique)


def _rms_norm_pattern(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.ops.vllm_ir.rms_norm.default(x, weight, eps)


def _rms_norm_replacement(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.ops.ascend_graph.rms_norm.default(x, weight, eps)


def _rms_norm_inputs() -> list[Any]:
    return [torch.randn(3, 16), torch.randn(16)]


def _rms_norm_check(match: Any) -> bool:
    # vllm_ir.rms_norm(x, None, eps) (no weight) and variance_size_override are not ours.
    x, w = match.kwargs.get("x"), match.kwargs.get("weight")
    if not isinstance(w, torch.fx.Node) or not isinstance(x, torch.fx.Node):
        return False
    node = match.nodes[-1] if match.nodes else None
    if node is not None and len(node.args) > 3 and node.args[3] is not None:
        return False
    xv, wv = x.meta.get("val"), w.meta.get("val")
    return xv is not None and wv is not None and wv.dim() == 1 and xv.shape[-1] == wv.shape[0]


# silu(x1) * x2 = x1 * sigmoid(x1) * x2; SiluAndMul.forward_native: x1, x2 = halves of x
def _silu_and_mul_pattern(x: torch.Tensor, half: int) -> torch.Tensor:
    return torch.nn.functional.silu(x[..., :half]) * x[..., half:]


def _silu_and_mul_replacement(x: torch.Tensor, half: int) -> torch.Tensor:
    return torch.ops.ascend_graph.silu_and_mul.default(x)


def _silu_and_mul_inputs() -> list[Any]:
    return [torch.randn(3, 2 * _HALF)]


def _silu_and_mul_check(match: Any) -> bool:
    x, half = match.kwargs.get("x"), match.kwargs.get("half")
    xv = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
    if xv is None or xv.dim() != 2 or not isinstance(half, int):
        return False
    return bool(xv.shape[-1] == 2 * half)


def _vllm_fusions() -> tuple[Fusion, ...]:
    rows = [
        Fusion("vllm_silu_and_mul", _silu_and_mul_pattern, _silu_and_mul_replacement, _silu_and_mul_inputs, _silu_and_mul_check, scalar_workaround={"half": _HALF}),
    ]
    if _has_vllm_ir():
        rows.insert(0, Fusion("vllm_rms_norm", _rms_norm_pattern, _rms_norm_replacement, _rms_norm_inputs, _rms_norm_check, scalar_workaround={"eps": _EPS}))
    return tuple(rows)


def _has_vllm_ir() -> bool:
    if "vllm" not in sys.modules:
        try:
            import vllm.ir  # noqa: F401  (registers torch.ops.vllm_ir)
        except ImportError:
            return False
    try:
        torch.ops.vllm_ir.rms_norm.default
    except (AttributeError, RuntimeError):
        return False
    return True


#: the vLLM op fusion rows (built once per process: rows are identity-keyed by the matcher cache)
VLLM_FUSIONS: tuple[Fusion, ...] = ()


def vllm_fusions() -> tuple[Fusion, ...]:
    global VLLM_FUSIONS
    if not VLLM_FUSIONS:
        VLLM_FUSIONS = _vllm_fusions()
    return VLLM_FUSIONS


def vllm_ops_pass(config: AscendConfig) -> GraphPass | None:
    """The pass over vLLM's own norm/activation ops (family ``norm_rope``, under that
    family's per-device policy); None when the family is off."""
    if "norm_rope" not in config.fusions:
        return None
    from ..passes.fusion.norm_rope import NormRopePass

    return NormRopePass(config, name="vllm_norm_rope", rows=vllm_fusions())


# --------------------------------------------------------------------------------------
# vLLM's opaque rotary op -> plain ATen, where inductor generates the code
# --------------------------------------------------------------------------------------
#
# vLLM picks its CustomOp implementations when it builds the model: with
# ``backend="inductor"`` its ``custom_ops`` default is "none" (native torch forms, which
# inductor fuses), with any other backend string "all". So under ``backend="ascend"``
# RotaryEmbedding runs ``_C.rotary_embedding``, an in-place C op inductor can only call:
# each layer pays an extern call, and the q/k norm before it can no longer share one loop
# with the rotation (seen in vLLM's CPU engine: 4 extern calls and 2 kernels a layer where
# vLLM's default compile has one). Where our codegen is inductor, this pass puts back what
# ``RotaryEmbedding.forward_static`` computes, so the graph inductor sees is the one
# vLLM's own default compile sees. Elsewhere (fx codegen, NPU) the op is left alone.

_ROPE_HEAD = 48  # sample head size: generalised by scalar_workaround (unique among the sample sizes)


def _rope_native(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, head_size: int, cos_sin_cache: torch.Tensor, is_neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``_C.rotary_embedding``'s result as new tensors (vLLM's ``forward_static``):
    rotary dim = the cache's last dim, cos/sin in the query's dtype."""
    positions = positions.flatten()
    cos, sin = cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)
    rot = cos_sin_cache.shape[-1]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(positions.shape[0], -1, head_size)
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        c, s_ = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
        if is_neox:
            x1, x2 = torch.chunk(x_rot, 2, dim=-1)
            x_rot = torch.cat((x1 * c - x2 * s_, x2 * c + x1 * s_), dim=-1)
        else:
            x1, x2 = x_rot[..., ::2], x_rot[..., 1::2]
            x_rot = torch.stack((x1 * c - x2 * s_, x2 * c + x1 * s_), dim=-1).flatten(-2)
        return torch.cat((x_rot, x_pass), dim=-1).reshape(shape)

    return rotate(query), rotate(key)


def _rope_rows_for(neox: bool) -> tuple[Callable[..., Any], Callable[..., Any]]:
    from torch._higher_order_ops.auto_functionalize import auto_functionalized

    def pattern(positions, query, key, head_size, cos_sin_cache):
        af = auto_functionalized(
            torch.ops._C.rotary_embedding.default, positions=positions, query=query, key=key,
            head_size=head_size, cos_sin_cache=cos_sin_cache, is_neox=neox, rope_dim_offset=0, inverse=False,
        )
        return af[1], af[2]

    def replacement(positions, query, key, head_size, cos_sin_cache):
        return _rope_native(positions, query, key, head_size, cos_sin_cache, neox)

    pattern.__name__ = replacement.__name__ = f"vllm_rope_{'neox' if neox else 'gptj'}"
    return pattern, replacement


def _rope_inputs() -> list[Any]:
    t, h = 5, _ROPE_HEAD
    return [torch.arange(t), torch.randn(t, 4 * h), torch.randn(t, 2 * h), torch.randn(64, h)]


def _rope_check(match: Any) -> bool:
    vals = {k: (v.meta.get("val") if isinstance(v, torch.fx.Node) else None) for k, v in match.kwargs.items()}
    q, k, cache, pos, hs = vals.get("query"), vals.get("key"), vals.get("cos_sin_cache"), vals.get("positions"), match.kwargs.get("head_size")
    if any(v is None for v in (q, k, cache, pos)) or not isinstance(hs, int) or hs <= 0:
        return False
    if not (q.is_floating_point() and k.dtype == q.dtype and cache.is_floating_point() and cache.dim() == 2):
        return False
    rot = cache.shape[-1]
    # what forward_static assumes: [T, heads*head_size] rows, an even rotary dim within the head
    return bool(q.shape[-1] % hs == 0 and k.shape[-1] % hs == 0 and rot % 2 == 0 and rot <= hs)


_ROPE_ROWS: tuple[Fusion, ...] = ()


def vllm_rope_rows() -> tuple[Fusion, ...]:
    """The two rows (NeoX and GPT-J style); () where vLLM's ``_C.rotary_embedding`` is not
    registered (no vLLM C extension loaded)."""
    global _ROPE_ROWS
    if not _ROPE_ROWS:
        try:
            torch.ops._C.rotary_embedding.default
        except (AttributeError, RuntimeError):
            return ()
        # retrace=False: the head size is a scalar of the op, not a size the re-trace may infer
        _ROPE_ROWS = tuple(
            Fusion(f"vllm_rope_native_{'neox' if neox else 'gptj'}", *_rope_rows_for(neox), _rope_inputs, _rope_check, scalar_workaround={"head_size": _ROPE_HEAD}, retrace=False)
            for neox in (True, False)
        )
    return _ROPE_ROWS


class VllmRopeNativePass(GraphPass):
    """``auto_functionalized(_C.rotary_embedding)`` -> plain ATen, only where our codegen
    is inductor (see above). Its rewrites count under ``stats()["passes"]``, not as a fusion."""

    name = "vllm_rope_native"
    family = None

    def __init__(self, config: AscendConfig) -> None:
        self.codegen = config.codegen
        self.explain_node = config.explain_node

    def __call__(self, graph: torch.fx.Graph) -> int:
        from ..passes.fusion.norm_rope import _graph_device, resolved_codegen
        from ..passes.pattern import PatternPass

        rows = vllm_rope_rows()
        if resolved_codegen(_graph_device(graph), self.codegen) != "inductor" or not rows:
            return 0
        return PatternPass(self.name, "norm_rope", rows, explain_node=self.explain_node)(graph)


def vllm_first_passes(config: AscendConfig) -> list[GraphPass]:
    """Passes that run before the fusion families (``build_pass_manager(first=...)``)."""
    return [VllmRopeNativePass(config)]


def vllm_ops_passes(config: AscendConfig) -> list[GraphPass]:
    """Every pass over vLLM's own ops that ``config.fusions`` turns on.

    ``vllm_attention`` (family ``attention``) and ``vllm_moe`` (family ``moe``) need
    vLLM's ``LayerName`` (torch >= 2.11) and live in ``vllm_ops``; ``vllm_norm_rope``
    (family ``norm_rope``) is above.
    """
    passes: list[GraphPass] = []
    if ("attention" in config.fusions or "moe" in config.fusions) and _has_vllm_layer_ops():
        from .vllm_ops import vllm_op_passes

        passes += vllm_op_passes(config)
    p = vllm_ops_pass(config)
    if p is not None:
        passes.append(p)
    return passes


def _has_vllm_layer_ops() -> bool:
    try:
        from vllm.utils.torch_utils import _USE_LAYERNAME
    except ImportError:
        return False
    return bool(_USE_LAYERNAME)


def vllm_pass_manager(config: AscendConfig) -> PassManager:
    """cleanup -> vLLM rotary op to ATen (inductor codegen) -> fusion families -> vLLM op
    fusions (attention, MoE, norm/act) -> padding -> cleanup."""
    return build_pass_manager(config, extra=vllm_ops_passes(config), first=vllm_first_passes(config))


def _versions() -> dict[str, str]:
    out = {"ascend_graph": __version__, "torch": torch.__version__}
    try:
        import vllm

        out["vllm"] = getattr(vllm, "__version__", "?")
    except ImportError:  # pragma: no cover
        pass
    npu = sys.modules.get("torch_npu")
    if npu is not None:
        out["torch_npu"] = getattr(npu, "__version__", "?")
    return out


def _hash(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


# --------------------------------------------------------------------------------------
# 2-4. Classes that subclass vLLM's (built lazily so this module imports without vLLM)
# --------------------------------------------------------------------------------------


def _build_compiler_cls() -> type:
    _require_vllm()
    from vllm.compilation.compiler_interface import CompilerInterface

    class AscendGraphCompiler(CompilerInterface):
        """vLLM ``CompilerInterface``: our passes and codegen on each piecewise graph.

        A platform names it: ``get_compile_backend() -> "ascend_graph.integrations.vllm.AscendGraphCompiler"``.
        ``compiler_config`` is vLLM's inductor config dict; the pass manager vLLM put in
        it under ``current_platform.pass_key`` is left to vLLM (under the default key
        inductor runs it; a platform with its own key, as vllm-ascend, runs it itself).
        Options come from :func:`options_from_vllm` (of the config given to
        ``compute_hash``, else the current one), with graphs off: vLLM's static graph
        wrapper captures the pieces.
        """

        name = "ascend_graph"

        def __init__(self, options: dict[str, Any] | None = None) -> None:
            self._options = dict(options or {})
            self.cache_dir: str | None = None
            self.disable_cache = False
            self.prefix = ""
            self._vllm_config: Any = None

        def config(self) -> AscendConfig:
            options = options_from_vllm(self._vllm_config)
            options["graphs"] = False
            options.update(self._options)
            return AscendConfig.from_options(options)

        def initialize_cache(self, cache_dir: str, disable_cache: bool = False, prefix: str = "") -> None:
            self.cache_dir, self.disable_cache, self.prefix = cache_dir, disable_cache, prefix

        def compute_hash(self, vllm_config: Any) -> str:
            self._vllm_config = vllm_config
            config = self.config()
            versions = ";".join(f"{k}={v}" for k, v in sorted(_versions().items()))
            return _hash(versions, config.compute_hash(), vllm_pass_manager(config).uuid())[:10]

        def compile(self, graph: torch.fx.GraphModule, example_inputs: list[Any], compiler_config: dict[str, Any], compile_range: Any, key: str | None = None) -> tuple[Callable[..., Any] | None, Any | None]:
            config = self.config()
            if compiler_config:
                inductor = {k: v for k, v in compiler_config.items() if _is_plain_inductor_key(k, v)}
                config = config.replace(inductor_config=tuple(sorted({**dict(config.inductor_config), **inductor}.items())))
            # hashed before compiling: the trace may recompile the graph module in place
            digest = self._digest(graph)
            compiled = _compile_with_vllm_passes(graph, example_inputs, config, wrap_runtime=False)
            return compiled, (key or f"ascend_graph_{compile_range.start}_{compile_range.end}", digest)

        def _digest(self, graph: torch.fx.GraphModule) -> str:
            config = self.config()
            return _hash(config.compute_hash(), vllm_pass_manager(config).uuid(), graph.graph.python_code("self").src)[:16]

        def load(self, handle: Any, graph: torch.fx.GraphModule, example_inputs: list[Any], graph_index: int, compile_range: Any) -> Callable[..., Any]:
            """Rebuild from the graph vLLM hands back; the handle's hash must still match.

            No artifact is stored on disk yet (the graph cache, ``ascend_graph/cache``,
            owns that): a load recompiles, and a handle from another pass set or config
            is refused, so vLLM compiles afresh.
            """
            key, digest = handle
            config = self.config()
            want = self._digest(graph)
            if digest != want:
                raise ValueError(f"ascend_graph handle {key!r} was built for another graph, pass set or config (expected {want}, got {digest})")
            compiled = _compile_with_vllm_passes(graph, example_inputs, config, wrap_runtime=False)
            return compiled

    return AscendGraphCompiler


# Inductor config keys that vLLM fills with objects (pass managers, ignore lists) are
# not ours to forward; plain scalar settings are.
def _is_plain_inductor_key(key: str, value: Any) -> bool:
    if key.endswith("_pass") or key.startswith("_") or key in ("post_grad_custom_post_pass", "pre_grad_custom_pass"):
        return False
    return isinstance(value, (bool, int, float, str)) or value is None


def _build_fusion_pass_cls() -> type:
    _require_vllm()
    from vllm.compilation.passes.inductor_pass import InductorPass

    class AscendFusionPass(InductorPass):
        """Our fusion families plus the vLLM op fusions, as a vLLM ``InductorPass``.

        ``CompilationConfig(inductor_passes={"post_grad_custom_post_pass": AscendFusionPass()})``:
        vLLM appends it to its ``PostGradPassManager`` and runs it on inductor's
        post-grad graph; ``uuid()`` covers every pass's source hash and the config hash.
        No cleanup passes: vLLM's manager runs its own after this one.
        """

        def __init__(self, options: dict[str, Any] | None = None) -> None:
            self.config = AscendConfig.from_options({**(options or {}), "cleanup": False})
            self.manager = vllm_pass_manager(self.config)

        def __call__(self, graph: torch.fx.Graph) -> None:
            gm = graph.owning_module
            if gm is None:
                raise TypeError("AscendFusionPass: the graph must belong to a GraphModule")
            self.manager(gm, "vllm_post_grad")

        def uuid(self) -> str:
            return _hash(self.config.compute_hash(), self.manager.uuid(), __version__)

    return AscendFusionPass


def _build_wrapper_cls() -> type:
    _require_vllm()
    from vllm.config import CUDAGraphMode
    from vllm.forward_context import get_forward_context, is_forward_context_available

    class AscendGraphWrapper:
        """A platform's static graph wrapper (``get_static_graph_wrapper_cls``).

        Same call contract as vLLM's ``CUDAGraphWrapper``: the runtime mode and batch
        descriptor come from vLLM's forward context and are trusted; mode NONE, or a mode
        other than this wrapper's, calls the runnable directly (so a FULL wrapper nests
        with PIECEWISE ones); otherwise the first call per descriptor captures (through
        ``ascend_graph.runtime.graphs``: CUDA graph, NPU graph, or NoGraph on the CPU)
        into the device's one pool (``runtime/pool.py``: the pool every ascend-graph
        runner of the process captures into too), and later calls replay. Like vLLM's,
        it owns no input buffers: vLLM keeps input addresses stable.

        Graph memory before the KV cache is sized: every wrapper registers itself where
        vLLM's ``profile_cudagraph_memory`` looks for graph wrappers
        (``CUDAGraphWrapper._all_instances``). vLLM then points each one's
        ``graph_pool`` at a throw-away pool, has the largest descriptors captured, reads
        the memory they took, calls :meth:`clear_graphs` and puts the pool back, so our
        graphs are in the estimate vLLM subtracts before sizing the KV cache.
        """

        def __init__(self, runnable: Callable[..., Any], vllm_config: Any, runtime_mode: Any, cudagraph_options: Any = None) -> None:
            if runtime_mode == CUDAGraphMode.NONE:
                raise ValueError("AscendGraphWrapper needs runtime_mode PIECEWISE or FULL, got NONE: do not wrap")
            from vllm.platforms import current_platform

            self.runnable = runnable
            self.vllm_config = vllm_config
            self.runtime_mode = runtime_mode
            self.cudagraph_options = cudagraph_options
            self.device = torch.device(current_platform.device_type)
            self._pool_override: Any = None  # set by vLLM's memory profiling (see above)
            self.entries: dict[Any, device_graphs.DeviceGraph] = {}
            self.uncapturable: set[Any] = set()  # descriptors whose capture raised CaptureError
            _register_with_vllm_profiler(self)

        @property
        def graph_pool(self) -> Any:
            """The pool captures go into: the device's shared pool (made on first use),
            or the one vLLM's memory profiling set. None without device graphs."""
            if self._pool_override is not None:
                return self._pool_override
            if not device_graphs.supports_graphs(self.device):
                return None
            from ..runtime.pool import device_pool

            pool = device_pool(self.device)
            return pool.handle if pool is not None else None

        @graph_pool.setter
        def graph_pool(self, pool: Any) -> None:
            self._pool_override = pool

        def __getattr__(self, key: str) -> Any:
            if key == "runnable":
                raise AttributeError(key)
            return getattr(self.runnable, key)

        def unwrap(self) -> Callable[..., Any]:
            runnable = self.runnable
            return runnable.unwrap() if hasattr(runnable, "unwrap") else runnable

        def clear_graphs(self) -> None:
            """Drop every captured graph (their pool memory goes back to the pool); vLLM
            calls this after profiling graph memory. Later calls capture again."""
            self.entries.clear()

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            if not is_forward_context_available():
                return self.runnable(*args, **kwargs)
            ctx = get_forward_context()
            mode, descriptor = ctx.cudagraph_runtime_mode, ctx.batch_descriptor
            if mode == CUDAGraphMode.NONE or mode != self.runtime_mode:
                return self.runnable(*args, **kwargs)
            if descriptor is None:
                raise ValueError(f"forward context has runtime mode {mode.name} but no batch_descriptor")
            if descriptor in self.uncapturable:
                return self.runnable(*args, **kwargs)
            graph = self.entries.get(descriptor)
            if graph is not None:
                _stats.record_replay()
                return graph.replay()
            from vllm.compilation.monitor import validate_cudagraph_capturing_enabled

            validate_cudagraph_capturing_enabled()
            graph = device_graphs.new_graph(self.device)
            import time

            start = time.perf_counter()
            try:
                with device_graphs.capture_guard(self.device):
                    output = graph.capture(lambda: self.runnable(*args, **kwargs), pool=self.graph_pool)
            except CaptureError as e:
                # an NPU binding that cannot record this shape (runtime/npu_updates.py), as the
                # runner does: counted, and this descriptor runs without a graph from now on
                name = f"vllm:{self.runtime_mode.name}:{descriptor}"
                log.warning("capture of %s failed (%s); it runs without a graph", name, e)
                _stats.record_capture_failure(name, f"{type(e).__name__}: {e}"[:200])
                self.uncapturable.add(descriptor)
                return self.runnable(*args, **kwargs)
            _stats.record_capture(f"vllm:{self.runtime_mode.name}:{descriptor}", time.perf_counter() - start, device_graphs.pool_reserved_bytes(self.device))
            self.entries[descriptor] = graph
            return output

    return AscendGraphWrapper


def _register_with_vllm_profiler(wrapper: Any) -> None:
    """Add ``wrapper`` to the set vLLM's graph-memory profiling walks (a WeakSet of
    ``CUDAGraphWrapper``; vLLM reads and sets ``graph_pool`` and calls ``clear_graphs``)."""
    try:
        from vllm.compilation.cuda_graph import CUDAGraphWrapper
    except ImportError:  # pragma: no cover - a vLLM without it has no such profiling
        return
    instances = getattr(CUDAGraphWrapper, "_all_instances", None)
    if instances is not None:
        instances.add(wrapper)


_LAZY = {
    "AscendGraphCompiler": _build_compiler_cls,
    "AscendFusionPass": _build_fusion_pass_cls,
    "AscendGraphWrapper": _build_wrapper_cls,
}


def __getattr__(name: str) -> Any:
    # PEP 562: the vLLM-subclassing classes are built (and vLLM imported) on first use.
    builder = _LAZY.get(name)
    if builder is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    cls = builder()
    cls.__module__ = __name__
    cls.__qualname__ = name
    globals()[name] = cls
    return cls
