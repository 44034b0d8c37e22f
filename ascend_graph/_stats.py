"""Process-wide counters behind ``ascend_graph.stats()``.

Counters are cumulative since ``reset_stats()`` (like ``torch._dynamo.utils.counters``).
Everything that updates them goes through :func:`record_*` here, so the keys are defined
in one place; README.md documents them.
"""

from __future__ import annotations

import copy
import threading
from typing import Any

from .config import FUSION_FAMILIES

_lock = threading.Lock()


def _fresh() -> dict[str, Any]:
    return {
        "graphs_compiled": 0,
        "compile_seconds": 0.0,
        "fusions": {family: 0 for family in FUSION_FAMILIES},
        "passes": {},
        "skipped": {},
        "padding": {"rewrites": 0, "calls": 0, "real_rows": 0, "padded_rows": 0, "padded_ratio": 0.0},
        "buckets_captured": 0,
        "capture_seconds": 0.0,
        "buckets": {},
        "replays": 0,
        "eager_fallbacks": 0,
        "fallback_reasons": {},
        "capture_failures": 0,
        "pass_failures": {},
        "graph_ops": {},
        "cache": {"hits": 0, "misses": 0, "corrupt": 0, "mismatches": 0, "errors": 0, "read_only": 0, "rebuilds": {}, "load_seconds": 0.0},
        "precompiled": {"built": 0, "loaded": 0},
        "groups": {"created": 0, "reused": 0, "destroyed": 0},
    }


_state: dict[str, Any] = _fresh()


def stats() -> dict[str, Any]:
    """A snapshot (deep copy) of the counters; see README.md "Stats" for the keys."""
    with _lock:
        snap = copy.deepcopy(_state)
    pad = snap["padding"]
    total = pad["real_rows"] + pad["padded_rows"]
    pad["padded_ratio"] = (pad["padded_rows"] / total) if total else 0.0
    # a fact of the process, not a counter: reset_stats() does not clear it
    from .capture.torch_fixes import applied

    snap["torch_fixes"] = applied()
    return snap


def reset_stats() -> None:
    global _state
    with _lock:
        _state = _fresh()


def record_compile(seconds: float) -> None:
    with _lock:
        _state["graphs_compiled"] += 1
        _state["compile_seconds"] += seconds


def record_pass(name: str, family: str | None, rewrites: int, seconds: float) -> None:
    with _lock:
        entry = _state["passes"].setdefault(name, {"rewrites": 0, "seconds": 0.0, "runs": 0})
        entry["rewrites"] += rewrites
        entry["seconds"] += seconds
        entry["runs"] += 1
        if family == "padding":
            _state["padding"]["rewrites"] += rewrites
        elif family is not None:
            _state["fusions"][family] = _state["fusions"].get(family, 0) + rewrites


def record_skip(family: str, reason: str) -> None:
    """A fusion family left a graph alone on purpose (e.g. slower than what it replaces there)."""
    with _lock:
        reasons = _state["skipped"].setdefault(family, {})
        reasons[reason] = reasons.get(reason, 0) + 1


def record_padding(real_rows: int, padded_rows: int) -> None:
    with _lock:
        pad = _state["padding"]
        pad["calls"] += 1
        pad["real_rows"] += real_rows
        pad["padded_rows"] += padded_rows


def record_capture(key: str, seconds: float, pool_bytes: int) -> None:
    with _lock:
        _state["buckets_captured"] += 1
        _state["capture_seconds"] += seconds
        _state["buckets"][key] = {"capture_seconds": seconds, "pool_bytes": pool_bytes}


def record_capture_failure(key: str, reason: str) -> None:
    with _lock:
        _state["capture_failures"] += 1
        _state["buckets"][key] = {"failed": reason}


def record_graph_ops(counts: dict[str, int]) -> None:
    """Our ops in a graph after all passes ran (per op name, summed over graphs)."""
    with _lock:
        ops = _state["graph_ops"]
        for name, n in counts.items():
            ops[name] = ops.get(name, 0) + n


def record_pass_failure(name: str, reason: str) -> None:
    """A fusion pass raised: its graph was put back as it was before the pass."""
    with _lock:
        entry = _state["pass_failures"].setdefault(name, {"count": 0, "last": ""})
        entry["count"] += 1
        entry["last"] = reason


def record_replay(n: int = 1) -> None:
    with _lock:
        _state["replays"] += n


def record_fallback(reason: str) -> None:
    with _lock:
        _state["eager_fallbacks"] += 1
        reasons = _state["fallback_reasons"]
        reasons[reason] = reasons.get(reason, 0) + 1


def record_cache(status: str, changed: tuple[str, ...] = (), load_seconds: float = 0.0, *, read_only: bool = False) -> None:
    """One cache lookup: hit, miss, corrupt, mismatch or error; ``changed`` names the key
    factors that differ on a miss ("new" for a graph with no entry); ``read_only``: its
    build was not stored because the cache is read-only."""
    key = {"hit": "hits", "miss": "misses", "corrupt": "corrupt", "mismatch": "mismatches", "error": "errors"}[status]
    with _lock:
        c = _state["cache"]
        c[key] += 1
        c["read_only"] += int(read_only)
        c["load_seconds"] += load_seconds
        for name in changed:
            c["rebuilds"][name] = c["rebuilds"].get(name, 0) + 1


def record_precompiled(event: str) -> None:
    """A graph built under torch's AOT precompile (``built``) or loaded from its artifact (``loaded``)."""
    with _lock:
        _state["precompiled"][event] += 1


def record_group(event: str) -> None:
    """One communication-group registry event: created, reused or destroyed."""
    with _lock:
        _state["groups"][event] += 1


__all__ = ["stats", "reset_stats"]
