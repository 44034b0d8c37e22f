"""Padding planner: substitution into sympy dims, pad values by role, output slices."""

import pytest
import sympy
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ascend_graph.capture.shapes import ValueShape, analyze_values
from ascend_graph.errors import PaddingError
from ascend_graph.runtime.padding import pad_into, plan_fia, plan_padding, role_for

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
    # query_start_loc of 2 requests / 4 tokens padded to 5 requests / 10 tokens: the FIA
    # plan's dummies hold the 6 padded tokens (2 each), so cu_q[-1] == 10 == T_pad
    plan = plan_fia(4, 2, 10, 5)
    pad_into(dst, torch.tensor([0, 3, 4]), "cu_len", torch.tensor(plan.cu_tail))
    assert dst.tolist() == [0, 3, 4, 6, 8, 10]
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


def test_fia_specs_find_uniform_batches_and_plan_padding_lays_out_dummies():
    from ascend_graph.runtime.padding import fia_specs

    k = 2
    info = _shapes(k)  # input_ids [3*s0], query_start_loc [s0 + 1]
    specs = fia_specs(info, {0: "zero", 2: "cu_len", 3: "zero"}, info.inputs[0].dims[0])
    assert len(specs) == 1 and specs[0].cu_input == 2 and specs[0].uniform_query_len == 3
    plan = plan_padding(info, {s0: 5, s1: 7}, bucket=8, fia=specs)
    fia = plan.fia[2]
    assert (fia.num_tokens, fia.padded_tokens, fia.num_reqs, fia.padded_reqs) == (15, 24, 5, 8)
    assert fia.dummy_query_lens == (3, 3, 3) and fia.cu_tail[-1] == 24  # T_pad == cu_q[-1]


def test_fia_specs_mixed_batch_without_request_padding_is_refused_before_capture():
    from ascend_graph.runtime.padding import fia_specs

    inputs = [
        ValueShape(0, "input_ids", "tensor", (s0,)),
        ValueShape(1, "query_start_loc", "tensor", (s1 + 1,)),
        ValueShape(2, "seq_lens", "tensor", (s1,)),
    ]
    info = analyze_values(inputs, [ValueShape(0, "out", "tensor", (s0,))])
    specs = fia_specs(info, {0: "zero", 1: "cu_len"}, s0)
    assert specs[0].uniform_query_len is None
    plan_padding(info, {s0: 8, s1: 3}, bucket=8, fia=specs)  # nothing padded: fine
    with pytest.raises(PaddingError) as e:
        plan_padding(info, {s0: 6, s1: 3}, bucket=8, fia=specs)
    assert "no dummy request" in str(e.value)
