"""Qwen3-30B-A3B-shaped MoE layer on one GPU: fused ops vs HF eager vs torch.compile vs the floor.

Shape: 128 experts, top-8, hidden 2048, expert dim 768, bf16, tokens 1..512.

- ``hf_eager``: ``Qwen3MoeSparseMoeBlock`` as transformers runs it (default experts
  implementation, ``grouped_mm``);
- ``hf_compile``: the same block under ``torch.compile`` (inductor, dynamic shapes);
- ``fused``: router GEMM + ``ascend_graph::moe_gating_topk`` +
  ``ascend_graph::moe_dispatch_ffn_combine`` (CUDA: ``torch._grouped_mm``), replayed
  from a CUDA graph as the ascend backend runs it (and eager, ``fused_eager``);
- ``floor``: bytes that must be read (the distinct experts actually selected, router
  weight, activations) / HBM bandwidth measured by a large device-to-device copy in
  the same run.

Timing: CUDA events via ``triton.testing.do_bench`` (median, warm-up, random data).
Usage: ``python benchmarks/moe_layer.py [--tokens 1,2,4,...]``; prints a markdown table.
"""

from __future__ import annotations

import argparse

import torch
import triton.testing

import ascend_graph.ops  # noqa: F401  (registers the ops)

E, K, H, I = 128, 8, 2048, 768


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
        logits = torch.nn.functional.linear(x2, router).float()
        w, ids = ops.moe_gating_topk(logits, K, None, "softmax", 1, 1, True, 1.0, 0.0)
        return ops.moe_dispatch_ffn_combine(x2, w.to(x.dtype), ids, experts.gate_up_proj, experts.down_proj, "silu").view_as(x)

    return fwd


def graphed(fn, x):
    static_x = x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn(static_x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_out = fn(static_x)
    return g, static_x, static_out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", default="1,2,4,8,16,32,64,128,256,512")
    args = parser.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    torch.manual_seed(0)
    bw = hbm_bandwidth()
    block = make_block()
    fused = fused_forward(block)
    compiled = torch.compile(block, dynamic=True)
    expert_bytes = 3 * I * H * 2
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, measured copy bandwidth {bw / 1e9:.0f} GB/s")
    print()
    print("| tokens | experts hit | floor us | fused (graph) us | fused/floor | fused eager us | HF eager us | HF compile us | max abs err vs HF |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    with torch.no_grad():
        for t in tokens:
            x = torch.randn(1, t, H, device="cuda", dtype=torch.bfloat16)
            ids = block.gate(x.view(-1, H))[2]
            hit = int(torch.unique(ids).numel())
            floor_us = (hit * expert_bytes + E * H * 2 + 2 * t * H * 2) / bw * 1e6
            ref = block(x)
            err = (fused(x).float() - ref.float()).abs().max().item()
            g, sx, sout = graphed(fused, x)
            sx.copy_(x)
            t_graph = triton.testing.do_bench(g.replay, warmup=25, rep=200, return_mode="median") * 1e3
            t_fused = triton.testing.do_bench(lambda: fused(x), warmup=10, rep=100, return_mode="median") * 1e3
            t_eager = triton.testing.do_bench(lambda: block(x), warmup=5, rep=50, return_mode="median") * 1e3
            compiled(x)
            t_comp = triton.testing.do_bench(lambda: compiled(x), warmup=5, rep=50, return_mode="median") * 1e3
            print(f"| {t} | {hit} | {floor_us:.1f} | {t_graph:.1f} | {t_graph / floor_us:.2f}x | {t_fused:.1f} | {t_eager:.1f} | {t_comp:.1f} | {err:.3g} |", flush=True)


if __name__ == "__main__":
    main()
