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


def _size_reads(gm):
    return [n for n in gm.graph.nodes if n.target is aten.sym_size.int]


def test_size_reads_off_intermediates_are_rebuilt_from_the_inputs():
    # the gated delta rule's chunk count under dynamic shapes: (T + Mod(64 - Mod(T, 64), 64)) // 64,
    # read off the padded view (a user of a node inside the region), rebuilt from x's size
    import torch.nn.functional as F

    from ascend_graph.passes.cleanup import hoist_size_reads

    def f(x):
        y = F.pad(x, (0, 0, 0, (64 - x.shape[0] % 64) % 64)).view(-1, 64, x.shape[1])
        return y.sum(1) * y.shape[0], torch.cat([x, x]).new_zeros(2 * x.shape[0] + 1)

    gm = make_fx(f, tracing_mode="symbolic")(torch.randn(100, 3))
    inner = [n for n in _size_reads(gm) if n.args[0].op != "placeholder"]
    assert inner, "the trace reads no size off an intermediate: the test no longer tests anything"
    moved = hoist_size_reads(gm.graph)
    gm.graph.lint()
    gm.recompile()
    assert moved == len(inner)
    assert all(n.args[0].op == "placeholder" for n in _size_reads(gm))
    for rows in (1, 64, 100, 130):
        x = torch.randn(rows, 3)
        for got, want in zip(gm(x), f(x)):
            torch.testing.assert_close(got, want)


def test_size_reads_of_other_expressions_stay():
    from ascend_graph.passes.cleanup import hoist_size_reads

    def f(x):
        y = x[x > 0]  # an unbacked size: not an expression of the inputs' symbols
        return y.new_zeros(y.shape[0])

    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        gm = make_fx(f, tracing_mode="symbolic")(torch.randn(10))
    before = len(_size_reads(gm))
    assert hoist_size_reads(gm.graph) == 0 and len(_size_reads(gm)) == before
