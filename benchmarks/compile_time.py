"""Where one conformance case's compile time goes: each call timed, then torch's breakdown.

What ``benchmarks/conformance.py``'s ``run_case`` does for one case (a tiny random-weight HF
model, ``backend="ascend"``, buckets [1, 2, 4, 8], batches 1, 3, 5, 2 of 17 tokens), with
every call timed (synchronised on CUDA) and printed with the graphs compiled so far, our
compile, capture and pass seconds; then per-pass seconds, per-bucket capture seconds, and
``torch._dynamo.utils.compile_times()`` (Dynamo's trace and restarts, AOT, inductor). On
CUDA it also lists the Triton specialisations of our kernels each call JIT-compiled, which
is what a new bucket size costs on a cold Triton cache. Run it alone on the machine (its
timings are wall times), with ``TORCHINDUCTOR_COMPILE_THREADS`` set as the comparison needs:

    python benchmarks/compile_time.py qwen3_next --dynamic true --device cuda
    TORCHINDUCTOR_COMPILE_THREADS=1 python benchmarks/compile_time.py bamba --dynamic true
    python benchmarks/compile_time.py bamba --backend reduce-overhead   # the baseline

``--backend inductor`` / ``reduce-overhead`` time the same case under torch's own compiler
(without and with its CUDA graphs), what ``ascend`` replaces: only each call's seconds and
torch's breakdown are printed then.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BATCHES = (1, 3, 5, 2)
SEQ = 17
BUCKETS = [1, 2, 4, 8]


def _our_triton_kernels() -> dict:
    """name -> JITFunction of every Triton kernel under ascend_graph/ops/kernels/triton."""
    import triton

    import ascend_graph.ops.kernels.triton as pkg

    out = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for name, obj in vars(mod).items():
            fn = obj
            if callable(obj) and hasattr(obj, "cache_info") and getattr(obj, "__module__", "") == mod.__name__:
                try:
                    fn = obj()  # a functools.cache kernel builder
                except TypeError:
                    continue
            while hasattr(fn, "fn") and not isinstance(fn, triton.runtime.jit.JITFunction):
                fn = fn.fn  # an autotuner or heuristics wrapper
            if isinstance(fn, triton.runtime.jit.JITFunction):
                out[f"{info.name}.{name}"] = fn
    return out


def _jit_keys(kernels: dict) -> dict:
    keys = {}
    for name, fn in kernels.items():
        seen = set()
        for entry in getattr(fn, "device_caches", {}).values():
            cache = entry[0] if isinstance(entry, tuple) else entry
            seen |= {str(k) for k in cache}
        keys[name] = seen
    return keys


def _key_change(key: str, earlier: set) -> str:
    """What makes a new specialisation key new: the items (argument types, divisibility,
    constexpr values, options) that differ from the nearest earlier key of the same kernel,
    as ``#index: old -> new``; the key's start when there is no earlier one."""
    items = re.split(r"(?<=\)), (?=\()", key)
    best = None
    for old in earlier:
        prev = re.split(r"(?<=\)), (?=\()", old)
        if len(prev) != len(items):
            continue
        diff = [f"#{i}: {a} -> {b}" for i, (a, b) in enumerate(zip(prev, items)) if a != b]
        if best is None or len(diff) < len(best):
            best = diff
    if best is None:
        return f"first: {key[:160]}"
    return "; ".join(best)[:400] or "same items"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("arch", help="an architecture of tests/models/archs.py (llama, qwen3_next, bamba, ...)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--dynamic", default="true", choices=("true", "false"))
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument(
        "--backend", default="ascend", choices=("ascend", "inductor", "reduce-overhead"),
        help="ascend (default), or a baseline: torch's inductor, or inductor with its CUDA graphs (mode reduce-overhead)",
    )
    args = p.parse_args()

    import torch

    import ascend_graph
    from tests.models.archs import ARCHS, build_arch, forward_output

    if args.arch not in ARCHS:
        sys.exit(f"compile_time.py: unknown architecture {args.arch!r}; expected one of {', '.join(sorted(ARCHS))}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dynamic = args.dynamic == "true"
    arch = ARCHS[args.arch]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    model = build_arch(args.arch, dtype).to(device)
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randint(3, 131, (b, SEQ), generator=gen).to(device) for b in BATCHES]
    with torch.no_grad():
        refs = [forward_output(arch, model, ids).float() for ids in inputs]
    sync()
    kernels = _our_triton_kernels() if device == "cuda" else {}
    before = _jit_keys(kernels)
    ascend_graph.reset_stats()
    ours = args.backend == "ascend"
    if ours:
        compiled = torch.compile(model, backend="ascend", dynamic=dynamic, options={"buckets": BUCKETS})
    elif args.backend == "inductor":
        compiled = torch.compile(model, backend="inductor", dynamic=dynamic)
    else:
        compiled = torch.compile(model, backend="inductor", mode="reduce-overhead", dynamic=dynamic)
    print(f"{args.arch} {args.dtype} dynamic={dynamic} on {device}, backend {args.backend} (torch {torch.__version__})")
    total, worst = time.perf_counter(), 0.0
    with torch.no_grad():
        for ids, ref in zip(inputs, refs):
            t = time.perf_counter()
            out = forward_output(arch, compiled, ids).float()
            sync()
            seconds = time.perf_counter() - t
            worst = max(worst, ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item())
            if not ours:
                print(f"  batch {ids.shape[0]}: {seconds:6.2f} s")
                continue
            st = ascend_graph.stats()
            passes = sum(v["seconds"] for v in st["passes"].values())
            print(
                f"  batch {ids.shape[0]}: {seconds:6.2f} s  graphs {st['graphs_compiled']}  compile {st['compile_seconds']:.1f} s"
                f"  capture {st['capture_seconds']:.2f} s  passes {passes:.2f} s"
            )
            after = _jit_keys(kernels)
            for name in sorted(after):
                for key in sorted(after[name] - before.get(name, set())):
                    print(f"      Triton JIT {name}: {_key_change(key, before.get(name, set()))}")
            before = after
    if not ours:
        print(f"total {time.perf_counter() - total:.1f} s  max rel err {worst:.1e}")
    else:
        st = ascend_graph.stats()
        print(
            f"total {time.perf_counter() - total:.1f} s  max rel err {worst:.1e}  captures {st['buckets_captured']} ok /"
            f" {st['capture_failures']} failed  eager fallbacks {st['eager_fallbacks']}"
        )
        print("passes (s):", {k: round(v["seconds"], 2) for k, v in st["passes"].items() if v["seconds"] >= 0.01})
        print("captures (s):", {k: round(v["capture_seconds"], 2) for k, v in st["buckets"].items() if isinstance(v, dict) and "capture_seconds" in v})
    from torch._dynamo.utils import compile_times

    print(compile_times(repr="str", aggregate=True))


if __name__ == "__main__":
    main()
