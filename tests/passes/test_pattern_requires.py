"""``Fusion.requires``: a row is traced only for graphs that hold the ops it names.

Skipping a row is safe only if its pattern really contains those ops (a graph without
one cannot match it), so every attention row is traced here and held to its ``requires``;
and the pass builds only the rows a graph can match (attention's 94 rows took 4.5 s of
each process's first compile)."""

from __future__ import annotations

import pytest
import torch
import torch.fx

from ascend_graph.passes import pattern as pat
from ascend_graph.passes.fusion import attention, norm_rope
from ascend_graph.passes.pattern import Fusion, PatternPass

aten = torch.ops.aten


def _traced_targets(f: Fusion) -> set:
    return {n.target for n in pat.traced_pattern(f).graph.nodes if n.op == "call_function"}


_ROWS = [(table, i) for table in (attention, norm_rope) for i in range(len(table.FUSIONS))]


@pytest.mark.parametrize("table,i", _ROWS, ids=[t.FUSIONS[i].name for t, i in _ROWS])
def test_every_row_contains_the_ops_it_requires(table, i):
    f = table.FUSIONS[i]
    assert f.requires, f"{f.name}: every attention and norm/RoPE row names the ops it needs"
    missing = [t for t in f.requires if t not in _traced_targets(f)]
    assert not missing, f"{f.name}: requires {missing}, which its traced pattern does not hold"


def _mul_pattern(x, y):
    return torch.relu(x * y)


def _mul_replacement(x, y):
    return torch.relu(y * x)


def _inputs():
    return [torch.empty(4, 4), torch.empty(4, 4)]


def _row(name: str, requires: tuple) -> Fusion:
    return Fusion(name=name, pattern=_mul_pattern, replacement=_mul_replacement, example_inputs=_inputs, requires=requires)


def _graph(with_relu: bool) -> torch.fx.GraphModule:
    def fn(x, y):
        z = x * y
        return torch.relu(z) if with_relu else z + 1

    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(fn, tracing_mode="fake")(*_inputs())


def test_rows_for_keeps_only_rows_the_graph_can_match():
    needs_relu, needs_bmm = _row("relu", (aten.relu.default, aten.mul.Tensor)), _row("bmm", (aten.bmm.default,))
    free = _row("free", ())
    p = PatternPass("t", "t", (needs_relu, needs_bmm, free))
    assert p.rows_for(_graph(True).graph) == (needs_relu, free)
    assert p.rows_for(_graph(False).graph) == (free,)


def test_a_row_that_cannot_match_is_never_traced(monkeypatch):
    built: list[tuple[str, ...]] = []
    real = pat._build

    def spy(fusions, name):
        built.append(tuple(f.name for f in fusions))
        return real(fusions, name)

    monkeypatch.setattr(pat, "_build", spy)
    gm = _graph(with_relu=True)
    p = PatternPass("t", "t", (_row("relu_requires", (aten.relu.default,)), _row("bmm_requires", (aten.bmm.default,))))
    assert p(gm.graph) == 1  # the relu row fused
    assert built == [("relu_requires",)]
    # a graph none of the rows can match traces nothing
    built.clear()
    p2 = PatternPass("t", "t", (_row("bmm_only", (aten.bmm.default,)),))
    assert p2(_graph(with_relu=False).graph) == 0
    assert built == []


@pytest.mark.parametrize(
    "i",
    [i for i, f in enumerate(attention.FUSIONS) if f.requires_path is not None],
    ids=[f.name for f in attention.FUSIONS if f.requires_path is not None],
)
def test_every_attention_row_holds_the_path_it_requires(i):
    f = attention.FUSIONS[i]
    assert f.requires_path.holds(pat.traced_pattern(f).graph), f"{f.name}: its traced pattern lacks {f.requires_path}"


def _router_and_bmm(x, w, a, b):
    # a router's softmax (to top-k) and an unrelated bmm: both ops, no chain between them
    probs = torch.softmax(x @ w, dim=-1)
    _, ids = torch.topk(probs, 2, dim=-1)
    return ids, torch.bmm(a, b)


def _softmax_into_bmm(q, k, v):
    return torch.bmm(torch.softmax(torch.bmm(q, k), dim=-1), v)


def test_a_path_rules_out_rows_whose_ops_are_present_but_not_joined():
    from torch.fx.experimental.proxy_tensor import make_fx

    from ascend_graph.capture.trace import decompositions

    router = make_fx(_router_and_bmm, decompositions())(torch.randn(5, 8), torch.randn(8, 4), torch.randn(2, 3, 4), torch.randn(2, 4, 3))
    eager = make_fx(_softmax_into_bmm, decompositions())(torch.randn(2, 5, 8), torch.randn(2, 8, 5), torch.randn(2, 5, 8))
    path = attention._SOFTMAX_TO_BMM
    targets = {n.target for n in router.graph.nodes}
    assert aten.amax.default in targets and aten.bmm.default in targets
    assert not path.holds(router.graph)
    assert path.holds(eager.graph)
    p = PatternPass("t", "t", attention.FUSIONS)
    assert not any(f.requires_path is path for f in p.rows_for(router.graph))
    assert any(f.requires_path is path for f in p.rows_for(eager.graph))
