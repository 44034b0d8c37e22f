"""The face every pass has: ``__call__(graph) -> int``, a stable ``name``, ``uuid()``.

``uuid()`` hashes the pass's source (the class's module and anything listed in
``uuid_sources``), so a graph cache built with an older version of a pass is not reused.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
import re
import sys
from typing import Any, Iterable

import torch.fx

__all__ = ["GraphPass", "source_hash"]


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _stable_source(obj: Any) -> str:
    """Source text of ``obj``; for partials, their function's source and arguments.

    Never a bare ``repr``: it holds memory addresses, which would change the hash in
    every process and make every graph-cache lookup miss.
    """
    if isinstance(obj, functools.partial):
        args = repr(obj.args) + repr(sorted(obj.keywords.items()))
        return _stable_source(obj.func) + _ADDRESS.sub("", args)
    try:
        return _getsource(obj)
    except (OSError, TypeError):
        name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
        return f"{getattr(obj, '__module__', type(obj).__module__)}.{name}:" + _ADDRESS.sub("", repr(obj))


#: (file, mtime, size, kind, name) -> source. Every compile hashes every pass's module
#: (a cache key factor); reading and tokenizing them again cost ~0.15 s a graph.
_SOURCES: dict[tuple[Any, ...], str] = {}


def _getsource(obj: Any) -> str:
    """``inspect.getsource``, memoised for as long as the file's mtime and size stay the same."""
    file = inspect.getsourcefile(obj)
    if file is None:
        return inspect.getsource(obj)
    st = os.stat(file)
    key = (file, st.st_mtime_ns, st.st_size, type(obj).__name__, getattr(obj, "__qualname__", getattr(obj, "__name__", None)))
    if key not in _SOURCES:
        _SOURCES[key] = inspect.getsource(obj)
    return _SOURCES[key]


def source_hash(objects: Iterable[Any]) -> str:
    """sha256 of the source of each object (module, class or function), in order."""
    h = hashlib.sha256()
    for obj in objects:
        h.update(_stable_source(obj).encode())
    return h.hexdigest()


class GraphPass:
    """Base of every pass. Subclasses set ``name`` and ``family`` and implement ``__call__``.

    ``family`` is the key its rewrites are counted under in ``stats()["fusions"]``
    (``None`` for cleanup passes, ``"padding"`` for padding passes).
    """

    name: str = "unnamed"
    family: str | None = None

    def __call__(self, graph: torch.fx.Graph) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def uuid_sources(self) -> list[Any]:
        return [sys.modules[type(self).__module__]]

    def uuid(self) -> str:
        return source_hash(self.uuid_sources())[:16]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"
