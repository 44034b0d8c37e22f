"""The conformance matrix: architectures x dtypes x static/dynamic, compiled vs eager.

"Works means the conformance matrix is green" (DESIGN.md). Each case is one tiny
random-weight HF model (``tests/models/archs.py``) compiled with ``backend="ascend"``,
device graphs on, buckets [1, 2, 4, 8], fed batches 1, 3, 5, 2 of 17 tokens (so the
bucketed runner pads 3 -> 4 and 5 -> 8) and compared with eager on the same inputs.
Every case runs in its own subprocess with a time limit (a crash, a hang or a poisoned
CUDA context stays in its case); ``--jobs`` cases run at once, and ``--budget`` bounds
the whole run (a case never gets more time than the budget has left; cases that could
not start are listed as "not run").

Columns: compiled (or the error), fusions per family as got/expected per compiled
graph, captures ok/failed, eager fallbacks, max relative error vs eager (max |compiled -
eager| / max |eager| over the four batches), compile seconds (``stats()``), wall seconds
of the case; a summary line last. A case is green when it compiled, every family fused
as expected, no capture failed, no call fell back to eager and the error is within the
dtype's tolerance. A bf16 case over it is re-run under plain inductor, and compared with the
same weights in fp32: it is green when its error against fp32 is at most 1.5x eager
bf16's own plus tol/10. That is PyTorch's rule for low precision
(``torch._dynamo.utils.same`` with ``fp64_ref``), made stricter: it takes RMSE and allows
3x for bf16. A tiny random bf16 model can be ill-conditioned enough that any two bf16
runs differ by more than the tolerance.

    python benchmarks/conformance.py                                  # all cases, this machine's device
    python benchmarks/conformance.py --device cpu --arch llama --dtype fp32 --dynamic false --jobs 1
    python benchmarks/conformance.py --jobs 12 --timeout 150 --budget 500 --markdown   # the GPU run
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import subprocess
import sys
import time
from typing import Any
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK = "CONFORMANCE_RESULT "
BATCHES = (1, 3, 5, 2)
SEQ = 17
BUCKETS = [1, 2, 4, 8]
#: max relative error vs eager a green case may have
TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2}
DTYPES = ("fp32", "bf16")
#: architectures whose compile takes longest (hybrids, MoE with MLA or sinks) start first,
#: so a budget-bound run does not leave its slowest cases for the end
SLOW_FIRST = ("qwen3_next", "deepseek_v3", "gpt_oss", "bamba", "lfm2", "mixtral", "qwen3_moe")


# --------------------------------------------------------------------------- one case (child)


def run_case(arch_name: str, dtype_name: str, dynamic: bool, device: str) -> dict:
    """Compile and run one case in this process; returns the result row."""
    import torch

    import ascend_graph
    from tests.models.archs import ARCHS, build_arch, forward_output

    arch = ARCHS[arch_name]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    row: dict = {"arch": arch_name, "dtype": dtype_name, "dynamic": dynamic, "device": device, "expected": arch.expected}
    model = build_arch(arch_name, dtype).to(device)
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randint(3, 131, (b, SEQ), generator=gen).to(device) for b in BATCHES]
    with torch.no_grad():
        refs = [forward_output(arch, model, ids).float() for ids in inputs]
    ascend_graph.reset_stats()
    compiled = torch.compile(model, backend="ascend", dynamic=dynamic, options={"buckets": BUCKETS})
    worst = 0.0
    outs = []
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            for ids, ref in zip(inputs, refs):
                out = forward_output(arch, compiled, ids).float()
                outs.append(out)
                err = _rel_err(out, ref)
                worst = max(worst, err if err == err else float("inf"))  # NaN counts as a failure
        if device == "cuda":
            torch.cuda.synchronize()
        row["compiled"] = True
    except Exception as e:  # the row records it; the matrix goes on
        row["compiled"] = False
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
    row["wall_seconds"] = time.perf_counter() - t0
    st = ascend_graph.stats()
    graphs = max(st["graphs_compiled"], 1)
    row["graphs"] = st["graphs_compiled"]
    # per graph: every compiled graph of the case should hold the same rewrites
    row["fusions"] = {fam: st["fusions"].get(fam, 0) / graphs for fam in set(arch.expected) | {f for f, n in st["fusions"].items() if n}}
    # the MoE family counts a layer whose router alone fused: the experts ops say more
    ops = st.get("graph_ops", {})
    row["moe_experts"] = (ops.get("moe_dispatch_ffn_combine", 0) + ops.get("moe_dispatch_ffn_combine_list", 0)) / graphs
    row["captures_ok"] = st["buckets_captured"]
    row["capture_failures"] = st["capture_failures"]
    row["eager_fallbacks"] = st["eager_fallbacks"]
    row["fallback_reasons"] = st["fallback_reasons"]
    # why captures failed (the first distinct reasons), and passes that raised
    reasons = sorted({v["failed"] for v in st["buckets"].values() if isinstance(v, dict) and "failed" in v})
    if reasons:
        row["capture_errors"] = reasons[:3]
    if st.get("pass_failures"):
        row["pass_failures"] = {k: v["last"][:200] for k, v in st["pass_failures"].items()}
    row["compile_seconds"] = st["compile_seconds"]
    # where compile time goes: our passes (per pass) vs the rest (Dynamo, AOT, inductor)
    row["pass_seconds"] = {name: round(p["seconds"], 2) for name, p in st["passes"].items()}
    row["capture_seconds"] = st["capture_seconds"]
    row["max_rel_err"] = worst if row["compiled"] else None
    if row["compiled"] and worst > TOLERANCE[dtype_name]:
        # is the error ours? the same model under plain inductor, same shapes and batches
        torch._dynamo.reset()
        plain = torch.compile(model, backend="inductor", dynamic=dynamic)
        with torch.no_grad():
            errs = [_rel_err(forward_output(arch, plain, ids).float(), ref) for ids, ref in zip(inputs, refs)]
        row["inductor_rel_err"] = max(errs)
        if dtype != torch.float32:
            # PyTorch's own accuracy rule for low precision (torch._dynamo.utils.same with
            # fp64_ref): against a higher-precision reference, the compiled model may not be
            # much further off than eager in the same dtype. The same weights in fp32:
            ref_model = build_arch(arch_name, torch.float32).to(device)
            with torch.no_grad():
                refs32 = [forward_output(arch, ref_model, ids).float() for ids in inputs]
            row["fp32_ref_err"] = {
                "compiled": max(_rel_err(o, r) for o, r in zip(outs, refs32)),
                "eager": max(_rel_err(e, r) for e, r in zip(refs, refs32)),
            }
    return row


def _rel_err(out: Any, ref: Any) -> float:
    """max |out - ref| / max |ref| (the matrix's error measure)."""
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()


def _green(row: dict) -> bool:
    if not row.get("compiled"):
        return False
    fused = all(row["fusions"].get(f, 0) == n for f, n in row["expected"].items())
    fused = fused and row.get("moe_experts", row["expected"].get("moe", 0)) == row["expected"].get("moe", 0)
    err = row.get("max_rel_err")
    return fused and row["capture_failures"] == 0 and row["eager_fallbacks"] == 0 and err is not None and (err <= TOLERANCE[row["dtype"]] or _as_eager_vs_fp32(row))


#: a low-precision case whose error vs eager is over TOLERANCE still passes when, against
#: the fp32 model, it is at most this many times eager's own error (plus TOLERANCE / 10)
FP32_REF_MULTIPLIER = 1.5


def _as_eager_vs_fp32(row: dict) -> bool:
    ref = row.get("fp32_ref_err")
    return ref is not None and ref["compiled"] <= FP32_REF_MULTIPLIER * ref["eager"] + TOLERANCE[row["dtype"]] / 10


# --------------------------------------------------------------------------- the matrix (parent)


def _spawn(case: tuple[str, str, bool], device: str, timeout: float, threads: int) -> dict:
    arch, dtype, dynamic = case
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(ROOT)
    # N processes share the machine's cores: no process may spread over all of them
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(threads))
    env["CONFORMANCE_STACK_AFTER"] = str(max(timeout - 15, timeout * 0.9))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", arch, dtype, str(dynamic).lower(), "--device", device]
    t0 = time.perf_counter()
    base = {"arch": arch, "dtype": dtype, "dynamic": dynamic, "device": device, "compiled": False}
    if timeout <= 1:
        return {**base, "error": "not run (budget spent)", "not_run": True}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        row = {**base, "error": f"timeout after {timeout:.0f} s", "wall_seconds": time.perf_counter() - t0}
        where = _main_thread_frames(e.stderr)
        if where:
            row["stack"] = where
        return row
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    if proc.returncode < 0:  # killed by a signal: name it; where it was, if it had dumped its stack
        row = {**base, "error": f"process killed by {_signal_name(-proc.returncode)}: {tail[:200]}", "wall_seconds": time.perf_counter() - t0}
        where = _main_thread_frames(proc.stderr)
        if where:
            row["stack"] = where
        return row
    return {**base, "error": f"process exited {proc.returncode}: {tail[:200]}", "wall_seconds": time.perf_counter() - t0}


def _signal_name(number: int) -> str:
    import signal

    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _dump_main_stack_later(seconds: float) -> None:
    """After ``seconds``, write the main thread's stack to stderr, innermost frame first.

    A Python thread holding the GIL, not ``faulthandler.dump_traceback_later``: that one
    walks the frames of running threads without the GIL, and on the GPU machine (Python
    3.12, inductor's compile threads busy) it ended the dumped process with SIGSEGV (two
    Qwen3-Next cases, session 10), so a case about to time out looked like a crash.
    """
    import threading
    import traceback

    main = threading.main_thread()

    def dump() -> None:
        time.sleep(seconds)
        frame = sys._current_frames().get(main.ident)
        if frame is None:
            return
        lines = [f'  File "{f.filename}", line {f.lineno} in {f.name}' for f in reversed(traceback.extract_stack(frame))]
        sys.stderr.write(f"Thread 0x{main.ident:016x} (most recent call first):\n" + "\n".join(lines) + "\n")
        sys.stderr.flush()

    threading.Thread(target=dump, name="conformance-stack-dump", daemon=True).start()


def _main_thread_frames(stderr: Any, depth: int = 8) -> list[str]:
    """The innermost frames of the main thread in the stack dump (what a case that
    timed out was doing 15 s before its end)."""
    text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else (stderr or "")
    blocks = text.split("Thread 0x")
    main = [b for b in blocks if "<module>" in b]
    if not main:
        return []
    frames = [ln.strip().replace("File ", "") for ln in main[-1].splitlines()[1:] if ln.strip().startswith("File ")]
    ours = [f for f in frames[depth:] if "ascend_graph" in f][:3]  # and the innermost of our own frames
    return frames[:depth] + ours


def _fmt_fusions(row: dict) -> str:
    if "fusions" not in row:
        return "-"
    fams = sorted(set(row["expected"]) | set(row["fusions"]))
    short = {"attention": "attn", "moe": "moe", "causal_conv1d": "conv", "gated_delta_rule": "gdn", "norm_act": "norm"}

    def num(x: float) -> str:
        return str(int(x)) if float(x).is_integer() else f"{x:.1f}"

    text = " ".join(f"{short.get(f, f)} {num(row['fusions'].get(f, 0))}/{row['expected'].get(f, 0)}" for f in fams)
    if "moe" in row["expected"] and "moe_experts" in row:
        text += f" (experts {num(row['moe_experts'])})"
    return text


def _cells(row: dict) -> list[str]:
    err = row.get("max_rel_err")
    compiled = "yes" if row.get("compiled") else f"no: {row.get('error', '?')}"
    if row.get("compiled") and row.get("fallback_reasons"):
        compiled += " (fallbacks: " + ", ".join(f"{k} x{v}" for k, v in row["fallback_reasons"].items()) + ")"
    caps = f"{row['captures_ok']}/{row['capture_failures']}" if "captures_ok" in row else "-"
    return [
        row["arch"], row["dtype"], "dyn" if row["dynamic"] else "static",
        "GREEN" if _green(row) else "red", compiled, _fmt_fusions(row), caps,
        str(row.get("eager_fallbacks", "-")), "-" if err is None else f"{err:.1e}" + (f" (vs fp32 {row['fp32_ref_err']['compiled']:.1e}, eager's {row['fp32_ref_err']['eager']:.1e})" if "fp32_ref_err" in row else ""),
        f"{row['compile_seconds']:.1f} ({sum(row['pass_seconds'].values()):.1f})" if "compile_seconds" in row else "-", f"{row.get('wall_seconds', 0):.1f}",
    ]


HEADER = ["arch", "dtype", "shapes", "status", "compiled", "fusions got/expected (per graph)", "captures ok/failed", "eager fallbacks", "max rel err", "compile s (passes)", "case s"]


def _summary(rows: list[dict], device: str, seconds: float) -> str:
    green = [r for r in rows if _green(r)]
    red = [f"{r['arch']}/{r['dtype']}/{'dyn' if r['dynamic'] else 'static'}" for r in rows if not _green(r)]
    slow = max((r for r in rows if r.get("compiled")), key=lambda r: r.get("wall_seconds", 0), default=None)
    line = f"SUMMARY {device}: {len(green)}/{len(rows)} green in {seconds:.0f} s"
    if slow:
        line += f"; slowest {slow['arch']}/{slow['dtype']} {slow['wall_seconds']:.1f} s (compile {slow['compile_seconds']:.1f} s)"
    if red:
        line += "; red: " + ", ".join(red)
    if slow and slow.get("pass_seconds"):
        top = sorted(slow["pass_seconds"].items(), key=lambda kv: -kv[1])[:3]
        line += f"\nSLOWEST {slow['arch']}/{slow['dtype']}: compile {slow['compile_seconds']:.1f} s, of which passes " + ", ".join(f"{n} {s:.1f} s" for n, s in top)
        line += f", capture {slow.get('capture_seconds', 0):.1f} s; the rest is Dynamo + AOT + codegen"
    return line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", nargs=3, metavar=("ARCH", "DTYPE", "DYNAMIC"), help=argparse.SUPPRESS)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--arch", default="all", help="comma-separated architectures (default: all)")
    p.add_argument("--dtype", default="fp32,bf16")
    p.add_argument("--dynamic", default="false,true")
    p.add_argument("--jobs", type=int, default=1, help="cases run at once, each in its own process")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per case")
    p.add_argument("--budget", type=float, default=float("inf"), help="seconds for the whole run")
    p.add_argument("--markdown", action="store_true", help="also print the table as markdown (for BENCHMARKS.md)")
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = p.parse_args(argv)

    if args.child:
        arch, dtype, dyn = args.child
        dump_after = float(os.environ.get("CONFORMANCE_STACK_AFTER", "0"))
        if dump_after > 0:  # a case about to time out says where it is (stderr, read by the parent)
            _dump_main_stack_later(dump_after)
        row = run_case(arch, dtype, dyn == "true", args.device or "cpu")
        print(MARK + json.dumps(row), flush=True)
        return 0

    import torch

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # `python benchmarks/conformance.py` from anywhere: tests/ is the repo's
    from tests.models.archs import ARCHS

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    archs = list(ARCHS) if args.arch == "all" else args.arch.split(",")
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        raise SystemExit(f"--arch: expected some of {list(ARCHS)}, got {unknown}")
    cases = [(a, d, dyn == "true") for a in archs for d in args.dtype.split(",") for dyn in args.dynamic.split(",")]
    threads = max(1, (os.cpu_count() or 1) // max(args.jobs, 1))
    start = time.perf_counter()
    deadline = start + args.budget

    def one(case):
        return _spawn(case, device, min(args.timeout, deadline - time.perf_counter()), threads)

    rows: list[dict] = []
    start_order = sorted(cases, key=lambda c: SLOW_FIRST.index(c[0]) if c[0] in SLOW_FIRST else len(SLOW_FIRST))
    with cf.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(one, c): c for c in start_order}
        for fut in cf.as_completed(futures):
            row = fut.result()
            rows.append(row)
            print(" | ".join(_cells(row)), flush=True)
    order = {c: i for i, c in enumerate(cases)}
    rows.sort(key=lambda r: order[(r["arch"], r["dtype"], r["dynamic"])])
    seconds = time.perf_counter() - start
    print()
    widths = [max(len(h), *(len(_cells(r)[i]) for r in rows)) for i, h in enumerate(HEADER)]
    print("  ".join(h.ljust(w) for h, w in zip(HEADER, widths)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(_cells(r), widths)))
    if args.markdown:
        print()
        print("| " + " | ".join(HEADER) + " |")
        print("|" + "---|" * len(HEADER))
        for r in rows:
            print("| " + " | ".join(c.replace("|", "/") for c in _cells(r)) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    notes = [r for r in rows if r.get("capture_errors") or r.get("pass_failures") or r.get("error") or "inductor_rel_err" in r]
    if notes:
        print()
        print("Why (capture errors, pass failures, case errors):")
        for r in notes:
            why = r.get("capture_errors") or r.get("pass_failures") or r.get("error")
            if r.get("stack"):
                why = f"{why}; 15 s before: " + " <- ".join(r["stack"])
            if "inductor_rel_err" in r:
                why = f"max rel err {r['max_rel_err']:.1e} vs plain inductor's {r['inductor_rel_err']:.1e} on the same batches"
                if "fp32_ref_err" in r:
                    ref = r["fp32_ref_err"]
                    why += f"; against the fp32 model: compiled {ref['compiled']:.1e}, eager {r['dtype']} {ref['eager']:.1e} (passes at <= {FP32_REF_MULTIPLIER}x eager's + tol/10)"
            print(f"- {r['arch']}/{r['dtype']}/{'dyn' if r['dynamic'] else 'static'}: {why}")
    print()
    print(_summary(rows, device, seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
