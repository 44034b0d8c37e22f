"""Cleanup rules, each with a negative case."""

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from ascend_graph.passes.cleanup import NoOpElimination

aten = torch.ops.aten


def targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def run(f, *args):
    gm = make_fx(f)(*args)
    ref = gm(*args)
    n = NoOpElimination()(gm.graph)
    gm.graph.lint()
    gm.recompile()
    torch.testing.assert_close(gm(*args), ref)
    return n, gm


def test_identity_permute_and_full_slice_go():
    n, gm = run(lambda x: x.permute(0, 1)[:, 0:100].relu(), torch.randn(3, 5))
    assert n == 2
    assert targets(gm) == [aten.relu.default]


def test_real_reshape_and_permute_stay():
    n, gm = run(lambda x: x.reshape(5, 3).permute(1, 0).relu(), torch.randn(3, 5))
    assert n == 0


def test_clone_of_placeholder_returned_stays():
    n, gm = run(lambda x: x.clone(), torch.randn(4))
    assert n == 0  # removing it would alias the output to the input


def test_clone_with_memory_format_stays():
    n, _ = run(lambda x: x.t().clone(memory_format=torch.contiguous_format).view(-1), torch.randn(3, 5))
    assert n == 0


def test_cast_to_same_dtype_goes_other_dtype_stays():
    n, gm = run(lambda x: torch.ops.prims.convert_element_type(x, torch.float32) + 1, torch.randn(4))
    assert n == 1
    n, gm = run(lambda x: torch.ops.prims.convert_element_type(x, torch.float16) + 1, torch.randn(4))
    assert n == 0
