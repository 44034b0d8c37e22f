"""The ``ascend-graph`` command line: build, inspect, verify and clear an offline graph cache.

Entry point: :func:`main` (console script ``ascend-graph``; also ``python -m
ascend_graph.cli``). Commands::

    ascend-graph build MODULE:FACTORY --buckets 1,2,4,8 --cache-dir DIR
                       [--device cpu|cuda|npu] [--dtype float32|bfloat16|float16]
                       [-o KEY=VALUE ...] [--lock-timeout S] [--name NAME] [-v]
    ascend-graph build --hf-config PATH [--seq-len N] --buckets ... --cache-dir DIR ...
    ascend-graph inspect DIR [--json]
    ascend-graph verify DIR [--json] [--checksums-only]
    ascend-graph clear DIR [--stale]

``build`` compiles the model through ``torch.compile(model, backend="ascend",
options={"cache_dir": DIR, "buckets": [...], ...})`` and calls it once per bucket with
the example inputs resized along the batch dim (rows repeated), so the cache holds every
Dynamo graph a runtime padding to those buckets will meet. ``MODULE:FACTORY`` names a
function returning ``(model, example_inputs)`` where ``example_inputs`` is a dict of
keyword arguments or a tuple of positional ones (see ``examples/qwen3_factory.py``);
``--hf-config`` builds a random-weight HF causal LM from a local ``config.json``
(``AutoModelForCausalLM.from_config``; nothing is downloaded). Only one build writes a
cache at a time: a second waits on the build lock (``--lock-timeout``, default: wait).

Output: progress lines on stderr (one per bucket), results on stdout (a table for
``build``, one line per entry for ``inspect`` / ``verify``; ``--json`` for scripts).
Every error is one line on stderr starting ``ascend-graph: error:`` with one of the exit
codes below, never a traceback.

``inspect`` and ``verify`` only read: they take no lock and work on a read-only cache (a
container image layer, a read-only mount). ``build`` and ``clear`` write: on a cache this
process cannot write they stop at once with exit code 3.

Exit codes (stable; scripts may rely on them):

- 0: success (``verify``: every entry intact and usable on this machine);
- 1: ``verify`` found problems: a corrupt or truncated entry (a malformed manifest
  included), or (without ``--checksums-only``) an entry built for other versions or
  another device;
- 2: usage error: bad arguments or options, a MODEL that cannot be imported or built,
  a DIR that does not exist or is not an ascend-graph cache;
- 3: the cache cannot be used for this command: locked (lock timeout), read-only
  (``build``, ``clear``), another format, an unreadable marker, cannot be created, or
  another file-system error;
- 4: the build failed: the model or the compile raised;
- 130: interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import logging
import os
import re
import sys
import time
from typing import Any, Iterator, Sequence

__all__ = ["main", "EXIT_OK", "EXIT_PROBLEMS", "EXIT_USAGE", "EXIT_LOCKED", "EXIT_BUILD_FAILED", "EXIT_INTERRUPTED"]

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2
EXIT_LOCKED = 3
EXIT_BUILD_FAILED = 4
EXIT_INTERRUPTED = 130

#: The exit codes as ``--help`` shows them (the module docstring says more).
EXIT_CODES_HELP = (
    "exit codes: 0 success; 1 verify found corrupt or stale entries; 2 usage error (bad "
    "arguments, options, model, or DIR not a cache); 3 cache locked, read-only (build, "
    "clear), of another format or otherwise unusable; 4 build failed; 130 interrupted"
)

PROG = "ascend-graph"
_DTYPES = ("float32", "bfloat16", "float16")


class CliError(Exception):
    """Ends the command with a one-line message and an exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    # argparse exits with 2 on its own errors, which is our usage code; its message
    # becomes our one error line (the usage is one `--help` away).
    def error(self, message: str) -> None:  # type: ignore[override]
        raise CliError(f"{message} (see `{self.prog} --help`)", EXIT_USAGE)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Offline graph cache for the 'ascend' torch.compile backend.", epilog=EXIT_CODES_HELP)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    b = sub.add_parser("build", help="compile a model for every bucket and write the cache", epilog=EXIT_CODES_HELP)
    b.add_argument("model", nargs="?", help="MODULE:FACTORY, a function returning (model, example_inputs)")
    b.add_argument("--hf-config", help="local HF config.json (or its directory): random-weight causal LM, no download")
    b.add_argument("--buckets", required=True, help="comma-separated batch sizes, e.g. 1,2,4,8")
    b.add_argument("--cache-dir", required=True, help="cache directory (created if missing)")
    b.add_argument("--device", default="cpu", choices=("cpu", "cuda", "npu"))
    b.add_argument("--dtype", default="float32", choices=_DTYPES)
    b.add_argument("--seq-len", type=int, default=16, help="sequence length of the --hf-config example input (default 16)")
    b.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE", help="extra backend option (VALUE parsed as JSON when it parses, else a string); repeatable")
    b.add_argument("--name", help="name of the build record in DIR/builds (default: from the model)")
    b.add_argument("--lock-timeout", type=float, default=None, help="seconds to wait for another build of this cache (default: wait)")
    b.add_argument("-v", "--verbose", action="store_true", help="log every cache decision (INFO)")

    i = sub.add_parser("inspect", help="list the entries of a cache: key factors, the options recorded beside them, files, sizes", epilog=EXIT_CODES_HELP)
    i.add_argument("cache_dir")
    i.add_argument("--json", action="store_true", help="one JSON document on stdout")

    v = sub.add_parser("verify", help="check every checksum, and the versions and device against this machine (read-only caches too)", epilog=EXIT_CODES_HELP)
    v.add_argument("cache_dir")
    v.add_argument("--json", action="store_true")
    v.add_argument("--checksums-only", action="store_true", help="only the checksums (for a cache built for another machine)")
    # reading takes no lock; accepted so that older scripts keep working
    v.add_argument("--lock-timeout", type=float, default=None, help=argparse.SUPPRESS)

    c = sub.add_parser("clear", help="remove a cache's entries (the directory stays)", epilog=EXIT_CODES_HELP)
    c.add_argument("cache_dir")
    c.add_argument("--stale", action="store_true", help="only entries that are corrupt or built for another machine")
    c.add_argument("--lock-timeout", type=float, default=60.0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (see the module docstring)."""
    try:
        args = _parser().parse_args(argv)
        lock_timeout = getattr(args, "lock_timeout", None)
        if lock_timeout is not None and not lock_timeout >= 0:
            raise CliError(f"--lock-timeout must be >= 0 seconds, got {lock_timeout}", EXIT_USAGE)
        verbose = getattr(args, "verbose", False)
        with _logging_to_stderr(logging.INFO if verbose else logging.WARNING):
            return {"build": _cmd_build, "inspect": _cmd_inspect, "verify": _cmd_verify, "clear": _cmd_clear}[args.command](args)
    except CliError as e:
        return _fail(str(e), e.code)
    except OSError as e:
        # a file-system error the commands did not foresee (permissions, a full disk):
        # the cache cannot be used for this command
        where = f": {e.filename}" if e.filename else ""
        return _fail(f"{e.strerror or e}{where}", EXIT_LOCKED)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)


def _fail(message: str, code: int) -> int:
    # one line, whatever the message holds (an exception's text can span lines)
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
    return code


@contextlib.contextmanager
def _logging_to_stderr(level: int) -> Iterator[None]:
    """Show the package's log records on stderr for the length of one command."""
    logger = logging.getLogger("ascend_graph")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
    handler.setLevel(level)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(min(level, old_level) if old_level else level)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- shared ---------------------------------------------------------------------------


def _open_store(path: str, lock_timeout: float | None = None, *, must_exist: bool):
    from .cache import CacheStore
    from .errors import CacheError

    store = CacheStore(path, lock_timeout=lock_timeout)
    if must_exist:
        if not os.path.isdir(store.root):
            raise CliError(f"{store.root} does not exist", EXIT_USAGE)
        if not store.is_cache():
            raise CliError(f"{store.root} is not an ascend-graph cache (no ascend-graph-cache.json)", EXIT_USAGE)
        try:
            store.check_format()
        except CacheError as e:
            raise CliError(str(e), EXIT_LOCKED) from None
    return store


def _require_writable(store: Any, command: str) -> None:
    if not store.writable():
        raise CliError(f"{store.root} is read-only to this process: `{command}` writes the cache (inspect and verify work on it)", EXIT_LOCKED)


@contextlib.contextmanager
def _locked(lock) -> Iterator[None]:
    from .errors import CacheError

    try:
        lock.acquire()
    except CacheError as e:
        raise CliError(str(e), EXIT_LOCKED) from None
    try:
        yield
    finally:
        lock.release()


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _this_machine_factors(device_factor: str) -> tuple[dict[str, str] | None, str]:
    """This machine's environment factors for an entry built on ``device_factor``'s kind of device.

    Returns ``(None, reason)`` when this machine has no such device.
    """
    import torch

    from .cache import environment_factors

    kind = device_factor.split(":", 1)[0]
    if kind == "cpu":
        return environment_factors(torch.device("cpu")), ""
    if kind == "cuda":
        if not torch.cuda.is_available():
            return None, "no CUDA device here"
        candidates = [environment_factors(torch.device("cuda", i)) for i in range(torch.cuda.device_count())]
        for c in candidates:
            if c["device"] == device_factor:
                return c, ""
        return candidates[0], ""
    if kind == "npu":
        npu = getattr(torch, "npu", None)
        if npu is None or not npu.is_available():
            return None, "no NPU here (or torch_npu not imported)"
        return environment_factors(torch.device("npu", 0)), ""
    return None, f"unknown device kind {kind!r}"


def _stale_factors(manifest: dict[str, Any]) -> tuple[dict[str, tuple[str, str]], str]:
    from .cache import ENVIRONMENT_FACTORS

    factors = manifest.get("factors", {})
    here, reason = _this_machine_factors(str(factors.get("device", "cpu")))
    if here is None:
        return {"device": ("absent", str(factors.get("device")))}, reason
    diff = {n: (here[n], str(factors.get(n))) for n in ENVIRONMENT_FACTORS if here.get(n) != factors.get(n)}
    return diff, ""


# -- build ----------------------------------------------------------------------------


def _parse_buckets(text: str) -> list[int]:
    try:
        buckets = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise CliError(f"--buckets must be comma-separated integers, got {text!r}", EXIT_USAGE) from None
    if not buckets or any(b < 1 for b in buckets):
        raise CliError(f"--buckets must be positive integers, got {text!r}", EXIT_USAGE)
    return sorted(set(buckets))


def _parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise CliError(f"--option must be KEY=VALUE, got {pair!r}", EXIT_USAGE)
        try:
            out[name] = json.loads(value)
        except ValueError:
            out[name] = value
    return out


def _load_factory(spec: str) -> tuple[Any, Any]:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CliError(f"MODEL must be MODULE:FACTORY, got {spec!r}", EXIT_USAGE)
    if os.getcwd() not in sys.path and "" not in sys.path:
        # `python -m` and console scripts differ on whether the working directory is
        # importable; a factory next to the user should work either way.
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # any import-time failure of user code is a usage problem
        raise CliError(f"cannot import {module_name!r}: {type(e).__name__}: {e}", EXIT_USAGE) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise CliError(f"{module_name!r} has no callable {attr!r}", EXIT_USAGE)
    try:
        result = factory()
    except Exception as e:
        raise CliError(f"{spec}() raised {type(e).__name__}: {e}", EXIT_USAGE) from None
    if not (isinstance(result, tuple) and len(result) == 2):
        raise CliError(f"{spec}() must return (model, example_inputs), got {type(result).__name__}", EXIT_USAGE)
    model, inputs = result
    if not isinstance(inputs, (dict, tuple, list)):
        raise CliError(f"example_inputs from {spec}() must be a dict or a tuple, got {type(inputs).__name__}", EXIT_USAGE)
    return model, inputs


def _load_hf_config(path: str, seq_len: int) -> tuple[Any, Any]:
    import torch

    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise CliError(f"cannot read HF config {file}: {e}", EXIT_USAGE) from None
    model_type = data.pop("model_type", None)
    if not model_type:
        raise CliError(f"{file} has no model_type", EXIT_USAGE)
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model(model_type, **data)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    except Exception as e:
        raise CliError(f"cannot build a causal LM from {file}: {type(e).__name__}: {e}", EXIT_USAGE) from None
    vocab = int(getattr(config, "vocab_size", 1000))
    ids = torch.randint(0, vocab, (1, seq_len), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids, "use_cache": False}


def _hf_name(path: str) -> str:
    path = os.path.abspath(path)
    return os.path.basename(path if os.path.isdir(path) else os.path.dirname(path)) or "model"


def _batch_size(inputs: Any, batch_dim: int) -> int:
    values = inputs.values() if isinstance(inputs, dict) else inputs
    import torch

    for v in values:
        if isinstance(v, torch.Tensor) and v.dim() > batch_dim:
            return int(v.shape[batch_dim])
    raise CliError(f"example_inputs have no tensor with a dim {batch_dim} to resize", EXIT_USAGE)


def resize_batch(inputs: Any, size: int, batch_dim: int = 0) -> Any:
    """Example inputs with every tensor whose batch dim matches the example's resized to ``size``.

    Rows are repeated cyclically (``index_select`` with ``arange(size) % batch``), so
    token ids stay valid ids and masks stay masks.
    """
    import torch

    batch = _batch_size(inputs, batch_dim)

    def one(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.dim() > batch_dim and v.shape[batch_dim] == batch:
            index = torch.arange(size, device=v.device) % batch
            return v.index_select(batch_dim, index).contiguous()
        return v

    if isinstance(inputs, dict):
        return {k: one(v) for k, v in inputs.items()}
    return tuple(one(v) for v in inputs)


def _to_device(inputs: Any, device: Any, dtype: Any) -> Any:
    import torch

    def one(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
        return v

    if isinstance(inputs, dict):
        return {k: one(v) for k, v in inputs.items()}
    return tuple(one(v) for v in inputs)


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu" and hasattr(torch, "npu"):
        torch.npu.synchronize()


def _cmd_build(args: argparse.Namespace) -> int:
    if bool(args.model) == bool(args.hf_config):
        raise CliError("give exactly one of MODEL (MODULE:FACTORY) or --hf-config PATH", EXIT_USAGE)
    buckets = _parse_buckets(args.buckets)
    extra = _parse_options(args.option)
    for reserved in ("cache_dir", "buckets"):
        if reserved in extra:
            raise CliError(f"option {reserved!r} is set by --{reserved.replace('_', '-')}, not -o", EXIT_USAGE)
    if args.seq_len < 1:
        raise CliError(f"--seq-len must be >= 1, got {args.seq_len}", EXIT_USAGE)

    import torch

    from .cache import record_events
    from .config import AscendConfig
    from .errors import AscendGraphError, CacheError, ConfigError

    options = {"cache_dir": os.path.abspath(args.cache_dir), "buckets": buckets, **extra}
    try:
        config = AscendConfig.from_options(options)
    except (ConfigError, TypeError, ValueError) as e:
        raise CliError(f"bad option: {e}", EXIT_USAGE) from None
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda but torch sees no CUDA device", EXIT_USAGE)
    if args.device == "npu" and not hasattr(torch, "npu"):
        raise CliError("--device npu but torch_npu is not loaded (install torch_npu with CANN)", EXIT_USAGE)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)

    store = _open_store(args.cache_dir, must_exist=False)
    if os.path.isdir(store.root) and store.is_cache():
        try:
            store.check_format()
        except CacheError as e:
            raise CliError(str(e), EXIT_LOCKED) from None
        _require_writable(store, "build")
    try:
        store.ensure()
    except (CacheError, OSError) as e:
        raise CliError(f"cannot use {store.root} as a cache: {e}", EXIT_LOCKED) from None
    _require_writable(store, "build")

    with _locked(store.build_lock(args.lock_timeout)):
        model, inputs = _load_factory(args.model) if args.model else _load_hf_config(args.hf_config, args.seq_len)
        if isinstance(model, torch.nn.Module):
            model = model.to(device=device, dtype=dtype).eval()
        inputs = _to_device(inputs, device, dtype)
        name = args.name or re.sub(r"[^A-Za-z0-9_.-]+", "_", args.model or _hf_name(args.hf_config))
        # A clean Dynamo state, so every graph of this model reaches the backend (and so
        # the cache) even when main() runs twice in one process.
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="ascend", options=options)

        rows = []
        total_start = time.perf_counter()
        for n, size in enumerate(buckets, 1):
            batch = resize_batch(inputs, size, config.batch_dim)
            _progress(f"[{n}/{len(buckets)}] bucket {size}: compiling ...")
            start = time.perf_counter()
            with record_events() as events:
                try:
                    with torch.no_grad():
                        if isinstance(batch, dict):
                            compiled(**batch)
                        else:
                            compiled(*batch)
                    _sync(device)
                except AscendGraphError as e:
                    raise CliError(f"bucket {size}: {e}", EXIT_BUILD_FAILED) from None
                except Exception as e:  # the user's model or torch failed: report, do not trace back
                    raise CliError(f"bucket {size}: {type(e).__name__}: {e}", EXIT_BUILD_FAILED) from None
            seconds = time.perf_counter() - start
            row = {
                "bucket": size,
                "seconds": round(seconds, 3),
                "graphs": len(events),
                "hits": sum(e.status == "hit" for e in events),
                "built": sum(e.status != "hit" for e in events),
                "entries": [{"key": e.digest, "graph_id": e.graph_id, "status": e.status, "changed": list(e.changed), "compile_seconds": round(e.compile_seconds, 3)} for e in events],
            }
            rows.append(row)
            _progress(f"[{n}/{len(buckets)}] bucket {size}: done in {seconds:.2f} s ({row['graphs']} graphs compiled: {row['hits']} from cache, {row['built']} built)")
        total = time.perf_counter() - total_start

        from .cache import environment_factors

        record = {
            "name": name,
            "model": args.model or None,
            "hf_config": os.path.abspath(args.hf_config) if args.hf_config else None,
            "device": args.device,
            "dtype": args.dtype,
            "buckets": buckets,
            "options": {k: v for k, v in options.items() if k != "cache_dir"},
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "total_seconds": round(total, 3),
            "per_bucket": rows,
            "environment": environment_factors(device),
        }
        store.write_build_record(name, record)

    _print_build_table(record, store.root)
    return EXIT_OK


def _print_build_table(record: dict[str, Any], root: str) -> None:
    from .cache.store import dir_size

    print(f"built {record['name']} on {record['device']} ({record['dtype']}) into {root}")
    print(f"{'bucket':>6}  {'seconds':>8}  {'graphs':>6}  {'cached':>6}  {'built':>5}")
    for r in record["per_bucket"]:
        print(f"{r['bucket']:>6}  {r['seconds']:>8.2f}  {r['graphs']:>6}  {r['hits']:>6}  {r['built']:>5}")
    graphs = sum(r["graphs"] for r in record["per_bucket"])
    hits = sum(r["hits"] for r in record["per_bucket"])
    print(f"{'total':>6}  {record['total_seconds']:>8.2f}  {graphs:>6}  {hits:>6}  {graphs - hits:>5}")
    print(f"cache size {_size(dir_size(os.path.join(root, 'entries')))}")


# -- inspect / verify / clear ---------------------------------------------------------


def _entry_report(store: Any, summary: Any) -> dict[str, Any]:
    from .cache.store import dir_size

    m = summary.manifest or {}
    files = {name: meta.get("bytes") for name, meta in m.get("files", {}).items()}
    return {
        "key": summary.digest,
        "problem": summary.problem,
        "graph_id": m.get("graph_id"),
        "codegen": m.get("codegen"),
        "buckets": m.get("buckets"),
        "batch_symbol": (m.get("shapes") or {}).get("batch_symbol"),
        "inputs": [f"{i.get('name')}[{','.join(i.get('dims', []))}]" for i in (m.get("shapes") or {}).get("inputs", [])],
        "created": m.get("created"),
        "bytes": dir_size(summary.path),
        "files": {n: b for n, b in files.items() if not n.startswith(("kernels/", "triton/"))},
        # inductor's cache-dir files (C++ kernels, Triton autotuning results) and Triton's
        # cache files (cubins, metadata, launchers); first_run: added after the first call
        "kernels": sum(1 for n in files if n.startswith("kernels/")),
        "triton_files": sum(1 for n in files if n.startswith("triton/")),
        "first_run_files": m.get("first_run_files", 0),
        "torch_artifacts": m.get("torch_artifacts", {}),
        "timings": m.get("timings", {}),
        "factors": m.get("factors", {}),
        # the options the "config" factor hashes, and the serving options recorded beside
        # the key (not in it: a runtime with other buckets or warm-up loads this entry)
        "graph_options": m.get("graph_options", {}),
        "serving_options": m.get("serving_options", {"buckets": m.get("buckets")}),
        # "load": a hit loads the compiled graph (AOTAutograd's cache); "rebuild": a hit
        # runs the build with the artifacts hot-loaded (FX codegen, or torch declined to save)
        "on_hit": "load" if m.get("aot_cache_tag") else "rebuild",
        # the frame this batch-dynamic graph was traced from and its batch inputs: a later
        # process traces that frame batch-dynamic from its first call (cache/dynamic.py)
        "frame": m.get("frame"),
    }


def _cmd_inspect(args: argparse.Namespace) -> int:
    store = _open_store(args.cache_dir, must_exist=True)
    entries = [_entry_report(store, s) for s in store.summaries()]
    builds = store.build_records()
    if args.json:
        print(json.dumps({"cache": store.root, "entries": entries, "builds": builds}, indent=1, sort_keys=True, default=str))
        return EXIT_OK
    total = sum(e["bytes"] for e in entries)
    print(f"cache {store.root}: {len(entries)} entries, {_size(total)}")
    for b in builds:
        if b.get("problem"):
            print(f"build record {b.get('_file')}: CORRUPT: {b['problem']}")
            continue
        per = ", ".join(f"{r['bucket']}: {r['seconds']:.1f} s" for r in b.get("per_bucket", []))
        print(f"build {b.get('name')}: {b.get('model') or b.get('hf_config')} on {b.get('device')} {b.get('dtype')}, buckets {b.get('buckets')}, {b.get('total_seconds')} s ({per}), {b.get('created')}")
    for e in entries:
        if e["problem"]:
            print(f"entry {e['key'][:12]}  CORRUPT: {e['problem']}")
            continue
        print(f"entry {e['key'][:12]}  {e['graph_id']}  {e['codegen']}  batch symbol {e['batch_symbol']}  buckets {e['buckets']}  {_size(e['bytes'])}  built in {e['timings'].get('build_seconds')} s  {e['created']}")
        print(f"  inputs: {' '.join(e['inputs'])}")
        files = ", ".join(f"{n} {_size(b or 0)}" for n, b in sorted(e["files"].items()))
        print(f"  files: {files}; {e['kernels']} inductor kernel files, {e['triton_files']} Triton cache files ({e['first_run_files']} of all from the first run); torch artifacts {e['torch_artifacts']}; a hit will {e['on_hit']}")
        print("  key factors: " + " ".join(f"{k}={v}" for k, v in e["factors"].items()))
        if e["graph_options"]:
            print("  options in the key (config factor): " + " ".join(f"{k}={_option(v)}" for k, v in sorted(e["graph_options"].items())))
        print("  options recorded beside the key (not in it): " + " ".join(f"{k}={_option(v)}" for k, v in sorted(e["serving_options"].items())))
        frame = e["frame"]
        if frame:
            code = frame.get("code", {})
            print(f"  frame {code.get('name')} line {code.get('firstlineno')}: first trace batch-dynamic in dim {frame.get('batch_dim')} of " + " ".join(sorted(frame.get("sources", {}))))
    return EXIT_OK


def _option(value: Any) -> str:
    return json.dumps(value, default=str, separators=(",", ":"))


def _cmd_verify(args: argparse.Namespace) -> int:
    # Reading takes no lock (entries appear and are replaced by renames; checksums catch
    # a half-read one), so a read-only cache verifies like any other.
    store = _open_store(args.cache_dir, must_exist=True)
    results = []
    leftovers = store.leftovers()
    for digest in store.digests():
        problems = store.verify(digest)
        stale: dict[str, tuple[str, str]] = {}
        reason = ""
        if not problems and not args.checksums_only:
            summary = store.summary(digest)
            stale, reason = _stale_factors(summary.manifest or {})
        status = "corrupt" if problems else ("stale" if stale else "ok")
        results.append({"key": digest, "status": status, "problems": problems, "stale": {k: {"here": h, "entry": e} for k, (h, e) in stale.items()}, "reason": reason})
    bad = [r for r in results if r["status"] != "ok"]
    if args.json:
        print(json.dumps({"cache": store.root, "entries": results, "leftovers": leftovers, "ok": not bad}, indent=1, sort_keys=True))
    else:
        for r in results:
            if r["status"] == "ok":
                print(f"ok       {r['key'][:12]}")
            elif r["status"] == "corrupt":
                print(f"CORRUPT  {r['key'][:12]}: {'; '.join(r['problems'])}")
            else:
                detail = ", ".join(f"{k} (here {v['here']}, entry {v['entry']})" for k, v in r["stale"].items())
                print(f"STALE    {r['key'][:12]}: built for another setup: {detail}{'; ' + r['reason'] if r['reason'] else ''}")
        for path in leftovers:
            print(f"note: leftover temporary directory of an interrupted write: {path} (`clear` removes it)")
        print(f"{len(results)} entries: {len(results) - len(bad)} ok, {sum(r['status'] == 'corrupt' for r in results)} corrupt, {sum(r['status'] == 'stale' for r in results)} stale")
    return EXIT_PROBLEMS if bad else EXIT_OK


def _cmd_clear(args: argparse.Namespace) -> int:
    store = _open_store(args.cache_dir, args.lock_timeout, must_exist=True)
    _require_writable(store, "clear")
    with _locked(store.lock(exclusive=True)):
        if args.stale:
            targets = []
            for digest in store.digests():
                if store.verify(digest):
                    targets.append(digest)
                    continue
                stale, _ = _stale_factors(store.summary(digest).manifest or {})
                if stale:
                    targets.append(digest)
            removed = store.clear(targets)
        else:
            removed = store.clear()
    print(f"removed {removed} entries from {store.root}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
