"""What the backend returns under torch's AOT precompile, so the compiled graph can be saved and loaded.

Entry points: :func:`requested` (is this compile an AOT precompile?) and
:class:`PrecompiledGraph` (the ``SerializableCallable`` the backend returns then).

torch's ``aot_compile`` (``torch.compile(...).aot_compile(...)``, and vLLM 0.32's default
``VLLM_USE_AOT_COMPILE=1`` on torch >= 2.10) calls the backend under
``torch._functorch.config`` patches (``bundled_autograd_cache``,
``bypass_autograd_cache_key``, ``force_autograd_cache``) and refuses any result that
is not a ``torch._dynamo.aot_compile_types.SerializableCallable``: it saves
``(type(fn).deserialize_compile_artifacts, type(fn).serialize_compile_artifacts(fn))``
and calls the first on the second at load.

How ours is built: with inductor codegen, the AOT trace runs with the forward compiler
marked serializable (``cache.aot.serializable``, the marker inductor's own
``compile_fx`` uses) under a cache-key tag holding our pass uuids and config hash plus a
nonce, so AOTAutograd returns a *bundled* entry: the runtime wrappers and inductor's
output code in one blob, no lookups in a local cache. Our part of the artifact is what
the bucketed runner needs besides the compiled function: the config, the shape analysis
(sympy expressions of the batch symbol), the device, the mutated inputs and the rewrite
counts. A load rebuilds the compiled function from the blob (no trace, no passes, no
inductor) and wraps it in a new runner; device graphs are captured again at first use,
as on every start.

Invariants: a blob from another ascend-graph version is refused with a
:class:`~ascend_graph.errors.CacheError` (torch's loader reports it and the caller, e.g.
vLLM, compiles afresh). The FX codegen (NPU) and TorchAir have no serializable output
code: an AOT precompile with them is an :class:`~ascend_graph.errors.UnsupportedError`
naming the setting to change.
"""

from __future__ import annotations

import importlib
import logging
import pickle
from typing import Any, Callable

import torch

from . import _stats
from ._version import __version__
from .errors import CacheError, UnsupportedError

__all__ = ["requested", "check_codegen", "PrecompiledGraph"]

log = logging.getLogger("ascend_graph.precompile")

_FORMAT = 1

try:  # torch >= 2.10
    from torch._dynamo.aot_compile_types import BundledAOTAutogradSerializableCallable, SerializableCallable
except ImportError:  # pragma: no cover - older torch has no AOT precompile
    SerializableCallable = object  # type: ignore[assignment,misc]
    BundledAOTAutogradSerializableCallable = None  # type: ignore[assignment]


def requested() -> bool:
    """True while torch's ``aot_compile`` runs the backend (its functorch config patches are on)."""
    if BundledAOTAutogradSerializableCallable is None:
        return False
    cfg = torch._functorch.config
    return bool(getattr(cfg, "bundled_autograd_cache", False) and getattr(cfg, "bypass_autograd_cache_key", False))


def check_codegen(codegen: str) -> None:
    """An AOT precompile needs serializable output code: inductor's."""
    if codegen != "inductor":
        raise UnsupportedError(
            f"torch's AOT precompile cannot save a graph compiled with codegen={codegen!r}",
            expected="codegen='inductor' (CPU/CUDA), or AOT precompile off (vLLM: VLLM_USE_AOT_COMPILE=0)",
            got=f"codegen={codegen!r} under aot_compile",
        )


class PrecompiledGraph(SerializableCallable):  # type: ignore[misc,valid-type]
    """The bucketed runner of one compiled graph, savable by torch's AOT precompile.

    ``compiled`` is AOTAutograd's bundled result (it has ``serialize()``); ``state`` is the
    picklable part of the compile context (:meth:`ascend_graph.backend.CompileContext.state`).
    """

    def __init__(self, compiled: Any, state: dict[str, Any], runner: Callable[..., Any]) -> None:
        self.compiled = compiled
        self.state = state
        self.runner = runner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.runner(*args, **kwargs)

    # No attribute forwarding: torch wraps any result with a ``serialize`` attribute in
    # its own bundled callable, which would drop this class (and finalize_loading) at load.

    @classmethod
    def serialize_compile_artifacts(cls, fn: "PrecompiledGraph") -> bytes:
        inner = BundledAOTAutogradSerializableCallable.serialize_compile_artifacts(BundledAOTAutogradSerializableCallable(fn.compiled))
        return pickle.dumps({"format": _FORMAT, "ascend_graph": __version__, "torch": torch.__version__, "compiled": inner, "state": fn.state})

    @classmethod
    def deserialize_compile_artifacts(cls, data: bytes) -> "PrecompiledGraph":
        blob = pickle.loads(data)
        want = {"format": _FORMAT, "ascend_graph": __version__, "torch": torch.__version__}
        got = {k: blob.get(k) for k in want} if isinstance(blob, dict) else {"type": type(blob).__name__}
        if got != want:
            raise CacheError("a precompiled ascend-graph artifact from another version", expected=want, got=got)
        for module in blob["state"]["op_modules"]:  # the output code calls these ops by name
            importlib.import_module(module)
        compiled = BundledAOTAutogradSerializableCallable.deserialize_compile_artifacts(blob["compiled"])
        from .backend import CompileContext
        from .runtime.runner import make_runner

        ctx = CompileContext.from_state(blob["state"])
        for record in ctx.pass_records:  # counted as the build counted them (0 s: nothing ran)
            _stats.record_pass(record["name"], record.get("family"), int(record["rewrites"]), 0.0)
        _stats.record_precompiled("loaded")
        log.info("loaded precompiled graph %s (rewrites %s)", ctx.graph_id, {k: v for k, v in ctx.pass_counts.items() if v})
        return cls(compiled, blob["state"], make_runner(compiled, ctx) if ctx.wrap_runtime else compiled)

    def finalize_loading(self, vllm_config: Any = None) -> None:
        """vLLM calls this on a loaded function; nothing is left to do (graphs are captured at first use)."""
