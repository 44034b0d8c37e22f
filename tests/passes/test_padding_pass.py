"""passes/padding.py: paged attention's FIA metadata routed through the planner's in-graph
rule: exact rewrite counts, one shared computation, lint, outputs unchanged on correct
metadata, FIA's rule holding on metadata padded the vLLM way, and the cases left alone."""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

import ascend_graph
import ascend_graph.ops.attention  # noqa: F401  (registers the paged ops)
from ascend_graph.capture.trace import decompositions
from ascend_graph.config import AscendConfig
from ascend_graph.passes import padding as padding_pass
from ascend_graph.passes.manager import build_pass_manager

ops = torch.ops.ascend_graph
PAGED = ops.paged_attention.default
NQ, NKV, D, BLOCK = 4, 2, 16, 4


def two_layers(q, k_cache, v_cache, block_table, query_lens, seq_lens):
    """Metadata computed in the graph from zero-padded query lengths (cu[-1] < T when padded)."""
    cu = F.pad(query_lens.cumsum(0), (1, 0)).to(torch.int32)
    a = ops.paged_attention(q, k_cache, v_cache, block_table, cu, seq_lens, None, 0.25, 0)
    b = ops.paged_attention(a * 0.5, k_cache, v_cache, block_table, cu, seq_lens, None, 0.25, 0)
    return a + b


def arange_metadata(q, k_cache, v_cache, block_table, seq_lens):
    cu = torch.arange(q.shape[0] + 1, dtype=torch.int32)  # decode: one token a request, uniform by construction
    return ops.paged_attention(q, k_cache, v_cache, block_table, cu, seq_lens, None, 0.25, 0)


def _inputs(query_lens, ctx, pad_reqs=0, pad_tokens=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = len(query_lens)
    t = sum(query_lens)
    q = torch.randn(t + pad_tokens, NQ, D, generator=g)
    kc = torch.randn(32, BLOCK, NKV, D, generator=g)
    vc = torch.randn(32, BLOCK, NKV, D, generator=g)
    bt = (torch.arange(r + pad_reqs)[:, None] * 4 + torch.arange(4)).int()
    bt[r:] = 0
    ql = torch.tensor(list(query_lens) + [0] * pad_reqs)  # vLLM pads per-request lengths with 0
    kv = torch.tensor([c + n for c, n in zip(ctx, query_lens)] + [0] * pad_reqs, dtype=torch.int32)
    return q, kc, vc, bt, ql, kv


def _trace(fn, *args):
    with torch.no_grad():
        return make_fx(fn, decomposition_table=decompositions(), tracing_mode="symbolic")(*args)


def _run_pass(gm):
    p = padding_pass.make_pass(AscendConfig())
    n = p(gm.graph)
    gm.graph.lint()
    gm.recompile()
    return n


class _RecordMetadata(torch.fx.Interpreter):
    """Runs a graph and records the (q rows, cu_seqlens_q, seq_lens_kv) each paged attention gets."""

    def __init__(self, gm):
        super().__init__(gm)
        self.seen = []

    def call_function(self, target, args, kwargs):
        if target is PAGED:
            self.seen.append((args[0].shape[0], args[4].tolist(), args[5].tolist()))
        return super().call_function(target, args, kwargs)


def test_each_paged_attention_rewired_through_one_shared_computation():
    gm = _trace(two_layers, *_inputs([2, 3, 1], [4, 0, 6]))
    cumsums_before = sum(n.target is torch.ops.aten.cumsum.default for n in gm.graph.nodes)
    assert _run_pass(gm) == 2
    nodes = list(gm.graph.nodes)
    paged = [n for n in nodes if n.target is PAGED]
    assert paged[0].args[4] is paged[1].args[4] and paged[0].args[5] is paged[1].args[5]  # shared
    assert paged[0].args[4].target is torch.ops.aten.cat.default  # the rule's output, not the raw cumsum
    # the rule adds two cumsums (rank among empty requests, new offsets), once for both layers
    assert sum(n.target is torch.ops.aten.cumsum.default for n in nodes) == cumsums_before + 2
    assert all("val" in n.meta for n in nodes if n.op == "call_function")


def test_outputs_unchanged_when_the_metadata_already_holds():
    args = _inputs([2, 3, 1], [4, 0, 6])
    gm = _trace(two_layers, *args)
    ref = gm(*args)
    _run_pass(gm)
    torch.testing.assert_close(gm(*args), ref)


def test_vllm_style_padding_satisfies_fia_after_the_pass():
    """3 real requests / 6 tokens padded to 4 requests / 9 tokens, the way vLLM pads
    (query lengths and seq_lens 0): before the pass FIA would get cu[-1] = 6 != 9 tokens
    and a KV length 0; after it, the dummy holds the 3 padded tokens with KV length 1, and
    the real rows are the unpadded run's."""
    padded = _inputs([2, 3, 1], [4, 0, 6], pad_reqs=1, pad_tokens=3)
    q, kc, vc, bt, ql, kv = padded
    real = (q[:6], kc, vc, bt[:3], ql[:3], kv[:3])
    gm = _trace(two_layers, *padded)
    before = _RecordMetadata(gm)
    before.run(*padded)
    assert before.seen[0] == (9, [0, 2, 5, 6, 6], [6, 3, 7, 0])  # broken: T != cu[-1]
    ref = gm(*real)
    assert _run_pass(gm) == 2
    after = _RecordMetadata(gm)
    out = after.run(*padded)
    assert after.seen[0] == (9, [0, 2, 5, 6, 9], [6, 3, 7, 1])  # T == cu[-1], dummy KV length 1
    torch.testing.assert_close(out[:6], ref)


def test_arange_metadata_is_left_alone():
    args = _inputs([1, 1, 1], [3, 5, 2])
    gm = _trace(arange_metadata, args[0], args[1], args[2], args[3], args[5])
    code = gm.code
    assert _run_pass(gm) == 0
    assert gm.code == code


def test_no_pass_without_the_attention_family():
    assert padding_pass.make_pass(AscendConfig(fusions=("moe",))) is None
    names = build_pass_manager(AscendConfig()).names
    assert names.index("fia_padding") > names.index("attention_fusion")  # fusion -> padding -> cleanup
    assert names[-2:] == ["noop_elimination", "dead_code_elimination"]


def test_backend_counts_padding_rewrites_in_stats():
    torch._dynamo.reset()
    args = _inputs([2, 3, 1], [4, 0, 6])
    compiled = torch.compile(two_layers, backend="ascend", options={"codegen": "fx", "graphs": False}, dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*args), two_layers(*args))
    st = ascend_graph.stats()
    assert st["padding"]["rewrites"] == 2 and st["passes"]["fia_padding"]["rewrites"] == 2


def paged_on_inputs(q, k_cache, v_cache, block_table, cu, seq_lens):
    """Paged attention reading its metadata straight from the graph's inputs (a runner's)."""
    return ops.paged_attention(q, k_cache, v_cache, block_table, cu, seq_lens, None, 0.25, 0)


def _input_metadata_graph():
    q, kc, vc, bt, ql, kv = _inputs([2, 3, 1], [4, 0, 6])
    cu = F.pad(ql.cumsum(0), (1, 0)).to(torch.int32)
    return _trace(paged_on_inputs, q, kc, vc, bt, cu, kv)


def test_graph_input_metadata_rewritten_off_npu():
    """CPU/CUDA: metadata that are graph inputs still go through the rule (the predicate
    that spares them holds only for inputs on an npu device)."""
    gm = _input_metadata_graph()
    paged = next(n for n in gm.graph.nodes if n.target is PAGED)
    assert paged.args[4].op == paged.args[5].op == "placeholder"
    assert not padding_pass._patched_at_replay(paged.args[4], paged.args[5])
    assert _run_pass(gm) == 1
    assert paged.args[4].op == "call_function" and paged.args[5].op == "call_function"


def test_npu_graph_input_metadata_left_for_replay_patching(monkeypatch):
    """On an NPU the runtime applies the rule on the host when it patches FIA's lengths
    (runtime/npu_updates.py): the pass leaves graph-input metadata alone there."""
    monkeypatch.setattr(padding_pass, "_patched_at_replay", lambda cu, lens: True)
    gm = _input_metadata_graph()
    code = gm.code
    assert _run_pass(gm) == 0
    assert gm.code == code
