"""With ``cache_dir``, a frame's first graph is batch-dynamic (cache/dynamic.py), on the installed torch.

The backend re-traces a static first graph with the batch dim dynamic (Dynamo's
automatic-dynamic state plus its restart), so a server whose first batch is 3 meets the
graph ``ascend-graph build`` caches. Batch 1 stays static (Dynamo specialises size 1),
``dynamic=False`` and graphs without ``cache_dir`` are left alone, and a model that
specialises on its batch is compiled static after one restart, never looped.
"""

from __future__ import annotations

import pytest
import torch

import ascend_graph.backend as backend
from ascend_graph.cache import dynamic
from tests.cache.helpers import FX, MLP


@pytest.fixture
def graphs(monkeypatch):
    """The batch symbol of every graph the backend compiles (None: static)."""
    seen = []
    real = backend.compile_graph

    def spy(gm, example_inputs, config, **kwargs):
        compiled = real(gm, example_inputs, config, **kwargs)
        seen.append(compiled.shapes.batch_symbol if hasattr(compiled, "shapes") else "?")
        return compiled

    monkeypatch.setattr(backend, "compile_graph", spy)
    return seen


def _run(model, sizes, options, **compile_kwargs):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="ascend", options=options, **compile_kwargs)
    with torch.no_grad():
        for n in sizes:
            x = torch.randn(n, 8, generator=torch.Generator().manual_seed(n))
            torch.testing.assert_close(compiled(x), model(x))


def test_internals_are_there():
    assert dynamic.supported() is None


def test_first_batch_3_compiles_one_batch_dynamic_graph(tmp_path, graphs):
    _run(MLP().eval(), [3, 4, 7], {"cache_dir": str(tmp_path), **FX})
    assert len(graphs) == 1 and graphs[0] is not None


def test_first_batch_1_stays_static_then_one_dynamic_graph(tmp_path, graphs):
    _run(MLP().eval(), [1, 3, 5], {"cache_dir": str(tmp_path), **FX})
    assert len(graphs) == 2 and graphs[0] is None and graphs[1] is not None


def test_without_cache_dir_or_with_dynamic_false_the_first_graph_is_static(tmp_path, graphs):
    _run(MLP().eval(), [3], dict(FX))
    _run(MLP().eval(), [3, 4], {"cache_dir": str(tmp_path), **FX}, dynamic=False)
    assert graphs == [None, None, None]


class Branchy(torch.nn.Module):
    """Specialises on its batch: Dynamo guards on it even in a dynamic dim."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        if x.shape[0] == 3:
            return self.lin(x) * 2
        return self.lin(x)


def test_a_model_that_specialises_on_its_batch_is_restarted_once(tmp_path, graphs):
    _run(Branchy().eval(), [3], {"cache_dir": str(tmp_path), **FX})
    assert graphs == [None]
