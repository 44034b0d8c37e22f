"""passes/fusion/causal_conv.py: the HF fallbacks fuse into the causal conv ops; look-alikes do not."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from ascend_graph.capture.trace import decompositions
from ascend_graph.config import AscendConfig
from ascend_graph.passes.fusion import causal_conv as fusion

aten = torch.ops.aten
C, K = 24, 4


def _trace(fn, *args):
    with torch.no_grad():
        return make_fx(fn, decomposition_table=decompositions(), tracing_mode="fake")(*args)


def _run_pass(gm):
    p = fusion.make_pass(AscendConfig())
    n = p(gm.graph)
    gm.graph.lint()
    gm.recompile()
    return n


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def hf_prefill(x, w, b, act):  # transformers' causal_conv1d_fn
    out = F.conv1d(x, w.unsqueeze(1), b, padding=w.shape[-1] - 1, groups=x.shape[1])[:, :, : x.shape[-1]]
    return F.silu(out) * 2 if act else out * 2


def hf_update(x, state, w, b):  # transformers' causal_conv1d_update, state returned (functional)
    cat = torch.cat([state, x], dim=-1)
    new_state = cat[:, :, -state.shape[-1]:]
    out = F.conv1d(cat, w.unsqueeze(1), b, padding=0, groups=x.shape[1])[:, :, -x.shape[-1]:]
    return F.silu(out) + 1, new_state


def gemma_update(x, state, w3, b):  # RecurrentGemma's sum form
    cat = torch.cat((state, x), -1)
    out = torch.sum(cat * w3[:, 0, :], dim=-1) + b
    return out.unsqueeze(-1) * 3, cat[:, :, 1:]


@pytest.mark.parametrize("bias,act", [(False, True), (True, True), (True, False), (False, False)])
def test_prefill_fuses(bias, act):
    x, w = torch.randn(3, C, 13), torch.randn(C, K)
    b = torch.randn(C) if bias else None
    gm = _trace(lambda x, w, b: hf_prefill(x, w, b, act), x, w, b)
    assert aten.convolution.default in _targets(gm)
    assert _run_pass(gm) == 1
    targets = _targets(gm)
    assert aten.convolution.default not in targets and aten.sigmoid.default not in targets
    assert torch.ops.ascend_graph.causal_conv1d.default in targets
    torch.testing.assert_close(gm(x, w, b), hf_prefill(x, w, b, act))


@pytest.mark.parametrize("L,S", [(1, K), (1, K - 1), (3, K)])
def test_update_fuses_cat_form(L, S):
    x, state, w, b = torch.randn(5, C, L), torch.randn(5, C, S), torch.randn(C, K), torch.randn(C)
    gm = _trace(hf_update, x, state, w, b)
    assert _run_pass(gm) == 1
    targets = _targets(gm)
    assert aten.convolution.default not in targets and aten.cat.default not in targets
    assert torch.ops.higher_order.auto_functionalized in targets
    out, new_state = gm(x, state, w, b)
    ref_out, ref_state = hf_update(x, state, w, b)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(new_state, ref_state)


def test_update_fuses_sum_form():
    x, state, w3, b = torch.randn(2, C, 1), torch.randn(2, C, K - 1), torch.randn(C, 1, K), torch.randn(C)
    gm = _trace(gemma_update, x, state, w3, b)
    assert _run_pass(gm) == 1
    assert aten.sum.dim_IntList not in _targets(gm)
    for got, ref in zip(gm(x, state, w3, b), gemma_update(x, state, w3, b)):
        torch.testing.assert_close(got, ref)


def _not_causal(x, w):  # padding K-1 but the slice keeps the end: anti-causal
    return F.conv1d(x, w.unsqueeze(1), None, padding=K - 1, groups=C)[:, :, -x.shape[-1]:]


def _same_padding(x, w):  # padding 1 != K-1: a centred conv
    return F.conv1d(x, w.unsqueeze(1), None, padding=1, groups=C)[:, :, : x.shape[-1]]


def _not_depthwise(x, w2):  # groups 2 != C
    return F.conv1d(x, w2, None, padding=K - 1, groups=2)[:, :, : x.shape[-1]]


def _depth_multiplier(x, w2):  # groups == C_in but 2*C output channels
    return F.conv1d(x, w2, None, padding=K - 1, groups=C)[:, :, : x.shape[-1]]


@pytest.mark.parametrize(
    "fn,weight",
    [
        (_not_causal, torch.randn(C, K)),
        (_same_padding, torch.randn(C, K)),
        (_not_depthwise, torch.randn(C, C // 2, K)),
        (_depth_multiplier, torch.randn(2 * C, 1, K)),
    ],
    ids=["slice-from-end", "padding-1", "groups-2", "depth-multiplier"],
)
def test_lookalikes_do_not_fuse(fn, weight):
    x = torch.randn(2, C, 11)
    gm = _trace(fn, x, weight)
    before = _targets(gm)
    assert _run_pass(gm) == 0
    assert _targets(gm) == before
    torch.testing.assert_close(gm(x, weight), fn(x, weight))


def test_family_off_gives_no_pass_and_uuid_is_stable():
    assert fusion.make_pass(AscendConfig(fusions=("attention",))) is None
    a, b = fusion.make_pass(AscendConfig()), fusion.make_pass(AscendConfig())
    assert a.family == "causal_conv1d" and a.uuid() == b.uuid() and len(a.uuid()) == 16


def test_backend_fx_codegen_dynamic_seq():
    """Through the backend (codegen fx): a static graph, then (automatic dynamic) a symbolic length."""
    import ascend_graph
    from ascend_graph.backend import compile_graph

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv1d(C, C, K, groups=C, padding=K - 1, bias=True)

        def forward(self, h):
            return hf_prefill(h.transpose(1, 2), self.conv.weight.squeeze(1), self.conv.bias, True).transpose(1, 2)

    m = Block().eval()
    config = AscendConfig(codegen="fx", fusions=("causal_conv1d",))
    compiled = torch.compile(m, backend=lambda gm, ex: compile_graph(gm, ex, config, wrap_runtime=False))
    with torch.no_grad():
        for L in (7, 19):
            h = torch.randn(3, L, C)
            torch.testing.assert_close(compiled(h), m(h))
    assert ascend_graph.stats()["graphs_compiled"] == 2
    assert ascend_graph.stats()["fusions"]["causal_conv1d"] == 2
