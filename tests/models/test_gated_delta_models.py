"""Whole HF model: tiny random-weight Qwen3-Next, the delta rule of every linear-attention layer fused.

A prompt of 64 tokens (exactly one chunk: the zero-length pad), then a second prefill of
23 tokens over the cached prefix (HF runs the chunked fallback from the cached recurrent
state), then a decode step; every step is compared with eager, and so are the recurrent
states the cache holds afterwards (the fused ops must write them where HF writes them).
``dynamic=False``: with automatic dynamic shapes the second prefill length would make
Dynamo recompile with a symbolic sequence length, which this fusion leaves to the torch
fallback (see ``passes/fusion/gated_delta.py``).
"""

from __future__ import annotations

import torch

import ascend_graph

OPTIONS = {"codegen": "fx", "fusions": ["gated_delta_rule"], "graphs": False}


def _tiny_qwen3_next():
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    cfg = Qwen3NextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, linear_num_value_heads=4, linear_num_key_heads=2,
        linear_key_head_dim=16, linear_value_head_dim=8, linear_conv_kernel_dim=4,
        num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0, 1, 2], full_attention_interval=3,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    return cfg, Qwen3NextForCausalLM(cfg).eval()


def _steps(model, cfg, inputs):
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache(config=cfg)
    with torch.no_grad():
        logits = [model(input_ids=x, past_key_values=cache, use_cache=True).logits for x in inputs]
    states = [layer.recurrent_states[0].clone() for layer in cache.layers if getattr(layer, "recurrent_states", None) is not None]
    return logits, states


def test_qwen3_next_prefill_cached_prefix_and_decode_fuse_every_layer_and_match_eager():
    cfg, model = _tiny_qwen3_next()
    linear_layers = cfg.layer_types.count("linear_attention")
    assert linear_layers == 2
    gen = torch.Generator().manual_seed(3)
    inputs = [torch.randint(0, 64, (2, n), generator=gen) for n in (64, 23, 1)]
    want_logits, want_states = _steps(model, cfg, inputs)

    torch._dynamo.reset()
    ascend_graph.reset_stats()
    compiled = torch.compile(model, backend="ascend", options=OPTIONS, dynamic=False)
    got_logits, got_states = _steps(compiled, cfg, inputs)

    stats = ascend_graph.stats()
    assert stats["graphs_compiled"] == 3  # prefill from nothing, prefill over the prefix, decode
    assert stats["fusions"]["gated_delta_rule"] == 3 * linear_layers
    for got, want in zip(got_logits, want_logits):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert len(got_states) == len(want_states) == linear_layers
    for got, want in zip(got_states, want_states):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_qwen3_next_bf16_prefill_and_decode_fuse_every_layer_and_match_eager():
    """A bf16 model: HF's casts to fp32 stay in the graph (the decode step has its own row)."""
    cfg, model = _tiny_qwen3_next()
    model = model.to(torch.bfloat16)
    linear_layers = cfg.layer_types.count("linear_attention")
    gen = torch.Generator().manual_seed(4)
    inputs = [torch.randint(0, 64, (2, n), generator=gen) for n in (9, 1)]
    want_logits, want_states = _steps(model, cfg, inputs)

    torch._dynamo.reset()
    ascend_graph.reset_stats()
    compiled = torch.compile(model, backend="ascend", options=OPTIONS, dynamic=False)
    got_logits, got_states = _steps(compiled, cfg, inputs)

    assert ascend_graph.stats()["fusions"]["gated_delta_rule"] == 2 * linear_layers
    for got, want in zip(got_logits, want_logits):
        torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)
    for got, want in zip(got_states, want_states):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
