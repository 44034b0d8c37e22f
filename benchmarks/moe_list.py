"""ModuleList experts (one nn.Linear per expert and projection): the fused list op vs what it replaces.

Rows per token count, all in one run on one device:

- ``eager onehot``: Mixtral's eager experts loop over the ModuleList (one_hot mask,
  ``torch.where`` per expert, ``index_add_``), what the fusion replaces;
- ``eager eq``: the Mistral reference loop (``torch.where(ids == e)``); ``eager dense``:
  the nonzero-free form (every expert on every token, times its routing weight);
- ``list op``: ``ascend_graph::moe_dispatch_ffn_combine_list`` on the experts' own tensors
  (CPU: the loop over hit experts; CUDA: the Triton pointer-table kernels), and on CUDA
  ``list op graph``, the same replayed from a CUDA graph as the backend runs it;
- ``stack + stacked op``: stacking the weights per call, then ``moe_dispatch_ffn_combine``
  (what fusing to the stacked op would cost), and ``stacked op (pre-stacked)``: the stacked
  op on weights stacked once (a copy of every expert kept beside the model's: not an
  option for a ModuleList model, shown as the kernel floor), on CUDA also from a graph.

Usage: ``python benchmarks/moe_list.py --device cpu|cuda [--tokens 1,16,128] [--hidden H
--inter I --experts E --top-k k --dtype bf16|fp32 --threads N --compiled]``. Prints a markdown table of median
microseconds per call and the list op's speed-up over ``eager onehot``; ``--compiled``
adds the whole block (router + experts, Mixtral's reference code) under
``torch.compile(backend="ascend")`` with the moe fusion off and on, per codegen.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import ascend_graph.ops  # noqa: F401  (registers the ops)

ops = torch.ops.ascend_graph


def _experts(e, h, i, dtype, device):
    torch.manual_seed(0)
    mk = lambda r, c: (torch.randn(r, c, device=device) * 0.02).to(dtype)  # noqa: E731
    return [mk(i, h) for _ in range(e)], [mk(i, h) for _ in range(e)], [mk(h, i) for _ in range(e)]


def eager_onehot(x, w, ids, w1, w3, w2):
    out = torch.zeros_like(x)
    mask = F.one_hot(ids, num_classes=len(w1)).permute(2, 1, 0)
    for e in range(len(w1)):
        pos, tok = torch.where(mask[e])
        h = x[tok]
        y = F.linear(F.silu(F.linear(h, w1[e])) * F.linear(h, w3[e]), w2[e]) * w[tok, pos, None]
        out.index_add_(0, tok, y.to(x.dtype))
    return out


def eager_eq(x, w, ids, w1, w3, w2):
    out = torch.zeros_like(x)
    for e in range(len(w1)):
        tok, pos = torch.where(ids == e)
        h = x[tok]
        out.index_add_(0, tok, (F.linear(F.silu(F.linear(h, w1[e])) * F.linear(h, w3[e]), w2[e]) * w[tok, pos, None]).to(x.dtype))
    return out


def eager_dense(x, w, ids, w1, w3, w2):
    # the nonzero-free form: every expert on every token, times its routing weight (0 if unrouted)
    out = torch.zeros_like(x)
    for e in range(len(w1)):
        out = out + F.linear(F.silu(F.linear(x, w1[e])) * F.linear(x, w3[e]), w2[e]) * (w * (ids == e)).sum(dim=-1, keepdim=True)
    return out


def stack_then_op(x, w, ids, w1, w3, w2):
    w13 = torch.stack([torch.cat([a, b]) for a, b in zip(w1, w3)])
    return ops.moe_dispatch_ffn_combine(x, w, ids, w13, torch.stack(w2))


class _Expert(torch.nn.Module):
    def __init__(self, h, i):
        super().__init__()
        self.w1, self.w3, self.w2 = torch.nn.Linear(h, i, bias=False), torch.nn.Linear(h, i, bias=False), torch.nn.Linear(i, h, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ModuleListMoE(torch.nn.Module):
    """Mixtral's reference block: softmax top-k router, ModuleList of experts, one_hot loop."""

    def __init__(self, e, k, h, i):
        super().__init__()
        self.k = k
        self.gate = torch.nn.Linear(h, e, bias=False)
        self.experts = torch.nn.ModuleList(_Expert(h, i) for _ in range(e))
        for p in self.parameters():
            torch.nn.init.normal_(p, std=0.02)

    def forward(self, x):
        w, ids = torch.topk(torch.softmax(self.gate(x), dim=-1, dtype=torch.float32), self.k, dim=-1)
        w = (w / w.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        mask = F.one_hot(ids, num_classes=len(self.experts)).permute(2, 1, 0)
        for e, expert in enumerate(self.experts):
            pos, tok = torch.where(mask[e])
            out.index_add_(0, tok, (expert(x[tok]) * w[tok, pos, None]).to(x.dtype))
        return out


def compiled_rows(a, h, i, dtype, tokens) -> None:
    """The whole block under torch.compile(backend="ascend"): moe fusion off vs on, per codegen."""
    block = ModuleListMoE(a.experts, a.top_k, h, i).to(dtype).to(a.device).eval()
    print(f"\ncompiled block (router + experts), dynamic=False, graphs off; microseconds per call, median\n")
    print("| tokens | codegen | eager | compiled, moe off | compiled, moe on (list op) | on vs off |")
    print("|---:|---|---:|---:|---:|---:|")
    for t in tokens:
        x = torch.randn(t, h, generator=torch.Generator().manual_seed(t)).to(dtype).to(a.device)
        for codegen in ("fx", "inductor"):
            r = {}
            for name, fusions in (("off", []), ("on", ["moe"])):
                torch._dynamo.reset()
                fn = torch.compile(block, backend="ascend", options={"codegen": codegen, "fusions": fusions, "graphs": False}, dynamic=False)
                with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True), torch.no_grad():
                    torch.testing.assert_close(fn(x), block(x), atol=2e-2, rtol=2e-2)
                    r[name] = _time(lambda: fn(x), a.device, a.reps)
            with torch.no_grad():
                eager = _time(lambda: block(x), a.device, a.reps)
            print(f"| {t} | {codegen} | {eager:.1f} | {r['off']:.1f} | {r['on']:.1f} | {r['off'] / r['on']:.2f}x |")


def _time(fn, device, reps):
    for _ in range(3):
        fn()
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


def _graphed(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()  # warm-up outside capture (builds the list op's pointer tables)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", default=None, help="default 1,16,128 (CPU), 1,8,64,256,1024,4096 (CUDA)")
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--inter", type=int, default=None)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp32"])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (1 gives stable numbers on a shared machine)")
    ap.add_argument("--compiled", action="store_true", help="also time the whole block under torch.compile, moe fusion off vs on")
    a = ap.parse_args()
    cuda = a.device == "cuda"
    a.tokens = a.tokens or ("1,8,64,256,1024,4096" if cuda else "1,16,128")
    if a.threads:
        torch.set_num_threads(a.threads)
    # defaults: Mixtral-8x7B's layer on the GPU; a 4x smaller one on the CPU
    h, i = a.hidden or (4096 if cuda else 1024), a.inter or (14336 if cuda else 3584)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype or ("bf16" if cuda else "fp32")]
    w1, w3, w2 = _experts(a.experts, h, i, dtype, a.device)
    w13_once = torch.stack([torch.cat([p, q]) for p, q in zip(w1, w3)])
    w2_once = torch.stack(w2)
    print(f"device {a.device} ({torch.cuda.get_device_name() if cuda else 'cpu, %d threads' % torch.get_num_threads()}), E={a.experts} k={a.top_k} H={h} I={i} {dtype}")
    print("\n| tokens | eager onehot | eager eq | eager dense | list op | list op graph | stack + stacked op | stacked op (pre-stacked) | stacked op graph | list op vs best eager |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t in [int(v) for v in a.tokens.split(",")]:
        g = torch.Generator().manual_seed(t)
        x = torch.randn(t, h, generator=g).to(dtype).to(a.device)
        w = torch.rand(t, a.top_k, generator=g).to(dtype).to(a.device)
        ids = torch.stack([torch.randperm(a.experts, generator=g)[: a.top_k] for _ in range(t)]).to(a.device)
        args = (x, w, ids, w1, w3, w2)
        with torch.no_grad():
            ref = eager_onehot(*args).float()
            got = ops.moe_dispatch_ffn_combine_list(*args).float()
            err = ((got - ref).norm() / ref.norm()).item()
            assert err < (2e-2 if dtype == torch.bfloat16 else 1e-4), f"list op differs from eager: rel err {err}"
            r = {
                "eager onehot": _time(lambda: eager_onehot(*args), a.device, a.reps),
                "eager eq": _time(lambda: eager_eq(*args), a.device, a.reps),
                "eager dense": _time(lambda: eager_dense(*args), a.device, a.reps),
                "list op": _time(lambda: ops.moe_dispatch_ffn_combine_list(*args), a.device, a.reps),
                "stack + stacked op": _time(lambda: stack_then_op(*args), a.device, a.reps),
                "stacked op (pre-stacked)": _time(lambda: ops.moe_dispatch_ffn_combine(x, w, ids, w13_once, w2_once), a.device, a.reps),
            }
            if cuda:
                r["list op graph"] = _time(_graphed(lambda: ops.moe_dispatch_ffn_combine_list(*args)), a.device, a.reps)
                r["stacked op graph"] = _time(_graphed(lambda: ops.moe_dispatch_ffn_combine(x, w, ids, w13_once, w2_once)), a.device, a.reps)
        cell = lambda k: f"{r[k]:.1f}" if k in r else "-"  # noqa: E731
        cols = ["eager onehot", "eager eq", "eager dense", "list op", "list op graph", "stack + stacked op", "stacked op (pre-stacked)", "stacked op graph"]
        best_list = min(r["list op"], r.get("list op graph", float("inf")))
        best_eager = min(r["eager onehot"], r["eager eq"], r["eager dense"])
        print(f"| {t} | " + " | ".join(cell(k) for k in cols) + f" | {best_eager / best_list:.2f}x |")
    print("\nmicroseconds per call, median; the last column: the fastest eager loop over the list op's best (graph on CUDA)")
    if a.compiled:
        compiled_rows(a, h, i, dtype, [int(v) for v in a.tokens.split(",")])


if __name__ == "__main__":
    main()
