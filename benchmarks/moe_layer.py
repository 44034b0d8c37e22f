"""Qwen3-30B-A3B-shaped MoE layer on one GPU: fused ops vs HF eager vs torch.compile vs the floor.

Shape: 128 experts, top-8, hidden 2048, expert dim 768, bf16, tokens 1..512.

- ``hf_eager``: ``Qwen3MoeSparseMoeBlock`` as transformers runs it (default experts
  implementation, ``grouped_mm``);
- ``hf_compile``: the same block under ``torch.compile`` (inductor, dynamic shapes);
- ``fused``: ``ascend_graph::moe_gating_topk`` given the router weight (up to 32 tokens a
  Triton router GEMM, then the gating kernel; cuBLAS above) + ``ascend_graph::moe_dispatch_ffn_combine``, replayed from a CUDA graph as the ascend
  backend runs it (and eager, ``fused eager``); the op picks the Triton path up to
  ``TRITON_MAX_TOKENS`` tokens. The experts alone are timed on both paths (``Triton
  experts``, ``grouped_mm experts``) at every size, which is where that threshold comes from;
- ``floor``: bytes that must be read (the distinct experts actually selected, router
  weight, activations) / HBM bandwidth measured by a large device-to-device copy in
  the same run.

Timing: ``triton.testing.do_bench`` (CUDA events, median, warm-up) of CUDA-graph replays.
Every graph runs the layer on ``ROTATE`` different inputs in turn (different routings,
so repeated replays do not find the same experts in L2); times are per call and the
floor is the mean of the inputs' floors.

Usage: ``python benchmarks/moe_layer.py [--tokens 1,2,4,...]`` prints a markdown table;
``--sweep`` times the Triton block-size candidates per token count first (how
``moe_fused.CONFIGS`` was chosen) and prints the best of each; ``--variants 1,2,4`` times
the whole layer per router (cuBLAS, Triton; ``--router-splits`` for its split candidates)
and experts path; ``--ffn-sweep 1,2`` the one-launch experts path's block sizes;
``--profile 1`` lists the fused layer's kernels with their device times.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools

import torch
import triton
import triton.testing

import ascend_graph.ops  # noqa: F401  (registers the ops)
from ascend_graph.ops import moe as moe_ops
from ascend_graph.ops.kernels.triton import moe as moe_cuda
from ascend_graph.ops.kernels.triton import moe_fused, moe_gating

E, K, H, I = 128, 8, 2048, 768
ROTATE = 4


def hbm_bandwidth() -> float:
    n = 1 << 30  # 1 GiB
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
    return 2 * n / (ms * 1e-3)  # read + write


def make_block():
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K, norm_topk_prob=True)
    cfg._experts_implementation = "grouped_mm"
    block = Qwen3MoeSparseMoeBlock(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(std=0.02)
    return block.to("cuda", torch.bfloat16).eval()


def fused_forward(block):
    ops = torch.ops.ascend_graph
    router, experts = block.gate.weight, block.experts

    def fwd(x):
        x2 = x.view(-1, H)
        # what the fusion pass makes of HF's router: the op takes x and the router weight,
        # scores in fp32 and returns bf16 weights (HF: softmax in fp32, weights cast back)
        w, ids = ops.moe_gating_topk(x2, K, None, "softmax", 1, 1, True, 1.0, 0.0, router)
        return ops.moe_dispatch_ffn_combine(x2, w, ids, experts.gate_up_proj, experts.down_proj, "silu").view_as(x)

    return fwd


def graph_time_us(fn, inputs) -> float:
    """Median time of one call, from replays of a graph that calls ``fn`` on each input in turn."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for inp in inputs:
            fn(*inp)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for inp in inputs:
            fn(*inp)
    ms = triton.testing.do_bench(g.replay, warmup=25, rep=150, return_mode="median")
    return ms * 1e3 / len(inputs)


def routed_inputs(block, t):
    """ROTATE sets of (x, weights, ids) with the block's own routing, and their distinct-expert counts."""
    sets, hits = [], []
    for _ in range(ROTATE):
        x = torch.randn(t, H, device="cuda", dtype=torch.bfloat16)
        w, ids = torch.ops.ascend_graph.moe_gating_topk(x, K, None, "softmax", 1, 1, True, 1.0, 0.0, block.gate.weight)
        sets.append((x, w, ids))
        hits.append(int(torch.unique(ids).numel()))
    return sets, hits


def sweep_candidates(t):
    splits = (1, 2, 4) if t <= 2 else (1, 2) if t <= 8 else (1,)
    naive = (True, False) if t <= 2 else (False,)
    base = moe_fused.config_for(t)
    for nv, bn, bk, sp in itertools.product(naive, (16, 32, 64), (128, 256), splits):
        stages = 3 if bn * bk >= 64 * 256 else 4  # shared memory: 4 stages of 64x256 gate+up tiles do not fit
        yield dataclasses.replace(base, naive=nv, w13_n=bn, w13_k=bk, split_k=sp, w13_stages=stages)


def w2_candidates(best):
    for bn, bk in itertools.product((32, 64, 128), (64, 128, 256)):
        yield dataclasses.replace(best, w2_n=bn, w2_k=bk, w2_stages=3 if bn * bk >= 128 * 256 else 4)


def sweep(block, tokens, expert_bytes, bw, w2_only=False) -> dict[int, moe_fused.MoeConfig]:
    experts = block.experts
    w13, w2 = experts.gate_up_proj, experts.down_proj
    best_cfgs = {}
    print("## sweep (experts op alone, graph-replayed, us per call)\n", flush=True)
    for t in tokens:
        sets, hits = routed_inputs(block, t)
        floor = sum(hits) / len(hits) * expert_bytes / bw * 1e6
        ref = moe_cuda.sorted_experts(sets[0][0], sets[0][1], sets[0][2], w13, w2, "silu", None).float()
        results = []

        def measure(cfg):
            fn = lambda x, w, ids: moe_fused.fused_experts(x, w, ids, w13, w2, "silu", None, cfg)  # noqa: E731
            try:
                err = ((fn(*sets[0]).float() - ref).norm() / ref.norm()).item()
                us = graph_time_us(fn, sets)
            except Exception as exc:  # out of shared memory etc.: skip the candidate
                print(f"  skip {cfg}: {type(exc).__name__}", flush=True)
                return None
            results.append((us, err, cfg))
            return us

        for cfg in [moe_fused.config_for(t)] if w2_only else sweep_candidates(t):
            measure(cfg)
        best = min(results, key=lambda r: r[0])[2]
        for cfg in w2_candidates(best):
            measure(cfg)
        results.sort(key=lambda r: r[0])
        grouped = graph_time_us(lambda x, w, ids: moe_cuda.sorted_experts(x, w, ids, w13, w2, "silu", None), sets)
        print(f"T={t}: experts floor {floor:.1f} us, grouped_mm path {grouped:.1f} us, {len(results)} configs; best:", flush=True)
        for us, err, cfg in results[:4]:
            print(f"  {us:7.1f} us ({us / floor:.2f}x floor, rel err {err:.1e})  {cfg}", flush=True)
        worst_err = max(r[1] for r in results)
        print(f"  worst rel err over all configs: {worst_err:.1e}", flush=True)
        best_cfgs[t] = results[0][2]
    print(flush=True)
    return best_cfgs


def variants(block, tokens, expert_bytes, bw, splits=False) -> None:
    """The whole layer (graph-replayed) per (router, experts) variant: cuBLAS router + gating
    kernel, or the Triton router GEMM (partials, then the gating kernel sums them; with
    ``splits``, other splits and the one-launch last-program selection too); experts as
    configured, and where that is the one-launch path, the two-launch path and the
    one-launch path without PDL (its fp32 sums zeroed by a memset node)."""
    router, w13, w2 = block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj
    print("## variants (whole layer, graph-replayed, us per call)\n", flush=True)
    for t in tokens:
        sets, hits = routed_inputs(block, t)
        floor = (sum(hits) / len(hits) * expert_bytes + E * H * 2 + 2 * t * H * 2) / bw * 1e6
        xs = [(s[0],) for s in sets]
        base = moe_fused.config_for(t)
        # ids / weights of every router variant against the CPU reference
        w_ref, ids_ref = moe_ops.gating_reference(sets[0][0].cpu(), K, None, "softmax", 1, 1, True, 1.0, 0.0, router.cpu())
        ref = moe_ops.experts_reference(sets[0][0].cpu().float(), w_ref.float(), ids_ref, w13.cpu().float(), w2.cpu().float(), "silu")

        def layer(rcfg, ecfg):
            def fn(x):
                if rcfg is None:
                    w, ids = moe_gating.gating_topk(torch.nn.functional.linear(x, router), K, None, "softmax", 1, 1, True, 1.0, 0.0, pdl=ecfg.pdl)
                else:
                    w, ids = moe_gating.router_gating_topk(x, router, K, None, "softmax", 1, 1, True, 1.0, 0.0, rcfg)
                return moe_fused.fused_experts(x, w, ids, w13, w2, "silu", None, ecfg), ids
            return fn

        routers = [("cuBLAS + gating", None), ("Triton router (default)", moe_gating.RouterConfig())]
        if splits:
            for be, sk, warps in ((16, 8, 4), (16, 32, 4), (32, 16, 4), (32, 32, 4), (16, 16, 2), (16, 32, 2), (64, 32, 4)):
                routers.append((f"router be={be} sk={sk} w={warps}", moe_gating.RouterConfig(block_e=be, split_k=sk, num_warps=warps)))
            routers.append(("router one launch (last-program selection)", moe_gating.RouterConfig(two_launch=False)))
        experts = [("configured", base)]
        if base.ffn_chunk:
            experts.append(("two launches (gate/up, down)", dataclasses.replace(base, ffn_chunk=0, w13_n=32, w13_k=128, w2_n=64 if t == 1 else 128, w2_k=128)))
            experts.append(("one launch, y zeroed by a memset node (no PDL)", dataclasses.replace(base, pdl=False)))
        print(f"T={t}: floor {floor:.1f} us", flush=True)
        for (rname, rcfg), (ename, ecfg) in itertools.product(routers, experts):
            name = f"{rname} | {ename}"
            fn = layer(rcfg, ecfg)
            try:
                out, ids = fn(sets[0][0])
                same_ids = torch.equal(ids.cpu().sort(1)[0], ids_ref.sort(1)[0])
                err = ((out.float().cpu() - ref).norm() / ref.norm()).item()
                us = graph_time_us(lambda x: fn(x), xs)
                us2 = graph_time_us(lambda x: fn(x), xs)
            except Exception as exc:
                print(f"  {name}: skipped ({type(exc).__name__}: {str(exc)[:200]})", flush=True)
                continue
            print(f"  {us:6.1f} / {us2:6.1f} us ({min(us, us2) / floor:.2f}x floor) ids {'==' if same_ids else '!='} ref, rel err {err:.1e}  {name}", flush=True)
    print(flush=True)


def ffn_candidates(t):
    base = dataclasses.replace(moe_fused.config_for(t), naive=True)
    # 48 units: 16 chunks, 128 programs at one token (one per SM); 96: the same at two tokens
    for chunk, bk, warps in itertools.product((32, 48, 64, 96), (64, 128), (4, 8)):
        yield dataclasses.replace(base, ffn_chunk=chunk, ffn_k=bk, ffn_warps=warps, ffn_stages=3 if triton.next_power_of_2(chunk) * bk >= 64 * 256 else 4)


def ffn_sweep(block, tokens, expert_bytes, bw) -> None:
    """The one-launch experts path (gate/up + activation + down projection per chunk) against
    the configured one: the experts op alone and the whole layer, graph-replayed."""
    router, w13, w2 = block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj
    print("## one-launch experts sweep (graph-replayed, us per call)\n", flush=True)
    for t in tokens:
        sets, hits = routed_inputs(block, t)
        floor = sum(hits) / len(hits) * expert_bytes / bw * 1e6
        ref = moe_cuda.sorted_experts(sets[0][0], sets[0][1], sets[0][2], w13, w2, "silu", None).float()
        xs = [(s[0],) for s in sets]

        def time_cfg(cfg):
            op = lambda x, w, ids: moe_fused.fused_experts(x, w, ids, w13, w2, "silu", None, cfg)  # noqa: E731

            def layer(x):
                w, ids = moe_gating.router_gating_topk(x, router, K, None, "softmax", 1, 1, True, 1.0, 0.0)
                return op(x, w, ids)

            err = ((op(*sets[0]).float() - ref).norm() / ref.norm()).item()
            return graph_time_us(op, sets), graph_time_us(layer, xs), err

        results = []
        base = moe_fused.config_for(t)
        b_op, b_layer, _ = time_cfg(base)
        print(f"T={t}: experts floor {floor:.1f} us; configured path: experts {b_op:.1f} us, layer {b_layer:.1f} us", flush=True)
        cands = list(ffn_candidates(t))
        for cfg in cands:
            try:
                results.append((*time_cfg(cfg), cfg))
            except Exception as exc:
                print(f"  skip chunk={cfg.ffn_chunk} k={cfg.ffn_k} warps={cfg.ffn_warps}: {type(exc).__name__}", flush=True)
        best = min(results, key=lambda r: r[1])[3]
        for bn, st in itertools.product((64, 128, 256), (3, 4, 5)):
            cfg = dataclasses.replace(best, ffn_n=bn, ffn_stages=st)
            if cfg in cands:
                continue
            try:
                results.append((*time_cfg(cfg), cfg))
            except Exception as exc:
                print(f"  skip n={bn} stages={st}: {type(exc).__name__}", flush=True)
        results.sort(key=lambda r: r[1])
        for op_us, layer_us, err, cfg in results[:12]:
            print(f"  experts {op_us:6.1f} us ({op_us / floor:.2f}x)  layer {layer_us:6.1f} us  rel err {err:.1e}  chunk={cfg.ffn_chunk} k={cfg.ffn_k} n={cfg.ffn_n} "
                  f"warps={cfg.ffn_warps} stages={cfg.ffn_stages}", flush=True)
        print(f"  worst rel err over all configs: {max(r[2] for r in results):.1e}", flush=True)
    print(flush=True)


def profile_kernels(block, t) -> None:
    """Device time of every kernel of the fused layer (eager launches, torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fused = fused_forward(block)
    x = torch.randn(1, t, H, device="cuda", dtype=torch.bfloat16)
    for _ in range(10):
        fused(x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            fused(x)
        torch.cuda.synchronize()
    print(f"## kernels of the fused layer at {t} tokens (20 eager calls)\n", flush=True)
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", default="1,2,4,8,16,32,64,128,256,512")
    parser.add_argument("--sweep", default="", help="token counts to sweep Triton configs at, e.g. 1,2,4,8,16,32,64")
    parser.add_argument("--w2-only", action="store_true", help="sweep only the down-projection configs (w13 as configured)")
    parser.add_argument("--use-sweep", action="store_true", help="run the table with the swept configs (preview)")
    parser.add_argument("--variants", default="", help="token counts to time the layer variants at, e.g. 1,2,4,8,16,32")
    parser.add_argument("--ffn-sweep", default="", help="token counts to sweep the one-launch experts path at, e.g. 1,2")
    parser.add_argument("--profile", default="", help="token counts whose fused layer's kernels are profiled")
    parser.add_argument("--router-splits", action="store_true", help="with --variants: time the Triton router's split candidates too")
    parser.add_argument("--no-table", action="store_true", help="skip the main table")
    args = parser.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    torch.manual_seed(0)
    bw = hbm_bandwidth()
    block = make_block()
    expert_bytes = 3 * I * H * 2
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, measured copy bandwidth {bw / 1e9:.0f} GB/s")
    print(f"Triton path up to {moe_cuda.TRITON_MAX_TOKENS} tokens; {ROTATE} routings per graph\n", flush=True)
    if args.sweep:
        best = sweep(block, [int(t) for t in args.sweep.split(",")], expert_bytes, bw, args.w2_only)
        if args.use_sweep:
            swept = tuple(sorted(best.items())) + ((1 << 62, moe_fused.CONFIGS[-1][1]),)
            moe_fused.CONFIGS = swept
            print("table below uses the swept configs:", swept, "\n", flush=True)
    if args.variants:
        with torch.no_grad():
            variants(block, [int(t) for t in args.variants.split(",")], expert_bytes, bw, args.router_splits)
    if args.profile:
        with torch.no_grad():
            for t in args.profile.split(","):
                profile_kernels(block, int(t))
    if args.ffn_sweep:
        with torch.no_grad():
            ffn_sweep(block, [int(t) for t in args.ffn_sweep.split(",")], expert_bytes, bw)
    if args.no_table:
        return
    fused = fused_forward(block)
    compiled = torch.compile(block, dynamic=True)
    experts = block.experts
    w13, w2 = experts.gate_up_proj, experts.down_proj
    print("| tokens | experts hit | floor us | fused (graph) us | fused/floor | Triton experts us | Triton / experts floor | grouped_mm experts us | fused eager us | HF eager us | HF compile us | max abs err vs HF |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    with torch.no_grad():
        for t in tokens:
            sets, hits = routed_inputs(block, t)
            hit = sum(hits) / len(hits)
            floor_us = (hit * expert_bytes + E * H * 2 + 2 * t * H * 2) / bw * 1e6
            experts_floor = hit * expert_bytes / bw * 1e6
            xs = [(s[0].view(1, t, H),) for s in sets]
            x = xs[0][0]
            ref = block(x)
            err = max((fused(xi[0]).float() - block(xi[0]).float()).abs().max().item() for xi in xs)
            t_graph = graph_time_us(fused, xs)
            t_op = graph_time_us(lambda xx, w, ids: moe_fused.fused_experts(xx, w, ids, w13, w2, "silu", None), sets)
            t_grouped = graph_time_us(lambda xx, w, ids: moe_cuda.sorted_experts(xx, w, ids, w13, w2, "silu", None), sets)
            t_fused = triton.testing.do_bench(lambda: fused(x), warmup=10, rep=100, return_mode="median") * 1e3
            t_eager = triton.testing.do_bench(lambda: block(x), warmup=5, rep=50, return_mode="median") * 1e3
            compiled(x)
            t_comp = triton.testing.do_bench(lambda: compiled(x), warmup=5, rep=50, return_mode="median") * 1e3
            del ref
            print(
                f"| {t} | {hit:.1f} | {floor_us:.1f} | {t_graph:.1f} | {t_graph / floor_us:.2f}x | {t_op:.1f} | {t_op / experts_floor:.2f}x | {t_grouped:.1f} "
                f"| {t_fused:.1f} | {t_eager:.1f} | {t_comp:.1f} | {err:.3g} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
