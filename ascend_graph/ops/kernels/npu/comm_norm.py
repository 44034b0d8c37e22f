"""NPU binding of ``moe_combine_add_rms_norm`` (``ops/comm_norm.py``), written against
torch-npu 2.13.0 and held to it by ``tests/ops/test_npu_contract.py`` (``META_CHECKS``).

``ep_world_size > 1``: the MC2 steps of ``kernels/npu/moe.py`` (HCCL window check,
``npu_moe_distribute_dispatch_v2``, the two grouped matmuls) and, instead of
``npu_moe_distribute_combine_v2`` followed by ``npu_add_rms_norm``, one
``npu_moe_distribute_combine_add_rms_norm`` with the same combine arguments plus
``residual_x [T, 1, H]``, ``gamma`` and ``norm_eps``; its ``(y, rstd, x)`` outputs are
``[T, 1, H]``, viewed back to ``[T, H]``. ``ep_world_size == 1`` composes the two
single-device bindings. Nothing here has run on an NPU (none exists on this project's
machines).
"""

from __future__ import annotations

import torch

from . import moe as _moe

__all__ = ["register", "META_CHECKS", "moe_combine_add_rms_norm_npu"]


def moe_combine_add_rms_norm_npu(x, topk_weights, topk_ids, w13, w2, residual, weight, eps, activation="silu", active_mask=None, ep_group="", ep_world_size=1, ep_rank=0):
    import torch_npu

    if ep_world_size == 1:
        y = _moe.dispatch_ffn_combine_npu(x, topk_weights, topk_ids, w13, w2, activation, active_mask)
        normed, _rstd, s = torch_npu.npu_add_rms_norm(y, residual, weight, epsilon=eps)
        return normed, s
    t, h = x.shape
    k = topk_ids.shape[1]
    ids = topk_ids.int()
    e_global = w13.shape[0] * ep_world_size
    _moe.check_comm_buffer(t, h, k, e_global, ep_world_size, x.dtype, _moe.hccl_buffsize_mb())
    mask = None if active_mask is None else active_mask.bool()
    expand_x, _scales, assist, counts, ep_counts, tp_counts, _ = torch_npu.npu_moe_distribute_dispatch_v2(
        x, ids, group_ep=ep_group, ep_world_size=ep_world_size, ep_rank_id=ep_rank, moe_expert_num=e_global, x_active_mask=mask, global_bs=0, expert_token_nums_type=1
    )
    y = _moe._gmm(_moe._act_npu(_moe._gmm(expand_x, w13, counts), activation), w2, counts)
    normed, _rstd, s = torch_npu.npu_moe_distribute_combine_add_rms_norm(
        y, ids, assist, ep_counts, topk_weights.float(), residual.reshape(t, 1, h), weight,
        group_ep=ep_group, ep_world_size=ep_world_size, ep_rank_id=ep_rank, moe_expert_num=e_global,
        tp_send_counts=tp_counts, x_active_mask=mask, global_bs=0, norm_eps=eps,
    )
    return normed.view(t, h), s.view(t, h)


def register() -> None:
    from ... import comm_norm as ops

    ops.moe_combine_add_rms_norm.register_kernel("npu", moe_combine_add_rms_norm_npu)


# -- contract checks ----------------------------------------------------------------

_T, _H, _I, _K, _EP, _E = 7, 64, 32, 4, 4, 32


def _check_combine_add_rms_norm():
    # our (normed, s) are [T, H]; the kernel's (y, rstd, x) are [T, 1, H], [T, 1, 1], [T, 1, H]
    from ... import comm_norm as ops

    x, residual, gamma = torch.randn(_T, _H, dtype=torch.bfloat16), torch.randn(_T, _H, dtype=torch.bfloat16), torch.randn(_H, dtype=torch.bfloat16)
    w, ids = torch.rand(_T, _K), torch.randint(0, _E, (_T, _K), dtype=torch.int32)
    w13, w2 = torch.randn(_E // _EP, 2 * _I, _H, dtype=torch.bfloat16), torch.randn(_E // _EP, _H, _I, dtype=torch.bfloat16)
    normed, s = _moe._fake_shapes(ops.moe_combine_add_rms_norm, x, w, ids, w13, w2, residual, gamma, 1e-6, "silu", None, "ep", _EP, 1)
    expected = [(normed[0], 1, normed[1]), (normed[0], 1, 1), (s[0], 1, s[1])]
    a = _T * _EP * min(_E // _EP, _K)
    expand_x = torch.randn(a, _H, dtype=torch.bfloat16)
    assist = torch.zeros(max(_T * _K, a * 128), dtype=torch.int32)
    ep_counts = torch.zeros(_E, dtype=torch.int32)
    kwargs = dict(tp_send_counts=torch.zeros(0, dtype=torch.int32), x_active_mask=torch.ones(_T, dtype=torch.bool), global_bs=0, norm_eps=1e-6)
    args = (expand_x, ids, assist, ep_counts, w, residual.reshape(_T, 1, _H), gamma, "ep", _EP, 1, _E)
    return expected, args, kwargs


META_CHECKS = [
    ("npu_moe_distribute_combine_add_rms_norm", _check_combine_add_rms_norm),
]
