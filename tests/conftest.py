import os
import tempfile

import pytest

# Inductor's cache goes to a temporary dir per test session (never the user's).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="ascend-graph-inductor-"))

import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_stats():
    import ascend_graph

    # Dynamo's cache outlives a test, and its guards compare object ids: a new model (or a
    # new backend wrapper) allocated where a freed one lived could hit an earlier test's
    # compiled code, so the backend (and its passes) would never run for this test.
    torch._dynamo.reset()
    ascend_graph.reset_stats()
    yield
