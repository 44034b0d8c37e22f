"""Whole HF model: tiny random-weight Qwen3-Next, every gated-delta-net conv fused (prefill and decode).

The model goes through ``torch.compile(backend="ascend")`` as a user writes it: capture,
passes, fx codegen and the bucketed runtime (whose first call of a bucket runs the graph
once, so the recurrent and conv states advance exactly as in eager).
"""

from __future__ import annotations

import torch

import ascend_graph


def _tiny_qwen3_next():
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    cfg = Qwen3NextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, linear_num_value_heads=2, linear_num_key_heads=1,
        linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
        num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0, 1, 2], full_attention_interval=3,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return cfg, Qwen3NextForCausalLM(cfg).eval()


def _prefill_then_decode(model, cfg, ids, nxt):
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache(config=cfg)
    with torch.no_grad():
        a = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
        b = model(input_ids=nxt, past_key_values=cache, use_cache=True).logits
    conv_states = [layer.conv_states[0].clone() for layer in cache.layers if hasattr(layer, "conv_states")]
    return a, b, conv_states


def test_qwen3_next_fuses_every_conv_prefill_and_decode_match_eager():
    cfg, model = _tiny_qwen3_next()
    linear_layers = cfg.layer_types.count("linear_attention")
    assert linear_layers == 2
    ids, nxt = torch.randint(0, 64, (2, 7)), torch.randint(0, 64, (2, 1))
    eager = _prefill_then_decode(model, cfg, ids, nxt)

    ascend_graph.reset_stats()
    compiled = torch.compile(model, backend="ascend", options={"codegen": "fx", "fusions": ["causal_conv1d"]})
    got = _prefill_then_decode(compiled, cfg, ids, nxt)

    # one prefill graph and one decode graph, each with one fused conv per linear-attention layer
    assert ascend_graph.stats()["fusions"]["causal_conv1d"] == 2 * linear_layers
    torch.testing.assert_close(got[0], eager[0])  # prefill logits
    torch.testing.assert_close(got[1], eager[1])  # decode logits
    for g, e in zip(got[2], eager[2]):  # conv states after decode
        torch.testing.assert_close(g, e)
