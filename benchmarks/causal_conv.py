"""Causal conv1d kernels on CUDA: fused Triton vs the unfused torch path vs inductor.

Qwen3-Next-like dims: conv dim 8192 (2*key_dim + value_dim), kernel 4, bf16. Decode
(update) at batch 1..256 and prefill at a few lengths. Bytes/s counts the bytes each op
must move (x, out, state read + write, weights); HBM bandwidth is measured in the same
run with a large device-to-device copy. Times: median of ``triton.testing.do_bench``
(eager launches) and ``do_bench_cudagraph`` (inside a CUDA graph, as decode runs).

"cold" replays the call over ``COLD_COPIES`` different state/x copies in turn, so every
call reads its state from HBM as a layer of a real decode step does; "copy" is a plain
device-to-device copy of the same byte count timed the same way (what any one kernel of
this size reaches, launch and drain included).

    python benchmarks/causal_conv.py            # the tables
    python benchmarks/causal_conv.py --sweep    # update-kernel configs at B = 64, cold
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton

from ascend_graph.ops.kernels.triton import causal_conv as tk

C, K, DT = 8192, 4, torch.bfloat16
COLD_COPIES = 24  # 24 x 8.4 MB at B = 64: over twice the H100's 50 MB L2
REP_MS = 40
LAYOUTS = ("vllm", "hf", "cfirst")
dev = "cuda"


def hbm_bandwidth() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
    return 2 * a.numel() / (ms * 1e-3)


def torch_update(x, state, w):  # HF's fallback (x [B, C, 1], state [B, C, S])
    cat = torch.cat([state, x], -1)
    state.copy_(cat[:, :, -state.shape[-1]:])
    return F.silu(F.conv1d(cat, w.unsqueeze(1), None, groups=C)[:, :, -1:])


def torch_prefill(x, w):
    return F.silu(F.conv1d(x, w.unsqueeze(1), None, padding=K - 1, groups=C)[:, :, : x.shape[-1]])


def bench(fn, graph: bool, rep: int = REP_MS) -> float:
    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def state_width(layout: str) -> int:
    return K if layout == "hf" else K - 1


def make_inputs(layout: str, B: int, copies: int):
    """``copies`` (x, state) pairs: x is HF's transposed view [B, C, 1] of [B, 1, C];
    ``vllm`` state = [B, C, K-1] view of a [B, K-1, C] buffer, else [B, C, S] contiguous."""
    S = state_width(layout)
    xs = [torch.randn(B, 1, C, device=dev, dtype=DT).transpose(1, 2) for _ in range(copies)]
    if layout == "vllm":
        sts = [torch.randn(B, S, C, device=dev, dtype=DT).transpose(1, 2) for _ in range(copies)]
    else:
        sts = [torch.randn(B, C, S, device=dev, dtype=DT) for _ in range(copies)]
    return xs, sts


def update_bytes(B: int, S: int) -> int:
    return (2 * B * C + 2 * B * C * S + C * K) * 2


def cold_us(xs, sts, w, idx=None, rep: int = REP_MS, **cfg) -> float:
    def run():
        for x, s in zip(xs, sts):
            tk.causal_conv1d_update(x, s, w, None, idx, None, "silu", **cfg)

    return bench(run, True, rep) / len(xs) * 1e3


def copy_cold_us(nbytes: int, rep: int = REP_MS) -> float:
    """A plain D2D copy moving ``nbytes`` (half read, half written), over COLD_COPIES buffer pairs."""
    srcs = [torch.randn(nbytes // 4, device=dev, dtype=DT) for _ in range(COLD_COPIES)]
    dsts = [torch.empty_like(s) for s in srcs]

    def run():
        for d, s in zip(dsts, srcs):
            d.copy_(s)

    return bench(run, True, rep) / COLD_COPIES * 1e3


def check_update(layout: str, B: int, w, idx=None, **cfg) -> None:
    """The config computes what the plain-torch reference does (outputs and state)."""
    from ascend_graph.ops.causal_conv import reference_causal_conv1d_update

    (x,), (s1,) = make_inputs(layout, B, 1)
    s2 = s1.clone()
    y = tk.causal_conv1d_update(x, s1, w, None, idx, None, "silu", **cfg)
    r = reference_causal_conv1d_update(x, s2, w, None, idx, None, "silu")
    torch.testing.assert_close(y, r, atol=2e-2, rtol=2e-2)
    assert torch.equal(s1, s2), (layout, B, cfg)


def sweep_configs(layout: str) -> list[tuple[int, int, int]]:
    """(requests per program, channels per program, warps): 16-byte vectors along the channel
    axis need 8 channels per thread in vLLM's layout; the others hold a channel's columns in one
    thread whatever the block."""
    if layout == "vllm":
        return [(1, 256, 1), (1, 512, 1), (1, 512, 2), (1, 1024, 2), (1, 1024, 4), (1, 2048, 4), (1, 2048, 8),
                (2, 256, 1), (2, 256, 2), (2, 512, 2), (2, 512, 4), (2, 1024, 4), (2, 1024, 8),
                (4, 256, 2), (4, 256, 4), (4, 512, 4), (4, 512, 8), (8, 256, 4), (8, 256, 8), (16, 256, 8)]
    return [(1, 256, 1), (1, 256, 2), (1, 256, 4), (1, 512, 2), (1, 512, 4), (1, 1024, 4), (1, 1024, 8),
            (2, 256, 2), (2, 256, 4), (2, 512, 4), (4, 256, 4), (4, 256, 8), (8, 256, 8)]


def sweep(B: int = 64) -> None:
    torch.manual_seed(0)
    bw = hbm_bandwidth()
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"measured HBM bandwidth (1 GiB D2D copy): {bw / 1e12:.2f} TB/s")
    w = torch.randn(C, K, device=dev, dtype=DT)
    for layout in LAYOUTS:
        S = state_width(layout)
        nbytes = update_bytes(B, S)
        xs, sts = make_inputs(layout, B, COLD_COPIES)
        perm = torch.randperm(B, device=dev)
        t_copy = copy_cold_us(nbytes, rep=30)
        print(f"\n## {layout}, B={B}: {nbytes / 1e6:.2f} MB, DRAM floor {nbytes / bw * 1e6:.2f} us, "
              f"cold copy of the same bytes {t_copy:.2f} us ({nbytes / (t_copy * 1e-6) / bw * 100:.0f}%)")
        rows = []
        for cfg in [dict(kernel="column", block_c=256, num_warps=4)] + [
            dict(kernel="tile", block_r=r, block_c=c, num_warps=nw, evict=False) for r, c, nw in sweep_configs(layout)
        ]:
            check_update(layout, B + 3, w, **cfg)  # a batch that is not a multiple of the requests per program
            rows.append((cold_us(xs, sts, w, rep=30, **cfg), cfg))
        rows.sort(key=lambda r: r[0])
        for t, cfg in rows:
            print(f"  cold {t:5.2f} us {nbytes / (t * 1e-6) / bw * 100:3.0f}%  {cfg}")
        print("  top configs again: plain / evict hints / cache indices (random permutation) / hot")
        column = [r for r in rows if r[1]["kernel"] == "column"]
        for _t, cfg in column + [r for r in rows if r[1]["kernel"] == "tile"][:3]:
            again = cold_us(xs, sts, w, rep=30, **cfg)
            ev = float("nan") if cfg["kernel"] == "column" else cold_us(xs, sts, w, rep=30, **{**cfg, "evict": True})
            check_update(layout, B, w, idx=perm, **cfg)
            ix = cold_us(xs, sts, w, idx=perm, rep=30, **cfg)
            hot = bench(lambda: tk.causal_conv1d_update(xs[0], sts[0], w, None, None, None, "silu", **cfg), True, 30) * 1e3
            print(f"  {cfg}: cold {again:.2f} us, evict {ev:.2f} us, idx {ix:.2f} us, hot {hot:.2f} us")
        del xs, sts


def main() -> None:
    torch.manual_seed(0)
    bw = hbm_bandwidth()
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"measured HBM bandwidth (1 GiB D2D copy): {bw / 1e12:.2f} TB/s\n")
    w = torch.randn(C, K, device=dev, dtype=DT)
    inductor_update = torch.compile(torch_update)
    inductor_prefill = torch.compile(torch_prefill, dynamic=False)

    print("## decode: causal_conv1d_update, x [B, C, 1], silu\n")
    print("State layouts: `vllm` = [B, C, K-1] as the transposed view of a [B, K-1, C] buffer")
    print("(vLLM v1's mamba conv state: channels contiguous); `hf` = [B, C, K] contiguous")
    print("(transformers' Qwen3-Next cache); `cfirst` = [B, C, K-1] contiguous.")
    print("`graph` replays the kernel in a CUDA graph on one state (it stays in L2 between")
    print("replays); `graph, cold` replays it over %d state/x copies in turn (more bytes than L2" % COLD_COPIES)
    print("holds), which is what a layer of a real decode step sees; `cold, idx` is the same")
    print("with cache indices (a random permutation of the slots), as vLLM calls it; `copy` is a")
    print("D2D copy of the op's byte count, cold, timed the same way. The fused kernel runs its")
    print("default config (what the op uses), shown last as requests/channels/warps per program.\n")
    print("| layout | B | fused us (eager) | fused us (graph) | %HBM (graph) | fused us (graph, cold) | %HBM (cold) "
          "| fused us (cold, idx) | copy us (cold) | torch us | inductor us | config |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for layout in LAYOUTS:
        S = state_width(layout)
        for B in (1, 16, 64, 256):
            nbytes = update_bytes(B, S)
            kern, br, bc, nw, ev = tk._update_config(B, C, layout == "vllm")
            perm = torch.randperm(B, device=dev)
            check_update(layout, B, w)
            check_update(layout, B, w, idx=perm)
            (x,), (state,) = make_inputs(layout, B, 1)
            fused = lambda: tk.causal_conv1d_update(x, state, w, None, None, None, "silu")  # noqa: E731
            t_eager = bench(fused, False)
            t_graph = bench(fused, True)
            xs, sts = make_inputs(layout, B, COLD_COPIES)
            t_cold = cold_us(xs, sts, w)
            t_idx = cold_us(xs, sts, w, idx=perm)
            del xs, sts
            t_copy = copy_cold_us(nbytes)
            t_torch = bench(lambda: torch_update(x, state, w), True)
            t_ind = bench(lambda: inductor_update(x, state, w), True)
            pct = nbytes / (t_graph * 1e-3) / bw * 100
            pct_cold = nbytes / (t_cold * 1e-6) / bw * 100
            print(f"| {layout} | {B} | {t_eager * 1e3:.1f} | {t_graph * 1e3:.1f} | {pct:.0f}% | {t_cold:.1f} | {pct_cold:.0f}% "
                  f"| {t_idx:.1f} | {t_copy:.1f} | {t_torch * 1e3:.1f} | {t_ind * 1e3:.1f} "
                  f"| {kern} {br}/{bc}/{nw}w{' evict' if ev else ''} |")

    print("\n## vLLM layout, B = 64, cold: the default config against its neighbours (same run)\n")
    print("| kernel | requests/channels/warps | evict hints | cold us | %HBM | cold, idx us |")
    print("|---|---|---|---|---|---|")
    B, S = 64, state_width("vllm")
    xs, sts = make_inputs("vllm", B, COLD_COPIES)
    perm = torch.randperm(B, device=dev)
    for kern, br, bc, nw, ev in (("column", 1, 256, 4, False), ("tile", 2, 256, 2, True), ("tile", 2, 256, 2, False),
                                 ("tile", 1, 256, 1, True), ("tile", 1, 256, 1, False), ("tile", 1, 1024, 4, True)):
        cfg = dict(kernel=kern, block_r=br, block_c=bc, num_warps=nw, evict=ev)
        t, t_idx = cold_us(xs, sts, w, **cfg), cold_us(xs, sts, w, idx=perm, **cfg)
        pct = update_bytes(B, S) / (t * 1e-6) / bw * 100
        print(f"| {kern} | {br}/{bc}/{nw} | {'yes' if ev else 'no'} | {t:.2f} | {pct:.0f}% | {t_idx:.2f} |")
    del xs, sts

    print("\n## prefill: causal_conv1d, x [B, C, L] (transposed view of [B, L, C]), silu, no state\n")
    print("| B x L | fused us | fused %HBM | torch us | inductor us |")
    print("|---|---|---|---|---|")
    for B, L in ((1, 4096), (4, 2048), (16, 512)):
        x = torch.randn(B, L, C, device=dev, dtype=DT).transpose(1, 2)
        nbytes = 2 * B * C * L * 2
        cfgs = [(bc, bl) for bc in (64, 128) for bl in (16, 32, 64)]
        t_fused = min(bench(lambda: tk.causal_conv1d(x, w, None, None, None, None, None, "silu", block_c=bc, block_l=bl), False) for bc, bl in cfgs)
        t_torch = bench(lambda: torch_prefill(x, w), False)
        t_ind = bench(lambda: inductor_prefill(x, w), False)
        print(f"| {B}x{L} | {t_fused * 1e3:.1f} | {nbytes / (t_fused * 1e-3) / bw * 100:.0f}% | {t_torch * 1e3:.1f} | {t_ind * 1e3:.1f} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true", help="time update-kernel configs at B = 64, cold")
    args = ap.parse_args()
    sweep() if args.sweep else main()
