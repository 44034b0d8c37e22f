"""The bucketed runner: pad to a bucket, capture a device graph once, replay.

Entry point: :func:`make_runner` (called by the backend with the compiled function and
the compile context). One :class:`BucketedRunner` per compiled graph; one
:class:`GraphEntry` per key. A key is the bucket plus the values of the graph's other
symbols (a prefill sequence length, a growing KV length), so a graph whose non-batch
dims vary gets one graph per value, capped by ``max_graphs``.

Each entry is a small state machine: ``new -> captured`` (a warm-up run, then the
capture, on first use or at warm-up), or ``failed`` (capture raised: the bucket is
dropped with a warning and counted; the capture was contained, runtime/graphs.py, so
the call is served by the eager run that preceded it and later calls go to the next
bucket up or run without graphs).

Every runner captures into its device's one pool (runtime/pool.py), and a warm-up
captures largest first (the call itself is served at its bucket without a graph first,
which also initialises the device), so a bucket list costs about its largest bucket.
:func:`estimate_scope` measures that in advance by trial captures into a throw-away
pool (``ascend_graph.estimate_graph_memory``). On an NPU each capture draws the streams
its graph uses (counted from the graph) from the device's ledger (runtime/buckets.py).

Inputs, by kind:

- parameters and buffers: never copied; the graph reads them where they are
  (addresses checked at replay in debug mode);
- inputs the graph mutates and that do not depend on the batch (KV caches): never
  copied; their addresses are checked at every call, and a change recaptures the entry;
- everything else: copied into the entry's static buffers, padded by role
  (``runtime/padding.py``). Buffers whose batch dim is dim 0 are views of one
  persistent buffer sized for the largest bucket; a batch-dependent input the graph
  mutates is copied back after the replay.

FIA metadata: each ``cu_len`` input (``query_start_loc``) is planned with
:func:`~ascend_graph.runtime.padding.plan_fia` against the token count (the longest
batch-dependent leading dim of the inputs): its padded tail is the plan's dummy requests, so ``T_pad ==
cu_q[-1]`` holds at every bucket; a batch whose token count is ``q`` times its request
count is a uniform decode batch and its dummies hold ``q`` tokens each. Plans are made
(and their invariants checked) before the bucket is captured; the tail is written with
device copies, so a replay needs no host synchronisation and no argument patching.

MTP batches: bucket sizes count tokens. When the batch symbol counts requests and the
token dim is ``(1+k)*s`` (``num_speculative_tokens=k``), the token buckets (multiples
of 1+k) become request buckets, so the padded batch is ``bucket`` tokens, still uniform.

Outputs are sliced back to the real batch. With real device graphs they are cloned out
of the graph's static buffers unless the config says the caller consumes them first:
a graph holds its outputs weakly, so the next replay of any graph of the pool (another
bucket, another compiled function) may overwrite them.

On the CPU there is no device graph (``NoGraph``): the compiled function runs at the
padded shape, so padding, bucketing and the counters (a bucket run counts as a replay)
behave as on a GPU and are tested here.
"""

from __future__ import annotations

import contextlib
import contextvars
import gc
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import sympy
import torch

from .. import _stats
from ..errors import CaptureError
from .buckets import DEFAULT_STREAM_BUDGET, STREAM_ADVICE, BucketPlan, GraphStreams, StreamLedger, count_graph_streams, is_stream_exhaustion, plan_buckets
from .graphs import DeviceGraph, NoGraph, capture_guard, new_graph, pool_reserved_bytes, supports_graphs
from .pool import DevicePool, device_pool, graph_api
from .padding import FiaPlan, FiaSpec, PadPlan, fia_specs, pad_into, plan_padding, role_for, slice_output

__all__ = ["make_runner", "BucketedRunner", "warmup_scope", "estimate_scope", "combine_estimates", "RunnerEstimate", "estimate_samples"]

log = logging.getLogger("ascend_graph.runtime")

_warmup_requested: contextvars.ContextVar[bool] = contextvars.ContextVar("ascend_graph_warmup", default=False)


_estimate_requested: contextvars.ContextVar["list[RunnerEstimate] | None"] = contextvars.ContextVar("ascend_graph_estimate", default=None)


@dataclass(frozen=True)
class RunnerEstimate:
    """Trial-capture measurements of one runner: the first (largest) bucket's pool growth,
    and what the later samples, captured after it into the same pool, added together."""

    graph_id: str
    first_bytes: int
    later_bytes: int
    samples: tuple[int, ...]

    @property
    def total_bytes(self) -> int:
        return self.first_bytes + self.later_bytes


def estimate_samples(sizes: Sequence[int], most: int = 10) -> list[int]:
    """The buckets trial-captured for an estimate, largest first: the largest, the next,
    then about one a halving down to the smallest. A smaller bucket adds to the pool only
    where its allocations fall into size classes the larger ones did not provision (the
    caching allocator's small, large and exact classes), which changes with the bucket's
    scale, not with every step of the list."""
    sizes = sorted(set(sizes), reverse=True)
    picks = sizes[:2]
    target = sizes[0] / 2
    for s in sizes[2:]:
        if s <= target:
            picks.append(s)
            target = s / 2
    if sizes[-1] not in picks:
        picks.append(sizes[-1])
    if len(picks) > most:  # keep the ends, thin the middle
        middle = picks[1:-1]
        step = len(middle) / (most - 2)
        picks = [picks[0]] + [middle[int(i * step)] for i in range(most - 2)] + [picks[-1]]
    return picks


def combine_estimates(found: Sequence[RunnerEstimate]) -> int:
    """Pool bytes of several runners' bucket lists in the one shared pool: the largest
    first capture (the graphs of different runners never run at once, so they overlay)
    plus what each runner's later captures added (vLLM's profile_cudagraph_memory
    combines its FULL and PIECEWISE estimates the same way)."""
    if not found:
        return 0
    return max(e.first_bytes for e in found) + sum(e.later_bytes for e in found)


@contextlib.contextmanager
def estimate_scope():
    """Within this scope, a runner's call is served eagerly and, instead of capturing,
    trial-captures a few buckets into a throw-away pool; yields the list of
    :class:`RunnerEstimate` the runners reached append to."""
    found: list[RunnerEstimate] = []
    token = _estimate_requested.set(found)
    try:
        yield found
    finally:
        _estimate_requested.reset(token)


@contextlib.contextmanager
def warmup_scope():
    """Within this scope, a runner's first call captures every bucket (largest first)."""
    token = _warmup_requested.set(True)
    try:
        yield
    finally:
        _warmup_requested.reset(token)


@dataclass
class GraphEntry:
    key: tuple
    bucket: int | None
    graph: DeviceGraph
    static_args: list[Any]
    pinned_ptrs: dict[int, int] = field(default_factory=dict)  # input index -> data_ptr at capture
    state: str = "new"


class BucketedRunner:
    """Callable Dynamo gets back from the backend."""

    def __init__(self, compiled: Callable[..., Any], ctx: Any):
        self.compiled = compiled
        self.ctx = ctx
        self.config = ctx.config
        self.shapes = ctx.shapes
        self.device: torch.device = ctx.device
        # With codegen='torchair', TorchAir captures its own ACL graphs: do not nest ours.
        self.use_graphs = bool(self.config.graphs) and supports_graphs(self.device) and ctx.codegen != "torchair"
        self.mutated: frozenset[int] = frozenset(getattr(ctx, "mutated_inputs", ()) or ())
        batch = self.shapes.batch_symbol
        kinds = [v.kind for v in self.shapes.inputs]
        #: inputs read in place: parameters/buffers, and mutated inputs without a batch dim
        self.in_place = frozenset(
            i for i, v in enumerate(self.shapes.inputs) if v.kind == "param" or (i in self.mutated and not v.depends_on(batch))
        )
        self.copied = tuple(i for i, k in enumerate(kinds) if k == "tensor" and i not in self.in_place)
        declared = self.config.pad_role_map
        self.roles = {i: role_for(self.shapes.inputs[i].name, declared) for i in self.copied}
        self.plan: BucketPlan | None = None
        self.fia: tuple[FiaSpec, ...] = ()
        #: NPU: the streams one capture of this graph takes, counted from the graph, and
        #: the device's ledger they are drawn from (None where streams are not budgeted)
        self.stream_use = GraphStreams()
        self.streams: StreamLedger | None = None
        budget: int | None = None
        if self.use_graphs and stream_budget_applies(self.device):
            budget = self.config.stream_budget or DEFAULT_STREAM_BUDGET
            self.stream_use = count_graph_streams(getattr(ctx, "post_pass_code", None) or "")
            pool = device_pool(self.device)
            self.streams = pool.stream_ledger(budget) if pool is not None else StreamLedger(budget)
            log.info("%s: one capture takes %d streams (%s)", ctx.graph_id, self.stream_use.cost(), self.stream_use)
        if batch is not None:
            self.plan = plan_buckets(
                self.config.buckets,
                max_size=self.config.max_batch,
                num_speculative_tokens=self.config.num_speculative_tokens,
                stream_budget=budget,
                stream_cost=self.stream_use.cost(),
            )
            tokens = _token_dim(self.shapes, self.roles)
            q = 1 + self.config.num_speculative_tokens
            if q > 1 and sympy.simplify(tokens / batch) == q:
                self.plan = self.plan.in_units_of(q)  # token buckets -> request buckets
            self.fia = fia_specs(self.shapes, self.roles, tokens)
        self.entries: dict[tuple, GraphEntry] = {}
        self.failed: set[tuple] = set()
        #: the device's shared graph pool (runtime/pool.py), None without device graphs
        self.pool: DevicePool | None = device_pool(self.device) if self.use_graphs else None
        self._persistent: dict[tuple, torch.Tensor] = {}
        self._warmed: set[tuple] = set()
        self._pad_plans: dict[tuple, PadPlan] = {}
        self._cu_tails: dict[tuple, torch.Tensor] = {}  # (FIA plan, device, dtype) -> its tail on the device
        self._pool_bytes = 0  # measured pool growth of the captured entries

    # -- the call ------------------------------------------------------------------

    def __call__(self, *args: Any) -> Any:
        values = self.shapes.bind(args)
        others = tuple(values[s] for s in self.shapes.other_symbols)
        if self.pool is not None and self.pool.disabled:
            return self._fallback("graphs_disabled", args)
        estimates = _estimate_requested.get()
        if estimates is not None:
            return self._estimate(args, values, others, estimates)
        if self.plan is None:
            return self._run_entry(("static",) + others, None, args, values, None)
        if (self.config.warmup or _warmup_requested.get()) and others not in self._warmed:
            self._warmed.add(others)
            # this call runs first, at its bucket but without a graph (its run also
            # initialises cuBLAS and autotuning, which must not happen in a capture);
            # then every bucket, largest first, by capture alone: in one shared pool the
            # smaller buckets' graphs reuse the blocks the larger ones left free
            result = self._eager_at_bucket(args, values, others)
            self._warmup_all(args, values, others)
            return result
        return self._serve(args, values, others)

    def _eager_at_bucket(self, args: Sequence[Any], values: dict, others: tuple) -> Any:
        """Serve this call at its bucket's padded shapes without capturing anything."""
        n = values[self.shapes.batch_symbol]
        bucket = self.plan.select(n) if self.plan is not None else None
        if bucket is None:
            return self._fallback("above_largest_bucket", args)
        key = (bucket,) + others
        pad = plan_padding(self.shapes, values, bucket, self.fia)
        entry = GraphEntry(key=key, bucket=bucket, graph=NoGraph(), static_args=self._make_static_args(key, args, pad))
        self._load_inputs(entry, args, pad)
        outs = self.compiled(*entry.static_args)
        _stats.record_padding(pad.real_batch, pad.bucket - pad.real_batch)
        return self._finish(entry, outs, args, pad, clone=False)

    def _serve(self, args: Sequence[Any], values: dict, others: tuple) -> Any:
        n = values[self.shapes.batch_symbol]
        while True:
            bucket = self.plan.select(n) if self.plan is not None else None
            if bucket is None:
                return self._fallback("above_largest_bucket", args)
            key = (bucket,) + others
            if key in self.failed:
                self.plan = self.plan.without(bucket)
                continue
            # sympy substitution costs ~0.1 ms an expression: plan once per (batch, others)
            pad = self._pad_plans.get((n,) + key)
            if pad is None:
                pad = self._pad_plans[(n,) + key] = plan_padding(self.shapes, values, bucket, self.fia)
            return self._run_entry(key, bucket, args, values, pad)

    def _run_entry(self, key: tuple, bucket: int | None, args: Sequence[Any], values: dict, pad: PadPlan | None) -> Any:
        entry = self.entries.get(key)
        if entry is not None and self._in_place_moved(entry, args):
            log.warning("an in-place input (KV cache) moved since graph %s was captured; recapturing", key)
            del self.entries[key]
            if self.streams is not None:
                self.streams.release(self.stream_use.cost())
            entry = None
        if entry is None:
            if len(self.entries) >= self.config.max_graphs:
                return self._fallback("graph_limit", args)
            captured = self._capture(key, bucket, args, pad, real_call=True)
            if captured is None:
                # the function failed at the padded shapes before any capture: run it as called
                return self._fallback("capture_failed", args)
            # the run that preceded the capture was this call's execution: no replay now
            entry, outs = captured
            if entry.state == "failed":
                # the capture failed (and was contained); the eager run still served this call
                _stats.record_fallback("capture_failed")
                return self._finish(entry, outs, args, pad, clone=False)
        else:
            self._load_inputs(entry, args, pad)
            outs = entry.graph.replay()
        _stats.record_replay()
        if pad is not None:
            _stats.record_padding(pad.real_batch, pad.bucket - pad.real_batch)
        return self._finish(entry, outs, args, pad)

    def _fallback(self, reason: str, args: Sequence[Any]) -> Any:
        _stats.record_fallback(reason)
        return self.compiled(*args)

    # -- inputs ----------------------------------------------------------------------

    def _static_buffer(self, i: int, shape: tuple[int, ...], stride: tuple[int, ...], like: torch.Tensor, others: tuple) -> torch.Tensor:
        """A buffer for input i with the layout the graph was traced with (a transposed KV
        cache stays transposed: the graph may index it with those strides). Where the
        batch is dim 0 and outermost, it is a view of one buffer sized for the largest bucket."""
        v = self.shapes.inputs[i]
        batch = self.shapes.batch_symbol
        if self.plan is not None and v.batch_dims(batch) == (0,):
            values = dict(zip(self.shapes.other_symbols, others))
            values[batch] = self.plan.largest
            full_shape = self.shapes.evaluate(v, values)
            key = (i,) + others
            full = self._persistent.get(key)
            if full is None or tuple(full.shape) != tuple(full_shape):
                full = torch.empty_strided(full_shape, self.shapes.evaluate_strides(v, values), dtype=like.dtype, device=like.device)
                self._persistent[key] = full
            view = full[: shape[0]]
            if tuple(view.stride()) == tuple(stride) or view.numel() <= 1:
                return view
        return torch.empty_strided(shape, stride, dtype=like.dtype, device=like.device)

    def _make_static_args(self, key: tuple, args: Sequence[Any], pad: PadPlan | None) -> list[Any]:
        others = key[1:]
        static: list[Any] = list(args)
        for i in self.copied:
            a = args[i]
            v = self.shapes.inputs[i]
            if pad is not None:
                shape = pad.input_shapes[i]
                stride = self.shapes.evaluate_strides(v, pad.padded_values)
            else:
                shape, stride = tuple(a.shape), tuple(a.stride())
            static[i] = self._static_buffer(i, shape, stride, a, others)
        if pad is not None:
            for j, v in enumerate(self.shapes.inputs):
                if v.kind == "symint":
                    static[j] = self.shapes.evaluate(v, pad.padded_values)[0]
        return static

    def _load_inputs(self, entry: GraphEntry, args: Sequence[Any], pad: PadPlan | None) -> None:
        for i in self.copied:
            fia = pad.fia.get(i) if pad is not None else None
            if fia is None:
                pad_into(entry.static_args[i], args[i], self.roles[i])
                continue
            if self.config.debug:
                fia.query_start_loc(args[i].tolist())  # host sync: the real metadata matches the plan
            dst = entry.static_args[i]
            pad_into(dst, args[i], "cu_len", self._cu_tail(fia, dst))
        if self.config.debug:
            for i in self.in_place:
                if i in entry.pinned_ptrs and args[i].data_ptr() != entry.pinned_ptrs[i]:
                    raise CaptureError(
                        f"parameter/buffer input {self.shapes.inputs[i].name!r} moved since capture",
                        expected=hex(entry.pinned_ptrs[i]),
                        got=hex(args[i].data_ptr()),
                        hint="device graphs read parameters in place; recompile after moving the model",
                    )

    def _cu_tail(self, fia: FiaPlan, like: torch.Tensor) -> torch.Tensor:
        """The plan's query_start_loc tail on the device, made once per plan (one copy
        from the host then; every later call copies device to device)."""
        key = (fia, like.device, like.dtype)
        tail = self._cu_tails.get(key)
        if tail is None:
            tail = self._cu_tails[key] = torch.tensor(fia.cu_tail, dtype=like.dtype, device=like.device)
        return tail

    def _in_place_moved(self, entry: GraphEntry, args: Sequence[Any]) -> bool:
        return any(args[i].data_ptr() != entry.pinned_ptrs.get(i) for i in self.in_place if i in self.mutated)

    # -- capture ---------------------------------------------------------------------

    def _warmup_all(self, args: Sequence[Any], values: dict, others: tuple) -> None:
        """Capture every bucket for these other-symbol values, largest first (one pool)."""
        assert self.plan is not None
        gc.collect()  # once for the whole loop (each capture then skips its own)
        for bucket in reversed(self.plan.sizes):
            key = (bucket,) + others
            if key in self.entries or key in self.failed or len(self.entries) >= self.config.max_graphs:
                continue
            b_args, b_values = self._truncate(args, values, bucket)
            self._capture(key, bucket, b_args, plan_padding(self.shapes, b_values, bucket, self.fia), real_call=False)

    def _truncate(self, args: Sequence[Any], values: dict, bucket: int) -> tuple[list[Any], dict]:
        """This call's inputs cut to a smaller bucket's batch (to capture it at warm-up).

        The rows kept are real rows of this call, so anything the warm-up run writes
        (cache slots) is what the real call writes again.
        """
        batch = self.shapes.batch_symbol
        if bucket >= values[batch]:
            return list(args), values
        small = dict(values)
        small[batch] = bucket
        out = list(args)
        for i in self.copied:
            v = self.shapes.inputs[i]
            t = args[i]
            for d, n in enumerate(self.shapes.evaluate(v, small)):
                t = t.narrow(d, 0, n)
            out[i] = t
        for j, v in enumerate(self.shapes.inputs):
            if v.kind == "symint":
                out[j] = self.shapes.evaluate(v, small)[0]
        return out, small

    def _capture(self, key: tuple, bucket: int | None, args: Sequence[Any], pad: PadPlan | None, *, real_call: bool) -> tuple[GraphEntry, Any] | None:
        """Warm up and capture one entry; returns it with the warm-up run's outputs.

        A failed capture drops the bucket (counted); for the call being served it still
        returns the entry (state ``failed``) with the eager run's outputs, which serve
        the call; None when there is nothing to serve from (a warm-up capture, or the
        eager run itself raised).

        For the call being served (``real_call``) the function runs exactly once here:
        the eager run before a device capture (which records without executing) is its
        execution. A warm-up of another bucket on a device only records, so it never
        changes the model's state (KV caches, recurrent states); without device graphs
        (NoGraph runs the function) the in-place inputs it mutates are restored.
        """
        static = self._make_static_args(key, args, pad)
        graph = new_graph(self.device, self.use_graphs)
        entry = GraphEntry(key=key, bucket=bucket, graph=graph, static_args=static)
        entry.pinned_ptrs = {i: args[i].data_ptr() for i in self.in_place if isinstance(args[i], torch.Tensor)}
        self._load_inputs(entry, args, pad)
        name = f"{self.ctx.graph_id}:{'x'.join(map(str, key))}"
        cost = self.stream_use.cost()
        if self.streams is not None and not self.streams.fits(cost):
            ledger = self.streams
            why = ledger.closed or f"stream budget: {ledger.used} streams held + {cost} > {ledger.budget}"
            log.warning("capture of %s skipped: %s; %s", name, why, STREAM_ADVICE)
            self._drop(key, bucket, name, CaptureError(f"{why}; {STREAM_ADVICE}"))
            return None
        saved = {} if (real_call or self.use_graphs) else {i: args[i].clone() for i in self.in_place & self.mutated}
        start = time.perf_counter()
        outs: Any = None
        try:
            if self.use_graphs:
                # the eager run first: lazy initialisation (cuBLAS handles, autotuning)
                # must not happen inside the capture
                outs = self.compiled(*static) if real_call else None
        except Exception as e:
            if self.config.debug:
                raise
            log.warning("%s failed at its padded shapes before capture (%s: %s)", name, type(e).__name__, e)
            self._drop(key, bucket, name, e)
            return None
        before = pool_reserved_bytes(self.device)
        try:
            if self.use_graphs:
                with capture_guard(self.device, collect=real_call):
                    # the copied inputs are reloaded before every replay: NPU graphs read
                    # host-side kernel lengths from them (runtime/npu_updates.py)
                    graph.capture(lambda: self.compiled(*static), static_inputs=[static[i] for i in self.copied], **self._pool_args())
            else:
                outs = graph.capture(lambda: self.compiled(*static))
        except Exception as e:  # out of memory, out of streams, an op that cannot be captured
            for i, t in saved.items():
                args[i].copy_(t)
            if self.config.debug:
                raise
            # contained by the graph (runtime/graphs.py: contained_capture): stream, pool
            # and RNG state are as before; the graph and what it recorded are dropped
            if self.streams is not None and is_stream_exhaustion(e):
                # the device has fewer streams than the budget said: no later capture fits
                self.streams.close(f"the device ran out of streams at {self.streams.used} ({type(e).__name__})")
                log.warning("capture of %s failed for want of streams (%s: %s); %s", name, type(e).__name__, e, STREAM_ADVICE)
                e = CaptureError(f"out of streams ({type(e).__name__}: {e})"[:160] + f"; {STREAM_ADVICE}")
            else:
                log.warning("capture of %s failed (%s: %s); serving continues without it", name, type(e).__name__, e)
            self._drop(key, bucket, name, e)
            entry.state = "failed"
            entry.graph = NoGraph()
            return (entry, outs) if real_call and self.use_graphs else None
        for i, t in saved.items():
            args[i].copy_(t)
        seconds = time.perf_counter() - start
        growth = pool_reserved_bytes(self.device) - before
        budget = self.config.memory_budget_bytes
        if budget is not None and self.use_graphs and self._pool_bytes + growth > budget:
            # measured, not estimated: the graph is released and its bucket leaves the plan
            log.warning("capture of %s needs %d pool bytes, over the budget of %d (%d used); dropped", name, growth, budget, self._pool_bytes)
            _stats.record_capture_failure(name, f"memory budget: {self._pool_bytes + growth} > {budget} bytes")
            self.failed.add(key)
            if bucket is not None and self.plan is not None:
                self.plan = self.plan.without(bucket)
            # the graph is not kept; the eager run served the call at its bucket
            return (entry, outs) if real_call else None
        self._pool_bytes += max(growth, 0)
        if self.streams is not None:
            self.streams.take(cost)
        entry.state = "captured"
        self.entries[key] = entry
        if self.use_graphs:
            _stats.record_capture(name, seconds, growth)
        else:
            # CPU: a bucket's compiled function is prepared (counted so counters match GPUs)
            _stats.record_capture(name, seconds, 0)
        return entry, outs

    def _pool_args(self) -> dict[str, Any]:
        """``pool=`` and ``stream=`` of a capture into the device's shared pool."""
        if self.pool is None:
            return {}
        return {"pool": self.pool.handle, "stream": self.pool.stream}

    def _drop(self, key: tuple, bucket: int | None, name: str, error: BaseException) -> None:
        _stats.record_capture_failure(name, f"{type(error).__name__}: {error}"[:400])
        self.failed.add(key)
        if bucket is not None and self.plan is not None:
            self.plan = self.plan.without(bucket)

    # -- graph memory, known before capture -----------------------------------------

    def _estimate(self, args: Sequence[Any], values: dict, others: tuple, found: list) -> Any:
        """Serve this call eagerly at its bucket, then trial-capture a few buckets
        (:func:`estimate_samples`), largest first as the warm-up does, into a throw-away
        pool and release them. The estimate is the pool's growth over those captures.

        Why not vLLM's ``first + (n - 1) * second``: with weak outputs a smaller graph
        reuses the blocks the larger ones freed, so the growth does not add up per graph;
        vLLM measures free device memory (which also counts each graph's driver-side
        executable), the runtime's figure is the allocator's pool, which does not."""
        if self.plan is None or not self.use_graphs:
            if self.plan is None:
                return self.compiled(*args)
            return self._eager_at_bucket(args, values, others)
        result = self._eager_at_bucket(args, values, others)  # also the lazy initialisation
        samples = estimate_samples(self.plan.sizes)
        api = graph_api(self.device)
        # a pool of its own (with its keeper graph: a failed trial capture must not leave
        # the id unusable for the next sample), dropped with the trial graphs
        trial = DevicePool(self.device, api)
        growths: list[int] = []
        graphs: list[DeviceGraph] = []
        gc.collect()
        for bucket in samples:
            key = (bucket,) + others
            b_args, b_values = self._truncate(args, values, bucket)
            pad = plan_padding(self.shapes, b_values, bucket, self.fia)
            static = self._make_static_args(key, b_args, pad)
            entry = GraphEntry(key=key, bucket=bucket, graph=NoGraph(), static_args=static)
            self._load_inputs(entry, b_args, pad)
            graph = new_graph(self.device, True)
            handle = trial.handle
            before = pool_reserved_bytes(self.device)
            try:
                with capture_guard(self.device, collect=False):
                    graph.capture(lambda: self.compiled(*static), static_inputs=[static[i] for i in self.copied], pool=handle, stream=trial.stream)
            except Exception as e:  # contained; the real capture of this bucket would fail too and drop it
                log.warning("trial capture of %s:%d failed (%s: %s); left out of the estimate", self.ctx.graph_id, bucket, type(e).__name__, e)
                continue
            growths.append(max(pool_reserved_bytes(self.device) - before, 0))
            graphs.append(graph)
        graph = None  # noqa: F841  (the last trial graph goes with the others)
        del graphs, trial
        gc.collect()
        api.empty_cache()  # the trial pool's segments go back to the device
        if not growths:
            return result
        found.append(RunnerEstimate(str(self.ctx.graph_id), growths[0], sum(growths[1:]), tuple(samples)))
        log.info("graph memory of %s: %d bytes first capture + %d over %d later samples %s", self.ctx.graph_id, growths[0], sum(growths[1:]), len(growths) - 1, samples)
        return result

    # -- outputs ---------------------------------------------------------------------

    def _finish(self, entry: GraphEntry, outs: Any, args: Sequence[Any], pad: PadPlan | None, clone: bool = True) -> Any:
        # mutated inputs that were copied in: write the real region back
        for i in self.copied:
            if i in self.mutated:
                src = entry.static_args[i]
                for d, n in enumerate(args[i].shape):
                    src = src.narrow(d, 0, n)
                args[i].copy_(src)
        seq = isinstance(outs, (list, tuple))
        items = list(outs) if seq else [outs]
        result = []
        for k, o in enumerate(items):
            cuts = pad.output_slices[k] if pad is not None and k < len(pad.output_slices) else None
            if isinstance(o, torch.Tensor):
                o = slice_output(o, cuts)
                if clone and self.use_graphs and self.config.clone_outputs:
                    o = o.clone()
            elif pad is not None and k < len(self.shapes.outputs) and self.shapes.outputs[k].kind == "symint":
                o = self.shapes.evaluate(self.shapes.outputs[k], pad.values)[0]
            result.append(o)
        if not seq:
            return result[0]
        return type(outs)(result) if isinstance(outs, tuple) else result


def stream_budget_applies(device: torch.device) -> bool:
    """Streams are a budgeted resource of NPU graphs (ACL); CUDA graphs hold none."""
    return device.type == "npu"


def _token_dim(shapes: Any, roles: dict[int, str]) -> sympy.Expr:
    """The token count: the longest batch-dependent leading dim of the copied inputs
    (``query_start_loc``'s ``R + 1`` aside). In a uniform MTP batch input_ids is ``(1+k)*s``
    and seq_lens ``s``; Dynamo may order either first, so the longest one is the tokens."""
    batch = shapes.batch_symbol
    dims = [shapes.inputs[i].dims[0] for i, role in roles.items() if role != "cu_len" and shapes.inputs[i].dims and batch in shapes.inputs[i].dims[0].free_symbols]
    if not dims:
        return batch
    # compare at a large batch with every other symbol at 1: the steepest expression wins
    at = {s: 1 for d in dims for s in d.free_symbols}
    at[batch] = 1 << 20
    return max(dims, key=lambda d: (int(d.subs(at)), str(d)))


def make_runner(compiled: Callable[..., Any], ctx: Any) -> Callable[..., Any]:
    """Wrap a compiled graph in the bucketed runner."""
    return BucketedRunner(compiled, ctx)
