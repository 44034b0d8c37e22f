"""The ascend Dynamo backend: found by name, options, bad input, graph breaks, codegens."""

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import ascend_graph
from ascend_graph import ConfigError, UnsupportedError
from ascend_graph.backend import ascend_backend


def _inner(exc: BaseException) -> BaseException:
    """Dynamo wraps backend errors in BackendCompilerFailed; the cause is ours."""
    return getattr(exc, "inner_exception", None) or exc.__cause__ or exc


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(12, 20)
        self.down = nn.Linear(20, 12)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.up(x))) + x


def test_backend_is_found_by_name_in_a_fresh_process_without_import():
    code = textwrap.dedent(
        """
        import sys, torch
        assert "ascend_graph" not in sys.modules
        # torch.compile resolves the name through the torch_dynamo_backends entry point
        f = torch.compile(lambda x: torch.sin(x) * 2 + 1, backend="ascend", options={"codegen": "fx"})
        assert "ascend_graph" in sys.modules
        x = torch.randn(5)
        out = f(x)
        assert torch.allclose(out, torch.sin(x) * 2 + 1)
        import ascend_graph
        assert ascend_graph.stats()["graphs_compiled"] == 1
        print("OK")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "OK" in proc.stdout


@pytest.mark.parametrize("codegen", ["fx", "inductor"])
def test_outputs_equal_eager(codegen):
    torch._dynamo.reset()
    model = MLP().eval()
    cm = torch.compile(model, backend=ascend_backend, options={"codegen": codegen})
    with torch.no_grad():
        for n in (3, 7, 11):
            x = torch.randn(n, 12)
            torch.testing.assert_close(cm(x), model(x))
    st = ascend_graph.stats()
    assert st["graphs_compiled"] == 2  # static first call, then one dynamic graph
    assert st["compile_seconds"] > 0
    assert set(st) >= {"graphs_compiled", "fusions", "padding", "buckets_captured", "replays", "eager_fallbacks", "compile_seconds"}
    assert set(st["fusions"]) >= {"attention", "causal_conv1d", "moe"}


@pytest.mark.parametrize(
    "options, key",
    [
        ({"codegn": "fx"}, "codegn"),
        ({"graphs": "yes"}, "graphs"),
        ({"codegen": "tvm"}, "codegen"),
        ({"fusions": ["attention", "convolution"]}, "fusion"),
        ({"buckets": [4, 0]}, "buckets"),
    ],
)
def test_bad_options_are_a_config_error_naming_the_key(options, key):
    torch._dynamo.reset()
    cm = torch.compile(MLP(), backend=ascend_backend, options=options)
    with pytest.raises(Exception) as e:
        cm(torch.randn(2, 12))
    inner = _inner(e.value)
    assert isinstance(inner, ConfigError)
    assert key in str(inner)
    assert inner.expected is not None and inner.got is not None


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        ascend_graph.AscendConfig.from_options({"bucket": [1]})
    assert "buckets" in str(e.value) and "codegen" in str(e.value)


def test_torch_compile_mode_is_rejected_with_a_hint():
    with pytest.raises(ConfigError, match="graphs"):
        ascend_backend(torch.fx.symbolic_trace(MLP()), [torch.randn(2, 12)], mode="reduce-overhead")


def test_config_is_frozen_and_hash_tracks_codegen_not_dumps():
    a = ascend_graph.AscendConfig.from_options({"dump_dir": "/tmp/x"})
    with pytest.raises(Exception):
        a.codegen = "fx"
    assert a.compute_hash() == ascend_graph.AscendConfig().compute_hash()
    assert a.compute_hash() != ascend_graph.AscendConfig(codegen="fx").compute_hash()


def test_unsupported_device_and_dtype():
    gm = torch.fx.symbolic_trace(lambda x: x + 1)
    with pytest.raises(UnsupportedError) as e:
        ascend_backend(gm, [torch.empty(3, device="meta")])
    assert "meta" in str(e.value.got)
    with pytest.raises(UnsupportedError) as e:
        ascend_backend(gm, [torch.randn(3, dtype=torch.complex64)])
    assert "complex64" in str(e.value.got)


def test_graph_break_compiles_piece_by_piece():
    torch._dynamo.reset()

    def f(x):
        y = torch.relu(x) + 1
        torch._dynamo.graph_break()
        return y * torch.sigmoid(y)

    cf = torch.compile(f, backend=ascend_backend, options={"codegen": "fx"})
    x = torch.randn(6)
    torch.testing.assert_close(cf(x), f(x))
    assert ascend_graph.stats()["graphs_compiled"] == 2


def test_outputs_do_not_require_grad_inference_only():
    torch._dynamo.reset()
    model = MLP()
    cm = torch.compile(model, backend=ascend_backend, options={"codegen": "fx"})
    out = cm(torch.randn(4, 12))
    assert not out.requires_grad
