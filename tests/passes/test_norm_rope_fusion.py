"""passes/fusion/norm_rope.py: HF's norms, residual adds, q/k norm + RoPE and SiLU-mul fuse
into the norm_rope ops (exact counts, ops gone/present, outputs equal on odd shapes), one
negative case per row, and the per-device policy (CPU + inductor: skipped, in stats())."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

import ascend_graph
from ascend_graph.capture.trace import decompositions
from ascend_graph.config import AscendConfig
from ascend_graph.passes.fusion import norm_rope as fusion

aten = torch.ops.aten
ag = torch.ops.ascend_graph
BF = torch.bfloat16


def _trace(fn, *args):
    with torch.no_grad():
        return make_fx(fn, decomposition_table=decompositions(), tracing_mode="fake")(*args)


def _run_pass(gm, codegen="fx"):
    n = fusion.make_pass(AscendConfig(codegen=codegen))(gm.graph)
    gm.graph.lint()
    gm.recompile()
    return n


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _fused(fn, *args, count, tol=0.0):
    """Trace, fuse, and compare the fused graph with the unfused one on the same inputs."""
    gm = _trace(fn, *args)
    ref = gm(*args)
    assert _run_pass(gm) == count
    out = gm(*args)
    for a, b in zip(out if isinstance(out, (tuple, list)) else [out], ref if isinstance(ref, (tuple, list)) else [ref]):
        # the references do HF's ops, rounding for rounding; fp32 silu differs in the last
        # bit (the graph's x / (1 + exp(-x)) against eager's x * sigmoid(x))
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    return gm


# --- the forms as HF transformers 5.x writes them --------------------------------------


def llama_rms(x, w, eps=1e-6):  # LlamaRMSNorm / Qwen3RMSNorm / DeepseekV3RMSNorm
    dt = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(dt)


def gemma_rms(x, w, eps=1e-6):  # Gemma3RMSNorm
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + w.float())).type_as(x)


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def _rope_tables(b, s, d, dtype):
    ang = torch.randn(b, s, d // 2)
    emb = torch.cat((ang, ang), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


# --- rows -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [BF, torch.float32])
@pytest.mark.parametrize("gemma", [False, True])
def test_rms_norm_fuses(dtype, gemma):
    norm = gemma_rms if gemma else llama_rms
    x, w = torch.randn(3, 5, 72, dtype=dtype), torch.randn(72, dtype=dtype)
    gm = _fused(lambda x, w: norm(x, w) * 2, x, w, count=1)
    t = _targets(gm)
    assert ag.rms_norm.default in t and aten.rsqrt.default not in t and aten.mean.dim not in t


@pytest.mark.parametrize("dtype", [BF, torch.float32])
@pytest.mark.parametrize("gemma", [False, True])
def test_residual_add_rms_norm_fuses_with_both_outputs(dtype, gemma):
    norm = gemma_rms if gemma else llama_rms

    def layer(h, attn_out, w):  # residual = h; h = residual + attn_out; norm(h); both used
        s = h + attn_out
        return norm(s, w) * 3, s

    x, r, w = torch.randn(2, 7, 40, dtype=dtype), torch.randn(2, 7, 40, dtype=dtype), torch.randn(40, dtype=dtype)
    gm = _fused(layer, x, r, w, count=1)
    t = _targets(gm)
    assert ag.add_rms_norm.default in t and ag.rms_norm.default not in t and aten.rsqrt.default not in t


@pytest.mark.parametrize("dtype", [BF, torch.float32])
def test_qwen3_qk_norm_rope_fuses(dtype):
    def attn_in(q, k, qw, kw, cos, sin):
        qn = llama_rms(q, qw).transpose(1, 2)
        kn = llama_rms(k, kw).transpose(1, 2)
        return apply_rope(qn, kn, cos, sin)

    q, k = torch.randn(3, 5, 6, 16, dtype=dtype), torch.randn(3, 5, 2, 16, dtype=dtype)
    qw, kw = torch.randn(16, dtype=dtype), torch.randn(16, dtype=dtype)
    cos, sin = _rope_tables(1, 5, 16, dtype)  # HF: one position row shared over the batch
    gm = _fused(attn_in, q, k, qw, kw, cos, sin, count=1)
    t = _targets(gm)
    assert t.count(ag.qk_norm_rope.default) == 1
    assert aten.cat.default not in t and aten.neg.default not in t and aten.rsqrt.default not in t


def test_gemma3_qk_norm_rope_fuses():
    def attn_in(q, k, qw, kw, cos, sin):  # Gemma3: transpose first, then the norm
        return apply_rope(gemma_rms(q.transpose(1, 2), qw), gemma_rms(k.transpose(1, 2), kw), cos, sin)

    q, k = torch.randn(2, 3, 4, 32, dtype=BF), torch.randn(2, 3, 1, 32, dtype=BF)
    cos, sin = _rope_tables(2, 3, 32, BF)
    gm = _fused(attn_in, q, k, torch.randn(32, dtype=BF), torch.randn(32, dtype=BF), cos, sin, count=1)
    assert ag.qk_norm_rope.default in _targets(gm) and aten.neg.default not in _targets(gm)


def test_llama_rope_without_norm_fuses():
    q, k = torch.randn(2, 5, 4, 16, dtype=BF), torch.randn(2, 5, 2, 16, dtype=BF)
    cos, sin = _rope_tables(1, 5, 16, BF)
    gm = _fused(lambda q, k, c, s: apply_rope(q.transpose(1, 2), k.transpose(1, 2), c, s), q, k, cos, sin, count=1)
    assert ag.qk_norm_rope.default in _targets(gm)


@pytest.mark.parametrize("dtype", [BF, torch.float32])
def test_silu_mul_two_linear_and_chunk_forms_fuse(dtype):
    g, u = torch.randn(3, 37, dtype=dtype), torch.randn(3, 37, dtype=dtype)
    tol = 0.0 if dtype == BF else 1e-6
    gm = _fused(lambda g, u: F.silu(g) * u, g, u, count=1, tol=tol)
    assert ag.silu_mul.default in _targets(gm) and aten.exp.default not in _targets(gm)
    x = torch.randn(3, 74, dtype=dtype)

    def chunked(x):  # Phi-3: gate, up = gate_up_proj(x).chunk(2, dim=-1)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

    gm = _fused(chunked, x, count=1, tol=tol)
    assert ag.silu_and_mul.default in _targets(gm)
    gm = _fused(lambda x: F.silu(x[..., :37]) * x[..., 37:], x, count=1, tol=tol)
    assert ag.silu_and_mul.default in _targets(gm)


    def phi3_mlp(x):  # Phi3MLP: the up half first in the product
        gate, up = x.chunk(2, dim=-1)
        return up * F.silu(gate)

    gm = _fused(phi3_mlp, x, count=1, tol=tol)
    assert ag.silu_and_mul.default in _targets(gm) and aten.exp.default not in _targets(gm)


def _hf(module, name):
    import importlib

    return getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), name)


@pytest.mark.parametrize("dtype", [BF, torch.float32])
def test_partial_rotary_fuses_phi3_and_qwen3_next(dtype):
    """cat(rope(x[..., :R]), x[..., R:]) with R = cos.shape[-1] < D, as transformers' own
    apply_rotary_pos_emb writes it: Phi-3 (no norm) and Qwen3-Next (the 1 + w norm first)."""
    pytest.importorskip("transformers")
    phi3_rope = _hf("phi3", "apply_rotary_pos_emb")
    next_rope = _hf("qwen3_next", "apply_rotary_pos_emb")
    q, k = torch.randn(3, 5, 6, 20, dtype=dtype), torch.randn(3, 5, 2, 20, dtype=dtype)
    cos, sin = _rope_tables(1, 5, 6, dtype)  # R = 6 of D = 20 (neither a power of two)
    gm = _fused(lambda q, k, c, s: phi3_rope(q.transpose(1, 2), k.transpose(1, 2), c, s), q, k, cos, sin, count=1)
    t = _targets(gm)
    assert t.count(ag.qk_norm_rope.default) == 1 and aten.cat.default not in t and aten.mul.Tensor not in t
    qw, kw = torch.randn(20, dtype=dtype), torch.randn(20, dtype=dtype)

    def qwen3_next(q, k, qw, kw, c, s):
        return next_rope(gemma_rms(q, qw).transpose(1, 2), gemma_rms(k, kw).transpose(1, 2), c, s)

    gm = _fused(qwen3_next, q, k, qw, kw, cos, sin, count=1)
    t = _targets(gm)
    assert t.count(ag.qk_norm_rope.default) == 1 and aten.rsqrt.default not in t and aten.cat.default not in t


def test_not_fused_partial_rotary_with_the_pass_through_first():
    # cat(x[..., R:], rope(x[..., :R])): another layout, not HF's partial rotary
    def swapped(q, k, c, s):
        c, s = c.unsqueeze(1), s.unsqueeze(1)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        qr, kr = q[..., :8] * c + rotate_half(q[..., :8]) * s, k[..., :8] * c + rotate_half(k[..., :8]) * s
        return torch.cat((q[..., 8:], qr), -1), torch.cat((k[..., 8:], kr), -1)

    cos, sin = _rope_tables(2, 5, 8, torch.float32)
    gm = _trace(swapped, torch.randn(2, 5, 4, 16), torch.randn(2, 5, 2, 16), cos, sin)
    assert _run_pass(gm) == 0


@pytest.mark.parametrize("dtype", [BF, torch.float32])
def test_deepseek_v3_interleaved_rope_fuses(dtype):
    """DeepSeek-V3's q_rot [B, H, S, R] and k_rot [B, 1, S, R] through transformers'
    apply_rotary_pos_emb_interleave -> one qk_norm_rope(interleaved=True), exact."""
    pytest.importorskip("transformers")
    ds_rope = _hf("deepseek_v3", "apply_rotary_pos_emb_interleave")
    q = torch.randn(3, 7, 5, 30, dtype=dtype).transpose(1, 2)[..., 18:]  # as MLA has it: a split of a transposed view
    k = torch.randn(3, 1, 7, 12, dtype=dtype)
    cos, sin = _rope_tables(1, 7, 12, dtype)
    gm = _fused(lambda q, k, c, s: ds_rope(q, k, c, s), q, k, cos, sin, count=1)
    t = _targets(gm)
    assert t.count(ag.qk_norm_rope.default) == 1 and aten.mul.Tensor not in t and aten.cat.default not in t
    (node,) = [n for n in gm.graph.nodes if n.target is ag.qk_norm_rope.default]
    assert node.args[8] is True  # interleaved


def test_not_fused_interleaved_rope_of_mixed_dtypes():
    pytest.importorskip("transformers")
    ds_rope = _hf("deepseek_v3", "apply_rotary_pos_emb_interleave")
    cos, sin = _rope_tables(1, 7, 12, torch.float32)  # fp32 tables against bf16 q/k: promotes
    gm = _trace(lambda q, k, c, s: ds_rope(q, k, c, s), torch.randn(3, 5, 7, 12, dtype=BF), torch.randn(3, 1, 7, 12, dtype=BF), cos, sin)
    assert _run_pass(gm) == 0


# --- negatives --------------------------------------------------------------------------


def test_not_fused_rms_norm_weight_of_another_dtype():
    x, w = torch.randn(3, 24, dtype=BF), torch.randn(24)  # fp32 weight: w * h.to(bf16) promotes
    gm = _trace(lambda x, w: llama_rms(x, w), x, w)
    assert _run_pass(gm) == 0


def test_not_fused_add_when_sum_differs_in_shape():
    # a broadcast residual: the sum is not the norm's input shape -> the norm alone fuses
    x, r, w = torch.randn(2, 7, 40), torch.randn(40), torch.randn(40)
    gm = _trace(lambda x, r, w: (llama_rms(x + r, w), x + r), x, r, w)
    assert _run_pass(gm) == 1
    assert ag.add_rms_norm.default not in _targets(gm) and ag.rms_norm.default in _targets(gm)


def test_not_fused_mean_over_another_dim():
    def not_rms(x, w):
        h = x.float()
        return w * (h * torch.rsqrt(h.pow(2).mean(0, keepdim=True) + 1e-6)).to(x.dtype)

    gm = _trace(not_rms, torch.randn(4, 24, dtype=BF), torch.randn(24, dtype=BF))
    assert _run_pass(gm) == 0


def test_not_fused_rope_of_mixed_dtypes():
    q, k = torch.randn(2, 5, 4, 16, dtype=BF), torch.randn(2, 5, 2, 16, dtype=BF)
    cos, sin = _rope_tables(1, 5, 16, torch.float32)  # fp32 tables: q * cos promotes
    gm = _trace(lambda q, k, c, s: apply_rope(q.transpose(1, 2), k.transpose(1, 2), c, s), q, k, cos, sin)
    assert _run_pass(gm) == 0


def test_not_fused_silu_mul_broadcast():
    gm = _trace(lambda g, u: F.silu(g) * u, torch.randn(3, 37), torch.randn(37))
    assert _run_pass(gm) == 0


def test_not_fused_silu_of_the_second_half():
    # up, gate = x.chunk(2): silu of the second half is not silu_and_mul (silu of the first)
    def swapped(x):
        up, gate = x.chunk(2, dim=-1)
        return up * F.silu(gate)

    gm = _trace(swapped, torch.randn(3, 74))
    assert _run_pass(gm) == 0


def test_not_fused_gelu_mul():  # Gemma's MLP: gelu(tanh), not silu
    gm = _trace(lambda g, u: F.gelu(g, approximate="tanh") * u, torch.randn(3, 37), torch.randn(3, 37))
    assert _run_pass(gm) == 0


# --- the per-device policy and the family switch -----------------------------------------


def test_cpu_with_inductor_codegen_is_skipped_and_counted():
    ascend_graph.reset_stats()
    x, w = torch.randn(3, 72), torch.randn(72)
    gm = _trace(lambda x, w: llama_rms(x, w), x, w)
    assert _run_pass(gm, codegen="auto") == 0
    assert _run_pass(gm, codegen="inductor") == 0
    assert ag.rms_norm.default not in _targets(gm)
    (reason,) = ascend_graph.stats()["skipped"]["norm_rope"]
    assert "inductor" in reason and ascend_graph.stats()["skipped"]["norm_rope"][reason] == 2
    assert fusion.device_policy("cuda", "auto") is None and fusion.device_policy("npu", "auto") is None
    assert fusion.device_policy("cpu", "fx") is None


def test_family_off_and_old_name_alias():
    assert fusion.make_pass(AscendConfig(fusions=("attention",))) is None
    assert AscendConfig(fusions=("norm_act", "moe")).fusions == ("norm_rope", "moe")
    assert fusion.make_pass(AscendConfig(fusions=("norm_act",))) is not None


@pytest.mark.cuda
def test_cuda_graph_fuses_and_matches():
    dev = "cuda"
    q, k = torch.randn(3, 1, 32, 128, dtype=BF, device=dev), torch.randn(3, 1, 8, 128, dtype=BF, device=dev)
    qw, kw = torch.randn(128, dtype=BF, device=dev), torch.randn(128, dtype=BF, device=dev)
    ang = torch.randn(1, 1, 64, device=dev)
    cos, sin = torch.cat((ang, ang), -1).cos().to(BF), torch.cat((ang, ang), -1).sin().to(BF)

    def attn_in(q, k, qw, kw, cos, sin):
        return apply_rope(llama_rms(q, qw).transpose(1, 2), llama_rms(k, kw).transpose(1, 2), cos, sin)

    gm = _trace(attn_in, q, k, qw, kw, cos, sin)
    ref = gm(q, k, qw, kw, cos, sin)
    assert _run_pass(gm, codegen="auto") == 1
    out = gm(q, k, qw, kw, cos, sin)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


# --- vLLM's native forms (benchmarks/decode.py writes its model this way) -----------------


def vllm_rms(x, w, eps=1e-6):  # RMSNorm.forward_native: the weight after the cast
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def vllm_rope(x, cos, sin):  # neox forward_native over [T, H, D], tables [T, 1, D/2]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@pytest.mark.parametrize("dtype", [BF, torch.float32])
def test_vllm_forms_fuse(dtype):
    t, hq, hk, d, n = 7, 6, 2, 16, 40

    def layer(x, r, w, qkv_w, qw, kw, cos, sin):
        s = r + x
        h = vllm_rms(s, w)
        q, k, _ = (h @ qkv_w).split([hq * d, hk * d, hk * d], dim=-1)
        q = vllm_rope(vllm_rms(q.view(t, hq, d), qw), cos, sin)
        k = vllm_rope(vllm_rms(k.view(t, hk, d), kw), cos, sin)
        return q, k, s

    ang = torch.randn(t, 1, d // 2)
    args = (torch.randn(t, n, dtype=dtype), torch.randn(t, n, dtype=dtype), torch.randn(n, dtype=dtype), torch.randn(n, (hq + 2 * hk) * d, dtype=dtype),
            torch.randn(d, dtype=dtype), torch.randn(d, dtype=dtype), ang.cos().to(dtype), ang.sin().to(dtype))
    gm = _fused(layer, *args, count=3)
    t_ = _targets(gm)
    # q and k share only the tables here (vLLM's layout): one norm_rope each
    assert ag.add_rms_norm.default in t_ and t_.count(ag.norm_rope.default) == 2
    assert aten.rsqrt.default not in t_ and aten.cat.default not in t_


def test_not_fused_vllm_rope_of_a_gptj_layout():
    # pairs (x[0::2], x[1::2]) instead of halves: another rotation, not the neox row
    def gptj(q, k, cos, sin):
        def rot(x):
            x1, x2 = x[..., 0::2], x[..., 1::2]
            return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

        return rot(q), rot(k)

    ang = torch.randn(5, 1, 8)
    gm = _trace(gptj, torch.randn(5, 4, 16), torch.randn(5, 2, 16), ang.cos(), ang.sin())
    assert _run_pass(gm) == 0


# --- the KV write: projection output -> q and the cache in one op --------------------------


class _QkvCacheLayer(torch.nn.Module):
    """benchmarks/decode.py's attention input: qkv split, q/k norm + RoPE, reshape_and_cache."""

    def __init__(self, hq, hk, d, cache_dtype):
        super().__init__()
        self.hq, self.hk, self.d = hq, hk, d
        self.qw, self.kw = torch.nn.Parameter(torch.randn(d, dtype=BF)), torch.nn.Parameter(torch.randn(d, dtype=BF))
        self.register_buffer("k_cache", torch.zeros(6, 4, hk, d, dtype=cache_dtype))
        self.register_buffer("v_cache", torch.zeros(6, 4, hk, d, dtype=cache_dtype))

    def forward(self, qkv, cos, sin, slots):
        t, hq, hk, d = qkv.shape[0], self.hq, self.hk, self.d
        q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
        q = vllm_rope(vllm_rms(q.view(t, hq, d), self.qw), cos, sin)
        k = vllm_rope(vllm_rms(k.view(t, hk, d), self.kw), cos, sin)
        torch.ops.ascend_graph.reshape_and_cache(k, v.view(t, hk, d), self.k_cache, self.v_cache, slots)
        return q * 2


def _compile_cache_layer(cache_dtype, dump_dir=None):
    import copy

    torch._dynamo.reset()
    ascend_graph.reset_stats()
    torch.manual_seed(0)
    t, hq, hk, d = 5, 6, 2, 16
    layer = _QkvCacheLayer(hq, hk, d, cache_dtype)
    ref_layer = copy.deepcopy(layer)
    ang = torch.randn(t, 1, d // 2)
    args = (torch.randn(t, (hq + 2 * hk) * d, dtype=BF), ang.cos().to(BF), ang.sin().to(BF), torch.tensor([3, -1, 9, 22, 4]))
    compiled = torch.compile(layer, backend="ascend", options={"codegen": "fx", "graphs": False, "fusions": ("norm_rope",), "dump_dir": dump_dir}, dynamic=False)
    with torch.no_grad():
        out, ref = compiled(*args), ref_layer(*args)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    torch.testing.assert_close(layer.k_cache, ref_layer.k_cache, atol=0, rtol=0)
    torch.testing.assert_close(layer.v_cache, ref_layer.v_cache, atol=0, rtol=0)
    return ascend_graph.stats()


def test_qkv_norm_rope_cache_write_fuses_into_one_op(tmp_path):
    stats = _compile_cache_layer(BF, str(tmp_path))
    assert stats["fusions"]["norm_rope"] == 1  # one op: split, q/k norm + RoPE, both cache writes
    (after,) = tmp_path.glob("*fuse_norm_rope.after.py")
    code = after.read_text()
    assert "qk_norm_rope_cache" in code and "reshape_and_cache" not in code and "rsqrt" not in code


def test_not_fused_cache_write_into_caches_of_another_dtype():
    # an fp32 cache: the write casts; the cache row needs one dtype, so q and k fuse alone
    stats = _compile_cache_layer(torch.float32)
    assert stats["fusions"]["norm_rope"] == 2


@pytest.mark.cuda
def test_cuda_inductor_keeps_the_fused_cache_write():
    """On CUDA the family applies under inductor codegen: the one op runs (Triton) inside
    inductor's graph and q and both caches match eager within bf16 tolerance."""
    import copy

    torch._dynamo.reset()
    ascend_graph.reset_stats()
    torch.manual_seed(0)
    t, hq, hk, d = 9, 16, 8, 128
    layer = _QkvCacheLayer(hq, hk, d, BF).cuda()
    ref_layer = copy.deepcopy(layer)
    ang = torch.randn(t, 1, d // 2, device="cuda")
    args = (torch.randn(t, (hq + 2 * hk) * d, dtype=BF, device="cuda"), ang.cos().to(BF), ang.sin().to(BF), torch.arange(t, device="cuda") * 2 + 1)
    compiled = torch.compile(layer, backend="ascend", options={"graphs": False, "fusions": ("norm_rope",)}, dynamic=False)
    with torch.no_grad():
        out, ref = compiled(*args), ref_layer(*args)
    tol = dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(layer.k_cache, ref_layer.k_cache, **tol)
    assert torch.equal(layer.v_cache, ref_layer.v_cache)
    assert ascend_graph.stats()["fusions"]["norm_rope"] == 1
    assert "norm_rope" not in ascend_graph.stats()["skipped"]


# --- HF's static-cache write: q/k norm + RoPE fuses in front of the index_copy_ -------------


class _StaticCacheLayer(torch.nn.Module):
    """Qwen3's attention input, then StaticLayer.update: ``keys.index_copy_(2, pos, k)``
    into ``[B, Hk, S_max, D]`` (no op takes separate q/k/v into this cache: the family's
    docstring says why; the write stays as traced, the q/k norm + RoPE in front fuses)."""

    def __init__(self, b, hk, d, pre_rope_keys=False):
        super().__init__()
        self.pre_rope_keys = pre_rope_keys
        self.qw, self.kw = torch.nn.Parameter(torch.randn(d, dtype=BF)), torch.nn.Parameter(torch.randn(d, dtype=BF))
        self.register_buffer("k_cache", torch.zeros(b, hk, 9, d, dtype=BF))
        self.register_buffer("v_cache", torch.zeros(b, hk, 9, d, dtype=BF))

    def forward(self, q, k, v, cos, sin, pos):
        qn, kn = llama_rms(q, self.qw).transpose(1, 2), llama_rms(k, self.kw).transpose(1, 2)
        qr, kr = apply_rope(qn, kn, cos, sin)
        self.k_cache.index_copy_(2, pos, kn if self.pre_rope_keys else kr)
        self.v_cache.index_copy_(2, pos, v.transpose(1, 2))
        return qr * 2, kr * 2


def _compile_static_cache_layer(pre_rope_keys, dump_dir):
    import copy

    torch._dynamo.reset()
    ascend_graph.reset_stats()
    torch.manual_seed(0)
    b, s, hq, hk, d = 2, 3, 5, 1, 24
    layer = _StaticCacheLayer(b, hk, d, pre_rope_keys)
    ref_layer = copy.deepcopy(layer)
    cos, sin = _rope_tables(1, s, d, BF)
    args = (torch.randn(b, s, hq, d, dtype=BF), torch.randn(b, s, hk, d, dtype=BF), torch.randn(b, s, hk, d, dtype=BF), cos, sin, torch.tensor([4, 5, 6]))
    opts = {"codegen": "fx", "graphs": False, "fusions": ("norm_rope",), "dump_dir": str(dump_dir)}
    compiled = torch.compile(layer, backend="ascend", options=opts, dynamic=False)
    with torch.no_grad():
        out, ref = compiled(*args), ref_layer(*args)
    for a, r in zip(out + (layer.k_cache, layer.v_cache), ref + (ref_layer.k_cache, ref_layer.v_cache)):
        torch.testing.assert_close(a, r, atol=0, rtol=0)
    (after,) = dump_dir.glob("*fuse_norm_rope.after.py")
    return ascend_graph.stats()["fusions"].get("norm_rope", 0), after.read_text()


def test_static_cache_write_keeps_the_qk_norm_rope_fused(tmp_path):
    n, code = _compile_static_cache_layer(False, tmp_path)
    assert n == 1
    # index_copy_ traces to index_put(cache, [None, None, pos], k) and a copy_ back
    assert code.count("ascend_graph.qk_norm_rope.default(") == 1 and code.count("aten.index_put.default(") == 2
    assert "rsqrt" not in code and "aten.neg" not in code


def test_not_fused_qk_rope_when_the_cache_keeps_pre_rope_keys(tmp_path):
    # the normed k before RoPE is also written: an intermediate of the q/k row escapes, so
    # only the two norms fuse (q's and k's), the RoPE stays as traced
    n, code = _compile_static_cache_layer(True, tmp_path)
    assert n == 2
    assert "qk_norm_rope" not in code and code.count("ascend_graph.rms_norm.default(") == 2 and "aten.neg" in code


@pytest.mark.cuda
def test_cuda_partial_and_interleaved_rows_fuse_and_match():
    """The Triton kernel on the new rows' inputs: Qwen3-Next's partial rotary with its norm
    (R = 64 of D = 256) and DeepSeek-V3's interleaved RoPE on MLA's strided q_rot/k_rot."""
    pytest.importorskip("transformers")
    dev, tol = "cuda", dict(atol=2e-2, rtol=2e-2)
    next_rope, ds_rope = _hf("qwen3_next", "apply_rotary_pos_emb"), _hf("deepseek_v3", "apply_rotary_pos_emb_interleave")
    q, k = torch.randn(3, 1, 16, 256, dtype=BF, device=dev), torch.randn(3, 1, 2, 256, dtype=BF, device=dev)
    qw, kw = torch.randn(256, dtype=BF, device=dev), torch.randn(256, dtype=BF, device=dev)
    ang = torch.randn(1, 1, 32, device=dev)
    cos, sin = torch.cat((ang, ang), -1).cos().to(BF), torch.cat((ang, ang), -1).sin().to(BF)

    def qwen3_next(q, k, qw, kw, c, s):
        return next_rope(gemma_rms(q, qw).transpose(1, 2), gemma_rms(k, kw).transpose(1, 2), c, s)

    gm = _trace(qwen3_next, q, k, qw, kw, cos, sin)
    ref = gm(q, k, qw, kw, cos, sin)
    assert _run_pass(gm, codegen="auto") == 1
    for a, b in zip(gm(q, k, qw, kw, cos, sin), ref):
        torch.testing.assert_close(a, b, **tol)
    q_rot = torch.randn(3, 5, 16, 192, dtype=BF, device=dev).transpose(1, 2)[..., 128:]
    k_rot = torch.randn(3, 5, 512 + 64, dtype=BF, device=dev)[..., 512:].view(3, 1, 5, 64)
    ang = torch.randn(1, 5, 32, device=dev)
    cos, sin = torch.cat((ang, ang), -1).cos().to(BF), torch.cat((ang, ang), -1).sin().to(BF)
    gm = _trace(lambda q, k, c, s: ds_rope(q, k, c, s), q_rot, k_rot, cos, sin)
    ref = gm(q_rot, k_rot, cos, sin)
    assert _run_pass(gm, codegen="auto") == 1
    for a, b in zip(gm(q_rot, k_rot, cos, sin), ref):
        torch.testing.assert_close(a, b, **tol)
