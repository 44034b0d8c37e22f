"""NPU bindings of the attention contracts (torch-npu 2.13.0; never run on an NPU here).

- ``ascend_graph::attention`` -> ``torch_npu.npu_fused_infer_attention_score_v2`` in
  ``BNSD``. The ``_v2`` form is used (CustomFunctions.h declares both) because only it
  takes ``learnable_sink`` (attention sinks); its other arguments are the v1 ones renamed
  (``num_query_heads``, ``softmax_scale``, ``actual_seq_qlen``/``actual_seq_kvlen``).
  Masks: causal -> ``sparse_mode=3`` (bottom-right causal, FIA's compressed 2048x2048
  upper-triangular mask); causal + window -> ``sparse_mode=4`` with ``pre_tokens =
  window - 1, next_tokens = 0``; an explicit mask -> ``sparse_mode=0`` with FIA's
  convention (True = masked out), so a bool mask is inverted and a float (additive)
  mask becomes ``mask != 0`` (exact for the 0 / -inf masks HF builds, not for a general
  bias). A ``Dv < D`` value (MLA without weight absorption) is zero-padded to ``D`` and
  the output sliced back. fp32 runs as fp16 (FIA takes fp16/bf16/int8).
- ``ascend_graph::paged_attention`` -> the same op in ``TND`` with ``block_table``, the
  caches viewed as ``[blocks, block_size, Nkv*D]`` (vllm-ascend's view), ``sparse_mode=3``.
  FIA declares ``actual_seq_qlen`` / ``actual_seq_kvlen`` as host int arrays
  (``SymInt[]?``), so the eager binding reads the device length tensors with ``.tolist()``.
  Inside an ACL graph captured by the runtime (``NpuGraph``; its capture context is
  :func:`~ascend_graph.runtime.npu_updates.active_capture`) that read is not allowed and
  its values would be baked into every replay, so the call is instead issued as
  ``npu_fused_infer_attention_score_v2.out(..., workspace=ws, out=[out, lse])`` inside a
  task group: ``ws`` from ``_npu_fused_infer_attention_score_v2_get_max_workspace`` (one
  per graph, the largest), ``out``/``lse`` from
  ``_npu_fused_infer_attention_score_v2_infer_output`` (as torch_npu's own graph handler
  ``_IFAv2DefaultHandler`` does). The task is registered with the length sources
  ``cu_seqlens_q[1:]`` and ``seq_lens_kv`` (the runner's static buffers), and the runtime
  re-issues it with their new values before each replay. FIA requires
  ``T == cu_seqlens_q[-1]`` and at most 16 query tokens per request (the padding planner's job).
- ``ascend_graph::reshape_and_cache`` -> ``torch_npu.npu_scatter_pa_kv_cache(...,
  cache_mode="Norm")``. That ``slot < 0`` rows are skipped by the NPU op is NOT verified
  (vllm-ascend slices padded tokens off before the call instead).

Cross-layer caches (``runtime/kv_layout.py``). Both torch_npu ops refuse non-contiguous
tensors (torch-npu 2.13.0 ``_op_plugin_docs.py``: scatter "输入参数不支持非连续", FIA key /
value "不支持非连续的Tensor"; FIA's page attention wants the blocks "在一片连续内存中排布"),
and a per-layer view of a ``cross_layer`` cache is not contiguous: its blocks lie
``num_layers`` blocks apart. Calling ``.contiguous()`` would hand the scatter a copy and
lose the write, so the bindings never do. Instead (:func:`_block_alias`) they pass a
contiguous alias of the same storage, ``[(num_blocks - 1) * L + 1, block_size, heads, D]``
starting at the view's first block, in which block ``b`` of the view is block ``b * L``,
and rescale the addresses: ``slot -> (slot // block_size) * L * block_size + slot %
block_size`` for the scatter (negative slots kept), ``block_table * L`` for FIA (device
ops, so a captured graph replays them). Layouts with no such alias are a typed error:
the packed K|V layout (a block of one layer's K is not one contiguous run: head stride
``D + Dv``), K and V caches of different block strides (one slot mapping / block table
addresses both), and an FIA alias above int32 elements (FIA: "shape所有维度相乘不能超过
int32的表示范围"; a cross-layer alias spans every layer's blocks, so a cache above 4 GiB
of bf16 per K or V tensor does not fit: use per-layer caches on the NPU then).

Each binding is a ``_*_call(torch_npu, ...)`` function taking the module as an argument,
so :data:`META_CHECKS` can record the exact call the binding makes (no NPU needed) and
``tests/ops/test_npu_contract.py`` can run torch_npu's own meta function on it.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ....errors import UnsupportedError
from ....runtime import npu_updates
from ....runtime.kv_layout import cross_layer_block_stride
from . import with_torch_npu

__all__ = ["register", "META_CHECKS"]

log = logging.getLogger("ascend_graph.ops.npu.attention")

#: FIA's compressed causal mask is 2048 x 2048 for sparse_mode 2/3/4 (CANN docs).
_COMPRESSED_MASK = 2048
_FIA = "npu_fused_infer_attention_score_v2"
#: what the captured (task-group) path calls besides the task-group API itself
_FIA_GRAPH_OPS = (
    "npu_fused_infer_attention_score_v2.out",
    "_npu_fused_infer_attention_score_v2_get_max_workspace",
    "_npu_fused_infer_attention_score_v2_infer_output",
)
_SCATTER = "npu_scatter_pa_kv_cache"


@functools.lru_cache(maxsize=8)
def _compressed_causal_mask(device: torch.device) -> torch.Tensor:
    return torch.triu(torch.ones(_COMPRESSED_MASK, _COMPRESSED_MASK, dtype=torch.bool, device=device), diagonal=1)


_INT32_MAX = 2**31 - 1


def _block_alias(cache: torch.Tensor, name: str) -> tuple[torch.Tensor, int]:
    """``(alias, step)``: a contiguous tensor over the same storage in which block ``b``
    of ``cache`` is block ``b * step`` (``step`` 1 and ``cache`` itself when contiguous).
    Never a copy: the NPU ops write into it."""
    step = cross_layer_block_stride(cache)
    if step is None:
        raise UnsupportedError(
            f"{name}: the torch_npu KV ops take contiguous caches, and no contiguous alias of this view exists",
            expected="each block's [block_size, heads, D] one contiguous run (layout 'per_layer' or 'cross_layer')",
            got={"shape": tuple(cache.shape), "stride": tuple(cache.stride())},
            hint="allocate K and V apart (kv_layout.allocate('cross_layer', ...)), not packed into one content dim",
        )
    if step == 1:
        return cache, 1
    nb, bs, h, d = cache.shape
    alias = cache.as_strided(((nb - 1) * step + 1, bs, h, d), (bs * h * d, h * d, d, 1), cache.storage_offset())
    return alias, step


def _same_step(k_step: int, v_step: int) -> int:
    if k_step != v_step:
        raise UnsupportedError(
            "K and V caches lie a different number of blocks apart; one slot mapping / block table cannot address both",
            expected="equal block strides (same layout and layer count for K and V)",
            got=(k_step, v_step),
        )
    return k_step


def _remap_slots(slot_mapping: torch.Tensor, block_size: int, step: int, alias_blocks: int) -> torch.Tensor:
    """Flat slots of the view -> flat slots of its alias (negative slots unchanged). The
    scatter takes int32 or int64 slots; int32 ones stay int32 unless the alias holds more
    slots than int32 can address (known from shapes, no device read)."""
    if step == 1:
        return slot_mapping
    slots = slot_mapping.long()
    mapped = torch.where(slots >= 0, (slots // block_size) * (step * block_size) + slots % block_size, slots)
    if slot_mapping.dtype == torch.int32 and alias_blocks * block_size <= _INT32_MAX:
        return mapped.to(torch.int32)
    return mapped


def _fia_dtype(x: torch.Tensor) -> torch.Tensor:
    return x.half() if x.dtype == torch.float32 else x


def _dense_call(torch_npu: Any, q, k, v, attn_mask, sinks, scale, is_causal, window) -> torch.Tensor:
    out_dtype = q.dtype
    d, dv = q.shape[-1], v.shape[-1]
    q, k, v = _fia_dtype(q), _fia_dtype(k), _fia_dtype(v)
    if dv < d:
        v = F.pad(v, (0, d - dv))
    sparse_mode, pre_tokens, next_tokens = 0, 2147483647, 2147483647
    mask = None
    if attn_mask is not None:
        keep = attn_mask if attn_mask.dtype == torch.bool else attn_mask == 0
        if is_causal:
            # FIA cannot combine a compressed causal mask with a user mask: build it whole.
            sq, skv = q.shape[2], k.shape[2]
            qpos = torch.arange(sq, device=q.device)[:, None] + (skv - sq)
            kpos = torch.arange(skv, device=q.device)[None, :]
            causal = kpos <= qpos
            if window > 0:
                causal = causal & (kpos > qpos - window)
            keep = keep & causal
        mask = ~keep
    elif is_causal:
        mask = _compressed_causal_mask(q.device)
        sparse_mode = 3
        if window > 0:
            sparse_mode, pre_tokens, next_tokens = 4, window - 1, 0
    out, _ = torch_npu.npu_fused_infer_attention_score_v2(
        q,
        k,
        v,
        atten_mask=mask,
        learnable_sink=sinks,
        num_query_heads=q.shape[1],
        num_key_value_heads=k.shape[1],
        softmax_scale=float(scale),
        pre_tokens=pre_tokens,
        next_tokens=next_tokens,
        input_layout="BNSD",
        sparse_mode=sparse_mode,
    )
    if dv < d:
        out = out[..., :dv]
    from ...attention import _sdpa_layout

    return _sdpa_layout(out.to(out_dtype))


def _paged_call(torch_npu: Any, q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens_kv, sinks, scale, window) -> torch.Tensor:
    out_dtype = q.dtype
    _, block_size, nkv, d = k_cache.shape
    dv = v_cache.shape[3]
    sparse_mode, pre_tokens, next_tokens = 3, 2147483647, 2147483647
    if window > 0:
        sparse_mode, pre_tokens, next_tokens = 4, window - 1, 0
    query = _fia_dtype(q)
    k_alias, k_step = _block_alias(_fia_dtype(k_cache), "k_cache")
    v_alias, v_step = _block_alias(_fia_dtype(v_cache), "v_cache")
    step = _same_step(k_step, v_step)
    for name, alias in (("k_cache", k_alias), ("v_cache", v_alias)):
        if alias.numel() > _INT32_MAX:
            spans = "this cross-layer alias spans every layer's blocks" if step > 1 else "this per-layer cache is that large itself"
            raise UnsupportedError(
                f"{name}: FIA's paged key/value may hold at most int32-max elements; {spans}",
                expected=f"<= {_INT32_MAX} elements",
                got=alias.numel(),
                hint="use kv_layout.allocate('per_layer', ...) for caches this large on the NPU" if step > 1 else "use fewer blocks per cache",
            )
    key = k_alias.view(k_alias.shape[0], block_size, nkv * d)
    value = v_alias.view(v_alias.shape[0], block_size, nkv * dv)
    mask = _compressed_causal_mask(q.device)
    table = block_table.to(torch.int32) if step == 1 else (block_table.to(torch.int32) * step)
    capture = npu_updates.active_capture()
    if capture is not None:
        out = _paged_captured(
            capture, torch_npu, query, key, value, mask, table, sinks, cu_seqlens_q[1:], seq_lens_kv,
            num_query_heads=q.shape[1], num_key_value_heads=nkv, softmax_scale=float(scale),
            pre_tokens=pre_tokens, next_tokens=next_tokens, sparse_mode=sparse_mode, block_size=block_size,
        )
        return out.to(out_dtype)
    out, _ = torch_npu.npu_fused_infer_attention_score_v2(
        query,
        key,
        value,
        atten_mask=mask,
        actual_seq_qlen=cu_seqlens_q[1:].tolist(),
        actual_seq_kvlen=seq_lens_kv.tolist(),
        block_table=table,
        learnable_sink=sinks,
        num_query_heads=q.shape[1],
        num_key_value_heads=nkv,
        softmax_scale=float(scale),
        pre_tokens=pre_tokens,
        next_tokens=next_tokens,
        input_layout="TND",
        sparse_mode=sparse_mode,
        block_size=block_size,
    )
    return out.to(out_dtype)


def _paged_out_call(
    torch_npu: Any, query, key, value, mask, table, sinks, workspace, out, lse, qlen, kvlen, *,
    num_query_heads, num_key_value_heads, softmax_scale, pre_tokens, next_tokens, sparse_mode, block_size,
) -> None:
    """The paged FIA launch as a graph task: the ``.out`` overload into persistent buffers.
    Issued once at capture and again, with new host lengths, before every replay."""
    torch_npu.npu_fused_infer_attention_score_v2.out(
        query,
        key,
        value,
        atten_mask=mask,
        actual_seq_qlen=qlen,
        actual_seq_kvlen=kvlen,
        block_table=table,
        learnable_sink=sinks,
        num_query_heads=num_query_heads,
        num_key_value_heads=num_key_value_heads,
        softmax_scale=softmax_scale,
        pre_tokens=pre_tokens,
        next_tokens=next_tokens,
        input_layout="TND",
        sparse_mode=sparse_mode,
        block_size=block_size,
        workspace=workspace,
        out=[out, lse],
    )


def _paged_captured(capture: Any, torch_npu: Any, query, key, value, mask, table, sinks, qlen_src, kvlen_src, **fixed: Any) -> torch.Tensor:
    """Inside a runtime capture: workspace and outputs allocated once, the launch recorded
    as a task group whose lengths the runtime patches before each replay."""
    capture.require(_FIA_GRAPH_OPS)
    qlen, kvlen = capture.host_values(qlen_src), capture.host_values(kvlen_src)
    workspace = capture.shared_workspace(
        torch_npu._npu_fused_infer_attention_score_v2_get_max_workspace(
            query,
            key,
            value,
            atten_mask=mask,
            actual_seq_qlen=qlen,
            actual_seq_kvlen=kvlen,
            block_table=table,
            learnable_sink=sinks,
            num_query_heads=fixed["num_query_heads"],
            num_key_value_heads=fixed["num_key_value_heads"],
            softmax_scale=fixed["softmax_scale"],
            pre_tokens=fixed["pre_tokens"],
            next_tokens=fixed["next_tokens"],
            input_layout="TND",
            sparse_mode=fixed["sparse_mode"],
            block_size=fixed["block_size"],
        )
    )
    out, lse = torch_npu._npu_fused_infer_attention_score_v2_infer_output(
        query,
        value,
        input_layout="TND",
        block_table=table,
        num_query_heads=fixed["num_query_heads"],
        num_key_value_heads=fixed["num_key_value_heads"],
    )
    capture.task_group(
        "paged_attention",
        functools.partial(_paged_out_call, torch_npu, **fixed),
        (query, key, value, mask, table, sinks, workspace, out, lse),
        (qlen_src, kvlen_src),
    )
    return out


def _cache_call(torch_npu: Any, k, v, k_cache, v_cache, slot_mapping) -> None:
    key_cache, k_step = _block_alias(k_cache, "k_cache")
    value_cache, v_step = _block_alias(v_cache, "v_cache")
    step = _same_step(k_step, v_step)
    slots = _remap_slots(slot_mapping, k_cache.shape[1], step, key_cache.shape[0])
    torch_npu.npu_scatter_pa_kv_cache(k, v, key_cache, value_cache, slots, cache_mode="Norm")


def register() -> None:
    """Attach the NPU kernels (needs torch_npu: the "npu" device must exist)."""
    from ... import attention as ops

    ops.attention.register_kernel("npu", with_torch_npu(_dense_call))
    ops.paged_attention.register_kernel("npu", with_torch_npu(_paged_call))
    ops.reshape_and_cache.register_kernel("npu", with_torch_npu(_cache_call))


# --------------------------------------------------------------------------- contract rows


class _Recorder:
    """Stands in for torch_npu: records each ``torch_npu.<op>(...)`` call the binding makes."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []

    def __getattr__(self, name: str):
        def op(*args: Any, **kwargs: Any):
            self.calls.append((name, args, kwargs))
            # stand-in outputs: 4-D like FIA's BNSD ones, so the binding's post-processing runs
            empty = torch.empty(0, 0, 0, 0)
            return empty, empty

        return op


def _recorded(call: Callable[..., Any], *args: Any) -> tuple[str, tuple, dict]:
    rec = _Recorder()
    call(rec, *args)
    (only,) = rec.calls
    return only


def _fake_shapes(op: Callable[..., Any], *args: Any) -> list[tuple[int, ...]]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fakes = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        out = op(*fakes)
    outs = out if isinstance(out, (tuple, list)) else ([] if out is None else [out])
    return [tuple(o.shape) for o in outs]


def _dense_case(nq: int, nkv: int, sq: int, skv: int, d: int, *, mask: bool, causal: bool, window: int, sinks: bool):
    def build():
        from ... import attention as ops

        q = torch.randn(2, nq, sq, d, dtype=torch.bfloat16)
        k = torch.randn(2, nkv, skv, d, dtype=torch.bfloat16)
        v = torch.randn(2, nkv, skv, d, dtype=torch.bfloat16)
        m = torch.ones(2, 1, sq, skv, dtype=torch.bool) if mask else None
        s = torch.randn(nq) if sinks else None
        args = (q, k, v, m, s, d**-0.5, causal, window)
        expected = _fake_shapes(ops.attention, *args)
        _, call_args, call_kwargs = _recorded(_dense_call, *args)
        return expected, call_args, call_kwargs

    return build


def _caches(layers: int, num_blocks: int, block_size: int, nkv: int, d: int, dv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer caches (``layers == 0``) or layer 1's views of a cross-layer cache."""
    from ....runtime import kv_layout

    if layers == 0:
        return torch.randn(num_blocks, block_size, nkv, d, dtype=torch.bfloat16), torch.randn(num_blocks, block_size, nkv, dv, dtype=torch.bfloat16)
    caches = kv_layout.allocate("cross_layer", num_layers=layers, num_blocks=num_blocks, block_size=block_size, kv_heads=nkv, head_size=d, head_size_v=dv)
    return caches.layer(1)


def _paged_case(nq: int, nkv: int, d: int, dv: int, q_lens: list[int], kv_lens: list[int], window: int, layers: int = 0):
    def build():
        from ... import attention as ops

        block_size, max_blocks = 128, 4
        t = sum(q_lens)
        q = torch.randn(t, nq, d, dtype=torch.bfloat16)
        kc, vc = _caches(layers, 16, block_size, nkv, d, dv)
        bt = torch.arange(len(q_lens) * max_blocks, dtype=torch.int32).view(len(q_lens), max_blocks)
        cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
        kl = torch.tensor(kv_lens, dtype=torch.int32)
        args = (q, kc, vc, bt, cu, kl, None, d**-0.5, window)
        expected = _fake_shapes(ops.paged_attention, *args)
        _, call_args, call_kwargs = _recorded(_paged_call, *args)
        return expected, call_args, call_kwargs

    return build


def _cache_case(layers: int = 0, dv: int = 64):
    def build():
        from ... import attention as ops

        k = torch.randn(5, 2, 64, dtype=torch.bfloat16)
        v = torch.randn(5, 2, dv, dtype=torch.bfloat16)
        kc, vc = _caches(layers, 4, 128, 2, 64, dv)
        slots = torch.tensor([0, 1, 130, 7, 300], dtype=torch.int32)
        expected = _fake_shapes(ops.reshape_and_cache, k, v, kc, vc, slots)
        _, call_args, call_kwargs = _recorded(_cache_call, k, v, kc, vc, slots)
        return expected, call_args, call_kwargs

    return build


#: (torch_npu op, build) rows; build() -> (our fake impl's output shapes, args, kwargs of
#: the torch_npu call the binding makes for that case).
META_CHECKS: list[tuple[str, Callable[[], tuple[list, tuple, dict]]]] = [
    (_FIA, _dense_case(16, 4, 7, 7, 128, mask=False, causal=True, window=-1, sinks=False)),
    (_FIA, _dense_case(8, 8, 1, 33, 64, mask=True, causal=False, window=-1, sinks=False)),
    (_FIA, _dense_case(8, 2, 5, 40, 128, mask=False, causal=True, window=16, sinks=True)),
    (_FIA, _paged_case(16, 8, 128, 128, [1, 1, 1], [300, 17, 512], -1)),
    (_FIA, _paged_case(8, 1, 192, 128, [3, 1], [60, 200], 32)),
    # layer 1 of a 3-layer cross-layer cache: contiguous aliases, block table x 3
    (_FIA, _paged_case(16, 8, 128, 128, [1, 1, 1], [300, 17, 512], -1, layers=3)),
    (_SCATTER, _cache_case()),
    # cross-layer views, MLA-like K/V part sizes (64 vs 16): contiguous aliases, slots remapped
    (_SCATTER, _cache_case(layers=3, dv=16)),
]
