"""The fixes from newer torch (``capture/torch_fixes.py``): each is applied exactly where the
running torch has the bug, leaves torch.export's behaviour alone, and a test notices when
no supported torch needs it any more."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ascend_graph
import ascend_graph.backend  # noqa: F401  (applies the fixes, as torch.compile's backend lookup does)
from ascend_graph.capture import torch_fixes

ROOT = Path(__file__).resolve().parents[2]

#: a torch whose Dynamo reads is_exporting() live (pytorch/pytorch#176499): 2.13 here;
#: the GPU machine's 2.11 folds it to True
FIXED_IN = (2, 13)


class _Branchy(torch.nn.Module):
    def forward(self, x):
        if torch.compiler.is_exporting():
            return x + 1
        return x - 1


def _raw_torch_probe() -> dict:
    """In a fresh process that never imports ascend_graph's backend: what this torch's
    Dynamo folds is_exporting() to under torch.compile, and what the probe says."""
    code = (
        "import json, torch\n"
        "from ascend_graph.capture import torch_fixes\n"
        "probe = torch_fixes.is_exporting_folded_to_true()\n"
        "f = torch.compile(lambda x: x + 1 if torch.compiler.is_exporting() else x - 1, backend='eager', fullgraph=True)\n"
        "folded = bool(f(torch.zeros(1)).item() == 1)\n"
        "import sys\n"
        "print(json.dumps({'probe': probe, 'folded': folded, 'backend_imported': 'ascend_graph.backend' in sys.modules}))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_probe_agrees_with_what_dynamo_does():
    raw = _raw_torch_probe()
    assert not raw["backend_imported"], "the raw probe must see torch without the fixes"
    assert raw["probe"] == raw["folded"], raw
    # the fix is applied exactly where torch has the bug
    assert ("is_exporting_under_compile" in torch_fixes.applied()) == raw["folded"]
    assert ascend_graph.stats()["torch_fixes"] == torch_fixes.applied()


def test_compile_sees_is_exporting_false():
    torch._dynamo.reset()
    f = torch.compile(_Branchy(), backend="eager", fullgraph=True)
    assert f(torch.zeros(2)).tolist() == [-1.0, -1.0]


@pytest.mark.parametrize("strict", [True, False])
def test_export_still_sees_is_exporting_true(strict):
    ep = torch.export.export(_Branchy(), (torch.zeros(2),), strict=strict)
    assert ep.module()(torch.zeros(2)).tolist() == [1.0, 1.0]


def test_fix_is_still_needed_by_a_supported_torch():
    """Fails once the oldest supported torch has the fix: then remove it (and this test)."""
    spec = (ROOT / "pyproject.toml").read_text()
    low = re.search(r'"torch>=(\d+)\.(\d+)', spec)
    assert low, "pyproject.toml names no lowest torch"
    assert (int(low.group(1)), int(low.group(2))) < FIXED_IN, "every supported torch reads is_exporting() live: drop torch_fixes' is_exporting fix"
    if tuple(int(p) for p in torch.__version__.split(".")[:2]) >= FIXED_IN:
        assert not torch_fixes.is_exporting_folded_to_true()
