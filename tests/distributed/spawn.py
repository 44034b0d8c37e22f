"""Run a function on N real processes (torch.multiprocessing, gloo) with a deadline.

``run_ranks(fn, world, tmp_path, timeout)`` starts ``world`` processes, each calling
``fn(rank, world)`` after ``init_process_group("gloo")`` on a free loopback port, and
returns each rank's result: the value ``fn`` returned, or ``{"error": type name,
"message": ..., "seconds": ...}`` when it raised. Processes still alive at the deadline
are killed and the test fails with ``TimeoutError`` (a hang is a failure, never a wait).
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank: int, world: int, port: int, out_dir: str, pg_timeout_s: float) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # the CI machine is small and shared: one thread a rank
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=pg_timeout_s))
    start = time.monotonic()
    try:
        result = fn(rank, world)
    except BaseException as e:  # the parent reads the type and message
        result = {"error": type(e).__name__, "message": str(e), "seconds": time.monotonic() - start, "trace": traceback.format_exc()}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    try:
        dist.destroy_process_group()
    except Exception:  # a peer that died leaves nothing to tear down
        pass


def _context():
    # forkserver: torch (seconds to import on a loaded machine) is imported once by the
    # server, and each rank is a fork of it: a fresh process per rank as with spawn, with
    # no thread pool or CUDA state inherited from the test process
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "ascend_graph.ops", "ascend_graph.backend", "tests.distributed.workers", "transformers.models.deepseek_v3.modeling_deepseek_v3"])
    return ctx


def run_ranks(fn, world: int, out_dir, timeout: float = 60.0, pg_timeout_s: float = 30.0) -> list:
    out_dir = str(out_dir)
    ctx = _context()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, out_dir, pg_timeout_s), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    if hung:
        raise TimeoutError(f"ranks {hung} of {world} still running after {timeout} s (a hang)")
    results = []
    for r in range(world):
        path = os.path.join(out_dir, f"rank{r}.pt")
        results.append(torch.load(path, weights_only=False) if os.path.exists(path) else {"error": "died", "exitcode": procs[r].exitcode})
    return results
