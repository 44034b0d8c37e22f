"""Triton experts for ``moe_dispatch_ffn_combine_list``: per-expert weight tensors, never stacked.

Entry point: :func:`list_experts` (attached to the op's ``cuda`` key by
``ascend_graph/ops/moe.py``); :func:`list_supported` says when it applies. On the CPU the
kernels run under ``TRITON_INTERPRET=1`` (how the tests check them).

The experts' weights stay where the model keeps them (one ``nn.Linear`` weight per expert
and projection). A kernel reads expert ``e``'s weight through a *pointer table*: an int64
device tensor of the tensors' ``data_ptr()``, loaded and cast to a typed pointer in the
kernel. The table is built once per distinct list of addresses (:func:`pointer_table`) and
kept for the life of the process, because a captured CUDA graph holds its address: it is
built on the first (warm-up) call, outside capture, and every later call, captured or
replayed, finds it. Building it anew would be a host-to-device copy, which a capture
forbids, and stacking the weights would copy them all every call.

Launches, all with static shapes (one captured graph serves any routing):

1. ``moe_fused.align_blocks``: the ``P = T*k`` (token, slot) pairs grouped by expert into
   blocks of ``BM`` slots (ids outside ``[0, E)`` and inactive tokens never placed);
2. ``_gate_up_kernel``: per (block, N-tile) the block's expert's gate and up tiles (two
   tables, or one ``[gate; up]`` weight), ``act(gate) * up`` into ``hidden[P, I]``;
3. ``_down_kernel``: per (block, N-tile) the down projection times the routing weight,
   into an fp32 ``y[P, H]`` zeroed first (rows of pairs that do no work stay zero);
4. ``y.view(T, k, H).sum(1)`` cast to ``x.dtype`` (fp32 accumulation, as the contract).

Block sizes are fixed, not tuned (the stacked op's ``moe_fused.CONFIGS`` were measured for
that path); ``benchmarks/moe_list.py`` compares this path with the eager ModuleList loop
and with the stacked op on the GPU.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .moe_fused import _act, _interpreting, _mma, align_blocks

__all__ = ["list_experts", "list_supported", "pointer_table"]

_ACT_IDS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

#: (device, addresses) -> int64 table of those addresses on the device. Never evicted: a
#: captured graph may read a table long after the call that built it (a few bytes per
#: layer and projection).
_TABLES: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}


def pointer_table(ws: list[torch.Tensor]) -> torch.Tensor:
    """The device table of ``ws``' data pointers (built on first use, then reused)."""
    key = (str(ws[0].device), tuple(w.data_ptr() for w in ws))
    table = _TABLES.get(key)
    if table is None:
        table = torch.tensor(key[1], dtype=torch.int64, device=ws[0].device)
        _TABLES[key] = table
    return table


def list_supported(x: torch.Tensor, w1: list[torch.Tensor], w3: list[torch.Tensor], w2: list[torch.Tensor]) -> bool:
    """Whether :func:`list_experts` takes these operands: one float dtype, one stride per list."""
    if x.dtype not in _TL_DTYPES:
        return False
    # a kernel reads every expert of a list with the first one's strides (gate's for up too)
    return len({w.stride() for w in w1 + w3}) == 1 and len({w.stride() for w in w2}) == 1


@triton.jit
def _gate_up_kernel(
    x_ptr, w1_table, w3_table, out_ptr, sorted_ptr, block_expert_ptr,
    P, N, H,
    stride_xt, stride_xh, stride_wn, stride_wh, stride_op,
    TOPK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr,
    ACT: tl.constexpr, DT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:
        return
    pairs = tl.load(sorted_ptr + pid_m * BM + tl.arange(0, BM))
    rmask = pairs < P
    tok = (pairs // TOPK).to(tl.int64)
    n = pid_n * BN + tl.arange(0, BN)
    nmask = n < N
    kk = tl.arange(0, BK)
    wg = tl.load(w1_table + e).to(tl.pointer_type(DT))
    if SPLIT:
        wu = tl.load(w3_table + e).to(tl.pointer_type(DT))
    else:
        wu = wg + N * stride_wn  # [gate; up] rows: up starts N rows below
    a_ptrs = x_ptr + tok[:, None] * stride_xt + kk[None, :] * stride_xh
    g_ptrs = wg + n[None, :] * stride_wn + kk[:, None] * stride_wh
    u_ptrs = wu + n[None, :] * stride_wn + kk[:, None] * stride_wh
    acc_g = tl.zeros([BM, BN], dtype=tl.float32)
    acc_u = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, H, BK):
        kin = k0 + kk < H
        a = tl.load(a_ptrs, mask=rmask[:, None] & kin[None, :], other=0.0)
        g = tl.load(g_ptrs, mask=nmask[None, :] & kin[:, None], other=0.0)
        u = tl.load(u_ptrs, mask=nmask[None, :] & kin[:, None], other=0.0)
        acc_g = _mma(a, g, acc_g, DOT_PRECISION, UPCAST)
        acc_u = _mma(a, u, acc_u, DOT_PRECISION, UPCAST)
        a_ptrs += BK * stride_xh
        g_ptrs += BK * stride_wh
        u_ptrs += BK * stride_wh
    h = _act(acc_g, ACT) * acc_u
    o_ptrs = out_ptr + pairs.to(tl.int64)[:, None] * stride_op + n[None, :]
    tl.store(o_ptrs, h.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & nmask[None, :])


@triton.jit
def _down_kernel(
    h_ptr, w2_table, y_ptr, tw_ptr, sorted_ptr, block_expert_ptr,
    P, N, KD,
    stride_hp, stride_wn, stride_wk, stride_yp, stride_tt, stride_tk,
    TOPK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    DT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:
        return
    pairs = tl.load(sorted_ptr + pid_m * BM + tl.arange(0, BM))
    rmask = pairs < P
    n = pid_n * BN + tl.arange(0, BN)
    nmask = n < N
    kk = tl.arange(0, BK)
    w = tl.load(w2_table + e).to(tl.pointer_type(DT))
    a_ptrs = h_ptr + pairs.to(tl.int64)[:, None] * stride_hp + kk[None, :]
    b_ptrs = w + n[None, :] * stride_wn + kk[:, None] * stride_wk
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, KD, BK):
        kin = k0 + kk < KD
        a = tl.load(a_ptrs, mask=rmask[:, None] & kin[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=nmask[None, :] & kin[:, None], other=0.0)
        acc = _mma(a, b, acc, DOT_PRECISION, UPCAST)
        a_ptrs += BK
        b_ptrs += BK * stride_wk
    tok = pairs // TOPK
    tw = tl.load(tw_ptr + tok.to(tl.int64) * stride_tt + (pairs % TOPK) * stride_tk, mask=rmask, other=0.0).to(tl.float32)
    y_ptrs = y_ptr + pairs.to(tl.int64)[:, None] * stride_yp + n[None, :]
    tl.store(y_ptrs, acc * tw[:, None], mask=rmask[:, None] & nmask[None, :])


def list_experts(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w1: list[torch.Tensor],
    w3: list[torch.Tensor],
    w2: list[torch.Tensor],
    activation: str,
    active_mask: Optional[torch.Tensor],
) -> torch.Tensor:
    """Routed experts of ``moe_dispatch_ffn_combine_list`` (see the module docstring)."""
    t, h = x.shape
    e, k = len(w1), topk_ids.shape[1]
    inter = w2[0].shape[1]
    p = t * k
    if p == 0:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    wide = x.dtype.itemsize <= 2
    bm = 16 if p <= 256 else 64
    bn, bk = (64, 64) if wide else (32, 32)
    sorted_pairs, block_expert = align_blocks(topk_ids, e, bm, active_mask)
    n_blocks = block_expert.shape[0]
    common = dict(TOPK=k, BM=bm, BN=bn, BK=bk, DT=_TL_DTYPES[x.dtype], DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", UPCAST=_interpreting())
    hidden = torch.empty(p, inter, dtype=x.dtype, device=x.device)
    t1 = pointer_table(w1)
    t3 = pointer_table(w3) if w3 else t1  # unused without SPLIT
    _gate_up_kernel[(n_blocks, triton.cdiv(inter, bn))](
        x, t1, t3, hidden, sorted_pairs, block_expert,
        p, inter, h,
        x.stride(0), x.stride(1), w1[0].stride(0), w1[0].stride(1), hidden.stride(0),
        SPLIT=bool(w3), ACT=_ACT_IDS[activation], num_warps=4, **common,
    )
    y = torch.zeros(p, h, dtype=torch.float32, device=x.device)
    _down_kernel[(n_blocks, triton.cdiv(h, bn))](
        hidden, pointer_table(w2), y, topk_weights, sorted_pairs, block_expert,
        p, h, inter,
        hidden.stride(0), w2[0].stride(0), w2[0].stride(1), y.stride(0), topk_weights.stride(0), topk_weights.stride(1),
        num_warps=4, **common,
    )
    return y.view(t, k, h).sum(dim=1).to(x.dtype)
