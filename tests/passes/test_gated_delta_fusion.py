"""Gated delta rule fusion: transformers' decode step -> ascend_graph.recurrent_gated_delta_rule."""

from __future__ import annotations

import copy
import glob

import pytest
import torch
import torch.nn.functional as F

import ascend_graph

OPTIONS = {"codegen": "fx", "fusions": ["gated_delta_rule"], "graphs": False}


def _hf_recurrent():
    from transformers.models.qwen3_next import modeling_qwen3_next as m

    return getattr(m.torch_recurrent_gated_delta_rule, "__wrapped__", m.torch_recurrent_gated_delta_rule)


def _decode(q, k, v, g, beta, state):
    out, new_state = _hf_recurrent()(q, k, v, g=g, beta=beta, initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=True)
    return out * 2.0, new_state  # an op after the output: the fusion must feed real users


def _decode_without_decay(q, k, v, g, beta, state):
    # the plain delta rule (no exp(g) decay): looks like the gated one, is not it
    q, k, v, beta = (x.transpose(1, 2).float() for x in (q, k, v, beta))
    q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6)
    k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    q = q / (q.shape[-1] ** 0.5)
    q_t, k_t, v_t = q[:, :, 0], k[:, :, 0], v[:, :, 0]
    kv_mem = (state * k_t.unsqueeze(-1)).sum(dim=-2)
    delta = (v_t - kv_mem) * beta[:, :, 0].unsqueeze(-1)
    state = state + k_t.unsqueeze(-1) * delta.unsqueeze(-2)
    return (state * q_t.unsqueeze(-1)).sum(dim=-2) + g.sum(), state


def _inputs(B=3, H=4, K=16, V=12):
    gen = torch.Generator().manual_seed(0)
    return (
        torch.randn(B, 1, H, K, generator=gen), torch.randn(B, 1, H, K, generator=gen),
        torch.randn(B, 1, H, V, generator=gen), F.logsigmoid(torch.randn(B, 1, H, generator=gen)),
        torch.rand(B, 1, H, generator=gen), torch.randn(B, H, K, V, generator=gen),
    )


def _post_pass_code(dump_dir) -> str:
    files = sorted(glob.glob(f"{dump_dir}/*.gated_delta_fusion.after.py"))
    assert files, "the gated_delta_fusion pass did not run"
    return open(files[-1]).read()


def test_decode_step_fuses_and_matches(tmp_path):
    torch._dynamo.reset()
    args = _inputs()
    want = _decode(*args)
    got = torch.compile(_decode, backend="ascend", options={**OPTIONS, "dump_dir": str(tmp_path)})(*args)
    assert ascend_graph.stats()["fusions"]["gated_delta_rule"] == 1
    code = _post_pass_code(tmp_path)
    assert "ascend_graph.recurrent_gated_delta_rule" in code
    assert "aten.rsqrt" not in code and "aten.exp" not in code  # the l2 norms and the decay are inside the op
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)


def test_does_not_fuse_without_decay(tmp_path):
    torch._dynamo.reset()
    args = _inputs()
    want = _decode_without_decay(*args)
    got = torch.compile(_decode_without_decay, backend="ascend", options={**OPTIONS, "dump_dir": str(tmp_path)})(*args)
    assert ascend_graph.stats()["fusions"]["gated_delta_rule"] == 0
    assert "recurrent_gated_delta_rule" not in _post_pass_code(tmp_path)
    torch.testing.assert_close(got[0], want[0])


def test_make_pass_respects_config():
    from ascend_graph.config import AscendConfig
    from ascend_graph.passes.fusion import gated_delta

    assert gated_delta.make_pass(AscendConfig(fusions=("attention",))) is None
    p = gated_delta.make_pass(AscendConfig())
    assert p.family == "gated_delta_rule" and p.name == "gated_delta_fusion" and len(p.uuid()) == 16


def _tiny_qwen3_next():
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3NextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, linear_num_value_heads=4, linear_num_key_heads=2,
        linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
        mlp_only_layers=[0, 1, 2], layer_types=["linear_attention", "full_attention", "linear_attention"],
        max_position_embeddings=256,
    )
    return Qwen3NextForCausalLM(cfg).eval()


def test_qwen3_next_decode_fuses_every_linear_attention_layer():
    # Compared with the same pipeline without the fusion: the ascend pipeline's decode
    # output currently differs from eager by ~0.08 on this model even with fusions=[]
    # and cleanup off (aot_eager matches eager exactly), a capture/runtime issue outside
    # this family, reported to the lead; this test isolates what the fusion changes.
    model = _tiny_qwen3_next()
    ids = torch.randint(0, 128, (3, 37), generator=torch.Generator().manual_seed(1))
    nxt = torch.randint(0, 128, (3, 1), generator=torch.Generator().manual_seed(2))
    results = {}
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        for fusions in ([], ["gated_delta_rule"]):
            torch._dynamo.reset()
            ascend_graph.reset_stats()
            compiled = torch.compile(model, backend="ascend", options={**OPTIONS, "fusions": fusions})
            results[bool(fusions)] = compiled(nxt, past_key_values=copy.deepcopy(cache), use_cache=True).logits
            fused = ascend_graph.stats()["fusions"]["gated_delta_rule"]
    linear_layers = sum(t == "linear_attention" for t in model.config.layer_types)
    assert fused == linear_layers
    torch.testing.assert_close(results[True], results[False], atol=1e-5, rtol=1e-5)
