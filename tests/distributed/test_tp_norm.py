"""Tensor parallelism on real processes (gloo, 2 ranks): a row-parallel linear's all-reduce
followed by the next layer's residual add + RMSNorm ends up as all_reduce ->
``ascend_graph.add_rms_norm`` (one fused op after the collective), for torch's functional
``all_reduce`` + ``wait_tensor`` and for vLLM's ``torch.ops.vllm.all_reduce``.

``codegen="fx"`` so the norm_rope family applies on the CPU (with inductor codegen it is
skipped there, see passes/fusion/norm_rope.py). Each rank's outputs equal the same graph
compiled without the family, eager, and the single-device computation.
"""

import functools

import pytest
import torch

from . import tp_workers
from .spawn import run_ranks

TOL = {torch.bfloat16: 2e-2, torch.float32: 1e-5}


@pytest.fixture(scope="module")
def funcol_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp2")
    return run_ranks(functools.partial(tp_workers.tp_add_rms_norm, out_dir=str(out)), 2, out, timeout=400)


def _fused_after_collective(case, collective):
    after = case["after"]
    assert case["counts"]["norm_rope"] == 1  # exactly one rewrite: the add + norm
    assert after.count("torch.ops.ascend_graph.add_rms_norm.default(") == 1
    assert "rsqrt" not in after and "aten.mean" not in after and "aten.pow" not in after  # the norm is gone
    assert "rsqrt" in case["before"]
    # the fused op reads the collective's result: all_reduce -> add_rms_norm, nothing between
    lines = after.splitlines()
    coll = next(l for l in lines if collective in l)
    coll_var = coll.split("=")[0].strip()
    fused = next(l for l in lines if "ascend_graph.add_rms_norm" in l)
    args = fused.split("add_rms_norm.default(")[1].split(")")[0].split(", ")
    assert coll_var in args, (coll, fused)


def _outputs_equal(case, dtype):
    tol = TOL[dtype]
    for name in ("plain", "eager"):
        torch.testing.assert_close(case["fused"], case[name], atol=tol, rtol=tol)
    # the all-reduced partial sums vs the whole linear on one rank: summation order differs
    torch.testing.assert_close(case["fused"], case["single"], atol=5 * tol, rtol=5 * tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("norm", ["_hf_norm", "_vllm_norm"])
def test_functional_all_reduce_then_add_rms_norm_fuses(funcol_ranks, norm, dtype):
    for rank, res in enumerate(funcol_ranks):
        assert "error" not in res, res.get("trace")
        case = res[f"{norm}-{dtype}"]
        assert "_c10d_functional.all_reduce.default" in case["after"] and f"'sum', '{res['group']}'" in case["after"]
        _fused_after_collective(case, "_c10d_functional.wait_tensor.default")
        _outputs_equal(case, dtype)


def test_broadcast_add_after_all_reduce_is_not_a_residual_add(funcol_ranks):
    # a [H] bias added to the all-reduced tensor: no residual stream, so no add_rms_norm;
    # the norm alone still fuses (rms_norm), once
    for res in funcol_ranks:
        case = res["bias"]
        assert case["counts"]["norm_rope"] == 1
        assert "ascend_graph.add_rms_norm" not in case["after"]
        assert case["after"].count("torch.ops.ascend_graph.rms_norm.default(") == 1
        _outputs_equal(case, torch.float32)


def test_vllm_all_reduce_op_then_add_rms_norm_fuses(tmp_path):
    pytest.importorskip("vllm")
    results = run_ranks(functools.partial(tp_workers.tp_add_rms_norm_vllm_op, out_dir=str(tmp_path)), 2, tmp_path, timeout=400)
    for res in results:
        assert "error" not in res, res.get("trace")
        assert res["communicator"] != "NoneType"  # the op runs through vLLM's CPU communicator
        case = res["vllm"]
        assert "torch.ops.vllm.all_reduce.default(" in case["after"] and res["group"] in case["after"]
        _fused_after_collective(case, "torch.ops.vllm.all_reduce.default")
        _outputs_equal(case, torch.bfloat16)
