"""Gated delta rule fusion: transformers' fallbacks -> ascend_graph's ops.

Decode: the one-token step of ``torch_recurrent_gated_delta_rule`` -> ``recurrent_gated_delta_rule``.
Prefill: ``torch_chunk_gated_delta_rule`` with its chunk loop unrolled by Dynamo ->
``chunk_gated_delta_rule``, for sequence lengths that are and are not multiples of 64, with
and without an initial state. Outputs are compared with eager.
"""

from __future__ import annotations

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
    # the updated recurrent state too: a wrong rewrite of the state update would leave the
    # output of this step intact and only show in the next one
    assert not torch.allclose(want[1], args[5])  # the step does change the state
    torch.testing.assert_close(got[1], want[1])


def test_make_pass_respects_config():
    from ascend_graph.config import AscendConfig
    from ascend_graph.passes.fusion import gated_delta

    assert gated_delta.make_pass(AscendConfig(fusions=("attention",))) is None
    p = gated_delta.make_pass(AscendConfig())
    assert p.family == "gated_delta_rule" and p.name == "gated_delta_fusion" and len(p.uuid()) == 16


def _hf_chunk():
    from transformers.models.qwen3_next import modeling_qwen3_next as m

    return getattr(m.torch_chunk_gated_delta_rule, "__wrapped__", m.torch_chunk_gated_delta_rule)


def _prefill(q, k, v, g, beta, state):
    out, new_state = _hf_chunk()(q, k, v, g=g, beta=beta, initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=True)
    return out * 2.0, new_state


def _prefill_from_zero(q, k, v, g, beta, state):
    out, new_state = _hf_chunk()(q, k, v, g=g, beta=beta, initial_state=None, output_final_state=True, use_qk_l2norm_in_kernel=True)
    return out + state.sum(), new_state


def _prefill_output_only(q, k, v, g, beta, state):
    # output_final_state=False: the last chunk's state update is dead code, the region is smaller
    return _hf_chunk()(q, k, v, g=g, beta=beta, initial_state=state, output_final_state=False, use_qk_l2norm_in_kernel=True)[0]


def _prefill_without_l2norm(q, k, v, g, beta, state):
    # same chunked algorithm, no q/k L2 norm: the fused op would normalise, so it must not match
    return _hf_chunk()(q, k, v, g=g, beta=beta, initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=False)


def _prefill_chunk_32(q, k, v, g, beta, state):
    # chunk size 32: the same function, but not the op's 64-token WY blocks
    return _hf_chunk()(q, k, v, g=g, beta=beta, chunk_size=32, initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=True)


def _prefill_inputs(B=2, T=130, H=4, K=16, V=12, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, T, H, K, generator=gen).to(dtype), torch.randn(B, T, H, K, generator=gen).to(dtype),
        torch.randn(B, T, H, V, generator=gen).to(dtype), F.logsigmoid(torch.randn(B, T, H, generator=gen)),
        torch.rand(B, T, H, generator=gen).to(dtype), torch.randn(B, H, K, V, generator=gen) * 0.1,
    )


def _compile_and_check(fn, args, tmp_path, want_fused, atol=1e-5):
    torch._dynamo.reset()
    ascend_graph.reset_stats()
    want = fn(*args)
    got = torch.compile(fn, backend="ascend", options={**OPTIONS, "dump_dir": str(tmp_path)})(*args)
    assert ascend_graph.stats()["fusions"]["gated_delta_rule"] == want_fused
    code = _post_pass_code(tmp_path)
    for w, g in zip(want if isinstance(want, tuple) else (want,), got if isinstance(got, tuple) else (got,)):
        torch.testing.assert_close(g.float(), w.float(), atol=atol, rtol=atol)
    return code


@pytest.mark.parametrize(
    "fn,T,dtype",
    [
        (_prefill, 130, torch.float32),  # 3 chunks, 62 padded positions, initial state
        (_prefill_from_zero, 128, torch.float32),  # exactly 2 chunks (zero-length pad), no initial state
        (_prefill_output_only, 70, torch.float32),  # no final state asked for
        (_prefill, 64, torch.bfloat16),  # bf16 inputs: HF's casts to fp32 are inside the region
    ],
)
def test_prefill_unrolled_chunk_loop_fuses_and_matches(tmp_path, fn, T, dtype):
    code = _compile_and_check(fn, _prefill_inputs(T=T, dtype=dtype), tmp_path, want_fused=1, atol=1e-2 if dtype == torch.bfloat16 else 1e-5)
    assert code.count("ascend_graph.chunk_gated_delta_rule") == 1
    # the WY solve, the per-chunk matmuls and the output scatter are all inside the op
    for gone in ("linalg_solve_triangular", "aten.bmm", "select_scatter", "aten.cumsum"):
        assert gone not in code


@pytest.mark.parametrize("fn", [_prefill_without_l2norm, _prefill_chunk_32])
def test_prefill_lookalikes_do_not_fuse(tmp_path, fn):
    code = _compile_and_check(fn, _prefill_inputs(T=70), tmp_path, want_fused=0)
    assert "chunk_gated_delta_rule" not in code and "linalg_solve_triangular" in code


def test_prefill_row_is_built_once_per_signature():
    from ascend_graph.passes.fusion import gated_delta

    torch._dynamo.reset()
    gated_delta._rows.clear()
    fn = torch.compile(_prefill, backend="ascend", options=OPTIONS)
    fn(*_prefill_inputs(T=100, seed=1))
    torch._dynamo.reset()
    fn = torch.compile(_prefill, backend="ascend", options=OPTIONS)
    fn(*_prefill_inputs(T=100, seed=2))
    assert len(gated_delta._rows) == 1


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


def test_qwen3_next_prefill_and_decode_fuse_every_linear_attention_layer():
    from transformers.cache_utils import DynamicCache

    model = _tiny_qwen3_next()
    linear_layers = model.config.layer_types.count("linear_attention")
    ids = torch.randint(0, 128, (2, 37), generator=torch.Generator().manual_seed(1))
    nxt = torch.randint(0, 128, (2, 1), generator=torch.Generator().manual_seed(2))

    def run(m):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            prefill = m(ids, past_key_values=cache, use_cache=True).logits
            decode = m(nxt, past_key_values=cache, use_cache=True).logits
        return prefill, decode

    want = run(model)
    torch._dynamo.reset()
    ascend_graph.reset_stats()
    got = run(torch.compile(model, backend="ascend", options=OPTIONS))
    stats = ascend_graph.stats()
    assert stats["graphs_compiled"] == 2  # one prefill graph, one decode graph
    assert stats["fusions"]["gated_delta_rule"] == 2 * linear_layers  # every layer, in each graph
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("codegen", ["fx", "inductor"])
def test_prefill_fuses_on_cuda_and_matches_eager(codegen):
    args = tuple(x.cuda() for x in _prefill_inputs(T=200, dtype=torch.bfloat16))
    torch._dynamo.reset()
    ascend_graph.reset_stats()
    want = _prefill(*args)
    got = torch.compile(_prefill, backend="ascend", options={**OPTIONS, "codegen": codegen})(*args)
    assert ascend_graph.stats()["fusions"]["gated_delta_rule"] == 1
    torch.testing.assert_close(got[0].float(), want[0].float(), atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(got[1], want[1], atol=3e-2, rtol=3e-2)


def _compile_dynamic_and_check(batches_and_lengths, tmp_path):
    # dynamic=True, the head count and head sizes static as a model's are (its weights fix
    # them): B and T symbolic, and the chunk count an expression of T the loop specialises
    torch._dynamo.reset()
    ascend_graph.reset_stats()
    compiled = torch.compile(_prefill, backend="ascend", options={**OPTIONS, "dump_dir": str(tmp_path)}, dynamic=True)
    for B, T in batches_and_lengths:
        args = _prefill_inputs(B=B, T=T)
        for x in args[:5]:
            for d in range(2, x.dim()):
                torch._dynamo.mark_static(x, d)
        for d in (1, 2, 3):
            torch._dynamo.mark_static(args[5], d)
        got, want = compiled(*args), _prefill(*args)
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    return _post_pass_code(tmp_path)


def test_prefill_with_symbolic_length_fuses(tmp_path):
    # one graph serves B=2, T=100 and B=3, T=103 (two chunks each): the row is traced in
    # the graph's shape environment and its size arguments are wildcards
    code = _compile_dynamic_and_check([(2, 100), (3, 103)], tmp_path)
    assert ascend_graph.stats()["graphs_compiled"] == 1
    assert ascend_graph.stats()["fusions"]["gated_delta_rule"] == 1
    assert code.count("ascend_graph.chunk_gated_delta_rule") == 1 and "linalg_solve_triangular" not in code


@pytest.mark.slow
def test_prefill_with_symbolic_length_fuses_in_the_row_loop_branch(tmp_path, monkeypatch):
    # what torch 2.11 (the GPU machine) traces: unfused, the 63 unrolled rows under
    # symbolic shapes took 529 s to compile on the CPU (Qwen3-Next, conformance case)
    from transformers.models.qwen3_next import modeling_qwen3_next as m

    monkeypatch.setattr(m, "is_torchdynamo_exporting", lambda: True)
    code = _compile_dynamic_and_check([(2, 17), (3, 20)], tmp_path)
    assert ascend_graph.stats()["fusions"]["gated_delta_rule"] == 1
    assert code.count("ascend_graph.chunk_gated_delta_rule") == 1 and "slice_scatter" not in code


def test_prefill_symbolic_lengths_that_are_not_provably_equal_do_not_fuse(tmp_path):
    # q and k marked dynamic one by one get their own length symbols: only the chunk
    # counts are guarded equal, so the op (one length for all) would be an assumption
    torch._dynamo.reset()
    ascend_graph.reset_stats()
    args = _prefill_inputs(T=100)
    for x in args[:5]:
        torch._dynamo.mark_dynamic(x, 1)
    got = torch.compile(_prefill, backend="ascend", options=OPTIONS)(*args)
    want = _prefill(*args)
    assert ascend_graph.stats()["fusions"]["gated_delta_rule"] == 0
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T", [70, 17])
def test_prefill_row_loop_branch_fuses(tmp_path, monkeypatch, T):
    # HF's other branch: the UT system inverted by a Python row loop (Dynamo unrolls it too).
    # torch 2.11 (the GPU machine) traces this branch under torch.compile; here it is forced.
    # T=17, one chunk (the conformance matrix's prompts): the graph kept a dead select of
    # HF's output buffer after remove_noop_ops, and the region never fused
    from transformers.models.qwen3_next import modeling_qwen3_next as m

    monkeypatch.setattr(m, "is_torchdynamo_exporting", lambda: True)
    code = _compile_and_check(_prefill, _prefill_inputs(T=T), tmp_path, want_fused=1)
    assert "ascend_graph.chunk_gated_delta_rule" in code and "slice_scatter" not in code


def test_symbolic_candidates_tell_q_and_k_from_v_by_their_l2_norm(tmp_path):
    # K == V and v in another layout than q and k (Qwen3-Next's: one of them is a view of
    # the conv output transposed): every size agrees, only the strides tell the layouts
    # apart, and each wrong guess of which is q costs a whole symbolic trace. The layout
    # here is the one whose strides print first, which candidates ordered by name alone
    # tried as q's. q and k are the ones HF L2-normalises: one trace, the right one
    from ascend_graph.passes.fusion import gated_delta

    torch._dynamo.reset()
    ascend_graph.reset_stats()
    gated_delta._traced.clear()
    gated_delta._rows.clear()
    compiled = torch.compile(_prefill, backend="ascend", options=OPTIONS, dynamic=True)
    for B, T in [(2, 100), (3, 103)]:
        q, k, _, g, beta, state = _prefill_inputs(B=B, T=T, K=16, V=16)
        conv_out = torch.randn(B, 64, T, generator=torch.Generator().manual_seed(3))
        v = conv_out.transpose(1, 2).reshape(B, T, 4, 16)
        args = (q, k, v, g, beta, state)
        for x in (q, k, g, beta):
            for d in range(2, x.dim()):
                torch._dynamo.mark_static(x, d)
        torch._dynamo.mark_static(conv_out, 1)
        for d in (1, 2, 3):
            torch._dynamo.mark_static(state, d)
        got, want = compiled(*args), _prefill(*args)
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    assert ascend_graph.stats()["fusions"]["gated_delta_rule"] == 1
    assert len(gated_delta._traced) == 1, list(gated_delta._traced)
