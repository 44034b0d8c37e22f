"""moe_gating_topk / moe_dispatch_ffn_combine: references against HF, fakes, masks, errors, MC2 buffer,
Triton kernels (CPU interpreter in a subprocess; CUDA on the GPU machine)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import ascend_graph.ops  # noqa: F401
from ascend_graph.errors import ConfigError, UnsupportedError
from ascend_graph.ops import moe
from ascend_graph.ops.kernels.npu import moe as npu_moe

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config, Qwen3MoeConfig  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts, Qwen3MoeTopKRouter  # noqa: E402

ops = torch.ops.ascend_graph


def _init(module, std=0.3):
    torch.manual_seed(0)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=std)
    for b in module.buffers():
        torch.nn.init.normal_(b, std=0.1)
    return module


@pytest.mark.parametrize("renorm", [True, False])
def test_softmax_gating_matches_qwen_router(renorm):
    cfg = Qwen3MoeConfig(hidden_size=24, num_experts=10, num_experts_per_tok=3, norm_topk_prob=renorm)
    router = _init(Qwen3MoeTopKRouter(cfg))
    x = torch.randn(13, 24)
    logits, w_ref, ids_ref = router(x)
    w, ids = ops.moe_gating_topk(logits.float(), 3, None, "softmax", 1, 1, renorm, 1.0, 0.0)
    assert ids.dtype == torch.int64 and w.shape == (13, 3)
    torch.testing.assert_close(ids, ids_ref)
    torch.testing.assert_close(w, w_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gating_with_router_weight_matches_qwen_router(dtype):
    # the router linear folded in: x and the weight in, HF's (bf16) weights and ids out
    cfg = Qwen3MoeConfig(hidden_size=24, num_experts=10, num_experts_per_tok=3, norm_topk_prob=True)
    router = _init(Qwen3MoeTopKRouter(cfg)).to(dtype)
    x = torch.randn(13, 24, dtype=dtype)
    _, w_ref, ids_ref = router(x)
    w, ids = ops.moe_gating_topk(x, 3, None, "softmax", 1, 1, True, 1.0, 0.0, router.weight)
    assert w.dtype == dtype and ids.dtype == torch.int64
    torch.testing.assert_close(ids, ids_ref)
    torch.testing.assert_close(w, w_ref)
    with pytest.raises(UnsupportedError) as e:
        ops.moe_gating_topk(x, 3, None, "softmax", 1, 1, True, 1.0, 0.0, router.weight[:, :20])
    assert "[experts, 24]" in str(e.value.expected)


def test_gating_with_router_weight_matches_deepseek_router_in_bf16():
    # DeepSeek-V3 runs its linear in fp32 on a bf16 weight: the op gets x.float() and the bf16 weight
    cfg = DeepseekV3Config(hidden_size=24, n_routed_experts=16, num_experts_per_tok=3, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    router = _init(DeepseekV3TopkRouter(cfg)).to(torch.bfloat16)
    x = torch.randn(11, 24, dtype=torch.bfloat16)
    _, w_ref, ids_ref = router(x)
    w, ids = ops.moe_gating_topk(x.float(), 3, router.e_score_correction_bias, "sigmoid", 4, 2, True, 2.5, 1e-20, router.weight)
    order, order_ref = ids.argsort(1), ids_ref.argsort(1)
    torch.testing.assert_close(ids.gather(1, order), ids_ref.gather(1, order_ref))
    torch.testing.assert_close(w.gather(1, order), w_ref.gather(1, order_ref))


def test_grouped_sigmoid_gating_matches_deepseek_router():
    cfg = DeepseekV3Config(hidden_size=24, n_routed_experts=16, num_experts_per_tok=3, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    router = _init(DeepseekV3TopkRouter(cfg))
    x = torch.randn(11, 24)
    logits, w_ref, ids_ref = router(x)
    w, ids = ops.moe_gating_topk(logits, 3, router.e_score_correction_bias, "sigmoid", 4, 2, True, 2.5, 1e-20)
    # HF picks with sorted=False: compare as sets per token
    order, order_ref = ids.argsort(1), ids_ref.argsort(1)
    torch.testing.assert_close(ids.gather(1, order), ids_ref.gather(1, order_ref))
    torch.testing.assert_close(w.gather(1, order), w_ref.gather(1, order_ref))
    # the group limit binds: every chosen expert lies in one of the 2 best groups
    assert all(len(set((row // 4).tolist())) <= 2 for row in ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_match_hf_eager(dtype):
    cfg = Qwen3MoeConfig(hidden_size=40, moe_intermediate_size=24, num_experts=7, num_experts_per_tok=3)
    cfg._experts_implementation = "eager"
    experts = _init(Qwen3MoeExperts(cfg), std=0.2).to(dtype)
    x = torch.randn(19, 40, dtype=dtype)
    ids = torch.randint(0, 7, (19, 3))
    w = torch.rand(19, 3, dtype=dtype)
    ref = experts(x, ids, w)
    out = ops.moe_dispatch_ffn_combine(x, w, ids, experts.gate_up_proj, experts.down_proj, "silu")
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, ref, **tol)


def test_active_mask_and_sentinel_ids_do_no_work():
    torch.manual_seed(1)
    e, h, i = 5, 12, 6
    w13, w2 = torch.randn(e, 2 * i, h), torch.randn(e, h, i)
    x, w = torch.randn(9, h), torch.rand(9, 2)
    ids = torch.randint(0, e, (9, 2))
    mask = torch.tensor([True] * 6 + [False] * 3)
    full = ops.moe_dispatch_ffn_combine(x, w, ids, w13, w2, "gelu_tanh")
    masked = ops.moe_dispatch_ffn_combine(x, w, ids, w13, w2, "gelu_tanh", mask)
    torch.testing.assert_close(masked[:6], full[:6])
    assert torch.count_nonzero(masked[6:]) == 0
    # an id outside [0, E) (expert-parallel sentinel) contributes nothing
    ids2 = ids.clone()
    ids2[:, 1] = e
    only_first = ops.moe_dispatch_ffn_combine(x, w * torch.tensor([1.0, 0.0]), ids, w13, w2, "gelu_tanh")
    torch.testing.assert_close(ops.moe_dispatch_ffn_combine(x, w, ids2, w13, w2, "gelu_tanh"), only_first)


def test_shared_experts_add_a_gated_mlp():
    torch.manual_seed(2)
    x, w, ids = torch.randn(5, 8), torch.rand(5, 2), torch.randint(0, 3, (5, 2))
    w13, w2 = torch.randn(3, 8, 8), torch.randn(3, 8, 4)
    g, u, d = torch.randn(6, 8), torch.randn(6, 8), torch.randn(8, 6)
    routed = ops.moe_dispatch_ffn_combine(x, w, ids, w13, w2)
    both = ops.moe_dispatch_ffn_combine(x, w, ids, w13, w2, "silu", None, g, u, d)
    torch.testing.assert_close(both - routed, torch.nn.functional.silu(x @ g.T) * (x @ u.T) @ d.T, atol=1e-4, rtol=1e-4)


def test_fake_impls_give_static_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        logits = torch.empty(17, 12)
        w, ids = ops.moe_gating_topk(logits, 4, None, "softmax", 1, 1, True, 1.0, 0.0)
        w16, _ = ops.moe_gating_topk(torch.empty(17, 16, dtype=torch.bfloat16), 4, None, "softmax", 1, 1, True, 1.0, 0.0, torch.empty(12, 16))
        out = ops.moe_dispatch_ffn_combine(torch.empty(17, 16, dtype=torch.bfloat16), w, ids, torch.empty(12, 10, 16, dtype=torch.bfloat16), torch.empty(12, 16, 5, dtype=torch.bfloat16))
    assert (tuple(w.shape), ids.dtype, tuple(out.shape), out.dtype) == ((17, 4), torch.int64, (17, 16), torch.bfloat16)
    assert (tuple(w16.shape), w16.dtype) == ((17, 4), torch.bfloat16)  # weights take x's dtype


def test_errors_say_expected_and_got():
    x, w, ids = torch.randn(4, 8), torch.rand(4, 2), torch.randint(0, 3, (4, 2))
    with pytest.raises(UnsupportedError) as e:
        ops.moe_dispatch_ffn_combine(x, w, ids, torch.randn(3, 8, 8), torch.randn(3, 8, 5))
    assert "w13" in str(e.value.expected)
    with pytest.raises(UnsupportedError):
        ops.moe_dispatch_ffn_combine(x, w, ids, torch.randn(3, 8, 8), torch.randn(3, 8, 4), "swish")
    with pytest.raises(UnsupportedError):
        ops.moe_gating_topk(torch.randn(4, 10), 2, None, "sigmoid", 3, 1, True, 1.0, 0.0)
    # expert parallelism off the NPU runs on torch.distributed (tests/distributed/): with no
    # process group initialised it is a typed error saying so
    from ascend_graph.distributed import DistributedError

    with pytest.raises(DistributedError) as e:
        ops.moe_dispatch_ffn_combine(x, w, ids, torch.randn(3, 8, 8), torch.randn(3, 8, 4), "silu", None, None, None, None, "ep", 2, 0)
    # no process group at all, or (after another test in this process made one) none named "ep"
    assert "init_process_group" in e.value.expected or ("group name" in e.value.expected and "ep" in str(e.value.got))


def test_mc2_buffer_requirement_and_error():
    # the CANN formula by hand for a small case: 2 * (2*4*2*Align512(Align32(64*2)+64) + 2*4*Align512(64*2))
    assert npu_moe.mc2_buffer_bytes(4, 64, 2, 4, 2, torch.bfloat16) == 2 * (2 * 4 * 2 * 512 + 2 * 4 * 512)
    # grows linearly with tokens, and with the element size
    a = npu_moe.mc2_buffer_bytes(256, 7168, 8, 256, 16)
    assert npu_moe.mc2_buffer_bytes(512, 7168, 8, 256, 16) == 2 * a
    assert npu_moe.mc2_buffer_bytes(256, 7168, 8, 256, 16, torch.float32) > a
    need = npu_moe.check_comm_buffer(512, 7168, 8, 256, 16, torch.bfloat16, 4096)
    with pytest.raises(npu_moe.CommBufferError) as e:
        npu_moe.check_comm_buffer(512, 7168, 8, 256, 16, torch.bfloat16, need - 1)
    assert isinstance(e.value, ConfigError) and e.value.expected == f">= {need} MB" and "HCCL_BUFFSIZE" in e.value.hint
    with pytest.raises(ConfigError):
        npu_moe.mc2_buffer_bytes(4, 64, 2, 5, 2)


def test_max_blocks_bounds_every_routing():
    from ascend_graph.ops.kernels.triton.moe_fused import max_blocks

    gen = torch.Generator().manual_seed(4)
    for _ in range(200):
        e, bm = int(torch.randint(1, 40, (1,), generator=gen)), int(torch.randint(1, 20, (1,), generator=gen))
        p = int(torch.randint(0, 300, (1,), generator=gen))
        # skewed routings: most pairs on few experts, the rest spread (the bound's worst cases)
        ids = torch.where(torch.rand(p, generator=gen) < 0.5, torch.randint(0, 2, (p,), generator=gen), torch.randint(0, e, (p,), generator=gen)) % e
        need = sum(-(-int(c) // bm) for c in torch.bincount(ids, minlength=e))
        assert need <= max_blocks(p, e, bm)
    assert max_blocks(8, 128, 16) == 8 and max_blocks(256, 128, 16) == 16 + 128


_INTERPRET_SCRIPT = textwrap.dedent(
    """
    import torch
    from ascend_graph.ops import moe
    from ascend_graph.ops.kernels.triton import moe_fused as mf, moe_gating

    torch.manual_seed(5)
    # alignment: every valid pair exactly once, in a block of its own expert; blocks of an
    # expert contiguous and in expert order; empty slots hold P, unused blocks -1
    e, bm = 6, 4
    ids = torch.randint(-1, e + 1, (9, 3))
    ids[0] = 2
    mask = torch.ones(9, dtype=torch.bool)
    mask[4] = False
    sp, be = mf.align_blocks(ids, e, bm, mask)
    p = ids.numel()
    assert sp.shape == (mf.max_blocks(p, e, bm) * bm,) and be.shape == (mf.max_blocks(p, e, bm),)
    flat = ids.reshape(-1)
    valid = [q for q in range(p) if 0 <= flat[q] < e and bool(mask[q // 3])]
    placed = [int(v) for v in sp if v < p]
    assert sorted(placed) == valid, (placed, valid)
    used = int((be >= 0).sum())
    assert be[:used].tolist() == sorted(be[:used].tolist()) and bool((be[used:] == -1).all())
    for slot, q in enumerate(sp.tolist()):
        assert q == p or int(flat[q]) == int(be[slot // bm])
    for ex in range(e):
        n = sum(1 for q in valid if int(flat[q]) == ex)
        assert int((be == ex).sum()) == -(-n // bm)

    # experts: fp32 and bf16, naive / grouped / split-K, masked pairs and invalid ids
    e, h, i, k = 7, 48, 40, 3
    cases = [
        (torch.float32, 1, mf.MoeConfig(naive=True, w13_n=16, w13_k=32, w2_n=16, w2_k=16), "gelu"),
        (torch.float32, 7, mf.MoeConfig(w13_n=16, w13_k=32, w2_n=32, w2_k=16), "silu"),
        (torch.bfloat16, 6, mf.MoeConfig(w13_n=16, w13_k=16, split_k=2, w2_n=16, w2_k=32), "gelu_tanh"),
        # one launch per pair and chunk (24 of 40 units in a tile of 32: a masked tail; H 48 over K/N tiles of 32)
        (torch.float32, 3, mf.MoeConfig(naive=True, ffn_chunk=24, ffn_k=32, ffn_n=32), "silu"),
        (torch.bfloat16, 1, mf.MoeConfig(naive=True, ffn_chunk=16, ffn_k=16, ffn_n=16), "gelu"),
    ]
    for dtype, t, cfg, act in cases:
        x = torch.randn(t, h, dtype=dtype)
        w13, w2 = (torch.randn(e, 2 * i, h) * 0.2).to(dtype), (torch.randn(e, h, i) * 0.2).to(dtype)
        ids = torch.randint(-1, e + 1, (t, k))
        ids[0, 0] = 1
        w = torch.rand(t, k)
        mask = torch.arange(t) != t // 2 if t > 1 else torch.ones(1, dtype=torch.bool)
        out = mf.fused_experts(x, w, ids, w13, w2, act, mask, cfg)
        ref = moe.experts_reference(x.double(), w.double(), ids, w13.double(), w2.double(), act, mask)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err < (1e-5 if dtype == torch.float32 else 1e-2), (dtype, t, err)
        if t > 1:
            assert not out[t // 2].any()

    # gating: softmax + renorm, and DeepSeek-style sigmoid with bias and groups
    logits = torch.randn(5, 16)
    bias = torch.randn(16) * 0.1
    for args in ((3, None, "softmax", 1, 1, True, 1.0, 0.0), (3, bias, "sigmoid", 4, 2, True, 2.5, 1e-20)):
        w, ids = moe_gating.gating_topk(logits, *args)
        w_ref, ids_ref = moe.gating_reference(logits, *args)
        o, o_ref = ids.argsort(1), ids_ref.argsort(1)
        assert torch.equal(ids.gather(1, o), ids_ref.gather(1, o_ref)), (ids, ids_ref)
        torch.testing.assert_close(w.gather(1, o), w_ref.gather(1, o_ref))

    # router GEMM folded in: split over experts and hidden (last-ticket selection) and one program
    x, rw = torch.randn(5, 40), torch.randn(20, 40) * 0.3
    bias = torch.randn(20) * 0.1
    for dtype in (torch.float32, torch.bfloat16):
        # partials summed by the gating kernel; a last-program selection; one program
        for cfg in (moe_gating.RouterConfig(block_e=16, split_k=2, block_k=16), moe_gating.RouterConfig(block_e=16, split_k=2, block_k=16, two_launch=False),
                    moe_gating.RouterConfig(block_e=32, split_k=1, block_k=32)):
            for args in ((3, None, "softmax", 1, 1, True, 1.0, 0.0), (3, bias, "sigmoid", 4, 2, False, 2.5, 0.0)):
                w, ids = moe_gating.router_gating_topk(x.to(dtype), rw.to(dtype), *args, config=cfg)
                w_ref, ids_ref = moe.gating_reference(x.to(dtype), *args, router_weight=rw.to(dtype))
                o, o_ref = ids.argsort(1), ids_ref.argsort(1)
                assert torch.equal(ids.gather(1, o), ids_ref.gather(1, o_ref)), (cfg, args, ids, ids_ref)
                assert w.dtype == dtype
                # bf16: a logit's rounding may differ by one ulp (another fp32 summation order)
                tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else {}
                torch.testing.assert_close(w.gather(1, o), w_ref.gather(1, o_ref), **tol)
    print("INTERPRETED-OK")
    """
)


def test_triton_kernels_under_interpreter():
    pytest.importorskip("triton")
    # TRITON_INTERPRET must be set before Triton is first used in the process: a subprocess.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root)
    proc = subprocess.run([sys.executable, "-c", _INTERPRET_SCRIPT], env=env, capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0 and "INTERPRETED-OK" in proc.stdout, proc.stderr[-3000:]


# --------------------------------------------------------------------------- CUDA


def _cuda_case(t, dtype, e=16, h=256, i=96, k=4, seed=3):
    torch.manual_seed(seed)
    w13 = torch.randn(e, 2 * i, h, dtype=dtype, device="cuda") * 0.05
    w2 = torch.randn(e, h, i, dtype=dtype, device="cuda") * 0.05
    x = torch.randn(t, h, dtype=dtype, device="cuda")
    w = torch.rand(t, k, device="cuda")
    ids = torch.randint(0, e, (t, k), device="cuda")
    return x, w, ids, w13, w2


def _rel_err(out, ref):
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


def _ref(x, w, ids, w13, w2, act, mask=None):
    return moe.experts_reference(x.cpu().double(), w.cpu().double(), ids.cpu(), w13.cpu().double(), w2.cpu().double(), act, None if mask is None else mask.cpu())


@pytest.mark.cuda
@pytest.mark.parametrize("tokens", [37, 100])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_matches_reference(dtype, tokens):
    # 37 tokens: Triton path; 100 tokens: torch._grouped_mm for bf16, Triton for fp16
    x, w, ids, w13, w2 = _cuda_case(tokens, dtype)
    mask = torch.arange(tokens, device="cuda") < 30
    out = ops.moe_dispatch_ffn_combine(x, w, ids, w13, w2, "silu", mask)
    ref = moe.experts_reference(x.cpu().float(), w.cpu(), ids.cpu(), w13.cpu().float(), w2.cpu().float(), "silu", mask.cpu())
    torch.testing.assert_close(out.cpu().float(), ref, atol=3e-2, rtol=3e-2)
    assert torch.count_nonzero(out[30:]) == 0


@pytest.mark.cuda
@pytest.mark.parametrize("activation", [a for a in moe.ACTIVATIONS if a != "clipped_swiglu"])  # clipped: the sorted path (test_moe_clipped_swiglu.py)
@pytest.mark.parametrize("tokens", [1, 2, 7, 32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_experts_cuda(dtype, tokens, activation):
    from ascend_graph.ops.kernels.triton import moe_fused

    x, w, ids, w13, w2 = _cuda_case(tokens, dtype, seed=tokens)
    ids[:, -1] = torch.where(torch.rand(tokens, device="cuda") < 0.3, -1, ids[:, -1])  # expert-parallel sentinels
    ids[0, 1] = 16
    mask = torch.rand(tokens, device="cuda") > 0.25
    mask[0] = True
    out = moe_fused.fused_experts(x, w, ids, w13, w2, activation, mask)
    ref = _ref(x, w, ids, w13, w2, activation, mask)
    assert _rel_err(out, ref) < (1e-4 if dtype == torch.float32 else 1e-2)
    assert torch.count_nonzero(out[~mask]) == 0
    # every tuned config (naive, split-K, block sizes) on this problem
    extra = (moe_fused.MoeConfig(split_k=4, w13_k=64), moe_fused.MoeConfig(naive=True), moe_fused.MoeConfig(naive=True, ffn_chunk=32, pdl=False))
    for cfg in [c for _, c in moe_fused.CONFIGS] + list(extra):
        out = moe_fused.fused_experts(x, w, ids, w13, w2, activation, mask, cfg)
        assert _rel_err(out, ref) < (1e-4 if dtype == torch.float32 else 1e-2), cfg


@pytest.mark.cuda
@pytest.mark.parametrize("tokens", [1, 16])  # 1: the one-launch path (its zeroing captured too)
def test_triton_experts_one_graph_serves_any_routing(tokens):
    x, w, ids, w13, w2 = _cuda_case(tokens, torch.bfloat16)
    static = [x.clone(), w.clone(), ids.clone()]
    mask = torch.ones(tokens, dtype=torch.bool, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops.moe_dispatch_ffn_combine(*static, w13, w2, "silu", mask)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = ops.moe_dispatch_ffn_combine(*static, w13, w2, "silu", mask)
    for seed in range(3):
        torch.manual_seed(100 + seed)
        skew = torch.randint(0, 2, (tokens, 4), device="cuda") if seed == 2 else torch.randint(0, 16, (tokens, 4), device="cuda")  # all on 2 experts
        new = [torch.randn_like(x), torch.rand_like(w), skew]
        m = torch.rand(tokens, device="cuda") > 0.3
        m[0] = True
        for dst, src in zip(static + [mask], new + [m]):
            dst.copy_(src)
        out.fill_(float("nan"))
        g.replay()
        assert _rel_err(out, _ref(*new, w13, w2, "silu", m)) < 1e-2


@pytest.mark.cuda
@pytest.mark.parametrize("tokens", [1, 3, 32, 40])
def test_router_gating_cuda_matches_reference(tokens):
    # Triton router GEMM (<= 32 tokens; 40: cuBLAS + the gating kernel), bf16 and fp32 x, in a graph
    from ascend_graph.ops.kernels.triton import moe_gating

    torch.manual_seed(tokens)
    rw = torch.randn(128, 2048, device="cuda", dtype=torch.bfloat16) * 0.02
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(tokens, 2048, device="cuda", dtype=dtype)
        w, ids = ops.moe_gating_topk(x, 8, None, "softmax", 1, 1, True, 1.0, 0.0, rw)
        w_ref, ids_ref = moe.gating_reference(x.cpu().double(), 8, None, "softmax", 1, 1, True, 1.0, 0.0, rw.cpu().double())
        assert w.dtype == dtype
        # The op rounds the logits to x's dtype (as HF's linear does); in bf16 that can swap
        # a near tie at the k-th place against the float64 reference. So: every chosen
        # expert's exact probability is within bf16 rounding of the k-th best one.
        probs = torch.nn.functional.linear(x.cpu().double(), rw.cpu().double()).softmax(-1)
        kth = probs.topk(8, dim=-1).values[:, -1:]
        assert (probs.gather(1, ids.cpu().long()) >= kth * (1 - 2e-2)).all()
        assert (ids.cpu() == ids_ref).float().mean() > (0.99 if dtype == torch.float32 else 0.95)
        torch.testing.assert_close(w.float().cpu(), w_ref.float(), atol=2e-2, rtol=2e-2)
    bias = torch.randn(256, device="cuda") * 0.1
    rw = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16) * 0.05
    x = torch.randn(tokens, 512, device="cuda")
    configs = (None, moe_gating.RouterConfig(block_e=256, split_k=1, num_warps=8), moe_gating.RouterConfig(block_e=32, split_k=2, pdl=False),
               moe_gating.RouterConfig(block_e=32, split_k=2, two_launch=False))
    for cfg in configs:
        w, ids = moe_gating.router_gating_topk(x, rw, 8, bias, "sigmoid", 8, 4, True, 2.5, 1e-20, cfg) if tokens <= 32 else ops.moe_gating_topk(x, 8, bias, "sigmoid", 8, 4, True, 2.5, 1e-20, rw)
        w_ref, ids_ref = moe.gating_reference(x.cpu(), 8, bias.cpu(), "sigmoid", 8, 4, True, 2.5, 1e-20, rw.cpu())
        o, o_ref = ids.argsort(1), ids_ref.argsort(1)
        torch.testing.assert_close(ids.gather(1, o).cpu(), ids_ref.gather(1, o_ref))
        torch.testing.assert_close(w.gather(1, o).cpu(), w_ref.gather(1, o_ref), atol=1e-5, rtol=1e-5)
    # one graph, any input (the partials are rewritten by every call)
    static = torch.randn(tokens, 512, device="cuda")
    ops.moe_gating_topk(static, 8, bias, "sigmoid", 8, 4, True, 2.5, 1e-20, rw)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        w, ids = ops.moe_gating_topk(static, 8, bias, "sigmoid", 8, 4, True, 2.5, 1e-20, rw)
    for seed in range(3):
        static.copy_(torch.randn(tokens, 512, device="cuda"))
        ids.fill_(-1)
        g.replay()
        _, ids_ref = moe.gating_reference(static.cpu(), 8, bias.cpu(), "sigmoid", 8, 4, True, 2.5, 1e-20, rw.cpu())
        assert torch.equal(ids.sort(1)[0].cpu(), ids_ref.sort(1)[0])


@pytest.mark.cuda
def test_gating_cuda_matches_reference():
    torch.manual_seed(6)
    logits = torch.randn(33, 128, device="cuda")
    w, ids = ops.moe_gating_topk(logits, 8, None, "softmax", 1, 1, True, 1.0, 0.0)
    w_ref, ids_ref = moe.gating_reference(logits.cpu(), 8, None, "softmax", 1, 1, True, 1.0, 0.0)
    torch.testing.assert_close(ids.cpu(), ids_ref)
    torch.testing.assert_close(w.cpu(), w_ref)
    logits = torch.randn(9, 256, device="cuda")
    bias = torch.randn(256, device="cuda") * 0.1
    w, ids = ops.moe_gating_topk(logits, 8, bias, "sigmoid", 8, 4, True, 2.5, 1e-20)
    w_ref, ids_ref = moe.gating_reference(logits.cpu(), 8, bias.cpu(), "sigmoid", 8, 4, True, 2.5, 1e-20)
    o, o_ref = ids.argsort(1), ids_ref.argsort(1)
    torch.testing.assert_close(ids.gather(1, o).cpu(), ids_ref.gather(1, o_ref))
    torch.testing.assert_close(w.gather(1, o).cpu(), w_ref.gather(1, o_ref))
