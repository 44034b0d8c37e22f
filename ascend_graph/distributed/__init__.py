"""Expert and tensor parallelism on torch.distributed (gloo, NCCL, HCCL).

``groups``: the refcounted registry every collective path takes its groups from.
``ep``: ``moe_dispatch_ffn_combine`` across ranks (dispatch, local experts, combine)
off the NPU, where the MC2 kernels do not exist.
"""

from .groups import DistributedError, acquire, group, registry, release, resolve

__all__ = ["DistributedError", "acquire", "release", "group", "registry", "resolve"]
