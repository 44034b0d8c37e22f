"""The MoE expert kernels compile once for every batch bucket (their Triton specialisation key).

Triton specialises an int argument on "divisible by 16". The pair count P (tokens x
top-k) changes that from one bucket to the next (17 tokens x 8 slots: 136 at batch 1,
272 at 2), and it is only a bound in these kernels. A new compile per bucket at capture
time cost Qwen3-Next 3-4 compiles per bucket on the H100 (session 13). Triton's own binder
(its CUDA backend, no GPU needed) shows the key the launch would use.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from ascend_graph.ops.kernels.triton import moe_fused  # noqa: E402

KERNELS = ["_w13_kernel", "_w2_kernel", "_ffn_kernel"]


def _key(kernel, **ints):
    binder = create_function_from_signature(kernel.signature, kernel.params, make_backend(GPUTarget("cuda", 90, 32)))
    buf = torch.zeros(64)
    args = {}
    for p in kernel.params:
        if p.name.endswith("_ptr"):
            args[p.name] = buf
        elif p.is_constexpr:
            args[p.name] = 1
        else:
            args[p.name] = 64
    args.update(ints)
    _, specialization, _ = binder(**args, debug=False, instrumentation_mode="")
    return [tuple(s) for s in specialization]


@pytest.mark.parametrize("name", KERNELS)
def test_pair_count_does_not_change_the_key(name):
    kernel = getattr(moe_fused, name)
    keys = {str(_key(kernel, P=17 * 8 * b)) for b in (1, 2, 4, 8)} | {str(_key(kernel, P=64)), str(_key(kernel, P=33))}
    assert len(keys) == 1


@pytest.mark.parametrize("name", KERNELS)
def test_strides_are_still_specialised(name):
    kernel = getattr(moe_fused, name)
    stride = next(p.name for p in kernel.params if p.name.startswith("stride") or p.name.startswith("s13"))
    assert _key(kernel, **{stride: 64}) != _key(kernel, **{stride: 33})
