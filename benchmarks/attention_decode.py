"""Paged decode attention on CUDA: the Triton kernel vs dense SDPA over the same KV, and HBM share.

Usage (one GPU run, a few minutes)::

    python benchmarks/attention_decode.py            # headline cases + the grid
    python benchmarks/attention_decode.py --sweep    # + split-count sweep at batch <= 16

Shape (Qwen3-8B-like GQA): 16 query heads, 8 KV heads, head dim 128, bf16, one query
token per request, every request at the full context, blocks scattered at random over
the cache (``--page``, default 16 as vLLM's GPU default). Headline cases (issue #20 item 2):
batch 1 at 4k context and batch 16 at 512, target: paged within 1.5x of dense SDPA.

Columns, all on the same data in the same run:

- ``paged graph``: the kernel's GPU time, ``calls`` launches captured in one CUDA graph and
  replayed (how a decode step runs it: no host launch cost). ``paged eager``: the same with
  Python launches (``triton.testing.do_bench``), which adds the launch cost where the GPU
  work is shorter than it.
- ``sdpa graph`` / ``sdpa eager``: ``F.scaled_dot_product_attention`` (``enable_gqa``,
  flash) on a dense ``[B, Nkv, ctx, D]`` copy of the KV: the unpaged upper reference.
- ``% HBM``: KV bytes (B x ctx x Nkv x (D + Dv) x 2) / paged graph time / the measured HBM
  bandwidth (2 GiB device-to-device copy, read + write).
- ``splits`` / ``launches``: the kernel's split plan (1 split = 1 launch, no merge).

L2: a case whose KV is smaller than 2x L2 is replicated (distinct caches, cycled through
inside the graph) so every call reads from HBM, not from L2 left warm by the previous one.

``--sweep``: for batch 1, 2, 4, 8, 16 x context 512 .. 16k, the graph time at forced split
counts 1 .. 64, the best one, and what ``plan_splits`` picks (its time vs the best): the
data to set ``PROGRAMS_PER_SM`` / ``MIN_SPLIT_TILES`` in ``ops/kernels/triton/attention.py``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ascend_graph.ops.kernels.triton import attention as kernels  # noqa: E402

NQ, NKV, D = 16, 8, 128
DTYPE = torch.bfloat16
SCALE = D**-0.5


def hbm_bandwidth() -> float:
    from triton.testing import do_bench

    n = (2 << 30) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    del src, dst
    return 2 * n * 2 / (ms * 1e-3)


def l2_bytes() -> int:
    return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20))


class Case:
    """``copies`` independent KV sets of one shape (paged caches and their dense copies)."""

    def __init__(self, batch: int, ctx: int, page: int, gen: torch.Generator):
        self.batch, self.ctx, self.page = batch, ctx, page
        self.kv_bytes = batch * ctx * NKV * 2 * D * 2
        self.copies = max(1, min(8, math.ceil(2 * l2_bytes() / self.kv_bytes)))
        blocks_per_seq = ctx // page
        num_blocks = batch * blocks_per_seq + 1
        self.sets = []
        for _ in range(self.copies):
            kc = torch.randn(num_blocks, page, NKV, D, dtype=DTYPE, device="cuda", generator=gen)
            vc = torch.randn(num_blocks, page, NKV, D, dtype=DTYPE, device="cuda", generator=gen)
            perm = torch.randperm(num_blocks - 1, device="cuda", generator=gen)[: batch * blocks_per_seq] + 1
            bt = perm.view(batch, blocks_per_seq).to(torch.int32)
            q = torch.randn(batch, NQ, D, dtype=DTYPE, device="cuda", generator=gen)
            k = kc[bt.long()].reshape(batch, ctx, NKV, D).transpose(1, 2).contiguous()
            v = vc[bt.long()].reshape(batch, ctx, NKV, D).transpose(1, 2).contiguous()
            self.sets.append((q, kc, vc, bt, k, v))
        self.cu = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
        self.lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")

    def paged(self, i: int, splits=None):
        q, kc, vc, bt, _, _ = self.sets[i % self.copies]
        return kernels.paged_attention_cuda(q, kc, vc, bt, self.cu, self.lens, None, SCALE, -1, num_splits=splits)

    def sdpa(self, i: int):
        q, _, _, _, k, v = self.sets[i % self.copies]
        return F.scaled_dot_product_attention(q.view(self.batch, NQ, 1, D), k, v, scale=SCALE, enable_gqa=True)


def graph_us(fn, calls: int = 24, reps: int = 30) -> float:
    """Median GPU time of one call: ``calls`` calls (``fn(i)``, cycling KV copies) captured
    into one CUDA graph, replayed ``reps`` times."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(3):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    del graph
    return statistics.median(times) / calls * 1e3


def eager_us(fn) -> float:
    from triton.testing import do_bench

    state = {"i": 0}

    def step():
        state["i"] += 1
        fn(state["i"])

    return do_bench(step, warmup=25, rep=100, return_mode="median") * 1e3


def planned(case: Case) -> int:
    return kernels.plan_splits(case.batch, NKV, case.ctx, 64, kernels._sm_count(0))[0]


def run_table(cases, page: int, bw: float, gen) -> None:
    print("| batch | context | splits | launches | paged graph (us) | sdpa graph (us) | paged / sdpa | % HBM | paged eager (us) | sdpa eager (us) | KV copies | max err |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for batch, ctx in cases:
        case = Case(batch, ctx, page, gen)
        splits = planned(case)
        err = (case.paged(0).float() - case.sdpa(0).reshape(batch, NQ, D).float()).abs().max().item()
        pg, sg = graph_us(case.paged), graph_us(case.sdpa)
        pe, se = eager_us(case.paged), eager_us(case.sdpa)
        share = case.kv_bytes / (pg * 1e-6) / bw
        print(f"| {batch} | {ctx} | {splits} | {1 if splits == 1 else 2} | {pg:.1f} | {sg:.1f} | **{pg / sg:.2f}x** | {100 * share:.0f}% | {pe:.1f} | {se:.1f} | {case.copies} | {err:.1e} |")
        del case
        torch.cuda.empty_cache()


def run_sweep(page: int, gen) -> None:
    forced = (1, 2, 4, 8, 16, 32, 64)
    print("\nSplit sweep (paged graph time, us; * = best; plan = plan_splits' choice):\n")
    print("| batch | context | " + " | ".join(f"s={s}" for s in forced) + " | best | plan | plan / best |")
    print("|---:|---:|" + "---:|" * (len(forced) + 3))
    for batch in (1, 2, 4, 8, 16):
        for ctx in (512, 1024, 4096, 16384):
            case = Case(batch, ctx, page, gen)
            times = {}
            for s in forced:
                if s * 64 > ctx:  # a split shorter than one tile is never planned
                    continue
                times[s] = graph_us(lambda i, s=s: case.paged(i, s), calls=12, reps=15)
            best = min(times, key=times.get)
            plan = planned(case)
            plan_t = times.get(plan) or graph_us(case.paged, calls=12, reps=15)
            cells = [("-" if s not in times else f"{times[s]:.1f}" + ("*" if s == best else "")) for s in forced]
            print(f"| {batch} | {ctx} | " + " | ".join(cells) + f" | {best} | {plan} | {plan_t / times[best]:.2f} |")
            del case
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--page", type=int, default=16)
    parser.add_argument("--sweep", action="store_true", help="also sweep forced split counts at batch <= 16")
    parser.add_argument("--quick", action="store_true", help="headline cases only")
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    bw = hbm_bandwidth()
    props = torch.cuda.get_device_properties(0)
    print(f"device: {torch.cuda.get_device_name()} ({props.multi_processor_count} SMs, L2 {l2_bytes() >> 20} MiB)  torch {torch.__version__}")
    print(f"measured HBM bandwidth (2 GiB d2d copy): {bw / 1e9:.0f} GB/s")
    print(f"shape: Nq={NQ} Nkv={NKV} D={D} {DTYPE} page={args.page}, 1 query token per request")
    print(f"split plan: PROGRAMS_PER_SM={kernels.PROGRAMS_PER_SM} MIN_SPLIT_TILES={kernels.MIN_SPLIT_TILES}\n")
    print("Headline (issue #20 item 2; target paged / sdpa <= 1.5x in graph time):\n")
    run_table([(1, 4096), (16, 512)], args.page, bw, gen)
    if not args.quick:
        print("\nGrid:\n")
        grid = [(b, c) for b in (1, 4, 16, 64, 128) for c in (512, 4096, 32768) if b * c <= 64 * 32768]
        run_table(grid, args.page, bw, gen)
    if args.sweep:
        run_sweep(args.page, gen)


if __name__ == "__main__":
    main()
