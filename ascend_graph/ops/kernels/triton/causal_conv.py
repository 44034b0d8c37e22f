"""Triton kernels of ``causal_conv1d`` (prefill) and ``causal_conv1d_update`` (decode).

Entry points: :func:`causal_conv1d` and :func:`causal_conv1d_update`, with the contract of
``ascend_graph/ops/causal_conv.py`` (channel-first logical layouts, any strides). They
are attached to the custom ops as the CUDA kernels; on the CPU they run under
``TRITON_INTERPRET=1`` (how the tests check them without a GPU).

Design:

- decode is one program per (request, channel block): the ``K-1`` window, the ``L`` new
  tokens and the ``K`` taps are read once from HBM (re-reads of the same lines hit L1),
  the outputs and the shifted state are written once. The whole new state tile is
  loaded before it is stored and a CTA barrier separates the two, because the state is
  updated in place and different threads may own a column's load and its store.
- prefill is one program per (request, channel block, token block); each program reads
  the initial state only for its first ``K-1`` tokens. The final state is written by a
  second, tiny kernel launched after the first, so no program overwrites a state another
  program still has to read (Triton has no grid-wide barrier).
- varlen prefill sizes the grid by the total token count (a static shape: no host sync
  on ``query_start_loc``); token blocks past a request's end do nothing.
- padded requests (negative cache index) read and write no state; their outputs are 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["causal_conv1d", "causal_conv1d_update"]


@triton.jit
def _update_kernel(
    x_ptr, state_ptr, w_ptr, b_ptr, idx_ptr, acc_ptr, out_ptr,
    C, L, S,
    sx_b, sx_c, sx_l,
    ss_n, ss_c, ss_s,
    sw_c, sw_k,
    so_b, so_c, so_l,
    K: tl.constexpr, BLOCK_C: tl.constexpr, L_P2: tl.constexpr, S_P2: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_IDX: tl.constexpr, HAS_ACC: tl.constexpr, SILU: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    if HAS_IDX:
        slot = tl.load(idx_ptr + b).to(tl.int64)
    else:
        slot = b
    valid = slot >= 0
    slot = tl.maximum(slot, 0)
    if HAS_ACC:
        accepted = tl.load(acc_ptr + b).to(tl.int32)
        win0 = accepted - 1  # first window column: the last accepted token's K-1 predecessors
        shift = accepted
    else:
        win0 = S - (K - 1)
        shift = L
    sbase = state_ptr + slot * ss_n + c[:, None] * ss_c
    # x and the taps do not depend on the slot: their loads carry no `valid` mask, so they
    # are in flight while the cache index load (a dependent round trip) resolves; a padded
    # request's output is zeroed below and its state is neither read nor written
    xbase = x_ptr + b * sx_b + c[:, None] * sx_c

    # outputs: seq = window (K-1 state columns) ++ x; out[t] = sum_k w[k] * seq[t + k]
    t = tl.arange(0, L_P2)
    tm = t < L
    acc = tl.zeros((BLOCK_C, L_P2), dtype=tl.float32)
    for k in tl.static_range(K):
        pos = t + k
        from_state = pos < K - 1
        sv = tl.load(sbase + (win0 + pos)[None, :] * ss_s, mask=cm[:, None] & (from_state & tm)[None, :] & valid, other=0.0)
        xv = tl.load(xbase + (pos - (K - 1))[None, :] * sx_l, mask=cm[:, None] & ((pos >= K - 1) & tm)[None, :], other=0.0)
        wk = tl.load(w_ptr + c * sw_c + k * sw_k, mask=cm, other=0.0).to(tl.float32)
        acc += wk[:, None] * (sv.to(tl.float32) + xv.to(tl.float32))
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=cm, other=0.0).to(tl.float32)[:, None]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    acc = tl.where(valid, acc, 0.0)
    tl.store(out_ptr + b * so_b + c[:, None] * so_c + t[None, :] * so_l, acc.to(out_ptr.dtype.element_ty), mask=cm[:, None] & tm[None, :])

    # new state: columns [0, S-L) come from state[shift + j], the rest from x
    j = tl.arange(0, S_P2)
    jm = j < S
    keep = j < S - L
    sv = tl.load(sbase + (shift + j)[None, :] * ss_s, mask=cm[:, None] & (keep & jm)[None, :] & valid, other=0.0)
    xv = tl.load(xbase + (j - (S - L))[None, :] * sx_l, mask=cm[:, None] & ((j >= S - L) & jm)[None, :], other=0.0)
    new = tl.where(keep[None, :], sv, xv)
    tl.debug_barrier()
    tl.store(sbase + j[None, :] * ss_s, new.to(state_ptr.dtype.element_ty), mask=cm[:, None] & jm[None, :] & valid)


@triton.jit
def _seq_bounds(qsl_ptr, b, L, sx_b, so_b, sx_l, so_l, VARLEN: tl.constexpr):
    """(length, x offset, out offset) of request ``b``."""
    if VARLEN:
        start = tl.load(qsl_ptr + b).to(tl.int64)
        seqlen = (tl.load(qsl_ptr + b + 1).to(tl.int64) - start).to(tl.int32)
        return seqlen, start * sx_l, start * so_l
    else:
        return L, b * sx_b, b * so_b


@triton.jit
def _prefill_kernel(
    x_ptr, w_ptr, b_ptr, state_ptr, qsl_ptr, idx_ptr, init_ptr, out_ptr,
    C, L, S,
    sx_b, sx_c, sx_l,
    ss_n, ss_c, ss_s,
    sw_c, sw_k,
    so_b, so_c, so_l,
    K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, VARLEN: tl.constexpr, HAS_IDX: tl.constexpr, SILU: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    t = tl.program_id(2) * BLOCK_L + tl.arange(0, BLOCK_L)
    seqlen, xoff, ooff = _seq_bounds(qsl_ptr, b, L, sx_b, so_b, sx_l, so_l, VARLEN)
    tm = t < seqlen
    if HAS_IDX:
        slot = tl.load(idx_ptr + b).to(tl.int64)
    else:
        slot = b
    valid = slot >= 0
    slot = tl.maximum(slot, 0)
    xbase = x_ptr + xoff + c[:, None] * sx_c
    acc = tl.zeros((BLOCK_C, BLOCK_L), dtype=tl.float32)
    for k in tl.static_range(K):
        i = t + (k - (K - 1))  # input index; i < 0 reads the initial state (column S + i)
        xv = tl.load(xbase + i[None, :] * sx_l, mask=cm[:, None] & (tm & (i >= 0))[None, :] & valid, other=0.0).to(tl.float32)
        if HAS_INIT:
            use_init = tl.load(init_ptr + b) != 0
            sv = tl.load(
                state_ptr + slot * ss_n + c[:, None] * ss_c + (S + i)[None, :] * ss_s,
                mask=cm[:, None] & (tm & (i < 0))[None, :] & valid & use_init,
                other=0.0,
            )
            xv += sv.to(tl.float32)
        wk = tl.load(w_ptr + c * sw_c + k * sw_k, mask=cm, other=0.0).to(tl.float32)
        acc += wk[:, None] * xv
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=cm, other=0.0).to(tl.float32)[:, None]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    acc = tl.where(valid, acc, 0.0)
    tl.store(out_ptr + ooff + c[:, None] * so_c + t[None, :] * so_l, acc.to(out_ptr.dtype.element_ty), mask=cm[:, None] & tm[None, :])


@triton.jit
def _final_state_kernel(
    x_ptr, state_ptr, qsl_ptr, idx_ptr, init_ptr,
    C, L, S,
    sx_b, sx_c, sx_l,
    ss_n, ss_c, ss_s,
    BLOCK_C: tl.constexpr, S_P2: tl.constexpr,
    HAS_INIT: tl.constexpr, VARLEN: tl.constexpr, HAS_IDX: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    seqlen, xoff, _unused = _seq_bounds(qsl_ptr, b, L, sx_b, sx_b, sx_l, sx_l, VARLEN)
    if HAS_IDX:
        slot = tl.load(idx_ptr + b).to(tl.int64)
    else:
        slot = b
    valid = slot >= 0
    slot = tl.maximum(slot, 0)
    j = tl.arange(0, S_P2)
    jm = j < S
    i = seqlen - S + j  # new state column j is input i (or old state column S + i when i < 0)
    sbase = state_ptr + slot * ss_n + c[:, None] * ss_c
    new = tl.load(x_ptr + xoff + c[:, None] * sx_c + i[None, :] * sx_l, mask=cm[:, None] & (jm & (i >= 0))[None, :] & valid, other=0.0)
    if HAS_INIT:
        use_init = tl.load(init_ptr + b) != 0
        old = tl.load(sbase + (S + i)[None, :] * ss_s, mask=cm[:, None] & (jm & (i < 0))[None, :] & valid & use_init, other=0.0)
        new = tl.where((i < 0)[None, :], old.to(new.dtype), new)
    tl.debug_barrier()
    tl.store(sbase + j[None, :] * ss_s, new.to(state_ptr.dtype.element_ty), mask=cm[:, None] & jm[None, :] & valid)


def _p2(n: int) -> int:
    return max(1, triton.next_power_of_2(int(n)))


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_states: torch.Tensor | None,
    query_start_loc: torch.Tensor | None,
    cache_indices: torch.Tensor | None,
    has_initial_state: torch.Tensor | None,
    activation: str,
    *,
    block_c: int = 64,
    block_l: int = 64,
) -> torch.Tensor:
    """Prefill; see ``ascend_graph/ops/causal_conv.py`` for the contract."""
    C, K = weight.shape
    out = torch.empty_like(x)
    varlen = query_start_loc is not None
    if varlen:
        B = query_start_loc.shape[0] - 1
        L = x.shape[1]  # total tokens: an upper bound of any request's length
        sx = (0, x.stride(0), x.stride(1))
        so = (0, out.stride(0), out.stride(1))
    else:
        B, _, L = x.shape
        sx, so = x.stride(), out.stride()
    if B == 0 or L == 0:
        return out
    has_state = conv_states is not None
    state = conv_states if has_state else x  # a dummy pointer when there is no state
    S = conv_states.shape[-1] if has_state else K - 1
    ss = conv_states.stride() if has_state else (0, 0, 0)
    has_init = has_state and has_initial_state is not None
    init = has_initial_state.to(torch.int32) if has_init else x
    idx = cache_indices if cache_indices is not None else x
    qsl = query_start_loc if varlen else x
    grid = (B, triton.cdiv(C, block_c), triton.cdiv(L, block_l))
    _prefill_kernel[grid](
        x, weight, bias if bias is not None else weight, state, qsl, idx, init, out,
        C, L, S, *sx, *ss, weight.stride(0), weight.stride(1), *so,
        K=K, BLOCK_C=block_c, BLOCK_L=block_l,
        HAS_BIAS=bias is not None, HAS_INIT=has_init, VARLEN=varlen, HAS_IDX=cache_indices is not None,
        SILU=activation in ("silu", "swish"),
    )
    if has_state:
        block = min(256, _p2(C))
        _final_state_kernel[(B, triton.cdiv(C, block))](
            x, conv_states, qsl, idx, init, C, L, S, *sx, *ss,
            BLOCK_C=block, S_P2=_p2(S), HAS_INIT=has_init, VARLEN=varlen, HAS_IDX=cache_indices is not None,
        )
    return out


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cache_indices: torch.Tensor | None,
    num_accepted_tokens: torch.Tensor | None,
    activation: str,
    *,
    block_c: int | None = None,
    num_warps: int = 4,
) -> torch.Tensor:
    """Decode step; updates ``conv_state`` in place. See ``ascend_graph/ops/causal_conv.py``."""
    C, K = weight.shape
    x3 = x.unsqueeze(-1) if x.dim() == 2 else x
    B, _, L = x3.shape
    S = conv_state.shape[-1]
    out = torch.empty_like(x3)
    if B == 0:
        return out.squeeze(-1) if x.dim() == 2 else out
    block = block_c or min(256, _p2(C))
    _update_kernel[(B, triton.cdiv(C, block))](
        x3, conv_state, weight, bias if bias is not None else weight,
        cache_indices if cache_indices is not None else x3,
        num_accepted_tokens if num_accepted_tokens is not None else x3,
        out,
        C, L, S, *x3.stride(), *conv_state.stride(), weight.stride(0), weight.stride(1), *out.stride(),
        K=K, BLOCK_C=block, L_P2=_p2(L), S_P2=_p2(S),
        HAS_BIAS=bias is not None, HAS_IDX=cache_indices is not None, HAS_ACC=num_accepted_tokens is not None,
        SILU=activation in ("silu", "swish"),
        num_warps=num_warps,
    )
    return out.squeeze(-1) if x.dim() == 2 else out
