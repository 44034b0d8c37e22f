"""The torch-npu 2.13.0 wheel, downloaded (never installed) and unpacked for contract tests.

``pip download torch-npu==2.13.0 --no-deps`` once into ``~/.cache/ascend-graph`` (or
``$ASCEND_GRAPH_NPU_WHEEL_CACHE``); the files the tests read are unpacked next to it.
torch-npu must never be installed here: without CANN it breaks ``import torch``.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

VERSION = "2.13.0"
MEMBERS = (
    "torch_npu/include/torch_npu/csrc/aten/CustomFunctions.h",
    "torch_npu/op_plugin/meta/_meta_registrations.py",
)
PREFIXES = ("torch_npu/dynamo/torchair/", "torch_npu/dynamo/npugraph_ex/")


def cache_root() -> Path:
    root = os.environ.get("ASCEND_GRAPH_NPU_WHEEL_CACHE") or os.path.join(Path.home(), ".cache", "ascend-graph")
    return Path(root) / f"torch-npu-{VERSION}"


def unpacked() -> Path:
    """Directory holding the unpacked members; skips the test if the wheel cannot be had."""
    root = cache_root()
    marker = root / ".complete"
    if marker.exists():
        return root / "files"
    root.mkdir(parents=True, exist_ok=True)
    wheels = glob.glob(str(root / "torch_npu-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", f"torch-npu=={VERSION}", "--no-deps", "-q", "-d", str(root)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = glob.glob(str(root / "torch_npu-*.whl"))
        if proc.returncode != 0 or not wheels:
            pytest.skip(f"torch-npu {VERSION} wheel could not be downloaded: {proc.stderr.strip()[-300:]}")
    out = root / "files"
    with zipfile.ZipFile(wheels[0]) as z:
        for name in z.namelist():
            if name in MEMBERS or name.startswith(PREFIXES):
                z.extract(name, out)
    marker.write_text(wheels[0])
    return out


def custom_functions_header() -> str:
    return (unpacked() / MEMBERS[0]).read_text()


def meta_registrations_source() -> str:
    return (unpacked() / MEMBERS[1]).read_text()
