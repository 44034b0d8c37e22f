"""NPU binding of ``causal_conv1d`` / ``causal_conv1d_update`` to ``torch_npu.npu_fused_causal_conv1d``.

Entry point: :func:`register` (called by ``register_all`` when an NPU graph is compiled).
Nothing here has run on an NPU; the names, keywords and output shapes are held to
torch-npu 2.13.0 by ``tests/ops/test_npu_contract.py`` through :data:`META_CHECKS`.

What torch_npu's op is (its docstring in the 2.13.0 wheel, ``_op_plugin_docs.py``):
``npu_fused_causal_conv1d(x, weight, conv_states, *, query_start_loc, cache_indices,
initial_state_mode, bias, num_accepted_tokens, activation, pad_slot_id, ...) -> y`` with
tokens-last layouts: ``x`` ``[T, dim]`` (with ``query_start_loc``) or ``[B, L, dim]``,
``weight`` ``[K, dim]``, ``conv_states`` ``[N, state_len, dim]`` updated in place; it pads
each sequence's head with the cached state (so the state is always the initial state).
The same docstring says ``K`` is fixed to 3, ``dim % 128 == 0``, and that ``bias``,
``activation`` and ``initial_state_mode`` are not supported yet.

So the binding:

- maps our channel-first views to tokens-last ones with a transpose (free for the
  layouts models produce: HF's ``[B, C, L]`` is a transpose of a ``[B, L, C]`` tensor);
- applies ``bias`` and the activation after the op (both act on the output only);
- emulates ``has_initial_state == False`` by zeroing those requests' slots first, with an
  accumulating ``index_put_`` (no host sync; padded requests add 0, so a padded request
  sharing slot 0 with a real one cannot race it);
- uses a zero scratch state when the caller passes none (prefill without a cache);
- falls back to the plain-torch reference (host sync, slow, correct) outside the op's
  documented envelope: ``K != 3``, ``dim % 128 != 0``, a dtype other than fp16/bf16, a
  state length other than ``K-1`` (``K-2+L`` with ``num_accepted_tokens``), or a state
  that is not contiguous in the tokens-last layout. HF caches keep ``S = K`` columns, so
  HF graphs take the fallback until the op's ``state_len`` handling is confirmed on a device.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

log = logging.getLogger("ascend_graph.ops.npu.causal_conv")

__all__ = ["register", "META_CHECKS", "npu_causal_conv1d", "npu_causal_conv1d_update", "supported"]

#: torch_npu skips requests whose cache index equals this (our contract: any negative index)
PAD_SLOT_ID = -1


def supported(x: torch.Tensor, weight: torch.Tensor, conv_states: torch.Tensor | None, tokens: int, spec: bool) -> bool:
    """Whether the call lies inside ``npu_fused_causal_conv1d``'s documented envelope."""
    C, K = weight.shape
    if K != 3 or C % 128 != 0 or x.dtype not in (torch.float16, torch.bfloat16):
        return False
    if conv_states is not None:
        want = K - 2 + tokens if spec else K - 1
        if conv_states.shape[-1] != want or not conv_states.transpose(-1, -2).is_contiguous():
            return False
    return True


def _zero_fresh_slots(conv_states: torch.Tensor, slots: torch.Tensor, keep: torch.Tensor) -> None:
    """conv_states[slots[i]] = 0 where not keep[i] (slots < 0 untouched), without a host sync."""
    valid = slots >= 0
    idx = torch.where(valid, slots, torch.zeros_like(slots)).long()
    cur = conv_states.index_select(0, idx)
    zero = (valid & ~keep).view(-1, 1, 1)
    conv_states.index_put_((idx,), torch.where(zero, -cur, torch.zeros_like(cur)), accumulate=True)


def _post(y: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    if bias is not None:
        y = y + bias
    if activation in ("silu", "swish"):
        y = torch.nn.functional.silu(y)
    return y


def npu_causal_conv1d(x, weight, bias, conv_states, query_start_loc, cache_indices, has_initial_state, activation):
    """``ascend_graph::causal_conv1d`` on NPU."""
    from ...causal_conv import reference_causal_conv1d

    varlen = query_start_loc is not None
    if not supported(x, weight, conv_states, 1, spec=False):
        log.debug("causal_conv1d: outside npu_fused_causal_conv1d's envelope; plain-torch fallback")
        return reference_causal_conv1d(x, weight, bias, conv_states, query_start_loc, cache_indices, has_initial_state, activation)
    import torch_npu

    C, K = weight.shape
    batch = query_start_loc.shape[0] - 1 if varlen else x.shape[0]
    if conv_states is None:
        states = x.new_zeros((batch, K - 1, C))
        indices = None
    else:
        states = conv_states.transpose(-1, -2)  # [N, S, C], contiguous (checked above)
        indices = cache_indices
        slots = cache_indices if cache_indices is not None else torch.arange(batch, device=x.device)
        keep = has_initial_state.bool() if has_initial_state is not None else torch.zeros(batch, dtype=torch.bool, device=x.device)
        _zero_fresh_slots(conv_states, slots, keep)
    y = torch_npu.npu_fused_causal_conv1d(
        x.transpose(-1, -2),
        weight.t().contiguous(),
        states,
        query_start_loc=query_start_loc,
        cache_indices=indices,
        activation="None",
        pad_slot_id=PAD_SLOT_ID,
    )
    return _post(y, bias, activation).transpose(-1, -2)


def npu_causal_conv1d_update(x, conv_state, weight, bias, cache_indices, num_accepted_tokens, activation):
    """``ascend_graph::causal_conv1d_update`` on NPU (decode and speculative verify)."""
    from ...causal_conv import reference_causal_conv1d_update

    x3 = x.unsqueeze(-1) if x.dim() == 2 else x
    spec = num_accepted_tokens is not None
    if not supported(x3, weight, conv_state, x3.shape[-1], spec=spec):
        log.debug("causal_conv1d_update: outside npu_fused_causal_conv1d's envelope; plain-torch fallback")
        return reference_causal_conv1d_update(x, conv_state, weight, bias, cache_indices, num_accepted_tokens, activation)
    import torch_npu

    y = torch_npu.npu_fused_causal_conv1d(
        x3.transpose(-1, -2),
        weight.t().contiguous(),
        conv_state.transpose(-1, -2),
        cache_indices=cache_indices,
        num_accepted_tokens=num_accepted_tokens,
        activation="None",
        pad_slot_id=PAD_SLOT_ID,
    )
    y = _post(y, bias, activation).transpose(-1, -2)
    return y.squeeze(-1) if x.dim() == 2 else y


def register() -> None:
    """Attach the NPU kernels to the custom ops."""
    from ...causal_conv import _causal_conv1d_op, _causal_conv1d_update_op

    _causal_conv1d_op.register_kernel("npu", npu_causal_conv1d)
    _causal_conv1d_update_op.register_kernel("npu", npu_causal_conv1d_update)


# --------------------------------------------------------------------------------------
# Contract cases: our fake impl's output shape, mapped through the binding's layout
# transpose (channel-first -> tokens-last, the shape the binding expects back from the
# NPU op), against the call the binding makes.


def _fake_out(fn: Callable[..., torch.Tensor], *args: Any) -> tuple[int, ...]:
    """Our op on meta tensors (its fake impl), seen in the tokens-last layout."""
    out = fn(*args)
    return tuple(out.transpose(-1, -2).shape)


def _case_varlen_prefill():
    from ...causal_conv import causal_conv1d

    T, C, K, N = 19, 256, 3, 8
    x = torch.empty(T, C, dtype=torch.bfloat16, device="meta").t()
    w = torch.empty(C, K, dtype=torch.bfloat16, device="meta")
    states = torch.empty(N, K - 1, C, dtype=torch.bfloat16, device="meta").transpose(-1, -2)
    qsl = torch.empty(5, dtype=torch.int32, device="meta")
    idx = torch.empty(4, dtype=torch.int32, device="meta")
    expected = [_fake_out(causal_conv1d, x, w, None, states, qsl, idx, None, "silu")]
    args = (x.t(), w.t(), states.transpose(-1, -2))
    kwargs = dict(query_start_loc=qsl, cache_indices=idx, activation="None", pad_slot_id=PAD_SLOT_ID)
    return expected, args, kwargs


def _case_batched_prefill():
    from ...causal_conv import causal_conv1d

    B, L, C, K = 3, 7, 128, 3
    x = torch.empty(B, L, C, dtype=torch.float16, device="meta").transpose(1, 2)
    w = torch.empty(C, K, dtype=torch.float16, device="meta")
    states = torch.empty(B, K - 1, C, dtype=torch.float16, device="meta").transpose(-1, -2)
    expected = [_fake_out(causal_conv1d, x, w, None, states)]
    args = (x.transpose(1, 2), w.t(), states.transpose(-1, -2))
    kwargs = dict(query_start_loc=None, cache_indices=None, activation="None", pad_slot_id=PAD_SLOT_ID)
    return expected, args, kwargs


def _case_spec_decode():
    from ...causal_conv import causal_conv1d_update

    B, L, C, K, N = 4, 3, 384, 3, 6
    x = torch.empty(B, L, C, dtype=torch.bfloat16, device="meta").transpose(1, 2)
    w = torch.empty(C, K, dtype=torch.bfloat16, device="meta")
    state = torch.empty(N, K - 2 + L, C, dtype=torch.bfloat16, device="meta").transpose(-1, -2)
    idx = torch.empty(B, dtype=torch.int32, device="meta")
    acc = torch.empty(B, dtype=torch.int32, device="meta")
    expected = [_fake_out(causal_conv1d_update, x, state, w, None, idx, acc, "silu")]
    args = (x.transpose(1, 2), w.t(), state.transpose(-1, -2))
    kwargs = dict(cache_indices=idx, num_accepted_tokens=acc, activation="None", pad_slot_id=PAD_SLOT_ID)
    return expected, args, kwargs


#: (torch_npu op name, build) pairs; build() -> (expected output shapes, args, kwargs)
META_CHECKS = [
    ("npu_fused_causal_conv1d", _case_varlen_prefill),
    ("npu_fused_causal_conv1d", _case_batched_prefill),
    ("npu_fused_causal_conv1d", _case_spec_decode),
]
