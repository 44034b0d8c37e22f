"""Gated delta rule ops: chunked == recurrent (fp32), metadata paths identical, Triton kernel, fake shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import ascend_graph.ops  # noqa: F401  (registers the ops)
from ascend_graph.ops import gated_delta as gd

Hk, H, K, V = 2, 4, 16, 12


def _inputs(lens, n_slots=9, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    T = sum(lens)
    q, k = torch.randn(T, Hk, K, generator=gen), torch.randn(T, Hk, K, generator=gen)
    v = torch.randn(T, H, V, generator=gen)
    g = F.logsigmoid(torch.randn(T, H, generator=gen))
    beta = torch.rand(T, H, generator=gen)
    cache = torch.randn(n_slots, H, K, V, generator=gen)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    return [x.to(device) for x in (q, k, v, g, beta, cache, cu)]


def _per_sequence_reference(q, k, v, g, beta, cache, cu, idx, has_init, scale, l2):
    cache = cache.clone()
    out = torch.zeros_like(v)
    for b, (lo, hi) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        h0 = cache[idx[b]] * (1.0 if has_init is None else float(has_init[b]))
        o, S = gd.recurrent_reference(q[lo:hi], k[lo:hi], v[lo:hi], g[lo:hi], beta[lo:hi], h0, scale, l2)
        out[lo:hi] = o
        cache[idx[b]] = S
    return out, cache


@pytest.mark.parametrize("l2", [True, False])
def test_chunk_equals_recurrent_varlen(l2):
    lens = [1, 70, 128, 5, 193]  # one token, across a chunk edge, exact chunks, short, 4 chunks
    q, k, v, g, beta, cache, cu = _inputs(lens)
    idx = torch.tensor([3, 0, 6, 1, 2], dtype=torch.int32)
    has_init = torch.tensor([True, False, True, True, True])
    c = cache.clone()
    out = gd.chunk_gated_delta_rule(q, k, v, g, beta, c, cu, idx, has_init, scale=0.3, use_qk_l2norm=l2)
    want, want_cache = _per_sequence_reference(q, k, v, g, beta, cache, cu, idx, has_init, 0.3, l2)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(c, want_cache, atol=1e-4, rtol=1e-4)
    untouched = [s for s in range(cache.shape[0]) if s not in idx.tolist()]
    assert torch.equal(c[untouched], cache[untouched])


def test_prebuilt_metadata_gives_identical_results():
    lens = [65, 3, 130]
    q, k, v, g, beta, cache, cu = _inputs(lens, seed=1)
    builder = gd.ChunkMetadataBuilder(max_seqs=8, max_tokens=1024, device="cpu")
    meta = builder.build(lens)
    assert torch.equal(meta.cu_seqlens, cu)
    c1, c2 = cache.clone(), cache.clone()
    o1 = gd.chunk_gated_delta_rule(q, k, v, g, beta, c1, cu, None, None, scale=0.25, use_qk_l2norm=True)
    o2 = gd.chunk_gated_delta_rule(q, k, v, g, beta, c2, None, None, None, metadata=meta, scale=0.25, use_qk_l2norm=True)
    assert torch.equal(o1, o2) and torch.equal(c1, c2)


def test_builder_reuses_device_buffers_and_checks_capacity():
    builder = gd.ChunkMetadataBuilder(max_seqs=2, max_tokens=100, device="cpu")
    a = builder.build([64, 1])
    b = builder.build([3])
    assert a.cu_seqlens.data_ptr() == b.cu_seqlens.data_ptr()  # persistent: a captured graph can replay over them
    assert b.chunk_indices.tolist() == [[0, 0]] and b.chunk_offsets.tolist() == [0, 1]
    with pytest.raises(gd.UnsupportedError) as e:
        builder.build([1, 1, 1])
    assert e.value.got == "3 sequences, 3 tokens"


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=300), min_size=1, max_size=6))
def test_chunk_metadata_lists(lens):
    cu, indices, offsets = gd.chunk_metadata_lists(lens)
    assert cu[-1] == sum(lens) and len(offsets) == len(lens) + 1
    assert len(indices) == offsets[-1] == sum(-(-n // 64) for n in lens)
    for c, (b, j) in enumerate(indices):
        assert offsets[b] + j == c and j * 64 < lens[b]


def test_recurrent_op_decode_spec_and_padding():
    # speculative layout: 2 requests of 3 tokens, each token's state to its own slot, read
    # from the slot of the last accepted token
    q, k, v, g, beta, cache, cu = _inputs([3, 3], n_slots=9, seed=2)
    idx = torch.tensor([[4, 5, 6], [1, 2, 3]], dtype=torch.int32)
    acc = torch.tensor([2, 1], dtype=torch.int32)
    c = cache.clone()
    out = gd.recurrent_gated_delta_rule(q, k, v, g, beta, c, cu, idx, acc, scale=0.3, use_qk_l2norm=True)
    for b, read in ((0, 5), (1, 1)):
        sl = slice(3 * b, 3 * b + 3)
        o, states = gd.recurrent_reference(q[sl], k[sl], v[sl], g[sl], beta[sl], cache[read], 0.3, True, keep_states=True)
        torch.testing.assert_close(out[sl], o)
        torch.testing.assert_close(c[idx[b].long()], states)
    # plain decode with a padded request (slot -1): zero output, no state touched
    q, k, v, g, beta, cache, _ = _inputs([1, 1, 1], seed=3)
    c = cache.clone()
    out = gd.recurrent_gated_delta_rule(q, k, v, g, beta, c, None, torch.tensor([4, -1, 2], dtype=torch.int32), scale=0.3)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(c[[0, 1, 3, 5, 6, 7, 8]], cache[[0, 1, 3, 5, 6, 7, 8]])
    o, S = gd.recurrent_reference(q[2:3], k[2:3], v[2:3], g[2:3], beta[2:3], cache[2], 0.3, False)
    torch.testing.assert_close(out[2:3], o)
    torch.testing.assert_close(c[2], S)


def test_fake_shapes_and_bad_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v, g, beta, cache, cu = _inputs([5, 9])
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = torch.ops.ascend_graph.chunk_gated_delta_rule(q, k, v, g, beta, cache, cu, None, None, None, None, 0.3, True)
        assert out.shape == v.shape and out.dtype == v.dtype
        out = torch.ops.ascend_graph.recurrent_gated_delta_rule(q, k, v, g, beta, cache, cu, None, None, 0.3, True)
        assert out.shape == v.shape
    with pytest.raises(gd.UnsupportedError) as e:
        gd.recurrent_gated_delta_rule(q, k, v, g[:, :1], beta, cache)
    assert e.value.expected == (14, H)


_TRITON_CHECK = r"""
import sys, torch
sys.path.insert(0, {root!r})
from tests.ops.test_gated_delta_ops import _inputs
from ascend_graph.ops import gated_delta as gd
from ascend_graph.ops.kernels.triton.gated_delta import recurrent_gated_delta_rule_triton
for case in ("varlen", "spec", "pad"):
  acc = None
  if case == "varlen":
      q, k, v, g, beta, cache, cu = _inputs([3, 1, 2], seed=4)
      idx = torch.tensor([4, 0, 2], dtype=torch.int32)
  elif case == "spec":
      q, k, v, g, beta, cache, cu = _inputs([3, 3], seed=5)
      idx = torch.tensor([[4, 5, 6], [1, 2, 3]], dtype=torch.int32)
      acc = torch.tensor([3, 1], dtype=torch.int32)
  else:
      q, k, v, g, beta, cache, _ = _inputs([1, 1, 1], seed=6)
      cu, idx = None, torch.tensor([4, -1, 2], dtype=torch.int32)
  c1, c2 = cache.clone(), cache.clone()
  want = gd._recurrent_op(q, k, v, g, beta, c1, cu, idx, acc, 0.3, True)
  got = recurrent_gated_delta_rule_triton(q, k, v, g, beta, c2, cu, idx, acc, 0.3, True)
  torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
  torch.testing.assert_close(c2, c1, atol=1e-5, rtol=1e-5)
"""


def test_triton_recurrent_kernel_interpreted():
    # TRITON_INTERPRET must be set before Triton is first used in the process: a subprocess.
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _TRITON_CHECK.format(root=root)], env=env, capture_output=True, text=True, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.cuda
def test_cuda_ops_match_cpu_reference():
    lens = [1, 70, 128, 5, 193]
    cpu = _inputs(lens, seed=7)
    dev = [x.cuda() for x in cpu]
    idx = torch.tensor([3, 0, 6, 1, 2], dtype=torch.int32)
    c_cpu, c_dev = cpu[5].clone(), dev[5].clone()
    want = gd.chunk_gated_delta_rule(*cpu[:5], c_cpu, cpu[6], idx, None, scale=0.3, use_qk_l2norm=True)
    got = gd.chunk_gated_delta_rule(*dev[:5], c_dev, dev[6], idx.cuda(), None, scale=0.3, use_qk_l2norm=True)
    torch.testing.assert_close(got.cpu(), want, atol=2e-3, rtol=2e-3)  # fla/TF32 matmuls
    torch.testing.assert_close(c_dev.cpu(), c_cpu, atol=2e-3, rtol=2e-3)
    r_cpu, r_dev = cpu[5].clone(), dev[5].clone()
    want = gd.recurrent_gated_delta_rule(*cpu[:5], r_cpu, cpu[6], idx, scale=0.3, use_qk_l2norm=True)
    got = gd.recurrent_gated_delta_rule(*dev[:5], r_dev, dev[6], idx.cuda(), scale=0.3, use_qk_l2norm=True)
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(r_dev.cpu(), r_cpu, atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
def test_cuda_forward_never_syncs_with_prebuilt_metadata():
    lens = [100, 1, 257]
    q, k, v, g, beta, cache, _ = _inputs(lens, seed=8, device="cuda")
    builder = gd.ChunkMetadataBuilder(max_seqs=4, max_tokens=1024, device="cuda")
    meta = builder.build(lens)  # host work + async copy, before the forward
    idx = torch.tensor([0, 2, 1], dtype=torch.int32, device="cuda")
    gd.chunk_gated_delta_rule(q, k, v, g, beta, cache.clone(), None, idx, None, metadata=meta, scale=0.3, use_qk_l2norm=True)  # warm up (Triton compiles)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gd.chunk_gated_delta_rule(q, k, v, g, beta, cache, None, idx, None, metadata=meta, scale=0.3, use_qk_l2norm=True)
        gd.recurrent_gated_delta_rule(q[:3], k[:3], v[:3], g[:3], beta[:3], cache, None, idx, scale=0.3, use_qk_l2norm=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.cuda
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_cuda_chunk_state_gather_and_write_back(state_dtype):
    # padded request (slot -1: neither read nor written), a request without an initial
    # state, scattered slots, a bf16 state cache: the one-launch gather/scatter path
    lens = [70, 5, 129]
    cpu = _inputs(lens, seed=11)
    cpu[5] = cpu[5].to(state_dtype)
    dev = [x.cuda() for x in cpu]
    idx = torch.tensor([6, -1, 2], dtype=torch.int32)
    has_init = torch.tensor([True, True, False])
    c_cpu, c_dev = cpu[5].clone(), dev[5].clone()
    want = gd.chunk_gated_delta_rule(*cpu[:5], c_cpu, cpu[6], idx, has_init, scale=0.3, use_qk_l2norm=True)
    got = gd.chunk_gated_delta_rule(*dev[:5], c_dev, dev[6], idx.cuda(), has_init.cuda(), scale=0.3, use_qk_l2norm=True)
    lo, hi = lens[0], lens[0] + lens[1]
    keep = torch.ones(sum(lens), dtype=torch.bool)
    keep[lo:hi] = False  # the padded request's outputs are unspecified
    tol = 2e-3 if state_dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.cpu()[keep], want[keep], atol=tol, rtol=tol)
    torch.testing.assert_close(c_dev.cpu().float(), c_cpu.float(), atol=tol, rtol=tol)
    untouched = [s for s in range(cpu[5].shape[0]) if s not in (6, 2)]
    assert torch.equal(c_dev.cpu()[untouched], cpu[5][untouched])


@pytest.mark.cuda
def test_cuda_chunk_single_sequence_dense_path():
    # cu_seqlens None: one sequence of T tokens, fla's dense (no-metadata) path
    q, k, v, g, beta, cache, _ = _inputs([300], seed=12)
    c_cpu, c_dev = cache.clone(), cache.cuda()
    idx = torch.tensor([4], dtype=torch.int32)
    want = gd.chunk_gated_delta_rule(q, k, v, g, beta, c_cpu, None, idx, None, scale=0.3, use_qk_l2norm=True)
    got = gd.chunk_gated_delta_rule(q.cuda(), k.cuda(), v.cuda(), g.cuda(), beta.cuda(), c_dev, None, idx.cuda(), None, scale=0.3, use_qk_l2norm=True)
    torch.testing.assert_close(got.cpu(), want, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(c_dev.cpu(), c_cpu, atol=2e-3, rtol=2e-3)
