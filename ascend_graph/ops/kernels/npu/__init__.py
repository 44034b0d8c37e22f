"""NPU bindings: the fused ops mapped onto torch_npu's ops.

Written against torch-npu 2.13.0's real API (``CustomFunctions.h`` for names and
keywords, ``op_plugin/meta/_meta_registrations.py`` for output shapes) and held to it
by ``tests/ops/test_npu_contract.py``. Nothing here has run on an NPU: none exists on
this project's machines. torch_npu is imported only inside :func:`register_all`.
"""

from __future__ import annotations

import functools
import importlib
import logging
from typing import Any, Callable

log = logging.getLogger("ascend_graph.ops.npu")

FAMILIES = ("attention", "causal_conv", "gated_delta", "moe", "norm_rope", "comm_norm")


def with_torch_npu(call: Callable[..., Any]) -> Callable[..., Any]:
    """``call(torch_npu, *args)`` as a kernel: torch_npu is imported when the kernel runs."""

    @functools.wraps(call)
    def kernel(*args: Any) -> Any:
        import torch_npu

        return call(torch_npu, *args)

    return kernel


def torch_npu_available() -> bool:
    try:
        importlib.import_module("torch_npu")
    except ImportError:
        return False
    return True


def register_all() -> list[str]:
    """Attach every family's NPU kernels; returns the families registered."""
    if not torch_npu_available():
        from ....errors import UnsupportedError

        raise UnsupportedError(
            "NPU kernels need torch_npu",
            expected="torch_npu (with the CANN toolkit) importable",
            got="import torch_npu failed",
            hint="install torch-npu matching your torch and CANN on an Ascend machine",
        )
    done = []
    for family in FAMILIES:
        try:
            module = importlib.import_module(f"{__name__}.{family}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{family}":
                raise
            continue
        module.register()
        done.append(family)
    return done
