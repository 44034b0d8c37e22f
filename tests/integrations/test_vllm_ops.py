"""vLLM's attention and fused-MoE ops rewritten onto ascend-graph's ops (real vLLM 0.32, CPU).

Real vLLM code throughout: its config classes, forward context, ``Attention`` layer,
``Qwen3MoeSparseMoeBlock`` (``FusedMoEFactory``: router, routed experts, runner) and the
ops they put in the graph. Two things differ from a CUDA run, both stated where done:
on the CPU platform vLLM's ``MoERunner`` calls ``_moe_forward`` as a Python function (so
the test sets ``_forward_entry`` to the ``torch.ops.vllm.moe_forward*`` op every other
platform uses) and selects its CPU MoE backend, whose prepacked weight layout we refuse
(so the positive tests set the unquantized backend CUDA selects, TRITON). vLLM's own
attention and MoE kernels are C++/Triton and do not run here: the references are plain
torch over the same weights, KV cache and metadata (each written from vLLM's code: the
KV layout from ``CPUAttentionImpl.do_kv_cache_update``, routing from ``fused_topk`` /
``grouped_topk``).
"""

from __future__ import annotations

import os
import socket
import tempfile

import pytest

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp(prefix="ascend-graph-vllm-cache-"))

pytest.importorskip("vllm.config", reason="vLLM is not installed (see docs/vllm.md for the CPU install)")

import torch  # noqa: E402
from vllm.config import CompilationConfig, CompilationMode, ModelConfig, VllmConfig, set_current_vllm_config  # noqa: E402
from vllm.forward_context import set_forward_context  # noqa: E402
from vllm.utils.torch_utils import _USE_LAYERNAME, LayerName  # noqa: E402

import ascend_graph  # noqa: E402
from ascend_graph.integrations import vllm as agv  # noqa: E402

if not _USE_LAYERNAME:  # pragma: no cover - torch < 2.11 or VLLM_USE_LAYERNAME=0
    pytest.skip("vLLM passes layer names as strings here: its attention/MoE ops are not matched", allow_module_level=True)

from ascend_graph.integrations import vllm_ops  # noqa: E402

HEADS, KV_HEADS, HEAD = 4, 2, 16
HIDDEN, MOE_INTER, EXPERTS, TOP_K = 64, 24, 8, 2
ATTN_NAME = "model.layers.0.self_attn.attn"


def _config(tmp_path, hf) -> VllmConfig:
    hf.save_pretrained(tmp_path)
    mc = ModelConfig(model=str(tmp_path), skip_tokenizer_init=True, dtype="float32", max_model_len=64)
    return VllmConfig(model_config=mc, compilation_config=CompilationConfig(mode=CompilationMode.NONE, custom_ops=["none"]))


@pytest.fixture(autouse=True)
def _our_attention_path_on_cpu(monkeypatch):
    """In the engine the rewrite is left out on the CPU and its op runs vLLM's own kernels on
    CUDA (ATTENTION_SKIPPED_ON, VLLM_KERNEL_DEVICES: never slower, measured in the real
    engine). These tests build vLLM layers outside an engine and check the rewrite and our
    paged TND path (the NPU's) against plain-torch references, so they take both on the CPU."""
    monkeypatch.setattr(vllm_ops, "VLLM_KERNEL_DEVICES", ())
    monkeypatch.setattr(vllm_ops, "ATTENTION_SKIPPED_ON", {})


@pytest.fixture(scope="module")
def qwen3_config(tmp_path_factory):
    from transformers import Qwen3Config

    hf = Qwen3Config(vocab_size=97, hidden_size=HIDDEN, intermediate_size=40, num_hidden_layers=1, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD, max_position_embeddings=64, architectures=["Qwen3ForCausalLM"])
    return _config(tmp_path_factory.mktemp("qwen3"), hf)


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """vLLM's parallel groups (world size 1, gloo) built under a MoE config: vLLM creates
    the expert-parallel group only for MoE models (test_vllm.py's groups have none)."""
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel, model_parallel_is_initialized

    config = _moe_config(tmp_path_factory.mktemp("dist"))
    with set_current_vllm_config(config):
        if model_parallel_is_initialized():
            destroy_model_parallel()
        ours = not torch.distributed.is_initialized()
        if ours:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            init_distributed_environment(world_size=1, rank=0, distributed_init_method=f"tcp://127.0.0.1:{port}", local_rank=0, backend="gloo")
        initialize_model_parallel(1, 1)
    yield
    destroy_model_parallel()
    if ours:
        # later modules of the same process (tests/distributed) start their own default group
        destroy_distributed_environment()


def _aten_graph(module, inputs, v2=True):
    """The functional ATen graph our passes see (``v2=False``: as vLLM's inductor pipeline has it)."""
    from ascend_graph.capture.trace import aot_trace

    seen = {}

    def not_run(*args):
        raise _GraphOnly  # vLLM's own kernels (C++/Triton) cannot run here; the graph is the point

    def fw(gm, ex):
        seen["gm"] = gm
        return not_run

    def be(gm, ex):
        with torch._inductor.config.patch(enable_auto_functionalized_v2=v2):
            return aot_trace(gm, ex, fw)

    torch._dynamo.reset()
    with pytest.raises(_GraphOnly):
        torch.compile(module, backend=be, fullgraph=True)(*inputs)
    return seen["gm"]


class _GraphOnly(Exception):
    pass


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _run(passes, gm):
    n = {p.name: p(gm.graph) for p in passes}
    gm.graph.lint()
    gm.recompile()
    return n


# --------------------------------------------------------------------------- attention


class _AttnModule(torch.nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, q, k, v):
        return self.attn(q, k, v)


def _attention(config, **kw):
    from vllm.model_executor.layers.attention import Attention

    config.compilation_config.static_forward_context.pop(ATTN_NAME, None)
    with set_current_vllm_config(config):
        return Attention(HEADS, HEAD, HEAD**-0.5, num_kv_heads=KV_HEADS, prefix=ATTN_NAME, **kw)


BLOCK, BLOCKS = 4, 12
# (context tokens already cached, new tokens): a decode, a prefill, a chunked prefill
REQUESTS = [(9, 1), (0, 4), (5, 2)]


def _metadata(seed=0):
    """vLLM's CPU attention metadata and slot mapping for REQUESTS, with a random KV cache."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata

    g = torch.Generator().manual_seed(seed)
    width = 4
    block_table = torch.randperm(BLOCKS, generator=g)[: len(REQUESTS) * width].view(len(REQUESTS), width).to(torch.int32)
    q_lens = [n for _, n in REQUESTS]
    seq_lens = torch.tensor([c + n for c, n in REQUESTS], dtype=torch.int32)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    slots = []
    for r, (ctx, n) in enumerate(REQUESTS):
        for p in range(ctx, ctx + n):
            slots.append(int(block_table[r, p // BLOCK]) * BLOCK + p % BLOCK)
    slot_mapping = torch.tensor(slots, dtype=torch.int64)
    md = CPUAttentionMetadata(
        num_actual_tokens=int(cu[-1]), max_query_len=max(q_lens), query_start_loc=cu, max_seq_len=int(seq_lens.max()),
        seq_lens=seq_lens, block_table=block_table, slot_mapping=slot_mapping, scheduler_metadata=None,
    )
    kv_cache = torch.randn(BLOCKS, KV_HEADS, BLOCK, 2 * HEAD, generator=g)  # vLLM's [blocks, Nkv, block_size, 2*D]
    return md, slot_mapping, kv_cache


def _cpu_kv_views(kv_cache):
    # CPUAttentionImpl.do_kv_cache_update: K and V blocks of [Nkv, block_size, D] per block
    k, v = kv_cache.view(BLOCKS, KV_HEADS, 2 * BLOCK, HEAD).chunk(2, dim=2)
    return k, v  # [blocks, Nkv, block_size, D]


def _attention_reference(q, k, v, md, slot_mapping, kv_cache, window=0):
    """Cache write at the slots, then causal (bottom-right) attention per request, in float64."""
    cache = kv_cache.clone()
    kc, vc = _cpu_kv_views(cache)
    q, k, v = q.view(-1, HEADS, HEAD), k.view(-1, KV_HEADS, HEAD), v.view(-1, KV_HEADS, HEAD)
    for t, slot in enumerate(slot_mapping.tolist()):
        kc[slot // BLOCK, :, slot % BLOCK] = k[t]
        vc[slot // BLOCK, :, slot % BLOCK] = v[t]
    out = torch.zeros(q.shape[0], HEADS, HEAD, dtype=torch.float64)
    cu, lens = md.query_start_loc.tolist(), md.seq_lens.tolist()
    for r, kv_len in enumerate(lens):
        pos = torch.arange(kv_len)
        blocks = md.block_table[r].long()[pos // BLOCK]
        keys = kc[blocks, :, pos % BLOCK].double().repeat_interleave(HEADS // KV_HEADS, 1)  # [L, Nq, D]
        vals = vc[blocks, :, pos % BLOCK].double().repeat_interleave(HEADS // KV_HEADS, 1)
        qr = q[cu[r] : cu[r + 1]].double()
        qpos = torch.arange(kv_len - qr.shape[0], kv_len)
        keep = pos[None, :] <= qpos[:, None]
        if window:
            keep &= pos[None, :] > qpos[:, None] - window
        logits = torch.einsum("qhd,khd->hqk", qr, keys) * HEAD**-0.5
        p = logits.masked_fill(~keep, float("-inf")).softmax(-1)
        out[cu[r] : cu[r + 1]] = torch.einsum("hqk,khd->qhd", p, vals)
    return out.view(q.shape[0], -1).float(), cache


def _qkv(t, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, HEADS * HEAD, generator=g), torch.randn(t, KV_HEADS * HEAD, generator=g), torch.randn(t, KV_HEADS * HEAD, generator=g)


@pytest.mark.parametrize("v2", [True, False], ids=["auto_functionalized_v2", "auto_functionalized_v1"])
def test_vllm_attention_op_becomes_paged_attention_and_matches_reference(qwen3_config, v2):
    attn = _attention(qwen3_config)
    assert attn.attn_backend.get_name() == "CPU_ATTN" and not attn.use_direct_call
    md, slots, kv_cache = _metadata()
    q, k, v = _qkv(int(md.query_start_loc[-1]))
    with set_current_vllm_config(qwen3_config), set_forward_context(None, qwen3_config, num_tokens=q.shape[0]):
        gm = _aten_graph(_AttnModule(attn), (q, k, v), v2=v2)
        before = _targets(gm)
        assert torch.ops.vllm.unified_attention_with_output.default not in before  # functionalized
        assert torch.ops.vllm.unified_kv_cache_update.default in before
        n = _run(agv.vllm_ops_passes(ascend_graph.AscendConfig(fusions=("attention",))), gm)
    assert n == {"vllm_attention": 1}
    after = _targets(gm)
    assert torch.ops.vllm.unified_kv_cache_update.default not in after
    assert not any("auto_functionalized" in str(t) for t in after)
    for op in ("vllm_paged_attention",):
        assert after.count(getattr(torch.ops.ascend_graph, op).default) == 1, op

    ref, ref_cache = _attention_reference(q, k, v, md, slots, kv_cache)
    attn.bind_kv_cache(kv_cache.clone())
    with set_current_vllm_config(qwen3_config), set_forward_context({ATTN_NAME: md}, qwen3_config, slot_mapping={ATTN_NAME: slots}):
        (out,) = gm(q, k, v, LayerName(ATTN_NAME))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(attn.kv_cache, ref_cache)  # written in vLLM's CPU layout, in place


@pytest.mark.parametrize("codegen", ["fx", "inductor"])
def test_vllm_attention_through_ascend_backend_counts_and_pads(qwen3_config, codegen):
    """``ascend_vllm_backend`` end to end: sliding window, a bucket above T (padded rows);
    with inductor too (it must schedule the rewritten graph: no vLLM memory as graph values)."""
    attn = _attention(qwen3_config, per_layer_sliding_window=3)
    md, slots, kv_cache = _metadata(seed=3)
    q, k, v = _qkv(int(md.query_start_loc[-1]), seed=4)
    ref, ref_cache = _attention_reference(q, k, v, md, slots, kv_cache, window=3)
    attn.bind_kv_cache(kv_cache.clone())
    torch._dynamo.reset()
    with set_current_vllm_config(qwen3_config), set_forward_context({ATTN_NAME: md}, qwen3_config, slot_mapping={ATTN_NAME: slots}):
        f = torch.compile(_AttnModule(attn), backend=agv.ascend_vllm_backend, fullgraph=True, dynamic=True, options={"fusions": ["attention"], "codegen": codegen, "buckets": [8, 16]})
        out = f(q, k, v)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(attn.kv_cache, ref_cache)
    s = ascend_graph.stats()
    assert s["fusions"]["attention"] == 1 and s["passes"]["vllm_attention"]["rewrites"] == 1


def test_vllm_attention_profile_run_writes_nothing_and_returns_zeros(qwen3_config):
    attn = _attention(qwen3_config)
    q, k, v = _qkv(5)
    with set_current_vllm_config(qwen3_config), set_forward_context(None, qwen3_config, num_tokens=5):
        gm = _aten_graph(_AttnModule(attn), (q, k, v))
        assert _run(agv.vllm_ops_passes(ascend_graph.AscendConfig(fusions=("attention",))), gm) == {"vllm_attention": 1}
        (out,) = gm(q, k, v, LayerName(ATTN_NAME))  # no metadata, placeholder cache: vLLM's profile run
    assert torch.equal(out, torch.zeros(5, HEADS * HEAD))


def test_vllm_attention_not_fused_when_unsupported(qwen3_config):
    q, k, v = _qkv(5)
    attn = _attention(qwen3_config, logits_soft_cap=30.0)
    assert vllm_ops.attention_unsupported(attn) == "logits soft cap"
    with set_current_vllm_config(qwen3_config), set_forward_context(None, qwen3_config, num_tokens=5):
        gm = _aten_graph(_AttnModule(attn), (q, k, v))
        assert _run(agv.vllm_ops_passes(ascend_graph.AscendConfig(fusions=("attention",))), gm) == {"vllm_attention": 0}
    attn = _attention(qwen3_config)
    with set_current_vllm_config(qwen3_config), set_forward_context(None, qwen3_config, num_tokens=5):
        gm = _aten_graph(_AttnModule(attn), (q, k, v))
    # outside vLLM's config the layer cannot be resolved: nothing is rewritten
    assert _run(agv.vllm_ops_passes(ascend_graph.AscendConfig(fusions=("attention",))), gm) == {"vllm_attention": 0}
    names = [p.name for p in agv.vllm_ops_passes(ascend_graph.AscendConfig(fusions=("norm_act",)))]
    assert names == ["vllm_norm_rope"]  # families gate the passes (norm_act: the family's old name)


def test_kv_cache_split_matches_vllm_backends():
    kv = torch.randn(3, KV_HEADS, BLOCK, 2 * HEAD)
    k, v = vllm_ops.split_kv_cache(kv, "split_last", KV_HEADS, HEAD)
    vk, vv = kv.transpose(1, 2).split(HEAD, dim=-1)  # FlashAttentionImpl.do_kv_cache_update
    assert torch.equal(k, vk) and torch.equal(v, vv) and k.data_ptr() == kv.data_ptr()
    k, v = vllm_ops.split_kv_cache(kv, "chunk_blocks", KV_HEADS, HEAD)
    ck, cv = kv.view(3, KV_HEADS, 2 * BLOCK, HEAD).chunk(2, dim=2)  # CPUAttentionImpl
    assert torch.equal(k, ck.transpose(1, 2)) and torch.equal(v, cv.transpose(1, 2))
    with pytest.raises(ascend_graph.UnsupportedError, match="KV cache layout"):
        vllm_ops.split_kv_cache(kv, "split_last", KV_HEADS + 1, HEAD)


# --------------------------------------------------------------------------- fused MoE


def _moe_config(tmp_path, shared=0, norm=True):
    from transformers import Qwen3MoeConfig

    hf = Qwen3MoeConfig(vocab_size=97, hidden_size=HIDDEN, intermediate_size=40, moe_intermediate_size=MOE_INTER, num_experts=EXPERTS, num_experts_per_tok=TOP_K, norm_topk_prob=norm, num_hidden_layers=1, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD, max_position_embeddings=64, architectures=["Qwen3MoeForCausalLM"])
    hf.shared_expert_intermediate_size = shared
    return _config(tmp_path, hf)


def _plain_linears(module):
    # vLLM's CPU GEMM dispatch is C++: use its plain F.linear path (as test_vllm.py does)
    for mod in module.modules():
        qm = getattr(mod, "quant_method", None)
        if qm is not None and hasattr(qm, "process_weights_after_loading") and type(qm).__name__ in ("UnquantizedLinearMethod", "_GateLinearMethod"):
            mod._cpu_skip_gemm_dispatch = True
            qm.process_weights_after_loading(mod)


def _moe_block(config, *, cuda_backend=True, seed=0):
    from vllm.model_executor.layers.fused_moe.oracle.unquantized import UnquantizedMoeBackend
    from vllm.model_executor.models.qwen3_moe import Qwen3MoeSparseMoeBlock

    with set_current_vllm_config(config):
        blk = Qwen3MoeSparseMoeBlock(vllm_config=config, prefix="model.layers.0.mlp")
    _plain_linears(blk)
    runner = blk.experts
    # what a CUDA platform does: call the opaque op, unquantized TRITON backend (checkpoint layout)
    runner._forward_entry = torch.ops.vllm.moe_forward if runner.shared_experts is None else torch.ops.vllm.moe_forward_shared
    if cuda_backend:
        runner.routed_experts.quant_method.unquantized_backend = UnquantizedMoeBackend.TRITON
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in blk.parameters():
            p.normal_(0, 0.2)
    return blk


def _moe_reference(blk, x, renormalize):
    """fused_topk (softmax, top-k, renormalize) + the experts, from the layer's weights, float64."""
    r = blk.experts
    xd = x.double()
    logits = xd @ blk.gate.weight.double().t()
    w, ids = logits.softmax(-1).topk(TOP_K, dim=-1)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    w13, w2 = r.routed_experts.w13_weight.double(), r.routed_experts.w2_weight.double()
    out = torch.zeros_like(xd)
    for t in range(x.shape[0]):
        for j in range(TOP_K):
            gate, up = (w13[ids[t, j]] @ xd[t]).chunk(2)
            out[t] += w[t, j] * (w2[ids[t, j]] @ (torch.nn.functional.silu(gate) * up))
    if r.shared_experts is not None:
        m = blk.shared_expert
        gate, up = (xd @ m.gate_up_proj.weight.double().t()).chunk(2, dim=-1)
        sh = (torch.nn.functional.silu(gate) * up) @ m.down_proj.weight.double().t()
        out += torch.sigmoid(xd @ blk.shared_expert_gate.weight.double().t()) * sh
    return out.float()


@pytest.mark.parametrize("shared", [0, 16], ids=["moe_forward", "moe_forward_shared"])
def test_vllm_fused_moe_op_becomes_gating_and_dispatch_ffn_combine(dist, tmp_path, shared):
    config = _moe_config(tmp_path, shared=shared)
    blk = _moe_block(config)
    x = torch.randn(11, HIDDEN)
    with set_current_vllm_config(config), set_forward_context(None, config, num_tokens=11):
        gm = _aten_graph(blk, (x,))
        before = _targets(gm)
        op = torch.ops.vllm.moe_forward_shared.default if shared else torch.ops.higher_order.auto_functionalized_v2
        assert op in before
        n = _run(agv.vllm_ops_passes(ascend_graph.AscendConfig(fusions=("moe",))), gm)
        assert n == {"vllm_moe": 1}
        after = _targets(gm)
        assert torch.ops.vllm.moe_forward.default not in after and torch.ops.vllm.moe_forward_shared.default not in after
        assert not any("auto_functionalized" in str(t) for t in after)
        assert after.count(torch.ops.ascend_graph.moe_gating_topk.default) == 1
        assert after.count(torch.ops.ascend_graph.moe_dispatch_ffn_combine.default) == 1
        assert after.count(torch.ops.ascend_graph.vllm_moe_shared_experts.default) == (1 if shared else 0)
        (out,) = gm(x.clone(), LayerName(blk.experts.layer_name))
    torch.testing.assert_close(out, _moe_reference(blk, x, renormalize=True), rtol=1e-4, atol=1e-4)


def test_vllm_fused_moe_through_ascend_backend_counts(dist, tmp_path):
    config = _moe_config(tmp_path, norm=False)
    blk = _moe_block(config, seed=5)
    x = torch.randn(13, HIDDEN)
    torch._dynamo.reset()
    with set_current_vllm_config(config), set_forward_context(None, config, num_tokens=13):
        out = torch.compile(blk, backend=agv.ascend_vllm_backend, fullgraph=True, options={"fusions": ["moe"], "codegen": "fx"})(x)
    torch.testing.assert_close(out, _moe_reference(blk, x, renormalize=False), rtol=1e-4, atol=1e-4)
    s = ascend_graph.stats()
    assert s["fusions"]["moe"] == 1 and s["passes"]["vllm_moe"]["rewrites"] == 1


def test_vllm_fused_moe_not_fused_when_unsupported(dist, tmp_path):
    config = _moe_config(tmp_path)
    blk = _moe_block(config, cuda_backend=False)  # the CPU backend prepacks w13/w2
    assert "MoE backend CPU" in vllm_ops.moe_unsupported(blk.experts, shared=False)
    x = torch.randn(5, HIDDEN)
    with set_current_vllm_config(config), set_forward_context(None, config, num_tokens=5):
        gm = _aten_graph(blk, (x,))
        assert _run(agv.vllm_ops_passes(ascend_graph.AscendConfig(fusions=("moe",))), gm) == {"vllm_moe": 0}


def test_vllm_grouped_topk_routing(dist, tmp_path):
    """DeepSeek-V3 routing (sigmoid, correction bias, grouped top-k, scaling) vs vLLM's grouped_topk."""
    from vllm.model_executor.layers.fused_moe.layer import FusedMoEFactory
    from vllm.model_executor.layers.fused_moe.router.grouped_topk_router import grouped_topk

    config = _moe_config(tmp_path)
    kw = dict(num_experts=EXPERTS, top_k=TOP_K, hidden_size=HIDDEN, intermediate_size=MOE_INTER, use_grouped_topk=True, num_expert_group=4, topk_group=2, scoring_func="sigmoid", routed_scaling_factor=2.5)
    with set_current_vllm_config(config):
        no_bias = FusedMoEFactory(prefix="model.layers.1.mlp.experts", **kw)
        bias = torch.randn(EXPERTS) * 0.1
        runner = FusedMoEFactory(prefix="model.layers.2.mlp.experts", e_score_correction_bias=bias, **kw)
    for r in (no_bias, runner):
        from vllm.model_executor.layers.fused_moe.oracle.unquantized import UnquantizedMoeBackend

        r.routed_experts.quant_method.unquantized_backend = UnquantizedMoeBackend.TRITON
    assert "grouped top-k without a correction bias" in vllm_ops.moe_unsupported(no_bias, shared=False)
    assert vllm_ops.moe_unsupported(runner, shared=False) is None
    r = vllm_ops.moe_routing(runner)
    logits = torch.randn(9, EXPERTS)
    w, ids = torch.ops.ascend_graph.moe_gating_topk(logits, r["top_k"], bias, r["scoring"], r["n_group"], r["topk_group"], r["renormalize"], r["routed_scaling_factor"], 0.0)
    rw, rids = grouped_topk(torch.empty(9, HIDDEN), logits, TOP_K, True, 4, 2, "sigmoid", 2.5, bias)
    order, rorder = ids.sort(-1), rids.long().sort(-1)
    assert torch.equal(order.values, rorder.values)
    torch.testing.assert_close(w.gather(1, order.indices), rw.gather(1, rorder.indices).to(w.dtype), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- rotary op


class _RopeModule(torch.nn.Module):
    """q/k of a fused qkv projection, scaled (as a q/k norm would), rotated in place by
    vLLM's ``_C.rotary_embedding`` (what ``RotaryEmbedding.forward_cpu`` calls when vLLM's
    ``custom_ops`` is "all", its default for any backend but inductor)."""

    def __init__(self, head, neox):
        super().__init__()
        self.head, self.neox = head, neox

    def forward(self, qkv, positions, cos_sin_cache):
        from vllm import _custom_ops as ops

        h = self.head
        q, k, v = qkv.split([4 * h, 2 * h, 2 * h], dim=-1)
        q, k = q * 1.5, k * 0.5
        ops.rotary_embedding(positions, q, k, h, cos_sin_cache, self.neox)
        return q + 1, k * 2, v


@pytest.mark.parametrize("neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("rot", [32, 16], ids=["full", "partial"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vllm_rotary_op_becomes_aten_for_inductor(neox, rot, dtype):
    """Under ``backend="ascend"`` vLLM keeps its C rotary op (custom_ops "all"); with inductor
    codegen the pass puts back vLLM's native form, equal to the C op run eagerly."""
    pytest.importorskip("vllm._C", reason="vLLM's C extension (rotary_embedding) is not built here")
    head, t = 32, 7
    g = torch.Generator().manual_seed(rot + neox)
    qkv = torch.randn(t, 8 * head, generator=g).to(dtype)
    positions = torch.randint(0, 60, (t,), generator=g)
    cache = torch.randn(64, rot, generator=g).to(dtype)
    m = _RopeModule(head, neox)
    gm = _aten_graph(m, (qkv, positions, cache), v2=False)  # vLLM's inductor config: v1
    assert any("auto_functionalized" in str(t) for t in _targets(gm))
    assert _run([agv.VllmRopeNativePass(ascend_graph.AscendConfig())], gm) == {"vllm_rope_native": 1}
    assert not any("auto_functionalized" in str(t) or "rotary" in str(t) for t in _targets(gm))
    by_shape = {tuple(x.shape): x for x in (qkv, positions, cache)}
    out = gm(*[by_shape[tuple(n.meta["val"].shape)] for n in gm.graph.nodes if n.op == "placeholder"])
    ref = m(qkv, positions, cache)
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * 4)


def test_vllm_rotary_op_kept_where_codegen_is_not_inductor():
    pytest.importorskip("vllm._C", reason="vLLM's C extension (rotary_embedding) is not built here")
    qkv, positions, cache = torch.randn(5, 256), torch.arange(5), torch.randn(64, 32)
    gm = _aten_graph(_RopeModule(32, True), (qkv, positions, cache), v2=False)
    assert _run([agv.VllmRopeNativePass(ascend_graph.AscendConfig(codegen="fx"))], gm) == {"vllm_rope_native": 0}
    assert any("auto_functionalized" in str(t) for t in _targets(gm))
    # and in the pass manager vLLM's engine uses, it runs before the fusion families
    names = agv.vllm_pass_manager(ascend_graph.AscendConfig()).names
    assert names.index("vllm_rope_native") < names.index("fuse_norm_rope")
