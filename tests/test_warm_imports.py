"""What a compile that loads every graph from the cache imports: nothing it does not run.

A warm start's first call traces with Dynamo and loads the compiled graph; it runs no
fusion pass and is not inside vLLM. Two imports used to ride along, about a second each
on a 2-core CPU (a quarter of a warm start): the vLLM adapter (asked on every compile
whether vLLM is compiling) and inductor's pattern matcher (imported with the fusion
families, whose sources the cache key hashes). One fresh interpreter checks both.
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHECK = """
import sys
import ascend_graph.backend
from ascend_graph import plugins
from ascend_graph.config import AscendConfig
from ascend_graph.passes.manager import build_pass_manager

assert plugins.host_compile() is None
manager = build_pass_manager(AscendConfig())
assert manager.uuid() and len(manager.names) > 4
loaded = [m for m in ("ascend_graph.integrations.vllm", "vllm", "torch._inductor.pattern_matcher", "torch._inductor.lowering") if m in sys.modules]
print(loaded)
"""


def test_host_hook_and_pass_manager_import_neither_the_adapter_nor_the_pattern_matcher():
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", _CHECK], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_the_vllm_host_entry_point_is_the_light_hook():
    (ep,) = [e for e in metadata.entry_points(group="ascend_graph.hosts") if e.name == "vllm"]
    assert ep.value == "ascend_graph.integrations.vllm_host:host_compile"


def test_inside_vllm_the_light_hook_asks_the_adapter(monkeypatch):
    import types

    from ascend_graph.integrations import vllm as adapter
    from ascend_graph.integrations import vllm_host

    monkeypatch.setitem(sys.modules, "vllm.config", sys.modules.get("vllm.config") or types.ModuleType("vllm.config"))
    monkeypatch.setattr(adapter, "host_compile", lambda: "asked")
    assert vllm_host.host_compile() == "asked"
    monkeypatch.delitem(sys.modules, "vllm.config")
    assert vllm_host.host_compile() is None
