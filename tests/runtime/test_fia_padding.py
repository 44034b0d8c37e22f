"""The FIA padding planner: invariants under hypothesis, one test per error, the device
apply (static buffers, in-graph rule) and the padded MTP drafter batch."""

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ascend_graph.errors import PaddingError
from ascend_graph.runtime.buckets import plan_buckets
from ascend_graph.runtime.padding import (
    FIA_MAX_QUERY_LEN,
    FiaPlan,
    drafter_sample_indices,
    drafter_token_mask,
    fia_pad_metadata,
    mask_rejected_slots,
    pad_into,
    plan_drafter_batch,
    plan_fia,
)

MAXQ = FIA_MAX_QUERY_LEN


def _lens(cu):
    return [b - a for a, b in zip(cu, cu[1:])]


def _cumulative(query_lens):
    out = [0]
    for n in query_lens:
        out.append(out[-1] + n)
    return out


# --------------------------------------------------------------------------- plan_fia: invariants


@settings(max_examples=300, deadline=None)
@given(real=st.lists(st.integers(0, 40), max_size=12), dummies=st.integers(0, 12), tail=st.integers(0, 200))
def test_mixed_plan_invariants(real, dummies, tail):
    assume(not (tail and not dummies) and tail <= dummies * MAXQ)
    t, r = sum(real), len(real)
    plan = plan_fia(t, r, t + tail, r + dummies)
    cu = plan.query_start_loc(_cumulative(real))
    assert len(cu) == r + dummies + 1
    assert cu[-1] == t + tail  # T_pad == cu_q[-1]
    assert _lens(cu)[:r] == real  # real requests untouched
    dummy = _lens(cu)[r:]
    assert all(0 <= n <= MAXQ for n in dummy)  # at most 16 query tokens a dummy
    assert not dummy or max(dummy) - min(dummy) <= 1  # spread evenly
    assert all(n >= 1 for n in dummy) or tail < dummies  # empty only when there are fewer tokens than dummies


@settings(max_examples=300, deadline=None)
@given(q=st.integers(1, MAXQ), r=st.integers(0, 30), extra=st.integers(0, 30))
def test_uniform_plan_keeps_every_request_at_q_tokens(q, r, extra):
    plan = plan_fia(q * r, r, q * (r + extra), r + extra, uniform_query_len=q)
    cu = plan.query_start_loc([q * i for i in range(r + 1)])
    assert cu[-1] == q * (r + extra)
    assert _lens(cu) == [q] * (r + extra)


@settings(max_examples=300, deadline=None)
@given(r=st.integers(0, 10), dummies=st.integers(0, 10), tail=st.integers(0, 250))
def test_mixed_plan_is_refused_exactly_when_fia_cannot_run_it(r, dummies, tail):
    feasible = not (tail and not dummies) and tail <= dummies * MAXQ
    if feasible:
        plan_fia(3 * r, r, 3 * r + tail, r + dummies).check()
    else:
        with pytest.raises(PaddingError) as e:
            plan_fia(3 * r, r, 3 * r + tail, r + dummies)
        assert e.value.expected is not None and e.value.got is not None


# --------------------------------------------------------------------------- plan_fia: each error


def test_error_padded_batch_smaller_than_real():
    with pytest.raises(PaddingError) as e:
        plan_fia(10, 3, 8, 3)
    assert e.value.expected == ">= 10 tokens and >= 3 requests" and e.value.got == "8 tokens, 3 requests"


def test_error_tail_without_dummy_request():
    with pytest.raises(PaddingError) as e:
        plan_fia(10, 3, 16, 3)
    assert "no dummy request" in str(e.value) and "pad_roles" in e.value.hint


def test_error_more_than_16_tokens_a_dummy():
    with pytest.raises(PaddingError) as e:
        plan_fia(10, 3, 10 + 2 * MAXQ + 1, 5)
    assert e.value.expected == f"<= {2 * MAXQ} padded tokens ({MAXQ} per dummy request)" and e.value.got == 2 * MAXQ + 1


def test_error_uniform_query_len_above_fia_limit():
    q = MAXQ + 1
    with pytest.raises(PaddingError) as e:
        plan_fia(q, 1, 2 * q, 2, uniform_query_len=q)
    assert e.value.got == q


def test_error_uniform_batch_not_uniform():
    with pytest.raises(PaddingError) as e:
        plan_fia(7, 3, 12, 4, uniform_query_len=3)
    assert "exactly 3 tokens" in str(e.value) and "7 tokens / 3 requests" in e.value.got


@pytest.mark.parametrize(
    "plan, words",
    [
        (FiaPlan(4, 8, 2, 4, (2,)), "one query length per dummy"),
        (FiaPlan(4, 8, 2, 4, (2, 1)), "query_start_loc[-1]"),
        (FiaPlan(4, 40, 2, 4, (18, 18)), f"above FIA's {MAXQ}"),
        (FiaPlan(4, 9, 2, 4, (2, 3), uniform_query_len=2), "uniform decode"),
        (FiaPlan(4, 10, 2, 4, (1, 5)), "evenly"),
        (FiaPlan(4, 8, 2, 1, ()), "smaller than the real one"),
    ],
)
def test_check_names_each_broken_invariant(plan, words):
    with pytest.raises(PaddingError) as e:
        plan.check()
    assert words in str(e.value) and e.value.got is not None


def test_real_metadata_that_does_not_fit_the_plan_is_an_error():
    plan = plan_fia(6, 2, 9, 3, uniform_query_len=3)
    with pytest.raises(PaddingError):
        plan.query_start_loc([0, 3, 5])  # ends at 5, the plan says 6
    with pytest.raises(PaddingError) as e:
        plan.query_start_loc([0, 2, 6])  # not uniform
    assert e.value.got == [2, 4]


# --------------------------------------------------------------------------- device apply


def test_pad_into_writes_the_plan_tail_with_device_copies():
    plan = plan_fia(5, 2, 12, 4)  # 7 padded tokens over 2 dummies: 4 + 3
    dst = torch.full((5,), -7, dtype=torch.int32)
    pad_into(dst, torch.tensor([0, 2, 5], dtype=torch.int32), "cu_len", torch.tensor(plan.cu_tail, dtype=torch.int32))
    assert dst.tolist() == [0, 2, 5, 9, 12] and dst[-1] == 12


def test_pad_into_refuses_a_cu_len_without_a_plan():
    with pytest.raises(PaddingError) as e:
        pad_into(torch.empty(5, dtype=torch.int32), torch.tensor([0, 1, 2], dtype=torch.int32), "cu_len")
    assert e.value.expected == "a tail of 2 entries" and "plan_fia" in str(e.value)


@settings(max_examples=200, deadline=None)
@given(real=st.lists(st.integers(1, 20), min_size=1, max_size=8), dummies=st.integers(1, 8), tail=st.integers(0, 128), kv0=st.integers(0, 3))
def test_in_graph_rule_fixes_vllm_style_padding_like_the_planner(real, dummies, tail, kv0):
    """vLLM pads query_start_loc by repeating its last value and seq_lens with 0; the in-graph
    rule turns that into the planner's layout (same dummy sizes), KV lengths >= 1."""
    assume(tail <= dummies * MAXQ)
    t, r = sum(real), len(real)
    cu = torch.tensor(_cumulative(real) + [t] * dummies, dtype=torch.int32)
    kv = torch.tensor([n + 5 for n in real] + [kv0] * dummies, dtype=torch.int32)
    new_cu, new_kv = fia_pad_metadata(cu, kv, t + tail)
    assert new_cu.dtype == cu.dtype and new_kv.dtype == kv.dtype
    assert new_cu.tolist() == plan_fia(t, r, t + tail, r + dummies).query_start_loc(_cumulative(real))
    assert new_cu[-1] == t + tail
    assert new_kv[:r].tolist() == kv[:r].tolist() and (new_kv[r:] >= 1).all()


@settings(max_examples=100, deadline=None)
@given(real=st.lists(st.integers(0, 20), max_size=8), dummies=st.integers(0, 6), tail=st.integers(0, 90))
def test_in_graph_rule_is_identity_on_planned_metadata(real, dummies, tail):
    assume(not (tail and not dummies) and tail <= dummies * MAXQ)
    t, r = sum(real), len(real)
    cu = torch.tensor(plan_fia(t, r, t + tail, r + dummies).query_start_loc(_cumulative(real)), dtype=torch.int32)
    kv = torch.ones(r + dummies, dtype=torch.int32)
    new_cu, new_kv = fia_pad_metadata(cu, kv, t + tail)
    assert torch.equal(new_cu, cu) and torch.equal(new_kv, kv)


# --------------------------------------------------------------------------- MTP drafter batch


@settings(max_examples=200, deadline=None)
@given(k=st.integers(0, 7), r=st.integers(1, 60), base=st.lists(st.integers(1, 200), min_size=1, max_size=10))
def test_drafter_batches_are_uniform_and_bucketed_in_multiples_of_1_plus_k(k, r, base):
    q = 1 + k
    buckets = plan_buckets(base, num_speculative_tokens=k).sizes  # the bucket planner's 1+k rounding, reused
    plan = plan_drafter_batch(r, k, buckets)
    if r * q > max(buckets):
        assert plan is None
        return
    assert plan.bucket_tokens % q == 0 and plan.bucket_tokens >= r * q
    assert plan.bucket_tokens == min(b for b in buckets if b >= r * q)
    assert plan.padded_reqs * q == plan.bucket_tokens
    cu = plan.fia.query_start_loc([q * i for i in range(r + 1)])
    assert _lens(cu) == [q] * plan.padded_reqs and cu[-1] == plan.bucket_tokens


def test_drafter_buckets_not_multiples_of_1_plus_k_are_an_error():
    with pytest.raises(PaddingError) as e:
        plan_drafter_batch(2, 2, [3, 8, 12])
    assert e.value.got == [8] and e.value.expected == "multiples of 3"


@settings(max_examples=100, deadline=None)
@given(q=st.integers(1, 6), valid=st.lists(st.integers(0, 6), min_size=1, max_size=10))
def test_rejected_tokens_are_masked_and_the_last_valid_one_is_sampled(q, valid):
    valid = [min(v, q) for v in valid]
    nv = torch.tensor(valid, dtype=torch.int32)
    mask = drafter_token_mask(nv, q)
    assert mask.tolist() == [j < v for v in valid for j in range(q)]
    idx = drafter_sample_indices(nv, q)
    assert idx.tolist() == [r * q + max(v - 1, 0) for r, v in enumerate(valid)]
    slots = torch.arange(len(valid) * q)
    masked = mask_rejected_slots(slots, mask)
    assert masked.tolist() == [s if m else -1 for s, m in zip(slots.tolist(), mask.tolist())]


def test_drafter_helpers_trace_into_a_graph_without_host_sync():
    """No .item()/.tolist(): the helpers trace symbolically (a host sync would not)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def step(num_valid, slots):
        m = drafter_token_mask(num_valid, 3)
        return mask_rejected_slots(slots, m), drafter_sample_indices(num_valid, 3)

    gm = make_fx(step, tracing_mode="symbolic")(torch.tensor([1, 3], dtype=torch.int32), torch.arange(6))
    out = gm(torch.tensor([2, 0, 3], dtype=torch.int32), torch.arange(9))
    assert out[0].tolist() == [0, 1, -1, -1, -1, -1, 6, 7, 8] and out[1].tolist() == [1, 3, 8]
    gm2 = make_fx(lambda cu, kv, t: fia_pad_metadata(cu, kv, t.shape[0]), tracing_mode="symbolic")(
        torch.tensor([0, 2, 2], dtype=torch.int32), torch.tensor([3, 0], dtype=torch.int32), torch.empty(5)
    )
    cu, kv = gm2(torch.tensor([0, 1, 4, 4, 4], dtype=torch.int32), torch.tensor([2, 6, 0, 0], dtype=torch.int32), torch.empty(9))
    assert cu.tolist() == [0, 1, 4, 7, 9] and kv.tolist() == [2, 6, 1, 1]
