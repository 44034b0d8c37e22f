"""moe_dispatch_ffn_combine_list: the experts op with one weight tensor per expert.

Against the stacked op (same semantics), its typed errors, the no-stack guarantee on the
CPU, the Triton kernels (CPU interpreter in a subprocess; CUDA on the GPU machine)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ascend_graph.ops  # noqa: F401
from ascend_graph.errors import UnsupportedError
from ascend_graph.ops import moe

ops = torch.ops.ascend_graph


def _case(t=11, h=24, e=5, i=12, k=2, dtype=torch.float32, split=True, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).to(dtype)
    w = torch.rand(t, k, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    gate = [(torch.randn(i, h, generator=g) * 0.3).to(dtype) for _ in range(e)]
    up = [(torch.randn(i, h, generator=g) * 0.3).to(dtype) for _ in range(e)]
    down = [(torch.randn(h, i, generator=g) * 0.3).to(dtype) for _ in range(e)]
    w1, w3 = (gate, up) if split else ([torch.cat([a, b]) for a, b in zip(gate, up)], [])
    mv = lambda ts: [v.to(device) for v in ts]  # noqa: E731
    stacked = (torch.stack([torch.cat([a, b]) for a, b in zip(gate, up)]).to(device), torch.stack(down).to(device))
    return (x.to(device), w.to(device), ids.to(device), mv(w1), mv(w3), mv(down)), stacked


@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
def test_equals_the_stacked_op(activation, split):
    (x, w, ids, w1, w3, w2), (w13, w2s) = _case(split=split)
    ids[0, 1] = 5  # an out-of-range (expert-parallel sentinel) id does nothing
    ids[1, 0] = -1
    mask = torch.arange(11) < 8
    out = ops.moe_dispatch_ffn_combine_list(x, w, ids, w1, w3, w2, activation, mask)
    ref = ops.moe_dispatch_ffn_combine(x, w, ids, w13, w2s, activation, mask)
    torch.testing.assert_close(out, ref)
    assert torch.count_nonzero(out[8:]) == 0


def test_bf16_accumulates_in_fp32():
    (x, w, ids, w1, w3, w2), (w13, w2s) = _case(dtype=torch.bfloat16, t=9)
    out = ops.moe_dispatch_ffn_combine_list(x, w, ids, w1, w3, w2)
    ref = moe.experts_list_reference(x.double(), w.double(), ids, [v.double() for v in w1], [v.double() for v in w3], [v.double() for v in w2])
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_weights_are_never_stacked_or_copied():
    (x, w, ids, w1, w3, w2), _ = _case()
    with _Ops() as rec:  # the op's CPU implementation, seen op by op
        moe.experts_list_reference(x, w, ids, w1, w3, w2)
    assert "aten.mm" in rec.seen or "aten.addmm" in rec.seen  # the recorder sees the op's work
    assert not {"aten.stack", "aten.cat", "aten.clone", "aten._to_copy", "aten.copy_"} & set(rec.seen)


def test_errors_say_expected_and_got():
    (x, w, ids, w1, w3, w2), _ = _case()
    with pytest.raises(UnsupportedError) as err:
        ops.moe_dispatch_ffn_combine_list(x, w, ids, w1, w3[:-1], w2)
    assert err.value.got == "len(w1)=5, len(w3)=4, len(w2)=5"
    ragged = w2[:-1] + [torch.randn(24, 16)]
    with pytest.raises(UnsupportedError) as err:
        ops.moe_dispatch_ffn_combine_list(x, w, ids, w1, w3, ragged)
    assert err.value.got == "w2[4] [24, 16]" and "w2[e] [24, 12]" in err.value.expected
    with pytest.raises(UnsupportedError) as err:
        ops.moe_dispatch_ffn_combine_list(x, w, ids, w1, w3, [v.double() for v in w2])
    assert "float64" in err.value.got
    with pytest.raises(UnsupportedError):
        ops.moe_dispatch_ffn_combine_list(x, w, ids, w1, w3, w2, "clipped_swiglu")
    with pytest.raises(UnsupportedError):
        ops.moe_dispatch_ffn_combine_list(x, w, ids.float(), w1, w3, w2)
    with pytest.raises(UnsupportedError):
        ops.moe_dispatch_ffn_combine_list(x, w, ids, [], [], [])


_INTERPRET_SCRIPT = textwrap.dedent(
    """
    import torch
    import ascend_graph.ops
    from ascend_graph.ops.moe import experts_list_reference
    from ascend_graph.ops.kernels.triton import moe_list
    g = torch.Generator().manual_seed(0)
    cases = [(torch.float32, 7, True, "silu", False), (torch.float32, 5, False, "gelu", True), (torch.bfloat16, 9, True, "gelu_tanh", True), (torch.float32, 70, True, "silu", False)]
    for dtype, t, split, act, masked in cases:
        h, e, i, k = 40, 5, 24, 2
        x = torch.randn(t, h, generator=g).to(dtype)
        w = torch.rand(t, k, generator=g).to(dtype)
        ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
        ids[0, 1] = e  # an out-of-range sentinel: no work
        w1 = [(torch.randn(i if split else 2 * i, h, generator=g) * 0.3).to(dtype) for _ in range(e)]
        w3 = [(torch.randn(i, h, generator=g) * 0.3).to(dtype) for _ in range(e)] if split else []
        w2 = [(torch.randn(h, i, generator=g) * 0.3).to(dtype) for _ in range(e)]
        mask = (torch.arange(t) < t - 2) if masked else None
        assert moe_list.list_supported(x, w1, w3, w2)
        table = moe_list.pointer_table(w1)
        assert moe_list.pointer_table(list(w1)) is table  # built once per list of addresses
        out = moe_list.list_experts(x, w, ids, w1, w3, w2, act, mask)
        ref = experts_list_reference(x, w, ids, w1, w3, w2, act, mask)
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
        torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
        if masked:
            assert out[-2:].abs().max() == 0
    # a view with other strides in one list: not taken (the kernel reads all with one stride)
    assert not moe_list.list_supported(x, w1[:-1] + [torch.randn(h, i).t()], w3, w2)
    print("INTERPRETED-OK")
    """
)


def test_triton_list_kernels_under_interpreter():
    pytest.importorskip("triton")
    # TRITON_INTERPRET must be set before Triton is first used in the process: a subprocess.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root)
    proc = subprocess.run([sys.executable, "-c", _INTERPRET_SCRIPT], env=env, capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0 and "INTERPRETED-OK" in proc.stdout, proc.stderr[-3000:]


# --------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("tokens", [1, 7, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_list_experts_cuda(dtype, tokens, split):
    (x, w, ids, w1, w3, w2), _ = _case(t=tokens, h=256, e=8, i=96, k=2, dtype=dtype, split=split, device="cuda", seed=tokens)
    mask = torch.rand(tokens, device="cuda") > 0.25
    mask[0] = True
    out = ops.moe_dispatch_ffn_combine_list(x, w, ids, w1, w3, w2, "silu", mask)
    cpu = lambda ts: [v.cpu().double() for v in ts]  # noqa: E731
    ref = moe.experts_list_reference(x.cpu().double(), w.cpu().double(), ids.cpu(), cpu(w1), cpu(w3), cpu(w2), "silu", mask.cpu())
    # bf16: the gate/up product is stored in bf16 between the two GEMMs (as the stacked
    # op's), so compare against the output's scale, not element by element
    err = ((out.cpu().double() - ref).abs().max() / ref.abs().max()).item()
    assert err < (1e-5 if dtype == torch.float32 else 1e-2), err
    assert torch.count_nonzero(out[~mask]) == 0


@pytest.mark.cuda
def test_list_experts_one_cuda_graph_serves_any_routing():
    (x, w, ids, w1, w3, w2), _ = _case(t=16, h=256, e=8, i=96, dtype=torch.bfloat16, device="cuda")
    static = [x.clone(), w.clone(), ids.clone()]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up: builds the pointer tables, outside capture
        ops.moe_dispatch_ffn_combine_list(*static, w1, w3, w2)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = ops.moe_dispatch_ffn_combine_list(*static, w1, w3, w2)
    for seed in range(3):
        torch.manual_seed(100 + seed)
        new = [torch.randn_like(x), torch.rand_like(w), torch.randint(0, 2 if seed == 2 else 8, ids.shape, device="cuda")]
        for dst, src in zip(static, new):
            dst.copy_(src)
        out.fill_(float("nan"))
        g.replay()
        ref = moe.experts_list_reference(*[v.cpu().float() if v.is_floating_point() else v.cpu() for v in new], [v.cpu().float() for v in w1], [v.cpu().float() for v in w3], [v.cpu().float() for v in w2])
        err = ((out.cpu().float() - ref).abs().max() / ref.abs().max()).item()
        assert err < 1e-2, (seed, err)
