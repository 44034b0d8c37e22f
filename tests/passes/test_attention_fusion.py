"""The attention fusion pass on AOT-traced graphs: exact rewrite counts, ops gone/present,
outputs on odd shapes equal to attention written out in float64 (on the CPU the fused op
and the unfused graph both run SDPA, so they are not each other's reference), and one
negative case per rejection."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import ascend_graph
from ascend_graph.config import AscendConfig
from ascend_graph.passes.fusion import attention as fusion
from tests.attention_reference import assert_close_f64, attention_f64, causal_keep

aten = torch.ops.aten
FUSED = torch.ops.ascend_graph.attention.default


def _run(fn, *inputs, device="cpu"):
    """Compile ``fn`` with the ascend backend (fx codegen, no graphs); returns (out, eager out)."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="ascend", options={"codegen": "fx", "graphs": False}, dynamic=False)
    with torch.no_grad():
        out = compiled(*inputs)
        ref = fn(*inputs)
    return out, ref


def _flat(o64):
    """[B, N, S, Dv] -> [B, S, N*Dv], as the HF-style functions below return it."""
    return o64.transpose(1, 2).reshape(o64.shape[0], o64.shape[2], -1)


def _count():
    return ascend_graph.stats()["fusions"]["attention"]


def _qkv(b=3, nq=6, nkv=2, s=5, skv=None, d=32, dv=None, dtype=torch.float32, device="cpu"):
    skv = skv or s
    g = torch.Generator(device=device).manual_seed(0)
    # HF layout: [B, S, N, D] transposed to BNSD
    q = torch.randn(b, s, nq, d, generator=g, device=device, dtype=dtype).transpose(1, 2)
    k = torch.randn(b, skv, nkv, d, generator=g, device=device, dtype=dtype).transpose(1, 2)
    v = torch.randn(b, skv, nkv, dv or d, generator=g, device=device, dtype=dtype).transpose(1, 2)
    return q, k, v


def repeat_kv(x, n):
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d)


def sdpa_repeat_kv_mask(q, k, v, mask):
    n = q.shape[1] // k.shape[1]
    o = F.scaled_dot_product_attention(q, repeat_kv(k, n), repeat_kv(v, n), attn_mask=mask, scale=0.17)
    return o.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def sdpa_gqa_causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def eager_attention(q, k, v, mask):
    n = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n), repeat_kv(v, n)
    w = torch.matmul(q, k.transpose(2, 3)) * 0.21 + mask
    w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(w, v).transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def _mask(b, s, skv, window=None, device="cpu"):
    qpos = torch.arange(s, device=device)[:, None] + (skv - s)
    kpos = torch.arange(skv, device=device)[None, :]
    keep = kpos <= qpos
    if window:
        keep &= kpos > qpos - window
    # materialised: the runtime copies graph inputs into static buffers (no stride-0 inputs)
    return keep.expand(b, 1, s, skv).contiguous()


def test_sdpa_repeat_kv_bool_mask_fused():
    q, k, v = _qkv(s=5, skv=9)
    mask = _mask(3, 5, 9, window=3)
    out, _ = _run(sdpa_repeat_kv_mask, q, k, v, mask)
    assert _count() == 1
    assert_close_f64(out, _flat(attention_f64(q, k, v, scale=0.17, keep=mask)))


def test_graph_ops_gone_and_fused_present(tmp_path):
    q, k, v = _qkv(nkv=6)
    torch._dynamo.reset()
    fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)  # noqa: E731
    compiled = torch.compile(fn, backend="ascend", options={"codegen": "fx", "graphs": False, "dump_dir": str(tmp_path)}, dynamic=False)
    with torch.no_grad():
        assert_close_f64(compiled(q, k, v), attention_f64(q, k, v, scale=0.3, keep=causal_keep(5, 5)))
    (before_file,) = tmp_path.glob("*.attention_fusion.before.py")
    (after_file,) = tmp_path.glob("*.attention_fusion.after.py")
    before, after = before_file.read_text(), after_file.read_text()
    assert "_scaled_dot_product_flash_attention_for_cpu" in before and "ascend_graph.attention" not in before
    assert "_scaled_dot_product_flash_attention_for_cpu" not in after and after.count("ascend_graph.attention.default(") == 1
    assert _count() == 1


def test_mask_not_dropped_by_a_maskless_row():
    """The matcher ignores node kwargs a pattern does not name: a row without a mask must
    not take a node with one (the mask would silently vanish)."""
    q, k, v = _qkv(nkv=6)
    mask = torch.randn(3, 6, 5, 5)  # per-head: no row may fuse it
    fn = lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.3)  # noqa: E731
    out, _ = _run(fn, q, k, v, mask)
    assert _count() == 0
    assert_close_f64(out, attention_f64(q, k, v, scale=0.3, bias=mask))


def test_sdpa_enable_gqa_causal_fused():
    q, k, v = _qkv(s=7)
    out, _ = _run(sdpa_gqa_causal, q, k, v)
    assert _count() == 1
    assert_close_f64(out, _flat(attention_f64(q, k, v, scale=1 / math.sqrt(32), keep=causal_keep(7, 7))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_eager_attention_fused(dtype):
    q, k, v = _qkv(s=6, dtype=dtype)
    mask = torch.zeros(3, 1, 6, 6, dtype=dtype).masked_fill(~_mask(3, 6, 6), torch.finfo(dtype).min)
    out, _ = _run(eager_attention, q, k, v, mask)
    assert _count() == 1
    assert_close_f64(out, _flat(attention_f64(q, k, v, scale=0.21, keep=_mask(3, 6, 6))))


def test_mla_value_head_dim_fused():
    q, k, v = _qkv(nq=4, nkv=4, d=48, dv=32)
    out, _ = _run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3), q, k, v)
    assert _count() == 1
    assert_close_f64(out, attention_f64(q, k, v, scale=0.3, keep=causal_keep(5, 5)))


# --------------------------------------------------------------------------- negative cases


def test_not_fused_head_dim_unaligned():
    q, k, v = _qkv(d=40)
    out, _ = _run(sdpa_gqa_causal, q, k, v)
    assert _count() == 0
    assert_close_f64(out, _flat(attention_f64(q, k, v, scale=1 / math.sqrt(40), keep=causal_keep(5, 5))))


def test_not_fused_head_dim_too_large():
    q, k, v = _qkv(b=1, nq=2, nkv=2, s=3, d=272)
    _run(sdpa_gqa_causal, q, k, v)
    assert _count() == 0


def test_not_fused_float64():
    q, k, v = _qkv(dtype=torch.float64)
    _run(sdpa_gqa_causal, q, k, v)
    assert _count() == 0


def test_not_fused_per_head_mask():
    q, k, v = _qkv()
    mask = _mask(3, 5, 5).expand(3, 6, 5, 5).clone()
    _run(sdpa_repeat_kv_mask, q, k, v, mask)
    assert _count() == 0


def test_not_fused_top_left_causal_on_rectangular_scores():
    # SDPA's is_causal with Sq != Skv is top-left aligned; the op (and FIA) are bottom-right
    q, k, v = _qkv(s=3, skv=8)
    out, _ = _run(sdpa_gqa_causal, q, k, v)
    assert _count() == 0
    assert_close_f64(out, _flat(attention_f64(q, k, v, scale=1 / math.sqrt(32), keep=causal_keep(3, 8, top_left=True))))


def test_not_fused_with_dropout():
    q, k, v = _qkv(nkv=6)
    gm = torch.fx.experimental.proxy_tensor.make_fx(
        lambda q, k, v: aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.1, True, scale=0.3)[0]
    , tracing_mode="fake")(q, k, v)
    assert fusion.make_pass(AscendConfig())(gm.graph) == 0


def test_family_off_gives_no_pass():
    assert fusion.make_pass(AscendConfig(fusions=("moe",))) is None
    p = fusion.make_pass(AscendConfig())
    assert p.family == "attention" and len(p.uuid()) == 16


# --------------------------------------------------------------------------- CUDA forms


#: the GPU's SDPA backends keep probabilities in half precision
_GPU_TOL = dict(atol=2e-2, rtol=2e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_sdpa_forms_fused(dtype):
    """efficient (mask), flash (causal, plain) forms as SDPA picks them on the GPU."""
    q, k, v = _qkv(nq=8, nkv=2, s=9, d=64, dtype=dtype, device="cuda")
    mask = _mask(3, 9, 9, window=4, device="cuda")
    out, _ = _run(sdpa_repeat_kv_mask, q, k, v, mask)
    assert_close_f64(out, _flat(attention_f64(q, k, v, scale=0.17, keep=mask)), **_GPU_TOL)
    out, _ = _run(sdpa_gqa_causal, q, k, v)
    assert_close_f64(out, _flat(attention_f64(q, k, v, scale=1 / 8, keep=causal_keep(9, 9, device="cuda"))), **_GPU_TOL)
    qm, km, vm = _qkv(nq=4, nkv=4, s=9, d=64, dtype=dtype, device="cuda")
    out, _ = _run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=0.1), qm, km, vm)
    assert_close_f64(out, attention_f64(qm, km, vm, scale=0.1), **_GPU_TOL)
    assert _count() == 3
