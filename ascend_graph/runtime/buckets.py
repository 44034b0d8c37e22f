"""Bucket planner: which batch sizes get a device graph. Pure functions, no torch.

Entry points: :func:`plan_buckets` (the whole policy) and :class:`BucketPlan.select`.

Policy, in order (DESIGN.md "Runtime", reference/anchors.md section 3):

1. the list: the user's, or vLLM's default ``[1, 2, 4] + 8..248 step 8 + 256..max step 16``
   (sizes above ``max_size`` dropped);
2. speculative decoding with k tokens: every size rounded up to a multiple of ``1+k``
   (a uniform decode batch of r requests has r*(1+k) tokens; vLLM issue #28207). Sizes
   count tokens; where a graph's batch symbol counts requests (its token dim is
   ``(1+k)*s``), the runner turns them into request buckets with
   :meth:`BucketPlan.in_units_of` (token buckets 3, 6, 12 -> 1, 2, 4 requests), so an MTP
   verify or drafter batch pads to a multiple of 1+k tokens either way;
3. NPU stream budget: a device has about 2048 streams (fewer on a soft-partitioned
   device: the ``stream_budget`` option). What one captured graph costs is counted from
   the graph itself (:func:`count_graph_streams`: its capture stream, each side stream a
   multi-stream scope forks, each communication group its collectives use), not from a
   formula over the model; when the list does not fit, keep the smallest and the largest
   and sample the rest evenly (vllm-ascend's ``update_aclgraph_sizes``). At capture time
   a device-wide :class:`StreamLedger` holds every compiled function to one budget, and
   a capture that fails for want of streams (:func:`is_stream_exhaustion`) closes it;
4. memory budget: given measured pool bytes per bucket, drop the largest buckets until
   the largest kept fits (with one shared pool the largest bucket dominates).

Invariants of a plan: sizes strictly increasing, all >= 1, all multiples of
``multiple_of``; never empty.
"""

from __future__ import annotations

import ast
import bisect
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

from ..errors import ConfigError

__all__ = [
    "BucketPlan",
    "default_sizes",
    "round_to_multiple",
    "trim_to_stream_budget",
    "trim_to_memory_budget",
    "graph_stream_cost",
    "plan_buckets",
    "DEFAULT_STREAM_BUDGET",
    "GraphStreams",
    "count_graph_streams",
    "StreamLedger",
    "is_stream_exhaustion",
    "STREAM_ADVICE",
]

#: streams usable for graphs on one NPU: about 2048, less what HCCL and the runtime keep
#: (vllm-ascend kept 248 spare: MAX_CAPTURE_SIZE = 1800)
DEFAULT_STREAM_BUDGET = 1800


def default_sizes(max_size: int) -> list[int]:
    """vLLM's default capture sizes up to ``max_size``."""
    if max_size < 1:
        raise ConfigError("max batch must be >= 1", expected=">= 1", got=max_size)
    sizes = [1, 2, 4] + list(range(8, 256, 8)) + list(range(256, max_size + 1, 16))
    return [s for s in sizes if s <= max_size]


def round_to_multiple(sizes: Sequence[int], multiple: int) -> list[int]:
    """Round each size up to a multiple of ``multiple``; sorted, without duplicates."""
    if multiple < 1:
        raise ConfigError("multiple must be >= 1", expected=">= 1", got=multiple)
    return sorted({-(-s // multiple) * multiple for s in sizes})


def graph_stream_cost(num_layers: int, piecewise: bool) -> int:
    """Streams one captured batch size costs on an NPU: layers+1 piecewise, 1 full graph."""
    return num_layers + 1 if piecewise else 1


def trim_to_stream_budget(sizes: Sequence[int], budget: int, cost_per_size: int) -> list[int]:
    """At most ``budget // cost_per_size`` sizes: smallest and largest kept, the rest sampled evenly."""
    sizes = sorted(set(sizes))
    if cost_per_size < 1:
        raise ConfigError("stream cost per graph must be >= 1", expected=">= 1", got=cost_per_size)
    n = budget // cost_per_size
    if n < 1:
        raise ConfigError(
            "the stream budget cannot hold even one graph",
            expected=f"a budget >= {cost_per_size} streams (one graph of this model)",
            got=budget,
            hint="capture full graphs instead of piecewise ones, or raise the stream budget",
        )
    if len(sizes) <= n:
        return sizes
    if n == 1:
        return [sizes[-1]]
    last = len(sizes) - 1
    picks = {round(i * last / (n - 1)) for i in range(n)}
    return [sizes[i] for i in sorted(picks)]


def trim_to_memory_budget(sizes: Sequence[int], pool_bytes: Mapping[int, int] | Callable[[int], int], budget: int) -> list[int]:
    """Drop the largest sizes until the largest kept needs at most ``budget`` pool bytes.

    ``pool_bytes`` gives a size's measured (or estimated) pool growth when captured
    alone. With one shared pool, captured largest first, the pool holds about the
    largest bucket's bytes; smaller buckets reuse them. The smallest size is always kept.
    """
    sizes = sorted(set(sizes))
    get = pool_bytes if callable(pool_bytes) else (lambda s: pool_bytes.get(s, 0))
    while len(sizes) > 1 and get(sizes[-1]) > budget:
        sizes.pop()
    return sizes


# --------------------------------------------------------------------------- streams a graph uses

#: namespaces whose ops are collectives (each group's collectives run on HCCL's own stream)
_COMM_NAMESPACES = ("_c10d_functional", "c10d_functional", "c10d")
#: torch_npu MoE dispatch/combine over an EP group (``group_ep``/``group_tp`` keywords)
_COMM_OPS = ("npu_moe_distribute_dispatch", "npu_moe_distribute_combine")
#: attention ops whose kernels take host lengths: captured as task groups, patched per replay
_FIA_OPS = ("ascend_graph.paged_attention", "npu.npu_fused_infer_attention_score")


@dataclass(frozen=True)
class GraphStreams:
    """What one captured graph holds of a device's streams.

    ``user_streams``: labels of the side streams multi-stream scopes fork
    (TorchAir's ``npu_stream_switch``: ``air.scope_enter`` with ``_user_stream_label``);
    ``comm_groups``: communication groups the graph's collectives use (HCCL runs each
    group's captured collectives on a stream of its own); ``fia_tasks``: attention calls
    captured as task groups (they share the device's one update stream, so they cost no
    stream a graph, but the count says why a graph has them).
    """

    user_streams: frozenset[str] = frozenset()
    comm_groups: frozenset[str] = frozenset()
    fia_tasks: int = 0

    def cost(self, comm_streams_per_group: int = 1) -> int:
        """Streams one capture of the graph takes: its capture stream, its side streams,
        and ``comm_streams_per_group`` for each communication group (1 with HCCL's AIV or
        FFTS+ expansion; the AICPU expansion of A3 devices may take up to rank_size - 1)."""
        return 1 + len(self.user_streams) + len(self.comm_groups) * comm_streams_per_group


def _op_name(func: ast.expr) -> str | None:
    """``torch.ops.ns.op.overload`` or ``torch.ops.ns.op`` -> ``"ns.op"``."""
    parts: list[str] = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return None
    parts.append(func.id)
    parts.reverse()
    if parts[:2] != ["torch", "ops"] or len(parts) < 4:
        return None
    return f"{parts[2]}.{parts[3]}"


def _constants(call: ast.Call) -> Iterable[tuple[str | None, object]]:
    """(keyword or None, value) of the call's literal arguments."""
    for a in call.args:
        try:
            yield None, ast.literal_eval(a)
        except (ValueError, SyntaxError, TypeError):
            continue
    for k in call.keywords:
        try:
            yield k.arg, ast.literal_eval(k.value)
        except (ValueError, SyntaxError, TypeError):
            continue


def count_graph_streams(code: str) -> GraphStreams:
    """Count the streams a graph uses from its code (``GraphModule.code``, the post-pass
    ATen graph the runtime captures; the graph cache keeps it, so a cache hit counts the same)."""
    users: set[str] = set()
    groups: set[str] = set()
    fia = 0
    for node in ast.walk(ast.parse(code or "")):
        if not isinstance(node, ast.Call):
            continue
        name = _op_name(node.func)
        if name is None:
            continue
        ns, op = name.split(".", 1)
        consts = list(_constants(node))
        if name == "air.scope_enter":
            for _, v in consts:
                label = dict(p for p in v if isinstance(p, tuple) and len(p) == 2).get("_user_stream_label") if isinstance(v, (list, tuple)) else None
                if label is not None:
                    users.add(str(label))
        elif ns in _COMM_NAMESPACES or any(op.startswith(c) for c in _COMM_OPS):
            named = [str(v) for k, v in consts if k is not None and k.startswith("group") and isinstance(v, str)]
            positional = [str(v) for k, v in consts if k is None and isinstance(v, str)]
            groups.update(named or positional[-1:] or ["default"])
        elif any(name.startswith(f) for f in _FIA_OPS):
            fia += 1
    return GraphStreams(frozenset(users), frozenset(groups), fia)


@dataclass
class StreamLedger:
    """Streams a device's graphs hold, against the budget (one ledger a device: every
    compiled function's graphs draw from it). ``closed``: why no capture may take more."""

    budget: int
    used: int = 0
    closed: str | None = None
    graphs: int = field(default=0)

    def fits(self, cost: int) -> bool:
        return self.closed is None and self.used + cost <= self.budget

    def take(self, cost: int) -> None:
        self.used += cost
        self.graphs += 1

    def release(self, cost: int) -> None:
        """A graph was let go (recaptured elsewhere): its streams are free again."""
        self.used = max(self.used - cost, 0)
        self.graphs = max(self.graphs - 1, 0)

    def close(self, reason: str) -> None:
        """The device ran out before the budget did: the budget was too high for it."""
        self.closed = reason


#: ACL runtime errors of a device out of streams, queues or events: 207005 resource
#: alloc fail, 207007 no event resource, 207008 no stream resource (and the messages
#: CANN prints with them: "Alloc sq cq fail", "New capture stream failed")
_STREAM_ERRORS = re.compile(
    r"\b20700[578]\b|no (?:stream|event) resource|alloc sq cq fail|new capture stream failed|create capture stream failed|insufficient available streams|resource alloc fail",
    re.IGNORECASE,
)

STREAM_ADVICE = (
    "the device has no streams or queues left for another graph; set "
    "options={'stream_budget': N} to the streams this process may use (a soft-partitioned "
    "device has fewer than the default %d), or capture fewer buckets" % DEFAULT_STREAM_BUDGET
)


def is_stream_exhaustion(error: BaseException | str) -> bool:
    """Whether a capture failed because the device ran out of streams, queues or events."""
    return bool(_STREAM_ERRORS.search(str(error)))


@dataclass(frozen=True)
class BucketPlan:
    """Sorted batch-size buckets; :meth:`select` maps a batch to its bucket."""

    sizes: tuple[int, ...]
    multiple_of: int = 1

    def __post_init__(self) -> None:
        if not self.sizes:
            raise ConfigError("a bucket plan needs at least one size", expected="a non-empty list", got=list(self.sizes))
        if list(self.sizes) != sorted(set(self.sizes)) or self.sizes[0] < 1:
            raise ConfigError("bucket sizes must be positive and strictly increasing", expected="e.g. (1, 2, 4, 8)", got=list(self.sizes))
        bad = [s for s in self.sizes if s % self.multiple_of]
        if bad:
            raise ConfigError(f"bucket sizes must be multiples of {self.multiple_of} (1 + speculative tokens)", expected=f"multiples of {self.multiple_of}", got=bad)

    @property
    def largest(self) -> int:
        return self.sizes[-1]

    def select(self, n: int) -> int | None:
        """The smallest bucket >= n, or None when n is above the largest."""
        i = bisect.bisect_left(self.sizes, n)
        return self.sizes[i] if i < len(self.sizes) else None

    def in_units_of(self, per_item: int) -> "BucketPlan":
        """The same buckets counted in items of ``per_item`` rows each (token buckets of an
        MTP batch, multiples of 1+k, as request buckets: ``(3, 6, 12) -> (1, 2, 4)``)."""
        bad = [s for s in self.sizes if s % per_item]
        if per_item < 1 or bad:
            raise ConfigError(f"buckets are not whole multiples of {per_item}", expected=f"multiples of {per_item}", got=bad or per_item)
        return BucketPlan(tuple(s // per_item for s in self.sizes), 1)

    def without(self, size: int) -> "BucketPlan | None":
        rest = tuple(s for s in self.sizes if s != size)
        return BucketPlan(rest, self.multiple_of) if rest else None


def plan_buckets(
    sizes: Sequence[int] | None = None,
    *,
    max_size: int = 256,
    num_speculative_tokens: int = 0,
    stream_budget: int | None = None,
    stream_cost: int = 1,
    pool_bytes: Mapping[int, int] | Callable[[int], int] | None = None,
    memory_budget: int | None = None,
) -> BucketPlan:
    """The whole policy: list -> round to 1+k -> stream budget -> memory budget."""
    base = sorted(set(sizes)) if sizes else default_sizes(max_size)
    if any(s < 1 for s in base):
        raise ConfigError("bucket sizes must be >= 1", expected="positive integers", got=list(base))
    q = 1 + num_speculative_tokens
    out = round_to_multiple(base, q)
    if stream_budget is not None:
        out = trim_to_stream_budget(out, stream_budget, stream_cost)
    if memory_budget is not None and pool_bytes is not None:
        out = trim_to_memory_budget(out, pool_bytes, memory_budget)
    return BucketPlan(tuple(out), q)
