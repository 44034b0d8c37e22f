"""Typed errors. Each says what happened, what was expected, and what to do.

Every error carries ``expected`` and ``got`` so callers (and tests) can read them
without parsing the message.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AscendGraphError",
    "ConfigError",
    "UnsupportedError",
    "CaptureError",
    "PaddingError",
    "CacheError",
]


class AscendGraphError(Exception):
    """Base class of every error ascend-graph raises on purpose."""

    def __init__(self, what: str, *, expected: Any = None, got: Any = None, hint: str | None = None):
        self.what = what
        self.expected = expected
        self.got = got
        self.hint = hint
        parts = [what]
        if expected is not None:
            parts.append(f"expected: {expected}")
        if got is not None:
            parts.append(f"got: {got}")
        if hint:
            parts.append(f"hint: {hint}")
        super().__init__("; ".join(parts))


class ConfigError(AscendGraphError, ValueError):
    """An option is unknown or has a value of the wrong type or range."""


class UnsupportedError(AscendGraphError, TypeError):
    """The graph uses a device or dtype the pipeline cannot handle."""


class CaptureError(AscendGraphError, RuntimeError):
    """Tracing, shape analysis or device-graph capture failed."""


class PaddingError(AscendGraphError, ValueError):
    """A padding plan would break an invariant (bucket size, FIA rules, pad roles)."""


class CacheError(AscendGraphError, RuntimeError):
    """A graph cache entry is missing, corrupt, locked, or built for another setup."""
