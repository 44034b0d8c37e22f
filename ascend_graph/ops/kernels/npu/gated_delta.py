"""NPU bindings of the gated delta rule ops.

Entry points: :func:`register` (attaches the bindings to the ``npu`` key; called by
``register_all``) and :data:`META_CHECKS` (held against torch-npu 2.13.0's
``CustomFunctions.h`` and meta registrations by ``tests/ops/test_npu_contract.py``).

Mapping (names and keywords from torch-npu 2.13.0's ``CustomFunctions.h``):

- ``chunk_gated_delta_rule`` -> ``npu_chunk_gated_delta_rule(query, key, value, beta=,
  initial_state=, actual_seq_lengths=, scale=, g=)``, which returns ``(out, final_state)``
  for the ``B`` sequences: we gather the initial states from the cache by slot (zeroing
  those without ``has_initial_state``) and scatter the final states back. The NPU op
  builds its chunk tiling from ``actual_seq_lengths`` on the device, so the host-built
  ``chunk_indices``/``chunk_offsets`` are not passed (they serve the CUDA kernels).
- ``recurrent_gated_delta_rule`` -> ``npu_recurrent_gated_delta_rule(query, key, value,
  state, beta=, scale=, actual_seq_lengths=, ssm_state_indices=, num_accepted_tokens=,
  g=)``, which updates ``state`` (the whole cache) in place, as our op does.

Neither NPU op takes an L2-norm flag, so with ``use_qk_l2norm`` q and k are normalised
in torch first. ``actual_seq_lengths`` gets per-request lengths (``diff(cu_seqlens)``),
read from the header's argument names; the meta registrations say the NPU kernels
compute and return bf16, so outputs are cast back to ``v``'s dtype. Nothing here has run
on an NPU (none exists on this project's machines).
"""

from __future__ import annotations

import torch

__all__ = ["register", "META_CHECKS", "chunk_gated_delta_rule_npu", "recurrent_gated_delta_rule_npu"]


def _l2(x: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt((xf * xf).sum(-1, keepdim=True) + 1e-6)).to(x.dtype)


def _lens(cu_seqlens: torch.Tensor | None, T: int, device: torch.device) -> torch.Tensor:
    if cu_seqlens is None:
        return torch.ones(T, dtype=torch.int64, device=device)
    return (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)


def chunk_gated_delta_rule_npu(q, k, v, g, beta, state_cache, cu_seqlens, state_indices, has_initial_state, chunk_indices, chunk_offsets, scale, use_qk_l2norm):
    import torch_npu

    from ...gated_delta import _gather_initial, _write_back

    if use_qk_l2norm:
        q, k = _l2(q), _l2(k)
    lens = _lens(cu_seqlens, 0, q.device) if cu_seqlens is not None else torch.full((1,), q.shape[0], dtype=torch.int64, device=q.device)
    B = lens.shape[0]
    h0, idx, valid = _gather_initial(state_cache, state_indices, has_initial_state, B)
    out, final = torch_npu.npu_chunk_gated_delta_rule(
        q, k, v, beta=beta, initial_state=h0.to(state_cache.dtype), actual_seq_lengths=lens, scale=scale, g=g.float()
    )
    _write_back(state_cache, idx, valid, final)
    return out.to(v.dtype)


def recurrent_gated_delta_rule_npu(q, k, v, g, beta, state_cache, cu_seqlens, state_indices, num_accepted_tokens, scale, use_qk_l2norm):
    import torch_npu

    if use_qk_l2norm:
        q, k = _l2(q), _l2(k)
    out = torch_npu.npu_recurrent_gated_delta_rule(
        q, k, v, state_cache,
        beta=beta, scale=scale, actual_seq_lengths=_lens(cu_seqlens, q.shape[0], q.device),
        ssm_state_indices=state_indices, num_accepted_tokens=num_accepted_tokens, g=g.float(),
    )
    return out.to(v.dtype)


def register() -> None:
    from ... import gated_delta as ops

    ops._chunk_op.register_kernel("npu", chunk_gated_delta_rule_npu)
    ops._recurrent_op.register_kernel("npu", recurrent_gated_delta_rule_npu)


# ------------------------------------------------------------------------------------
# contract checks (run without an NPU: our fake impls vs torch_npu's meta registrations)
# ------------------------------------------------------------------------------------

_T, _B, _H, _K, _V, _N = 37, 3, 4, 16, 8, 5


def _fake_shapes(fn, *args) -> list[tuple[int, ...]]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        out = fn(*fake)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [tuple(o.shape) for o in outs]


def _inputs():
    q, k = torch.randn(_T, _H, _K), torch.randn(_T, _H, _K)
    v, g, beta = torch.randn(_T, _H, _V), torch.randn(_T, _H), torch.rand(_T, _H)
    return q, k, v, g, beta


def _check_chunk():
    from ... import gated_delta as ops

    q, k, v, g, beta = _inputs()
    cache = torch.zeros(_N, _H, _K, _V)
    cu = torch.tensor([0, 10, 30, _T], dtype=torch.int32)
    shapes = _fake_shapes(torch.ops.ascend_graph.chunk_gated_delta_rule, q, k, v, g, beta, cache, cu, None, None, None, None, _K ** -0.5, True)
    h0 = torch.zeros(_B, _H, _K, _V)
    # torch_npu also returns the B final states, which we scatter into the cache
    kwargs = dict(beta=beta, initial_state=h0, actual_seq_lengths=torch.tensor([10, 20, 7]), scale=_K ** -0.5, g=g)
    del ops
    return shapes + [tuple(h0.shape)], (q, k, v), kwargs


def _check_recurrent():
    q, k, v, g, beta = _inputs()
    cache = torch.zeros(_N, _H, _K, _V)
    shapes = _fake_shapes(torch.ops.ascend_graph.recurrent_gated_delta_rule, q, k, v, g, beta, cache, None, None, None, _K ** -0.5, True)
    kwargs = dict(beta=beta, scale=_K ** -0.5, actual_seq_lengths=torch.ones(_T, dtype=torch.int64), ssm_state_indices=torch.arange(_T) % _N, num_accepted_tokens=None, g=g)
    return shapes, (q, k, v, cache), kwargs


#: (torch_npu op, build) pairs; build() -> (expected output shapes, args, kwargs)
META_CHECKS = [
    ("npu_chunk_gated_delta_rule", _check_chunk),
    ("npu_recurrent_gated_delta_rule", _check_recurrent),
]
