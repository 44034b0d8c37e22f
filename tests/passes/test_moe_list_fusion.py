"""MoE experts held as a ``ModuleList`` (one ``nn.Linear`` per expert and projection) fuse
to ``moe_dispatch_ffn_combine_list``, the weights handed over as lists, never stacked."""

import pytest
import torch
import torch.nn.functional as F

import ascend_graph
from ascend_graph.passes.fusion.moe import LIST_LOOP_FORMS, LOOP_FORMS, list_loop_variants

ops = torch.ops.ascend_graph

_E, _K, _H, _I = 5, 2, 24, 12


class _Expert(torch.nn.Module):
    """Mixtral's reference expert (``MixtralBlockSparseTop2MLP``): w2(act(w1 x) * w3 x)."""

    def __init__(self, inter=_I, act=F.silu, fused_gate_up=False):
        super().__init__()
        self.act, self.fused = act, fused_gate_up
        if fused_gate_up:  # one [gate; up] linear per expert
            self.gate_up = torch.nn.Linear(_H, 2 * inter, bias=False)
        else:
            self.w1 = torch.nn.Linear(_H, inter, bias=False)
            self.w3 = torch.nn.Linear(_H, inter, bias=False)
        self.w2 = torch.nn.Linear(inter, _H, bias=False)

    def forward(self, h):
        if self.fused:
            gate, up = self.gate_up(h).chunk(2, dim=-1)
            return self.w2(self.act(gate) * up)
        return self.w2(self.act(self.w1(h)) * self.w3(h))


class _ListMoE(torch.nn.Module):
    """Softmax top-k router and a ModuleList of experts, run as one of the loop forms.

    ``form`` names a body of ``LOOP_FORMS`` (run over ``self.experts[e]``, as a user writes
    it), or a look-alike below.
    """

    def __init__(self, form, act=F.silu, inters=None, fused_gate_up=False):
        super().__init__()
        self.form = form
        self.router = torch.nn.Linear(_H, _E, bias=False)
        self.experts = torch.nn.ModuleList(_Expert(i, act, fused_gate_up) for i in (inters or [_I] * _E))
        torch.manual_seed(0)
        for p in self.parameters():
            torch.nn.init.normal_(p, std=0.3)

    def forward(self, x):
        probs = torch.softmax(self.router(x), dim=-1, dtype=torch.float32)
        w, ids = torch.topk(probs, _K, dim=-1)
        w = (w / w.sum(dim=-1, keepdim=True)).to(x.dtype)
        return getattr(self, self.form)(x, w, ids)

    # the four forms of LOOP_FORMS, written over the ModuleList

    def onehot_where(self, x, w, ids):
        # Mixtral / HF eager: one_hot mask, torch.where per expert, index_add_
        out = torch.zeros_like(x)
        mask = F.one_hot(ids, num_classes=_E).permute(2, 1, 0)
        for e in range(_E):
            pos, tok = torch.where(mask[e])
            y = self.experts[e](x[tok]) * w[tok, pos, None]
            out.index_add_(0, tok, y.to(x.dtype))
        return out

    def onehot_where_hf4(self, x, w, ids):
        # transformers 4.x MixtralSparseMoeBlock's loop, as written there
        final_hidden_states = torch.zeros((x.shape[0], x.shape[1]), dtype=x.dtype, device=x.device)
        expert_mask = F.one_hot(ids, num_classes=_E).permute(2, 1, 0)
        for expert_idx in range(_E):
            expert_layer = self.experts[expert_idx]
            idx, top_x = torch.where(expert_mask[expert_idx])
            current_state = x[None, top_x].reshape(-1, x.shape[-1])
            current_hidden_states = expert_layer(current_state) * w[top_x, idx, None]
            final_hidden_states.index_add_(0, top_x, current_hidden_states.to(x.dtype))
        return final_hidden_states

    def eq_where(self, x, w, ids):
        # the Mistral reference: torch.where(ids == e)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, pos = torch.where(ids == e)
            out.index_add_(0, tok, (expert(x[tok]) * w[tok, pos, None]).to(x.dtype))
        return out

    def dense_mul(self, x, w, ids):
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            out = out + expert(x) * (w * (ids == e)).sum(dim=-1, keepdim=True)
        return out

    def dense_where(self, x, w, ids):
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            out = out + expert(x) * torch.where(ids == e, w, 0.0).sum(dim=-1, keepdim=True)
        return out

    # look-alikes that must stay as written

    def into_residual(self, x, w, ids):
        # index_add_ into a copy of x (the residual), not into zeros
        out = x.clone()
        for e, expert in enumerate(self.experts):
            tok, pos = torch.where(ids == e)
            out.index_add_(0, tok, expert(x[tok]) * w[tok, pos, None])
        return out

    def threshold_mask(self, x, w, ids):
        # per-expert token sets from a probability threshold, not from top-k ids
        probs = torch.softmax(self.router(x), dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            (tok,) = torch.where(probs[:, e] > 0.2)
            out.index_add_(0, tok, expert(x[tok]) * probs[tok, e, None])
        return out

    def shifted_experts(self, x, w, ids):
        # routing id e runs self.experts[(e + 1) % E]: still MoE, with a rotated expert table
        out = torch.zeros_like(x)
        for e in range(_E):
            out = out + self.experts[(e + 1) % _E](x) * (w * (ids == e)).sum(dim=-1, keepdim=True)
        return out


def _compile(module, x, tmp_path, dynamic=False):
    torch._dynamo.reset()
    options = {"codegen": "fx", "fusions": ["moe"], "graphs": False, "dump_dir": str(tmp_path), "debug": True}
    compiled = torch.compile(module, backend="ascend", options=options, dynamic=dynamic, fullgraph=True)
    # the torch.where(mask) forms have data-dependent row counts: one graph only with this
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True), torch.no_grad():
        out, ref = compiled(x), module(x)
    before = next(tmp_path.glob("*moe_fusion.before.py")).read_text()
    after = next(tmp_path.glob("*moe_fusion.after.py")).read_text()
    return out, ref, before, after


def _fused(after):
    return [line.split(";")[0] for line in after.splitlines() if "ascend_graph.moe_dispatch_ffn_combine_list" in line]


def test_loop_forms_are_the_stacked_rows_forms():
    # every form the stacked loop rows match has a ModuleList row, and a module here
    assert set(LOOP_FORMS) < set(LIST_LOOP_FORMS) <= set(vars(_ListMoE))


@pytest.mark.parametrize("form", sorted(LIST_LOOP_FORMS))
def test_modulelist_expert_loop_fuses(form, tmp_path):
    module = _ListMoE(form).eval()
    x = torch.randn(13, _H)
    out, ref, before, after = _compile(module, x, tmp_path)
    assert ascend_graph.stats()["fusions"]["moe"] == 1
    # E unrolled experts (3 GEMMs each) and the router's GEMM before; none after
    assert before.count("aten.mm.default(") == 3 * _E + 1 and after.count("aten.mm.default(") == 0
    (fused,) = _fused(after)
    assert "ascend_graph.moe_dispatch_ffn_combine.default" not in after
    for op in ("aten.nonzero", "aten.index_put", "aten.eq.Scalar", "aten.index_add"):
        assert op not in after
    # the weights go over as lists of graph inputs: no stack/cat of expert weights anywhere
    assert fused.count("[") == 3 and fused.endswith("])")  # three lists, silu (the default)
    for op in ("aten.stack", "aten.cat"):
        assert op not in after
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("form", ["eq_where", "dense_where", "onehot_where_hf4"])
def test_modulelist_expert_loop_fuses_bf16_gelu_odd_tokens(form, tmp_path):
    module = _ListMoE(form, act=F.gelu).to(torch.bfloat16).eval()
    x = torch.randn(11, _H, dtype=torch.bfloat16)
    out, ref, before, after = _compile(module, x, tmp_path)
    assert ascend_graph.stats()["fusions"]["moe"] == 1
    (fused,) = _fused(after)
    assert "'gelu'" in fused and "aten.erf" in before and "aten.erf" not in after
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, atol=3e-2, rtol=3e-2)


def test_fused_gate_up_per_expert_fuses_with_an_empty_up_list(tmp_path):
    module = _ListMoE("eq_where", fused_gate_up=True).eval()
    x = torch.randn(7, _H)
    out, ref, before, after = _compile(module, x, tmp_path)
    assert ascend_graph.stats()["fusions"]["moe"] == 1
    (fused,) = _fused(after)
    assert ", [], [" in fused  # w3 empty: w1[e] holds [gate; up]
    assert before.count("aten.mm.default(") == 2 * _E + 1 and after.count("aten.mm.default(") == 0
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_expert_table_order_comes_from_the_routing(tmp_path):
    # each unrolled copy's weights bind to the id it is masked with, so a rotated table
    # fuses with rotated lists (the stacked rows' w13[e] cannot express this; lists can)
    module = _ListMoE("shifted_experts").eval()
    x = torch.randn(13, _H)
    out, ref, before, after = _compile(module, x, tmp_path)
    assert len(_fused(after)) == 1 and after.count("aten.mm.default(") == 0
    # a wrong binding (lists in graph-input order, which follows first use) would change the values
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["into_residual", "threshold_mask", "ragged_inter"])
def test_modulelist_look_alikes_do_not_fuse(kind, tmp_path):
    if kind == "ragged_inter":
        # experts of different intermediate sizes: the op takes one shape per projection
        module = _ListMoE("eq_where", inters=[_I, _I, _I + 4, _I, _I]).eval()
    else:
        module = _ListMoE(kind).eval()
    x = torch.randn(13, _H)
    out, ref, before, after = _compile(module, x, tmp_path)
    assert not _fused(after) and "moe_dispatch_ffn_combine" not in after
    # the experts stay as written (3 GEMMs each); only the router (a real top-k router) may fuse
    assert after.count("aten.mm.default(") >= 3 * _E and after.count("aten.mm.default(") >= before.count("aten.mm.default(") - 1
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_symbolic_batch_one_graph(tmp_path):
    module = _ListMoE("dense_mul").eval()
    torch._dynamo.reset()
    options = {"codegen": "fx", "fusions": ["moe"], "graphs": False, "dump_dir": str(tmp_path)}
    compiled = torch.compile(module, backend="ascend", options=options, dynamic=True, fullgraph=True)
    with torch.no_grad():
        for tokens in (13, 17):
            x = torch.randn(tokens, _H)
            torch.testing.assert_close(compiled(x), module(x), atol=1e-5, rtol=1e-5)
    assert ascend_graph.stats()["graphs_compiled"] == 1
    assert len(_fused(next(tmp_path.glob("*moe_fusion.after.py")).read_text())) == 1


def test_variants_read_the_expert_count_and_sizes_from_the_graph():
    from torch.fx.experimental.proxy_tensor import make_fx

    module = _ListMoE("dense_where").eval()
    params = dict(module.named_parameters())
    gm = make_fx(lambda p, x: torch.func.functional_call(module, p, (x,)), tracing_mode="fake")(params, torch.randn(5, _H))
    variants = list_loop_variants(gm.graph)
    assert {(form, e, i, split, act) for form, e, i, _h, split, act, _d, _wd in variants} == {("dense_where", _E, _I, True, "silu")}


def test_policy_skips_cpu_inductor_only():
    from ascend_graph.passes.fusion.moe import LIST_LOOP_CPU_INDUCTOR_SKIP, list_loop_policy

    assert list_loop_policy("cpu", "auto") == list_loop_policy("cpu", "inductor") == LIST_LOOP_CPU_INDUCTOR_SKIP
    assert list_loop_policy("cpu", "fx") is None
    assert list_loop_policy("cuda", "auto") is None and list_loop_policy("npu", "auto") is None


def test_cpu_inductor_keeps_the_loop_and_says_why(tmp_path):
    # inductor's compiled loop is as fast on the CPU (measured): the rows stand aside, counted
    from ascend_graph.passes.fusion.moe import LIST_LOOP_CPU_INDUCTOR_SKIP

    module = _ListMoE("dense_mul").eval()
    torch._dynamo.reset()
    options = {"fusions": ["moe"], "graphs": False, "dump_dir": str(tmp_path), "debug": True}
    compiled = torch.compile(module, backend="ascend", options=options, dynamic=False, fullgraph=True)
    x = torch.randn(9, _H)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), module(x), atol=1e-5, rtol=1e-5)
    stats = ascend_graph.stats()
    assert stats["skipped"]["moe"][LIST_LOOP_CPU_INDUCTOR_SKIP] == 1
    assert not _fused(next(tmp_path.glob("*moe_fusion.after.py")).read_text())


@pytest.mark.cuda
@pytest.mark.parametrize("form", ["onehot_where", "dense_mul"])
def test_modulelist_moe_fuses_on_cuda_with_graphs(form, tmp_path):
    # default codegen (inductor) and CUDA graphs per bucket: the list op's Triton path with
    # its pointer tables built in warm-up, 13 tokens padded to the 16 bucket, one graph
    # reused for 5 tokens (the 8 bucket is its own graph)
    module = _ListMoE(form).to(torch.bfloat16).cuda().eval()
    torch._dynamo.reset()
    options = {"fusions": ["moe"], "buckets": [8, 16], "dump_dir": str(tmp_path), "debug": True}
    compiled = torch.compile(module, backend="ascend", options=options, dynamic=True, fullgraph=True)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True), torch.no_grad():
        for tokens in (13, 5, 16):
            x = torch.randn(tokens, _H, dtype=torch.bfloat16, device="cuda")
            out, ref = compiled(x).float(), module(x).float()
            # bf16: both sides round differently (eager per expert, ours in fp32 with
            # one bf16 hidden store): compared at the output's scale
            assert ((out - ref).abs().max() / ref.abs().max()).item() < 2e-2
    after = next(tmp_path.glob("*moe_fusion.after.py")).read_text()
    assert len(_fused(after)) == 1 and "aten.stack" not in after
    assert ascend_graph.stats()["fusions"]["moe"] >= 1


class _Mixtral4Block(torch.nn.Module):
    """transformers 4.x ``MixtralSparseMoeBlock.forward``, as written there (3-D states in,
    router logits out too), over a ModuleList of ``MixtralBlockSparseTop2MLP``."""

    def __init__(self):
        super().__init__()
        self.num_experts, self.top_k = _E, _K
        self.gate = torch.nn.Linear(_H, _E, bias=False)
        self.experts = torch.nn.ModuleList(_Expert() for _ in range(_E))
        torch.manual_seed(0)
        for p in self.parameters():
            torch.nn.init.normal_(p, std=0.3)

    def forward(self, hidden_states):
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.view(-1, hidden_dim)
        router_logits = self.gate(hidden_states)
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(hidden_states.dtype)
        final_hidden_states = torch.zeros((batch_size * sequence_length, hidden_dim), dtype=hidden_states.dtype, device=hidden_states.device)
        expert_mask = F.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
        for expert_idx in range(self.num_experts):
            expert_layer = self.experts[expert_idx]
            idx, top_x = torch.where(expert_mask[expert_idx])
            current_state = hidden_states[None, top_x].reshape(-1, hidden_dim)
            current_hidden_states = expert_layer(current_state) * routing_weights[top_x, idx, None]
            final_hidden_states.index_add_(0, top_x, current_hidden_states.to(hidden_states.dtype))
        final_hidden_states = final_hidden_states.reshape(batch_size, sequence_length, hidden_dim)
        return final_hidden_states, router_logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixtral_4x_block_as_written_fuses(dtype, tmp_path):
    block = _Mixtral4Block().to(dtype).eval()
    x = torch.randn(2, 7, _H, dtype=dtype)  # 14 tokens in a batch of 2
    (out, logits), (ref, ref_logits), before, after = _compile(block, x, tmp_path)
    assert ascend_graph.stats()["fusions"]["moe"] == 1
    assert len(_fused(after)) == 1 and "aten.nonzero" not in after
    # the router's logits are an output: its GEMM stays, the experts' 3 * E are gone
    assert before.count("aten.mm.default(") == 3 * _E + 1 and after.count("aten.mm.default(") == 1
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    torch.testing.assert_close(logits, ref_logits, atol=tol, rtol=tol)


def test_onehot_rows_trace_where_one_hot_reads_the_host(monkeypatch):
    # torch 2.11's F.one_hot runs its C++ kernel on a real tensor, reading min and max on
    # the host (no trace may hold that: fwd_only raised, so the onehot rows never built
    # on the GPU machine), and its fake-tensor branch on a model's graph. The rows trace
    # one_hot as the graph holds it; simulated here with a one_hot that behaves so.
    from torch._inductor import pattern_matcher as pm
    from torch._subclasses.fake_tensor import FakeTensor

    from ascend_graph.passes import pattern
    from ascend_graph.passes.fusion.moe import list_loop_fusion

    def one_hot_211(t, num_classes=-1):
        if isinstance(t, FakeTensor):
            return (t.unsqueeze(-1) == torch.arange(num_classes, device=t.device)).to(torch.int64)
        if t.min().item() < 0:  # the host read
            raise RuntimeError("Class values must be non-negative.")
        return torch.zeros(*t.shape, num_classes, dtype=torch.int64).scatter_(-1, t.unsqueeze(-1), 1)

    monkeypatch.setattr(F, "one_hot", one_hot_211)
    monkeypatch.setattr(pattern, "_as_traced", {})
    ids = torch.randint(0, _E, (7, _K))
    with pytest.raises(Exception, match="local_scalar_dense|data-dependent|value out of a tracing tensor"):
        pm.fwd_only(lambda i: F.one_hot(i, num_classes=_E), [ids])  # what the rows did on 2.11
    for form in ("onehot_where", "onehot_where_hf4"):
        row = list_loop_fusion(form, _E, _I, _H, True, "silu", torch.float32, torch.float32)
        code = pattern.traced_pattern(row).code
        assert "_local_scalar_dense" not in code and "aten.eq.Tensor" in code and "scatter" not in code
