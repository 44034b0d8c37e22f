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
