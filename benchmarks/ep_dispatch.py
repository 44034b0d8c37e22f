"""Expert-parallel MoE layer over N ranks: all-to-all dispatch/combine vs gathering every token.

Methods, timed in the same run on the same inputs (every rank has its own ``T`` tokens and
``E / N`` experts; routing uniform at random, top-``K``):

- ``ep exact``: ``distributed/ep.py``'s eager path (header exchange with the counts, then
  ``all_to_all_single`` of only the (token, rank) rows that are needed, local experts,
  reverse ``all_to_all_single``, weighted combine);
- ``ep static``: its capturable path (every rank sends every rank ``T`` rows, equal
  splits, no host read);
- ``gather``: one ``all_gather`` of every rank's tokens, ids and weights (packed as bytes,
  as ``ep.py`` packs its dispatch) to every rank, the
  local experts over all ``N*T`` tokens (pairs owned elsewhere do no work), then
  ``reduce_scatter_tensor`` of the ``[N*T, H]`` partial outputs (``all_reduce`` and a
  slice where the backend has no reduce-scatter, as gloo on some torch versions).

Each cell is the median (and min) over calls of the slowest rank's time for one layer call
(``all_reduce(MAX)`` of per-rank times), the methods interleaved call by call; outputs of
all methods are checked equal first.

Usage:
  CPU (gloo):   ``python benchmarks/ep_dispatch.py --world 2,4``
  CUDA (NCCL):  ``python benchmarks/ep_dispatch.py --device cuda`` (one rank per GPU, all GPUs)
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# torch 2.13 renamed the tensor forms (the old names warn); 2.11 has only the old ones
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _gather_baseline(x, w, ids, w13, w2, pg, world, rank):
    t, h = x.shape
    el, k = w13.shape[0], ids.shape[1]
    # one all-gather of tokens, weights and ids packed as bytes (as ep.py packs its dispatch)
    meta = torch.cat([w.float(), ids.float()], dim=1)
    send = torch.cat([x.contiguous().view(torch.uint8), meta.view(torch.uint8)], dim=1)
    recv = send.new_empty(world * t, send.shape[1])
    _all_gather(recv, send, group=pg)
    nx = h * x.element_size()
    xs = recv[:, :nx].contiguous().view(x.dtype)
    meta_all = recv[:, nx:].contiguous().view(torch.float32)
    ws, ids_all = meta_all[:, :k].to(w.dtype), meta_all[:, k:].long()
    local = ids_all - rank * el  # out of [0, el): owned elsewhere, no work here
    y = torch.ops.ascend_graph.moe_dispatch_ffn_combine(xs, ws, local, w13, w2, "silu")
    out = torch.empty(t, h, dtype=y.dtype, device=x.device)
    try:
        _reduce_scatter(out, y, group=pg)
    except (RuntimeError, NotImplementedError, ValueError):
        dist.all_reduce(y, group=pg)
        out = y[rank * t : (rank + 1) * t]
    return out


def _worker(rank, world, port, args, device_type, results):
    import ascend_graph.ops  # noqa: F401
    from ascend_graph.distributed import groups
    from ascend_graph.distributed.ep import ep_dispatch_ffn_combine

    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(args.threads)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    dev = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    dtype = torch.bfloat16 if device_type == "cuda" else torch.float32
    pg = groups.acquire()
    el = args.experts // world
    g = torch.Generator().manual_seed(0)
    w13_all = (torch.randn(args.experts, 2 * args.inter, args.hidden, generator=g) * 0.05).to(dtype)
    w2_all = (torch.randn(args.experts, args.hidden, args.inter, generator=g) * 0.05).to(dtype)
    w13, w2 = w13_all[rank * el : (rank + 1) * el].to(dev), w2_all[rank * el : (rank + 1) * el].to(dev)
    rows = []
    for t in args.tokens:
        gt = torch.Generator().manual_seed(1000 + rank)
        x = torch.randn(t, args.hidden, generator=gt).to(dtype).to(dev)
        ids = torch.stack([torch.randperm(args.experts, generator=gt)[: args.topk] for _ in range(t)]).to(dev)
        w = torch.rand(t, args.topk, generator=gt).to(dtype).to(dev)
        methods = {
            "ep exact": lambda: ep_dispatch_ffn_combine(x, w, ids, w13, w2, "silu", ep_group=pg.group_name, ep_world_size=world, ep_rank=rank, static_shapes=False),
            "ep static": lambda: ep_dispatch_ffn_combine(x, w, ids, w13, w2, "silu", ep_group=pg.group_name, ep_world_size=world, ep_rank=rank, static_shapes=True),
            "gather": lambda: _gather_baseline(x, w, ids, w13, w2, pg, world, rank),
        }
        outs = {name: fn().float() for name, fn in methods.items()}
        diff = max((o - outs["ep exact"]).abs().max().item() for o in outs.values())
        for fn in methods.values():
            for _ in range(args.warmup):
                fn()
        # methods interleaved call by call: load from other processes on a shared
        # machine then falls on every method alike
        times = {name: [] for name in methods}
        for _ in range(args.iters):
            for name, fn in methods.items():
                dist.barrier(group=pg)
                if device_type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                fn()
                if device_type == "cuda":
                    torch.cuda.synchronize()
                dt = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=dev)
                dist.all_reduce(dt, op=dist.ReduceOp.MAX, group=pg)
                times[name].append(dt.item())
        for name, ts in times.items():
            rows.append((world, t, name, statistics.median(ts) * 1e3, min(ts) * 1e3, diff))
    if rank == 0:
        results.extend(rows)
    groups.release(pg)
    dist.destroy_process_group()


def _run_world(world, args, device_type):
    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    results = manager.list()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, args, device_type, results)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(args.timeout)
    for r, p in enumerate(procs):
        if p.is_alive():
            p.kill()
            raise SystemExit(f"rank {r} of {world} did not finish in {args.timeout} s")
        if p.exitcode:
            raise SystemExit(f"rank {r} of {world} exited with {p.exitcode}")
    return list(results)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--world", default="2,4", help="CPU: rank counts to run; CUDA: ignored (all GPUs)")
    ap.add_argument("--tokens", default="16,128", help="tokens per rank")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--inter", type=int, default=128)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per rank")
    ap.add_argument("--timeout", type=float, default=300)
    args = ap.parse_args()
    args.tokens = [int(t) for t in args.tokens.split(",")]
    if args.device == "cuda":
        worlds = [torch.cuda.device_count()]
        if worlds[0] < 2:
            raise SystemExit(f"expert parallelism over NCCL needs >= 2 GPUs; this machine has {worlds[0]}")
        args.hidden, args.inter, args.experts, args.topk = max(args.hidden, 2048), max(args.inter, 768), max(args.experts, 128), max(args.topk, 8)
    else:
        worlds = [int(w) for w in args.world.split(",")]
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    print(f"device {args.device}; hidden {args.hidden}, expert dim {args.inter}, {args.experts} experts, top-{args.topk}; median of {args.iters} calls, slowest rank")
    print("| ranks | tokens/rank | method | median ms | min ms | max diff vs ep exact |")
    print("|---|---|---|---|---|---|")
    for world in worlds:
        if args.experts % world:
            raise SystemExit(f"{args.experts} experts do not split over {world} ranks")
        for world_, t, name, ms, best, diff in _run_world(world, args, args.device):
            print(f"| {world_} | {t} | {name} | {ms:.3f} | {best:.3f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
