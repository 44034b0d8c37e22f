"""Cross-layer KV caches (``runtime/kv_layout.py``) and every fused KV op on their views:
the CPU references, the Triton kernels (CPU interpreter; natively on CUDA, marked), the
NPU bindings (the exact torch_npu call, replayed with the reference on CPU), and a
compiled paged model step through ``backend="ascend"`` (padding, slot -1, runner)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import ascend_graph
import ascend_graph.ops.attention as ops
from ascend_graph.backend import ascend_backend
from ascend_graph.errors import ConfigError, UnsupportedError
from ascend_graph.ops.kernels.npu import attention as npu
from ascend_graph.runtime import kv_layout

LAYOUTS = kv_layout.LAYOUTS
GEOM = dict(num_layers=3, num_blocks=13, block_size=4, kv_heads=2, head_size=12, head_size_v=5, dtype=torch.float32)


def filled(layout: str, seed: int = 0, **geom) -> kv_layout.KVCaches:
    g = dict(GEOM, **geom)
    c = kv_layout.allocate(layout, **g)
    gen = torch.Generator().manual_seed(seed)
    for i in range(c.num_layers):
        k, v = c.layer(i)
        k.copy_(torch.randn(k.shape, generator=gen))
        v.copy_(torch.randn(v.shape, generator=gen))
    return c


def base_of(c: kv_layout.KVCaches) -> list[torch.Tensor]:
    return c._block_tensors()


# --------------------------------------------------------------------------- layout


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layer_views_are_views_of_the_shared_storage(layout):
    c = kv_layout.allocate(layout, **GEOM)
    storages = {t.untyped_storage().data_ptr() for t in base_of(c)}
    for i in range(c.num_layers):
        k, v = c.layer(i)
        assert k.shape == (13, 4, 2, 12) and v.shape == (13, 4, 2, 5)
        assert k.stride(-1) == 1 and v.stride(-1) == 1
        assert {k.untyped_storage().data_ptr(), v.untyped_storage().data_ptr()} <= storages
        k[3, 2, 1].fill_(i + 1)
        v[6, 0, 0].fill_(-(i + 1))
    # each write landed in its own layer and nowhere else
    for i in range(c.num_layers):
        k, v = c.layer(i)
        assert (k[3, 2, 1] == i + 1).all() and (v[6, 0, 0] == -(i + 1)).all()
        assert int(torch.count_nonzero(k)) == 12 and int(torch.count_nonzero(v)) == 5
    if layout != "per_layer":
        k_all = c.k
        assert k_all.shape[:2] == (13, 3)  # (num_blocks, num_layers, ...): blocks outermost


def test_packed_layout_splits_k_and_v_at_the_k_head_size_not_in_halves():
    """MLA: a 12-wide part and a 5-wide part (kv_lora_rank vs qk_rope_head_dim)."""
    c = kv_layout.allocate("cross_layer_packed", **GEOM)
    assert c.k is c.v and c.k.shape == (13, 3, 4, 2, 17)
    k, v = c.layer(2)
    v.fill_(1.0)
    assert torch.count_nonzero(k) == 0 and torch.count_nonzero(c.k[:, 2, ..., 12:]) == v.numel()
    assert kv_layout.cross_layer_block_stride(k) is None  # head stride 17, not 12


def test_cross_layer_block_stride():
    c = kv_layout.allocate("cross_layer", **GEOM)
    assert kv_layout.cross_layer_block_stride(c.layer(1)[0]) == 3
    assert kv_layout.cross_layer_block_stride(torch.zeros(13, 4, 2, 12)) == 1
    assert kv_layout.cross_layer_block_stride(torch.zeros(7, 4, 12, 2).transpose(2, 3)) is None


def test_bad_layout_and_dims_are_config_errors():
    with pytest.raises(ConfigError) as e:
        kv_layout.allocate("layer_major", **GEOM)
    assert e.value.expected == LAYOUTS
    with pytest.raises(ConfigError):
        kv_layout.allocate("cross_layer", **dict(GEOM, head_size_v=0))
    with pytest.raises(ConfigError):
        kv_layout.allocate("cross_layer", **GEOM).layer(3)


@pytest.mark.parametrize("layout,per_block", [("per_layer", 6), ("cross_layer", 2), ("cross_layer_packed", 1)])
def test_copy_blocks_moves_every_layer_with_the_stated_copy_count(layout, per_block):
    dev = filled(layout)
    host = kv_layout.allocate(layout, **dict(GEOM, num_blocks=4))
    assert dev.copies_per_block() == per_block
    assert dev.copy_blocks(host, [5, 1, 2], [0, 3, 1], non_blocking=False) == 3 * per_block
    back = kv_layout.allocate(layout, **GEOM)
    assert host.copy_blocks(back, [0, 3, 1], [4, 1, 2], non_blocking=False) == 3 * per_block
    for i in range(3):
        for a, b in zip(dev.layer(i), back.layer(i)):
            torch.testing.assert_close(b[[4, 1, 2]], a[[5, 1, 2]], rtol=0, atol=0)
            assert torch.count_nonzero(b[[0, 3, 5, 6, 12]]) == 0
    with pytest.raises(UnsupportedError):
        dev.copy_blocks(kv_layout.allocate("per_layer" if layout != "per_layer" else "cross_layer", **GEOM), [0], [0])


# --------------------------------------------------------------------------- ops on views (CPU references)


def paged_meta(seed=0, q_lens=(1, 3, 1), kv_lens=(9, 14, 2), bs=4, num_blocks=13):
    """Distinct blocks per request (no slot written twice), scattered over the cache."""
    gen = torch.Generator().manual_seed(seed)
    r, max_blocks = len(q_lens), 4
    bt = torch.randperm(num_blocks, generator=gen)[: r * max_blocks].view(r, max_blocks).int()
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    lens = torch.tensor(kv_lens, dtype=torch.int32)
    t = int(cu[-1])
    slots = torch.tensor([int(bt[i, p // bs]) * bs + p % bs for i, (n, L) in enumerate(zip(q_lens, kv_lens)) for p in range(L - n, L)])
    slots = torch.cat([slots, torch.tensor([-1, -1])])  # two padded rows
    return bt, cu, lens, slots, t + 2


@pytest.mark.parametrize("layout", ["cross_layer", "cross_layer_packed"])
def test_cache_write_and_paged_attention_on_views_equal_per_layer_caches(layout):
    views, plain = filled(layout, seed=1), filled("per_layer", seed=1)
    bt, cu, lens, slots, t = paged_meta()
    gen = torch.Generator().manual_seed(2)
    k, v, q = torch.randn(t, 2, 12, generator=gen), torch.randn(t, 2, 5, generator=gen), torch.randn(t, 6, 12, generator=gen)
    before = [tuple(x.clone() for x in views.layer(i)) for i in range(3)]
    torch.ops.ascend_graph.reshape_and_cache(k, v, *views.layer(1), slots)
    torch.ops.ascend_graph.reshape_and_cache(k, v, *plain.layer(1), slots)
    for i in range(3):
        for a, b in zip(views.layer(i), plain.layer(i)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        if i != 1:  # other layers untouched
            for a, b in zip(views.layer(i), before[i]):
                assert torch.equal(a, b)
    assert not torch.equal(views.layer(1)[0], before[1][0])
    out = torch.ops.ascend_graph.paged_attention(q, *views.layer(1), bt, cu, lens, None, 0.3, -1)
    ref = torch.ops.ascend_graph.paged_attention(q, *plain.layer(1), bt, cu, lens, None, 0.3, -1)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


# --------------------------------------------------------------------------- Triton on views (interpreter)

_INTERPRET_SCRIPT = textwrap.dedent(
    """
    import torch
    from tests.runtime.test_kv_layout import filled, paged_meta
    from ascend_graph.ops import attention as ops
    from ascend_graph.ops.kernels.triton import attention as K
    bt, cu, lens, slots, t = paged_meta()
    g = torch.Generator().manual_seed(3)
    k, v, q = torch.randn(t, 2, 12, generator=g), torch.randn(t, 2, 5, generator=g), torch.randn(t, 6, 12, generator=g)
    sinks = torch.randn(6, generator=g)
    for layout in ("cross_layer", "cross_layer_packed"):
        views, plain = filled(layout, seed=1), filled("per_layer", seed=1)
        K.reshape_and_cache_cuda(k, v, *views.layer(2), slots)
        ops.reshape_and_cache_reference(k, v, *plain.layer(2), slots)
        for i in range(3):
            for a, b in zip(views.layer(i), plain.layer(i)):
                assert torch.equal(a, b), (layout, i)
        for splits, s in ((1, None), (1, sinks), (3, sinks), (None, None)):
            out = K.paged_attention_cuda(q, *views.layer(2), bt, cu, lens, s, 0.3, -1, num_splits=splits)
            ref = ops.paged_attention_reference(q, *plain.layer(2), bt, cu, lens, s, 0.3, -1)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    print("INTERPRETED-OK")
    """
)


def test_triton_kernels_on_cross_layer_views_under_interpreter():
    """Cache write and paged attention (one launch and split, sinks) on layer 2 of
    cross-layer and packed caches, against the references on per-layer caches."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root)
    proc = subprocess.run([sys.executable, "-c", _INTERPRET_SCRIPT], env=env, capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0 and "INTERPRETED-OK" in proc.stdout, proc.stderr[-3000:]


def test_triton_refuses_a_cache_strided_in_its_head_dim():
    from ascend_graph.ops.kernels.triton import attention as K

    kc = torch.zeros(3, 4, 8, 2).transpose(2, 3)  # head dim of stride 2
    with pytest.raises(UnsupportedError) as e:
        K.reshape_and_cache_cuda(torch.zeros(1, 2, 8), torch.zeros(1, 2, 8), kc, kc, torch.zeros(1, dtype=torch.long))
    assert e.value.expected == "stride(-1) == 1"


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["cross_layer", "cross_layer_packed"])
def test_cuda_ops_on_views_equal_per_layer(layout):
    dev = dict(GEOM, head_size=64, head_size_v=64, dtype=torch.bfloat16)
    views = kv_layout.allocate(layout, **dev, device="cuda")
    plain = kv_layout.allocate("per_layer", **dev, device="cuda")
    for i in range(3):
        for a, b in zip(views.layer(i), plain.layer(i)):
            a.normal_()
            b.copy_(a)
    bt, cu, lens, slots, t = paged_meta()
    bt, cu, lens, slots = (x.cuda() for x in (bt, cu, lens, slots))
    k, v, q = (torch.randn(t, n, 64, device="cuda", dtype=torch.bfloat16) for n in (2, 2, 6))
    ops.reshape_and_cache(k, v, *views.layer(1), slots)
    ops.reshape_and_cache(k, v, *plain.layer(1), slots)
    for i in range(3):
        for a, b in zip(views.layer(i), plain.layer(i)):
            assert torch.equal(a, b)
    out = ops.paged_attention(q, *views.layer(1), bt, cu, lens, None, 0.125, -1)
    ref = ops.paged_attention(q, *plain.layer(1), bt, cu, lens, None, 0.125, -1)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


# --------------------------------------------------------------------------- NPU bindings on views


class _Record:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        def op(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            e = torch.empty(0, 0, 0)
            return e, e

        return op


def _inside(alias: torch.Tensor, base: torch.Tensor) -> bool:
    lo = base.untyped_storage().data_ptr()
    hi = lo + base.untyped_storage().nbytes()
    end = alias.data_ptr() + alias.numel() * alias.element_size()
    return lo <= alias.data_ptr() and end <= hi


def test_npu_scatter_gets_a_contiguous_alias_and_remapped_slots_never_a_copy():
    """Replaying the recorded npu_scatter_pa_kv_cache call with the reference write
    (what the op does to contiguous caches) writes exactly what the reference writes
    through the views: the alias is the cache's own storage, the slots follow it."""
    views, plain = filled("cross_layer", seed=1), filled("per_layer", seed=1)
    _, _, _, slots, t = paged_meta()
    k, v = torch.randn(t, 2, 12), torch.randn(t, 2, 5)
    rec = _Record()
    npu._cache_call(rec, k, v, *views.layer(1), slots.int())
    ((name, args, kwargs),) = rec.calls
    assert name == "npu_scatter_pa_kv_cache" and kwargs == {"cache_mode": "Norm"}
    _, _, key_cache, value_cache, mapped = args
    assert key_cache.is_contiguous() and value_cache.is_contiguous()
    assert _inside(key_cache, views.k) and _inside(value_cache, views.v)
    assert key_cache.shape == ((13 - 1) * 3 + 1, 4, 2, 12) and value_cache.shape[-1] == 5
    assert mapped.dtype == torch.int32 and (mapped[slots < 0] == -1).all()
    ops.reshape_and_cache_reference(k, v, key_cache, value_cache, mapped)  # the op, on its alias
    ops.reshape_and_cache_reference(k, v, *plain.layer(1), slots)
    for i in range(3):
        for a, b in zip(views.layer(i), plain.layer(i)):
            assert torch.equal(a, b)


def test_npu_paged_fia_gets_contiguous_aliases_and_a_scaled_block_table():
    views = filled("cross_layer", seed=1, head_size_v=12, dtype=torch.bfloat16)  # FIA's dtype: no fp16 copy
    bt, cu, lens, _, t = paged_meta()
    q = torch.randn(t - 2, 6, 12, dtype=torch.bfloat16)
    rec = _Record()
    npu._paged_call(rec, q, *views.layer(2), bt, cu, lens, None, 0.3, -1)
    ((name, args, kwargs),) = rec.calls
    assert name == "npu_fused_infer_attention_score_v2"
    key, value = args[1], args[2]
    assert key.is_contiguous() and value.is_contiguous() and key.shape == (37, 4, 24)
    assert _inside(key, views.k) and _inside(value, views.v)
    assert torch.equal(kwargs["block_table"], bt * 3) and kwargs["block_table"].dtype == torch.int32
    # the alias read through the scaled table is the view read through the original one
    k4, v4 = key.view(37, 4, 2, 12), value.view(37, 4, 2, 12)
    out = ops.paged_attention_reference(q, k4, v4, kwargs["block_table"], cu, lens, None, 0.3, -1)
    ref = ops.paged_attention_reference(q, *views.layer(2), bt, cu, lens, None, 0.3, -1)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_npu_bindings_refuse_layouts_with_no_contiguous_alias():
    packed = filled("cross_layer_packed")
    bt, cu, lens, slots, t = paged_meta()
    with pytest.raises(UnsupportedError) as e:
        npu._cache_call(_Record(), torch.zeros(t, 2, 12), torch.zeros(t, 2, 5), *packed.layer(0), slots)
    assert "contiguous" in str(e.value)
    cross, plain = filled("cross_layer"), filled("per_layer")
    with pytest.raises(UnsupportedError):  # K across layers, V per layer: one slot map cannot address both
        npu._cache_call(_Record(), torch.zeros(t, 2, 12), torch.zeros(t, 2, 5), cross.layer(0)[0], plain.layer(0)[1], slots)
    # a cross-layer alias above int32-max elements (meta tensors: nothing allocated)
    big = torch.empty(4096, 40, 128, 8, 128, dtype=torch.bfloat16, device="meta")
    with pytest.raises(UnsupportedError) as e:
        npu._paged_call(_Record(), torch.empty(1, 16, 128, dtype=torch.bfloat16, device="meta"), big[:, 3], big[:, 3],
                        bt.to("meta"), cu.to("meta"), lens.to("meta"), None, 0.1, -1)
    assert e.value.got > 2**31 - 1


# --------------------------------------------------------------------------- compiled model step over views

BLOCK, NQ, NKV, HD, HID, LAYERS = 4, 4, 2, 16, 32, 2


class TwoLayerPaged(nn.Module):
    """Two attention layers over one cross-layer cache pair (views taken in forward, as a
    serving engine hands each layer its view): cache write with slot -1 padding, paged
    attention in TND."""

    def __init__(self, layout: str, num_blocks: int = 40):
        super().__init__()
        self.qkv = nn.ModuleList(nn.Linear(HID, (NQ + 2 * NKV) * HD) for _ in range(LAYERS))
        self.o = nn.ModuleList(nn.Linear(NQ * HD, HID) for _ in range(LAYERS))
        self.caches = kv_layout.allocate(layout, num_layers=LAYERS, num_blocks=num_blocks, block_size=BLOCK, kv_heads=NKV, head_size=HD, dtype=torch.float32)
        for i, t in enumerate(self.caches._block_tensors()):
            t.normal_()
            self.register_buffer(f"kv{i}", t)

    def forward(self, x, slot_mapping, block_table, query_start_loc, seq_lens):
        t = x.shape[0]
        torch._check(t == seq_lens.shape[0])
        torch._check(slot_mapping.shape[0] == t)
        torch._check(block_table.shape[0] == seq_lens.shape[0])
        torch._check(query_start_loc.shape[0] == seq_lens.shape[0] + 1)
        for i in range(LAYERS):
            kc, vc = self._layer(i)
            q, k, v = self.qkv[i](x).split([NQ * HD, NKV * HD, NKV * HD], dim=-1)
            torch.ops.ascend_graph.reshape_and_cache(k.reshape(t, NKV, HD), v.reshape(t, NKV, HD), kc, vc, slot_mapping)
            a = torch.ops.ascend_graph.paged_attention(q.reshape(t, NQ, HD), kc, vc, block_table, query_start_loc, seq_lens, None, HD**-0.5, 0)
            x = x + self.o[i](a.reshape(t, NQ * HD))
        return x

    def _layer(self, i):
        if self.caches.layout == "cross_layer":
            return self.kv0[:, i], self.kv1[:, i]
        return self.kv0[:, i, ..., :HD], self.kv0[:, i, ..., HD:]

    def snapshot(self):
        return [b.clone() for b in self.buffers()]

    def restore(self, snap):
        for b, s in zip(self.buffers(), snap):
            b.copy_(s)


def assert_same_cache_writes(compiled, eager, before):
    """The compiled step wrote the cache where eager did, the same values, and nowhere else.

    Entries eager left alone are bitwise unchanged (a padded row never writes). Written
    entries are equal to fp32 rounding, not bitwise: the compiled step's projection runs
    at the padded batch (3 -> 4 rows), and a CPU GEMM of 4 rows need not round as one of
    3 does (oneDNN on an AMD EPYC differs in the last bit)."""
    untouched = eager == before
    torch.testing.assert_close(compiled[untouched], before[untouched], rtol=0, atol=0)
    torch.testing.assert_close(compiled[~untouched], eager[~untouched])


def decode_batch(r, seed, max_blocks=6):
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    block_table = (torch.arange(r)[:, None] * max_blocks + torch.arange(max_blocks)).int()
    ctx = [rng.randint(0, 12) for _ in range(r)]
    seq_lens = torch.tensor([c + 1 for c in ctx], dtype=torch.int32)
    slots = torch.tensor([int(block_table[i, c // BLOCK]) * BLOCK + c % BLOCK for i, c in enumerate(ctx)])
    cu = torch.arange(r + 1, dtype=torch.int32)
    return torch.randn(r, HID, generator=g), slots, block_table, cu, seq_lens


@pytest.mark.parametrize("layout", ["cross_layer", "cross_layer_packed"])
def test_compiled_paged_step_over_cross_layer_views_equals_eager(layout):
    """backend="ascend" with buckets (padded requests: slot -1, kv len 1, block row 0):
    outputs and both layers' caches equal the eager run; padded rows never write."""
    torch.manual_seed(0)
    model = TwoLayerPaged(layout).eval()
    torch._dynamo.reset()
    ascend_graph.reset_stats()
    cm = torch.compile(model, backend=ascend_backend, options={"codegen": "fx", "buckets": [2, 4, 8]}, dynamic=True)
    for trial, r in enumerate([3, 5, 2, 3]):
        batch = decode_batch(r, trial)
        snap = model.snapshot()
        with torch.no_grad():
            out = cm(*batch)
            after = model.snapshot()
            model.restore(snap)
            ref = model(*batch)
        torch.testing.assert_close(out, ref)
        for a, b, s in zip(after, model.buffers(), snap):
            assert_same_cache_writes(a, b, s)
    st = ascend_graph.stats()
    assert st["eager_fallbacks"] == 0 and st["padding"]["padded_rows"] > 0


@pytest.mark.slow
def test_inductor_writes_into_the_cross_layer_views_without_copying_the_cache():
    """codegen="inductor": the cache write is re-inplaced onto the layer views of the
    5-D buffers (no functional copy of the cache and no write-back), and the result
    equals eager."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    model = TwoLayerPaged("cross_layer").eval()
    torch._dynamo.reset()
    cm = torch.compile(model, backend=ascend_backend, options={"codegen": "inductor", "buckets": [2, 4, 8]}, dynamic=True)
    batch = decode_batch(3, 0)
    snap = model.snapshot()
    with torch.no_grad():
        out, codes = run_and_get_code(cm, *batch)
        after = model.snapshot()
        model.restore(snap)
        ref = model(*batch)
    torch.testing.assert_close(out, ref)
    for a, b, s in zip(after, model.buffers(), snap):
        assert_same_cache_writes(a, b, s)
    code = "\n".join(codes)
    assert code.count("ascend_graph.reshape_and_cache.default(") == LAYERS
    assert "copy_(" not in code  # neither a clone of the cache nor a copy back into it
