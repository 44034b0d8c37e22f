"""EP MoE combine + residual add + RMSNorm -> ``moe_combine_add_rms_norm`` (norm_rope family,
NPU only: ``npu_moe_distribute_combine_add_rms_norm``).

Off the NPU the pass leaves the pair alone and says why in ``stats()["skipped"]``; the
rows themselves (``fuse_moe_combine_norm``) are exercised here directly on CPU graphs,
and on 2 gloo ranks for the outputs (the EP op needs its group to run).
"""

import pytest
import torch

import ascend_graph
from ascend_graph.config import AscendConfig
from ascend_graph.passes.fusion.norm_rope import MOE_NORM_SKIP, NormRopePass, fuse_moe_combine_norm
from tests.distributed import tp_workers
from tests.distributed.spawn import run_ranks

FUSED = "torch.ops.ascend_graph.moe_combine_add_rms_norm.default("
MOE = "torch.ops.ascend_graph.moe_dispatch_ffn_combine.default("


@pytest.mark.parametrize("norm", [tp_workers._hf_norm, tp_workers._vllm_norm])
@pytest.mark.parametrize("masked", [True, False])
def test_rows_rewrite_ep_moe_add_norm(norm, masked):
    gm, _, _ = tp_workers.moe_norm_graph("ep_g", 2, 1, norm, masked=masked)
    assert MOE in gm.code and "rsqrt" in gm.code
    assert fuse_moe_combine_norm(gm.graph) == 1
    gm.graph.lint()
    gm.recompile()
    assert gm.code.count(FUSED) == 1
    assert MOE not in gm.code and "rsqrt" not in gm.code and "aten.add" not in gm.code
    assert "'ep_g', 2, 1)" in gm.code  # the group, EP size and rank carried over


@pytest.mark.parametrize(
    "case,kwargs",
    [
        ("single device", dict(ep_world_size=1, ep_rank=0)),
        ("shared experts", dict(shared=True)),
        ("fp32 (the kernel is bf16/fp16)", dict(dtype=torch.float32)),
    ],
)
def test_rows_leave_other_moe_calls_alone(case, kwargs):
    args = dict(ep_group="ep_g", ep_world_size=2, ep_rank=1, norm=tp_workers._hf_norm)
    args.update(kwargs)
    gm, _, _ = tp_workers.moe_norm_graph(**args)
    assert fuse_moe_combine_norm(gm.graph) == 0, case
    gm.recompile()
    assert FUSED not in gm.code and MOE in gm.code


def test_off_the_npu_the_pass_keeps_the_pair_and_says_why():
    # a CPU graph with codegen="fx": the family applies, its EP rows do not
    gm, _, _ = tp_workers.moe_norm_graph("ep_g", 2, 1, tp_workers._hf_norm)
    ascend_graph.reset_stats()
    n = NormRopePass(AscendConfig(codegen="fx"))(gm.graph)
    gm.recompile()
    assert n == 1 and FUSED not in gm.code and MOE in gm.code
    assert "torch.ops.ascend_graph.add_rms_norm.default(" in gm.code  # the family's own add + norm row
    assert ascend_graph.stats()["skipped"]["norm_rope"] == {MOE_NORM_SKIP: 1}


def test_fused_graph_equals_unfused_on_two_ranks(tmp_path):
    results = run_ranks(tp_workers.moe_combine_norm, 2, tmp_path, timeout=300)
    for rank, res in enumerate(results):
        assert "error" not in res, res.get("trace")
        for name, r in res.items():
            assert r["count"] == 1 and r["code"].count(FUSED) == 1, (rank, name)
            for got, plain, single in zip(r["got"], r["plain"], r["single"]):
                torch.testing.assert_close(got, plain, atol=0, rtol=0)  # the same ops in the same order
                torch.testing.assert_close(got, single, atol=3e-2, rtol=3e-2)  # bf16 partial sums


def test_rows_match_the_keyword_form_shard_experts_graph_writes():
    # shard_experts_graph (distributed/ep.py) leaves every argument as a keyword
    gm, _, _ = tp_workers.moe_norm_graph("ep_g", 2, 0, tp_workers._hf_norm)
    node = next(n for n in gm.graph.nodes if n.target is torch.ops.ascend_graph.moe_dispatch_ffn_combine.default)
    schema = node.target._schema.arguments
    node.kwargs = {a.name: (node.args[i] if i < len(node.args) else a.default_value) for i, a in enumerate(schema)}
    node.args = ()
    assert fuse_moe_combine_norm(gm.graph) == 1
    gm.graph.lint()
    gm.recompile()
    assert gm.code.count(FUSED) == 1 and MOE not in gm.code
