"""NPU bindings of ``ops/norm_rope.py`` to torch_npu's norm, RoPE and SwiGLU ops.

Entry point: :func:`register` (called by ``register_all`` when an NPU graph is compiled).
Nothing here has run on an NPU; names, keywords and output shapes are held to
torch-npu 2.13.0 by ``tests/ops/test_npu_contract.py`` (``META_CHECKS`` below).

- ``rms_norm`` -> ``npu_rms_norm`` (Llama form) / ``npu_gemma_rms_norm`` (``1 + weight``);
  both return ``(y, rstd)``: rstd dropped.
- ``add_rms_norm`` -> ``npu_add_rms_norm(x1, x2, gamma, epsilon)`` -> ``(y, rstd, x1 + x2)``;
  the Gemma form has no fused add op in 2.13.0: the add, then ``npu_gemma_rms_norm``.
- ``silu_and_mul`` -> ``npu_swiglu(x, dim=-1)`` (``swish(A) * B`` over the halves).
  ``silu_mul(gate, up)`` (two tensors) stays plain torch: ``npu_swiglu`` needs the halves
  in one tensor, and a ``cat`` to make one costs what it saves.
- ``qk_norm_rope`` -> ``npu_rms_norm`` / ``npu_gemma_rms_norm`` per head, then
  ``npu_rotary_mul(x, cos, sin, rotary_mode)`` on the ``[1, T, N, D]`` (BSND) view with
  ``cos``/``sin`` as ``[1, T, 1, R]`` (the 1S1D layout its docstring allows in both modes):
  ``"half"`` for neox, ``"interleave"`` for GPT-J pairs (cos/sin repeated per pair, as its
  formula ``r1 * x + r2 * x_new`` needs). Partial rotary applies it to the first ``R`` dims.
- ``norm_rope`` (one tensor) -> the same for one tensor.
- ``qk_norm_rope_cache`` -> the above, then ``npu_scatter_pa_kv_cache(k, v, k_cache,
  v_cache, slot_mapping, cache_mode="Norm")``. torch-npu 2.13.0's one-op chain
  ``npu_qkv_rms_norm_rope_cache`` writes the cache in ``cache_mode`` layouts the wheel does
  not document (default ``"PA_NZ"``, the NZ fractal layout, not our ``[blocks, block_size,
  Hk, D]``) and needs both gammas: it is declared in the contract test, and bound once its
  ND cache mode is confirmed on a device.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from . import with_torch_npu

__all__ = ["register", "META_CHECKS"]


def _norm_call(torch_npu: Any, x, weight, eps, gemma=False):
    if gemma:
        return torch_npu.npu_gemma_rms_norm(x, weight, epsilon=eps)[0]
    return torch_npu.npu_rms_norm(x, weight, epsilon=eps)[0]


def _add_norm_call(torch_npu: Any, x, residual, weight, eps, gemma=False):
    if gemma or x.shape != residual.shape:
        s = x + residual
        return _norm_call(torch_npu, s, weight, eps, gemma), s
    y, _rstd, s = torch_npu.npu_add_rms_norm(x, residual, weight, epsilon=eps)
    return y, s


def _swiglu_call(torch_npu: Any, x):
    return torch_npu.npu_swiglu(x, dim=-1)


def _silu_mul_call(torch_npu: Any, gate, up):
    return F.silu(gate) * up


def _rope_one(torch_npu: Any, x3: torch.Tensor, cos2: torch.Tensor, sin2: torch.Tensor, interleaved: bool, R: int) -> torch.Tensor:
    """x3 [T, N, D]; cos2/sin2 [T, R] or [T, R/2] (one column per frequency) -> RoPE of x3's first R dims."""
    T, N, D = x3.shape
    if not interleaved and cos2.shape[-1] != R:
        cos2, sin2 = torch.cat((cos2, cos2), dim=-1), torch.cat((sin2, sin2), dim=-1)
    if interleaved:
        cos2 = cos2[:, : R // 2].repeat_interleave(2, dim=-1)
        sin2 = sin2[:, : R // 2].repeat_interleave(2, dim=-1)
    c, s = cos2.view(1, T, 1, R), sin2.view(1, T, 1, R)
    rot = x3[..., :R].contiguous().view(1, T, N, R)
    out = torch_npu.npu_rotary_mul(rot, c, s, rotary_mode="interleave" if interleaved else "half").view(T, N, R)
    return torch.cat((out, x3[..., R:]), dim=-1) if R < D else out


def _qk_call(torch_npu: Any, q, k, q_weight, k_weight, cos, sin, eps, gemma=False, interleaved=False, rotary_dim=0):
    if q_weight is not None:
        q = _norm_call(torch_npu, q, q_weight, eps, gemma)
    if k_weight is not None:
        k = _norm_call(torch_npu, k, k_weight, eps, gemma)
    R, cols = rotary_dim or cos.shape[-1], cos.shape[-1]
    q3, k3 = q.reshape(-1, q.shape[-2], q.shape[-1]), k.reshape(-1, k.shape[-2], k.shape[-1])
    lead = tuple(q.shape[:-2])
    c2, s2 = cos.expand(*lead, cols).reshape(-1, cols).to(q.dtype), sin.expand(*lead, cols).reshape(-1, cols).to(q.dtype)
    return _rope_one(torch_npu, q3, c2, s2, interleaved, R).view(q.shape), _rope_one(torch_npu, k3, c2, s2, interleaved, R).view(k.shape)


def _one_call(torch_npu: Any, x, weight, cos, sin, eps, gemma=False, interleaved=False, rotary_dim=0):
    if weight is not None:
        x = _norm_call(torch_npu, x, weight, eps, gemma)
    R, cols = rotary_dim or cos.shape[-1], cos.shape[-1]
    lead = tuple(x.shape[:-2])
    c2, s2 = cos.expand(*lead, cols).reshape(-1, cols).to(x.dtype), sin.expand(*lead, cols).reshape(-1, cols).to(x.dtype)
    return _rope_one(torch_npu, x.reshape(-1, x.shape[-2], x.shape[-1]), c2, s2, interleaved, R).view(x.shape)


def _qk_cache_call(torch_npu: Any, qkv, q_weight, k_weight, cos, sin, k_cache, v_cache, slot_mapping, num_q_heads, num_kv_heads, eps, gemma=False, interleaved=False, rotary_dim=0):
    from ...norm_rope import _split_qkv

    q, k, v = _split_qkv(qkv, num_q_heads, num_kv_heads)
    q, k = _qk_call(torch_npu, q, k, q_weight, k_weight, cos, sin, eps, gemma, interleaved, rotary_dim)
    torch_npu.npu_scatter_pa_kv_cache(k, v.contiguous(), k_cache, v_cache, slot_mapping, cache_mode="Norm")
    return q


def register() -> None:
    """Attach the NPU kernels (needs torch_npu: the "npu" device must exist)."""
    from ... import norm_rope as ops

    ops.rms_norm.register_kernel("npu", with_torch_npu(_norm_call))
    ops.add_rms_norm.register_kernel("npu", with_torch_npu(_add_norm_call))
    ops.silu_and_mul.register_kernel("npu", with_torch_npu(_swiglu_call))
    ops.silu_mul.register_kernel("npu", with_torch_npu(_silu_mul_call))
    ops.qk_norm_rope.register_kernel("npu", with_torch_npu(_qk_call))
    ops.qk_norm_rope_cache.register_kernel("npu", with_torch_npu(_qk_cache_call))
    ops.norm_rope.register_kernel("npu", with_torch_npu(_one_call))


# --------------------------------------------------------------------------- contract rows
# (op, build) -> (our fake impl's output shapes, args, kwargs of the torch_npu call)

_BF = torch.bfloat16


def _case_rms():
    x, w = torch.empty(3, 5, 96, dtype=_BF), torch.empty(96, dtype=_BF)
    return [(3, 5, 96)], (x, w), {"epsilon": 1e-6}


def _case_add_rms():
    x, w = torch.empty(7, 96, dtype=_BF), torch.empty(96, dtype=_BF)
    # (y, rstd, x1 + x2): ours are y and the sum; rstd's shape is [7, 1]
    return [(7, 96), (7, 1), (7, 96)], (x, x, w), {"epsilon": 1e-6}


def _case_swiglu():
    return [(4, 3, 44)], (torch.empty(4, 3, 88, dtype=_BF),), {"dim": -1}


def _case_rotary_mul():
    x, c = torch.empty(1, 9, 4, 64, dtype=_BF), torch.empty(1, 9, 1, 64, dtype=_BF)
    # the meta function names the mode ``mode`` (the C++ op and Python API: ``rotary_mode``); left at its default
    return [(1, 9, 4, 64)], (x, c, c), {}


META_CHECKS = [
    ("npu_rms_norm", _case_rms),
    ("npu_gemma_rms_norm", _case_rms),
    ("npu_add_rms_norm", _case_add_rms),
    ("npu_swiglu", _case_swiglu),
    ("npu_rotary_mul", _case_rotary_mul),
]
