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

    ascend_graph.reset_stats()
    yield
