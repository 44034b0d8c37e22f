"""The vLLM host hook (entry point ``ascend_graph.hosts: vllm``), apart from the adapter.

The core asks every host hook on every compile (``plugins.host_compile``), inside vLLM
and outside it. Outside vLLM the answer is None, and finding that out must cost
nothing: the adapter (:mod:`ascend_graph.integrations.vllm`) imports the pass manager
and inductor's pattern matcher, about a second on a 2-core CPU, which a warm start from
the offline cache otherwise never needs. So this module imports only ``sys``; the
adapter is imported the first time a compile runs while vLLM's config module is loaded.
"""

from __future__ import annotations

import sys
from typing import Any


def host_compile() -> Any:
    """:func:`ascend_graph.integrations.vllm.host_compile` where vLLM is loaded, else None."""
    if "vllm.config" not in sys.modules:  # vLLM is not running in this process
        return None
    from .vllm import host_compile as adapter_hook

    return adapter_hook()
