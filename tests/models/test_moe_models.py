"""Whole tiny HF MoE models through backend="ascend": every MoE layer fuses, outputs match eager."""

import pytest
import torch

import ascend_graph

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM  # noqa: E402


def _model(name):
    torch.manual_seed(0)
    if name == "qwen3_moe":
        cfg = Qwen3MoeConfig(vocab_size=97, hidden_size=32, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=6, num_experts_per_tok=2, norm_topk_prob=True)
        model, moe_layers = Qwen3MoeForCausalLM(cfg), 2
    else:
        cfg = DeepseekV3Config(vocab_size=97, hidden_size=32, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5)
        model, moe_layers = DeepseekV3ForCausalLM(cfg), 2
    for n, b in model.named_buffers():
        if "e_score_correction_bias" in n:
            torch.nn.init.normal_(b, std=0.1)
    return model.eval(), moe_layers


@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v3"])
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
