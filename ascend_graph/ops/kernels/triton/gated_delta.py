"""Triton recurrent gated delta rule: decode and speculative verify on CUDA.

Entry points: :func:`recurrent_gated_delta_rule_triton` (the CUDA kernel of
``ascend_graph::recurrent_gated_delta_rule``; semantics in ``ops/gated_delta.py``), and
:func:`gather_states_triton` / :func:`scatter_states_triton`, the chunk op's state-cache
read and write-back (one launch each instead of the eight small torch ops that clamp,
mask, index_select, where and index_copy_ would take: the chunk op is host-bound at
prefill sizes, so launches are its cost).

One program per (request, v-head, block of ``BV`` value columns) keeps its ``[K, BV]``
slice of the state in registers (fp32) for all of the request's tokens, so the state is
read once and written once per request (per token only in the speculative layout,
where every token's state has its own slot): the kernel is bound by state bytes, which
is what the benchmark measures against HBM bandwidth. Request lengths, slots and
accepted counts are read inside the kernel from device tensors; the grid depends on
shapes only, so nothing is read back to the host and the launch can be captured in a
CUDA graph. Negative slots (padded requests) are skipped: no state read or write, zero
output.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["recurrent_gated_delta_rule_triton", "gather_states_triton", "scatter_states_triton"]


@functools.cache
def _kernel():
    # Built on first use so that importing this module never needs Triton.
    import triton
    import triton.language as tl

    @triton.jit
    def _recurrent_kernel(
        q, k, v, g, beta, o, state, cu, idx, acc,
        scale,
        stride_qt, stride_qh, stride_vt, stride_vh, stride_gt, stride_ot, stride_oh,
        stride_sn, stride_sh, stride_sk, stride_idx,
        HV: tl.constexpr, GROUP: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
        BK: tl.constexpr, BV: tl.constexpr,
        HAS_CU: tl.constexpr, HAS_IDX: tl.constexpr, IDX_2D: tl.constexpr, HAS_ACC: tl.constexpr,
        L2NORM: tl.constexpr,
    ):
        i_v = tl.program_id(0)
        i_h = tl.program_id(1)
        i_b = tl.program_id(2)
        i_hk = i_h // GROUP
        if HAS_CU:
            bos = tl.load(cu + i_b).to(tl.int64)
            eos = tl.load(cu + i_b + 1).to(tl.int64)
        else:
            bos = i_b.to(tl.int64)
            eos = bos + 1
        if HAS_IDX:
            if IDX_2D:
                a = 1
                if HAS_ACC:
                    a = tl.load(acc + i_b).to(tl.int32)
                slot = tl.load(idx + i_b * stride_idx + a - 1).to(tl.int64)
            else:
                slot = tl.load(idx + i_b).to(tl.int64)
        else:
            slot = i_b.to(tl.int64)

        o_k = tl.arange(0, BK)
        o_v = i_v * BV + tl.arange(0, BV)
        m_k = o_k < K
        m_v = o_v < V
        m_s = m_k[:, None] & m_v[None, :]
        s_off = i_h * stride_sh + o_k[:, None] * stride_sk + o_v[None, :]
        if slot >= 0:
            h = tl.load(state + slot * stride_sn + s_off, mask=m_s, other=0.0).to(tl.float32)
            # while, not range(bos, eos): Triton's interpreter cannot range over loaded values
            t = bos
            while t < eos:
                b_q = tl.load(q + t * stride_qt + i_hk * stride_qh + o_k, mask=m_k, other=0.0).to(tl.float32)
                b_k = tl.load(k + t * stride_qt + i_hk * stride_qh + o_k, mask=m_k, other=0.0).to(tl.float32)
                b_v = tl.load(v + t * stride_vt + i_h * stride_vh + o_v, mask=m_v, other=0.0).to(tl.float32)
                b_g = tl.load(g + t * stride_gt + i_h).to(tl.float32)
                b_beta = tl.load(beta + t * stride_gt + i_h).to(tl.float32)
                if L2NORM:
                    b_q = b_q * tl.rsqrt(tl.sum(b_q * b_q) + 1e-6)
                    b_k = b_k * tl.rsqrt(tl.sum(b_k * b_k) + 1e-6)
                b_q = b_q * scale
                h = h * tl.exp(b_g)
                kv_mem = tl.sum(h * b_k[:, None], axis=0)
                delta = (b_v - kv_mem) * b_beta
                h = h + b_k[:, None] * delta[None, :]
                b_o = tl.sum(h * b_q[:, None], axis=0)
                tl.store(o + t * stride_ot + i_h * stride_oh + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
                if IDX_2D:
                    dst = tl.load(idx + i_b * stride_idx + (t - bos)).to(tl.int64)
                    if dst >= 0:
                        tl.store(state + dst * stride_sn + s_off, h.to(state.dtype.element_ty), mask=m_s)
                t += 1
            if not IDX_2D:
                tl.store(state + slot * stride_sn + s_off, h.to(state.dtype.element_ty), mask=m_s)
        else:
            zero = tl.zeros([BV], dtype=tl.float32)
            t = bos
            while t < eos:
                tl.store(o + t * stride_ot + i_h * stride_oh + o_v, zero.to(o.dtype.element_ty), mask=m_v)
                t += 1

    return _recurrent_kernel


def recurrent_gated_delta_rule_triton(q, k, v, g, beta, state_cache, cu_seqlens, state_indices, num_accepted_tokens, scale, use_qk_l2norm):
    import triton

    T, Hk, K = q.shape
    H, V = v.shape[1], v.shape[2]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    g, beta = g.contiguous(), beta.contiguous()
    if not state_cache.is_contiguous():
        raise ValueError("recurrent_gated_delta_rule: state_cache must be contiguous")
    B = (cu_seqlens.shape[0] - 1) if cu_seqlens is not None else (state_indices.shape[0] if state_indices is not None else T)
    o = torch.empty_like(v)
    BK = triton.next_power_of_2(K)
    # 32 value columns per program: a [128, 32] fp32 state tile (32 KiB of registers across
    # 4 warps) and H * ceil(V/32) * B programs, enough to fill the SMs at decode batch sizes.
    BV = min(32, triton.next_power_of_2(V))
    dummy = cu_seqlens if cu_seqlens is not None else o
    idx = state_indices if state_indices is not None else dummy
    acc = num_accepted_tokens if num_accepted_tokens is not None else dummy
    grid = (triton.cdiv(V, BV), H, B)
    _kernel()[grid](
        q, k, v, g, beta, o, state_cache, dummy, idx, acc,
        float(scale),
        q.stride(0), q.stride(1), v.stride(0), v.stride(1), g.stride(0), o.stride(0), o.stride(1),
        state_cache.stride(0), state_cache.stride(1), state_cache.stride(2),
        idx.stride(0) if state_indices is not None and state_indices.dim() == 2 else 0,
        HV=H, GROUP=H // Hk, K=K, V=V, BK=BK, BV=BV,
        HAS_CU=cu_seqlens is not None, HAS_IDX=state_indices is not None,
        IDX_2D=state_indices is not None and state_indices.dim() == 2,
        HAS_ACC=num_accepted_tokens is not None, L2NORM=bool(use_qk_l2norm),
        num_warps=4,
    )
    return o


@functools.cache
def _state_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def _gather(cache, idx, has_init, out, stride_n, N_ELEM, HAS_IDX: tl.constexpr, HAS_INIT: tl.constexpr, BLOCK: tl.constexpr):
        # out[b] = cache[idx[b]] as fp32, or 0 where idx[b] < 0 or not has_init[b]
        i_b = tl.program_id(1)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < N_ELEM
        slot = tl.load(idx + i_b).to(tl.int64) if HAS_IDX else i_b.to(tl.int64)
        use = slot >= 0
        if HAS_INIT:
            use = use & (tl.load(has_init + i_b) != 0)
        x = tl.load(cache + slot * stride_n + offs, mask=m & use, other=0.0).to(tl.float32)
        tl.store(out + i_b.to(tl.int64) * N_ELEM + offs, x, mask=m)

    @triton.jit
    def _scatter(finals, idx, cache, stride_n, N_ELEM, HAS_IDX: tl.constexpr, BLOCK: tl.constexpr):
        # cache[idx[b]] = finals[b] where idx[b] >= 0 (padded requests write nothing)
        i_b = tl.program_id(1)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        slot = tl.load(idx + i_b).to(tl.int64) if HAS_IDX else i_b.to(tl.int64)
        m = (offs < N_ELEM) & (slot >= 0)
        x = tl.load(finals + i_b.to(tl.int64) * N_ELEM + offs, mask=m, other=0.0)
        tl.store(cache + slot * stride_n + offs, x.to(cache.dtype.element_ty), mask=m)

    return _gather, _scatter


_BLOCK = 2048


def gather_states_triton(state_cache: torch.Tensor, state_indices: torch.Tensor | None, has_initial_state: torch.Tensor | None, B: int) -> torch.Tensor:
    """``[B, H, K, V]`` fp32 initial states: slot ``state_indices[b]`` (None: ``b``), zero where
    the slot is negative or ``has_initial_state[b]`` is False."""
    import triton

    n = state_cache[0].numel()
    out = torch.empty((B,) + tuple(state_cache.shape[1:]), dtype=torch.float32, device=state_cache.device)
    if B == 0:
        return out
    gather, _ = _state_kernels()
    dummy = out
    gather[(triton.cdiv(n, _BLOCK), B)](
        state_cache, state_indices if state_indices is not None else dummy,
        has_initial_state if has_initial_state is not None else dummy, out, state_cache.stride(0), n,
        HAS_IDX=state_indices is not None, HAS_INIT=has_initial_state is not None, BLOCK=_BLOCK,
    )
    return out


def scatter_states_triton(finals: torch.Tensor, state_indices: torch.Tensor | None, state_cache: torch.Tensor) -> None:
    """``state_cache[state_indices[b]] = finals[b]`` (None: slot ``b``), skipping negative slots."""
    import triton

    B = finals.shape[0]
    if B == 0:
        return
    n = state_cache[0].numel()
    _, scatter = _state_kernels()
    scatter[(triton.cdiv(n, _BLOCK), B)](
        finals, state_indices if state_indices is not None else finals, state_cache, state_cache.stride(0), n,
        HAS_IDX=state_indices is not None, BLOCK=_BLOCK,
    )
