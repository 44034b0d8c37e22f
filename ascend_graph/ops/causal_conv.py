"""Causal depthwise conv1d: ``causal_conv1d`` (prefill) and ``causal_conv1d_update`` (decode).

The short convolution in front of gated delta nets (Qwen3-Next), Mamba/Mamba2 mixers and
short-conv blocks (LFM2): a depthwise (``groups == channels``) 1-D convolution of kernel
width ``K`` that only looks back, with a per-request cache of the last ``S >= K-1``
inputs (the "conv state") so decode can continue a sequence one token (or ``1+k``
speculative tokens) at a time.

Layouts (the Dao-AILab / vLLM conventions; any strides are accepted):

- ``x``: ``[B, C, L]`` (batched) or ``[C, T]`` with ``query_start_loc`` ``[B+1]`` (varlen,
  sequence ``b`` is ``x[:, qsl[b]:qsl[b+1]]``); for the update ``[B, C]`` or ``[B, C, L]``;
- ``weight``: ``[C, K]``; ``bias``: ``[C]`` or None;
- conv states: ``[N, C, S]``, ``S >= K-1``; request ``b`` owns slot ``cache_indices[b]``
  (or ``b`` without indices); a negative index marks a padded request: its state is not
  read or written and its outputs are unspecified (the CPU reference and Triton write 0).
  Non-negative indices must be unique.
- ``activation``: ``""`` or ``"silu"`` / ``"swish"`` (the same function).

Semantics, per request with slot ``s`` (written for one channel; ``w`` has ``K`` taps):

- prefill: ``seq = cat(init, x_b)`` with ``init = conv_states[s]`` where
  ``has_initial_state[b]`` else zeros (``S`` columns); ``out[t] = act(bias + sum_k w[k] *
  seq[S-(K-1)+t+k])``; afterwards ``conv_states[s] = seq[-S:]``.
- update: ``L`` new tokens (``L = 1`` plain decode, ``1+k`` under speculative decoding).
  Without ``num_accepted_tokens``: the window is the last ``K-1`` state columns and the
  state shifts by ``L``: ``conv_states[s] = cat(state, x_b)[-S:]``. With
  ``num_accepted_tokens`` (vLLM's speculative layout, ``S = K-2+L``): the window starts
  at column ``a-1`` where ``a = num_accepted_tokens[b]`` (the previous step's drafts that
  were accepted), and ``conv_states[s] = cat(state[a : a+S-L], x_b)``.

The metadata (``query_start_loc``, ``cache_indices``, ``has_initial_state``,
``num_accepted_tokens``) are device tensors, so a captured graph replays without
argument patching. Entry points: ``torch.ops.ascend_graph.causal_conv1d`` /
``causal_conv1d_update`` (and the Python functions of the same name here). The CPU
reference below is the ground truth; CUDA runs ``kernels/triton/causal_conv.py``; NPU
binds ``torch_npu.npu_fused_causal_conv1d`` (``kernels/npu/causal_conv.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UnsupportedError

__all__ = [
    "causal_conv1d",
    "causal_conv1d_update",
    "reference_causal_conv1d",
    "reference_causal_conv1d_update",
    "ACTIVATIONS",
    "check_args",
]

#: accepted spellings of the activation; "" is none
ACTIVATIONS = ("", "silu", "swish")


def check_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_states: torch.Tensor | None,
    activation: str,
    *,
    varlen: bool,
    update: bool,
) -> None:
    """Shape/dtype checks shared by the reference, the fake impls and the kernels."""
    if activation not in ACTIVATIONS:
        raise UnsupportedError("causal_conv1d: unknown activation", expected=f"one of {ACTIVATIONS}", got=repr(activation))
    if weight.dim() != 2:
        raise UnsupportedError("causal_conv1d: weight must be [C, K]", expected="2-D weight [C, K]", got=tuple(weight.shape))
    C, K = weight.shape
    if update:
        ok_dims = (2, 3)
    else:
        ok_dims = (2,) if varlen else (3,)
    if x.dim() not in ok_dims or x.shape[-2 if x.dim() == 3 or varlen else -1] != C:
        want = "[C, T]" if varlen else ("[B, C] or [B, C, L]" if update else "[B, C, L]")
        raise UnsupportedError("causal_conv1d: x does not match the weight", expected=f"x {want} with C={C}", got=tuple(x.shape))
    if bias is not None and tuple(bias.shape) != (C,):
        raise UnsupportedError("causal_conv1d: bias must be [C]", expected=(C,), got=tuple(bias.shape))
    if conv_states is not None:
        if conv_states.dim() != 3 or conv_states.shape[1] != C or conv_states.shape[2] < K - 1:
            raise UnsupportedError(
                "causal_conv1d: conv states must be [N, C, S] with S >= K-1",
                expected=f"[N, {C}, >= {K - 1}]",
                got=tuple(conv_states.shape),
            )


def _act(y: torch.Tensor, activation: str) -> torch.Tensor:
    return F.silu(y) if activation in ("silu", "swish") else y


def _slots(cache_indices: torch.Tensor | None, batch: int) -> list[int]:
    return list(range(batch)) if cache_indices is None else [int(i) for i in cache_indices.tolist()]


def _conv_window(seq: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, length: int) -> torch.Tensor:
    """Valid depthwise conv of ``seq`` [C, K-1+length] (fp32) -> [C, length].

    Written as windows times taps (``unfold``, a view) rather than ``F.conv1d``: oneDNN's
    depthwise conv costs tens of ms per call on small decode shapes (it builds a primitive
    per shape), which made the fused CPU decode step slower than the unfused graph.
    """
    K = weight.shape[1]
    y = (seq[:, : K - 1 + length].unfold(-1, K, 1) * weight.float().unsqueeze(1)).sum(-1)
    return y if bias is None else y + bias.float().unsqueeze(1)


# --------------------------------------------------------------------------------------
# prefill


def reference_causal_conv1d(x, weight, bias, conv_states, query_start_loc, cache_indices, has_initial_state, activation):
    """Prefill reference in plain torch (fp32 accumulation); runs on any device.

    Loops over requests on the host (``.tolist()`` of the metadata): the ground truth for
    tests and the fallback where no kernel applies, never the fast path.
    """
    varlen = query_start_loc is not None
    check_args(x, weight, bias, conv_states, activation, varlen=varlen, update=False)
    C, K = weight.shape
    if varlen:
        bounds = query_start_loc.tolist()
        seqs = [x[:, s:e] for s, e in zip(bounds[:-1], bounds[1:])]
    else:
        seqs = list(x.unbind(0))
    S = conv_states.shape[-1] if conv_states is not None else K - 1
    init_flags = [False] * len(seqs) if has_initial_state is None else [bool(v) for v in has_initial_state.tolist()]
    out = torch.zeros_like(x)
    for b, (xs, slot) in enumerate(zip(seqs, _slots(cache_indices, len(seqs)))):
        if slot < 0:
            continue
        L = xs.shape[-1]
        if conv_states is not None and init_flags[b]:
            init = conv_states[slot].float()
        else:
            init = x.new_zeros((C, S), dtype=torch.float32)
        seq = torch.cat([init, xs.float()], dim=-1)
        y = _act(_conv_window(seq[:, S - (K - 1) :], weight, bias, L), activation)
        if varlen:
            out[:, bounds[b] : bounds[b + 1]] = y.to(x.dtype)
        else:
            out[b] = y.to(x.dtype)
        if conv_states is not None:
            conv_states[slot] = seq[:, -S:].to(conv_states.dtype)
    return out


@torch.library.custom_op("ascend_graph::causal_conv1d", mutates_args=("conv_states",))
def _causal_conv1d_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_states: torch.Tensor | None,
    query_start_loc: torch.Tensor | None,
    cache_indices: torch.Tensor | None,
    has_initial_state: torch.Tensor | None,
    activation: str,
) -> torch.Tensor:
    return reference_causal_conv1d(x, weight, bias, conv_states, query_start_loc, cache_indices, has_initial_state, activation)


@_causal_conv1d_op.register_fake
def _(x, weight, bias, conv_states, query_start_loc, cache_indices, has_initial_state, activation):
    check_args(x, weight, bias, conv_states, activation, varlen=query_start_loc is not None, update=False)
    return torch.empty_like(x)


# --------------------------------------------------------------------------------------
# decode


def reference_causal_conv1d_update(x, conv_state, weight, bias, cache_indices, num_accepted_tokens, activation):
    """Decode reference in plain torch; updates ``conv_state`` in place (host loop, like the prefill one)."""
    check_args(x, weight, bias, conv_state, activation, varlen=False, update=True)
    C, K = weight.shape
    x3 = x.unsqueeze(-1) if x.dim() == 2 else x
    B, _, L = x3.shape
    S = conv_state.shape[-1]
    if num_accepted_tokens is not None and S < K - 2 + L:
        raise UnsupportedError(
            "causal_conv1d_update: with num_accepted_tokens the state holds K-2+L columns",
            expected=f"S >= {K - 2 + L}",
            got=S,
        )
    accepted = None if num_accepted_tokens is None else [int(a) for a in num_accepted_tokens.tolist()]
    out = torch.zeros_like(x3)
    for b, slot in enumerate(_slots(cache_indices, B)):
        if slot < 0:
            continue
        state = conv_state[slot].float()
        xs = x3[b].float()
        if accepted is None:
            window = state[:, S - (K - 1) :]
            new_state = torch.cat([state, xs], dim=-1)[:, -S:]
        else:
            a = accepted[b]
            window = state[:, a - 1 : a - 1 + K - 1]
            new_state = torch.cat([state[:, a : a + S - L], xs], dim=-1)
        seq = torch.cat([window, xs], dim=-1)
        out[b] = _act(_conv_window(seq, weight, bias, L), activation).to(x.dtype)
        conv_state[slot] = new_state.to(conv_state.dtype)
    return out.squeeze(-1) if x.dim() == 2 else out


@torch.library.custom_op("ascend_graph::causal_conv1d_update", mutates_args=("conv_state",))
def _causal_conv1d_update_op(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cache_indices: torch.Tensor | None,
    num_accepted_tokens: torch.Tensor | None,
    activation: str,
) -> torch.Tensor:
    return reference_causal_conv1d_update(x, conv_state, weight, bias, cache_indices, num_accepted_tokens, activation)


@_causal_conv1d_update_op.register_fake
def _(x, conv_state, weight, bias, cache_indices, num_accepted_tokens, activation):
    check_args(x, weight, bias, conv_state, activation, varlen=False, update=True)
    return torch.empty_like(x)


# --------------------------------------------------------------------------------------
# CUDA: the Triton kernels, imported on first use (Triton is only needed on CUDA).


@_causal_conv1d_op.register_kernel("cuda")
def _(x, weight, bias, conv_states, query_start_loc, cache_indices, has_initial_state, activation):
    from .kernels.triton import causal_conv as tk

    check_args(x, weight, bias, conv_states, activation, varlen=query_start_loc is not None, update=False)
    return tk.causal_conv1d(x, weight, bias, conv_states, query_start_loc, cache_indices, has_initial_state, activation)


@_causal_conv1d_update_op.register_kernel("cuda")
def _(x, conv_state, weight, bias, cache_indices, num_accepted_tokens, activation):
    from .kernels.triton import causal_conv as tk

    check_args(x, weight, bias, conv_state, activation, varlen=False, update=True)
    return tk.causal_conv1d_update(x, conv_state, weight, bias, cache_indices, num_accepted_tokens, activation)


# --------------------------------------------------------------------------------------
# Python entry points with keyword defaults


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    conv_states: torch.Tensor | None = None,
    query_start_loc: torch.Tensor | None = None,
    cache_indices: torch.Tensor | None = None,
    has_initial_state: torch.Tensor | None = None,
    activation: str = "",
) -> torch.Tensor:
    """Prefill causal conv (see the module docstring); writes final states into ``conv_states``."""
    return torch.ops.ascend_graph.causal_conv1d(
        x, weight, bias, conv_states, query_start_loc, cache_indices, has_initial_state, activation or ""
    )


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    cache_indices: torch.Tensor | None = None,
    num_accepted_tokens: torch.Tensor | None = None,
    activation: str = "",
) -> torch.Tensor:
    """Decode step (1 or 1+k tokens per request); updates ``conv_state`` in place."""
    return torch.ops.ascend_graph.causal_conv1d_update(
        x, conv_state, weight, bias, cache_indices, num_accepted_tokens, activation or ""
    )
