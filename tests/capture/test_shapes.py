"""Shape analysis of Dynamo graphs: batch symbol, other symbols, expressions."""

import pytest
import sympy
import torch

from ascend_graph.capture.shapes import analyze_graph
from ascend_graph.errors import ConfigError


def capture(f, *args, **kw):
    seen = {}

    def backend(gm, example_inputs):
        seen["info"] = analyze_graph(gm, example_inputs, **kw)
        return gm.forward

    torch._dynamo.reset()
    cf = torch.compile(f, backend=backend, dynamic=True)
    cf(*args)
    return seen["info"]


def test_batch_is_dim0_of_first_tensor_input_and_outputs_follow():
    info = capture(lambda ids, h: (ids.float().unsqueeze(-1) * h).reshape(-1, 4), torch.zeros(3, 5, dtype=torch.long), torch.randn(5, 4))
    b = info.batch_symbol
    assert b is not None
    tensors = [v for v in info.inputs if v.kind == "tensor"]
    assert tensors[0].batch_dims(b) == (0,)
    assert tensors[1].batch_dims(b) == ()
    out = info.outputs[0]
    assert b in out.dims[0].free_symbols and len(out.dims[0].free_symbols) == 2  # s_b * s_seq
    assert len(info.other_symbols) >= 1


def test_batch_input_by_name():
    info = capture(lambda a, b: a.sum() + b.sum(0), torch.randn(3, 2), torch.randn(7, 2), batch_input="b")
    bv = [v for v in info.inputs if v.name == "b"][0]
    assert bv.dims[0] == info.batch_symbol


def test_bad_batch_input_names_the_inputs():
    with pytest.raises(Exception) as e:
        capture(lambda a: a + 1, torch.randn(3), batch_input="tokens")
    inner = getattr(e.value, "inner_exception", None) or e.value.__cause__
    assert isinstance(inner, ConfigError)
    assert "tokens" in str(inner) and "'a'" in str(inner)


def test_static_graph_has_no_batch_symbol():
    seen = {}

    def backend(gm, ex):
        seen["info"] = analyze_graph(gm, ex)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(lambda x: x * 2, backend=backend, dynamic=False)(torch.randn(4))
    assert seen["info"].batch_symbol is None and not seen["info"].is_dynamic
