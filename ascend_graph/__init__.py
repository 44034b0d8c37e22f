"""ascend-graph: compile-time graph capture and fusion for LLM inference on Ascend NPUs.

``torch.compile(model, backend="ascend", options={...})`` needs no import of this
package (the backend is found through the ``torch_dynamo_backends`` entry point).
What is public is listed in ``__all__``; everything else is internal.
"""

from ._stats import reset_stats, stats
from ._version import __version__
from .config import AscendConfig
from .errors import AscendGraphError, CacheError, CaptureError, ConfigError, PaddingError, UnsupportedError

__all__ = [
    "__version__",
    "AscendConfig",
    "stats",
    "reset_stats",
    "warmup",
    "estimate_graph_memory",
    "AscendGraphError",
    "ConfigError",
    "UnsupportedError",
    "CaptureError",
    "PaddingError",
    "CacheError",
]


def warmup(compiled_model, *args, **kwargs):
    """Capture every bucket of the graphs ``compiled_model`` runs for these inputs.

    Calls ``compiled_model(*args, **kwargs)`` once with warm-up of all buckets switched
    on for the graphs it reaches, and returns its output.
    """
    from .runtime.runner import warmup_scope

    with warmup_scope():
        return compiled_model(*args, **kwargs)


def estimate_graph_memory(compiled_model, *args, **kwargs) -> int:
    """Bytes the device-graph pool will grow by when every bucket of the graphs
    ``compiled_model`` runs for these inputs is captured, known before any capture.

    Calls ``compiled_model(*args, **kwargs)`` once (served without graphs) and, in each
    bucketed graph it reaches, trial-captures a few buckets largest first (the largest,
    the next, then about one a halving down to the smallest) into a throw-away pool,
    released again. The estimate is that pool's growth: all graphs share one pool and
    never run at once, so the largest bucket dominates and smaller ones add only what
    their allocation sizes need beyond it. Graphs of several compiled functions: the
    largest first capture plus what each function's later captures added. 0 where there
    are no device graphs (CPU, ``graphs=False``). A graph compiled for static shapes has
    no buckets: call the model with a second batch size first (or compile with
    ``dynamic=True``). The figure is the allocator's (``memory_reserved``), as the
    runtime's per-bucket ``pool_bytes`` are; the driver's per-graph executables are not in it.
    """
    from .runtime.runner import combine_estimates, estimate_scope

    with estimate_scope() as found:
        compiled_model(*args, **kwargs)
    return combine_estimates(found)
