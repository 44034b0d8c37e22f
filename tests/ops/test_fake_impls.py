"""Every ``ascend_graph`` custom op's fake impl against its real CPU implementation.

A fake that disagrees with the real op (a size, a stride, a dtype) is caught only at
capture time otherwise, as inductor's ``assert_size_stride`` on a padded bucket (issue
#18: "expected size 4==3 ... incorrect fake kernel"). ``torch.library.opcheck``'s
``test_faketensor`` runs the op for real and under fake tensors and compares every
output's metadata. Each op runs on plain shapes and on the shapes a bucketed runner
gives it: padded rows (an ``active_mask`` off, a slot of -1, rows past ``cu_seqlens[-1]``),
masks that broadcast over the batch, and non-contiguous (HF transposed) inputs.

A new custom op must be added to :data:`CASES`: :func:`test_every_op_has_a_case` fails
otherwise.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ascend_graph.ops  # noqa: F401  (registers every op)

ops = torch.ops.ascend_graph


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _r(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=_g(seed)).to(dtype)


# --------------------------------------------------------------------------- cases


def _attention_cases():
    b, s, d = 4, 17, 16
    q = _r(b, s, 4, d, seed=1).transpose(1, 2)  # HF layout: [B, S, N, D] viewed as BNSD
    k, v = _r(b, s, 2, d, seed=2).transpose(1, 2), _r(b, s, 2, d, seed=3).transpose(1, 2)
    pad_mask = torch.ones(b, 1, s, s, dtype=torch.bool)
    pad_mask[3] = False  # the padded row of a 3 -> 4 bucket: attends to nothing
    yield "causal_gqa", (q, k, v, None, None, 0.25, True, -1)
    yield "bool_mask_padded_row", (q, k, v, pad_mask, None, 0.25, False, -1)
    yield "float_mask_broadcast_batch", (q, k, v, torch.zeros(1, 1, s, s), None, 0.25, False, -1)
    yield "sinks_window", (q, k, v, None, _r(4, seed=4), 0.25, True, 5)
    yield "mla_dv", (_r(b, 4, s, 48), _r(b, 4, s, 48), _r(b, 4, s, 32), None, None, 0.2, True, -1)
    yield "decode_bf16", (_r(3, 4, 1, d, dtype=torch.bfloat16), _r(3, 2, 9, d, dtype=torch.bfloat16), _r(3, 2, 9, d, dtype=torch.bfloat16), None, None, 0.25, True, -1)


def _paged_inputs(nq=6, nkv=2, d=32, page=8, q_lens=(3, 1, 5), kv_lens=(13, 1, 30)):
    r, max_blocks, num_blocks = len(q_lens), 5, 20
    kc, vc = _r(num_blocks, page, nkv, d, seed=1), _r(num_blocks, page, nkv, d, seed=2)
    bt = torch.randperm(num_blocks, generator=_g(3))[: r * max_blocks].view(r, max_blocks).int()
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = _r(int(cu[-1]) + 2, nq, d, seed=4)  # two padded rows past cu[-1]
    return q, kc, vc, bt, cu, torch.tensor(kv_lens, dtype=torch.int32)


def _paged_attention_cases():
    q, kc, vc, bt, cu, lens = _paged_inputs()
    yield "padded_rows", (q, kc, vc, bt, cu, lens, None, 0.2, -1)
    yield "sinks_window", (q, kc, vc, bt, cu, lens, _r(6, seed=5), 0.2, 4)


def _reshape_and_cache_cases():
    kc, vc = torch.zeros(6, 4, 2, 16), torch.zeros(6, 4, 2, 16)
    yield "padded_slot", (_r(5, 2, 16, seed=1), _r(5, 2, 16, seed=2), kc, vc, torch.tensor([3, 17, -1, 0, 9]))


def _causal_conv1d_cases():
    c, k = 37, 4
    x, w, bias = _r(3, c, 11, seed=1), _r(c, k, seed=2), _r(c, seed=3)
    yield "states_padded_request", (x, w, bias, torch.zeros(5, c, k), None, torch.tensor([4, -1, 1]), None, "silu")
    yield "no_states", (x, w, None, None, None, None, None, "")
    # HF's [B, S, C] projection output viewed as [B, C, S]
    yield "transposed_input", (_r(3, 11, c, seed=4).transpose(1, 2), w, bias, None, None, None, None, "silu")


def _causal_conv1d_update_cases():
    c, k = 37, 4
    w, bias = _r(c, k, seed=2), _r(c, seed=3)
    yield "decode_3d", (_r(4, c, 1, seed=1), _r(4, c, k - 1, seed=5), w, bias, None, None, "silu")
    yield "decode_2d_padded_slot", (_r(2, c, seed=1), _r(3, c, k - 1, seed=5), w, None, torch.tensor([-1, 2]), None, "")


H, HK, K_DIM, V_DIM = 4, 2, 16, 16


def _gdn_inputs(lens, n_slots=9):
    t = sum(lens)
    q, k = _r(t, HK, K_DIM, seed=1), _r(t, HK, K_DIM, seed=2)
    v = _r(t, H, V_DIM, seed=3)
    g = F.logsigmoid(_r(t, H, seed=4))
    beta = torch.rand(t, H, generator=_g(5))
    cache = _r(n_slots, H, K_DIM, V_DIM, seed=6)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, g, beta, cache, cu


def _permuted(v):
    """``v`` with the same values, dense but not contiguous (strides (1, T*V, T)): the
    layout Qwen3-Next's value projection reaches the op in (a fake that kept it, as
    ``empty_like`` does, failed inductor's stride assert in the conformance matrix)."""
    return v.permute(1, 2, 0).contiguous().permute(2, 0, 1)


def _chunk_gated_delta_rule_cases():
    q, k, v, g, beta, cache, cu = _gdn_inputs([5, 9])
    yield "varlen", (q, k, v, g, beta, cache, cu, torch.tensor([3, 7], dtype=torch.int32), None, None, None, 0.3, True)
    yield "permuted_v", (q, k, _permuted(v), g, beta, cache, cu, torch.tensor([3, 7], dtype=torch.int32), None, None, None, 0.3, True)


def _recurrent_gated_delta_rule_cases():
    q, k, v, g, beta, cache, _ = _gdn_inputs([1, 1, 1])
    yield "decode_padded_slot", (q, k, v, g, beta, cache, None, torch.tensor([4, -1, 2], dtype=torch.int32), None, 0.3, False)
    yield "permuted_v", (q, k, _permuted(v), g, beta, cache, None, torch.tensor([4, -1, 2], dtype=torch.int32), None, 0.3, False)


def _moe_gating_topk_cases():
    yield "softmax", (_r(7, 6, seed=1), 2, None, "softmax", 1, 1, True, 1.0, 0.0, None)
    yield "sigmoid_grouped_bf16", (_r(5, 8, seed=2, dtype=torch.bfloat16), 2, _r(8, seed=3), "sigmoid", 2, 1, True, 2.5, 1e-20, None)
    yield "router_weight", (_r(5, 19, seed=4), 3, None, "softmax", 1, 1, False, 1.0, 0.0, _r(6, 19, seed=5))


def _moe_dispatch_ffn_combine_cases():
    t, h, e, i, k = 8, 16, 4, 8, 2
    x = _r(t, h, seed=1)
    w = torch.rand(t, k, generator=_g(2))
    ids = torch.randint(0, e, (t, k), generator=_g(3))
    w13, w2 = _r(e, 2 * i, h, seed=4), _r(e, h, i, seed=5)
    active = torch.tensor([True] * 5 + [False] * 3)  # a bucket of 8 holding 5 real rows
    yield "plain", (x, w, ids, w13, w2, "silu")
    yield "padded_rows", (x, w, ids, w13, w2, "silu", active)
    yield "shared_gated", (x, w, ids, w13, w2, "gelu", active, _r(6, h, seed=6), _r(6, h, seed=7), _r(h, 6, seed=8), "", 1, 0, _r(1, h, seed=9))
    # a transposed activation (a 3-D [B, S, H] view flattened without a copy is contiguous;
    # a column-major one is not)
    yield "strided_x", (_r(h, t, seed=10).t(), w, ids, w13, w2, "silu")
    # GptOss: biases, clipped SwiGLU, [E, H, 2I] / [E, I, H] weights as transposed views
    yield "biases_clipped_swiglu", (x, w, ids, _r(e, h, 2 * i, seed=11).transpose(1, 2), _r(e, i, h, seed=12).transpose(1, 2), "clipped_swiglu", active, None, None, None, "", 1, 0, None, _r(e, 2 * i, seed=13), _r(e, h, seed=14), 1.702, 7.0)


def _moe_dispatch_ffn_combine_list_cases():
    # per-expert weights (a ModuleList of experts): separate gate/up lists, or [gate; up] rows
    t, h, e, i, k = 8, 16, 4, 8, 2
    x = _r(t, h, seed=1)
    w = torch.rand(t, k, generator=_g(2))
    ids = torch.randint(0, e, (t, k), generator=_g(3))
    w1, w3, w2 = [_r(i, h, seed=10 + j) for j in range(e)], [_r(i, h, seed=20 + j) for j in range(e)], [_r(h, i, seed=30 + j) for j in range(e)]
    active = torch.tensor([True] * 5 + [False] * 3)
    yield "gate_up_lists", (x, w, ids, w1, w3, w2, "silu")
    yield "padded_rows", (x, w, ids, w1, w3, w2, "gelu", active)
    yield "stacked_rows_per_expert", (x, w, ids, [_r(2 * i, h, seed=40 + j) for j in range(e)], [], w2, "silu", active)
    yield "bf16", (x.bfloat16(), w.bfloat16(), ids, [v.bfloat16() for v in w1], [v.bfloat16() for v in w3], [v.bfloat16() for v in w2], "gelu_tanh")


def _norm_cases():
    x, w = _r(3, 7, 40, seed=1), _r(40, seed=2)
    yield "plain", (x, w, 1e-5, False)
    yield "gemma_bf16", (x.bfloat16(), w.bfloat16(), 1e-6, True)


def _add_rms_norm_cases():
    x, w = _r(3, 7, 40, seed=1), _r(40, seed=2)
    yield "gemma", (x, _r(3, 7, 40, seed=3), w, 1e-5, True)


def _silu_and_mul_cases():
    yield "plain", (_r(3, 10, seed=1),)
    yield "bucket_of_8", (_r(8, 74, seed=2, dtype=torch.bfloat16),)


def _silu_mul_cases():
    yield "plain", (_r(3, 5, seed=1), _r(3, 5, seed=2))


def _rope_inputs():
    return _r(2, 3, 4, 16, seed=1), _r(2, 3, 2, 16, seed=2), _r(2, 3, 12, seed=3)


def _qk_norm_rope_cases():
    q, k, cs = _rope_inputs()
    yield "q_norm_only", (q, k, _r(16, seed=4), None, cs, cs, 1e-6, False, False)


def _norm_rope_cases():
    q, _, cs = _rope_inputs()
    yield "half_table_partial", (q, _r(16, seed=4), cs[..., :6], cs[..., :6], 1e-6, False, False, 12)


def _qk_norm_rope_cache_cases():
    kc = torch.zeros(2, 4, 2, 16)
    yield "padded_slot", (_r(3, 128, seed=1), None, None, _r(3, 16, seed=2), _r(3, 16, seed=3), kc, kc.clone(), torch.tensor([1, -1, 6]), 4, 2, 1e-6)


#: ops whose real implementation needs more than one process: their fakes are checked where
#: the processes are (moe_combine_add_rms_norm: tests/ops/test_comm_norm_ops.py, EP ranks)
MULTI_PROCESS = {"moe_combine_add_rms_norm"}

#: op name -> case builder. The vLLM adapter ops (``vllm_*``) are registered only when
#: ``ascend_graph.integrations`` is imported (the core never imports it); they wrap vLLM's
#: own kernels and are checked in tests/integrations.
CASES = {
    "attention": _attention_cases,
    "paged_attention": _paged_attention_cases,
    "reshape_and_cache": _reshape_and_cache_cases,
    "causal_conv1d": _causal_conv1d_cases,
    "causal_conv1d_update": _causal_conv1d_update_cases,
    "chunk_gated_delta_rule": _chunk_gated_delta_rule_cases,
    "recurrent_gated_delta_rule": _recurrent_gated_delta_rule_cases,
    "moe_gating_topk": _moe_gating_topk_cases,
    "moe_dispatch_ffn_combine": _moe_dispatch_ffn_combine_cases,
    "moe_dispatch_ffn_combine_list": _moe_dispatch_ffn_combine_list_cases,
    "rms_norm": _norm_cases,
    "add_rms_norm": _add_rms_norm_cases,
    "silu_and_mul": _silu_and_mul_cases,
    "silu_mul": _silu_mul_cases,
    "qk_norm_rope": _qk_norm_rope_cases,
    "norm_rope": _norm_rope_cases,
    "qk_norm_rope_cache": _qk_norm_rope_cache_cases,
}


def _core_ops() -> set[str]:
    """Every op the core package registers in the ``ascend_graph`` namespace."""
    import torch._library.simple_registry  # noqa: F401

    names = set()
    for schema in torch._C._jit_get_all_schemas():
        if schema.name.startswith("ascend_graph::"):
            names.add(schema.name.split("::", 1)[1])
    return {n for n in names if not n.startswith("vllm_")}


def test_every_op_has_a_case():
    assert _core_ops() - MULTI_PROCESS == set(CASES), "add a case for each new ascend_graph op to CASES"


@pytest.mark.parametrize(
    "op_name,case,args",
    [(name, case, args) for name, build in CASES.items() for case, args in build()],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_fake_matches_real(op_name, case, args):
    """Output sizes, strides and dtypes of the fake equal the real CPU op's."""
    op = getattr(ops, op_name).default
    # clone mutated inputs per run: opcheck runs the op more than once
    torch.library.opcheck(op, args, test_utils=("test_faketensor",))


def _to(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(y, device) for y in x)
    return x


@pytest.mark.cuda
@pytest.mark.parametrize(
    "op_name,case,args",
    [(name, case, args) for name, build in CASES.items() for case, args in build()],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_fake_matches_real_cuda(op_name, case, args):
    """The same against the CUDA kernels (Triton, SDPA backends): each must keep the fake's layout."""
    op = getattr(ops, op_name).default
    torch.library.opcheck(op, _to(args, "cuda"), test_utils=("test_faketensor",))
