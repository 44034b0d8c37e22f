"""ascend_graph::causal_conv1d / causal_conv1d_update: reference vs plain torch, fake impls,
Triton kernels (CPU interpreter in a subprocess; CUDA on the GPU machine), NPU binding cases."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from ascend_graph.errors import UnsupportedError
from ascend_graph.ops.causal_conv import causal_conv1d, causal_conv1d_update

C, K = 37, 4


def _hf_prefill(x, w, b, act):
    y = F.conv1d(x, w.unsqueeze(1), b, padding=w.shape[-1] - 1, groups=x.shape[1])[..., : x.shape[-1]]
    return F.silu(y) if act else y


def test_prefill_matches_conv1d_and_writes_states():
    torch.manual_seed(0)
    x, w, b = torch.randn(3, C, 11), torch.randn(C, K), torch.randn(C)
    states = torch.full((5, C, K), 7.0)
    idx = torch.tensor([4, -1, 1])
    y = causal_conv1d(x, w, b, states, cache_indices=idx, activation="silu")
    ref = _hf_prefill(x, w, b, True)
    torch.testing.assert_close(y[[0, 2]], ref[[0, 2]])
    torch.testing.assert_close(states[4], x[0, :, -K:])
    torch.testing.assert_close(states[1], x[2, :, -K:])
    assert torch.all(states[[0, 2, 3]] == 7.0)  # padded request (-1) and unused slots untouched


def test_prefill_varlen_with_initial_states_equals_chunked_run():
    torch.manual_seed(1)
    w = torch.randn(C, K)
    full = torch.randn(C, 13)
    # one request split in two chunks; the second continues from the first's final state
    states = torch.zeros(2, C, K - 1)
    first = causal_conv1d(full[:, :6], w, None, states, torch.tensor([0, 6]), torch.tensor([1]), None)
    second = causal_conv1d(full[:, 6:], w, None, states, torch.tensor([0, 7]), torch.tensor([1]), torch.tensor([True]))
    ref = _hf_prefill(full[None], w, None, False)[0]
    torch.testing.assert_close(torch.cat([first, second], -1), ref)
    torch.testing.assert_close(states[1], full[:, -(K - 1):])


@pytest.mark.parametrize("L", [1, 3])
def test_update_matches_hf_cat_form(L):
    torch.manual_seed(2)
    w, b = torch.randn(C, K), torch.randn(C)
    state = torch.randn(4, C, K)  # HF keeps K columns
    x = torch.randn(4, C, L)
    cat = torch.cat([state, x], -1)
    ref = F.silu(F.conv1d(cat, w.unsqueeze(1), b, groups=C)[..., -L:])
    y = causal_conv1d_update(x, state, w, b, activation="swish")
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(state, cat[..., -K:])


def test_update_speculative_accepted_tokens_equals_replay():
    """vLLM layout: S = K-2+L; after accepting a tokens, the next step sees exactly those."""
    torch.manual_seed(3)
    L, w = 3, torch.randn(C, K)
    hist = torch.randn(C, 20)
    state = torch.zeros(1, C, K - 2 + L)
    state[0, :, : K - 1] = hist[:, -(K - 1):]  # right after a prefill: window at column 0
    draft = torch.randn(1, C, L)
    causal_conv1d_update(draft, state, w, num_accepted_tokens=torch.tensor([1]))
    nxt = torch.randn(1, C, L)
    y = causal_conv1d_update(nxt, state, w, num_accepted_tokens=torch.tensor([2]))  # 2 drafts accepted
    seq = torch.cat([hist, draft[0, :, :2], nxt[0]], -1)
    ref = _hf_prefill(seq[None], w, None, False)[0, :, -L:]
    torch.testing.assert_close(y[0], ref)


def test_update_2d_input_and_padded_slot():
    w = torch.randn(C, K)
    state = torch.randn(3, C, K - 1)
    before = state.clone()
    y = causal_conv1d_update(torch.randn(2, C), state, w, cache_indices=torch.tensor([-1, 2]))
    assert y.shape == (2, C)
    assert torch.equal(state[:2], before[:2])
    assert not torch.equal(state[2], before[2])


def test_fake_impls_and_errors():
    from torch._subclasses import FakeTensorMode

    with FakeTensorMode():
        y = causal_conv1d(torch.randn(2, C, 9), torch.randn(C, K), activation="silu")
        assert y.shape == (2, C, 9)
        y = causal_conv1d_update(torch.randn(2, C, 2), torch.randn(4, C, K), torch.randn(C, K))
        assert y.shape == (2, C, 2)
    with pytest.raises(UnsupportedError) as e:
        causal_conv1d(torch.randn(2, C, 9), torch.randn(C, K), activation="gelu")
    assert e.value.got == "'gelu'"
    with pytest.raises(UnsupportedError):
        causal_conv1d_update(torch.randn(2, C), torch.randn(2, C, K - 2), torch.randn(C, K))


_TRITON_SCRIPT = textwrap.dedent(
    """
    import torch
    from ascend_graph.ops import causal_conv as cc
    from ascend_graph.ops.kernels.triton import causal_conv as tk
    torch.manual_seed(0)
    C, K = 20, 4
    w, bias = torch.randn(C, K), torch.randn(C)
    worst = 0.0
    # two channel blocks, several token blocks, padded requests, S > K-1 and S = K-1
    for S, act in ((4, "silu"), (3, "")):
        if True:
            x = torch.randn(3, 11, C).transpose(1, 2)
            st0 = torch.randn(5, C, S)
            idx, init = torch.tensor([4, -1, 1]), torch.tensor([True, True, False])
            s1, s2 = st0.clone(), st0.clone()
            r = cc.reference_causal_conv1d(x, w, bias, s1, None, idx, init, act)
            t = tk.causal_conv1d(x, w, bias, s2, None, idx, init, act, block_c=16, block_l=4)
            worst = max(worst, (r[[0, 2]] - t[[0, 2]]).abs().max().item(), (s1 - s2).abs().max().item())
            qsl, xv = torch.tensor([0, 2, 9, 9, 16]), torch.randn(16, C).t()
            idx, init = torch.tensor([0, 3, -1, 2]), torch.tensor([True, False, True, True])
            s1, s2 = st0.clone(), st0.clone()
            r = cc.reference_causal_conv1d(xv, w, None, s1, qsl, idx, init, act)
            t = tk.causal_conv1d(xv, w, None, s2, qsl, idx, init, act, block_c=16, block_l=4)
            worst = max(worst, (r - t).abs().max().item(), (s1 - s2).abs().max().item())
            # the update, both kernels: 5 requests, the tile kernel 2 per program (a partial last block)
            for L, use_acc in ((1, False), (3, True), (2, False)):
                for acc in [torch.tensor([1, 2, L, 1, 3]) if use_acc else None]:
                    st0u = torch.randn(6, C, K - 2 + L if acc is not None else S)
                    xu = torch.randn(5, C, L) if L > 1 else torch.randn(5, C)
                    idx = torch.tensor([5, -1, 0, 2, 4])
                    s1 = st0u.clone()
                    r = cc.reference_causal_conv1d_update(xu, s1, w, bias, idx, acc, act)
                    for kw in (dict(kernel="column"), dict(kernel="tile", block_r=2)):
                        s2 = st0u.clone()
                        t = tk.causal_conv1d_update(xu, s2, w, bias, idx, acc, act, block_c=16, **kw)
                        assert torch.equal(s1, s2) and torch.all(t[1] == 0), kw
                        worst = max(worst, (r[[0, 2, 3, 4]] - t[[0, 2, 3, 4]]).abs().max().item())
    print("WORST", worst)
    """
)


def test_triton_kernels_match_reference_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    worst = float(proc.stdout.split("WORST")[-1])
    assert worst < 1e-4


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernels_match_reference(dtype):
    torch.manual_seed(0)
    dev, Cc = "cuda", 1000
    w, b = torch.randn(Cc, K, device=dev, dtype=dtype), torch.randn(Cc, device=dev, dtype=dtype)
    x = torch.randn(3, 77, Cc, device=dev, dtype=dtype).transpose(1, 2)
    s1 = torch.randn(5, Cc, K - 1, device=dev, dtype=dtype)
    s2 = s1.clone()
    idx, init = torch.tensor([4, -1, 1], device=dev), torch.tensor([True, True, False], device=dev)
    y = causal_conv1d(x, w, b, s1, None, idx, init, "silu")
    from ascend_graph.ops.causal_conv import reference_causal_conv1d, reference_causal_conv1d_update

    r = reference_causal_conv1d(x, w, b, s2, None, idx, init, "silu")
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(y[[0, 2]], r[[0, 2]], **tol)
    torch.testing.assert_close(s1, s2)
    xu = torch.randn(64, Cc, device=dev, dtype=dtype)
    s1 = torch.randn(64, Cc, K, device=dev, dtype=dtype)
    s2 = s1.clone()
    y = causal_conv1d_update(xu, s1, w, b, activation="silu")
    r = reference_causal_conv1d_update(xu, s2, w, b, None, None, "silu")
    torch.testing.assert_close(y, r, **tol)
    torch.testing.assert_close(s1, s2)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["vllm", "hf", "cfirst"])
def test_cuda_update_configs_layouts_padding_and_speculative(layout):
    """Both update kernels in every state layout (the default pick, several requests per
    program with a batch that is not a multiple of them, with and without eviction hints),
    padded slots and the 1+k form: outputs as the reference, the state bit-exact (the
    update only moves state values)."""
    from ascend_graph.ops.causal_conv import reference_causal_conv1d_update
    from ascend_graph.ops.kernels.triton import causal_conv as tk

    torch.manual_seed(1)
    dev, Cc, B, N = "cuda", 1000, 37, 50
    w, b = torch.randn(Cc, K, device=dev, dtype=torch.bfloat16), torch.randn(Cc, device=dev, dtype=torch.bfloat16)
    slots = torch.randperm(N, device=dev)[:B]
    slots[[3, 20]] = -1  # padded requests
    for L, spec in ((1, False), (3, False), (3, True)):
        S = K - 2 + L if spec else (K if layout == "hf" else K - 1)
        acc = torch.randint(1, L + 1, (B,), device=dev) if spec else None
        if layout == "vllm":
            st0 = torch.randn(N, S, Cc, device=dev, dtype=torch.bfloat16).transpose(1, 2)
        else:
            st0 = torch.randn(N, Cc, S, device=dev, dtype=torch.bfloat16)
        x = torch.randn(B, L, Cc, device=dev, dtype=torch.bfloat16).transpose(1, 2)
        s_ref = st0.clone()
        ref = reference_causal_conv1d_update(x, s_ref, w, b, slots, acc, "silu")
        keep = slots >= 0
        configs = (
            {},  # the default pick for the layout
            dict(kernel="column"),
            dict(kernel="tile", evict=False),
            dict(kernel="tile", block_r=1, block_c=1024, num_warps=4),
            dict(kernel="tile", block_r=8, block_c=256, num_warps=8),
        )
        for kw in configs:
            s = st0.clone()
            y = tk.causal_conv1d_update(x, s, w, b, slots, acc, "silu", **kw)
            torch.testing.assert_close(y[keep], ref[keep], atol=2e-2, rtol=2e-2)
            assert torch.equal(s, s_ref), (layout, L, spec, kw)


def test_npu_meta_checks_use_our_fake_shapes():
    """The contract cases: expected shapes come from our fake impl (tokens-last view)."""
    from ascend_graph.ops.kernels.npu import causal_conv as npu

    assert {name for name, _ in npu.META_CHECKS} == {"npu_fused_causal_conv1d"}
    for _, build in npu.META_CHECKS:
        expected, args, kwargs = build()
        assert expected == [tuple(args[0].shape)]  # torch_npu's meta returns empty_like(x)
        assert kwargs["activation"] == "None" and kwargs["pad_slot_id"] == -1


def test_npu_supported_envelope():
    from ascend_graph.ops.kernels.npu.causal_conv import supported

    x = torch.empty(2, 256, 1, dtype=torch.bfloat16)
    w3 = torch.empty(256, 3, dtype=torch.bfloat16)
    good = torch.empty(4, 2, 256, dtype=torch.bfloat16).transpose(-1, -2)
    assert supported(x, w3, good, 1, spec=False)
    assert not supported(x, torch.empty(256, 4, dtype=torch.bfloat16), good, 1, spec=False)  # K=4
    assert not supported(x, w3, torch.empty(4, 256, 2, dtype=torch.bfloat16), 1, spec=False)  # not tokens-last
    assert not supported(x.float(), w3.float(), good.float(), 1, spec=False)
