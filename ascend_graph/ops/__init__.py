"""Fused-op contracts: ``torch.library`` custom ops in the ``ascend_graph`` namespace.

Conventions every family module (``ops/<family>.py``) follows:

- each op is ``@torch.library.custom_op("ascend_graph::<name>", mutates_args=...)``
  whose default implementation is the CPU reference in plain torch (the ground truth
  for tests; it also runs on any device as a fallback);
- ``@<op>.register_fake`` gives output shapes from input shapes only (no data-dependent
  shapes), so the op survives Dynamo, AOT tracing, inductor and graph capture as one
  opaque node;
- the CUDA implementation lives in ``ops/kernels/triton/<family>.py`` and is attached
  with ``<op>.register_kernel("cuda", ...)`` in the family module (registration is
  unconditional; Triton is imported lazily when the kernel first runs);
- the NPU binding lives in ``ops/kernels/npu/<family>.py`` as plain functions calling
  the torch_npu op whose contract the op mirrors, and a ``register()`` that attaches them
  with ``register_kernel("npu", ...)``; :func:`ascend_graph.ops.kernels.npu.register_all`
  runs them when an NPU graph is compiled (it needs torch_npu, absent here);
- graph-side metadata (lengths, indices, masks) are device tensors, never Python lists.

Importing this package registers every op.
"""

from __future__ import annotations

import importlib
import logging

log = logging.getLogger("ascend_graph.ops")

#: family modules; each registers its ops on import
FAMILIES = ("attention", "causal_conv", "gated_delta", "moe", "norm_rope", "comm_norm")

for _family in FAMILIES:
    try:
        importlib.import_module(f"{__name__}.{_family}")
    except ModuleNotFoundError as _e:  # a family not written yet
        if _e.name != f"{__name__}.{_family}":
            raise
