"""AscendConfig: every option range- and type-checked, as a ConfigError with expected/got."""

import pytest
import torch
from torch import nn

from ascend_graph import AscendConfig, ConfigError
from ascend_graph.backend import ascend_backend


def _inner(exc: BaseException) -> BaseException:
    """Dynamo wraps backend errors in BackendCompilerFailed; the cause is ours."""
    return getattr(exc, "inner_exception", None) or exc.__cause__ or exc


@pytest.mark.parametrize(
    "options, key",
    [
        ({"stream_budget": 0}, "stream_budget"),
        ({"stream_budget": -5}, "stream_budget"),
        ({"memory_budget_bytes": -1}, "memory_budget_bytes"),
        ({"max_graphs": 0}, "max_graphs"),
        ({"max_batch": 0}, "max_batch"),
        ({"num_speculative_tokens": -1}, "num_speculative_tokens"),
        ({"batch_dim": -1}, "batch_dim"),
        ({"buckets": []}, "buckets"),
        ({"buckets": [4, 0]}, "buckets"),
        ({"buckets": [True, 2]}, "buckets"),
        ({"buckets": [1.0, 2]}, "buckets"),
        ({"buckets": {1: "a", 2: "b"}}, "buckets"),
        ({"buckets": {1, 2}}, "buckets"),
        ({"buckets": "1,2"}, "buckets"),
        ({"fusions": {"attention": True}}, "fusions"),
        ({"max_graphs": True}, "max_graphs"),
        ({"stream_budget": 2.5}, "stream_budget"),
        ({"memory_budget_bytes": "1G"}, "memory_budget_bytes"),
        ({"warmup": 1}, "warmup"),
        ({"batch_input": True}, "batch_input"),
        ({"inductor_config": {"max_autotun": True}}, "max_autotun"),
        ({"inductor_config": {"triton.cudagraph": True}}, "triton.cudagraph"),
        ({"inductor_config": [1, 2]}, "inductor_config"),
    ],
)
def test_out_of_range_or_mistyped_option_is_a_config_error(options, key):
    with pytest.raises(ConfigError) as e:
        AscendConfig.from_options(options)
    assert key in str(e.value)
    assert e.value.expected is not None and e.value.got is not None


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"buckets": (True, 2)}, "buckets"),
        ({"max_graphs": 0}, "max_graphs"),
        ({"memory_budget_bytes": -1}, "memory_budget_bytes"),
        ({"stream_budget": False}, "stream_budget"),
        ({"inductor_config": (("no_such_key", 1),)}, "no_such_key"),
    ],
)
def test_direct_construction_and_replace_are_checked_too(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        AscendConfig(**kwargs)
    with pytest.raises(ConfigError, match=key):
        AscendConfig().replace(**kwargs)


def test_edge_values_that_are_valid_are_accepted():
    c = AscendConfig.from_options(
        {
            "stream_budget": 1,
            "memory_budget_bytes": 0,
            "max_graphs": 1,
            "max_batch": 1,
            "num_speculative_tokens": 0,
            "batch_dim": 0,
            "buckets": [1],
            "inductor_config": {"max_autotune": False, "triton.cudagraphs": False},
        }
    )
    assert c.buckets == (1,) and c.memory_budget_bytes == 0
    assert dict(c.inductor_config) == {"max_autotune": False, "triton.cudagraphs": False}
    assert AscendConfig(buckets=[2, 4]).buckets == (2, 4)  # a list is stored as a tuple (hashable, frozen)
    assert AscendConfig.from_options({"stream_budget": None, "memory_budget_bytes": None}).stream_budget is None


def test_unknown_inductor_key_suggests_the_close_one():
    with pytest.raises(ConfigError) as e:
        AscendConfig.from_options({"inductor_config": {"max_autotun": True}})
    assert "max_autotune" in str(e.value.expected)


def test_options_that_are_not_a_dict_are_a_config_error():
    gm = torch.fx.symbolic_trace(nn.Linear(3, 3))
    with pytest.raises(ConfigError) as e:
        ascend_backend(gm, [torch.randn(2, 3)], options=["codegen", "fx"])
    assert e.value.got == "list" and "dict" in str(e.value)
    with pytest.raises(ConfigError):
        AscendConfig.from_options([("codegen", "fx")])


class _Scale(nn.Module):
    def forward(self, x):
        return x * 2 + 1


def test_batch_dim_past_the_batch_inputs_rank_is_an_error_at_compile_time():
    # before: bucketing went off without a word (one graph per batch size)
    torch._dynamo.reset()
    cm = torch.compile(_Scale(), backend=ascend_backend, options={"codegen": "fx", "batch_dim": 2}, dynamic=True)
    with pytest.raises(Exception) as e:
        cm(torch.randn(3, 4))
    inner = _inner(e.value)
    assert isinstance(inner, ConfigError), inner
    assert "batch_dim 2" in str(inner) and "rank" in str(inner.expected)
    assert "batch_dim=2" in str(inner.got)


def test_batch_dim_in_range_still_buckets():
    import ascend_graph

    torch._dynamo.reset()
    ascend_graph.reset_stats()
    m = _Scale()
    cm = torch.compile(m, backend=ascend_backend, options={"codegen": "fx", "batch_dim": 1, "buckets": [4, 8]}, dynamic=True)
    for n in (3, 5, 7):
        x = torch.randn(2, n)
        torch.testing.assert_close(cm(x), m(x))
    st = ascend_graph.stats()
    assert st["graphs_compiled"] == 1 and st["replays"] == 3
    assert st["padding"]["padded_rows"] == 1 + 3 + 1  # 3->4, 5->8, 7->8 along dim 1
