"""Gated delta rule on CUDA: prefill (chunked) and decode (recurrent) against the baselines.

Run on a GPU: ``python benchmarks/gated_delta.py [--quick] [--profile] [--json FILE]``.
Prints markdown tables.

- prefill, one sequence of T tokens (Qwen3-Next-80B's linear attention at TP=2: 16 v-heads,
  8 k-heads, K = V = 128; bf16 inputs, fp32 state), against transformers' ``torch_chunk_gated_delta_rule`` in eager (the torch
  fallback), optionally the same function under ``torch.compile`` (``--inductor-max``:
  the chunk loop unrolls per chunk and compile time grows with it), fla-core's
  ``chunk_gated_delta_rule`` when installed, and our op (``ascend_graph::chunk_gated_delta_rule``
  reading and writing slot 1 of a 2-slot state cache, with host-built varlen metadata
  ("ours") and without ("ours 1-seq"); it runs fla-core when installed, else the chunked
  torch path). Each is timed eagerly and replayed from a CUDA graph, in the same run.
- ``--profile``: each piece of the op alone at 4k tokens (eager), before and after the
  launch cuts, to show where the time beyond fla-core's kernels goes.
- decode at batch 64 (1 token per request, H = 32 v-heads, K = V = 128, fp32 state
  cache): our Triton kernel's state bytes (read + write) per second against the HBM
  bandwidth of a 1 GiB device-to-device copy measured in the same run, and the eager
  torch fallback's time.

Timings: ``triton.testing.do_bench`` (CUDA events, warm-up, median of many runs) and
``triton.testing.do_bench_cudagraph`` (the same, over replays of a captured graph).
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


def _graph_ms(fn, rep=100):
    """Time of one call replayed from a CUDA graph (how serving runs it): launch overhead gone."""
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(fn, rep=rep, return_mode="median")


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


def _prefill_inputs(T, hk=8, h=16, d=128):
    torch.manual_seed(0)
    q = torch.randn(T, hk, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(T, hk, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(T, h, d, device="cuda", dtype=torch.bfloat16)
    g = F.logsigmoid(torch.randn(T, h, device="cuda"))
    beta = torch.rand(T, h, device="cuda", dtype=torch.bfloat16)
    cache = torch.randn(2, h, d, d, device="cuda") * 0.1
    return q, k, v, g, beta, cache


def prefill(sizes, hk=8, h=16, d=128, inductor_max=0, graphs=True):
    """Per T: eager (do_bench) and CUDA-graph replay (do_bench_cudagraph) times, same run."""
    from ascend_graph.ops import gated_delta as gd

    hf_chunk, _ = _hf()
    fla_chunk, _ = _fla()
    rows = []
    for T in sizes:
        q, k, v, g, beta, cache = _prefill_inputs(T, hk, h, d)
        meta = gd.ChunkMetadataBuilder(1, T, "cuda").build([T])
        idx = torch.ones(1, dtype=torch.int32, device="cuda")  # slot 1 of 2: a real gather/scatter
        fns = {
            # host-built varlen metadata (what a serving batch passes) and one sequence without metadata
            "ours": lambda: gd.chunk_gated_delta_rule(q, k, v, g, beta, cache, None, idx, None, metadata=meta, use_qk_l2norm=True),
            "ours 1-seq": lambda: gd.chunk_gated_delta_rule(q, k, v, g, beta, cache, None, idx, None, use_qk_l2norm=True),
        }
        if fla_chunk is not None:
            h0 = cache[1:]
            fns["fla-core"] = lambda: fla_chunk(q[None], k[None], v[None], g[None], beta[None], initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True)
        # HF layout: [B, T, H, D] with k-heads repeated to v-heads
        qh = q.repeat_interleave(h // hk, 1)[None]
        kh = k.repeat_interleave(h // hk, 1)[None]
        fns["torch fallback"] = lambda: hf_chunk(qh, kh, v[None], g[None], beta[None], initial_state=None, output_final_state=True, use_qk_l2norm_in_kernel=True)
        row = {"T": T}
        for name, fn in fns.items():
            slow = name == "torch fallback"
            row[name] = _median_ms(fn, warmup=1 if slow else 5, rep=5 if slow else 50)
            if graphs:
                try:
                    row[name + " graph"] = _graph_ms(fn, rep=20 if slow else 100)
                except Exception as e:  # a function that cannot be captured is reported, not hidden
                    row[name + " graph"] = f"capture failed: {type(e).__name__}"
        if T <= inductor_max:
            compiled = torch.compile(hf_chunk)
            start = time.perf_counter()
            fn = lambda: compiled(qh, kh, v[None], g[None], beta[None], initial_state=None, output_final_state=True, use_qk_l2norm_in_kernel=True)
            fn()
            row["inductor compile s"] = time.perf_counter() - start
            row["inductor"] = _median_ms(fn, warmup=2, rep=10)
        rows.append(row)
        print(row, flush=True)
    return rows


def profile_overhead(T=4096, hk=8, h=16, d=128):
    """Where the op's time goes beyond fla-core's kernels (eager, host-bound): each piece alone."""
    from ascend_graph.ops import gated_delta as gd
    from ascend_graph.ops.kernels.triton import gated_delta as tk

    fla_chunk, _ = _fla()
    q, k, v, g, beta, cache = _prefill_inputs(T, hk, h, d)
    meta = gd.ChunkMetadataBuilder(1, T, "cuda").build([T])
    idx = torch.ones(1, dtype=torch.int32, device="cuda")
    h0 = cache[1:].clone()
    finals = h0.clone()
    cu32, ci32 = meta.cu_seqlens.int(), meta.chunk_indices.int()
    pieces = {
        "fla dense (no metadata)": lambda: fla_chunk(q[None], k[None], v[None], g[None], beta[None], initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True),
        "fla varlen, persistent int64 metadata": lambda: fla_chunk(q[None], k[None], v[None], g[None], beta[None], initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True, cu_seqlens=meta.cu_seqlens, chunk_indices=meta.chunk_indices),
        "fla varlen, per-call .long() casts (before)": lambda: fla_chunk(q[None], k[None], v[None], g[None].float(), beta[None], initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True, cu_seqlens=cu32.long(), chunk_indices=ci32.long()),
        "state gather, torch ops (before)": lambda: gd._gather_initial(cache, idx, None, 1),
        "state gather, one Triton launch": lambda: tk.gather_states_triton(cache, idx, None, 1),
        "state write-back, torch ops (before)": lambda: gd._write_back(cache, *gd._gather_initial(cache, idx, None, 1)[1:], finals),
        "state write-back, one Triton launch": lambda: tk.scatter_states_triton(finals, idx, cache),
        "ours, varlen metadata": lambda: gd.chunk_gated_delta_rule(q, k, v, g, beta, cache, None, idx, None, metadata=meta, use_qk_l2norm=True),
        "ours, one sequence": lambda: gd.chunk_gated_delta_rule(q, k, v, g, beta, cache, None, idx, None, use_qk_l2norm=True),
    }
    out = {}
    for name, fn in pieces.items():
        out[name] = _median_ms(fn, warmup=5, rep=50)
        print(f"| {name} | {out[name]:.3f} |", flush=True)
    return out


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


def _cell(x):
    return f"{x:.3f}" if isinstance(x, float) else ("n/a" if x is None else str(x))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="1k and 4k prefill only")
    p.add_argument("--profile", action="store_true", help="also time each piece of the op at 4k (eager)")
    p.add_argument("--inductor-max", type=int, default=0, help="also time HF's fallback under torch.compile up to this T (compile time grows with T)")
    p.add_argument("--json", help="write every number here")
    args = p.parse_args()
    sizes = [1024, 4096] if args.quick else [1024, 4096, 8192, 16384, 32768]
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    bw = hbm_bandwidth()
    print(f"HBM bandwidth (1 GiB D2D copy): {bw / 1e9:.0f} GB/s\n")
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "hbm_bytes_per_s": bw}
    if args.profile:
        print("| piece (T=4096, eager) | ms |\n|---|---|")
        results["profile"] = profile_overhead()
    rows = prefill(sizes, inductor_max=args.inductor_max)
    results["prefill"] = rows
    names = ["ours", "ours 1-seq", "fla-core", "torch fallback"]
    print("\n| T | " + " | ".join(f"{n} (ms)" for n in names) + " | " + " | ".join(f"{n}, CUDA graph (ms)" for n in names) + " | ours / fla-core (eager, graph) |")
    print("|" + "---|" * (2 * len(names) + 2))
    for r in rows:
        ratio = "n/a"
        if isinstance(r.get("fla-core"), float):
            gr = r["ours graph"] / r["fla-core graph"] if isinstance(r.get("ours graph"), float) and isinstance(r.get("fla-core graph"), float) else float("nan")
            ratio = f"{r['ours'] / r['fla-core']:.2f}x, {gr:.2f}x"
        print(f"| {r['T']} | " + " | ".join(_cell(r.get(n)) for n in names) + " | " + " | ".join(_cell(r.get(n + " graph")) for n in names) + f" | {ratio} |")
    for r in rows:
        if "inductor" in r:
            print(f"inductor at T={r['T']}: {r['inductor']:.3f} ms (compile {r['inductor compile s']:.1f} s)")
    d = decode()
    results["decode"] = d
    print("\n| decode batch | ours (ms) | bytes moved | ours GB/s | % of HBM | torch fallback (ms) | fla-core (ms) |")
    print("|---|---|---|---|---|---|---|")
    fla = f"{d['fla-core ms']:.4f}" if "fla-core ms" in d else "n/a"
    print(f"| {d['batch']} | {d['ours ms']:.4f} | {d['bytes'] / 1e6:.1f} MB | {d['ours B/s'] / 1e9:.0f} | {100 * d['ours B/s'] / bw:.0f}% | {d['torch fallback ms']:.4f} | {fla} |")
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
