"""Whole tiny HF MoE models through backend="ascend": every MoE layer fuses, outputs match eager."""

import pytest
import torch
import torch.nn.functional as F

import ascend_graph

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM  # noqa: E402


def _model(name):
    torch.manual_seed(0)
    if name == "qwen2_moe":
        # a sigmoid-gated shared expert beside the routed ones (Qwen2-MoE, as Qwen3-Next)
        cfg = Qwen2MoeConfig(vocab_size=97, hidden_size=32, intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=6, num_experts_per_tok=2, norm_topk_prob=False)
        model, moe_layers = Qwen2MoeForCausalLM(cfg), 2
    elif name == "qwen3_moe":
        cfg = Qwen3MoeConfig(vocab_size=97, hidden_size=32, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=6, num_experts_per_tok=2, norm_topk_prob=True)
        model, moe_layers = Qwen3MoeForCausalLM(cfg), 2
    else:
        cfg = DeepseekV3Config(vocab_size=97, hidden_size=32, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5)
        model, moe_layers = DeepseekV3ForCausalLM(cfg), 2
    for n, b in model.named_buffers():
        if "e_score_correction_bias" in n:
            torch.nn.init.normal_(b, std=0.1)
    return model.eval(), moe_layers


@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v3", "qwen2_moe"])
def test_every_moe_layer_fuses_prefill_and_decode(name):
    model, moe_layers = _model(name)
    ids = torch.randint(0, 97, (1, 11))
    compiled = torch.compile(model, backend="ascend", options={"codegen": "fx", "fusions": ["moe"], "graphs": False}, dynamic=False)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        out = compiled(ids, use_cache=False).logits
        assert ascend_graph.stats()["fusions"]["moe"] == moe_layers
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        # one decode step on a fresh KV cache: the MoE layers see a single token
        ascend_graph.reset_stats()
        pre = model(ids, use_cache=True)
        nxt = pre.logits[:, -1:].argmax(-1)
        ref_step = model(nxt, past_key_values=pre.past_key_values, use_cache=True).logits
        pre2 = model(ids, use_cache=True)
        step = compiled(nxt, past_key_values=pre2.past_key_values, use_cache=True).logits
        torch.testing.assert_close(step, ref_step, atol=1e-4, rtol=1e-4)
        assert ascend_graph.stats()["fusions"]["moe"] == moe_layers


class _LoopExperts(torch.nn.Module):
    """Qwen3-MoE's experts as a user writes them: a Python loop over every expert, index_add_."""

    def __init__(self, experts):
        super().__init__()
        self.num_experts = experts.gate_up_proj.shape[0]
        self.gate_up_proj, self.down_proj = experts.gate_up_proj, experts.down_proj

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
        for e in range(self.num_experts):
            slot, token = torch.where(expert_mask[e])
            gate, up = F.linear(hidden_states[token], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down_proj[e]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def test_expert_loop_model_fuses_every_layer():
    model, moe_layers = _model("qwen3_moe")
    for layer in model.model.layers:
        layer.mlp.experts = _LoopExperts(layer.mlp.experts)
    ids = torch.randint(0, 97, (1, 11))
    compiled = torch.compile(model, backend="ascend", options={"codegen": "fx", "fusions": ["moe"], "graphs": False}, dynamic=False)
    # torch.where(mask) has a data-dependent row count: without this Dynamo breaks the graph there
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True), torch.no_grad():
        ref = model(ids, use_cache=False).logits
        out = compiled(ids, use_cache=False).logits
    assert ascend_graph.stats()["fusions"]["moe"] == moe_layers
    assert ascend_graph.stats()["graphs_compiled"] == 1
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_deepseek_v3_dynamic_routed_scaling_arrives_as_tensor():
    """Under dynamic=True Dynamo does not specialise ``routed_scaling_factor``: it reaches
    the graph as a 0-dim tensor input (not a float), and the router still fuses (it used
    to fail the op's ``float`` argument), with the scaling applied after the op."""
    model, moe_layers = _model("deepseek_v3")
    compiled = torch.compile(model, backend="ascend", options={"codegen": "fx", "fusions": ["moe"], "graphs": False}, dynamic=True)
    with torch.no_grad():
        for batch, seq in [(2, 5), (3, 7)]:  # batch 1 would be specialised
            ids = torch.randint(0, 97, (batch, seq), generator=torch.Generator().manual_seed(batch))
            ref = model(ids, use_cache=False).logits
            out = compiled(ids, use_cache=False).logits
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    st = ascend_graph.stats()
    assert st["graphs_compiled"] == 1  # one dynamic graph serves both shapes
    assert st["fusions"]["moe"] == moe_layers


def _gpt_oss(dtype=torch.float32):
    from tests.models.archs import build_arch

    return build_arch("gpt_oss", dtype)


def _compile_moe_only(model, ids):
    compiled = torch.compile(model, backend="ascend", options={"codegen": "fx", "fusions": ["moe"], "graphs": False}, dynamic=False)
    with torch.no_grad():
        return model(ids, use_cache=False).logits, compiled(ids, use_cache=False).logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpt_oss_biased_clipped_swiglu_experts_fuse(dtype):
    """GptOss's experts (biases, interleaved clipped SwiGLU, [E, H, 2I] weights) -> the
    experts op with biases and "clipped_swiglu"; a non-default limit is carried over.
    bf16: the halves are upcast before their clamps (a check that looked at the slices'
    direct users took up for gate and fused nothing)."""
    model = _gpt_oss(dtype)
    model.model.layers[1].mlp.experts.limit = 0.5  # clamps most gates and ups at this size
    ids = torch.randint(0, 131, (3, 13), generator=torch.Generator().manual_seed(0))
    ref, out = _compile_moe_only(model, ids)
    assert ascend_graph.stats()["graph_ops"].get("moe_dispatch_ffn_combine") == 2  # the experts, not only the routers
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item() < tol


def test_gpt_oss_experts_not_fused_with_gate_and_up_swapped():
    """Odd columns as the gate and even ones as up: another computation (the retrace-free
    row's slices are wildcards; the check reads which half is which)."""
    model = _gpt_oss()

    def swapped(gate_up, self=model.model.layers[0].mlp.experts):
        gate, up = gate_up[..., 1::2].clamp(max=self.limit), gate_up[..., ::2].clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    model.model.layers[0].mlp.experts._apply_gate = swapped
    ids = torch.randint(0, 131, (3, 13), generator=torch.Generator().manual_seed(0))
    ref, out = _compile_moe_only(model, ids)
    assert ascend_graph.stats()["graph_ops"].get("moe_dispatch_ffn_combine") == 1  # layer 1 only
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_gpt_oss_experts_not_fused_without_the_plus_one():
    """A gate that differs from GptOss's (no +1 on up) must not take the clipped row."""
    model = _gpt_oss()

    def plain_gate(gate_up, self=model.model.layers[0].mlp.experts):
        gate, up = gate_up[..., ::2].clamp(max=self.limit), gate_up[..., 1::2].clamp(min=-self.limit, max=self.limit)
        return up * (gate * torch.sigmoid(gate * self.alpha))

    model.model.layers[0].mlp.experts._apply_gate = plain_gate
    ids = torch.randint(0, 131, (3, 13), generator=torch.Generator().manual_seed(0))
    ref, out = _compile_moe_only(model, ids)
    assert ascend_graph.stats()["graph_ops"].get("moe_dispatch_ffn_combine") == 1  # layer 1 only
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
