"""Padding planner: substitution into sympy dims, pad values by role, output slices."""

import pytest
import sympy
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ascend_graph.capture.shapes import ValueShape, analyze_values
from ascend_graph.errors import PaddingError
from ascend_graph.runtime.padding import pad_into, plan_padding, role_for

s0, s1 = sympy.symbols("s0 s1", integer=True, positive=True)


def _shapes(k: int = 0):
    inputs = [
        ValueShape(0, "input_ids", "tensor", (s0 * (1 + k),)),
        ValueShape(1, "weight", "param", (sympy.Integer(16), sympy.Integer(8))),
        ValueShape(2, "query_start_loc", "tensor", (s0 + 1,)),
        ValueShape(3, "cache", "tensor", (s0, s1, sympy.Integer(4))),
    ]
    outputs = [ValueShape(0, "logits", "tensor", (s0 * (1 + k), sympy.Integer(8))), ValueShape(1, "n", "symint", (s0,))]
    return analyze_values(inputs, outputs)


def test_batch_symbol_is_dim0_of_first_tensor_input():
    info = _shapes()
    assert info.batch_symbol == s0
    assert info.other_symbols == (s1,)
    assert info.batch_inputs() == (0, 2, 3)


def test_mtp_token_dim_pads_by_substitution():
    k = 2
    info = _shapes(k)
    plan = plan_padding(info, {s0: 5, s1: 7}, bucket=8)
    assert plan.input_shapes[0] == (24,)  # 8 * (1 + 2), not 8
    assert plan.input_shapes[2] == (9,)
    assert plan.input_shapes[3] == (8, 7, 4)
    assert plan.output_slices[0] == ((0, 15),)


def test_bucket_smaller_than_batch_is_an_error():
    with pytest.raises(PaddingError) as e:
        plan_padding(_shapes(), {s0: 9, s1: 2}, bucket=8)
    assert e.value.expected == "a bucket >= 9" and e.value.got == 8


def test_pad_values_by_role():
    dst = torch.empty(6, dtype=torch.long)
    pad_into(dst, torch.tensor([5, 6, 7]), "slot")
    assert dst.tolist() == [5, 6, 7, -1, -1, -1]
    pad_into(dst, torch.tensor([3, 4, 9]), "kv_len")
    assert dst.tolist() == [3, 4, 9, 1, 1, 1]
    pad_into(dst, torch.tensor([0, 3, 4]), "cu_len")
    assert dst.tolist() == [0, 3, 4, 5, 6, 7]  # each dummy request holds one token
    m = torch.empty(4, dtype=torch.bool)
    pad_into(m, torch.tensor([True, True]), "mask")
    assert m.tolist() == [True, True, False, False]


def test_default_roles_by_name():
    assert role_for("slot_mapping", {}) == "slot"
    assert role_for("input_ids", {}) == "zero"
    assert role_for("slot_mapping", {"slot_mapping": "zero"}) == "zero"


@settings(max_examples=100, deadline=None)
@given(b=st.integers(1, 40), extra=st.integers(0, 20), s=st.integers(1, 9))
def test_padded_then_sliced_is_identity(b, extra, s):
    info = _shapes()
    plan = plan_padding(info, {s0: b, s1: s}, bucket=b + extra)
    src = torch.randn(b, s, 4)
    dst = torch.empty(plan.input_shapes[3])
    pad_into(dst, src, "zero")
    assert torch.equal(dst[:b], src)
    assert not dst[b:].any()
    from ascend_graph.runtime.padding import slice_output

    logits = torch.randn(b + extra, 8)
    assert slice_output(logits, plan.output_slices[0]).shape == (b, 8)
