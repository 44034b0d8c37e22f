"""Fixes from newer torch, applied to the supported torch versions that lack them.

Entry point: :func:`apply`, called once when the backend module is imported (which
``torch.compile(..., backend="ascend")`` does through the entry point, before Dynamo
traces anything). Each fix names the torch issue, is applied only where a probe of the
running torch says the bug is there, and has a test that notices when every supported
torch has the fix (``tests/capture/test_torch_fixes.py``), so the fix can go. What was
applied is listed in ``ascend_graph.stats()["torch_fixes"]``.

- ``is_exporting_under_compile`` (pytorch/pytorch#176347, fixed by #176499 in the
  torch after 2.11): Dynamo folds ``torch.compiler.is_exporting()`` to the constant
  ``True`` under ``torch.compile``, so model code that keeps an export-only path takes it
  when compiled. Transformers' gated delta fallback (Qwen3-Next, Qwen3.5) is such code:
  under ``is_torchdynamo_exporting()`` it replaces ``solve_triangular`` with a Python
  loop over the 63 rows of each chunk, which Dynamo, AOT and inductor then trace unrolled,
  under symbolic shapes at sympy's pace (a tiny Qwen3-Next with ``dynamic=True`` took 160 s
  to compile and serve four batches on the GPU machine's torch 2.11, against under 60 s
  on the solve). The fix reads torch's own export flag instead, as the fixed Dynamo does:
  ``True`` during ``torch.export`` (which sets it), ``False`` under ``torch.compile``.
  It is process-wide, like the bug: every Dynamo trace in the process sees the fixed value.
"""

from __future__ import annotations

import inspect
import logging
import threading
from typing import Any

import torch

__all__ = ["apply", "applied", "is_exporting_folded_to_true"]

log = logging.getLogger("ascend_graph.torch_fixes")

_lock = threading.Lock()
_applied: list[str] = []


class _LiveExportingFlag(dict):
    """Dynamo's table of tracing-state functions and the constants it folds them to, with
    ``torch.compiler.is_exporting`` read from torch's export flag at trace time."""

    def __getitem__(self, fn: Any) -> Any:
        if fn is torch.compiler.is_exporting:
            return bool(torch.compiler._is_exporting_flag)
        return super().__getitem__(fn)


def _dynamo_torch_variables() -> Any:
    from torch._dynamo.variables import torch as variables

    return variables


def is_exporting_folded_to_true() -> bool:
    """Whether this torch's Dynamo folds ``is_exporting()`` to ``True`` under compile.

    The fixed Dynamo special-cases the function before its constant table and reads
    ``torch.compiler._is_exporting_flag``; the unfixed one only has the table, whose entry
    is ``True``. (The test holds this to a compile of a function that returns the value.)
    """
    return _folds(_dynamo_torch_variables())


def _folds(variables: Any) -> bool:
    table = variables.tracing_state_functions()
    if isinstance(table, _LiveExportingFlag) or table.get(torch.compiler.is_exporting) is not True:
        return False
    try:
        source = inspect.getsource(variables)
    except (OSError, TypeError):  # no source shipped: assume the bug (the fix is then harmless)
        return True
    return "compiler._is_exporting_flag" not in source


def _fix_is_exporting() -> bool:
    try:
        variables = _dynamo_torch_variables()
        if not hasattr(torch.compiler, "_is_exporting_flag") or not _folds(variables):
            return False
    except (ImportError, AttributeError) as e:  # a Dynamo laid out otherwise: leave it as it is
        log.debug("is_exporting fix not applied: %s: %s", type(e).__name__, e)
        return False
    table = _LiveExportingFlag(variables.tracing_state_functions())
    # the handler looks the table up through this module global on every call
    variables.tracing_state_functions = lambda: table
    return True


def apply() -> list[str]:
    """Apply every fix this torch needs (once per process); returns the names applied."""
    with _lock:
        if not _applied and _fix_is_exporting():
            _applied.append("is_exporting_under_compile")
        return list(_applied)


def applied() -> list[str]:
    """The fixes applied in this process."""
    with _lock:
        return list(_applied)
