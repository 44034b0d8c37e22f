"""Attention contracts: dense attention, paged attention (TND) and the paged KV-cache write.

Entry points (all ``torch.ops.ascend_graph.*``, importable here as Python callables):

- :func:`attention` ``(q, k, v, attn_mask, sinks, scale, is_causal, window) -> out``
  dense attention in BNSD: ``q [B, Nq, Sq, D]``, ``k [B, Nkv, Skv, D]``,
  ``v [B, Nkv, Skv, Dv]`` -> ``out [B, Nq, Sq, Dv]``. ``Nq % Nkv == 0`` (GQA/MQA);
  ``Dv`` may differ from ``D`` (MLA). ``attn_mask`` broadcasts to ``[B, Nq, Sq, Skv]``
  and is either bool (True = attend, SDPA's convention) or floating (added to the
  logits). ``is_causal`` is *bottom-right* aligned (query ``i`` sits at KV position
  ``Skv - Sq + i``: what a KV cache needs, what FIA's sparse_mode 3 does).
  ``window > 0`` (causal only) keeps keys ``p - window < j <= p`` (HF's sliding
  window). ``sinks [Nq]`` are per-head logits of a virtual key with a zero value
  (gpt-oss style): they enlarge the softmax denominator only.
- :func:`paged_attention` ``(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens_kv,
  sinks, scale, window) -> out``: causal attention over a paged KV cache in TND:
  ``q [T, Nq, D]``, caches ``[num_blocks, block_size, Nkv, D|Dv]``, ``block_table
  [R, max_blocks]`` (int32), ``cu_seqlens_q [R+1]`` (cumulative query lengths, starting
  at 0), ``seq_lens_kv [R]`` (KV length of each request, the new tokens included).
  Query token ``j`` of request ``r`` sits at KV position ``seq_lens_kv[r] - q_len_r + j``.
  Rows ``t >= cu_seqlens_q[-1]`` (padding) are returned as zeros.
- :func:`reshape_and_cache` ``(k, v, k_cache, v_cache, slot_mapping)``: writes token
  ``t`` of ``k [T, Nkv, D]`` / ``v`` at flat slot ``slot_mapping[t]`` (block
  ``slot // block_size``, offset ``slot % block_size``); ``slot < 0`` is skipped (padded
  tokens never write). Mutates both caches; returns nothing.

The dense op's output is stored as ``[B, Sq, Nq, Dv]`` and returned as its
``transpose(1, 2)`` view (SDPA's layout), on every device.

Invariants: metadata (block tables, lengths, slots) are device tensors, never Python
lists, so a captured device graph never needs its arguments patched; fake impls give
shapes from input shapes only. The plain-torch references below are the ground truth
of the tests. The dense op runs through SDPA on CPU and CUDA
(:func:`dense_attention_sdpa`; with sinks, SDPA's fused kernels rescaled by their log-sum-exp); the
paged op and the cache write default to their references, with CUDA kernels from
``kernels/triton/attention.py``; NPU bindings come from ``kernels/npu/attention.py``.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import UnsupportedError

__all__ = [
    "attention",
    "paged_attention",
    "reshape_and_cache",
    "attention_reference",
    "paged_attention_reference",
    "reshape_and_cache_reference",
]

log = logging.getLogger("ascend_graph.ops.attention")


# --------------------------------------------------------------------------- checks


def _check_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, window: int) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise UnsupportedError("attention takes BNSD tensors", expected="q, k, v of 4 dims", got=[q.dim(), k.dim(), v.dim()])
    if q.shape[0] != k.shape[0] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise UnsupportedError(
            "attention shapes disagree",
            expected="q [B,Nq,Sq,D], k [B,Nkv,Skv,D], v [B,Nkv,Skv,Dv]",
            got=[tuple(q.shape), tuple(k.shape), tuple(v.shape)],
        )
    if q.shape[1] % k.shape[1] != 0:
        raise UnsupportedError("query heads must be a multiple of KV heads", expected=f"Nq % Nkv == 0", got=(q.shape[1], k.shape[1]))
    if window > 0 and not is_causal:
        raise UnsupportedError("a sliding window needs causal attention", expected="is_causal=True with window > 0", got=(is_causal, window))


def _check_paged(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.dim() != 4:
        raise UnsupportedError(
            "paged_attention takes q [T,N,D] and caches [blocks, block_size, Nkv, D]",
            expected="dims (3, 4, 4)",
            got=(q.dim(), k_cache.dim(), v_cache.dim()),
        )
    if q.shape[1] % k_cache.shape[2] != 0 or q.shape[2] != k_cache.shape[3] or k_cache.shape[:3] != v_cache.shape[:3]:
        raise UnsupportedError(
            "paged_attention shapes disagree",
            expected="Nq % Nkv == 0, q D == k_cache D, k/v caches of the same blocks and heads",
            got=[tuple(q.shape), tuple(k_cache.shape), tuple(v_cache.shape)],
        )


# --------------------------------------------------------------------------- references


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    sinks: Optional[torch.Tensor],
    scale: float,
    is_causal: bool,
    window: int,
) -> torch.Tensor:
    """Plain-torch dense attention in fp32; the ground truth of every implementation.

    A query row that may attend to nothing (all keys masked, no sink) returns zeros,
    like FIA and flash kernels (SDPA's math path would give NaN).
    """
    _check_dense(q, k, v, is_causal, window)
    nq, nkv = q.shape[1], k.shape[1]
    if nq != nkv:
        k = k.repeat_interleave(nq // nkv, dim=1)
        v = v.repeat_interleave(nq // nkv, dim=1)
    sq, skv = q.shape[2], k.shape[2]
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    keep = torch.ones(sq, skv, dtype=torch.bool, device=q.device)
    if is_causal:
        qpos = torch.arange(sq, device=q.device)[:, None] + (skv - sq)
        kpos = torch.arange(skv, device=q.device)[None, :]
        keep = kpos <= qpos
        if window > 0:
            keep = keep & (kpos > qpos - window)
    logits = logits.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        else:
            logits = logits + attn_mask.float()
    if sinks is not None:
        sink = sinks.float().view(1, nq, 1, 1).expand(logits.shape[0], nq, sq, 1)
        logits = torch.cat([logits, sink], dim=-1)
    row_max = logits.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.exp(logits - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    if sinks is not None:
        p = p[..., :-1]
    return _sdpa_layout(torch.matmul(p, v.float()).to(q.dtype))


def dense_attention_sdpa(q, k, v, attn_mask, sinks, scale, is_causal, window) -> torch.Tensor:
    """The dense op through ``F.scaled_dot_product_attention`` (the CPU and CUDA kernel).

    SDPA picks its fastest backend for the device (flash on CPU and CUDA, efficient or
    math where flash cannot run, e.g. MLA's Dv != D). Our bottom-right causal alignment
    and the sliding window become a boolean mask unless ``Sq == Skv`` with neither window
    nor mask (SDPA's own top-left ``is_causal`` is the same then). Sinks go through
    ``kernels/triton/attention_sinks.py`` (the fused kernel's log-sum-exp rescales its
    output by ``sigmoid(lse - sink)``). A fully masked row gives zeros
    in every SDPA backend of torch 2.11-2.13, as in the reference.
    """
    _check_dense(q, k, v, is_causal, window)
    sq, skv = q.shape[2], k.shape[2]
    mask = attn_mask
    sdpa_causal = False
    if is_causal:
        if sq == skv and window <= 0 and mask is None:
            sdpa_causal = True
        elif sq == 1 and (window <= 0 or window >= skv):
            pass  # one query at the end (decode): bottom-right causal masks nothing
        else:
            qpos = torch.arange(sq, device=q.device)[:, None] + (skv - sq)
            kpos = torch.arange(skv, device=q.device)[None, :]
            keep = kpos <= qpos
            if window > 0:
                keep = keep & (kpos > qpos - window)
            if mask is None:
                mask = keep
            elif mask.dtype == torch.bool:
                mask = mask & keep
            else:
                mask = mask.to(q.dtype).masked_fill(~keep, float("-inf"))
    elif mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    gqa = q.shape[1] != k.shape[1]
    if gqa and mask is not None and q.device.type == "cuda":
        # CUDA SDPA broadcasts kv heads only in its flash backend, which takes no mask: with
        # a mask, enable_gqa falls back to the math backend (measured on an H100: Qwen3
        # decode at batch 32, 1.93 ms against 1.73 ms unfused). Expanded heads keep the
        # memory-efficient backend, as HF's repeat_kv does.
        rep = q.shape[1] // k.shape[1]
        k, v, gqa = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), False
    if sinks is not None:
        # one fused SDPA call returning the log-sum-exp, then out * sigmoid(lse - sink)
        from .kernels.triton.attention_sinks import sdpa_with_sinks

        return _sdpa_layout(sdpa_with_sinks(q, k, v, mask, sinks, scale, sdpa_causal, gqa))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=sdpa_causal, scale=scale, enable_gqa=gqa)
    return _sdpa_layout(out)


def _sdpa_layout(out: torch.Tensor) -> torch.Tensor:
    """``out`` [B, N, S, Dv] stored as [B, S, N, Dv] (transposed view), like SDPA's
    flash/efficient outputs: the graphs that consume SDPA view its ``transpose(1, 2)``
    as [B, S, N*Dv] without a copy, and keep doing so after the rewrite."""
    b, n, s, dv = out.shape
    return out.new_empty(b, s, n, dv).transpose(1, 2).copy_(out)


def paged_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens_kv: torch.Tensor,
    sinks: Optional[torch.Tensor],
    scale: float,
    window: int,
) -> torch.Tensor:
    """Per-request gather of the paged KV, then :func:`attention_reference` (host loop)."""
    _check_paged(q, k_cache, v_cache)
    t, nq, _ = q.shape
    block_size, nkv, dv = k_cache.shape[1], k_cache.shape[2], v_cache.shape[3]
    out = q.new_zeros(t, nq, dv)
    cu = cu_seqlens_q.tolist()
    lens = seq_lens_kv.tolist()
    for r, kv_len in enumerate(lens):
        start, end = cu[r], cu[r + 1]
        if end <= start or kv_len <= 0:
            continue
        blocks = block_table[r, : (kv_len + block_size - 1) // block_size].long()
        k = k_cache[blocks].reshape(-1, nkv, k_cache.shape[3])[:kv_len]
        v = v_cache[blocks].reshape(-1, nkv, dv)[:kv_len]
        o = attention_reference(
            q[start:end].transpose(0, 1)[None],
            k.transpose(0, 1)[None],
            v.transpose(0, 1)[None],
            None,
            sinks,
            scale,
            True,
            window,
        )
        out[start:end] = o[0].transpose(0, 1)
    return out


def reshape_and_cache_reference(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    block_size = k_cache.shape[1]
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = k[valid].to(k_cache.dtype)
    v_cache[blocks, offsets] = v[valid].to(v_cache.dtype)


# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("ascend_graph::attention", mutates_args=())
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    sinks: Optional[torch.Tensor],
    scale: float,
    is_causal: bool,
    window: int,
) -> torch.Tensor:
    return dense_attention_sdpa(q, k, v, attn_mask, sinks, scale, is_causal, window)


@attention.register_fake
def _attention_fake(q, k, v, attn_mask, sinks, scale, is_causal, window):
    _check_dense(q, k, v, is_causal, window)
    return q.new_empty(q.shape[0], q.shape[2], q.shape[1], v.shape[3]).transpose(1, 2)


@torch.library.custom_op("ascend_graph::paged_attention", mutates_args=())
def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens_kv: torch.Tensor,
    sinks: Optional[torch.Tensor],
    scale: float,
    window: int,
) -> torch.Tensor:
    return paged_attention_reference(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens_kv, sinks, scale, window)


@paged_attention.register_fake
def _paged_attention_fake(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens_kv, sinks, scale, window):
    _check_paged(q, k_cache, v_cache)
    return q.new_empty(q.shape[0], q.shape[1], v_cache.shape[3])


@torch.library.custom_op("ascend_graph::reshape_and_cache", mutates_args=("k_cache", "v_cache"))
def reshape_and_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    reshape_and_cache_reference(k, v, k_cache, v_cache, slot_mapping)


@reshape_and_cache.register_fake
def _reshape_and_cache_fake(k, v, k_cache, v_cache, slot_mapping):
    return None


# --------------------------------------------------------------------------- CUDA


def _paged_cuda(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens_kv, sinks, scale, window):
    from .kernels.triton import attention as kernels

    _check_paged(q, k_cache, v_cache)
    return kernels.paged_attention_cuda(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens_kv, sinks, scale, window)


def _cache_cuda(k, v, k_cache, v_cache, slot_mapping):
    from .kernels.triton import attention as kernels

    kernels.reshape_and_cache_cuda(k, v, k_cache, v_cache, slot_mapping)


paged_attention.register_kernel("cuda", _paged_cuda)
reshape_and_cache.register_kernel("cuda", _cache_cuda)


def default_scale(head_dim: int) -> float:
    """SDPA's default softmax scale, ``1/sqrt(D)``."""
    return 1.0 / math.sqrt(head_dim)
