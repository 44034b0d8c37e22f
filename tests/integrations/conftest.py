"""Shared by the vLLM adapter and engine tests."""

from __future__ import annotations

import gc

import pytest


@pytest.fixture(scope="module", autouse=True)
def _collect_vllm_objects():
    """Collect the vLLM objects a module left behind before the next module runs.

    vLLM's CPU linear layers hold oneDNN handlers whose ``__del__`` calls ``.item()``; one
    collected later, while another module's test traces under a fake mode, raised there
    ("exception ignored", a warning in the CI log).
    """
    yield
    gc.collect()
