"""Torch's AOTAutograd cache, so that a verified hit loads the compiled graph instead of building it.

Entry points: :func:`serializable` (wraps the backend's forward compiler), :func:`keyed`
(the context a build or a load runs in) and :class:`AOTCounters`. This is the one
module that touches torch's AOTAutograd-cache internals (the way ``store.py`` is the
one that touches ``CacheArtifactManager``).

How a hit skips the AOT trace, our passes and inductor:

- A build of the inductor codegen runs ``aot_module_simplified`` with the backend's
  forward compiler wrapped in ``SerializableAOTDispatchCompiler`` (the marker inductor's
  own ``compile_fx`` uses). AOTAutograd then computes its cache key from the Dynamo
  graph, misses, traces, calls our compiler (passes, then ``compile_fx_inner``) and
  saves an ``aot_autograd`` entry: the runtime wrappers' metadata plus the key of the
  inductor FX-graph entry. Both are recorded as torch cache artifacts, which the graph
  cache stores with the entry (``torch_artifacts.bin``).
- A verified hit hot-loads those artifacts and runs the same call: AOTAutograd finds
  its entry and rebuilds the callable from it (``wrap_post_compile``) without tracing
  and without calling our compiler.

Why a tag: AOTAutograd's key covers the Dynamo graph, the inputs and torch's configs,
but not our passes, which run inside our compiler. Every build and load therefore runs
under ``torch.compiler.config.cache_key_tag`` (torch's documented knob for "tags to be
included in the cache key ... for all torch compile caching") set to
``ascend-graph:<our key digest>:<build nonce>``. The digest puts our key (pass uuids,
config, versions, device) into torch's keys, so an ``aot_autograd`` entry in the user's
inductor cache can never be loaded for another pass source or config. The nonce, new
for every build and stored in the manifest, makes torch miss on every build, so our
compiler always runs when we build (the manifest needs what it reports: mutated
inputs, rewrite counts, the post-pass graph); a load uses the manifest's tag and finds
exactly the entry that build saved.

Invariant: the load is an optimisation with a fallback. When torch cannot cache a
graph (it *bypasses* its cache, say for a Dynamo graph with a non-allowlisted call) or
cannot find the entry, AOTAutograd builds as before, our compiler runs, and the graph
cache compares the post-pass graph with the stored one.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

__all__ = ["supported", "new_tag", "keyed", "serializable", "AOTCounters", "TAG_PREFIX"]

log = logging.getLogger("ascend_graph.cache")

TAG_PREFIX = "ascend-graph"


def _schemas() -> Any:
    try:
        from torch._functorch._aot_autograd import schemas
    except ImportError:  # pragma: no cover - torch < 2.6
        return None
    return schemas if hasattr(schemas, "SerializableAOTDispatchCompiler") else None


def supported() -> str | None:
    """``None`` when a hit can load through AOTAutograd's cache here, else the reason it cannot."""
    if _schemas() is None:
        return "this torch has no SerializableAOTDispatchCompiler"
    if not hasattr(torch.compiler.config, "cache_key_tag"):
        return "this torch has no torch.compiler.config.cache_key_tag"
    from torch._functorch._aot_autograd.autograd_cache import should_use_local_autograd_cache
    from torch._inductor import config as inductor_config

    if not should_use_local_autograd_cache():
        return "torch's AOTAutograd cache is off (TORCHINDUCTOR_AUTOGRAD_CACHE=0 or force_disable_caches)"
    if not inductor_config.fx_graph_cache:
        return "inductor's FX graph cache is off (TORCHINDUCTOR_FX_GRAPH_CACHE=0)"
    return None


def new_tag(digest: str) -> str:
    """The tag of a new build of entry ``digest`` (see the module docstring)."""
    return f"{TAG_PREFIX}:{digest}:{uuid.uuid4().hex[:16]}"


@contextlib.contextmanager
def keyed(tag: str) -> Iterator[None]:
    """Run a build or a load with ``tag`` appended to torch's ``cache_key_tag``."""
    base = torch.compiler.config.cache_key_tag
    with torch.compiler.config.patch(cache_key_tag=f"{base}|{tag}" if base else tag):
        yield


def serializable(fw_compiler: Callable[..., Any]) -> Callable[..., Any]:
    """``fw_compiler`` marked as returning inductor ``OutputCode``: AOTAutograd may cache its result."""
    from torch._inductor.output_code import OutputCode

    return _schemas().SerializableAOTDispatchCompiler(OutputCode, fw_compiler)


@dataclass
class AOTCounters:
    """What AOTAutograd's cache did during a block (deltas of ``counters["aot_autograd"]``)."""

    hit: int = 0
    miss: int = 0
    bypass: int = 0
    saved: int = 0

    _NAMES = {"hit": "autograd_cache_hit", "miss": "autograd_cache_miss", "bypass": "autograd_cache_bypass", "saved": "autograd_cache_saved"}

    @classmethod
    @contextlib.contextmanager
    def during(cls) -> Iterator["AOTCounters"]:
        from torch._dynamo.utils import counters

        before = {k: counters["aot_autograd"][v] for k, v in cls._NAMES.items()}
        out = cls()
        try:
            yield out
        finally:
            for k, v in cls._NAMES.items():
                setattr(out, k, counters["aot_autograd"][v] - before[k])

    def describe(self) -> str:
        return ", ".join(f"{k} {getattr(self, k)}" for k in self._NAMES if getattr(self, k)) or "not consulted"
