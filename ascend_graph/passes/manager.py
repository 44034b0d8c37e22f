"""The pass manager: an explicit, ordered list of passes built from ``AscendConfig``.

Order (DESIGN.md): cleanup -> fusion families (in ``FUSION_FAMILIES`` order) ->
padding -> cleanup. Each pass is timed; its rewrite count goes to ``stats()``
(``fusions[family]`` for fusion passes); with ``dump_dir`` the graph code before and
after each pass is written as ``{graph_id}.{index:02d}.{pass}.{before|after}.py``; with
``debug`` the graph is linted after each pass.

A fusion pass that raises does not fail the compile: the graph is put back as it was
before that pass, the failure is counted in ``stats()["pass_failures"]`` (pass name ->
count and last error) and the remaining passes run (with ``debug`` the error is raised
instead). Left to propagate, the error reached Dynamo, which turns a backend error into
a graph break and a run of smaller graphs (seen: GptOss under ``dynamic=True`` split into
12 graphs whose outputs were wrong).

Each run leaves ``last_records`` (name, family, rewrites, seconds per pass). The graph
cache stores them with an entry; a hit that loads the compiled graph without running
the passes hands them to :meth:`PassManager.restore`, so ``stats()`` counts the same
rewrites (``fusions``, ``passes[name]["rewrites"]`` and ``runs``) as a build would,
with 0 s of pass time: the passes did not run in this process (the build's own pass
times stay in the entry's manifest).

Fusion families live in ``passes/fusion/<family>.py``; each exposes
``make_pass(config) -> GraphPass | None`` (None where the family has nothing to do under
this config). The table below is the only place a family is named.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch.fx

from .. import _stats
from ..config import AscendConfig
from ..errors import CaptureError
from .base import GraphPass
from .cleanup import DeadCodeElimination, NoOpElimination

__all__ = ["PassManager", "build_pass_manager", "FAMILY_MODULES"]

log = logging.getLogger("ascend_graph.passes")

#: family name -> module defining ``make_pass(config)``.
FAMILY_MODULES: dict[str, str] = {
    "attention": "ascend_graph.passes.fusion.attention",
    "causal_conv1d": "ascend_graph.passes.fusion.causal_conv",
    "gated_delta_rule": "ascend_graph.passes.fusion.gated_delta",
    "moe": "ascend_graph.passes.fusion.moe",
    "norm_rope": "ascend_graph.passes.fusion.norm_rope",
}


def graph_ops(graph: torch.fx.Graph) -> dict[str, int]:
    """How many calls of each ``ascend_graph::`` op the graph holds (what the fusions left:
    a family's rewrite count alone cannot tell a fused router from fused experts)."""
    out: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "call_function" and getattr(n.target, "namespace", None) == "ascend_graph":
            name = n.target._schema.name.split("::", 1)[-1]
            out[name] = out.get(name, 0) + 1
    return out


@dataclass
class PassManager:
    """Runs ``passes`` in order over a GraphModule."""

    passes: Sequence[GraphPass]
    dump_dir: str | None = None
    debug: bool = False
    last_counts: dict[str, int] = field(default_factory=dict)
    last_records: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, gm: torch.fx.GraphModule, graph_id: str = "graph") -> dict[str, int]:
        counts: dict[str, int] = {}
        records: list[dict[str, Any]] = []
        for index, p in enumerate(self.passes):
            if self.dump_dir:
                self._dump(gm, graph_id, index, p.name, "before")
            start = time.perf_counter()
            n = self._run_contained(p, gm)
            seconds = time.perf_counter() - start
            counts[p.name] = counts.get(p.name, 0) + n
            records.append({"name": p.name, "family": p.family, "rewrites": n, "seconds": round(seconds, 6)})
            _stats.record_pass(p.name, p.family, n, seconds)
            if n:
                gm.recompile()
            log.debug("pass %s: %d rewrites in %.3f s", p.name, n, seconds)
            if self.debug:
                try:
                    gm.graph.lint()
                except Exception as e:  # lint raises RuntimeError with a fix-it message
                    raise CaptureError(f"graph is invalid after pass {p.name!r}", expected="a graph that passes graph.lint()", got=str(e)) from e
            if self.dump_dir:
                self._dump(gm, graph_id, index, p.name, "after")
        self.last_counts = counts
        self.last_records = records
        _stats.record_graph_ops(graph_ops(gm.graph))
        return counts

    def _run_contained(self, p: GraphPass, gm: torch.fx.GraphModule) -> int:
        """Run ``p``; a fusion pass that raises leaves the graph as it found it (see above)."""
        if self.debug or p.family is None or p.family == "padding":
            return int(p(gm.graph))
        saved = copy.deepcopy(gm.graph)  # nodes and meta dicts copied; meta values shared
        try:
            return int(p(gm.graph))
        except Exception as e:
            reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
            log.warning("fusion pass %s raised (%s); the graph is left as it was before the pass", p.name, reason)
            _stats.record_pass_failure(p.name, reason)
            gm.graph = saved
            gm.recompile()
            return 0

    def restore(self, records: Sequence[Mapping[str, Any]]) -> dict[str, int]:
        """Count a stored run's rewrites in ``stats()`` without running the passes (0 s each)."""
        counts: dict[str, int] = {}
        for r in records:
            name, n = str(r["name"]), int(r["rewrites"])
            counts[name] = counts.get(name, 0) + n
            _stats.record_pass(name, r.get("family"), n, 0.0)
        self.last_counts = counts
        self.last_records = [dict(r) for r in records]
        return counts

    def _dump(self, gm: torch.fx.GraphModule, graph_id: str, index: int, name: str, when: str) -> None:
        os.makedirs(self.dump_dir, exist_ok=True)
        path = os.path.join(self.dump_dir, f"{graph_id}.{index:02d}.{name}.{when}.py")
        with open(path, "w") as f:
            f.write(gm.graph.python_code(root_module="self").src)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.passes]

    def uuid(self) -> str:
        """Hash of every pass's uuid, in order: part of the cache key."""
        h = hashlib.sha256()
        for p in self.passes:
            h.update(f"{p.name}:{p.uuid()};".encode())
        return h.hexdigest()[:16]


def fusion_passes(config: AscendConfig) -> list[GraphPass]:
    out: list[GraphPass] = []
    for family in config.fusions:
        module_name = FAMILY_MODULES[family]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:
                log.debug("fusion family %s is not built yet; skipped", family)
                continue
            raise
        p = module.make_pass(config)
        if p is not None:
            out.append(p)
    return out


def build_pass_manager(config: AscendConfig, extra: Sequence[GraphPass] = (), first: Sequence[GraphPass] = ()) -> PassManager:
    """The ordered list: cleanup -> ``first`` -> fusion -> ``extra`` -> padding -> cleanup.

    ``first``: an adapter's passes that put its host's ops into forms the families see
    (e.g. vLLM's opaque rotary op into plain ATen for inductor).
    """
    passes: list[GraphPass] = []
    if config.cleanup:
        passes += [NoOpElimination(), DeadCodeElimination()]
    passes += list(first)
    passes += fusion_passes(config)
    passes += list(extra)
    passes += [p for p in [importlib.import_module("ascend_graph.passes.padding").make_pass(config)] if p is not None]
    if config.cleanup:
        passes += [NoOpElimination(), DeadCodeElimination()]
    return PassManager(passes=passes, dump_dir=config.dump_dir, debug=config.debug)
