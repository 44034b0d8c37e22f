"""The small ops around attention and the MLP: RMSNorm, residual add + RMSNorm,
SiLU-and-mul, q/k per-head RMSNorm + RoPE, and the same with the KV-cache write.

Entry points (``torch.ops.ascend_graph.<name>`` and the Python functions of the same name):

- ``rms_norm(x, weight, eps, gemma) -> y``: ``x [..., N]``, ``weight [N]``. ``gemma=False``
  is Llama's form (``weight * (x.float() * rsqrt(mean(x.float()**2) + eps)).to(x.dtype)``:
  the weight is applied after the cast, in x's dtype); ``gemma=True`` is Gemma's
  (``(x.float() * rsqrt(...) * (1 + weight.float())).to(x.dtype)``). vLLM's
  ``rms_norm(x, weight, eps)`` (``RMSNorm.forward_native``: cast, then the weight) is
  ``gemma=False``; vLLM's ``GemmaRMSNorm`` is ``gemma=True``.
- ``add_rms_norm(x, residual, weight, eps, gemma) -> (y, s)``: ``s = x + residual`` in
  x's dtype, ``y = rms_norm(s, ...)``; both outputs, as vLLM's ``fused_add_rms_norm``
  (whose in-place form writes ``y`` into ``x`` and ``s`` into ``residual``: the adapter
  copies them back) and ``npu_add_rms_norm`` (which also returns rstd: dropped).
- ``silu_and_mul(x) -> silu(x[..., :d]) * x[..., d:]`` (``d = x.shape[-1] // 2``; vLLM's
  ``silu_and_mul``, ``npu_swiglu``) and ``silu_mul(gate, up) -> silu(gate) * up`` (HF's
  two-linear MLP). ``silu`` rounds to the input dtype before the multiply, as eager does.
- ``qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps, gemma, interleaved, rotary_dim)
  -> (q', k')``:
  ``q [..., Hq, D]``, ``k [..., Hk, D]`` (the same leading dims, e.g. ``[B, S]`` or
  ``[T]``), per-head RMSNorm over ``D`` when the weight is given (``[D]``; None skips the
  norm: Llama), then RoPE on the first ``R`` dims (``cos``/``sin`` ``[..., R]``, the
  leading dims of q, each either equal or 1: HF shares one position row across the batch;
  ``R < D`` is partial rotary, the rest passes through). Neox
  (``interleaved=False``): ``x*cos + rotate_half(x)*sin`` over the R dims, cos/sin in
  HF's duplicated-halves layout. Interleaved (GPT-J, ``npu_interleave_rope``): pairs
  ``(2i, 2i+1)`` rotate by ``cos[..., i]``, ``sin[..., i]`` (``i < R/2``; the second half of
  cos/sin is not read). ``rotary_dim=0``: ``R = cos.shape[-1]`` (HF's table, both halves
  equal); ``rotary_dim=R``: the table has ``R/2`` columns, one per frequency (vLLM's
  ``cos_sin_cache`` halves, what its ``forward_native`` multiplies by). Outputs have q's
  and k's shapes, contiguous, in q's dtype.
- ``norm_rope(x, weight, cos, sin, eps, gemma, interleaved, rotary_dim) -> x'``: the same
  for one tensor (one launch per tensor): for graphs whose q and k chains share nothing
  but the tables (vLLM's layout, where one cos/sin feeds every layer), which a
  two-output pattern cannot pair reliably.
- ``qk_norm_rope_cache(qkv, q_weight, k_weight, cos, sin, k_cache, v_cache, slot_mapping,
  num_q_heads, num_kv_heads, eps, gemma, interleaved, rotary_dim) -> q'``: ``qkv [T, (Hq + 2 Hk) * D]``
  (the fused qkv projection's output); q and k as ``qk_norm_rope`` (cos/sin ``[T, R]``),
  then k' and v written to ``k_cache``/``v_cache`` ``[blocks, block_size, Hk, D]`` at flat
  slot ``slot_mapping[t]`` (``slot < 0``: padded token, not written), as
  ``reshape_and_cache``; returns ``q' [T, Hq, D]``. Mutates both caches. Mirrors
  ``npu_qkv_rms_norm_rope_cache`` (split, q/k RMSNorm, RoPE, paged KV write).

Invariants: fake impls give shapes from input shapes only; every reference below is
plain torch doing what the HF model does, op for op and rounding for rounding (the
ground truth of the tests, and what the CPU runs). CUDA runs
``kernels/triton/norm_rope.py`` (fp32 arithmetic inside one kernel; within bf16 tolerance
of the references); NPU binds ``kernels/npu/norm_rope.py``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import UnsupportedError

__all__ = [
    "rms_norm",
    "add_rms_norm",
    "silu_and_mul",
    "silu_mul",
    "qk_norm_rope",
    "qk_norm_rope_cache",
    "norm_rope",
    "rms_norm_reference",
    "rope_reference",
    "qk_norm_rope_reference",
    "qk_norm_rope_cache_reference",
]


# --------------------------------------------------------------------------- checks


def _check_norm(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise UnsupportedError("rms_norm: weight must be [N] with N = x.shape[-1]", expected=f"[{x.shape[-1]}]", got=tuple(weight.shape))
    if not x.is_floating_point():
        raise UnsupportedError("rms_norm: x must be floating point", expected="float16/bfloat16/float32", got=str(x.dtype))


def _rotary_dim(cos: torch.Tensor, rotary_dim: int) -> int:
    return rotary_dim if rotary_dim > 0 else cos.shape[-1]


def _check_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int = 0) -> None:
    if q.dim() < 2 or k.dim() != q.dim() or q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1]:
        raise UnsupportedError("qk_norm_rope: q [..., Hq, D] and k [..., Hk, D] must share leading dims and D", expected="matching q, k", got=[tuple(q.shape), tuple(k.shape)])
    R = _rotary_dim(cos, rotary_dim)
    lead = tuple(q.shape[:-2])
    cols_ok = cos.shape[-1] == (R // 2 if rotary_dim > 0 else R)
    ok = cols_ok and cos.shape == sin.shape and cos.dim() - 1 == len(lead) and all(c in (1, n) for c, n in zip(cos.shape[:-1], lead))
    if not ok or R % 2 or R > q.shape[-1]:
        raise UnsupportedError(
            "qk_norm_rope: cos/sin must be [..., R] over q's leading dims (or 1 where broadcast), R even and <= D",
            expected=f"{lead + ('R',)} with R <= {q.shape[-1]}",
            got=[tuple(cos.shape), tuple(sin.shape)],
        )


# --------------------------------------------------------------------------- references


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool = False) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        return (h * (1.0 + weight.float())).to(x.dtype)
    return weight * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False, rotary_dim: int = 0) -> torch.Tensor:
    """RoPE of ``x [..., H, D]`` with ``cos``/``sin`` ``[..., R]`` or ``[..., R/2]`` (broadcast over heads)."""
    R = _rotary_dim(cos, rotary_dim)
    if rotary_dim > 0 and not interleaved:  # one column per frequency: both halves use it
        cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    rot, rest = x[..., :R], x[..., R:]
    if interleaved:
        c, s = cos[..., : R // 2], sin[..., : R // 2]
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    else:
        out = rot * cos + _rotate_half(rot) * sin
    return torch.cat((out, rest), dim=-1) if R < x.shape[-1] else out


def qk_norm_rope_reference(q, k, q_weight, k_weight, cos, sin, eps, gemma=False, interleaved=False, rotary_dim=0):
    if q_weight is not None:
        q = rms_norm_reference(q, q_weight, eps, gemma)
    if k_weight is not None:
        k = rms_norm_reference(k, k_weight, eps, gemma)
    return rope_reference(q, cos, sin, interleaved, rotary_dim).contiguous(), rope_reference(k, cos, sin, interleaved, rotary_dim).contiguous()


def _split_qkv(qkv: torch.Tensor, num_q_heads: int, num_kv_heads: int):
    T, width = qkv.shape
    if width % (num_q_heads + 2 * num_kv_heads):
        raise UnsupportedError("qk_norm_rope_cache: qkv width must be (Hq + 2 Hk) * D", expected=f"a multiple of {num_q_heads + 2 * num_kv_heads}", got=width)
    D = width // (num_q_heads + 2 * num_kv_heads)
    q, k, v = qkv.split([num_q_heads * D, num_kv_heads * D, num_kv_heads * D], dim=-1)
    return q.view(T, num_q_heads, D), k.view(T, num_kv_heads, D), v.view(T, num_kv_heads, D)


def _write_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache[slots // block_size, slots % block_size] = k[keep].to(k_cache.dtype)
    v_cache[slots // block_size, slots % block_size] = v[keep].to(v_cache.dtype)


def qk_norm_rope_cache_reference(qkv, q_weight, k_weight, cos, sin, k_cache, v_cache, slot_mapping, num_q_heads, num_kv_heads, eps, gemma=False, interleaved=False, rotary_dim=0):
    q, k, v = _split_qkv(qkv, num_q_heads, num_kv_heads)
    q, k = qk_norm_rope_reference(q, k, q_weight, k_weight, cos, sin, eps, gemma, interleaved, rotary_dim)
    _write_cache(k, v, k_cache, v_cache, slot_mapping)
    return q


# --------------------------------------------------------------------------- ops


@torch.library.custom_op("ascend_graph::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool = False) -> torch.Tensor:
    """RMSNorm over the last dim; mirrors ``npu_rms_norm`` / ``npu_gemma_rms_norm``."""
    _check_norm(x, weight)
    return rms_norm_reference(x, weight, eps, gemma)


@rms_norm.register_fake
def _(x, weight, eps, gemma=False):
    _check_norm(x, weight)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("ascend_graph::add_rms_norm", mutates_args=())
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual), x + residual)``; mirrors ``npu_add_rms_norm``."""
    _check_norm(x, weight)
    s = x + residual
    return rms_norm_reference(s, weight, eps, gemma), s


@add_rms_norm.register_fake
def _(x, residual, weight, eps, gemma=False):
    _check_norm(x, weight)
    s = torch.empty(torch.broadcast_shapes(x.shape, residual.shape), dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
    return torch.empty_like(s), s


@torch.library.custom_op("ascend_graph::silu_and_mul", mutates_args=())
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]``; mirrors ``npu_swiglu``."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


@silu_and_mul.register_fake
def _(x):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


@torch.library.custom_op("ascend_graph::silu_mul", mutates_args=())
def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (HF's ``act_fn(gate_proj(x)) * up_proj(x)``)."""
    return F.silu(gate) * up


@silu_mul.register_fake
def _(gate, up):
    return torch.empty(torch.broadcast_shapes(gate.shape, up.shape), dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)


@torch.library.custom_op("ascend_graph::qk_norm_rope", mutates_args=())
def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: Optional[torch.Tensor],
    k_weight: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    gemma: bool = False,
    interleaved: bool = False,
    rotary_dim: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm (optional) + RoPE of q and k; mirrors ``npu_rms_norm`` + ``npu_rotary_mul``."""
    _check_rope(q, k, cos, sin, rotary_dim)
    return qk_norm_rope_reference(q, k, q_weight, k_weight, cos, sin, eps, gemma, interleaved, rotary_dim)


@qk_norm_rope.register_fake
def _(q, k, q_weight, k_weight, cos, sin, eps, gemma=False, interleaved=False, rotary_dim=0):
    _check_rope(q, k, cos, sin, rotary_dim)
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device)


@torch.library.custom_op("ascend_graph::norm_rope", mutates_args=())
def norm_rope(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    gemma: bool = False,
    interleaved: bool = False,
    rotary_dim: int = 0,
) -> torch.Tensor:
    """Per-head RMSNorm (optional) + RoPE of one tensor ``[..., H, D]``; mirrors ``npu_rms_norm`` + ``npu_rotary_mul``."""
    _check_rope(x, x, cos, sin, rotary_dim)
    if weight is not None:
        x = rms_norm_reference(x, weight, eps, gemma)
    return rope_reference(x, cos, sin, interleaved, rotary_dim).contiguous()


@norm_rope.register_fake
def _(x, weight, cos, sin, eps, gemma=False, interleaved=False, rotary_dim=0):
    _check_rope(x, x, cos, sin, rotary_dim)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("ascend_graph::qk_norm_rope_cache", mutates_args=("k_cache", "v_cache"))
def qk_norm_rope_cache(
    qkv: torch.Tensor,
    q_weight: Optional[torch.Tensor],
    k_weight: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    eps: float,
    gemma: bool = False,
    interleaved: bool = False,
    rotary_dim: int = 0,
) -> torch.Tensor:
    """Split qkv, q/k RMSNorm + RoPE, k/v into the paged cache; mirrors ``npu_qkv_rms_norm_rope_cache``."""
    return qk_norm_rope_cache_reference(qkv, q_weight, k_weight, cos, sin, k_cache, v_cache, slot_mapping, num_q_heads, num_kv_heads, eps, gemma, interleaved, rotary_dim)


@qk_norm_rope_cache.register_fake
def _(qkv, q_weight, k_weight, cos, sin, k_cache, v_cache, slot_mapping, num_q_heads, num_kv_heads, eps, gemma=False, interleaved=False, rotary_dim=0):
    D = qkv.shape[-1] // (num_q_heads + 2 * num_kv_heads)
    return qkv.new_empty((qkv.shape[0], num_q_heads, D))


# --------------------------------------------------------------------------- CUDA


@rms_norm.register_kernel("cuda")
def _(x, weight, eps, gemma=False):
    from .kernels.triton import norm_rope as tk

    _check_norm(x, weight)
    return tk.rms_norm(x, weight, eps, gemma)


@add_rms_norm.register_kernel("cuda")
def _(x, residual, weight, eps, gemma=False):
    from .kernels.triton import norm_rope as tk

    _check_norm(x, weight)
    if x.shape != residual.shape or x.dtype != residual.dtype:
        s = x + residual
        return tk.rms_norm(s, weight, eps, gemma), s
    return tk.add_rms_norm(x, residual, weight, eps, gemma)


@silu_and_mul.register_kernel("cuda")
def _(x):
    from .kernels.triton import norm_rope as tk

    d = x.shape[-1] // 2
    return tk.silu_mul(x[..., :d], x[..., d:])


@silu_mul.register_kernel("cuda")
def _(gate, up):
    from .kernels.triton import norm_rope as tk

    if gate.shape != up.shape or gate.dtype != up.dtype:
        return F.silu(gate) * up
    return tk.silu_mul(gate, up)


@qk_norm_rope.register_kernel("cuda")
def _(q, k, q_weight, k_weight, cos, sin, eps, gemma=False, interleaved=False, rotary_dim=0):
    from .kernels.triton import norm_rope as tk

    _check_rope(q, k, cos, sin, rotary_dim)
    return tk.qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps, gemma, interleaved, _rotary_dim(cos, rotary_dim))


@norm_rope.register_kernel("cuda")
def _(x, weight, cos, sin, eps, gemma=False, interleaved=False, rotary_dim=0):
    from .kernels.triton import norm_rope as tk

    _check_rope(x, x, cos, sin, rotary_dim)
    return tk.norm_rope(x, weight, cos, sin, eps, gemma, interleaved, _rotary_dim(cos, rotary_dim))


@qk_norm_rope_cache.register_kernel("cuda")
def _(qkv, q_weight, k_weight, cos, sin, k_cache, v_cache, slot_mapping, num_q_heads, num_kv_heads, eps, gemma=False, interleaved=False, rotary_dim=0):
    from .kernels.triton import norm_rope as tk

    return tk.qk_norm_rope_cache(qkv, q_weight, k_weight, cos, sin, k_cache, v_cache, slot_mapping, num_q_heads, num_kv_heads, eps, gemma, interleaved, _rotary_dim(cos, rotary_dim))
