"""Causal conv1d kernels on CUDA: fused Triton vs the unfused torch path vs inductor.

Qwen3-Next-like dims: conv dim 8192 (2*key_dim + value_dim), kernel 4, bf16. Decode
(update) at batch 1..256 and prefill at a few lengths. Bytes/s counts the bytes each op
must move (x, out, state read + write, weights); HBM bandwidth is measured in the same
run with a large device-to-device copy. Times: median of ``triton.testing.do_bench``
(eager launches) and ``do_bench_cudagraph`` (inside a CUDA graph, as decode runs).

    python benchmarks/causal_conv.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton

from ascend_graph.ops.kernels.triton import causal_conv as tk

C, K, DT = 8192, 4, torch.bfloat16
COLD_COPIES = 24  # 24 x 8.4 MB at B = 64: over twice the H100's 50 MB L2
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


def bench(fn, graph: bool) -> float:
    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")
    return triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")


def main() -> None:
    torch.manual_seed(0)
    bw = hbm_bandwidth()
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"measured HBM bandwidth (1 GiB D2D copy): {bw / 1e12:.2f} TB/s\n")
    w = torch.randn(C, K, device=dev, dtype=DT)
    inductor_update = torch.compile(torch_update)
    inductor_prefill = torch.compile(torch_prefill, dynamic=False)

    print("## decode: causal_conv1d_update, x [B, C, 1], silu\n")
    print("State layouts: `hf` = [B, C, K] contiguous (transformers' Qwen3-Next cache);")
    print("`vllm` = [B, C, K-1] as the transposed view of a [B, K-1, C] buffer (vLLM v1's mamba")
    print("conv state: channels contiguous); `cfirst` = [B, C, K-1] contiguous.")
    print("`graph` replays the kernel in a CUDA graph on one state (it stays in L2 between")
    print("replays); `graph, cold` replays it over %d state/x copies in turn (more bytes than L2" % COLD_COPIES)
    print("holds), which is what a layer of a real decode step sees.\n")
    print("| layout | B | fused us (eager) | fused us (graph) | %HBM (graph) | fused us (graph, cold) | %HBM (cold) | torch us | inductor us | best block_c |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for layout in ("hf", "vllm", "cfirst"):
        S = K if layout == "hf" else K - 1
        for B in (1, 16, 64, 256):
            def make(copies: int):
                xs = [torch.randn(B, 1, C, device=dev, dtype=DT).transpose(1, 2) for _ in range(copies)]  # HF's transposed view
                if layout == "vllm":
                    sts = [torch.randn(B, S, C, device=dev, dtype=DT).transpose(1, 2) for _ in range(copies)]
                else:
                    sts = [torch.randn(B, C, S, device=dev, dtype=DT) for _ in range(copies)]
                return xs, sts
            (x,), (state,) = make(1)
            nbytes = (2 * B * C + 2 * B * C * S + C * K) * 2
            best = None
            for block in (128, 256, 512, 1024):
                for warps in (1, 2, 4, 8):
                    if block // (32 * warps) < 1:
                        continue
                    t = bench(lambda: tk.causal_conv1d_update(x, state, w, None, None, None, "silu", block_c=block, num_warps=warps), True)
                    if best is None or t < best[0]:
                        best = (t, block, warps)
            t_graph, block, warps = best
            t_eager = bench(lambda: tk.causal_conv1d_update(x, state, w, None, None, None, "silu", block_c=block, num_warps=warps), False)
            xs, sts = make(COLD_COPIES)
            t_cold = bench(lambda: [tk.causal_conv1d_update(xi, si, w, None, None, None, "silu", block_c=block, num_warps=warps) for xi, si in zip(xs, sts)], True) / COLD_COPIES
            del xs, sts
            t_torch = bench(lambda: torch_update(x, state, w), True)
            t_ind = bench(lambda: inductor_update(x, state, w), True)
            pct = nbytes / (t_graph * 1e-3) / bw * 100
            pct_cold = nbytes / (t_cold * 1e-3) / bw * 100
            print(f"| {layout} | {B} | {t_eager * 1e3:.1f} | {t_graph * 1e3:.1f} | {pct:.0f}% | {t_cold * 1e3:.1f} | {pct_cold:.0f}% | {t_torch * 1e3:.1f} | {t_ind * 1e3:.1f} | {block}/{warps}w |")

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
    main()
