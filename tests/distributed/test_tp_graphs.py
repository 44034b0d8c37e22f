"""Tensor-parallel graphs: functional collectives (``_c10d_functional.all_reduce`` +
``wait_tensor``, what Dynamo makes of ``torch.distributed._functional_collectives``) sit
between the subgraphs the fusion passes match, and the fusions still happen."""

import pytest
import torch
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

import ascend_graph
from ascend_graph.distributed import groups

transformers = pytest.importorskip("transformers")
from transformers import Qwen3MoeConfig  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock  # noqa: E402


class _MoeThenAllReduce(torch.nn.Module):
    # a row-parallel layer's tail: the partial output is summed over the TP group
    def __init__(self, block, group_name, reduce):
        super().__init__()
        self.block, self.group_name, self.reduce = block, group_name, reduce

    def forward(self, x):
        y = self.block(x)
        return funcol.all_reduce(y, "sum", self.group_name) if self.reduce else y


def _attention_then_all_reduce(group_name, reduce):
    def fn(q, k, v):
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)
        o = o * 1.5
        return funcol.all_reduce(o, "sum", group_name) if reduce else o

    return fn


def _compile(fn, inputs, tmp_path, family):
    torch._dynamo.reset()
    ascend_graph.reset_stats()
    options = {"codegen": "fx", "fusions": [family], "graphs": False, "dump_dir": str(tmp_path), "debug": True}
    compiled = torch.compile(fn, backend="ascend", options=options, dynamic=False, fullgraph=True)
    with torch.no_grad():
        out = compiled(*inputs)
    after = "".join(p.read_text() for p in sorted(tmp_path.glob(f"*{family}*after.py")))
    return out, ascend_graph.stats()["fusions"][family], after


@pytest.mark.parametrize("family", ["moe", "attention"])
def test_fusions_survive_functional_all_reduce(world_of_one, tmp_path, family):
    pg = groups.acquire()  # TP collectives take their group from the registry too
    if family == "moe":
        cfg = Qwen3MoeConfig(hidden_size=40, moe_intermediate_size=24, num_experts=7, num_experts_per_tok=3, norm_topk_prob=True)
        cfg._experts_implementation = "grouped_mm"
        torch.manual_seed(0)
        block = Qwen3MoeSparseMoeBlock(cfg)
        for p in block.parameters():  # transformers leaves them uninitialised until from_pretrained
            torch.nn.init.normal_(p, std=0.2)
        block = block.to(torch.bfloat16).eval()
        make = lambda reduce: _MoeThenAllReduce(block, pg.group_name, reduce)  # noqa: E731
        inputs = (torch.randn(1, 13, 40, dtype=torch.bfloat16),)
        fused_ops = ("ascend_graph.moe_gating_topk", "ascend_graph.moe_dispatch_ffn_combine")
    else:
        g = torch.Generator().manual_seed(0)
        inputs = (torch.randn(3, 6, 5, 32, generator=g), torch.randn(3, 2, 5, 32, generator=g), torch.randn(3, 2, 5, 32, generator=g))
        make = lambda reduce: _attention_then_all_reduce(pg.group_name, reduce)  # noqa: E731
        fused_ops = ("ascend_graph.attention",)
    plain_out, plain_count, _ = _compile(make(False), inputs, tmp_path / "plain", family)
    out, count, after = _compile(make(True), inputs, tmp_path / "tp", family)
    assert count == plain_count == 1
    for name in fused_ops + ("_c10d_functional.all_reduce", "_c10d_functional.wait_tensor"):
        assert name in after, name
    assert f"'sum', '{pg.group_name}'" in after  # the collective keeps its group
    with torch.no_grad():
        ref = make(True)(*inputs)
    torch.testing.assert_close(out, ref, atol=3e-2, rtol=3e-2)  # world of one: the sum is the identity
    torch.testing.assert_close(out, plain_out)
    groups.release(pg)
