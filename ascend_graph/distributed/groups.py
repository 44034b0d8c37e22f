"""One refcounted registry of torch.distributed communication groups.

Entry points: :func:`acquire` / :func:`release` (or the :func:`group` context manager) on
the process-wide :func:`registry`, and :func:`resolve`, which turns the group *name* a
fused op carries (``moe_dispatch_ffn_combine(..., ep_group=name)``) back into the group.

Why a registry: every communicator costs device memory and setup time (an NCCL/HCCL
communicator holds its own buffers). EP MoE layers, TP collectives and graph capture
each asking ``new_group`` for the same ranks would build one communicator per asker;
vllm-ascend measured that sharing HCCL groups through a refcounted registry cuts them.
Here one group exists per key ``(ranks, backend, options)``: a second request gets the
same group, the last :func:`release` destroys it; ``ascend_graph.stats()["groups"]``
counts ``created``, ``reused`` and ``destroyed``.

Invariants (torch.distributed's own, which the registry keeps rather than hides):

- ``new_group`` and ``destroy_process_group`` are collective over the *default* group:
  every rank of the world must acquire and release the same keys in the same order,
  members of the group or not (a non-member gets ``GroupMember.NON_GROUP_MEMBER`` and
  still holds a reference). Refcounts are per process, so ranks that acquire in step
  create and destroy in step.
- The default group is never created or destroyed here: call
  ``torch.distributed.init_process_group`` first (the registry raises a typed error
  otherwise).
- Only torch.distributed is used (gloo, NCCL, HCCL); there is no transport of our own.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch.distributed as dist

from .._stats import record_group
from ..errors import AscendGraphError

__all__ = ["DistributedError", "GroupRegistry", "registry", "acquire", "release", "group", "resolve"]

log = logging.getLogger("ascend_graph.distributed.groups")


class DistributedError(AscendGraphError, RuntimeError):
    """A collective failed, timed out, or its ranks disagree (sizes, world, a dead peer)."""


def _freeze(value: Any) -> Any:
    # options become part of a hashable key; an unhashable value (a ProcessGroup options
    # object) is keyed by identity, so passing the same object again reuses the group
    if isinstance(value, datetime.timedelta):
        return ("timedelta", value.total_seconds())
    try:
        hash(value)
        return value
    except TypeError:
        return ("id", id(value))


def group_key(ranks: Optional[Sequence[int]], backend: Optional[str], options: Mapping[str, Any]) -> tuple:
    """The registry key: sorted ranks (all ranks when None), backend, frozen options."""
    world = dist.get_world_size()
    ranks_key = tuple(range(world)) if ranks is None else tuple(sorted(int(r) for r in ranks))
    if len(set(ranks_key)) != len(ranks_key) or any(not 0 <= r < world for r in ranks_key):
        raise DistributedError("group ranks must be distinct ranks of the world", expected=f"ranks in [0, {world})", got=list(ranks or ()))
    return (ranks_key, backend, tuple(sorted((k, _freeze(v)) for k, v in options.items())))


@dataclass
class _Entry:
    group: Any
    refs: int = 1
    keys: list = field(default_factory=list)


class GroupRegistry:
    """Refcounted groups keyed by ``(ranks, backend, options)``; see the module docstring."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_key: dict[tuple, _Entry] = {}

    def acquire(self, ranks: Optional[Sequence[int]] = None, backend: Optional[str] = None, **options: Any):
        """The group of these ranks (all when None) and backend, created on first request.

        ``options`` are passed to ``torch.distributed.new_group`` (``timeout``,
        ``pg_options``, ``group_desc``, ...) and are part of the key. Collective on first
        request (every rank of the world must call it).
        """
        if not dist.is_available() or not dist.is_initialized():
            raise DistributedError("the group registry needs torch.distributed initialised", expected="init_process_group() called first", got="no default process group")
        key = group_key(ranks, backend, options)
        with self._lock:
            entry = self._by_key.get(key)
            if entry is not None:
                entry.refs += 1
                record_group("reused")
                return entry.group
            pg = dist.new_group(ranks=list(key[0]), backend=backend, **options)
            self._by_key[key] = _Entry(pg)
            record_group("created")
            log.debug("created group %s (backend %s)", key[0], backend)
            return pg

    def release(self, pg) -> int:
        """Drop one reference to ``pg``; the last one destroys it. Returns the references left."""
        with self._lock:
            for key, entry in self._by_key.items():
                if entry.group is pg:
                    entry.refs -= 1
                    if entry.refs:
                        return entry.refs
                    del self._by_key[key]
                    break
            else:
                raise DistributedError("release of a group the registry does not hold", expected="a group from acquire()", got=repr(pg))
        if pg is not dist.GroupMember.NON_GROUP_MEMBER:
            dist.destroy_process_group(pg)
        record_group("destroyed")
        return 0

    def refs(self, pg) -> int:
        """References held on ``pg`` (0 when the registry does not hold it)."""
        with self._lock:
            return next((e.refs for e in self._by_key.values() if e.group is pg), 0)

    def by_name(self, name: str):
        """The held group whose c10d ``group_name`` is ``name``, or None."""
        with self._lock:
            for entry in self._by_key.values():
                pg = entry.group
                if pg is not dist.GroupMember.NON_GROUP_MEMBER and pg.group_name == name:
                    return pg
        return None

    def clear(self) -> None:
        """Destroy every held group (at shutdown; collective like ``release``)."""
        with self._lock:
            entries = list(self._by_key.values())
            self._by_key.clear()
        for entry in entries:
            if entry.group is not dist.GroupMember.NON_GROUP_MEMBER:
                dist.destroy_process_group(entry.group)
            record_group("destroyed")


_registry = GroupRegistry()


def registry() -> GroupRegistry:
    """The process-wide registry (one per process, as torch.distributed's groups are)."""
    return _registry


def acquire(ranks: Optional[Sequence[int]] = None, backend: Optional[str] = None, **options: Any):
    return _registry.acquire(ranks, backend, **options)


def release(pg) -> int:
    return _registry.release(pg)


@contextlib.contextmanager
def group(ranks: Optional[Sequence[int]] = None, backend: Optional[str] = None, **options: Any) -> Iterator[Any]:
    """``with group(ranks) as pg:`` acquire on entry, release on exit."""
    pg = _registry.acquire(ranks, backend, **options)
    try:
        yield pg
    finally:
        _registry.release(pg)


def resolve(name: str):
    """The process group a fused op names: the registry's first, then c10d's by name.

    ``""`` and ``"WORLD"`` mean the default group. Raises :class:`DistributedError` when
    no group of that name exists in this process.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise DistributedError("expert/tensor parallel ops need torch.distributed initialised", expected="init_process_group() called first", got="no default process group")
    if name in ("", "WORLD"):
        return dist.group.WORLD
    pg = _registry.by_name(name)
    if pg is not None:
        return pg
    try:
        return dist.distributed_c10d._resolve_process_group(name)
    except (RuntimeError, ValueError, KeyError) as e:
        raise DistributedError("no process group of that name in this process", expected="a group name from acquire(...).group_name", got=repr(name), hint=str(e)) from None
