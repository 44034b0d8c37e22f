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
3. NPU stream budget: a device has about 2048 streams; a full graph costs 1, a
   piecewise graph ``layers + 1``; when the list does not fit, keep the smallest and the
   largest and sample the rest evenly (vllm-ascend's ``update_aclgraph_sizes``);
4. memory budget: given measured pool bytes per bucket, drop the largest buckets until
   the largest kept fits (with one shared pool the largest bucket dominates).

Invariants of a plan: sizes strictly increasing, all >= 1, all multiples of
``multiple_of``; never empty.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

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
