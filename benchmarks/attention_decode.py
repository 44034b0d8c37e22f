"""Paged decode attention on CUDA: KV bytes/s of the Triton split-KV kernel vs HBM bandwidth.

Usage: ``python benchmarks/attention_decode.py [--page 16] [--quick]``

Shape (Qwen3-8B-like GQA): 16 query heads, 8 KV heads, head dim 128, bf16, one query
token per request, every request at the full context, blocks scattered at random over
the cache. Baselines in the same run, on the same data:

- ``sdpa``: ``F.scaled_dot_product_attention`` on a dense ``[B, Nkv, ctx, D]`` copy of
  the KV (``enable_gqa``), i.e. what a non-paged decode would cost;
- ``torch ref``: the plain-torch reference of the op (gather + matmul-softmax per
  request), at the small sizes only (it loops over requests on the host);
- HBM bandwidth: a 2 GiB device-to-device copy (read + write bytes / time).

KV bytes per call = B * ctx * Nkv * (D + Dv) * 2 bytes (K and V read once). Times are
``triton.testing.do_bench`` medians (warm-up included, L2 not flushed between calls:
the KV is far larger than L2 except at the smallest sizes, marked by their ratio).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ascend_graph.ops import attention as ops  # noqa: E402
from ascend_graph.ops.kernels.triton import attention as kernels  # noqa: E402

NQ, NKV, D = 16, 8, 128
DTYPE = torch.bfloat16


def hbm_bandwidth() -> float:
    from triton.testing import do_bench

    n = (2 << 30) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    del src, dst
    return 2 * n * 2 / (ms * 1e-3)


def make_case(batch: int, ctx: int, page: int, gen: torch.Generator):
    blocks_per_seq = ctx // page
    num_blocks = batch * blocks_per_seq + 1
    k_cache = torch.randn(num_blocks, page, NKV, D, dtype=DTYPE, device="cuda", generator=gen)
    v_cache = torch.randn(num_blocks, page, NKV, D, dtype=DTYPE, device="cuda", generator=gen)
    perm = torch.randperm(num_blocks - 1, device="cuda", generator=gen)[: batch * blocks_per_seq] + 1
    block_table = perm.view(batch, blocks_per_seq).to(torch.int32)
    q = torch.randn(batch, NQ, D, dtype=DTYPE, device="cuda", generator=gen)
    cu = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    return q, k_cache, v_cache, block_table, cu, lens


def dense_kv(k_cache, v_cache, block_table):
    b, nb = block_table.shape
    k = k_cache[block_table.long()].reshape(b, nb * k_cache.shape[1], NKV, D).transpose(1, 2).contiguous()
    v = v_cache[block_table.long()].reshape(b, nb * v_cache.shape[1], NKV, D).transpose(1, 2).contiguous()
    return k, v


def main() -> None:
    from triton.testing import do_bench

    parser = argparse.ArgumentParser()
    parser.add_argument("--page", type=int, default=16)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    bw = hbm_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"measured HBM bandwidth (2 GiB d2d copy): {bw / 1e9:.0f} GB/s")
    print(f"shape: Nq={NQ} Nkv={NKV} D={D} {DTYPE} page={args.page}, 1 query token per request\n")
    batches = (1, 16, 64, 128) if not args.quick else (1, 64)
    contexts = (512, 4096, 32768) if not args.quick else (4096,)
    scale = D**-0.5
    print("| batch | context | splits | triton paged (us) | KV GB/s | % of HBM | sdpa dense (us) | sdpa GB/s | torch ref (us) | max err vs sdpa |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for batch in batches:
        for ctx in contexts:
            if batch * ctx > 128 * 32768 // 2:  # keep the dense copy within memory/time
                continue
            q, kc, vc, bt, cu, lens = make_case(batch, ctx, args.page, gen)
            kv_bytes = batch * ctx * NKV * 2 * D * 2
            splits, _ = kernels.plan_splits(batch, NKV, bt.shape[1] * args.page, 64, kernels._sm_count(0))
            fn = lambda: kernels.paged_attention_cuda(q, kc, vc, bt, cu, lens, None, scale, -1)  # noqa: E731
            out = fn()
            ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
            k, v = dense_kv(kc, vc, bt)
            qd = q.view(batch, NQ, 1, D)
            sd = lambda: F.scaled_dot_product_attention(qd, k, v, scale=scale, enable_gqa=True)  # noqa: E731
            ref_sdpa = sd()
            ms_sdpa = do_bench(sd, warmup=25, rep=100, return_mode="median")
            err = (out.float() - ref_sdpa.view(batch, NQ, D).float()).abs().max().item()
            ref_us = "-"
            if batch * ctx <= 16 * 4096:
                rf = lambda: ops.paged_attention_reference(q, kc, vc, bt, cu, lens, None, scale, -1)  # noqa: E731
                ref_us = f"{do_bench(rf, warmup=2, rep=20, return_mode='median') * 1e3:.0f}"
            gbs = kv_bytes / (ms * 1e-3) / 1e9
            gbs_sdpa = kv_bytes / (ms_sdpa * 1e-3) / 1e9
            print(f"| {batch} | {ctx} | {splits} | {ms * 1e3:.1f} | {gbs:.0f} | {100 * gbs * 1e9 / bw:.0f}% | {ms_sdpa * 1e3:.1f} | {gbs_sdpa:.0f} | {ref_us} | {err:.1e} |")
            del q, kc, vc, bt, k, v
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
