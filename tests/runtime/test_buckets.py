"""Bucket planner: vLLM's default list, 1+k rounding, stream and memory budgets, select()."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ascend_graph.errors import ConfigError
from ascend_graph.runtime.buckets import (
    BucketPlan,
    default_sizes,
    graph_stream_cost,
    plan_buckets,
    round_to_multiple,
    trim_to_memory_budget,
    trim_to_stream_budget,
)


def test_default_list_is_vllms():
    sizes = default_sizes(512)
    assert sizes[:5] == [1, 2, 4, 8, 16]
    assert 248 in sizes and 256 in sizes and 264 not in sizes and 272 in sizes
    assert sizes[-1] == 512
    assert len(sizes) == 3 + 31 + 17


def test_default_list_cut_at_max():
    assert default_sizes(20) == [1, 2, 4, 8, 16]
    with pytest.raises(ConfigError):
        default_sizes(0)


def test_select_is_smallest_bucket_at_least_n():
    plan = BucketPlan((1, 2, 4, 8))
    assert [plan.select(n) for n in range(1, 10)] == [1, 2, 4, 4, 8, 8, 8, 8, None]


def test_speculative_rounding_to_one_plus_k():
    plan = plan_buckets([1, 2, 4, 8, 16], num_speculative_tokens=2)
    assert plan.sizes == (3, 6, 9, 18)
    assert plan.multiple_of == 3
    with pytest.raises(ConfigError, match="multiples of 3"):
        BucketPlan((3, 4), multiple_of=3)


def test_stream_budget_keeps_smallest_and_largest():
    sizes = default_sizes(512)
    cost = graph_stream_cost(num_layers=94, piecewise=True)  # Qwen3-235B: 95 streams a size
    kept = trim_to_stream_budget(sizes, 1800, cost)
    assert len(kept) == 1800 // 95
    assert kept[0] == 1 and kept[-1] == 512
    with pytest.raises(ConfigError, match="cannot hold even one graph"):
        trim_to_stream_budget(sizes, 50, cost)


def test_memory_budget_drops_largest_first():
    sizes = [1, 2, 4, 8, 16]
    assert trim_to_memory_budget(sizes, lambda s: s * 100, 850) == [1, 2, 4, 8]
    assert trim_to_memory_budget(sizes, {16: 10**9}, 10) == [1, 2, 4, 8]
    assert trim_to_memory_budget([4], lambda s: 10**9, 1) == [4]  # never empty


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 4096), min_size=1, max_size=80),
    k=st.integers(0, 4),
    budget=st.integers(1, 4000),
    cost=st.integers(1, 120),
)
def test_plan_invariants(sizes, k, budget, cost):
    if budget < cost:
        with pytest.raises(ConfigError):
            plan_buckets(sizes, num_speculative_tokens=k, stream_budget=budget, stream_cost=cost)
        return
    plan = plan_buckets(sizes, num_speculative_tokens=k, stream_budget=budget, stream_cost=cost)
    q = 1 + k
    assert list(plan.sizes) == sorted(set(plan.sizes))
    assert all(s % q == 0 and s >= 1 for s in plan.sizes)
    assert len(plan.sizes) <= budget // cost
    rounded = round_to_multiple(sizes, q)
    assert plan.sizes[-1] == rounded[-1]  # the largest is always kept
    if len(plan.sizes) > 1:
        assert plan.sizes[0] == rounded[0]  # and the smallest, when two fit
    for n in range(1, plan.largest + 1, max(1, plan.largest // 50)):
        b = plan.select(n)
        assert b is not None and b >= n
        assert all(s < n for s in plan.sizes if s < b)  # smallest that fits
    assert plan.select(plan.largest + 1) is None
