"""Module float attributes under dynamic=True: constants again, guarded (capture/host_floats.py)."""

import importlib

import pytest
import torch

import ascend_graph
from ascend_graph.capture.host_floats import FloatGuard, specialize_module_floats

FX = {"codegen": "fx", "graphs": False}


class _Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(7, 5))
        self.scale = 0.37  # a float attribute: Dynamo passes it as a 0-dim tensor under dynamic=True
        self.eps = 1e-5

    def forward(self, x, temperature: float = 1.0):
        h = x @ self.w
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * self.scale) / temperature


def _specialized(model, *args):
    """specialize_module_floats on the Dynamo graph, inside a backend (Dynamo drops the
    placeholders' ``grapharg`` once the backend returns)."""
    got = {}

    def backend(gm, example_inputs):
        before = gm.code
        got["out"] = specialize_module_floats(gm, example_inputs)
        got["gm"], got["inputs"], got["before"] = gm, list(example_inputs), before
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=backend, dynamic=True)(*args)
    return got


def test_module_floats_become_constants_and_the_graph_is_left_as_it_was():
    model = _Scaled()
    x = torch.randn(3, 7)
    got = _specialized(model, x, 2.0)
    gm, inputs, before = got["gm"], got["inputs"], got["before"]
    out_gm, guards = got["out"]
    assert gm.code == before  # the fallback runs it: never mutated
    assert sorted(name.rsplit("_", 1)[-1] for _, _, name in guards) == ["eps", "scale"]
    assert {v for _, v, _ in guards} == {0.37, 1e-5}
    # the temperature argument (a caller's float, it may change per call) stays an input
    items = [n for n in out_gm.graph.nodes if n.op == "call_method" and n.target == "item"]
    assert len(items) == 1
    out_gm.graph.lint()
    torch.testing.assert_close(out_gm(*inputs)[0], gm(*inputs)[0])


def test_nothing_to_specialize_returns_the_graph_itself():
    model = torch.nn.Linear(4, 3)
    got = _specialized(model, torch.randn(2, 4))
    out_gm, guards = got["out"]
    assert out_gm is got["gm"] and guards == ()


def _compiled_scaled():
    """(the model, it compiled with dynamic=True, an input), Dynamo's caches reset."""
    torch._dynamo.reset()
    model = _Scaled()
    return model, torch.compile(model, backend="ascend", dynamic=True, options=FX), torch.randn(3, 7)


def test_a_changed_module_float_gives_the_new_answer():
    """Dynamo puts no guard on a float it passes as an input. Ours are guarded constants
    (made so in Dynamo's first trace, or by a re-trace where a torch lacks that): a changed
    value recompiles. Where neither happens, FloatGuard runs the call eagerly and counts it.
    Either way the answer is the new one."""
    model, compiled, x = _compiled_scaled()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, 2.0), model(x, 2.0))
        torch.testing.assert_close(compiled(x, 3.0), model(x, 3.0))  # the argument may vary
        st = ascend_graph.stats()
        assert st["eager_fallbacks"] == 0 and st["graphs_compiled"] == 1
        model.scale = 1.5
        torch.testing.assert_close(compiled(x, 2.0), model(x, 2.0))
    st = ascend_graph.stats()
    assert st["graphs_compiled"] == 2 or st["eager_fallbacks"] == 1


def _count_traces(monkeypatch):
    """(Dynamo's attempt number of each AOT trace, the float inputs of each compile_graph call)."""
    import ascend_graph.backend as backend_mod
    from torch._guards import CompileContext

    traces, float_inputs = [], []
    real_trace, real_compile = backend_mod.aot_trace, backend_mod.compile_graph

    def counting_trace(gm, example_inputs, fw):
        traces.append(CompileContext.get().attempt)
        return real_trace(gm, example_inputs, fw)

    def recording_compile(gm, example_inputs, config, **kw):
        float_inputs.append(sum(1 for x in example_inputs if isinstance(x, torch.Tensor) and x.dim() == 0 and x.dtype == torch.float64))
        return real_compile(gm, example_inputs, config, **kw)

    monkeypatch.setattr(backend_mod, "aot_trace", counting_trace)
    monkeypatch.setattr(backend_mod, "compile_graph", recording_compile)
    return traces, float_inputs


def _compile_scaled_and_change_eps():
    model, compiled, x = _compiled_scaled()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, 2.0), model(x, 2.0))
        model.eps = 1e-3  # a guarded constant: a changed value recompiles, never a stale answer
        torch.testing.assert_close(compiled(x, 2.0), model(x, 2.0))
    st = ascend_graph.stats()
    assert st["eager_fallbacks"] == 0 and st["graphs_compiled"] == 2


def test_module_floats_are_constants_in_dynamos_first_trace(monkeypatch):
    """Dynamo makes module floats guarded constants in its first trace for our backend: no
    restart at all (each one was a whole aborted Dynamo trace per graph, 10-11.5 s of
    Qwen3-Next's and Bamba's compile on the H100), one AOT trace per graph, and the compiled
    graph takes only the caller's float."""
    traces, float_inputs = _count_traces(monkeypatch)
    _compile_scaled_and_change_eps()
    assert traces == [0, 0]  # the first attempt of each graph traced, once
    assert float_inputs == [1, 1]  # the caller's temperature only; scale and eps are constants


def test_other_backends_keep_module_floats_as_dynamo_has_them():
    """The first trace's specialization is ours only: another backend in the same process
    (here one that records its inputs) still gets the floats as inputs."""
    importlib.import_module("ascend_graph.backend")  # the specialization is installed

    seen = []

    def recording(gm, example_inputs):
        seen.append(sum(1 for x in example_inputs if isinstance(x, torch.Tensor) and x.dim() == 0 and x.dtype == torch.float64))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(_Scaled(), backend=recording, dynamic=True)(torch.randn(3, 7), 2.0)
    assert seen == [3]  # scale, eps, temperature


def test_without_the_first_trace_hook_the_backend_restarts_dynamo_before_any_aot_trace(monkeypatch):
    """Where Dynamo left the floats as inputs (a torch without the hook), the backend asks
    for the re-trace with them guarded as soon as it gets the graph: the aborted attempt
    runs no AOT trace (AOT's tensorify pass would ask the same from inside its capture)."""
    importlib.import_module("ascend_graph.backend")  # installs the hook, which is then turned off
    from ascend_graph.capture import host_floats

    monkeypatch.setattr(host_floats._SpecializeForOurs, "wants", staticmethod(lambda compiler_fn: False))
    traces, float_inputs = _count_traces(monkeypatch)
    _compile_scaled_and_change_eps()
    # graph 1: attempt 0 restarted before tracing, attempt 1 traced once (the recompile
    # after eps changed may find its symbols still marked by torch: no restart then)
    assert traces[0] == 1 and len(traces) == 2
    assert float_inputs[:2] == [3, 1]  # scale, eps, temperature; then the caller's only


def test_float_guard_runs_the_unspecialized_graph_on_a_changed_value():
    calls = []
    guard = FloatGuard(lambda *a: calls.append("compiled") or "compiled", ((1, 0.5, "l_self_alpha"),), lambda *a: calls.append("eager") or "eager")
    x = torch.randn(2)
    assert guard(x, torch.tensor(0.5, dtype=torch.float64)) == "compiled"
    assert guard(x, torch.tensor(0.75, dtype=torch.float64)) == "eager"
    assert calls == ["compiled", "eager"]
    st = ascend_graph.stats()
    assert st["eager_fallbacks"] == 1
    assert st["fallback_reasons"] == {"module float l_self_alpha changed from 0.5 (specialized at compile)": 1}


def test_off_keeps_module_floats_as_inputs():
    torch._dynamo.reset()
    model = _Scaled()
    compiled = torch.compile(model, backend="ascend", dynamic=True, options={**FX, "specialize_floats": False})
    x = torch.randn(3, 7)
    with torch.no_grad():
        compiled(x, 2.0)
        model.scale = 1.5
        torch.testing.assert_close(compiled(x, 2.0), model(x, 2.0))
    assert ascend_graph.stats()["eager_fallbacks"] == 0


@pytest.mark.slow
def test_gpt_oss_experts_fuse_under_dynamic_shapes():
    """GptOss's clipped-SwiGLU experts take alpha and limit as floats (as npu_clipped_swiglu
    does); under dynamic=True they arrived as tensors and the experts stayed transformers'.
    Now they fuse (two layers, two experts ops), and a changed alpha gives eager's answer."""
    pytest.importorskip("transformers")
    from tests.models.archs import build_arch

    torch._dynamo.reset()
    model = build_arch("gpt_oss", torch.float32)
    compiled = torch.compile(model, backend="ascend", dynamic=True, options={**FX, "fusions": ["moe"]})
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for b in (2, 3):
            ids = torch.randint(0, 131, (b, 13), generator=gen)
            torch.testing.assert_close(compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits, atol=1e-4, rtol=1e-4)
        st = ascend_graph.stats()
        assert st["graph_ops"].get("moe_dispatch_ffn_combine") == 2
        assert st["eager_fallbacks"] == 0
        model.model.layers[0].mlp.experts.alpha = 1.0  # recompiles (or runs eagerly): never the old alpha
        torch.testing.assert_close(compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
def test_a_changed_module_float_is_not_replayed_stale_on_cuda():
    """With device graphs a float the kernels read was baked into the graph at capture; the
    guard runs a changed value eagerly instead of replaying the old one."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch._dynamo.reset()
    model = _Scaled().cuda()
    compiled = torch.compile(model, backend="ascend", dynamic=True, options={"buckets": [4]})
    x = torch.randn(3, 7, device="cuda")
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(compiled(x, 2.0), model(x, 2.0))
        assert ascend_graph.stats()["buckets_captured"] >= 1
        model.scale = 1.5
        torch.testing.assert_close(compiled(x, 2.0), model(x, 2.0))
