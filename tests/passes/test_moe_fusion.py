"""MoE fusion pass: HF transformers' MoE blocks fuse to the two MoE ops; look-alikes do not."""

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import ascend_graph
from ascend_graph.capture.trace import decompositions
from ascend_graph.config import AscendConfig
from ascend_graph.passes.fusion.moe import make_pass

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config, Qwen3MoeConfig  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock  # noqa: E402

ops = torch.ops.ascend_graph
aten = torch.ops.aten


def _init(module, dtype):
    torch.manual_seed(0)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.2)
    for b in module.buffers():
        torch.nn.init.normal_(b, std=0.1)
    return module.to(dtype).eval()


def _compile_fx(module, x):
    seen = {}

    def capture(gm, example_inputs):
        from ascend_graph.backend import compile_graph

        compiled = compile_graph(gm, example_inputs, AscendConfig(codegen="fx", fusions=("moe",), debug=True), wrap_runtime=False)
        return compiled

    compiled = torch.compile(module, backend=capture, dynamic=False, fullgraph=True)
    with torch.no_grad():
        out = compiled(x)
    return out, seen


def _targets(gm):
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


def _trace(fn, *args):
    # functional ATen with inductor's decompositions: the graph the pass sees after AOT capture
    with torch.no_grad():
        return make_fx(torch.func.functionalize(fn, remove="mutations"), decomposition_table=decompositions())(*args)


def test_qwen3_moe_block_fuses(tmp_path):
    cfg = Qwen3MoeConfig(hidden_size=40, moe_intermediate_size=24, num_experts=7, num_experts_per_tok=3, norm_topk_prob=True)
    cfg._experts_implementation = "grouped_mm"
    block = _init(Qwen3MoeSparseMoeBlock(cfg), torch.bfloat16)
    x = torch.randn(1, 13, 40, dtype=torch.bfloat16)
    options = {"codegen": "fx", "fusions": ["moe"], "graphs": False, "dump_dir": str(tmp_path), "debug": True}
    compiled = torch.compile(block, backend="ascend", options=options, dynamic=False)
    with torch.no_grad():
        out, ref = compiled(x), block(x)
    assert ascend_graph.stats()["fusions"]["moe"] == 1
    (before,) = tmp_path.glob("*moe_fusion.before.py")
    (after,) = tmp_path.glob("*moe_fusion.after.py")
    for op in ("aten.histc", "aten.sort", "aten._grouped_mm", "aten.topk"):
        assert op in before.read_text() and op not in after.read_text()
    assert "ascend_graph.moe_gating_topk" in after.read_text() and "ascend_graph.moe_dispatch_ffn_combine" in after.read_text()
    torch.testing.assert_close(out, ref, atol=3e-2, rtol=3e-2)


def test_deepseek_v3_moe_through_the_backend_fuses_router_and_experts():
    cfg = DeepseekV3Config(hidden_size=32, moe_intermediate_size=24, n_routed_experts=12, num_experts_per_tok=3, n_group=4, topk_group=2, routed_scaling_factor=2.5, n_shared_experts=1)
    cfg._experts_implementation = "grouped_mm"
    block = _init(DeepseekV3MoE(cfg), torch.float32)
    x = torch.randn(1, 9, 32)
    compiled = torch.compile(block, backend="ascend", options={"codegen": "fx", "fusions": ["moe"], "graphs": False}, dynamic=False)
    with torch.no_grad():
        out, ref = compiled(x), block(x)
    assert ascend_graph.stats()["fusions"]["moe"] == 1
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_grouped_router_keeps_its_scalars(tmp_path):
    # top_k == n_group == 8 and topk_group 4, as DeepSeek-V3 itself
    cfg = DeepseekV3Config(hidden_size=16, n_routed_experts=32, num_experts_per_tok=8, n_group=8, topk_group=4, routed_scaling_factor=1.7)
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    router = _init(DeepseekV3TopkRouter(cfg), torch.float32)
    x = torch.randn(11, 16)
    options = {"codegen": "fx", "fusions": ["moe"], "graphs": False, "dump_dir": str(tmp_path)}
    compiled = torch.compile(lambda t: router(t)[1:], backend="ascend", options=options, dynamic=False)
    with torch.no_grad():
        w, ids = compiled(x)
        w_ref, ids_ref = router(x)[1:]
    assert ascend_graph.stats()["fusions"]["moe"] == 1
    (after,) = tmp_path.glob("*moe_fusion.after.py")
    assert "'sigmoid', 8, 4, True, 1.7, 1e-20)" in after.read_text()
    torch.testing.assert_close(ids.sort(1)[0], ids_ref.sort(1)[0])
    torch.testing.assert_close(w.sum(1), w_ref.sum(1))


def _dense_loop_moe(x, router_w, w13, w2):
    # a loop over experts that looks like MoE but is dense: every expert runs on every
    # token, weighted by the full softmax (no top-k, no sort/histc): nothing to fuse
    probs = torch.softmax(x @ router_w.T, dim=-1)
    out = torch.zeros_like(x)
    for e in range(w13.shape[0]):
        gate, up = (x @ w13[e].T).chunk(2, dim=-1)
        out = out.index_add(0, torch.arange(x.shape[0]), (torch.nn.functional.silu(gate) * up) @ w2[e].T * probs[:, e : e + 1])
    return out


def test_dense_expert_loop_does_not_fuse():
    x, router_w = torch.randn(9, 16), torch.randn(5, 16)
    w13, w2 = torch.randn(5, 12, 16), torch.randn(5, 16, 6)
    gm = _trace(_dense_loop_moe, x, router_w, w13, w2)
    code_before = gm.code
    assert make_pass(AscendConfig())(gm.graph) == 0
    gm.recompile()
    assert gm.code == code_before


def _topk_over_tokens(logits):
    # softmax and top-k over dim 0 (tokens), not experts: not a router
    values, ids = torch.topk(torch.softmax(logits, dim=0), 3, dim=0)
    return values / values.sum(dim=0, keepdim=True), ids


def test_softmax_topk_over_the_wrong_dim_does_not_fuse():
    gm = _trace(_topk_over_tokens, torch.randn(10, 6))
    assert make_pass(AscendConfig())(gm.graph) == 0
    assert ops.moe_gating_topk.default not in _targets(gm)


def test_pass_is_off_when_the_family_is_not_configured():
    assert make_pass(AscendConfig(fusions=("attention",))) is None
    p = make_pass(AscendConfig())
    assert p.name == "moe_fusion" and p.family == "moe" and len(p.uuid()) == 16
