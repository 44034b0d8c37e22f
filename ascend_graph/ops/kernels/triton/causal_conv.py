"""Triton kernels of ``causal_conv1d`` (prefill) and ``causal_conv1d_update`` (decode).

Entry points: :func:`causal_conv1d` and :func:`causal_conv1d_update`, with the contract of
``ascend_graph/ops/causal_conv.py`` (channel-first logical layouts, any strides). They
are attached to the custom ops as the CUDA kernels; on the CPU they run under
``TRITON_INTERPRET=1`` (how the tests check them without a GPU).

Design:

- decode has two kernels, picked by the state layout (``_update_config``):

  * ``tile`` (channels contiguous: vLLM's conv state, a [N, C, S] view of [N, S, C]): one
    program per (request block, channel block) holds the whole [requests, channels,
    columns] tile of state and tokens in registers, each thread 8 consecutive channels
    (16-byte loads and stores) with all their columns, so every state byte is loaded
    once and the window, the outputs and the shifted state come from registers (the
    shift bit-exact). Streamed data carries eviction hints (state and x read
    evict-first, the new state stored ``.cs``, the taps shared by every request kept
    evict-last). Measured on an H100 at B = 64 from HBM it runs at the speed of a plain
    device-to-device copy of the same bytes (``benchmarks/results/causal_conv.md``): the
    rest is the launch and the first round trip, which one kernel cannot hide.
  * ``column`` (any other strides, e.g. HF's [N, C, K] cache): one program per (request,
    channel block) loading the window and the new state column by column (re-reads hit
    L1). The tile kernel is correct there too but slower: with 4-element channel rows the
    compiler spreads a channel's columns over threads and shuffles.

  Both load the whole new state before storing it, with a CTA barrier between, because
  the state is updated in place and different threads may own a column's load and its
  store.
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

from ....errors import ConfigError

__all__ = ["causal_conv1d", "causal_conv1d_update"]


@triton.jit
def _pick_combine(a, a_hit, b, b_hit):
    return tl.where(a_hit, a, b), a_hit | b_hit


@triton.jit
def _pick(v, hit):
    """``v[..., i]`` where ``hit[..., i]`` (one hit along the last axis), bit-exact in v's dtype."""
    out, _unused = tl.reduce((v, tl.broadcast_to(hit, v.shape)), 2, _pick_combine)
    return out


@triton.jit
def _update_tile_kernel(
    x_ptr, state_ptr, w_ptr, b_ptr, idx_ptr, acc_ptr, out_ptr,
    B, C,
    sx_b, sx_c, sx_l,
    ss_n, ss_c, ss_s,
    sw_c, sw_k,
    so_b, so_c, so_l,
    K: tl.constexpr, L: tl.constexpr, S: tl.constexpr,
    L_P2: tl.constexpr, S_P2: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_IDX: tl.constexpr, HAS_ACC: tl.constexpr, SILU: tl.constexpr,
    EVICT: tl.constexpr,
):
    # tiles are [requests, channels, columns]: the columns (state, tokens, taps) of one
    # channel sit in one thread's registers whenever the channel axis is the contiguous one
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rm = r < B
    cm = c < C
    r64 = r.to(tl.int64)
    if HAS_IDX:
        slot = tl.load(idx_ptr + r, mask=rm, other=-1).to(tl.int64)
    else:
        slot = tl.where(rm, r64, -1)
    valid = slot >= 0
    slot = tl.maximum(slot, 0)

    j = tl.arange(0, S_P2)[None, None, :]
    t = tl.arange(0, L_P2)[None, None, :]
    c3 = c[None, :, None]
    cm3 = cm[None, :, None]
    # x and the taps do not depend on the slot: their loads are issued before the cache
    # index resolves; a padded request's output is zeroed and its state is never touched
    xv = tl.load(
        x_ptr + r64[:, None, None] * sx_b + c3 * sx_c + t * sx_l,
        mask=rm[:, None, None] & cm3 & (t < L), other=0.0, eviction_policy="evict_first" if EVICT else "",
    )
    sptr = state_ptr + slot[:, None, None] * ss_n + c3 * ss_c + j * ss_s
    smask = valid[:, None, None] & cm3 & (j < S)
    sv = tl.load(sptr, mask=smask, other=0.0, eviction_policy="evict_first" if EVICT else "")

    if HAS_ACC:
        accepted = tl.load(acc_ptr + r, mask=rm, other=1).to(tl.int32)[:, None, None]
        win0 = accepted - 1  # first window column: the last accepted token's K-1 predecessors
        shift = accepted
    else:
        win0 = S - (K - 1)
        shift = L

    # outputs: seq = window (K-1 state columns from win0) ++ x; out[t] = sum_k w[k] * seq[t + k]
    sf = sv.to(tl.float32)
    xf = xv.to(tl.float32)
    out = tl.zeros((BLOCK_R, BLOCK_C, L_P2), dtype=tl.float32)
    for tt in tl.static_range(L):
        acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        for k in tl.static_range(K):
            wk = tl.load(w_ptr + c * sw_c + k * sw_k, mask=cm, other=0.0, eviction_policy="evict_last" if EVICT else "")
            wk = wk.to(tl.float32)[None, :]
            if tt + k < K - 1:
                col = tl.sum(tl.where(j == win0 + (tt + k), sf, 0.0), axis=2)
            else:
                col = tl.sum(tl.where(t == tt + k - (K - 1), xf, 0.0), axis=2)
            acc += wk * col
        out = tl.where(t == tt, acc[:, :, None], out)
    if HAS_BIAS:
        out += tl.load(b_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :, None]
    if SILU:
        out = out * tl.sigmoid(out)
    out = tl.where(valid[:, None, None], out, 0.0)
    tl.store(
        out_ptr + r64[:, None, None] * so_b + c3 * so_c + t * so_l, out.to(out_ptr.dtype.element_ty),
        mask=rm[:, None, None] & cm3 & (t < L),
    )

    # new state: column j is old column shift + j for j < S - L, else token j - (S - L);
    # picked from registers (bit-exact), so every state byte is read once
    new = sv
    for jd in tl.static_range(S):
        if jd < S - L:
            col = _pick(sv, j == shift + jd)
        else:
            col = _pick(xv, t == jd - (S - L)).to(sv.dtype)
        new = tl.where(j == jd, col[:, :, None], new)
    # in place: every load of this program's state lines is done before any store
    tl.debug_barrier()
    tl.store(sptr, new.to(state_ptr.dtype.element_ty), mask=smask, cache_modifier=".cs" if EVICT else "")


@triton.jit
def _update_column_kernel(
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


def _update_config(B: int, C: int, channels_contiguous: bool) -> tuple[str, int, int, int, bool]:
    """(kernel, requests per program, channels per program, warps, eviction hints) of the update.

    From ``python benchmarks/causal_conv.py --sweep`` and the benchmark's neighbour table on
    an H100 (B = 64, state from HBM; ``benchmarks/results/causal_conv.md``): in vLLM's layout
    2 requests x 256 channels on 2 warps (8 channels a thread, one 16-byte vector per column)
    with the hints was among the fastest without cache indices (1 x 256 on 1 warp ties) and
    the fastest with them; fewer, larger programs (1024-2048 channels, 8-16 requests) were
    slower. The column kernel's best block there was 256 channels on 4 warps.
    """
    if channels_contiguous:
        return "tile", 2, min(256, _p2(C)), 2, True
    return "column", 1, min(256, _p2(C)), 4, False


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cache_indices: torch.Tensor | None,
    num_accepted_tokens: torch.Tensor | None,
    activation: str,
    *,
    kernel: str | None = None,
    block_r: int | None = None,
    block_c: int | None = None,
    num_warps: int | None = None,
    evict: bool | None = None,
) -> torch.Tensor:
    """Decode step; updates ``conv_state`` in place. See ``ascend_graph/ops/causal_conv.py``.

    The keywords override ``_update_config`` (benchmarks and tests); ``block_r`` is the
    tile kernel's requests per program (the column kernel takes one).
    """
    C, K = weight.shape
    x3 = x.unsqueeze(-1) if x.dim() == 2 else x
    B, _, L = x3.shape
    S = conv_state.shape[-1]
    out = torch.empty_like(x3)
    if B == 0:
        return out.squeeze(-1) if x.dim() == 2 else out
    cfg = _update_config(B, C, conv_state.stride(1) == 1)
    if kernel is not None and kernel != cfg[0]:
        cfg = _update_config(B, C, kernel == "tile")
    kernel, block_r, block_c, num_warps, evict = (
        given if given is not None else default
        for given, default in zip((kernel, block_r, block_c, num_warps, evict), cfg)
    )
    idx = cache_indices if cache_indices is not None else x3
    acc = num_accepted_tokens if num_accepted_tokens is not None else x3
    common = dict(
        HAS_BIAS=bias is not None, HAS_IDX=cache_indices is not None, HAS_ACC=num_accepted_tokens is not None,
        SILU=activation in ("silu", "swish"), num_warps=num_warps,
    )
    args = (x3, conv_state, weight, bias if bias is not None else weight, idx, acc, out)
    strides = (*x3.stride(), *conv_state.stride(), weight.stride(0), weight.stride(1), *out.stride())
    if kernel == "tile":
        _update_tile_kernel[(triton.cdiv(B, block_r), triton.cdiv(C, block_c))](
            *args, B, C, *strides,
            K=K, L=L, S=S, L_P2=_p2(L), S_P2=_p2(S), BLOCK_R=block_r, BLOCK_C=block_c, EVICT=evict, **common,
        )
    elif kernel == "column":
        _update_column_kernel[(B, triton.cdiv(C, block_c))](
            *args, C, L, S, *strides, K=K, BLOCK_C=block_c, L_P2=_p2(L), S_P2=_p2(S), **common,
        )
    else:
        raise ConfigError("causal_conv1d_update: unknown update kernel", expected="'tile' or 'column'", got=repr(kernel))
    return out.squeeze(-1) if x.dim() == 2 else out
