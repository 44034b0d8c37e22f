"""Gated delta rule on CUDA: prefill (chunked) and decode (recurrent) against the baselines.

Run on a GPU: ``python benchmarks/gated_delta.py [--quick]``. Prints markdown tables.

- prefill, one sequence of T tokens (Qwen3-Next-80B's linear attention at TP=2: 16 v-heads,
  8 k-heads, K = V = 128; bf16 inputs, fp32 state), against transformers' ``torch_chunk_gated_delta_rule`` in eager (the torch
  fallback), the same function under ``torch.compile`` (inductor; only at small T since
  the chunk loop unrolls per chunk and compile time grows with it), fla-core's
  ``chunk_gated_delta_rule`` when installed, and our op (``ascend_graph::chunk_gated_delta_rule``
  with host-built metadata; it runs fla-core when installed, else the chunked torch path).
- decode at batch 64 (1 token per request, H = 32 v-heads, K = V = 128, fp32 state
  cache): our Triton kernel's state bytes (read + write) per second against the HBM
  bandwidth of a 1 GiB device-to-device copy measured in the same run, and the eager
  torch fallback's time.

Timings: ``triton.testing.do_bench`` (CUDA events, warm-up, median of many runs).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F


def _median_ms(fn, warmup=25, rep=100):
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def _hf():
    from transformers.models.qwen3_next import modeling_qwen3_next as m

    # the undecorated torch fallbacks
    chunk = getattr(m.torch_chunk_gated_delta_rule, "__wrapped__", m.torch_chunk_gated_delta_rule)
    rec = getattr(m.torch_recurrent_gated_delta_rule, "__wrapped__", m.torch_recurrent_gated_delta_rule)
    return chunk, rec


def _fla():
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
    except ImportError:
        return None, None
    return chunk_gated_delta_rule, fused_recurrent_gated_delta_rule


def hbm_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write)."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), warmup=5, rep=50)
    return 2 * n / (ms * 1e-3)


def prefill(sizes, hk=8, h=16, d=128, inductor_max=1024):
    from ascend_graph.ops import gated_delta as gd

    hf_chunk, _ = _hf()
    fla_chunk, _ = _fla()
    rows = []
    for T in sizes:
        torch.manual_seed(0)
        q = torch.randn(T, hk, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(T, hk, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(T, h, d, device="cuda", dtype=torch.bfloat16)
        g = F.logsigmoid(torch.randn(T, h, device="cuda"))
        beta = torch.rand(T, h, device="cuda", dtype=torch.bfloat16)
        cache = torch.zeros(1, h, d, d, device="cuda")
        builder = gd.ChunkMetadataBuilder(1, T, "cuda")
        meta = builder.build([T])
        idx = torch.zeros(1, dtype=torch.int32, device="cuda")
        ours = lambda: gd.chunk_gated_delta_rule(q, k, v, g, beta, cache, None, idx, None, metadata=meta, use_qk_l2norm=True)
        # HF layout: [B, T, H, D] with k-heads repeated to v-heads
        qh = q.repeat_interleave(h // hk, 1)[None]
        kh = k.repeat_interleave(h // hk, 1)[None]
        hf = lambda: hf_chunk(qh, kh, v[None], g[None], beta[None], initial_state=None, output_final_state=True, use_qk_l2norm_in_kernel=True)
        row = {"T": T, "ours": _median_ms(ours, warmup=3, rep=20)}
        row["torch fallback"] = _median_ms(hf, warmup=1, rep=5)
        if T <= inductor_max:
            compiled = torch.compile(hf_chunk)
            start = time.perf_counter()
            fn = lambda: compiled(qh, kh, v[None], g[None], beta[None], initial_state=None, output_final_state=True, use_qk_l2norm_in_kernel=True)
            fn()
            row["inductor compile s"] = time.perf_counter() - start
            row["inductor"] = _median_ms(fn, warmup=2, rep=10)
        if fla_chunk is not None:
            row["fla-core"] = _median_ms(lambda: fla_chunk(q[None], k[None], v[None], g[None], beta[None], initial_state=cache, output_final_state=True, use_qk_l2norm_in_kernel=True), warmup=3, rep=20)
        rows.append(row)
    return rows


def decode(batch=64, hk=16, h=32, d=128):
    from ascend_graph.ops import gated_delta as gd

    _, hf_rec = _hf()
    _, fla_rec = _fla()
    torch.manual_seed(0)
    q = torch.randn(batch, hk, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, hk, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(batch, h, d, device="cuda", dtype=torch.bfloat16)
    g = F.logsigmoid(torch.randn(batch, h, device="cuda"))
    beta = torch.rand(batch, h, device="cuda", dtype=torch.bfloat16)
    cache = torch.randn(2 * batch, h, d, d, device="cuda") * 0.1
    idx = torch.randperm(2 * batch, device="cuda")[:batch].to(torch.int32)  # scattered slots, as a paged cache
    ours = lambda: gd.recurrent_gated_delta_rule(q, k, v, g, beta, cache, None, idx, use_qk_l2norm=True)
    ms = _median_ms(ours)
    state_bytes = 2 * batch * h * d * d * cache.element_size()
    io_bytes = sum(x.numel() * x.element_size() for x in (q, k, v, g, beta, v)) + idx.numel() * 4
    out = {"batch": batch, "ours ms": ms, "bytes": state_bytes + io_bytes, "ours B/s": (state_bytes + io_bytes) / (ms * 1e-3)}
    qh = q.repeat_interleave(h // hk, 1)[:, None]
    kh = k.repeat_interleave(h // hk, 1)[:, None]
    s0 = cache[idx.long()]
    out["torch fallback ms"] = _median_ms(lambda: hf_rec(qh, kh, v[:, None], g[:, None], beta[:, None], initial_state=s0, output_final_state=True, use_qk_l2norm_in_kernel=True))
    if fla_rec is not None:
        s = s0.clone()
        out["fla-core ms"] = _median_ms(lambda: fla_rec(qh.transpose(0, 1), kh.transpose(0, 1), v[None], g[None], beta[None], initial_state=s, output_final_state=True, use_qk_l2norm_in_kernel=True, cu_seqlens=torch.arange(batch + 1, device="cuda")))
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="1k and 4k prefill only")
    args = p.parse_args()
    sizes = [1024, 4096] if args.quick else [1024, 4096, 16384, 32768]
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    bw = hbm_bandwidth()
    print(f"HBM bandwidth (1 GiB D2D copy): {bw / 1e9:.0f} GB/s\n")
    rows = prefill(sizes)
    cols = ["T", "ours", "torch fallback", "inductor", "inductor compile s", "fla-core"]
    print("| " + " | ".join(c + (" (ms)" if c not in ("T", "inductor compile s") else "") for c in cols) + " | speed-up vs torch |")
    print("|" + "---|" * (len(cols) + 1))
    for r in rows:
        cells = [f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, "n/a")) for c in cols]
        print("| " + " | ".join(cells) + f" | {r['torch fallback'] / r['ours']:.1f}x |")
    d = decode()
    print("\n| decode batch | ours (ms) | bytes moved | ours GB/s | % of HBM | torch fallback (ms) | fla-core (ms) |")
    print("|---|---|---|---|---|---|---|")
    fla = f"{d['fla-core ms']:.4f}" if "fla-core ms" in d else "n/a"
    print(f"| {d['batch']} | {d['ours ms']:.4f} | {d['bytes'] / 1e6:.1f} MB | {d['ours B/s'] / 1e9:.0f} | {100 * d['ours B/s'] / bw:.0f}% | {d['torch fallback ms']:.4f} | {fla} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
