"""Fusion family ``norm_rope``: RMSNorm, residual add + RMSNorm, q/k norm + RoPE, SiLU-and-mul.

Entry point: :func:`make_pass` (the pass manager calls it with the compile's config).

What is matched, as HF transformers 5.x writes it, after AOT tracing to ATen (each row
once with bf16/fp16 example inputs, where the fp32 upcasts appear as
``convert_element_type``, and once with fp32 inputs, where they vanish):

- RMSNorm, Llama/Qwen/DeepSeek form ``w * (h * rsqrt(mean(h**2, -1) + eps)).to(dt)`` with
  ``h = x.float()`` -> ``rms_norm(x, w, eps)``; Gemma form ``(h * rsqrt(..) * (1 +
  w.float())).to(dt)`` -> ``rms_norm(x, w, eps, gemma=True)``;
- residual add + RMSNorm, ``s = residual + x`` then the norm of ``s``, both used
  -> ``add_rms_norm`` (both outputs);
- q/k per-head RMSNorm + RoPE (neox ``rotate_half``, ``cos``/``sin`` ``[B, S, D]``
  unsqueezed at dim 1): Qwen3 (norm on ``[B, S, H, D]``, then ``transpose(1, 2)``),
  Gemma3 (transpose, then the Gemma norm), Llama (no norm) -> ``qk_norm_rope`` on the
  ``[B, S, H, D]`` views, transposed back (a view, free);
- partial rotary as Phi-3 / StableLM (no norm) and Qwen3-Next (the ``1 + w`` norm on
  ``[B, S, H, D]``, then the transpose) write it: ``R = cos.shape[-1] < D``,
  ``cat(rope(x[..., :R]), x[..., R:])`` -> ``qk_norm_rope`` (``rotary_dim=0``: R is the
  HF table's width);
- DeepSeek-V3's interleaved RoPE (transformers 5.x ``apply_rotary_pos_emb_interleave``:
  even/odd slices, ``cat(x1*c - x2*s, x2*c + x1*s)`` with the tables' first half) on MLA's
  ``q_rot [B, H, S, R]`` / ``k_rot [B, 1, S, R]`` -> ``qk_norm_rope(interleaved=True)``,
  whose output keeps each pair in place, then a de-interleaving permutation of the last
  dim (HF writes the pairs' first elements, then their second). transformers 5.x writes
  no model with the older de-interleaving ``view/transpose(4, 3)/reshape`` + rotate_half
  form, so it has no row;
- vLLM's native forms (``benchmarks/decode.py`` writes its model so): RMSNorm with the
  weight after the cast (``(h * rsqrt(..)).to(dt) * w``), with and without the residual
  add; RoPE over halves on flattened tokens (``x1, x2 = x.chunk(2); cat(x1*cos - x2*sin,
  x2*cos + x1*sin)``, ``x [T, H, D]``, tables ``[T, 1, D/2]``) after an optional per-head
  norm -> ``norm_rope`` per tensor: one cos/sin feeds every layer there, so a q/k
  two-output pattern would pair q of one layer with k of another (its k half is
  anchored at the tables' users); one launch per tensor is the safe unit;
- SiLU-and-mul: HF's two-linear ``silu(gate) * up`` -> ``silu_mul``; the chunk form
  ``silu(x[..., :d]) * x[..., d:]`` (and ``x.chunk(2, -1)``, also Phi-3's ``up * silu(gate)``
  order) -> ``silu_and_mul``;
- the KV write: a fused qkv projection's output, split, q/k norm + RoPE (the halves form
  above) and ``reshape_and_cache(k, v, ...)`` (functionalized: ``auto_functionalized_v2``
  or v1) -> ``qk_norm_rope_cache``: one op from the projection's output to q and both
  written caches (``extra_check``: the split sizes and views agree with the caches'
  ``[blocks, block_size, Hk, D]``, one dtype throughout).

- expert-parallel MoE + residual add + RMSNorm (NPU only): ``moe_dispatch_ffn_combine``
  with ``ep_world_size > 1`` and no shared experts, ``s = residual + moe``, the HF or vLLM
  norm of ``s`` -> ``moe_combine_add_rms_norm`` (``npu_moe_distribute_combine_add_rms_norm``:
  the MC2 combine, the add and the norm in one kernel). Off the NPU the pair stays (the
  EP combine is an all-to-all over torch.distributed and the family's ``add_rms_norm``
  row takes the add + norm) and ``stats()["skipped"]`` says so. These rows are built per
  MoE configuration found in the graph (:func:`moe_norm_rows`): the group name is a
  string, which the matcher matches only as a literal.

A tensor-parallel all-reduce before the add + norm (``_c10d_functional.all_reduce`` +
``wait_tensor``, or vLLM's ``torch.ops.vllm.all_reduce``) needs no row of its own: the
collective's output is the pattern's ``x``, so the graph becomes all_reduce ->
``add_rms_norm`` (tests/distributed/test_tp_norm.py).

cos/sin computed in the graph from positions are matched as they are (the table nodes
are the ops' inputs). Not matched: HF's static-cache write after RoPE
(``k_cache.index_copy_(2, cache_position, k)`` into ``[B, Hk, S_max, D]``):
``qk_norm_rope_cache`` starts from one fused qkv projection and writes paged
``[blocks, block_size, Hk, D]`` caches by flat slot, while HF projects q, k and v
separately and indexes a heads-first cache by position; the q/k norm + RoPE in front of
the ``index_copy`` fuses (tested), the write stays inductor's.

Per device ("never slower", DESIGN.md): the ops' CPU implementations are their plain
torch references, which inductor's fused C++ loops beat; so with inductor codegen on the
CPU the family leaves the graph alone and says so in ``stats()["skipped"]["norm_rope"]``.
It runs on CUDA (Triton kernels: one launch where inductor has one per norm plus the
RoPE), on NPU (torch_npu ops) and with ``codegen="fx"`` anywhere (the graph runs op by
op; the reference is the same ATen ops in one call). The decision is taken per graph
from its inputs' device, before matching.

Before matching, view nodes are moved up to just after their inputs (:func:`hoist_views`):
AOT places a view right before its first use, and a multi-output replacement is inserted
at its first output. Invariants: the replacements are functional (the cache write enters
as ``auto_functionalized_v2``, which inductor re-inplaces); ``extra_check`` keeps one
floating dtype across the norm's input and weight (the Llama form multiplies in it),
RoPE tables of q's dtype with ``R == D`` and the q/k leading dims.
"""

from __future__ import annotations

import dataclasses

import functools
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ... import _stats
from ...config import AscendConfig
from ...ops import comm_norm as _comm_ops  # noqa: F401  (registers the ops the replacements call)
from ...ops import norm_rope as _ops  # noqa: F401
from .. import pattern as pat
from ..base import GraphPass

__all__ = ["make_pass", "FUSIONS", "NormRopePass", "device_policy", "fuse_moe_combine_norm", "moe_norm_rows", "MOE_NORM_SKIP"]

FAMILY = "norm_rope"
ops = torch.ops.ascend_graph
aten = torch.ops.aten
_EPS = 1e-6

# -------------------------------------------------------------------------------------
# building blocks, written as the HF modules write them


def _rms(x, w, eps):
    # LlamaRMSNorm: w * (h * rsqrt(mean(h^2) + eps)).to(dtype), h = x.float()
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def _gemma_rms(x, w, eps):
    # Gemma3RMSNorm: (h * rsqrt(mean(h^2) + eps) * (1 + w.float())).type_as(x)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + w.float())).type_as(x)


def _rms_w_after(x, w, eps):
    # vLLM's RMSNorm.forward_native: (h * rsqrt(mean(h^2) + eps)).to(dtype) * w
    h = x.to(torch.float32)
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def _rope_halves(x, cos, sin):
    # vLLM's neox forward_native: x1, x2 = chunk(x, 2); cat(x1*cos - x2*sin, x2*cos + x1*sin)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _rope(q, k, cos, sin):
    # apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin)


def _rope_partial(q, k, cos, sin):
    # Qwen3-Next / Phi-3 / StableLM apply_rotary_pos_emb (partial_rotary_factor < 1): the
    # first R = cos.shape[-1] dims rotate, the rest pass through, cat([rope(x[:R]), x[R:]])
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    r = cos.shape[-1]
    q_rot, q_pass = q[..., :r], q[..., r:]
    k_rot, k_pass = k[..., :r], k[..., r:]
    q_embed = (q_rot * cos) + (_rotate_half(q_rot) * sin)
    k_embed = (k_rot * cos) + (_rotate_half(k_rot) * sin)
    return torch.cat([q_embed, q_pass], dim=-1), torch.cat([k_embed, k_pass], dim=-1)


def _rope_interleave(q, k, cos, sin):
    # DeepseekV3's apply_rotary_pos_emb_interleave (transformers 5.x): pairs (2i, 2i+1)
    # rotate by angle i (the tables' first half), the evens' results first, then the odds'
    cos = cos[..., : cos.shape[-1] // 2].unsqueeze(1)
    sin = sin[..., : sin.shape[-1] // 2].unsqueeze(1)
    q1, q2 = q[..., 0::2], q[..., 1::2]
    k1, k2 = k[..., 0::2], k[..., 1::2]
    q_embed = torch.cat([q1 * cos - q2 * sin, q2 * cos + q1 * sin], dim=-1)
    k_embed = torch.cat([k1 * cos - k2 * sin, k2 * cos + k1 * sin], dim=-1)
    return q_embed, k_embed


def _deinterleave(x):
    # the op leaves each rotated pair in place (GPT-J, npu_rotary_mul "interleave"); HF's
    # DeepSeek form writes the pairs' first elements, then their second: a permutation
    # of the last dim: a copy (under inductor a pointwise permutation it may fold into
    # MLA's following cat / key-states copy; not measured on a GPU yet)
    return x.unflatten(-1, (x.shape[-1] // 2, 2)).transpose(-1, -2).flatten(-2)


# -------------------------------------------------------------------------------------
# patterns and replacements


def _p_rms(x, w, eps):
    return _rms(x, w, eps)


def _r_rms(x, w, eps):
    return ops.rms_norm.default(x, w, eps, False)


def _p_gemma_rms(x, w, eps):
    return _gemma_rms(x, w, eps)


def _r_gemma_rms(x, w, eps):
    return ops.rms_norm.default(x, w, eps, True)


def _p_add_rms(x, residual, w, eps):
    s = residual + x
    return _rms(s, w, eps), s


def _r_add_rms(x, residual, w, eps):
    out = ops.add_rms_norm.default(residual, x, w, eps, False)
    return out[0], out[1]


def _p_add_gemma_rms(x, residual, w, eps):
    s = residual + x
    return _gemma_rms(s, w, eps), s


def _r_add_gemma_rms(x, residual, w, eps):
    out = ops.add_rms_norm.default(residual, x, w, eps, True)
    return out[0], out[1]


def _p_rms_w_after(x, w, eps):
    return _rms_w_after(x, w, eps)


def _p_add_rms_w_after(x, residual, w, eps):
    s = residual + x
    return _rms_w_after(s, w, eps), s


def _p_norm_rope_halves(q, qw, cos, sin, eps):
    # tokens flattened: q [T, H, D], cos/sin [T, 1, D/2]; one tensor (see norm_rope's docs)
    return _rope_halves(_rms_w_after(q, qw, eps), cos, sin)


def _r_norm_rope_halves(q, qw, cos, sin, eps):
    return ops.norm_rope.default(q, qw, cos.squeeze(-2), sin.squeeze(-2), eps, False, False, q.shape[-1])


def _p_rope_halves(q, cos, sin):
    return _rope_halves(q, cos, sin)


def _r_rope_halves(q, cos, sin):
    return ops.norm_rope.default(q, None, cos.squeeze(-2), sin.squeeze(-2), _EPS, False, False, q.shape[-1])


def _qkv_heads(qkv, k_cache):
    # heads from the cache's shape, so the matcher's re-trace at the graph's shapes
    # reproduces the graph's split sizes and views exactly
    hk, d = k_cache.shape[2], k_cache.shape[3]
    return qkv.shape[0], (qkv.shape[-1] // d) - 2 * hk, hk, d


def _p_qkv_cache_v2(qkv, qw, kw, cos, sin, k_cache, v_cache, slots, eps):
    # qkv projection -> split -> q/k norm + RoPE -> reshape_and_cache(k, v) (functionalized, v2)
    from torch._higher_order_ops.auto_functionalize import auto_functionalized_v2

    t, hq, hk, d = _qkv_heads(qkv, k_cache)
    q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    q = _rope_halves(_rms_w_after(q.view(t, hq, d), qw, eps), cos, sin)
    k = _rope_halves(_rms_w_after(k.view(t, hk, d), kw, eps), cos, sin)
    af = auto_functionalized_v2(
        ops.reshape_and_cache.default, k=k, v=v.view(t, hk, d), slot_mapping=slots,
        _k_cache_base_index=0, _v_cache_base_index=1, _all_bases=[k_cache, v_cache],
    )
    return af[1], af[2], q  # the cache first: the matcher anchors a multi-output pattern at its first output


def _p_qkv_cache_v1(qkv, qw, kw, cos, sin, k_cache, v_cache, slots, eps):
    from torch._higher_order_ops.auto_functionalize import auto_functionalized

    t, hq, hk, d = _qkv_heads(qkv, k_cache)
    q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    q = _rope_halves(_rms_w_after(q.view(t, hq, d), qw, eps), cos, sin)
    k = _rope_halves(_rms_w_after(k.view(t, hk, d), kw, eps), cos, sin)
    af = auto_functionalized(ops.reshape_and_cache.default, k=k, v=v.view(t, hk, d), k_cache=k_cache, v_cache=v_cache, slot_mapping=slots)
    return af[1], af[2], q  # the cache first: the matcher anchors a multi-output pattern at its first output


def _r_qkv_cache(qkv, qw, kw, cos, sin, k_cache, v_cache, slots, eps):
    # one op from the projection's output to q and the written caches
    from torch._higher_order_ops.auto_functionalize import auto_functionalized_v2

    hk, d = k_cache.shape[2], k_cache.shape[3]
    hq = qkv.shape[-1] // d - 2 * hk
    af = auto_functionalized_v2(
        ops.qk_norm_rope_cache.default, qkv=qkv, q_weight=qw, k_weight=kw, cos=cos.squeeze(-2), sin=sin.squeeze(-2),
        slot_mapping=slots, num_q_heads=hq, num_kv_heads=hk, eps=eps, gemma=False, interleaved=False, rotary_dim=d,
        _k_cache_base_index=0, _v_cache_base_index=1, _all_bases=[k_cache, v_cache],
    )
    return af[1], af[2], af[0]


def _r_qkv_cache_v1(qkv, qw, kw, cos, sin, k_cache, v_cache, slots, eps):
    from torch._higher_order_ops.auto_functionalize import auto_functionalized

    hk, d = k_cache.shape[2], k_cache.shape[3]
    hq = qkv.shape[-1] // d - 2 * hk
    af = auto_functionalized(
        ops.qk_norm_rope_cache.default, qkv=qkv, q_weight=qw, k_weight=kw, cos=cos.squeeze(-2), sin=sin.squeeze(-2),
        k_cache=k_cache, v_cache=v_cache, slot_mapping=slots, num_q_heads=hq, num_kv_heads=hk, eps=eps,
        gemma=False, interleaved=False, rotary_dim=d,
    )
    return af[1], af[2], af[0]


def _p_qk_norm_rope(q, k, qw, kw, cos, sin, eps):
    # Qwen3: q_norm(q_proj(x).view(B, S, H, D)).transpose(1, 2), then RoPE
    return _rope(_rms(q, qw, eps).transpose(1, 2), _rms(k, kw, eps).transpose(1, 2), cos, sin)


def _r_qk_norm_rope(q, k, qw, kw, cos, sin, eps):
    out = ops.qk_norm_rope.default(q, k, qw, kw, cos, sin, eps, False, False)
    return out[0].transpose(1, 2), out[1].transpose(1, 2)


def _p_qk_gemma_norm_rope(q, k, qw, kw, cos, sin, eps):
    # Gemma3: q_norm(q_proj(x).view(B, S, H, D).transpose(1, 2)), then RoPE
    return _rope(_gemma_rms(q.transpose(1, 2), qw, eps), _gemma_rms(k.transpose(1, 2), kw, eps), cos, sin)


def _r_qk_gemma_norm_rope(q, k, qw, kw, cos, sin, eps):
    out = ops.qk_norm_rope.default(q, k, qw, kw, cos, sin, eps, True, False)
    return out[0].transpose(1, 2), out[1].transpose(1, 2)


def _p_qk_rope(q, k, cos, sin):
    # Llama: q_proj(x).view(B, S, H, D).transpose(1, 2), then RoPE (no q/k norm)
    return _rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)


def _r_qk_rope(q, k, cos, sin):
    out = ops.qk_norm_rope.default(q, k, None, None, cos, sin, _EPS, False, False)
    return out[0].transpose(1, 2), out[1].transpose(1, 2)


def _p_qk_rope_partial(q, k, cos, sin):
    # Phi-3 / StableLM: q_proj(x).view(B, S, H, D).transpose(1, 2), partial RoPE (no q/k norm)
    return _rope_partial(q.transpose(1, 2), k.transpose(1, 2), cos, sin)


def _r_qk_rope_partial(q, k, cos, sin):
    # rotary_dim=0: R is the HF table's width (both halves), which is < D here
    out = ops.qk_norm_rope.default(q, k, None, None, cos, sin, _EPS, False, False, 0)
    return out[0].transpose(1, 2), out[1].transpose(1, 2)


def _p_qk_gemma_norm_rope_partial(q, k, qw, kw, cos, sin, eps):
    # Qwen3-Next: q_norm (the 1 + w form) on [B, S, H, D], transpose(1, 2), partial RoPE
    return _rope_partial(_gemma_rms(q, qw, eps).transpose(1, 2), _gemma_rms(k, kw, eps).transpose(1, 2), cos, sin)


def _r_qk_gemma_norm_rope_partial(q, k, qw, kw, cos, sin, eps):
    out = ops.qk_norm_rope.default(q, k, qw, kw, cos, sin, eps, True, False, 0)
    return out[0].transpose(1, 2), out[1].transpose(1, 2)


def _p_qk_rope_interleave(q, k, cos, sin):
    # DeepSeek-V3 (MLA): q_rot [B, H, S, R] and k_rot [B, 1, S, R] as they come out of the
    # split (no transpose to anchor on: the inputs are the rope's own operands)
    return _rope_interleave(q, k, cos, sin)


def _r_qk_rope_interleave(q, k, cos, sin):
    out = ops.qk_norm_rope.default(q.transpose(1, 2), k.transpose(1, 2), None, None, cos, sin, _EPS, False, True, 0)
    return _deinterleave(out[0]).transpose(1, 2), _deinterleave(out[1]).transpose(1, 2)


def _p_silu_mul(gate, up):
    # LlamaMLP: act_fn(gate_proj(x)) * up_proj(x)
    return F.silu(gate) * up


def _r_silu_mul(gate, up):
    return ops.silu_mul.default(gate, up)


def _p_silu_and_mul_chunk(x):
    # Phi-3 style: gate, up = gate_up_proj(x).chunk(2, dim=-1); silu(gate) * up
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def _p_silu_and_mul_chunk_up_first(x):
    # Phi3MLP: gate, up_states = gate_up_proj(x).chunk(2, dim=-1); up_states * act_fn(gate)
    # (the matcher does not commute a mul's operands: its own row)
    gate, up = x.chunk(2, dim=-1)
    return up * F.silu(gate)


def _p_silu_and_mul_slice(x, half):
    return F.silu(x[..., :half]) * x[..., half:]


def _r_silu_and_mul_chunk(x):
    return ops.silu_and_mul.default(x)


def _r_silu_and_mul_slice(x, half):
    return ops.silu_and_mul.default(x)


# -------------------------------------------------------------------------------------
# example inputs (odd sizes; the matcher generalises them) and checks

_B, _S, _H, _HK, _D, _N, _R = 2, 3, 4, 2, 8, 24, 4

#: q and k must be different nodes: the k half of a two-output pattern is otherwise
#: free to match the q chain again (the matcher anchors it at the shared cos/sin users)
_QK = ("q", "k")


def _ex(dtype: torch.dtype, *shapes: tuple[int, ...]) -> Callable[[], list[torch.Tensor]]:
    return lambda: [torch.randn(s, dtype=dtype) for s in shapes]


def _val(match: pat.Match, name: str) -> Any:
    node = match.kwargs.get(name)
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _check_norm(match: pat.Match) -> bool:
    """One floating dtype across input and weight; the weight is [N]."""
    x = _val(match, "x") if "x" in match.kwargs else _val(match, "q")
    w = _val(match, "w") if "w" in match.kwargs else _val(match, "qw")
    if x is None or w is None or not x.is_floating_point() or w.dtype != x.dtype or w.dim() != 1:
        return False
    residual = _val(match, "residual")
    if "residual" in match.kwargs and (residual is None or residual.shape != x.shape or residual.dtype != x.dtype):
        return False
    return w.shape[0] == x.shape[-1]


def _rope_tensors(match: pat.Match) -> tuple[torch.Tensor, ...] | None:
    """q, k, cos, sin when q/k are 4-D, cos/sin 3-D, one float dtype, matching batch, positions,
    head size and tables; else None (shared by the full and partial rotary checks)."""
    q, k, cos, sin = (_val(match, n) for n in ("q", "k", "cos", "sin"))
    if any(t is None for t in (q, k, cos, sin)) or q.dim() != 4 or k.dim() != 4 or cos.dim() != 3:
        return None
    if not q.is_floating_point() or len({q.dtype, k.dtype, cos.dtype, sin.dtype}) != 1:
        return None
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1] or cos.shape != sin.shape:
        return None
    if cos.shape[0] not in (1, q.shape[0]) or cos.shape[1] not in (1, q.shape[1]):
        return None
    return q, k, cos, sin


def _norm_weights_ok(match: pat.Match, q: torch.Tensor) -> bool:
    for name in ("qw", "kw"):
        if name in match.kwargs:
            w = _val(match, name)
            if w is None or w.dtype != q.dtype or tuple(w.shape) != (q.shape[-1],):
                return False
    return True


def _check_rope(match: pat.Match) -> bool:
    """q [B, S, H, D] and k [B, S, Hk, D]; cos/sin [B or 1, S or 1, D] in q's dtype (full rotary)."""
    found = _rope_tensors(match)
    if found is None:
        return False
    q, _, cos, _ = found
    if cos.shape[-1] != q.shape[-1] or q.shape[-1] % 2:
        return False
    return _norm_weights_ok(match, q)


def _check_rope_partial(match: pat.Match) -> bool:
    """As :func:`_check_rope` with the tables narrower than the head: ``R = cos.shape[-1]``
    even and ``< D`` (``R == D`` would be the full row's form with an empty pass-through)."""
    found = _rope_tensors(match)
    if found is None:
        return False
    q, _, cos, _ = found
    r = cos.shape[-1]
    if r % 2 or not 0 < r < q.shape[-1]:
        return False
    return _norm_weights_ok(match, q)


def _check_rope_interleave(match: pat.Match) -> bool:
    """q [B, Hq, S, R] and k [B, Hk, S, R] (heads before positions, as HF's attention has
    them); cos/sin [B or 1, S or 1, R] (HF's duplicated halves) in q's dtype, R even."""
    q, k, cos, sin = (_val(match, n) for n in ("q", "k", "cos", "sin"))
    if any(t is None for t in (q, k, cos, sin)) or q.dim() != 4 or k.dim() != 4 or cos.dim() != 3:
        return False
    if not q.is_floating_point() or len({q.dtype, k.dtype, cos.dtype, sin.dtype}) != 1 or cos.shape != sin.shape:
        return False
    b, _, s, r = q.shape
    if k.shape[0] != b or k.shape[2] != s or k.shape[-1] != r or r % 2:
        return False
    return cos.shape[0] in (1, b) and cos.shape[1] in (1, s) and cos.shape[-1] == r


def _check_rope_halves(match: pat.Match) -> bool:
    """q [T, H, D]; cos/sin [T or 1, 1, D/2] in q's dtype."""
    q, cos, sin = (_val(match, n) for n in ("q", "cos", "sin"))
    if any(t is None for t in (q, cos, sin)) or q.dim() != 3 or cos.dim() != 3:
        return False
    if not q.is_floating_point() or len({q.dtype, cos.dtype, sin.dtype}) != 1 or cos.shape != sin.shape or q.shape[-1] % 2:
        return False
    if cos.shape[0] not in (1, q.shape[0]) or cos.shape[1] != 1 or 2 * cos.shape[-1] != q.shape[-1]:
        return False
    w = _val(match, "qw")
    if "qw" in match.kwargs and (w is None or w.dtype != q.dtype or tuple(w.shape) != (q.shape[-1],)):
        return False
    return True


def _check_cache(match: pat.Match) -> bool:
    """The split and views agree with the caches' heads: qkv [T, (Hq + 2 Hk) * D], caches
    [blocks, block_size, Hk, D] (one dtype), q/k weights [D], tables [T or 1, 1, D/2]."""
    qkv, kc, vc, qw, kw, cos, sin, slots = (_val(match, n) for n in ("qkv", "k_cache", "v_cache", "qw", "kw", "cos", "sin", "slots"))
    if any(t is None for t in (qkv, kc, vc, qw, kw, cos, sin, slots)) or qkv.dim() != 2 or kc.dim() != 4 or kc.shape != vc.shape:
        return False
    t, width = qkv.shape
    hk, d = kc.shape[2], kc.shape[3]
    if width % d or width // d <= 2 * hk or len({qkv.dtype, kc.dtype, vc.dtype, qw.dtype, kw.dtype, cos.dtype, sin.dtype}) != 1:
        return False
    hq = width // d - 2 * hk
    if tuple(qw.shape) != (d,) or tuple(kw.shape) != (d,) or cos.shape != sin.shape or tuple(cos.shape[1:]) != (1, d // 2) or cos.shape[0] not in (1, t):
        return False
    if slots.dtype.is_floating_point or tuple(slots.shape) != (t,):
        return False
    sizes = [hq * d, hk * d, hk * d]
    for n in match.nodes:
        if n.target is torch.ops.aten.split_with_sizes.default and list(n.args[1]) != sizes:
            return False
        if n.target is torch.ops.aten.view.default and list(n.args[1])[1:] not in ([hq, d], [hk, d]):
            return False
    return True


def _check_silu(match: pat.Match) -> bool:
    """Floating point; two-tensor form: same shape and dtype (no broadcasting)."""
    if "x" in match.kwargs:
        x = _val(match, "x")
        half = match.kwargs.get("half")
        if x is None or not x.is_floating_point() or x.shape[-1] % 2:
            return False
        return half is None or half == x.shape[-1] // 2
    gate, up = _val(match, "gate"), _val(match, "up")
    return gate is not None and up is not None and gate.is_floating_point() and gate.shape == up.shape and gate.dtype == up.dtype


def _rows() -> tuple[pat.Fusion, ...]:
    rows: list[pat.Fusion] = []
    eps = {"eps": _EPS}
    # Rows that can match the same anchor come largest first (the add before the plain norm).
    for dt in (torch.bfloat16, torch.float32):
        tag = "bf16" if dt == torch.bfloat16 else "fp32"
        x, w, q, k = (_B, _S, _N), (_N,), (_B, _S, _H, _D), (_B, _S, _HK, _D)
        # (s = r + x, rms(s)) -> add_rms_norm(r, x)
        rows.append(pat.Fusion(f"add_rms_norm_{tag}", _p_add_rms, _r_add_rms, _ex(dt, x, x, w), _check_norm, eps))
        rows.append(pat.Fusion(f"add_gemma_rms_norm_{tag}", _p_add_gemma_rms, _r_add_gemma_rms, _ex(dt, x, x, w), _check_norm, eps))
        # rope(rms(q).T, rms(k).T) -> qk_norm_rope(q, k).T
        rows.append(pat.Fusion(f"qk_norm_rope_{tag}", _p_qk_norm_rope, _r_qk_norm_rope, _ex(dt, q, k, (_D,), (_D,), (_B, _S, _D), (_B, _S, _D)), _check_rope, eps, _QK))
        rows.append(pat.Fusion(f"qk_gemma_norm_rope_{tag}", _p_qk_gemma_norm_rope, _r_qk_gemma_norm_rope, _ex(dt, q, k, (_D,), (_D,), (_B, _S, _D), (_B, _S, _D)), _check_rope, eps, _QK))
        # rope(gemma_rms(q).T[..., :R]) ++ q.T[..., R:] -> qk_norm_rope(q, k, R < D).T (Qwen3-Next)
        rows.append(pat.Fusion(f"qk_gemma_norm_rope_partial_{tag}", _p_qk_gemma_norm_rope_partial, _r_qk_gemma_norm_rope_partial, _ex(dt, q, k, (_D,), (_D,), (_B, _S, _R), (_B, _S, _R)), _check_rope_partial, eps, _QK))
        # vLLM's forms (and benchmarks/decode.py's): the weight after the cast; tokens
        # flattened to [T], RoPE tables [T, 1, D/2]
        xt, qt, ct = (_B * _S, _N), (_B * _S, _H, _D), (_B * _S, 1, _D // 2)
        # qkv -> split -> q/k norm + RoPE -> the KV write (v2 and v1 functionalization)
        cache_ex = lambda dt=dt: [  # noqa: E731
            torch.randn(_B * _S, (_H + 2 * _HK) * _D, dtype=dt), torch.randn(_D, dtype=dt), torch.randn(_D, dtype=dt),
            torch.randn(_B * _S, 1, _D // 2, dtype=dt), torch.randn(_B * _S, 1, _D // 2, dtype=dt),
            torch.randn(5, 4, _HK, _D, dtype=dt), torch.randn(5, 4, _HK, _D, dtype=dt), torch.arange(_B * _S),
        ]
        rows.append(pat.Fusion(f"qkv_norm_rope_cache_v2_{tag}", _p_qkv_cache_v2, _r_qkv_cache, cache_ex, _check_cache, eps))
        rows.append(pat.Fusion(f"qkv_norm_rope_cache_v1_{tag}", _p_qkv_cache_v1, _r_qkv_cache_v1, cache_ex, _check_cache, eps))
        rows.append(pat.Fusion(f"add_rms_norm_w_after_{tag}", _p_add_rms_w_after, _r_add_rms, _ex(dt, xt, xt, w), _check_norm, eps))
        rows.append(pat.Fusion(f"norm_rope_halves_{tag}", _p_norm_rope_halves, _r_norm_rope_halves, _ex(dt, qt, (_D,), ct, ct), _check_rope_halves, eps))
        rows.append(pat.Fusion(f"rms_norm_w_after_{tag}", _p_rms_w_after, _r_rms, _ex(dt, xt, w), _check_norm, eps))
        # w * norm(x) -> rms_norm(x, w)
        rows.append(pat.Fusion(f"rms_norm_{tag}", _p_rms, _r_rms, _ex(dt, x, w), _check_norm, eps))
        rows.append(pat.Fusion(f"gemma_rms_norm_{tag}", _p_gemma_rms, _r_gemma_rms, _ex(dt, x, w), _check_norm, eps))
        # silu(x[:d]) * x[d:] -> silu_and_mul(x) (before the two-tensor row, which would
        # otherwise take the halves as two tensors); silu(g) * u -> silu_mul(g, u)
        rows.append(pat.Fusion(f"silu_and_mul_chunk_{tag}", _p_silu_and_mul_chunk, _r_silu_and_mul_chunk, _ex(dt, (_B, 2 * _N)), _check_silu))
        rows.append(pat.Fusion(f"silu_and_mul_chunk_up_first_{tag}", _p_silu_and_mul_chunk_up_first, _r_silu_and_mul_chunk, _ex(dt, (_B, 2 * _N)), _check_silu))
        rows.append(pat.Fusion(f"silu_and_mul_slice_{tag}", _p_silu_and_mul_slice, _r_silu_and_mul_slice, _ex(dt, (_B, 2 * _N)), _check_silu, {"half": _N}))
        rows.append(pat.Fusion(f"silu_mul_{tag}", _p_silu_mul, _r_silu_mul, _ex(dt, x, x), _check_silu))
    # rope(q.T, k.T) -> qk_norm_rope(q, k).T: no upcast in the RoPE, one row for all dtypes
    rows.append(pat.Fusion("qk_rope", _p_qk_rope, _r_qk_rope, _ex(torch.float32, (_B, _S, _H, _D), (_B, _S, _HK, _D), (_B, _S, _D), (_B, _S, _D)), _check_rope, {}, _QK))
    # cat(rope(q.T[..., :R]), q.T[..., R:]) -> qk_norm_rope(q, k, R < D).T (Phi-3, StableLM)
    rows.append(pat.Fusion("qk_rope_partial", _p_qk_rope_partial, _r_qk_rope_partial, _ex(torch.float32, (_B, _S, _H, _D), (_B, _S, _HK, _D), (_B, _S, _R), (_B, _S, _R)), _check_rope_partial, {}, _QK))
    # cat(q[0::2]*c - q[1::2]*s, q[1::2]*c + q[0::2]*s) -> deinterleave(qk_norm_rope(q, k, interleaved)) (DeepSeek-V3)
    rows.append(pat.Fusion("qk_rope_interleave", _p_qk_rope_interleave, _r_qk_rope_interleave, _ex(torch.float32, (_B, _H, _S, _D), (_B, _HK, _S, _D), (_B, _S, _D), (_B, _S, _D)), _check_rope_interleave, {}, _QK))
    rows.append(pat.Fusion("rope_halves", _p_rope_halves, _r_rope_halves, _ex(torch.float32, (_B * _S, _H, _D), (_B * _S, 1, _D // 2), (_B * _S, 1, _D // 2)), _check_rope_halves))
    return tuple(rows)


def _eps_is_a_number(match: "pm.Match") -> bool:
    # Under dynamic shapes a model's eps can reach the graph as a 0-dim tensor (seen with
    # DeepSeek-V3 in a dynamic graph); the ops take a float: leave such a norm unfused
    eps = match.kwargs.get("eps")
    return eps is None or (isinstance(eps, (int, float)) and not isinstance(eps, bool))


def _with_scalar_eps(row: pat.Fusion) -> pat.Fusion:
    check = row.extra_check
    return dataclasses.replace(row, extra_check=lambda match: _eps_is_a_number(match) and check(match))


_RMS = (aten.rsqrt.default, aten.mean.dim, aten.pow.Tensor_Scalar)
_SILU = (aten.exp.default, aten.div.Tensor, aten.neg.default)
#: ops each row's traced pattern contains (``Fusion.requires``; a test holds every row to
#: them): a graph without them is not traced against the row. An encoder (LayerNorm, GELU,
#: no RoPE) then traces none of the table, a model without RoPE none of the RoPE rows.
_ROW_REQUIRES: dict[str, tuple[Any, ...]] = {
    "add_rms_norm": _RMS,
    "add_gemma_rms_norm": _RMS,
    "add_rms_norm_w_after": _RMS,
    "rms_norm_w_after": _RMS,
    "rms_norm": _RMS,
    "gemma_rms_norm": _RMS,
    "qk_norm_rope": _RMS + (aten.cat.default, aten.neg.default),
    "qk_gemma_norm_rope": _RMS + (aten.cat.default, aten.neg.default),
    "qk_gemma_norm_rope_partial": _RMS + (aten.cat.default, aten.neg.default),
    "qkv_norm_rope_cache_v2": _RMS + (aten.cat.default, aten.split_with_sizes.default),
    "qkv_norm_rope_cache_v1": _RMS + (aten.cat.default, aten.split_with_sizes.default),
    "norm_rope_halves": _RMS + (aten.cat.default, aten.split.Tensor, aten.sub.Tensor),
    "silu_and_mul_chunk": _SILU + (aten.split.Tensor,),
    "silu_and_mul_chunk_up_first": _SILU + (aten.split.Tensor,),
    "silu_and_mul_slice": _SILU + (aten.slice.Tensor,),
    "silu_mul": _SILU,
    "qk_rope": (aten.cat.default, aten.neg.default, aten.permute.default),
    "qk_rope_partial": (aten.cat.default, aten.neg.default, aten.permute.default),
    "qk_rope_interleave": (aten.cat.default, aten.sub.Tensor, aten.slice.Tensor),
    "rope_halves": (aten.cat.default, aten.split.Tensor, aten.sub.Tensor),
}


def _with_requires(row: pat.Fusion) -> pat.Fusion:
    base = row.name.removesuffix("_bf16").removesuffix("_fp32")
    return dataclasses.replace(row, requires=_ROW_REQUIRES[base])


FUSIONS: tuple[pat.Fusion, ...] = tuple(_with_requires(_with_scalar_eps(row)) for row in _rows())


# -------------------------------------------------------------------------------------
# expert-parallel MoE combine + residual add + RMSNorm -> moe_combine_add_rms_norm (NPU)
#
# The MoE op's group name is a string, which the pattern matcher can only match as a
# literal; so these rows are built per (activation, mask, group, EP size, rank) found in
# the graph (memoised: the rows' identities key the built matcher), with the MoE node's
# arguments canonicalised first to the positional form tracing gives (trailing defaults
# dropped), since ``shard_experts_graph`` and adapters may pass them as keywords.

#: applied only on the NPU; elsewhere the pair stays (why, in stats()["skipped"])
MOE_NORM_SKIP = (
    "moe_combine_add_rms_norm: only the NPU has one kernel for the EP combine + add + RMSNorm "
    "(npu_moe_distribute_combine_add_rms_norm); elsewhere the all-to-all combine and add_rms_norm stay two ops"
)
_MOE = torch.ops.ascend_graph.moe_dispatch_ffn_combine.default


def _canonical_moe_args(node: torch.fx.Node) -> tuple[Any, ...]:
    """The MoE node's arguments as tracing records them: positional, trailing defaults dropped."""
    args = []
    for i, arg in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            args.append(node.args[i])
        elif arg.name in node.kwargs:
            args.append(node.kwargs[arg.name])
        else:
            args.append(arg.default_value)
    defaults = [a.default_value if a.has_default_value() else object() for a in node.target._schema.arguments]
    while args and not isinstance(args[-1], torch.fx.Node) and args[-1] == defaults[len(args) - 1]:
        args.pop()
    return tuple(args)


def _ep_moe_keys(graph: torch.fx.Graph, canonicalise: bool) -> list[tuple[str, bool, str, int, int]]:
    """(activation, masked, ep_group, ep_world_size, ep_rank) of each expert-parallel MoE
    node without shared experts (the fused kernel's contract, ops/comm_norm.py)."""
    keys = []
    for node in graph.nodes:
        if node.op != "call_function" or node.target is not _MOE:
            continue
        args = _canonical_moe_args(node)
        schema = _MOE._schema.arguments
        kw = {a.name: (args[i] if i < len(args) else a.default_value) for i, a in enumerate(schema)}
        if kw["ep_world_size"] <= 1 or any(kw[n] is not None for n in ("shared_gate", "shared_up", "shared_down", "shared_expert_gate")):
            continue
        if canonicalise:
            node.args, node.kwargs = args, {}
        key = (kw["activation"], kw["active_mask"] is not None, kw["ep_group"], kw["ep_world_size"], kw["ep_rank"])
        if key not in keys:
            keys.append(key)
    return keys


def _check_moe_norm(match: pat.Match) -> bool:
    """The kernel's dtypes (bf16/fp16, one across tokens, experts, residual and gamma), the
    norm's shapes as _check_norm."""
    x, w13 = _val(match, "x"), _val(match, "w13")
    return x is not None and w13 is not None and x.dtype in (torch.bfloat16, torch.float16) and w13.dtype == x.dtype and _check_norm(match)


@functools.lru_cache(maxsize=None)
def moe_norm_rows(activation: str, masked: bool, ep_group: str, ep_world_size: int, ep_rank: int) -> tuple[pat.Fusion, ...]:
    """The rows for one EP MoE configuration: HF (weight before the cast) and vLLM (after)
    norm forms, ``s = residual + moe(x)`` -> ``moe_combine_add_rms_norm``."""
    consts = (ep_group, ep_world_size, ep_rank)

    def moe(x, tw, ids, w13, w2, mask):
        return _MOE(x, tw, ids, w13, w2, activation, mask, None, None, None, *consts)

    def replace(x, tw, ids, w13, w2, mask, residual, w, eps):
        out = ops.moe_combine_add_rms_norm.default(x, tw, ids, w13, w2, residual, w, eps, activation, mask, *consts)
        return out[0], out[1]

    if masked:
        def p_hf(x, tw, ids, w13, w2, mask, residual, w, eps):
            s = residual + moe(x, tw, ids, w13, w2, mask)
            return _rms(s, w, eps), s

        def p_vllm(x, tw, ids, w13, w2, mask, residual, w, eps):
            s = residual + moe(x, tw, ids, w13, w2, mask)
            return _rms_w_after(s, w, eps), s

        r = replace
    else:
        def p_hf(x, tw, ids, w13, w2, residual, w, eps):
            s = residual + moe(x, tw, ids, w13, w2, None)
            return _rms(s, w, eps), s

        def p_vllm(x, tw, ids, w13, w2, residual, w, eps):
            s = residual + moe(x, tw, ids, w13, w2, None)
            return _rms_w_after(s, w, eps), s

        def r(x, tw, ids, w13, w2, residual, w, eps):
            return replace(x, tw, ids, w13, w2, None, residual, w, eps)

    def example() -> list[torch.Tensor]:
        # fake tensors: tracing the pattern must not run the EP op (it needs the group)
        from torch._subclasses.fake_tensor import FakeTensorMode

        bf = torch.bfloat16
        with FakeTensorMode():
            x = [torch.randn(_B * _S, _N, dtype=bf), torch.rand(_B * _S, 2, dtype=bf), torch.randint(0, 2 * ep_world_size, (_B * _S, 2)),
                 torch.randn(2, 2 * _D, _N, dtype=bf), torch.randn(2, _N, _D, dtype=bf)]
            x += [torch.ones(_B * _S, dtype=torch.bool)] if masked else []
            x += [torch.randn(_B * _S, _N, dtype=bf), torch.randn(_N, dtype=bf)]
        return x

    tag = f"moe_combine_add_rms_norm_{activation}_{'mask_' if masked else ''}{ep_group}_{ep_world_size}_{ep_rank}"
    return (
        pat.Fusion(f"{tag}_hf", p_hf, r, example, _check_moe_norm, {"eps": _EPS}),
        pat.Fusion(f"{tag}_vllm", p_vllm, r, example, _check_moe_norm, {"eps": _EPS}),
    )


def fuse_moe_combine_norm(graph: torch.fx.Graph, explain_node: str | None = None) -> int:
    """EP MoE + residual add + RMSNorm -> ``moe_combine_add_rms_norm``; no device policy
    here (the pass applies it on the NPU only). Returns the rewrites."""
    n = 0
    for key in _ep_moe_keys(graph, canonicalise=True):
        n += pat.PatternPass("fuse_moe_combine_add_rms_norm", FAMILY, moe_norm_rows(*key), explain_node=explain_node)(graph)
    return n


# -------------------------------------------------------------------------------------
# the per-device decision and the pass


def resolved_codegen(device_type: str | None, codegen: str) -> str:
    """The codegen a graph on ``device_type`` gets: ``auto`` is fx on the NPU, else inductor."""
    return codegen if codegen != "auto" else ("fx" if device_type == "npu" else "inductor")


def device_policy(device_type: str | None, codegen: str) -> str | None:
    """None where the family applies; else the reason it is skipped (goes to stats())."""
    if device_type == "cpu" and resolved_codegen(device_type, codegen) == "inductor":
        return "cpu+inductor: inductor's fused loops beat the ops' plain-torch CPU references"
    return None


def _graph_device(graph: torch.fx.Graph) -> str | None:
    kinds = set()
    for n in graph.nodes:
        if n.op == "placeholder":
            v = n.meta.get("val")
            if isinstance(v, torch.Tensor):
                kinds.add(v.device.type)
    accel = sorted(kinds - {"cpu"})
    return accel[0] if accel else ("cpu" if kinds else None)


#: ops that only re-describe their input (no copy, no compute)
_VIEW_OPS = frozenset(
    {
        torch.ops.aten.view.default,
        torch.ops.aten.reshape.default,
        torch.ops.aten._unsafe_view.default,
        torch.ops.aten.unsqueeze.default,
        torch.ops.aten.squeeze.dim,
        torch.ops.aten.permute.default,
        torch.ops.aten.transpose.int,
        torch.ops.aten.slice.Tensor,
        torch.ops.aten.expand.default,
    }
)


def hoist_views(graph: torch.fx.Graph) -> int:
    """Move every view node up to just after its latest input; returns the moves.

    Why: a two-output replacement (q and k) is inserted where the first output's chain
    is, but AOT places k's ``view`` of the projection right before k's first use, after
    q's chain; the rewritten graph would then use k before defining it. A view computes
    nothing and the graph is functional here (write-backs come last), so moving it up
    changes only the order.
    """
    order = {n: i for i, n in enumerate(graph.nodes)}
    moved = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _VIEW_OPS or not node.all_input_nodes:
            continue
        last = max(node.all_input_nodes, key=lambda a: order[a])
        if node.prev is not last:
            last.append(node)
            order[node] = order[last] + 0.5  # still after its input, before the input's old successors
            moved += 1
    return moved


class NormRopePass(pat.PatternPass):
    """The family's PatternPass, applied only where :func:`device_policy` allows."""

    def __init__(self, config: AscendConfig, name: str = "fuse_norm_rope", rows: tuple[pat.Fusion, ...] = FUSIONS):
        # name/rows: an adapter's own rows of this family (vLLM's ops) under the same policy
        super().__init__(name, FAMILY, rows, explain_node=config.explain_node)
        self.codegen = config.codegen

    def __call__(self, graph: torch.fx.Graph) -> int:
        reason = device_policy(_graph_device(graph), self.codegen)
        if reason is not None:
            _stats.record_skip(FAMILY, reason)
            return 0
        hoist_views(graph)
        n = 0
        if _ep_moe_keys(graph, canonicalise=False):
            # before the family's own rows, which would take the add + norm alone
            if _graph_device(graph) == "npu":
                n += fuse_moe_combine_norm(graph, self.explain_node)
            else:
                _stats.record_skip(FAMILY, MOE_NORM_SKIP)
        return n + super().__call__(graph)


def make_pass(config: AscendConfig) -> GraphPass | None:
    """The family's pass, or None when the config leaves the family out."""
    if FAMILY not in config.fusions:
        return None
    return NormRopePass(config)
