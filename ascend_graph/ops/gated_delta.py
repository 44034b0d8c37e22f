"""Gated delta rule (Qwen3-Next / GDN linear attention): ``chunk_gated_delta_rule`` for
prefill and ``recurrent_gated_delta_rule`` for decode and speculative verify.

The recurrence, per request and v-head, with state ``S`` of shape ``[K, V]`` (fp32):

    S_t = exp(g_t) * S_{t-1}                          # decay (g is log-space, <= 0)
    S_t = S_t + k_t (beta_t * (v_t - k_t^T S_t))^T    # delta rule update
    o_t = (scale * q_t)^T S_t

with ``q``/``k`` optionally L2-normalised first (``use_qk_l2norm``). The chunked form
(chunk size 64, the WY / UT-transform representation of FLA and transformers'
``torch_chunk_gated_delta_rule``) computes the same outputs with matmuls; the CPU
reference below checks one against the other to fp32 tolerance.

Layouts (TND, as the NPU ops take them; fla's ``[1, T, H, D]`` varlen form without the 1):

- ``q``, ``k``: ``[T, Hk, K]``; ``v``: ``[T, H, V]``; ``g``, ``beta``: ``[T, H]``;
  ``H % Hk == 0`` (grouped values: v-head ``h`` reads k-head ``h // (H // Hk)``);
- ``state_cache``: ``[N, H, K, V]``, updated in place (the ops' one mutated argument);
- ``cu_seqlens``: ``[B+1]`` int, cumulative token counts (None: the chunk op sees one
  sequence of ``T`` tokens; the recurrent op sees ``T`` requests of one token, plain decode);
- ``state_indices``: request ``b`` owns slot ``state_indices[b]`` (None: slot ``b``).

Chunk op: request ``b`` starts from ``state_cache[slot]`` where ``has_initial_state[b]``
(None: all True), else from zeros, and its final state is written back to the slot.
``chunk_indices`` ``[C, 2]`` (sequence, chunk-in-sequence) and ``chunk_offsets``
``[B+1]`` (cumulative chunk counts) are the varlen chunk metadata (fla's format):
build them on the host with :class:`ChunkMetadataBuilder` ahead of the forward (pinned
staging, non-blocking copy) so the forward never reads device memory back; when they
are None the op derives them from ``cu_seqlens`` itself, which reads ``cu_seqlens``
back to the host (one device sync, the stall the prebuilt path exists to avoid).

Recurrent op (vLLM's ``fused_recurrent_gated_delta_rule`` semantics): a negative slot
marks a padded request (its state is neither read nor written; its outputs are 0).
With 2-D ``state_indices`` ``[B, L]`` (speculative decoding) the state is read from
``state_indices[b, a-1]`` with ``a = num_accepted_tokens[b]`` (None: 1) and the state
after token ``t`` is written to ``state_indices[b, t]``.

Entry points: ``torch.ops.ascend_graph.chunk_gated_delta_rule`` /
``recurrent_gated_delta_rule`` (and the Python functions of the same name here). CPU
runs the plain-torch code below (the ground truth); CUDA runs fla-core's chunk kernels
when installed, else the chunked torch path below (no device sync with prebuilt
metadata), and the Triton recurrent kernel of ``kernels/triton/gated_delta.py``; NPU
binds ``torch_npu.npu_chunk_gated_delta_rule`` / ``npu_recurrent_gated_delta_rule``.
"""

from __future__ import annotations

import functools
import importlib
import threading
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import UnsupportedError

__all__ = [
    "CHUNK_SIZE",
    "chunk_gated_delta_rule",
    "recurrent_gated_delta_rule",
    "ChunkMetadata",
    "ChunkMetadataBuilder",
    "chunk_metadata_lists",
    "recurrent_reference",
    "chunk_reference",
    "check_args",
]

#: chunk length of the WY representation (fla's and the NPU kernel's)
CHUNK_SIZE = 64

#: fla's l2norm epsilon (transformers' ``l2norm`` uses the same)
L2NORM_EPS = 1e-6


# ----------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------


def check_args(q, k, v, g, beta, state_cache) -> None:
    """Shape checks shared by the references, the fake impls and the kernels."""
    if q.dim() != 3 or k.shape != q.shape:
        raise UnsupportedError("gated_delta_rule: q and k must be [T, Hk, K] and equal", expected="q.shape == k.shape, 3-D", got=(tuple(q.shape), tuple(k.shape)))
    T, Hk, K = q.shape
    if v.dim() != 3 or v.shape[0] != T or v.shape[1] % Hk != 0:
        raise UnsupportedError("gated_delta_rule: v must be [T, H, V] with H a multiple of Hk", expected=f"[{T}, m*{Hk}, V]", got=tuple(v.shape))
    H, V = v.shape[1], v.shape[2]
    for name, x in (("g", g), ("beta", beta)):
        if tuple(x.shape) != (T, H):
            raise UnsupportedError(f"gated_delta_rule: {name} must be [T, H]", expected=(T, H), got=tuple(x.shape))
    if state_cache.dim() != 4 or tuple(state_cache.shape[1:]) != (H, K, V):
        raise UnsupportedError("gated_delta_rule: state_cache must be [N, H, K, V]", expected=f"[N, {H}, {K}, {V}]", got=tuple(state_cache.shape))


# ----------------------------------------------------------------------------------
# chunk metadata, built on the host
# ----------------------------------------------------------------------------------


def chunk_metadata_lists(seq_lens: Sequence[int], chunk_size: int = CHUNK_SIZE) -> tuple[list[int], list[list[int]], list[int]]:
    """Pure: ``(cu_seqlens, chunk_indices, chunk_offsets)`` as lists from per-request lengths."""
    cu = [0]
    offsets = [0]
    indices: list[list[int]] = []
    for b, n in enumerate(seq_lens):
        if n < 0:
            raise UnsupportedError("sequence lengths must be >= 0", expected=">= 0", got=n)
        cu.append(cu[-1] + n)
        chunks = -(-n // chunk_size)
        indices.extend([b, j] for j in range(chunks))
        offsets.append(offsets[-1] + chunks)
    return cu, indices, offsets


@dataclass(frozen=True)
class ChunkMetadata:
    """Varlen chunk metadata on the device: what the chunk kernels index by."""

    cu_seqlens: torch.Tensor  # [B+1] int64
    chunk_indices: torch.Tensor  # [C, 2] int64: (sequence, chunk within the sequence)
    chunk_offsets: torch.Tensor  # [B+1] int64: first chunk of each sequence


def _pinnable(device: torch.device) -> bool:
    # Pinned host memory needs an accelerator runtime; on a CPU-only host pinning fails.
    if device.type == "cuda":
        return torch.cuda.is_available()
    if device.type == "npu":
        return hasattr(torch, "npu") and torch.npu.is_available()  # type: ignore[attr-defined]
    return False


class ChunkMetadataBuilder:
    """Builds :class:`ChunkMetadata` off the hot path.

    The scheduler knows each request's token count before the forward; ``build`` turns
    them into chunk indices and offsets on the host, writes them into pinned staging
    buffers (pinned only when an accelerator is present) and copies them into persistent
    device buffers with non-blocking copies on the current stream, so the kernels get
    device tensors and the forward never waits for the host. Device buffers keep their
    addresses across calls (a captured graph can replay over them).

    Two staging slots alternate; before a slot is rewritten the host waits for the copy
    that last read it (an event, not a device sync), so an in-flight copy never sees
    half-written data.
    """

    def __init__(self, max_seqs: int, max_tokens: int, device: torch.device | str, chunk_size: int = CHUNK_SIZE):
        self.device = torch.device(device)
        self.chunk_size = chunk_size
        self.max_seqs = max_seqs
        # sum_b ceil(n_b / C) <= floor(T / C) + B
        self.max_chunks = max_tokens // chunk_size + max_seqs
        pin = _pinnable(self.device)
        n = 2 * (max_seqs + 1) + 2 * self.max_chunks  # cu | offsets | indices
        # int64: fla-core's index dtype, so the kernels take these tensors without a cast
        self._staging = [torch.zeros(n, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self._events: list[object | None] = [None, None]
        self._slot = 0
        self._device_buf = torch.zeros(n, dtype=torch.int64, device=self.device)
        self._lock = threading.Lock()

    def build(self, seq_lens: Sequence[int]) -> ChunkMetadata:
        B = len(seq_lens)
        if B > self.max_seqs or sum(seq_lens) // self.chunk_size + B > self.max_chunks:
            raise UnsupportedError(
                "ChunkMetadataBuilder: batch larger than the buffers",
                expected=f"<= {self.max_seqs} sequences and <= {self.max_chunks} chunks",
                got=f"{B} sequences, {sum(seq_lens)} tokens",
                hint="build the ChunkMetadataBuilder with larger max_seqs / max_tokens",
            )
        cu, indices, offsets = chunk_metadata_lists(seq_lens, self.chunk_size)
        C = len(indices)
        flat = cu + offsets + [x for pair in indices for x in pair]
        with self._lock:
            slot = self._slot
            self._slot ^= 1
            event = self._events[slot]
            if event is not None:
                event.synchronize()  # the copy that last read this slot is done
            staging = self._staging[slot]
            staging[: len(flat)] = torch.tensor(flat, dtype=torch.int64)
            dst = self._device_buf
            dst[: len(flat)].copy_(staging[: len(flat)], non_blocking=True)
            self._events[slot] = _record_event(self.device)
        return ChunkMetadata(
            cu_seqlens=dst[: B + 1],
            chunk_offsets=dst[B + 1 : 2 * B + 2],
            chunk_indices=dst[2 * B + 2 : 2 * B + 2 + 2 * C].view(C, 2),
        )


def _record_event(device: torch.device):
    if device.type == "cuda":
        event = torch.cuda.Event()
        event.record()
        return event
    if device.type == "npu":
        event = torch.npu.Event()  # type: ignore[attr-defined]
        event.record()
        return event
    return None


def _metadata_from_cu(cu_seqlens: torch.Tensor, chunk_size: int = CHUNK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chunk_indices, chunk_offsets)`` from device ``cu_seqlens``: reads it back (a sync)."""
    cu = cu_seqlens.tolist()
    _, indices, offsets = chunk_metadata_lists([b - a for a, b in zip(cu[:-1], cu[1:])], chunk_size)
    dev = cu_seqlens.device
    return (
        torch.tensor(indices, dtype=torch.int64, device=dev).view(-1, 2),
        torch.tensor(offsets, dtype=torch.int64, device=dev),
    )


# ----------------------------------------------------------------------------------
# plain-torch algorithms
# ----------------------------------------------------------------------------------


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + L2NORM_EPS)


def _prep_qk(q: torch.Tensor, k: torch.Tensor, H: int, scale: float, use_qk_l2norm: bool):
    q, k = q.float(), k.float()
    if use_qk_l2norm:
        q, k = _l2norm(q), _l2norm(k)
    ratio = H // q.shape[-2]
    if ratio > 1:
        q = q.repeat_interleave(ratio, dim=-2)
        k = k.repeat_interleave(ratio, dim=-2)
    return q * scale, k


def recurrent_reference(q, k, v, g, beta, h0, scale: float, use_qk_l2norm: bool, keep_states: bool = False):
    """One sequence token by token: ``q, k`` [L, Hk, K], ``v`` [L, H, V], ``h0`` [H, K, V].

    Returns ``(o [L, H, V] fp32, states)``: ``states`` is the final state ``[H, K, V]``,
    or with ``keep_states`` the state after each token ``[L, H, K, V]``.
    """
    H = v.shape[1]
    q, k = _prep_qk(q, k, H, scale, use_qk_l2norm)
    v, g, beta = v.float(), g.float(), beta.float()
    S = h0.float()
    outs, states = [], []
    for t in range(v.shape[0]):
        S = S * g[t].exp()[:, None, None]
        kv_mem = (S * k[t][:, :, None]).sum(-2)  # [H, V]
        delta = (v[t] - kv_mem) * beta[t][:, None]
        S = S + k[t][:, :, None] * delta[:, None, :]
        outs.append((S * q[t][:, :, None]).sum(-2))
        if keep_states:
            states.append(S)
    o = torch.stack(outs) if outs else v.new_zeros(v.shape)
    if keep_states:
        return o, (torch.stack(states) if states else S.new_zeros((0,) + S.shape))
    return o, S


def _chunked(q, k, v, g, beta, h0, cu, chunk_indices, chunk_offsets, scale: float, use_qk_l2norm: bool, chunk_size: int = CHUNK_SIZE):
    """The chunked (WY) algorithm over every chunk of every sequence; no host reads.

    Phase 1 (all chunks at once): gather each chunk's tokens into ``[C, H, BT, .]``
    (positions past a sequence's end get g = 0 and beta = 0 and k = 0, which makes them
    inert), solve the unit lower-triangular UT system for ``u`` and ``w``. Phase 2 scans
    the chunks in order; the number of chunks is a shape (``chunk_indices.shape[0]``),
    sequence starts and ends come from device tensors, so nothing is read back.
    Returns ``(o [T, H, V] fp32, final states [B, H, K, V] fp32)``.
    """
    T, H, V = v.shape
    K = q.shape[-1]
    B = cu.shape[0] - 1
    C = chunk_indices.shape[0]
    dev = v.device
    BT = chunk_size
    cu = cu.long()
    seq = chunk_indices[:, 0].long()
    j = chunk_indices[:, 1].long()
    start = cu[seq] + j * BT
    pos = start[:, None] + torch.arange(BT, device=dev)  # [C, BT]
    valid = pos < cu[seq + 1][:, None]
    pos_c = pos.clamp(max=max(T - 1, 0))
    m = valid[..., None, None].float()

    q, k = _prep_qk(q, k, H, scale, use_qk_l2norm)
    qc = q[pos_c].transpose(1, 2)  # [C, H, BT, K]
    kc = (k[pos_c] * m).transpose(1, 2)
    vc = v.float()[pos_c].transpose(1, 2)
    gc = (g.float()[pos_c] * valid[..., None]).transpose(1, 2)  # [C, H, BT]
    bc = (beta.float()[pos_c] * valid[..., None]).transpose(1, 2)

    gcum = gc.cumsum(-1)
    lower = torch.ones(BT, BT, dtype=torch.bool, device=dev).tril()
    decay = (gcum[..., :, None] - gcum[..., None, :]).masked_fill(~lower, float("-inf")).exp()
    kb = kc * bc[..., None]
    ut = (kb @ kc.transpose(-1, -2)) * decay  # solved as unit lower-triangular: the diagonal is ignored
    u = torch.linalg.solve_triangular(ut, vc * bc[..., None], upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(ut, kb * gcum.exp()[..., None], upper=False, unitriangular=True)
    attn = (qc @ kc.transpose(-1, -2)) * decay
    q_dec = qc * gcum.exp()[..., None]
    k_dec = kc * (gcum[..., -1:] - gcum).exp()[..., None]
    chunk_decay = gcum[..., -1].exp()[..., None, None]  # [C, H, 1, 1]

    first = j == 0
    last = (chunk_offsets[1:].long() - 1)[seq] == torch.arange(C, device=dev)
    finals = h0.new_zeros((B + 1, H, K, V)).float()
    h0 = h0.float()
    out = torch.empty((C, H, BT, V), dtype=torch.float32, device=dev)
    S = h0.new_zeros((H, K, V))
    for c in range(C):
        S = torch.where(first[c], h0.index_select(0, seq[c : c + 1])[0], S)
        v_new = u[c] - w[c] @ S
        out[c] = q_dec[c] @ S + attn[c] @ v_new
        S = S * chunk_decay[c] + k_dec[c].transpose(-1, -2) @ v_new
        dst = torch.where(last[c], seq[c], B)  # row B is a dump row: not a sequence's last chunk
        finals.index_copy_(0, dst[None], S[None])

    o = torch.zeros((T + 1, H, V), dtype=torch.float32, device=dev)
    rows = torch.where(valid, pos, T).reshape(-1)  # row T is a dump row for padded positions
    o.index_copy_(0, rows, out.transpose(1, 2).reshape(C * BT, H, V))
    return o[:T], finals[:B]


def chunk_reference(q, k, v, g, beta, h0, cu_seqlens, scale: float, use_qk_l2norm: bool, chunk_indices=None, chunk_offsets=None):
    """Chunked algorithm with explicit initial states ``h0`` [B, H, K, V]: ``(o fp32, finals fp32)``."""
    if chunk_indices is None or chunk_offsets is None:
        chunk_indices, chunk_offsets = _metadata_from_cu(cu_seqlens)
    return _chunked(q, k, v, g, beta, h0, cu_seqlens, chunk_indices, chunk_offsets, scale, use_qk_l2norm)


def _null_slot_indices(state_indices: torch.Tensor) -> torch.Tensor:
    # Negative (padded) slots are redirected to slot 0, vLLM's reserved null slot: the
    # write-back below writes slot 0's own value back there, so no read-back is needed
    # to skip them. A padded and a real request must not both name slot 0 in one call.
    return state_indices.long().clamp(min=0)


def _gather_initial(state_cache, state_indices, has_initial_state, B):
    if state_indices is None:
        idx = torch.arange(B, device=state_cache.device)
        valid = torch.ones(B, dtype=torch.bool, device=state_cache.device)
    else:
        valid = state_indices >= 0
        idx = _null_slot_indices(state_indices)
    h0 = state_cache.index_select(0, idx).float()
    if has_initial_state is not None:
        h0 = h0 * has_initial_state.to(h0.dtype)[:, None, None, None]
    return h0, idx, valid


def _write_back(state_cache, idx, valid, finals):
    current = state_cache.index_select(0, idx)
    new = torch.where(valid[:, None, None, None], finals.to(state_cache.dtype), current)
    state_cache.index_copy_(0, idx, new)


# ----------------------------------------------------------------------------------
# the ops
# ----------------------------------------------------------------------------------


@torch.library.custom_op("ascend_graph::chunk_gated_delta_rule", mutates_args=("state_cache",))
def _chunk_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state_cache: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    state_indices: torch.Tensor | None,
    has_initial_state: torch.Tensor | None,
    chunk_indices: torch.Tensor | None,
    chunk_offsets: torch.Tensor | None,
    scale: float,
    use_qk_l2norm: bool,
) -> torch.Tensor:
    check_args(q, k, v, g, beta, state_cache)
    cu = cu_seqlens if cu_seqlens is not None else torch.tensor([0, q.shape[0]], device=q.device)
    B = cu.shape[0] - 1
    h0, idx, valid = _gather_initial(state_cache, state_indices, has_initial_state, B)
    o, finals = chunk_reference(q, k, v, g, beta, h0, cu, scale, use_qk_l2norm, chunk_indices, chunk_offsets)
    _write_back(state_cache, idx, valid, finals)
    return o.to(v.dtype)


@_chunk_op.register_fake
def _(q, k, v, g, beta, state_cache, cu_seqlens, state_indices, has_initial_state, chunk_indices, chunk_offsets, scale, use_qk_l2norm):
    check_args(q, k, v, g, beta, state_cache)
    # contiguous whatever v's strides: every implementation writes a fresh [T, H, V] (not
    # empty_like(v), which would keep a permuted v's strides; Qwen3-Next's v is one, and the
    # mismatch failed inductor's stride assert at capture)
    return v.new_empty(v.shape)


@_chunk_op.register_kernel("cuda")
def _(q, k, v, g, beta, state_cache, cu_seqlens, state_indices, has_initial_state, chunk_indices, chunk_offsets, scale, use_qk_l2norm):
    check_args(q, k, v, g, beta, state_cache)
    fla = _fla_chunk()
    if fla is None:
        return _chunk_cuda_torch(q, k, v, g, beta, state_cache, cu_seqlens, state_indices, has_initial_state, chunk_indices, chunk_offsets, scale, use_qk_l2norm)
    # fla-core's kernels. The op is host-bound at prefill sizes (fla's own ~10 launches
    # take ~0.7 ms of host time at 1k-16k tokens), so everything around them is kept to
    # the fewest launches: no metadata when there is one sequence (fla's dense path),
    # metadata passed through as given (int64: fla's dtype, so no per-call casts, and fla
    # can reuse what it derives from the same tensor), one launch each for the state
    # gather and write-back.
    B = 1 if cu_seqlens is None else cu_seqlens.shape[0] - 1
    g32 = g if g.dtype == torch.float32 else g.float()
    h0 = _gather_states(state_cache, state_indices, has_initial_state, B)
    if cu_seqlens is None:
        o, finals = fla(q[None], k[None], v[None], g32[None], beta[None], scale=scale, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=use_qk_l2norm)
    else:
        if chunk_indices is None:
            chunk_indices, _ = _metadata_from_cu(cu_seqlens)
        o, finals = fla(
            q[None], k[None], v[None], g32[None], beta[None], scale=scale, initial_state=h0, output_final_state=True,
            use_qk_l2norm_in_kernel=use_qk_l2norm, cu_seqlens=_as_int64(cu_seqlens), chunk_indices=_as_int64(chunk_indices),
        )
    _scatter_states(finals, state_indices, state_cache)
    o = o[0]
    return o if o.dtype == v.dtype else o.to(v.dtype)


def _as_int64(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.int64 else x.long()


def _state_rows_contiguous(state_cache: torch.Tensor) -> bool:
    return state_cache.shape[0] == 0 or state_cache[0].is_contiguous()


def _gather_states(state_cache, state_indices, has_initial_state, B):
    if _state_rows_contiguous(state_cache):
        from .kernels.triton.gated_delta import gather_states_triton

        return gather_states_triton(state_cache, state_indices, has_initial_state, B)
    return _gather_initial(state_cache, state_indices, has_initial_state, B)[0]


def _scatter_states(finals, state_indices, state_cache):
    if _state_rows_contiguous(state_cache):
        from .kernels.triton.gated_delta import scatter_states_triton

        return scatter_states_triton(finals.contiguous(), state_indices, state_cache)
    _, idx, valid = _gather_initial(state_cache, state_indices, None, finals.shape[0])
    _write_back(state_cache, idx, valid, finals)


def _chunk_cuda_torch(q, k, v, g, beta, state_cache, cu_seqlens, state_indices, has_initial_state, chunk_indices, chunk_offsets, scale, use_qk_l2norm):
    """Without fla-core: the chunked torch algorithm (no host read when metadata is given)."""
    if cu_seqlens is None:
        cu = torch.tensor([0, q.shape[0]], dtype=torch.int32).to(q.device, non_blocking=True)
    else:
        cu = cu_seqlens
    B = cu.shape[0] - 1
    if chunk_indices is None or chunk_offsets is None:
        chunk_indices, chunk_offsets = _metadata_from_cu(cu)
    h0, idx, valid = _gather_initial(state_cache, state_indices, has_initial_state, B)
    o, finals = _chunked(q, k, v, g, beta, h0, cu, chunk_indices, chunk_offsets, scale, use_qk_l2norm)
    _write_back(state_cache, idx, valid, finals)
    return o.to(v.dtype)


@functools.cache
def _fla_chunk():
    """fla-core's chunk kernel when installed (the optional ``fla`` extra), else None (looked up once)."""
    try:
        module = importlib.import_module("fla.ops.gated_delta_rule")
    except ImportError:
        return None
    return getattr(module, "chunk_gated_delta_rule", None)


@torch.library.custom_op("ascend_graph::recurrent_gated_delta_rule", mutates_args=("state_cache",))
def _recurrent_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state_cache: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    state_indices: torch.Tensor | None,
    num_accepted_tokens: torch.Tensor | None,
    scale: float,
    use_qk_l2norm: bool,
) -> torch.Tensor:
    check_args(q, k, v, g, beta, state_cache)
    T = q.shape[0]
    cu = cu_seqlens.tolist() if cu_seqlens is not None else list(range(T + 1))
    idx = state_indices.tolist() if state_indices is not None else list(range(len(cu) - 1))
    acc = num_accepted_tokens.tolist() if num_accepted_tokens is not None else None
    out = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    for b in range(len(cu) - 1):
        lo, hi = cu[b], cu[b + 1]
        row = idx[b] if isinstance(idx[b], list) else [idx[b]]
        read = row[(acc[b] - 1) if (acc is not None and len(row) > 1) else 0]
        if read < 0 or hi == lo:
            continue
        o, states = recurrent_reference(q[lo:hi], k[lo:hi], v[lo:hi], g[lo:hi], beta[lo:hi], state_cache[read], scale, use_qk_l2norm, keep_states=True)
        out[lo:hi] = o
        if len(row) > 1:  # speculative layout: every token's state goes to its own slot
            for t in range(hi - lo):
                if row[t] >= 0:
                    state_cache[row[t]] = states[t].to(state_cache.dtype)
        else:
            state_cache[read] = states[-1].to(state_cache.dtype)
    return out.to(v.dtype)


@_recurrent_op.register_fake
def _(q, k, v, g, beta, state_cache, cu_seqlens, state_indices, num_accepted_tokens, scale, use_qk_l2norm):
    check_args(q, k, v, g, beta, state_cache)
    return v.new_empty(v.shape)  # contiguous, as every implementation's output (see above)


@_recurrent_op.register_kernel("cuda")
def _(q, k, v, g, beta, state_cache, cu_seqlens, state_indices, num_accepted_tokens, scale, use_qk_l2norm):
    check_args(q, k, v, g, beta, state_cache)
    from .kernels.triton.gated_delta import recurrent_gated_delta_rule_triton

    return recurrent_gated_delta_rule_triton(q, k, v, g, beta, state_cache, cu_seqlens, state_indices, num_accepted_tokens, scale, use_qk_l2norm)


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state_cache: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    state_indices: torch.Tensor | None = None,
    has_initial_state: torch.Tensor | None = None,
    metadata: ChunkMetadata | None = None,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
) -> torch.Tensor:
    """Prefill; ``metadata`` (from :class:`ChunkMetadataBuilder`) supplies ``cu_seqlens`` too."""
    if metadata is not None:
        cu_seqlens = metadata.cu_seqlens
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return torch.ops.ascend_graph.chunk_gated_delta_rule(
        q, k, v, g, beta, state_cache, cu_seqlens, state_indices, has_initial_state,
        None if metadata is None else metadata.chunk_indices,
        None if metadata is None else metadata.chunk_offsets,
        scale, use_qk_l2norm,
    )


def recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state_cache: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    state_indices: torch.Tensor | None = None,
    num_accepted_tokens: torch.Tensor | None = None,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
) -> torch.Tensor:
    """Decode / speculative verify (``1+k`` tokens per request through ``cu_seqlens``)."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return torch.ops.ascend_graph.recurrent_gated_delta_rule(
        q, k, v, g, beta, state_cache, cu_seqlens, state_indices, num_accepted_tokens, scale, use_qk_l2norm
    )


del F
