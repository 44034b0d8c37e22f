"""Attention forms added for the conformance matrix (issue #18): SDPA's math path with its
own GQA expansion (what CUDA runs for fp32 GQA models), checked on the CPU by forcing
SDPA's math backend while tracing, and on the GPU as torch picks it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import ascend_graph
from tests.passes.test_attention_fusion import _count, _mask, _qkv, _run, sdpa_gqa_causal, sdpa_repeat_kv_mask


def _run_math(fn, *inputs):
    """Trace and run with SDPA restricted to its math backend (the fp32 CUDA form)."""
    with sdpa_kernel(SDPBackend.MATH):
        return _run(fn, *inputs)


def sdpa_gqa_plain(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, scale=0.2, enable_gqa=True).transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


@pytest.mark.parametrize("fn", [sdpa_gqa_causal, sdpa_gqa_plain], ids=["causal", "plain"])
def test_math_gqa_fused(fn):
    q, k, v = _qkv(b=3, nq=6, nkv=2, s=7, d=32)
    out, ref = _run_math(fn, q, k, v)
    assert _count() == 1
    torch.testing.assert_close(out, ref)


def test_math_repeat_kv_mask_fused():
    q, k, v = _qkv(s=5, skv=9)
    mask = _mask(3, 5, 9, window=3)
    out, ref = _run_math(sdpa_repeat_kv_mask, q, k, v, mask)
    assert _count() == 1
    torch.testing.assert_close(out, ref)


def test_math_gqa_decode_fused():
    """One query token over a contiguous (concatenated) cache."""
    q, _, _ = _qkv(b=3, nq=6, nkv=2, s=1, d=32)
    k, v = (torch.randn(3, 2, 9, 32) for _ in range(2))
    out, ref = _run_math(sdpa_gqa_plain, q.contiguous(), k, v)
    assert _count() == 1
    torch.testing.assert_close(out, ref)


def test_math_gqa_not_fused_unaligned_head_dim():
    q, k, v = _qkv(b=3, nq=6, nkv=2, s=7, d=24)  # FIA takes head dims in multiples of 16
    out, ref = _run_math(sdpa_gqa_causal, q, k, v)
    assert _count() == 0
    torch.testing.assert_close(out, ref)


@pytest.mark.cuda
def test_cuda_fp32_gqa_fused():
    """fp32 on CUDA: no flash kernel, and enable_gqa keeps the efficient kernel out: math."""
    q, k, v = _qkv(nq=8, nkv=2, s=9, d=64, device="cuda")
    out, ref = _run(sdpa_gqa_causal, q, k, v)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    mask = _mask(3, 9, 9, window=4, device="cuda")
    out, ref = _run(sdpa_repeat_kv_mask, q, k, v, mask)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert _count() == 2


@pytest.mark.cuda
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_cuda_fp32_models_fuse_every_attention_layer(arch):
    from tests.models.archs import ARCHS, build_arch, forward_output

    model = build_arch(arch, torch.float32).cuda()
    ids = torch.randint(3, 131, (3, 17), device="cuda")
    compiled = torch.compile(model, backend="ascend", dynamic=False, options={"graphs": False})
    with torch.no_grad():
        torch.testing.assert_close(forward_output(ARCHS[arch], compiled, ids), forward_output(ARCHS[arch], model, ids), atol=1e-4, rtol=1e-4)
    assert ascend_graph.stats()["fusions"]["attention"] == ARCHS[arch].expected["attention"]


# --------------------------------------------------------------------------- GptOss sinks


def gpt_oss_eager(q, k, v, mask, sinks):
    """transformers' GptOss ``eager_attention_forward`` (5.x), q/k from rope's cat."""
    n = q.shape[1] // k.shape[1]
    from tests.passes.test_attention_fusion import repeat_kv

    k, v = repeat_kv(k, n), repeat_kv(v, n)
    w = torch.matmul(q, k.transpose(2, 3)) * 0.25
    if mask is not None:
        w = w + mask
    s = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
    combined = torch.cat([w, s], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    probs = F.softmax(combined, dim=-1, dtype=combined.dtype)
    out = torch.matmul(probs[..., :-1].to(v.dtype), v)
    return out.transpose(1, 2).contiguous().reshape(q.shape[0], q.shape[2], -1)


def _sinks_inputs(dtype, s=7, skv=7):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 6, s, 32, generator=g).to(dtype)  # contiguous: GptOss's rope ends in a cat
    k, v = (torch.randn(3, 2, skv, 32, generator=g).to(dtype) for _ in range(2))
    sinks = torch.randn(6, generator=g).to(dtype)
    mask = torch.zeros(3, 1, s, skv, dtype=dtype).masked_fill(~_mask(3, s, skv, window=4), torch.finfo(dtype).min)
    return q, k, v, mask, sinks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpt_oss_sinks_fused(dtype):
    q, k, v, mask, sinks = _sinks_inputs(dtype)
    out, ref = _run(gpt_oss_eager, q, k, v, mask, sinks)
    assert _count() == 1
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


def test_gpt_oss_sinks_fused_with_the_scale_as_a_graph_input():
    """GptOss under dynamic=True: Dynamo keeps ``self.scaling`` as a 0-dim tensor input, not
    a constant; the replacement folds it into q (the op's scale is a float)."""
    q, k, v, mask, sinks = _sinks_inputs(torch.float32)

    def tensor_scaled(q, k, v, mask, sinks, scale):
        n = q.shape[1] // k.shape[1]
        from tests.passes.test_attention_fusion import repeat_kv

        k, v = repeat_kv(k, n), repeat_kv(v, n)
        w = torch.matmul(q, k.transpose(2, 3)) * scale + mask
        s = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
        combined = torch.cat([w, s], dim=-1)
        combined = combined - combined.max(dim=-1, keepdim=True).values
        probs = F.softmax(combined, dim=-1, dtype=combined.dtype)
        return torch.matmul(probs[..., :-1].to(v.dtype), v).transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)

    out, ref = _run(tensor_scaled, q, k, v, mask, sinks, torch.tensor(0.3))
    assert _count() == 1
    torch.testing.assert_close(out, ref)


def test_gpt_oss_sinks_decode_fused():
    q, k, v, mask, sinks = _sinks_inputs(torch.float32, s=1, skv=9)
    out, ref = _run(gpt_oss_eager, q, k, v, mask, sinks)
    assert _count() == 1
    torch.testing.assert_close(out, ref)


def test_sinks_not_fused_per_batch_sinks():
    """Sinks must be one logit per query head; a [B, N] tensor is another computation."""
    q, k, v, mask, _ = _sinks_inputs(torch.float32)

    def per_batch(q, k, v, mask, sinks2d):
        n = q.shape[1] // k.shape[1]
        from tests.passes.test_attention_fusion import repeat_kv

        k, v = repeat_kv(k, n), repeat_kv(v, n)
        w = torch.matmul(q, k.transpose(2, 3)) * 0.25 + mask
        combined = torch.cat([w, sinks2d[:, :, None, None].expand(-1, -1, q.shape[2], -1)], dim=-1)
        probs = F.softmax(combined - combined.max(dim=-1, keepdim=True).values, dim=-1, dtype=combined.dtype)
        return torch.matmul(probs[..., :-1], v).transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)

    out, ref = _run(per_batch, q, k, v, mask, torch.randn(3, 6))
    assert _count() == 0
    torch.testing.assert_close(out, ref)


def test_eager_softmax_over_query_dim_not_fused():
    """The eager rows match without a re-trace (their ints are wildcards): a softmax over
    the query dim has the same ops and must still be rejected (``_int_args_hold``)."""
    from tests.passes.test_attention_fusion import repeat_kv

    def softmax_over_queries(q, k, v, mask):
        n = q.shape[1] // k.shape[1]
        k, v = repeat_kv(k, n), repeat_kv(v, n)
        w = torch.matmul(q, k.transpose(2, 3)) * 0.21 + mask
        w = F.softmax(w, dim=-2, dtype=torch.float32).to(q.dtype)
        return torch.matmul(w, v).transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)

    q, k, v = _qkv(s=6)
    mask = torch.zeros(3, 1, 6, 6).masked_fill(~_mask(3, 6, 6), torch.finfo(torch.float32).min)
    out, ref = _run(softmax_over_queries, q, k, v, mask)
    assert _count() == 0
    torch.testing.assert_close(out, ref)


# --------------------------------------------------------------------------- CUDA's aligned bias


def _efficient_with_aligned_bias(q, k, v, keep):
    """What torch 2.11 traces for an fp32 GQA model with a mask on CUDA (read from the
    H200's graph): repeat_kv, the mask as an additive bias padded to an aligned last dim
    and sliced back, expanded to every head, then the efficient kernel."""
    aten = torch.ops.aten
    b, nkv, s, d = k.shape
    n = q.shape[1] // nkv

    def rep(x):
        return aten.view(aten.clone(aten.expand(aten.unsqueeze(x, 2), [b, nkv, n, s, d]), memory_format=torch.contiguous_format), [b, nkv * n, s, d])

    bias = aten.where(keep, torch.zeros((), dtype=q.dtype, device=q.device), torch.full((), float("-inf"), dtype=q.dtype, device=q.device))
    skv = keep.shape[-1]
    pad = (-skv) % 16
    if pad:
        bias = aten.slice(aten.constant_pad_nd(bias, [0, pad], 0.0), -1, 0, skv)
    bias = aten.expand(bias, [b, nkv * n, q.shape[2], skv])
    out = aten._scaled_dot_product_efficient_attention(q, rep(k), rep(v), bias, False, scale=0.17)[0]
    return aten.view(aten.permute(out, [0, 2, 1, 3]), [b, q.shape[2], -1])


def _fake_graph(fn, *args):
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(fn, tracing_mode="fake")(*args)
    gm.graph.eliminate_dead_code()  # the unused outputs of the SDPA op, as AOT leaves the graph
    return gm


@pytest.mark.parametrize("s", [9, 16])
def test_cuda_aligned_bias_form_fused_and_the_mask_reaches_the_op(s):
    from ascend_graph.passes.fusion import attention as A

    q, k, v = _qkv(nq=8, nkv=2, s=s, d=64)
    keep = _mask(3, s, s, window=4)
    gm = _fake_graph(_efficient_with_aligned_bias, q, k, v, keep)
    assert any(n.target is torch.ops.aten.constant_pad_nd.default for n in gm.graph.nodes) == (s % 16 != 0)
    p = A.make_pass(ascend_graph.AscendConfig())
    assert p(gm.graph) == 1
    gm.graph.eliminate_dead_code()
    ops = [n for n in gm.graph.nodes if n.target is torch.ops.ascend_graph.attention.default]
    assert len(ops) == 1
    mask = ops[0].args[3].meta["val"]
    assert tuple(mask.shape) == (3, 1, s, s)  # the model's mask, not the padded per-head bias
    assert not any(n.target in A._BIAS_OPS or n.target is torch.ops.aten.constant_pad_nd.default for n in gm.graph.nodes)


def test_cuda_aligned_bias_is_put_back_where_nothing_fused():
    """A node the table does not take (head dim 24) keeps its aligned bias."""
    from ascend_graph.passes.fusion import attention as A

    q, k, v = _qkv(nq=8, nkv=2, s=9, d=24)
    gm = _fake_graph(_efficient_with_aligned_bias, q, k, v, _mask(3, 9, 9, window=4))
    before = [n for n in gm.graph.nodes if n.target in A._BIAS_OPS][0].args[3]
    assert A.make_pass(ascend_graph.AscendConfig())(gm.graph) == 0
    node = [n for n in gm.graph.nodes if n.target in A._BIAS_OPS][0]
    assert node.args[3] is before and before.target is torch.ops.aten.expand.default
