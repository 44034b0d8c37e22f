"""The norm_rope kernels one by one on CUDA: time and achieved bandwidth, against what
they replace (the same subgraph as the models write it, eager and inductor-compiled).

Shapes are a Qwen3-1.7B layer's (hidden 2048, 16 query / 8 KV heads, head dim 128, MLP
6144), bf16, at several token counts (decode batches and a prefill chunk). Each variant
runs 50 times inside one captured CUDA graph, so launch overhead is out and the time
per call is what the GPU spends (what a decode step replaying graphs pays). Achieved
bandwidth = (bytes read + bytes written, each tensor once) / time, against the HBM copy
bandwidth measured here.

    python benchmarks/norm_rope.py [--tokens 1,8,64,512]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

import ascend_graph.ops.norm_rope  # noqa: F401  (registers the ops)

ops = torch.ops.ascend_graph
HIDDEN, NQ, NKV, HEAD, MLP = 2048, 16, 8, 128, 6144
BF = torch.bfloat16


# the subgraphs as the models write them (benchmarks/decode.py's forms)
def rms(x, w, eps=1e-6):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def add_rms(x, r, w):
    s = x + r
    return rms(s, w), s


def rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def qk_norm_rope(q, k, qw, kw, cos, sin):
    return rope(rms(q, qw), cos, sin), rope(rms(k, kw), cos, sin)


def silu_and_mul(x):
    g, u = x.chunk(2, dim=-1)
    return F.silu(g) * u


def graph_time_us(fn, args, calls: int = 50, reps: int = 10) -> float:
    """Median device time of one call, from replays of a graph holding ``calls`` calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn(*args)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn(*args)
    g.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        samples.append(a.elapsed_time(b) * 1e3 / calls)
    return statistics.median(samples)


def copy_bandwidth() -> float:
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(5):
        b.copy_(a)
    e1.record()
    torch.cuda.synchronize()
    return 2 * n * 5 / (e0.elapsed_time(e1) / 1e3)


def cases(t: int):
    """(name, fused fn, reference fn, args, bytes moved once each)."""
    dev = "cuda"
    x, r, w = torch.randn(t, HIDDEN, device=dev, dtype=BF), torch.randn(t, HIDDEN, device=dev, dtype=BF), torch.randn(HIDDEN, device=dev, dtype=BF)
    qkv = torch.randn(t, (NQ + 2 * NKV) * HEAD, device=dev, dtype=BF)
    q, k, _ = qkv.split([NQ * HEAD, NKV * HEAD, NKV * HEAD], -1)
    q, k = q.view(t, NQ, HEAD), k.view(t, NKV, HEAD)
    qw, kw = torch.randn(HEAD, device=dev, dtype=BF), torch.randn(HEAD, device=dev, dtype=BF)
    ang = torch.randn(t, 1, HEAD // 2, device=dev)
    cos, sin = ang.cos().to(BF), ang.sin().to(BF)
    gu = torch.randn(t, 2 * MLP, device=dev, dtype=BF)
    e = 2  # bf16 bytes
    kc = torch.zeros(t + 16, 16, NKV, HEAD, device=dev, dtype=BF)
    vc = torch.zeros_like(kc)
    slots = torch.arange(t, device=dev) * 16 + 3

    def cache_ref(qkv, qw, kw, cos, sin, kc, vc, slots):
        q, k, v = qkv.split([NQ * HEAD, NKV * HEAD, NKV * HEAD], -1)
        q, k = qk_norm_rope(q.view(t, NQ, HEAD), k.view(t, NKV, HEAD), qw, kw, cos, sin)
        ops.reshape_and_cache(k, v.view(t, NKV, HEAD), kc, vc, slots)
        return q

    def cache_fused(qkv, qw, kw, cos, sin, kc, vc, slots):
        return ops.qk_norm_rope_cache(qkv, qw, kw, cos.squeeze(1), sin.squeeze(1), kc, vc, slots, NQ, NKV, 1e-6, False, False, HEAD)

    def qk_fused(q, k, qw, kw, cos, sin):
        return ops.qk_norm_rope(q, k, qw, kw, cos.squeeze(1), sin.squeeze(1), 1e-6, False, False, HEAD)

    def one_fused(q, qw, cos, sin):
        return ops.norm_rope(q, qw, cos.squeeze(1), sin.squeeze(1), 1e-6, False, False, HEAD)

    tables = 2 * t * (HEAD // 2) * e  # cos and sin, one column per frequency
    qk_bytes = 2 * (NQ + NKV) * HEAD * t * e + tables  # q, k read and written
    return [
        ("rms_norm", lambda x, w: ops.rms_norm(x, w, 1e-6), rms, (x, w), 2 * t * HIDDEN * e),
        ("add_rms_norm", lambda x, r, w: ops.add_rms_norm(x, r, w, 1e-6), add_rms, (x, r, w), 4 * t * HIDDEN * e),
        ("norm_rope (q)", one_fused, lambda q, qw, c, s: rope(rms(q, qw), c, s), (q, qw, cos, sin), 2 * NQ * HEAD * t * e + tables),
        ("qk_norm_rope", qk_fused, qk_norm_rope, (q, k, qw, kw, cos, sin), qk_bytes),
        ("qk_norm_rope_cache", cache_fused, cache_ref, (qkv, qw, kw, cos, sin, kc, vc, slots), qk_bytes + 2 * NKV * HEAD * t * e),  # + v read and written
        ("silu_and_mul", ops.silu_and_mul, silu_and_mul, (gu,), 3 * t * MLP * e),
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1,8,64,512")
    args = ap.parse_args()
    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | HBM copy {bw / 1e9:.0f} GB/s | bf16, Qwen3-1.7B layer shapes")
    print("\n| op | tokens | fused us | inductor us | eager us | fused vs inductor | fused GB/s | of copy BW | max err vs eager |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t in (int(v) for v in args.tokens.split(",")):
        for name, fused, ref, fargs, nbytes in cases(t):
            torch._dynamo.reset()
            compiled = torch.compile(ref, fullgraph=True, dynamic=False)
            out_f, out_r = fused(*fargs), ref(*fargs)
            out_f = out_f if isinstance(out_f, (tuple, list)) else [out_f]
            out_r = out_r if isinstance(out_r, (tuple, list)) else [out_r]
            err = max((a.float() - b.float()).abs().max().item() for a, b in zip(out_f, out_r))
            tf, ti, te = graph_time_us(fused, fargs), graph_time_us(compiled, fargs), graph_time_us(ref, fargs)
            gbs = nbytes / (tf * 1e-6) / 1e9
            print(f"| {name} | {t} | {tf:.2f} | {ti:.2f} | {te:.2f} | {ti / tf:.2f}x | {gbs:.0f} | {gbs * 1e9 / bw:.0%} | {err:.3g} |")


if __name__ == "__main__":
    main()
