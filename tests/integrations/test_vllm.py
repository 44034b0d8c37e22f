"""The vLLM adapters against the real vLLM package (0.32.0, CPU platform).

vLLM's PyPI wheel is a CUDA build; its Python config and compilation modules import
on a CPU machine with ``VLLM_TARGET_DEVICE=cpu`` (install: docs/vllm.md). Its C
extensions do not load here, so vLLM's custom ops are turned off (``custom_ops=["none"]``:
the ``forward_native`` paths run) and linear layers use vLLM's own plain-``F.linear``
CPU dispatch (``_cpu_skip_gemm_dispatch``).
"""

from __future__ import annotations

import os
import socket
import tempfile

import pytest

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp(prefix="ascend-graph-vllm-cache-"))

vllm_config_mod = pytest.importorskip("vllm.config", reason="vLLM is not installed (see docs/vllm.md for the CPU install)")

import torch  # noqa: E402
from vllm.config import (  # noqa: E402
    CompilationConfig,
    CompilationMode,
    CUDAGraphMode,
    ModelConfig,
    VllmConfig,
    set_current_vllm_config,
)
from vllm.forward_context import BatchDescriptor, set_forward_context  # noqa: E402

import ascend_graph  # noqa: E402
from ascend_graph.integrations import vllm as agv  # noqa: E402

HIDDEN = 48
INTER = 40


def _vllm_config(mode=CompilationMode.NONE, backend="", model_config=None, **cc) -> VllmConfig:
    kwargs = {"model_config": model_config} if model_config is not None else {}
    return VllmConfig(compilation_config=CompilationConfig(mode=mode, backend=backend, custom_ops=["none"], **cc), **kwargs)


@pytest.fixture(scope="module")
def dist():
    """vLLM's model-parallel groups (world size 1, gloo), once per module."""
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel, model_parallel_is_initialized

    ours = not model_parallel_is_initialized()
    if ours:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with set_current_vllm_config(_vllm_config()):
            init_distributed_environment(world_size=1, rank=0, distributed_init_method=f"tcp://127.0.0.1:{port}", local_rank=0, backend="gloo")
            initialize_model_parallel(1, 1)
    yield
    if ours:
        # later modules of the same process (tests/distributed) start their own default group
        destroy_model_parallel()
        destroy_distributed_environment()


def _norm_mlp(config: VllmConfig) -> torch.nn.Module:
    from vllm.model_executor.layers.activation import SiluAndMul
    from vllm.model_executor.layers.layernorm import RMSNorm

    class NormMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = RMSNorm(HIDDEN, eps=1e-5)
            self.up = torch.nn.Linear(HIDDEN, 2 * INTER, bias=False)
            self.act = SiluAndMul()
            self.down = torch.nn.Linear(INTER, HIDDEN, bias=False)

        def forward(self, x):
            return self.down(self.act(self.up(self.norm(x))))

    with set_current_vllm_config(config):
        m = NormMLP()
    with torch.no_grad():
        m.norm.weight.normal_(1.0, 0.1)
    return m


# -- 1. options from vLLM's config ------------------------------------------------------


def test_options_from_vllm_reads_capture_sizes():
    config = _vllm_config()
    # The CPU platform clears cudagraph sizes (no graphs on CPU); set them as a GPU run has them.
    config.compilation_config.cudagraph_capture_sizes = [8, 1, 4, 2]
    config.compilation_config.max_cudagraph_capture_size = 8
    options = agv.options_from_vllm(config)
    assert (options["buckets"], options["max_batch"]) == ([1, 2, 4, 8], 8)
    # on the CPU, the inductor settings vLLM's CPU platform gives its own compile
    assert options["inductor_config"] == agv._inductor_settings(config.compilation_config.inductor_compile_config, cpu=True)
    assert options["inductor_config"]["enable_auto_functionalized_v2"] is False  # vLLM's own setting, kept
    with set_current_vllm_config(config):
        assert agv.options_from_vllm()["buckets"] == [1, 2, 4, 8]
        assert ascend_graph.AscendConfig.from_options(agv.options_from_vllm()).buckets == (1, 2, 4, 8)
    config.compilation_config.cudagraph_mode = CUDAGraphMode.FULL_AND_PIECEWISE
    assert agv.options_from_vllm(config)["graphs"] is False  # vLLM captures the whole model itself
    assert agv.options_from_vllm(None) == {}  # no current vLLM config


def test_backend_string_ascend_resolves_in_dynamo_trace_once():
    from torch._dynamo.backends.registry import lookup_backend

    from ascend_graph.backend import ascend_backend

    config = _vllm_config(mode=CompilationMode.DYNAMO_TRACE_ONCE, backend="ascend")
    assert config.compilation_config.backend == "ascend"
    assert config.compilation_config.splitting_ops == []  # no piecewise split outside VLLM_COMPILE
    assert config.compilation_config.init_backend(config) == "ascend"
    assert lookup_backend("ascend") is ascend_backend
    qual = _vllm_config(mode=CompilationMode.DYNAMO_TRACE_ONCE, backend="ascend_graph.integrations.vllm.ascend_vllm_backend")
    assert qual.compilation_config.init_backend(qual) is agv.ascend_vllm_backend
    with pytest.raises(ValueError, match="Invalid backend for piecewise"):
        CompilationConfig(mode=CompilationMode.VLLM_COMPILE, backend="ascend")


# -- vLLM op fusions --------------------------------------------------------------------


def _aten_graph(module, *inputs):
    """The functional ATen graph our passes see (same tracing as backend.compile_graph)."""
    from ascend_graph.capture.trace import aot_trace

    seen = {}

    def fw(gm, ex):
        seen["gm"] = gm
        return gm.forward

    def be(gm, ex):
        return aot_trace(gm, ex, fw)

    torch._dynamo.reset()
    torch.compile(module, backend=be, fullgraph=True)(*inputs)
    return seen["gm"]


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_vllm_norm_rope_pass_rewrites_native_rms_norm_and_silu_and_mul():
    config = _vllm_config()
    m = _norm_mlp(config)
    x = torch.randn(37, HIDDEN)
    with set_current_vllm_config(config):
        ref = m(x)
        gm = _aten_graph(m, x)
    before = _targets(gm)
    assert torch.ops.vllm_ir.rms_norm.default in before
    assert torch.ops.aten.exp.default in before  # silu, decomposed
    # on the CPU the family applies with the FX codegen only (inductor's loops are faster)
    skipped = agv.vllm_ops_pass(ascend_graph.AscendConfig())
    assert skipped(gm.graph) == 0
    assert "cpu+inductor" in next(iter(ascend_graph.stats()["skipped"]["norm_rope"]))
    p = agv.vllm_ops_pass(ascend_graph.AscendConfig(codegen="fx"))
    assert p(gm.graph) == 2
    gm.graph.lint()
    gm.recompile()
    after = _targets(gm)
    assert torch.ops.vllm_ir.rms_norm.default not in after and torch.ops.aten.exp.default not in after
    assert after.count(torch.ops.ascend_graph.rms_norm.default) == 1
    assert after.count(torch.ops.ascend_graph.silu_and_mul.default) == 1
    assert ref.shape == (37, HIDDEN)  # outputs vs eager: test_ascend_vllm_backend_on_vllm_layers_matches_eager


def test_silu_and_mul_not_fused_when_halves_are_not_of_one_tensor():
    def f(a, b):
        return torch.nn.functional.silu(a) * b

    gm = _aten_graph(f, torch.randn(5, 7), torch.randn(5, 7))
    assert agv.vllm_ops_pass(ascend_graph.AscendConfig())(gm.graph) == 0

    def g(x):  # uneven split: x[..., :3] and x[..., 3:] of a width-8 tensor
        return torch.nn.functional.silu(x[..., :3]) * x[..., 5:]

    gm = _aten_graph(g, torch.randn(5, 8))
    assert agv.vllm_ops_pass(ascend_graph.AscendConfig())(gm.graph) == 0
    assert agv.vllm_ops_pass(ascend_graph.AscendConfig(fusions=("attention",))) is None


def test_ascend_vllm_backend_on_vllm_layers_matches_eager():
    config = _vllm_config()
    config.compilation_config.cudagraph_capture_sizes = [1, 2, 4, 8]
    config.compilation_config.max_cudagraph_capture_size = 8
    m = _norm_mlp(config)
    x = torch.randn(37, HIDDEN)
    torch._dynamo.reset()
    with set_current_vllm_config(config):
        ref = m(x)
        out = torch.compile(m, backend=agv.ascend_vllm_backend, fullgraph=True, options={"fusions": ["norm_rope"], "codegen": "fx"})(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    s = ascend_graph.stats()
    assert s["graphs_compiled"] == 1
    # the family's own SiLU-and-mul row takes the native form first; vLLM's rms_norm op is the adapter's row
    assert s["passes"]["vllm_norm_rope"]["rewrites"] + s["passes"]["fuse_norm_rope"]["rewrites"] == 2
    assert s["fusions"]["norm_rope"] == 2


# -- 2. CompilerInterface ---------------------------------------------------------------


def test_compiler_interface_resolved_compiled_and_loaded_as_vllm_does(monkeypatch, tmp_path):
    from vllm.compilation.backends import CompilerManager, make_compiler
    from vllm.compilation.compiler_interface import CompilerInterface
    from vllm.compilation.passes.inductor_pass import pass_context
    from vllm.config.utils import Range
    from vllm.platforms import current_platform

    # What a platform plugin does: name our compiler (vLLM resolves the platform's, #35084).
    monkeypatch.setattr(type(current_platform), "get_compile_backend", classmethod(lambda cls: "ascend_graph.integrations.vllm.AscendGraphCompiler"))
    cc = CompilationConfig(mode=CompilationMode.DYNAMO_TRACE_ONCE, backend="ascend_graph.integrations.vllm.AscendGraphCompiler", custom_ops=["none"])
    compiler = make_compiler(cc)
    assert isinstance(compiler, CompilerInterface) and isinstance(compiler, agv.AscendGraphCompiler)

    config = _vllm_config()
    m = _norm_mlp(config)
    x = torch.randn(37, HIDDEN)
    captured = {}

    def grab(gm, ex):
        captured["gm"], captured["ex"] = gm, list(ex)
        return gm.forward

    torch._dynamo.reset()
    with set_current_vllm_config(config):
        ref = m(x)
        torch.compile(m, backend=grab, fullgraph=True, dynamic=False)(x)
        h1 = compiler.compute_hash(config)
        assert h1 == compiler.compute_hash(config) and len(h1) == 10
        manager = CompilerManager(cc)
        manager.compiler = compiler
        manager.initialize_cache(str(tmp_path), disable_cache=False, prefix="backbone")
        rng = Range(start=37, end=37)
        with pass_context(rng):
            fn = manager.compile(captured["gm"], captured["ex"], {}, cc, rng, graph_index=0, num_graphs=1)
        manager.save_to_file()
        torch.testing.assert_close(fn(*captured["ex"])[0] if isinstance(fn(*captured["ex"]), (tuple, list)) else fn(*captured["ex"]), ref, rtol=1e-5, atol=1e-5)
        # inductor codegen on the CPU: the norm/act rows are skipped there (counted), not applied
        assert ascend_graph.stats()["passes"]["vllm_norm_rope"]["rewrites"] == 0
        assert ascend_graph.stats()["skipped"]["norm_rope"]
        # vLLM's cache file holds our (str, str) handle and reads it back with literal_eval.
        manager2 = CompilerManager(cc)
        manager2.compiler = compiler
        manager2.initialize_cache(str(tmp_path), disable_cache=False, prefix="backbone")
        (entry,) = manager2.cache.values()
        handle = entry["graph_handle"]
        assert isinstance(handle, tuple) and len(handle) == 2 and all(isinstance(h, str) for h in handle)
        loaded = manager2.load(captured["gm"], captured["ex"], 0, rng)
        assert loaded is not None
        out = loaded(*captured["ex"])
        out = out[0] if isinstance(out, (tuple, list)) else out
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="another graph"):
            compiler.load((handle[0], "0" * 16), captured["gm"], captured["ex"], 0, rng)


# -- 3. post-grad pass in vLLM's pass manager -------------------------------------------


def test_fusion_pass_is_appended_to_vllm_post_grad_pass_manager():
    from vllm.compilation.passes.inductor_pass import InductorPass, pass_context
    from vllm.compilation.passes.pass_manager import PostGradPassManager
    from vllm.config.utils import Range

    fusion_pass = agv.AscendFusionPass({"fusions": ["norm_rope"], "codegen": "fx"})
    assert isinstance(fusion_pass, InductorPass)
    # vLLM 0.32's pydantic field is dict[str, str]: a pass object is refused at construction,
    # and a string resolves only names at the top level of a package (__import__ + __dict__).
    with pytest.raises(Exception, match="valid string"):
        CompilationConfig(inductor_passes={"post_grad_custom_post_pass": fusion_pass})
    config = _vllm_config()
    config.compilation_config.inductor_compile_config["post_grad_custom_post_pass"] = fusion_pass  # what VllmBackend reads
    assert fusion_pass.uuid() == agv.AscendFusionPass({"fusions": ["norm_rope"], "codegen": "fx"}).uuid()
    assert fusion_pass.uuid() != agv.AscendFusionPass({"fusions": ["moe"]}).uuid()

    manager = PostGradPassManager()
    manager.configure(config)
    manager.add(config.compilation_config.inductor_compile_config["post_grad_custom_post_pass"])  # what VllmBackend.configure_post_pass does
    # vLLM's fixed last pass names torch.ops._C.rotary_embedding, a C-extension op that the
    # CUDA wheel cannot load on this CPU machine; the passes before it run as in vLLM.
    with set_current_vllm_config(config), pass_context(Range(start=1, end=64)):
        assert isinstance(manager.uuid(), str)  # covers our pass's uuid
    manager.fix_functionalization = lambda graph: None
    m = _norm_mlp(config)
    x = torch.randn(37, HIDDEN)
    with set_current_vllm_config(config):
        gm = _aten_graph(m, x)
        with pass_context(Range(start=1, end=64)):
            manager(gm.graph)
    gm.graph.lint()
    assert torch.ops.ascend_graph.silu_and_mul.default in _targets(gm)
    # vLLM's rms_norm op by the adapter's row, SiLU-and-mul by the family's own row
    assert ascend_graph.stats()["fusions"]["norm_rope"] == 2


# -- 4. static graph wrapper ------------------------------------------------------------


class _Counting:
    def __init__(self):
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        return x * 2


def test_graph_wrapper_follows_vllm_forward_context_on_cpu():
    from vllm.compilation.monitor import set_cudagraph_capturing_enabled

    config = _vllm_config()
    runnable = _Counting()
    wrapper = agv.AscendGraphWrapper(runnable, config, CUDAGraphMode.PIECEWISE)
    x = torch.randn(4, 3)
    # no forward context / mode NONE / another mode: straight through, nothing captured
    assert torch.equal(wrapper(x), x * 2)
    with set_forward_context(None, config, cudagraph_runtime_mode=CUDAGraphMode.NONE):
        wrapper(x)
    with set_forward_context(None, config, cudagraph_runtime_mode=CUDAGraphMode.FULL, batch_descriptor=BatchDescriptor(num_tokens=4)):
        wrapper(x)
    assert wrapper.entries == {} and runnable.calls == 3
    set_cudagraph_capturing_enabled(True)
    try:
        with set_forward_context(None, config, cudagraph_runtime_mode=CUDAGraphMode.PIECEWISE, batch_descriptor=BatchDescriptor(num_tokens=4)):
            assert torch.equal(wrapper(x), x * 2)  # capture
            assert torch.equal(wrapper(x), x * 2)  # replay
        with set_forward_context(None, config, cudagraph_runtime_mode=CUDAGraphMode.PIECEWISE, num_tokens=8):
            wrapper(torch.randn(8, 3))  # a new descriptor: a second capture
    finally:
        set_cudagraph_capturing_enabled(False)
    assert sorted(d.num_tokens for d in wrapper.entries) == [4, 8]
    s = ascend_graph.stats()
    assert s["buckets_captured"] == 2 and s["replays"] == 1
    assert wrapper.unwrap() is runnable and wrapper.calls == runnable.calls  # attribute access falls through
    with pytest.raises(ValueError, match="NONE"):
        agv.AscendGraphWrapper(runnable, config, CUDAGraphMode.NONE)


def test_graph_wrapper_runs_without_a_graph_when_capture_raises_capture_error(monkeypatch):
    """An NPU binding refusing to record a shape (runtime/npu_updates.py: FIA lengths that
    are not the runner's static buffers, a torch_npu without task groups) raises
    CaptureError at capture: the wrapper counts it like the runner does and runs that
    descriptor without a graph, now and later (no second capture attempt)."""
    from vllm.compilation.monitor import set_cudagraph_capturing_enabled

    from ascend_graph.errors import CaptureError

    attempts = []

    class Refusing:
        def capture(self, fn, pool=None, static_inputs=()):
            attempts.append(static_inputs)
            raise CaptureError("a host-length argument of a captured kernel is not one of the runner's static input buffers", expected="x", got="y")

    monkeypatch.setattr(agv.device_graphs, "new_graph", lambda device, enabled=True: Refusing())
    config = _vllm_config()
    runnable = _Counting()
    wrapper = agv.AscendGraphWrapper(runnable, config, CUDAGraphMode.FULL)
    x = torch.randn(4, 3)
    set_cudagraph_capturing_enabled(True)
    try:
        with set_forward_context(None, config, cudagraph_runtime_mode=CUDAGraphMode.FULL, batch_descriptor=BatchDescriptor(num_tokens=4)):
            assert torch.equal(wrapper(x), x * 2)
            assert torch.equal(wrapper(x), x * 2)
    finally:
        set_cudagraph_capturing_enabled(False)
    assert len(attempts) == 1 and wrapper.entries == {} and runnable.calls == 2
    s = ascend_graph.stats()
    assert s["capture_failures"] == 1 and s["buckets_captured"] == 0
    assert "not one of the runner's static input buffers" in next(v["failed"] for v in s["buckets"].values() if "failed" in v)


def test_graph_wrapper_takes_part_in_vllm_graph_memory_profiling():
    """vLLM sizes the KV cache after ``profile_cudagraph_memory``: it walks
    ``CUDAGraphWrapper._all_instances``, points each ``graph_pool`` at a throw-away pool,
    captures, then ``clear_all_graphs()`` and puts each pool back. Our wrapper is in that
    set and follows the same protocol (on the CPU the pool is None: no device graphs)."""
    from vllm.compilation.cuda_graph import CUDAGraphWrapper
    from vllm.compilation.monitor import set_cudagraph_capturing_enabled

    config = _vllm_config()
    runnable = _Counting()
    wrapper = agv.AscendGraphWrapper(runnable, config, CUDAGraphMode.PIECEWISE)
    assert wrapper in CUDAGraphWrapper._all_instances
    original = wrapper.graph_pool
    assert original is None  # the CPU has no graph pool
    profiling_pool = object()
    wrapper.graph_pool = profiling_pool  # as vLLM's profiling does
    assert wrapper.graph_pool is profiling_pool
    set_cudagraph_capturing_enabled(True)
    try:
        with set_forward_context(None, config, cudagraph_runtime_mode=CUDAGraphMode.PIECEWISE, num_tokens=4):
            wrapper(torch.randn(4, 3))
        assert len(wrapper.entries) == 1
        CUDAGraphWrapper.clear_all_graphs()
        assert wrapper.entries == {}
        wrapper.graph_pool = original
        assert wrapper.graph_pool is None
        with set_forward_context(None, config, cudagraph_runtime_mode=CUDAGraphMode.PIECEWISE, num_tokens=4):
            wrapper(torch.randn(4, 3))  # captured again after the profiling's clear
    finally:
        set_cudagraph_capturing_enabled(False)
    assert len(wrapper.entries) == 1 and runnable.calls == 2


def test_graph_wrapper_refuses_capture_outside_vllm_capture_window():
    config = _vllm_config()
    wrapper = agv.AscendGraphWrapper(_Counting(), config, CUDAGraphMode.FULL)
    with set_forward_context(None, config, cudagraph_runtime_mode=CUDAGraphMode.FULL, num_tokens=4):
        with pytest.raises(RuntimeError, match="inappropriate"):
            wrapper(torch.randn(4, 3))


@pytest.mark.cuda
def test_graph_wrapper_captures_and_replays_cuda_graphs():
    from vllm.compilation.monitor import set_cudagraph_capturing_enabled

    config = _vllm_config()
    w = torch.randn(16, 16, device="cuda")
    static_x = torch.randn(4, 16, device="cuda")
    wrapper = agv.AscendGraphWrapper(lambda x: torch.relu(x @ w), config, CUDAGraphMode.FULL)
    from ascend_graph.runtime.pool import device_pool

    assert wrapper.graph_pool is not None and wrapper.graph_pool == device_pool(torch.device("cuda")).handle  # the shared pool
    set_cudagraph_capturing_enabled(True)
    try:
        with set_forward_context(None, config, cudagraph_runtime_mode=CUDAGraphMode.FULL, num_tokens=4):
            wrapper(static_x)
            static_x.copy_(torch.randn(4, 16, device="cuda"))
            out = wrapper(static_x)
    finally:
        set_cudagraph_capturing_enabled(False)
    torch.testing.assert_close(out, torch.relu(static_x @ w))
    assert ascend_graph.stats()["replays"] == 1


# -- a real vLLM model class --------------------------------------------------------------


def _tiny_llama(tmp_path, mode, backend):
    from transformers import LlamaConfig

    hf = LlamaConfig(vocab_size=97, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, architectures=["LlamaForCausalLM"])
    hf.save_pretrained(tmp_path)
    model_config = ModelConfig(model=str(tmp_path), skip_tokenizer_init=True, dtype="float32", max_model_len=64)
    return _vllm_config(mode=mode, backend=backend, model_config=model_config)


def _build_llama(config):
    from vllm.model_executor.models.llama import LlamaModel

    with set_current_vllm_config(config):
        m = LlamaModel(vllm_config=config, prefix="model")
    for mod in m.modules():
        qm = getattr(mod, "quant_method", None)
        if qm is not None and hasattr(qm, "process_weights_after_loading"):
            mod._cpu_skip_gemm_dispatch = True  # vLLM's plain F.linear path (its CPU GEMM kernels are C++)
            qm.process_weights_after_loading(mod)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m


def test_vllm_llama_model_compiled_by_ascend_backend_in_dynamo_trace_once(dist, tmp_path):
    """vLLM's LlamaModel (with @support_torch_compile) in mode DYNAMO_TRACE_ONCE.

    No attention metadata here (vLLM's profile-run path): vLLM's own attention op leaves
    its ``torch.empty`` output unwritten, so the model's output is not comparable with eager (the layers' outputs are:
    test_ascend_vllm_backend_on_vllm_layers_matches_eager; attention with real metadata:
    tests/integrations/test_vllm_ops.py).
    """
    eager_cfg = _tiny_llama(tmp_path / "eager", CompilationMode.NONE, "")
    eager = _build_llama(eager_cfg)
    ids, pos = torch.randint(0, 97, (37,)), torch.arange(37)
    with set_current_vllm_config(eager_cfg), set_forward_context(None, eager_cfg, num_tokens=37):
        ref = eager(ids, pos, None)

    cfg = _tiny_llama(tmp_path / "compiled", CompilationMode.DYNAMO_TRACE_ONCE, "ascend_graph.integrations.vllm.ascend_vllm_backend")
    cfg.compilation_config.cudagraph_capture_sizes = [1, 2, 4, 8, 16, 32, 48]
    cfg.compilation_config.max_cudagraph_capture_size = 48
    torch._dynamo.reset()
    compiled = _build_llama(cfg)
    compiled.load_state_dict(eager.state_dict())
    with set_current_vllm_config(cfg), set_forward_context(None, cfg, num_tokens=37):
        out = compiled(ids, pos, None)
        out2 = compiled(ids[:11], pos[:11], None)  # no recompile: vLLM dropped the guards
    assert out.shape == ref.shape == (37, HIDDEN)
    assert out2.shape == (11, HIDDEN)
    s = ascend_graph.stats()
    assert s["graphs_compiled"] == 1
    # inductor codegen on the CPU: the norm/act rows are skipped there and say why
    assert s["passes"]["vllm_norm_rope"]["rewrites"] == 0
    assert s["skipped"]["norm_rope"]
    # vLLM's attention op is refused here: head size 48/4 = 12 is not FIA's (a multiple of 16)
    assert s["passes"]["vllm_attention"]["rewrites"] == 0 and s["fusions"]["attention"] == 0
