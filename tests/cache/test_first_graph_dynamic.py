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


# -- a frame the cache holds batch-dynamic: its first trace is batch-dynamic, no restart --


@pytest.fixture
def restarts(monkeypatch):
    """Every restart the backend raised (a static first trace thrown away)."""
    raised = []
    real = dynamic.restart_batch_dynamic

    def spy(*args, **kwargs):
        try:
            return real(*args, **kwargs)
        except Exception:
            raised.append(True)
            raise

    monkeypatch.setattr(dynamic, "restart_batch_dynamic", spy)
    return raised


def _frame_records(cache_dir):
    from ascend_graph.cache.store import CacheStore

    return [s.manifest.get("frame") for s in CacheStore(str(cache_dir)).summaries()]


def test_a_batch_dynamic_entry_records_its_frame_and_batch_inputs(tmp_path, graphs, restarts):
    _run(MLP().eval(), [3], {"cache_dir": str(tmp_path), **FX})
    assert restarts == [True] and len(graphs) == 1  # no record yet: the static trace restarted
    (record,) = [r for r in _frame_records(tmp_path) if r is not None]
    assert record["batch_dim"] == 0 and list(record["sources"].values()) == [2]
    assert record["code"]["name"] and record["code"]["firstlineno"] > 0


def test_a_frame_the_cache_holds_is_traced_batch_dynamic_first(tmp_path, graphs, restarts):
    model = MLP().eval()
    _run(model, [3], {"cache_dir": str(tmp_path), **FX})
    del graphs[:], restarts[:]
    # a new process, as far as Dynamo's state goes (_run resets it): the record seeds it
    _run(model, [5, 2, 7], {"cache_dir": str(tmp_path), **FX})
    assert restarts == [] and len(graphs) == 1 and graphs[0] is not None


def test_batch_1_first_stays_static_with_a_record(tmp_path, graphs):
    model = MLP().eval()
    _run(model, [3], {"cache_dir": str(tmp_path), **FX})
    del graphs[:]
    _run(model, [1, 4], {"cache_dir": str(tmp_path), **FX})
    assert len(graphs) == 2 and graphs[0] is None and graphs[1] is not None  # as ascend-graph build traces


def test_other_backends_compiles_without_cache_dir_and_dynamic_false_are_not_seeded(tmp_path, graphs):
    model = MLP().eval()
    _run(model, [3], {"cache_dir": str(tmp_path), **FX})
    seen = []

    def other_backend(gm, example_inputs):
        seen.append(any(isinstance(s, torch.SymInt) for t in example_inputs if isinstance(t, torch.Tensor) for s in t.shape))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=other_backend)(torch.randn(3, 8))
    assert seen == [False]
    del graphs[:]
    _run(model, [3], dict(FX))
    assert graphs == [None]
    del graphs[:]
    _run(model, [3], {"cache_dir": str(tmp_path), **FX}, dynamic=False)  # no automatic dynamic: nothing to seed
    assert graphs == [None]


def test_the_seeding_state_pickles_and_copies_as_dynamos_own():
    import collections
    import copy
    import pickle

    from torch._dynamo import pgo

    torch._dynamo.reset()
    state = pgo.get_code_state()
    assert type(state) is not collections.defaultdict  # the seeding map is installed
    assert type(pickle.loads(pickle.dumps(state))) is collections.defaultdict  # Dynamo's PGO file
    assert type(copy.deepcopy(state)) is collections.defaultdict


def test_no_record_and_no_seed_outside_a_trace():
    """A compile outside Dynamo (``compile_graph`` called directly, in a thread that never
    traced): no frame to record, nothing raised."""
    import threading
    import types

    from ascend_graph.config import AscendConfig

    gm = torch.fx.symbolic_trace(MLP())
    shapes = types.SimpleNamespace(batch_symbol="s0", inputs=[])
    out = []
    thread = threading.Thread(target=lambda: out.append(dynamic.frame_record(gm, shapes, AscendConfig())))
    thread.start()
    thread.join()
    assert out == [None]
