"""A warm start is really warm: a fresh process with an empty inductor cache compiles nothing.

Each run is a separate Python process with its own empty ``TORCHINDUCTOR_CACHE_DIR``, so
the only thing the warm process can reuse is our cache directory. These tests run
inductor (the CPU C++ backend), which is where torch's own artifacts are not enough:
see ascend_graph/cache/store.py on kernels. The warm process loads the compiled graph
(AOTAutograd's cache, cache/aot.py): no AOT trace, no pass, no inductor lowering, and
the outputs are bit-equal to the cold process's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from ascend_graph.cache.store import CacheStore


SCRIPT = textwrap.dedent(
    '''
    import json, os, sys, time
    import torch
    import ascend_graph.cache as cache
    from torch._dynamo.utils import counters

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.RMSNorm(32)
            self.gate_up = torch.nn.Linear(32, 96, bias=False)
            self.down = torch.nn.Linear(48, 32, bias=False)

        def forward(self, x):
            g, u = self.gate_up(self.norm(x)).chunk(2, dim=-1)
            return x + self.down(torch.nn.functional.silu(g) * u)

    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(model, backend="ascend", options={"cache_dir": sys.argv[1], "codegen": "inductor", "fusions": []})
    # record every pass-manager run (the warm process must have none)
    traced = []
    import ascend_graph.passes.manager as manager
    run = manager.PassManager.__call__
    manager.PassManager.__call__ = lambda self, gm, graph_id="graph": traced.append(graph_id) or run(self, gm, graph_id)
    start = time.perf_counter()
    with cache.record_events() as events, torch.no_grad():
        out = compiled(x)
    seconds = time.perf_counter() - start
    root = os.environ["TORCHINDUCTOR_CACHE_DIR"]
    so = sorted(f"{os.path.basename(d)}/{n}" for d, _, names in os.walk(root) for n in names if n.endswith(".so"))
    print(json.dumps({
        "events": [e.status for e in events],
        "details": [e.detail for e in events],
        "passes_ran": traced,
        "aot": {k: v for k, v in counters["aot_autograd"].items() if k.startswith("autograd_cache")},
        "inductor": {k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph")},
        "so": so,
        "out": out.tolist(),
        "seconds": seconds,
        "max_err": (out - model(x)).abs().max().item(),
    }))
    '''
)


def _run(tmp_path, cache_dir, name):
    script = tmp_path / "warm_script.py"
    script.write_text(SCRIPT)
    inductor_dir = tmp_path / f"inductor-{name}"
    inductor_dir.mkdir()
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor_dir)}
    proc = subprocess.run([sys.executable, str(script), str(cache_dir)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cold(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("warm")
    cache_dir = tmp / "cache"
    result = _run(tmp, cache_dir, "cold")
    return tmp, cache_dir, result


@pytest.mark.slow
def test_cold_build_stores_artifacts_and_kernels(cold):
    _, cache_dir, result = cold
    assert result["events"] == ["miss"]
    assert result["inductor"].get("fxgraph_cache_miss", 0) >= 1
    assert result["max_err"] < 1e-4
    store = CacheStore(str(cache_dir))
    (digest,) = store.digests()
    entry, problems = store.read_entry(digest)
    assert problems == []
    assert entry.torch_artifacts and entry.manifest["torch_artifacts"].get("inductor", 0) >= 1
    assert sorted(entry.kernels) == result["so"]  # every C++ kernel the build compiled is kept


@pytest.mark.slow
def test_warm_start_compiles_nothing(cold):
    tmp, cache_dir, cold_result = cold
    warm = _run(tmp, cache_dir, "warm")
    assert warm["events"] == ["hit"]
    assert warm["details"] == ["loaded"] and warm["passes_ran"] == []
    assert warm["aot"].get("autograd_cache_hit") == 1 and "autograd_cache_miss" not in warm["aot"]
    assert cold_result["passes_ran"] and cold_result["aot"].get("autograd_cache_saved") == 1
    assert warm["inductor"].get("fxgraph_cache_hit", 0) >= 1
    assert warm["inductor"].get("fxgraph_cache_miss", 0) == 0
    # no C++ kernel was compiled: every .so in the fresh inductor dir is one we restored
    assert warm["so"] == cold_result["so"]
    assert warm["out"] == cold_result["out"]
    print(f"cold {cold_result['seconds']:.2f} s, warm {warm['seconds']:.2f} s")
