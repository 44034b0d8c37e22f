"""moe_gating_topk / moe_dispatch_ffn_combine: references against HF, fakes, masks, errors, MC2 buffer."""

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
        out = ops.moe_dispatch_ffn_combine(torch.empty(17, 16, dtype=torch.bfloat16), w, ids, torch.empty(12, 10, 16, dtype=torch.bfloat16), torch.empty(12, 16, 5, dtype=torch.bfloat16))
    assert (tuple(w.shape), ids.dtype, tuple(out.shape), out.dtype) == ((17, 4), torch.int64, (17, 16), torch.bfloat16)


def test_errors_say_expected_and_got():
    x, w, ids = torch.randn(4, 8), torch.rand(4, 2), torch.randint(0, 3, (4, 2))
    with pytest.raises(UnsupportedError) as e:
        ops.moe_dispatch_ffn_combine(x, w, ids, torch.randn(3, 8, 8), torch.randn(3, 8, 5))
    assert "w13" in str(e.value.expected)
    with pytest.raises(UnsupportedError):
        ops.moe_dispatch_ffn_combine(x, w, ids, torch.randn(3, 8, 8), torch.randn(3, 8, 4), "swish")
    with pytest.raises(UnsupportedError):
        ops.moe_gating_topk(torch.randn(4, 10), 2, None, "sigmoid", 3, 1, True, 1.0, 0.0)
    with pytest.raises(UnsupportedError) as e:
        ops.moe_dispatch_ffn_combine(x, w, ids, torch.randn(3, 8, 8), torch.randn(3, 8, 4), "silu", None, None, None, None, "ep", 2, 0)
    assert e.value.got == 2


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


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_matches_reference(dtype):
    torch.manual_seed(3)
    e, h, i, t, k = 16, 256, 96, 37, 4
    w13 = torch.randn(e, 2 * i, h, dtype=dtype, device="cuda") * 0.05
    w2 = torch.randn(e, h, i, dtype=dtype, device="cuda") * 0.05
    x = torch.randn(t, h, dtype=dtype, device="cuda")
    w = torch.rand(t, k, device="cuda")
    ids = torch.randint(0, e, (t, k), device="cuda")
    mask = torch.arange(t, device="cuda") < 30
    out = ops.moe_dispatch_ffn_combine(x, w, ids, w13, w2, "silu", mask)
    ref = moe.experts_reference(x.cpu().float(), w.cpu(), ids.cpu(), w13.cpu().float(), w2.cpu().float(), "silu", mask.cpu())
    torch.testing.assert_close(out.cpu().float(), ref, atol=3e-2, rtol=3e-2)
    assert torch.count_nonzero(out[30:]) == 0
