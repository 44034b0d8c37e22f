"""The padding planner: every padding rule, pure, shared by the runtime and the FX passes.

Entry points: :func:`plan_padding` (shapes of every input/output at a bucket) and
:func:`pad_into` (write one input into its static buffer with the role's pad value).

Batch to bucket: every dim that is a sympy expression of the batch symbol is padded by
substituting the bucket size (so an ``s*(1+k)`` token dim of an MTP verify batch pads
to ``bucket*(1+k)``); every other dim must be unchanged. Padded rows sit after the real
ones along each padded dim, so outputs are sliced back with ``narrow(dim, 0, real)``.

Pad values by role (``AscendConfig.pad_roles``, or a default chosen by input name):

=========  ===================================================  ===============
role       used for                                             padded rows
=========  ===================================================  ===============
zero       token ids, hidden states, anything else              0
index      positions, block_table rows                          0
slot       slot_mapping (a cache write index)                   -1: never writes
kv_len     KV / sequence lengths                                1
cu_len     cumulative query lengths (query_start_loc)           last + 1 per row
mask       active-token masks (MoE)                             False
=========  ===================================================  ===============
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import sympy
import torch

from ..capture.shapes import ShapeInfo
from ..errors import PaddingError

__all__ = ["PadPlan", "plan_padding", "pad_into", "slice_output", "role_for", "PAD_VALUE", "DEFAULT_ROLES_BY_NAME"]

PAD_VALUE: dict[str, Any] = {"zero": 0, "index": 0, "slot": -1, "kv_len": 1, "mask": False}

#: roles picked by input name when the user declared none (vLLM's and HF's names)
DEFAULT_ROLES_BY_NAME: dict[str, str] = {
    "slot_mapping": "slot",
    "slot_mappings": "slot",
    "cache_position": "index",
    "positions": "index",
    "position_ids": "index",
    "block_table": "index",
    "block_tables": "index",
    "seq_lens": "kv_len",
    "kv_lens": "kv_len",
    "context_lens": "kv_len",
    "query_start_loc": "cu_len",
    "cu_seqlens": "cu_len",
    "is_padding": "mask",
    "active_mask": "mask",
}


def role_for(name: str, declared: Mapping[str, str]) -> str:
    if name in declared:
        return declared[name]
    return DEFAULT_ROLES_BY_NAME.get(name, "zero")


@dataclass(frozen=True)
class PadPlan:
    """Shapes of one call at one bucket: real and padded, per input and per output."""

    bucket: int
    real_batch: int
    values: Mapping[sympy.Symbol, int]  # real values of every symbol
    padded_values: Mapping[sympy.Symbol, int]  # the same with the batch symbol at the bucket
    input_shapes: tuple[tuple[int, ...] | None, ...]  # padded shape per input (None: not a tensor)
    output_slices: tuple[tuple[tuple[int, int], ...] | None, ...]  # per output: (dim, real length) to narrow


def plan_padding(shapes: ShapeInfo, values: Mapping[sympy.Symbol, int], bucket: int) -> PadPlan:
    """Padded shapes for every input and the slices that undo padding on every output."""
    batch = shapes.batch_symbol
    if batch is None:
        raise PaddingError("this graph has no batch symbol", expected="a graph with a symbolic batch dim", got="a static graph")
    real = int(values[batch])
    if bucket < real:
        raise PaddingError("bucket smaller than the batch", expected=f"a bucket >= {real}", got=bucket)
    padded = dict(values)
    padded[batch] = bucket
    in_shapes: list[tuple[int, ...] | None] = []
    for v in shapes.inputs:
        if v.kind not in ("tensor", "param"):
            in_shapes.append(None)
            continue
        target = shapes.evaluate(v, padded)
        actual = shapes.evaluate(v, values)
        for d, (t, a) in enumerate(zip(target, actual)):
            if t < a or (t != a and batch not in v.dims[d].free_symbols):
                raise PaddingError(
                    f"input {v.name!r} dim {d} would shrink or change without depending on the batch",
                    expected=f"{v.dims[d]} at batch {bucket} >= its real size {a}",
                    got=t,
                )
        in_shapes.append(target)
    out_slices: list[tuple[tuple[int, int], ...] | None] = []
    for o in shapes.outputs:
        if o.kind != "tensor":
            out_slices.append(None)
            continue
        cuts = []
        for d, expr in enumerate(o.dims):
            if batch in expr.free_symbols:
                cuts.append((d, int(expr.subs(values))))
        out_slices.append(tuple(cuts))
    return PadPlan(bucket, real, dict(values), padded, tuple(in_shapes), tuple(out_slices))


def pad_into(dst: torch.Tensor, src: torch.Tensor, role: str) -> None:
    """Copy ``src`` into the leading corner of ``dst`` and fill the rest by ``role``.

    ``dst`` has the padded shape, ``src`` the real one (same rank, every dim <= dst's).
    """
    if dst.dim() != src.dim() or any(s > d for s, d in zip(src.shape, dst.shape)):
        raise PaddingError("cannot pad into a smaller or differently ranked buffer", expected=f"a buffer covering {tuple(src.shape)}", got=tuple(dst.shape))
    # A broadcast (stride-0) dim of the traced layout holds one value: write that one.
    for d, st in enumerate(dst.stride()):
        if st == 0 and dst.shape[d] > 1:
            dst = dst.narrow(d, 0, 1)
            src = src.narrow(d, 0, 1)
    region = dst
    for d, n in enumerate(src.shape):
        region = region.narrow(d, 0, n)
    if tuple(dst.shape) == tuple(src.shape):
        dst.copy_(src)
        return
    if role == "cu_len":
        _pad_cumulative(dst, src)
        return
    dst.fill_(PAD_VALUE.get(role, 0))
    region.copy_(src)


def _pad_cumulative(dst: torch.Tensor, src: torch.Tensor) -> None:
    """query_start_loc [R+1] -> [R_pad+1]: each dummy request holds one token."""
    if src.dim() != 1:
        raise PaddingError("a cu_len input must be 1-D", expected="shape [num_requests + 1]", got=tuple(src.shape))
    n = src.shape[0]
    dst[:n].copy_(src)
    extra = dst.shape[0] - n
    if extra:
        steps = torch.arange(1, extra + 1, device=dst.device, dtype=dst.dtype)
        dst[n:].copy_(src[n - 1 :].expand(extra) + steps if n else steps)


def slice_output(out: Any, cuts: Sequence[tuple[int, int]] | None) -> Any:
    if not cuts or not isinstance(out, torch.Tensor):
        return out
    for d, n in cuts:
        out = out.narrow(d, 0, n)
    return out
