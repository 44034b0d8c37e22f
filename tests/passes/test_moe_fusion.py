"""MoE fusion pass: HF transformers' MoE blocks fuse to the two MoE ops; look-alikes do not."""

import re

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

import ascend_graph
from ascend_graph.capture.trace import decompositions
from ascend_graph.config import AscendConfig
from ascend_graph.passes.fusion.moe import LOOP_FORMS, make_pass

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config, Qwen2MoeConfig, Qwen3MoeConfig  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE  # noqa: E402
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock  # noqa: E402
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


def _targets(gm):
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


def _trace(fn, *args):
    # functional ATen with inductor's decompositions: the graph the pass sees after AOT capture
    with torch.no_grad():
        return make_fx(torch.func.functionalize(fn, remove="mutations"), decomposition_table=decompositions())(*args)


def _trace_fake(fn, *args):
    # the same with fake-tensor metadata on every node, as the pass gets it from AOT capture
    with torch.no_grad():
        return make_fx(torch.func.functionalize(fn, remove="mutations"), decomposition_table=decompositions(), tracing_mode="fake")(*args)


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
    # the router linear (bf16 mm, softmax in fp32, weights cast back) folds into the gating op
    for op in ("aten.histc", "aten.sort", "aten._grouped_mm", "aten.topk", "aten.mm"):
        assert op in before.read_text() and op not in after.read_text()
    assert "ascend_graph.moe_gating_topk" in after.read_text() and "ascend_graph.moe_dispatch_ffn_combine" in after.read_text()
    torch.testing.assert_close(out, ref, atol=3e-2, rtol=3e-2)


def _router_folded(after_code) -> int:
    # gating ops given the router weight (a graph input) as their last argument
    return len(re.findall(r"moe_gating_topk\.default\([^;]*, arg\d+_1\)", after_code))


def _fused_experts_nodes(after_code):
    # the call of each fused experts op, without the trailing ``;  a = b = None``
    return [line.split(";")[0] for line in after_code.splitlines() if "ascend_graph.moe_dispatch_ffn_combine" in line]


def test_deepseek_v3_moe_through_the_backend_fuses_router_experts_and_shared_experts(tmp_path):
    cfg = DeepseekV3Config(hidden_size=32, moe_intermediate_size=24, n_routed_experts=12, num_experts_per_tok=3, n_group=4, topk_group=2, routed_scaling_factor=2.5, n_shared_experts=2)
    cfg._experts_implementation = "grouped_mm"
    block = _init(DeepseekV3MoE(cfg), torch.float32)
    x = torch.randn(1, 9, 32)
    options = {"codegen": "fx", "fusions": ["moe"], "graphs": False, "dump_dir": str(tmp_path), "debug": True}
    compiled = torch.compile(block, backend="ascend", options=options, dynamic=False)
    with torch.no_grad():
        out, ref = compiled(x), block(x)
    assert ascend_graph.stats()["fusions"]["moe"] == 1
    before = next(tmp_path.glob("*moe_fusion.before.py")).read_text()
    after = next(tmp_path.glob("*moe_fusion.after.py")).read_text()
    # the shared MLP (3 weights, DeepseekV3MLP on the 3-D hidden states) is inside the
    # experts op and the router linear inside the gating op: no mm is left
    (fused,) = _fused_experts_nodes(after)
    assert fused.count("arg") == 5 and "'silu', None, arg" in fused  # w13, w2 and the shared MLP
    assert after.count("aten.mm.default(") == 0 and "aten.mm.default(" in before
    (gating,) = [line.split(";")[0] for line in after.splitlines() if "ascend_graph.moe_gating_topk" in line]
    assert "'sigmoid', 4, 2, True, 2.5, 1e-20, arg" in gating  # router weight passed
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_qwen2_moe_sigmoid_gated_shared_expert_folds(tmp_path):
    # Qwen2-MoE / Qwen3-Next: routed + sigmoid(x @ g.T) * shared_expert(x), on 2-D states, bf16
    cfg = Qwen2MoeConfig(hidden_size=40, moe_intermediate_size=24, shared_expert_intermediate_size=56, num_experts=5, num_experts_per_tok=2, norm_topk_prob=False)
    cfg._experts_implementation = "grouped_mm"
    block = _init(Qwen2MoeSparseMoeBlock(cfg), torch.bfloat16)
    x = torch.randn(1, 11, 40, dtype=torch.bfloat16)
    options = {"codegen": "fx", "fusions": ["moe"], "graphs": False, "dump_dir": str(tmp_path), "debug": True}
    compiled = torch.compile(block, backend="ascend", options=options, dynamic=False)
    with torch.no_grad():
        out, ref = compiled(x), block(x)
    assert ascend_graph.stats()["fusions"]["moe"] == 1
    before = next(tmp_path.glob("*moe_fusion.before.py")).read_text()
    after = next(tmp_path.glob("*moe_fusion.after.py")).read_text()
    assert "aten.sigmoid" in before and "aten.sigmoid" not in after
    (fused,) = _fused_experts_nodes(after)
    assert "'', 1, 0, arg" in fused  # shared_expert_gate passed
    assert after.count("aten.mm.default(") == 0  # the router's linear folded into the gating op
    torch.testing.assert_close(out, ref, atol=3e-2, rtol=3e-2)


def _routed_plus_shared_of_other_input(x, w, ids, w13, w2, g, u, d):
    # the shared MLP reads another tensor than the routed experts: not a shared expert
    routed = ops.moe_dispatch_ffn_combine(x, w, ids, w13, w2)
    y = x * 2
    return routed + F.linear(F.silu(F.linear(y, g)) * F.linear(y, u), d)


def _routed_plus_relu_gated_shared(x, w, ids, w13, w2, g, u, d, gate):
    # a gate other than sigmoid: the op cannot express it
    routed = ops.moe_dispatch_ffn_combine(x, w, ids, w13, w2)
    return routed + torch.relu(F.linear(x, gate)) * F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d)


@pytest.mark.parametrize("fn", [_routed_plus_shared_of_other_input, _routed_plus_relu_gated_shared])
def test_shared_mlp_look_alikes_do_not_fold(fn):
    torch.manual_seed(0)
    x, w, ids = torch.randn(7, 16), torch.rand(7, 2), torch.randint(0, 4, (7, 2))
    args = [x, w, ids, torch.randn(4, 16, 16), torch.randn(4, 16, 8), torch.randn(12, 16), torch.randn(12, 16), torch.randn(16, 12)]
    if fn is _routed_plus_relu_gated_shared:
        args.append(torch.randn(1, 16))
    gm = _trace_fake(fn, *args)
    n_mm = sum(n.target is aten.mm.default for n in gm.graph.nodes)
    assert n_mm == 4 - (fn is _routed_plus_shared_of_other_input)
    assert make_pass(AscendConfig())(gm.graph) == 0
    assert sum(n.target is aten.mm.default for n in gm.graph.nodes) == n_mm
    (fused,) = [n for n in gm.graph.nodes if n.target is ops.moe_dispatch_ffn_combine.default]
    assert len(fused.args) == 5


def _per_expert(weights, ids, n_experts):
    """[tokens, n_experts]: the routing weight of every (token, expert) pair, 0 if not routed."""
    return torch.zeros(ids.shape[0], n_experts, dtype=weights.dtype).scatter_add(1, ids.long(), weights)


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
    assert "'sigmoid', 8, 4, True, 1.7, 1e-20, arg" in after.read_text()  # the router weight: linear folded
    torch.testing.assert_close(ids.sort(1)[0], ids_ref.sort(1)[0])
    # each token's weight for each expert (not only their sum: a swap between two experts
    # keeps the sum); the top-k order may differ, the token x expert matrix may not
    per_expert, per_expert_ref = _per_expert(w, ids, 32), _per_expert(w_ref, ids_ref, 32)
    assert torch.equal(per_expert != 0, per_expert_ref != 0)
    torch.testing.assert_close(per_expert, per_expert_ref)


def test_per_expert_check_catches_a_swap_the_row_sum_misses():
    w, ids = torch.tensor([[0.7, 0.3]]), torch.tensor([[2, 5]])
    swapped = torch.tensor([[0.3, 0.7]])
    assert torch.equal(w.sum(1), swapped.sum(1))
    assert not torch.allclose(_per_expert(w, ids, 8), _per_expert(swapped, ids, 8))


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


def _router_plain(x, weight):
    # Qwen-style softmax router on a bias-free linear
    w, ids = torch.topk(torch.softmax(F.linear(x, weight), dim=-1, dtype=torch.float32), 3, dim=-1)
    return (w / w.sum(dim=-1, keepdim=True)).to(x.dtype), ids


def _router_bias(x, weight, bias):
    # the same on a linear with a bias: the op's router_weight has none
    w, ids = torch.topk(torch.softmax(F.linear(x, weight, bias), dim=-1, dtype=torch.float32), 3, dim=-1)
    return (w / w.sum(dim=-1, keepdim=True)).to(x.dtype), ids


def _router_logits_out(x, weight):
    # the model also returns the logits (an auxiliary loss): they must stay
    logits = F.linear(x, weight)
    w, ids = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float32), 3, dim=-1)
    return (w / w.sum(dim=-1, keepdim=True)).to(x.dtype), ids, logits


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", ["plain", "bias", "logits_out"])
def test_router_linear_folds_only_when_nothing_else_needs_its_logits(kind, dtype):
    # a bias-free linear whose logits only feed the router folds into the gating op; a
    # biased one, or logits the model also returns, stay a GEMM feeding the gating op
    torch.manual_seed(0)
    fn = {"plain": _router_plain, "bias": _router_bias, "logits_out": _router_logits_out}[kind]
    args = [torch.randn(7, 24, dtype=dtype), (torch.randn(10, 24) * 0.3).to(dtype)] + ([torch.randn(10, dtype=dtype)] if kind == "bias" else [])
    gm = _trace_fake(fn, *args)
    gm.graph.eliminate_dead_code()  # the CPU trace leaves dead casts; the backend's cleanup drops them first
    mms = sum(n.target in (aten.mm.default, aten.addmm.default) for n in gm.graph.nodes)
    assert make_pass(AscendConfig())(gm.graph) == 1
    gm.graph.lint()
    gm.recompile()
    (gating,) = [n for n in gm.graph.nodes if n.target is ops.moe_gating_topk.default]
    folded = len(gating.args) == 10 and gating.args[9] is not None
    assert folded == (kind == "plain")
    assert sum(n.target in (aten.mm.default, aten.addmm.default) for n in gm.graph.nodes) == mms - folded
    assert aten.topk.default not in _targets(gm)
    with torch.no_grad():
        out, ref = gm(*args), fn(*args)
    torch.testing.assert_close(out[1], ref[1])
    torch.testing.assert_close(out[0], ref[0], atol=1e-2 if dtype == torch.bfloat16 else 1e-6, rtol=0)
    assert out[0].dtype == ref[0].dtype == dtype


def test_pass_is_off_when_the_family_is_not_configured():
    assert make_pass(AscendConfig(fusions=("attention",))) is None
    p = make_pass(AscendConfig())
    assert p.name == "moe_fusion" and p.family == "moe" and len(p.uuid()) == 16


# -- experts written as a loop over experts ------------------------------------------

_E, _K, _H, _I = 5, 2, 24, 12


class _LoopMoE(torch.nn.Module):
    """A user MoE layer: softmax top-k router, experts as one of the loop forms the pass knows.

    ``form`` names a body in ``LOOP_FORMS`` (what the pass matches), or a look-alike below.
    """

    def __init__(self, form, activation=F.silu):
        super().__init__()
        self.form, self.act = form, activation
        self.router = torch.nn.Linear(_H, _E, bias=False)
        self.w13 = torch.nn.Parameter(torch.randn(_E, 2 * _I, _H) * 0.3)
        self.w2 = torch.nn.Parameter(torch.randn(_E, _H, _I) * 0.3)

    def forward(self, x):
        probs = torch.softmax(self.router(x), dim=-1, dtype=torch.float32)
        w, ids = torch.topk(probs, _K, dim=-1)
        w = (w / w.sum(dim=-1, keepdim=True)).to(x.dtype)
        if self.form in LOOP_FORMS:
            return LOOP_FORMS[self.form][0](torch.zeros_like(x), x, w, ids, self.w13, self.w2, _E, self.act)
        return getattr(self, self.form)(x, probs, w, ids)

    def _ffn(self, h, e):
        gate, up = F.linear(h, self.w13[e]).chunk(2, dim=-1)
        return F.linear(self.act(gate) * up, self.w2[e])

    def into_residual(self, x, probs, w, ids):
        # index_add_ into a copy of x (the residual), not into zeros: stays as it is
        out = x.clone()
        for e in range(_E):
            tok, pos = torch.where(ids == e)
            out.index_add_(0, tok, self._ffn(x[tok], e) * w[tok, pos, None])
        return out

    def threshold_mask(self, x, probs, w, ids):
        # per-expert token sets from a probability threshold, not from top-k ids
        out = torch.zeros_like(x)
        for e in range(_E):
            (tok,) = torch.where(probs[:, e] > 0.2)
            out.index_add_(0, tok, self._ffn(x[tok], e) * probs[tok, e, None].to(x.dtype))
        return out

    def shifted_weights(self, x, probs, w, ids):
        # expert e's routing weight applied to expert (e + 1) % E's FFN: not MoE
        out = torch.zeros_like(x)
        for e in range(_E):
            weight = (w * (ids == e)).sum(dim=-1, keepdim=True)
            out = out + self._ffn(x, (e + 1) % _E) * weight
        return out

    def some_experts(self, x, probs, w, ids):
        # a loop over E - 1 of the E experts: the last expert's tokens get nothing
        out = torch.zeros_like(x)
        for e in range(_E - 1):
            weight = (w * (ids == e)).sum(dim=-1, keepdim=True)
            out = out + self._ffn(x, e) * weight
        return out


def _compile_loop(module, x, tmp_path):
    torch._dynamo.reset()  # every test compiles the same forward with another form
    options = {"codegen": "fx", "fusions": ["moe"], "graphs": False, "dump_dir": str(tmp_path), "debug": True}
    compiled = torch.compile(module, backend="ascend", options=options, dynamic=False, fullgraph=True)
    # the torch.where(mask) forms give data-dependent row counts: one graph only with this
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True), torch.no_grad():
        out, ref = compiled(x), module(x)
    before = next(tmp_path.glob("*moe_fusion.before.py")).read_text()
    after = next(tmp_path.glob("*moe_fusion.after.py")).read_text()
    return out, ref, before, after


@pytest.mark.parametrize("form", sorted(LOOP_FORMS))
def test_expert_loop_fuses(form, tmp_path):
    torch.manual_seed(0)
    module = _LoopMoE(form).eval()
    x = torch.randn(13, _H)
    out, ref, before, after = _compile_loop(module, x, tmp_path)
    assert ascend_graph.stats()["fusions"]["moe"] == 1
    # E unrolled expert bodies (2 GEMMs each) and the router's GEMM before; none after
    # (the router's fp32 linear folds into the gating op)
    assert before.count("aten.mm.default(") == 2 * _E + 1 and after.count("aten.mm.default(") == 0
    assert _router_folded(after)
    assert len(_fused_experts_nodes(after)) == 1 and "ascend_graph.moe_gating_topk" in after
    for op in ("aten.nonzero", "aten.index_put", "aten.eq.Scalar"):
        assert op not in after
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_expert_loop_fuses_gelu_bf16(tmp_path):
    torch.manual_seed(0)
    module = _LoopMoE("dense_where", activation=F.gelu).to(torch.bfloat16).eval()
    x = torch.randn(9, _H, dtype=torch.bfloat16)
    out, ref, before, after = _compile_loop(module, x, tmp_path)
    assert ascend_graph.stats()["fusions"]["moe"] == 1
    (fused,) = _fused_experts_nodes(after)
    assert "'gelu'" in fused and "aten.erf" in before and "aten.erf" not in after
    torch.testing.assert_close(out, ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("form", ["into_residual", "threshold_mask", "shifted_weights", "some_experts"])
def test_expert_loop_look_alikes_do_not_fuse(form, tmp_path):
    torch.manual_seed(0)
    module = _LoopMoE(form).eval()
    x = torch.randn(13, _H)
    out, ref, before, after = _compile_loop(module, x, tmp_path)
    # the experts stay as written (the router alone may fuse, its linear with it: it is a
    # real top-k router)
    assert before.count("aten.mm.default(") >= 2 * (_E - 1) + 1
    assert not _fused_experts_nodes(after)
    assert after.count("aten.mm.default(") == before.count("aten.mm.default(") - _router_folded(after)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_expert_loop_fuses_with_a_symbolic_batch(tmp_path):
    # dynamic=True: the accumulator is full([s0, H]); one graph serves 13 and 17 tokens
    torch._dynamo.reset()
    torch.manual_seed(0)
    module = _LoopMoE("dense_mul").eval()
    options = {"codegen": "fx", "fusions": ["moe"], "graphs": False, "dump_dir": str(tmp_path)}
    compiled = torch.compile(module, backend="ascend", options=options, dynamic=True, fullgraph=True)
    with torch.no_grad():
        for tokens in (13, 17):
            x = torch.randn(tokens, _H)
            torch.testing.assert_close(compiled(x), module(x), atol=1e-5, rtol=1e-5)
    assert ascend_graph.stats()["graphs_compiled"] == 1
    (after,) = tmp_path.glob("*moe_fusion.after.py")
    assert len(_fused_experts_nodes(after.read_text())) == 1
