"""Cross-layer vs per-layer KV caches on CUDA: the fused KV ops on strided views, and block offload.

Usage (one GPU run, about 2-3 minutes, ~30 GB of GPU memory, ~8 GB of pinned host memory)::

    python benchmarks/kv_layout.py [--quick]

Qwen3-8B-shaped cache (``runtime/kv_layout.py``): 36 layers, 8 KV heads, head dim 128, block
128 tokens, bf16 (one block of one layer: 256 KiB of K and 256 KiB of V); 32 query heads.

1. Decode attention (``paged_attention``, Triton) and the cache write (``reshape_and_cache``)
   on layer 17's view of a ``cross_layer`` cache (blocks 36 blocks apart) and of a
   ``cross_layer_packed`` one (vLLM 0.32's BLNHC: K|V in one content dim), vs a contiguous
   per-layer cache holding the same data. Each op's time is its GPU time in a CUDA graph
   (``calls`` launches captured, replayed), the caches cycled over enough copies that the
   KV is read from HBM. Target: the views within 5% of the contiguous cache.
2. Offload: ``N`` scattered blocks (every layer, K and V) copied device -> pinned host and
   back with ``KVCaches.copy_blocks``: ``per_layer`` issues N x 36 x 2 copies of 256 KiB,
   ``cross_layer`` N x 2 copies of 9 MiB, ``cross_layer_packed`` N copies of 18 MiB.
   Times are wall times of the issuing loop to a stream synchronize (the connector's cost:
   the copies and their launches), the best of 5 after a warm-up.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ascend_graph.ops import attention as ops  # noqa: E402
from ascend_graph.runtime import kv_layout  # noqa: E402
from attention_decode import graph_us  # noqa: E402  (one CUDA-graph timer for both scripts)

LAYERS, NKV, D, BLOCK, NQ = 36, 8, 128, 128, 32
DTYPE = torch.bfloat16
LAYER = 17
SCALE = D**-0.5


def attention_and_write(batch: int, ctx: int, gen: torch.Generator) -> None:
    blocks_per_seq = ctx // BLOCK
    num_blocks = batch * blocks_per_seq + 1
    kv_bytes = batch * ctx * NKV * 2 * D * 2
    l2 = int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20))
    copies = max(1, min(4, -(-2 * l2 // kv_bytes)))
    geom = dict(num_layers=LAYERS, num_blocks=num_blocks, block_size=BLOCK, kv_heads=NKV, head_size=D, dtype=DTYPE, device="cuda")
    sets = {name: [] for name in ("contiguous", "cross_layer", "cross_layer_packed")}
    for _ in range(copies):
        plain_k = torch.randn(num_blocks, BLOCK, NKV, D, dtype=DTYPE, device="cuda", generator=gen)
        plain_v = torch.randn(num_blocks, BLOCK, NKV, D, dtype=DTYPE, device="cuda", generator=gen)
        sets["contiguous"].append((plain_k, plain_v))
        for layout in ("cross_layer", "cross_layer_packed"):
            caches = kv_layout.allocate(layout, **geom)
            k, v = caches.layer(LAYER)
            k.copy_(plain_k)
            v.copy_(plain_v)
            sets[layout].append((k, v))
    perm = torch.randperm(num_blocks - 1, device="cuda", generator=gen)[: batch * blocks_per_seq] + 1
    bt = perm.view(batch, blocks_per_seq).to(torch.int32)
    q = torch.randn(batch, NQ, D, dtype=DTYPE, device="cuda", generator=gen)
    cu = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    # decode write: one token a request, at its last position
    slots = (bt[:, -1].long() * BLOCK + (BLOCK - 1)).contiguous()
    kn = torch.randn(batch, NKV, D, dtype=DTYPE, device="cuda", generator=gen)
    vn = torch.randn(batch, NKV, D, dtype=DTYPE, device="cuda", generator=gen)

    ref = ops.paged_attention(q, *sets["contiguous"][0], bt, cu, lens, None, SCALE, -1)
    row = {}
    for name, kv in sets.items():
        out = ops.paged_attention(q, *kv[0], bt, cu, lens, None, SCALE, -1)
        assert torch.equal(out, ref), f"{name}: output differs from the contiguous cache"
        attn = graph_us(lambda i, kv=kv: ops.paged_attention(q, *kv[i % copies], bt, cu, lens, None, SCALE, -1))
        write = graph_us(lambda i, kv=kv: ops.reshape_and_cache(kn, vn, *kv[i % copies], slots))
        row[name] = (attn, write)
    base_a, base_w = row["contiguous"]
    for name, (a, w) in row.items():
        print(f"| {batch} | {ctx} | {name} | {a:.1f} | {100 * (a / base_a - 1):+.1f}% | {w:.2f} | {100 * (w / base_w - 1):+.1f}% |")
    del sets
    torch.cuda.empty_cache()


def offload(n_blocks: int, device_blocks: int, gen: torch.Generator) -> None:
    geom = dict(num_layers=LAYERS, block_size=BLOCK, kv_heads=NKV, head_size=D, dtype=DTYPE)
    src_ids = torch.randperm(device_blocks, generator=torch.Generator().manual_seed(n_blocks))[:n_blocks].tolist()
    host_ids = list(range(n_blocks))
    for layout in kv_layout.LAYOUTS:
        dev = kv_layout.allocate(layout, num_blocks=device_blocks, device="cuda", **geom)
        for t in dev._block_tensors():
            t.normal_(generator=gen)
        host = kv_layout.allocate(layout, num_blocks=n_blocks, device="cpu", pin_memory=True, **geom)
        back = kv_layout.allocate(layout, num_blocks=device_blocks, device="cuda", **geom)
        stream = torch.cuda.current_stream()

        def timed(fn):
            best = float("inf")
            for _ in range(6):  # the first is a warm-up
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                copies = fn()
                stream.synchronize()
                best = min(best, time.perf_counter() - t0)
            return best, copies

        d2h, n_d2h = timed(lambda: dev.copy_blocks(host, src_ids, host_ids))
        h2d, n_h2d = timed(lambda: host.copy_blocks(back, host_ids, src_ids))
        for a, b in zip(dev.layer(LAYER), back.layer(LAYER)):
            assert torch.equal(a[src_ids], b[src_ids]), f"{layout}: round trip differs"
        nbytes = n_blocks * LAYERS * BLOCK * NKV * 2 * D * 2
        print(f"| {n_blocks} | {layout} | {n_d2h} | {d2h * 1e3:.2f} | {nbytes / d2h / 1e9:.1f} | {n_h2d} | {h2d * 1e3:.2f} | {nbytes / h2d / 1e9:.1f} |")
        del dev, host, back
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"cache: {LAYERS} layers, {NKV} KV heads, head dim {D}, block {BLOCK}, {DTYPE}; {NQ} query heads; views of layer {LAYER}\n")
    print("1. Decode attention and cache write, GPU time per call in a CUDA graph (delta vs contiguous; target within 5%)\n")
    print("| batch | context | cache | paged attention (us) | vs contiguous | cache write (us) | vs contiguous |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    cases = [(1, 4096), (16, 4096)] if args.quick else [(1, 4096), (16, 512), (16, 4096), (64, 2048)]
    for batch, ctx in cases:
        attention_and_write(batch, ctx, gen)
    print("\n2. Offload N scattered blocks (all layers, K and V) to pinned host memory and back\n")
    print("| N blocks | layout | d2h copies | d2h (ms) | d2h GB/s | h2d copies | h2d (ms) | h2d GB/s |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for n in (16,) if args.quick else (16, 128):
        offload(n, 256, gen)


if __name__ == "__main__":
    main()
