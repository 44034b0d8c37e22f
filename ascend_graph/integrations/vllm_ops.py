"""vLLM's attention and fused-MoE ops -> ascend-graph's fused ops (vLLM 0.32, torch >= 2.11).

Entry point: :func:`vllm_op_passes` (used by ``integrations/vllm.py``'s pass manager).
Importing this module needs vLLM: it defines ops whose schema names vLLM's ``LayerName``.

What vLLM 0.32 puts in a graph, and what replaces it
-----------------------------------------------------
On torch >= 2.11 vLLM passes layer names as ``vllm.utils.torch_utils.LayerName``, an
opaque value type that Dynamo hoists to a graph input (one placeholder per layer; its
``meta["val"]`` is a ``FakeScriptObject`` holding the real name). Graphs built with
``VLLM_USE_LAYERNAME=0`` (a string baked into each call) are not matched.

Attention (``Attention.forward`` with an opaque attention op, i.e. CUDA, ROCm, CPU)::

    dep = vllm.unified_kv_cache_update(key, value, layer_name)
    vllm.unified_attention_with_output(query, key, value, output, layer_name,
                                       output_scale=None, output_block_scale=None,
                                       kv_cache_dummy_dep=dep)       # mutates output

``query [T, Nq, D]``, ``key/value [T, Nkv, D]`` are views of the projections, ``output``
a view ``[T, Nq, D]`` of ``torch.empty([T, Nq*D])``. After functionalization it is
``auto_functionalized_v2(...)`` (our own AOT trace) or ``auto_functionalized(...)``
(inside vLLM's inductor pipeline, which turns v2 off); one row each. It becomes one op::

    out = ascend_graph.vllm_paged_attention(query, key, value, layer_name, Nkv, D,
                                            kv_layout, scale, window)

which, at run time, reads what vLLM's op reads (:func:`attention_context`: the layer's
metadata and KV cache from the forward context, ``get_attention_context``), splits the
KV cache ``[blocks, Nkv, block_size, 2*D]`` into K and V views as the layer's backend does
(FLASH_ATTN, TRITON_ATTN, FLEX_ATTENTION: ``transpose(1, 2).split(D, -1)``; CPU_ATTN:
``view(blocks, Nkv, 2*block_size, D).chunk(2, 2)``), applies the FIA metadata rule and
calls our ``reshape_and_cache`` and paged TND ``paged_attention`` (each dispatching to its
CUDA / NPU kernel). It uses vLLM's persistent buffers in place, so a device graph captured
around it replays on whatever vLLM writes into them before each step, with nothing
patched. ``scale``, the sliding window, Nkv and D are the layer's (read when the graph is
rewritten). The KV cache and metadata never leave the op as graph values: an earlier
form returned them from a context op, which inductor could not schedule (their sizes are
unknown to it) and could have treated as storage it owns.

Fused MoE (``MoERunner.forward``: an opaque op on every platform but CPU and TPU)::

    vllm.moe_forward(hidden_states, router_logits, None, None, layer_name, 0)   # mutates hidden_states
    vllm.moe_forward_shared(hidden_states, router_logits, hidden_states, None, layer_name, 0) -> (shared, routed)

(``input_ids`` None, ``hidden_dim_unpadded`` 0; ``shared_experts_input`` None, or the
hidden states themselves for the shared form.) It becomes::

    logits = router_logits                       # or, where the runner holds the gate:
    logits = ascend_graph.vllm_moe_router_logits(hidden_states, layer_name)
    w13, w2, bias = ascend_graph.vllm_moe_weights(hidden_states, layer_name, has_bias)
    weights, ids = ascend_graph.moe_gating_topk(logits, top_k, bias, scoring, n_group,
                                                topk_group, renormalize, routed_scaling, 0.0)
    routed = ascend_graph.moe_dispatch_ffn_combine(hidden_states, weights, ids, w13, w2, act)
    shared = ascend_graph.vllm_moe_shared_experts(hidden_states, layer_name)  # _shared only

with the routing config read from the layer's router when the graph is rewritten.

Invariants
----------
- Every row's ``extra_check`` resolves the layer from the current vLLM config's
  ``static_forward_context`` and refuses what the contracts cannot do (see
  :func:`attention_unsupported` / :func:`moe_unsupported`, which say why).
- The MoE context ops return aliases of memory vLLM owns (expert weights). An extern
  op's output enters inductor's buffer-reuse pool when it dies, and a later allocation
  with the same storage size could take it over and write into vLLM's memory. So the
  expert count of each aliasing output is a fresh unbacked symbol: no other buffer can
  have that storage size. Dims the fused ops check statically (hidden, intermediate)
  stay static and are checked against the layer at run time. (Attention keeps its KV
  cache and metadata inside one op instead: see above.)
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Optional

import torch
from torch._higher_order_ops.auto_functionalize import auto_functionalized, auto_functionalized_v2

import vllm.model_executor.layers.attention.attention  # noqa: F401  (registers vllm::unified_attention_with_output)
import vllm.model_executor.layers.fused_moe.runner.moe_runner  # noqa: F401  (registers vllm::moe_forward*)
from vllm.distributed.kv_transfer import has_kv_transfer_group
from vllm.utils.torch_utils import LayerName

from .. import ops as _ops  # noqa: F401  (registers ascend_graph::paged_attention, moe_*)
from .. import _stats
from ..config import AscendConfig
from ..errors import UnsupportedError
from ..passes.base import GraphPass
from ..passes.pattern import Fusion, Match, PatternPass

__all__ = [
    "vllm_op_passes",
    "ATTENTION_FUSIONS",
    "MOE_FUSIONS",
    "attention_unsupported",
    "moe_unsupported",
    "KV_LAYOUTS",
]

log = logging.getLogger("ascend_graph.integrations.vllm_ops")

#: vLLM's attention module (imported above), looked up once: the op calls into it every layer
_VLLM_ATTENTION = sys.modules["vllm.model_executor.layers.attention.attention"]

ATTN = torch.ops.vllm.unified_attention_with_output.default
KV_UPDATE = torch.ops.vllm.unified_kv_cache_update.default
MOE = torch.ops.vllm.moe_forward.default
MOE_SHARED = torch.ops.vllm.moe_forward_shared.default

#: attention backends whose KV-cache layout we split into K/V views -> how
KV_LAYOUTS = {"FLASH_ATTN": "split_last", "TRITON_ATTN": "split_last", "FLEX_ATTENTION": "split_last", "CPU_ATTN": "chunk_blocks"}
#: unquantized fused-MoE backends that keep w13/w2 in the checkpoint layout ([E, 2I, H], [E, H, I])
MOE_PLAIN_BACKENDS = ("TRITON", "BATCHED_TRITON")
#: vLLM MoE activations -> ours
MOE_ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_tanh"}
ATTN_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Devices where ``vllm_paged_attention`` runs vLLM's own attention kernels, not our paged
#: TND op: "never slower than what it replaces". On the CPU ours is a plain-torch loop
#: (about half of vLLM's CPU_ATTN throughput in the engine), and the rewrite itself is left
#: out there by default (ATTENTION_SKIPPED_ON); on CUDA our Triton decode kernel has not been measured
#: against vLLM's FlashAttention inside the engine (the GPU machine has no vLLM), and inside
#: a captured graph the extra op layer costs nothing at replay. On the NPU the op is FIA
#: (the point of the rewrite).
VLLM_KERNEL_DEVICES = ("cpu", "cuda")
HEAD_DIM_ALIGN = 16  # FIA: head dims in multiples of 16 elements (as passes/fusion/attention.py)
MAX_HEAD_DIM = 256


# --------------------------------------------------------------------------- layers by name


def layer_name_of(value: Any) -> Optional[str]:
    """The string inside a ``LayerName`` (real, or fake as in ``node.meta["val"]``)."""
    from torch._library.fake_class_registry import FakeScriptObject

    if type(value) is FakeScriptObject:  # it passes isinstance(value, LayerName)
        value = value.real_obj
    if type(value) is LayerName:
        return value.value
    return None


def compile_time_layer(name: str) -> Any:
    """The vLLM layer registered under ``name`` in the current vLLM config (None if none)."""
    from vllm.config import get_current_vllm_config_or_none
    from vllm.forward_context import get_forward_context, is_forward_context_available

    config = get_current_vllm_config_or_none()
    if config is not None and name in config.compilation_config.static_forward_context:
        return config.compilation_config.static_forward_context[name]
    if is_forward_context_available():
        return get_forward_context().no_compile_layers.get(name)
    return None


def _layer_of_node(node: Any) -> tuple[Optional[str], Any]:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else node
    name = layer_name_of(val)
    return name, (compile_time_layer(name) if name is not None else None)


# --------------------------------------------------------------------------- attention: run-time op


def split_kv_cache(kv_cache: torch.Tensor, layout: str, num_kv_heads: int, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V views ``[blocks, block_size, Nkv, D]`` of a vLLM KV cache ``[blocks, Nkv, block_size, 2*D]``."""
    if kv_cache.dim() != 4 or kv_cache.shape[1] != num_kv_heads or kv_cache.shape[3] != 2 * head_size:
        raise UnsupportedError("vLLM KV cache layout", expected=f"[blocks, {num_kv_heads}, block_size, {2 * head_size}]", got=tuple(kv_cache.shape))
    if layout == "split_last":
        k, v = kv_cache.transpose(1, 2).split(head_size, dim=-1)
        return k, v
    if layout == "chunk_blocks":
        # CPUAttentionImpl: view(blocks, Nkv, 2*block_size, D).chunk(2, 2), i.e. per (block,
        # head) the block's K rows then its V rows. Written as strides, not a view: the block
        # count and size are unbacked symbols in the graph and view() would guard on them.
        blocks, heads, block_size, _ = kv_cache.shape
        size = (blocks, block_size, heads, head_size)
        stride = (kv_cache.stride(0), head_size, kv_cache.stride(1), 1)
        offset = kv_cache.storage_offset()
        k = kv_cache.as_strided(size, stride, offset)
        v = kv_cache.as_strided(size, stride, offset + block_size * head_size)
        return k, v
    raise UnsupportedError("unknown KV-cache layout", expected=f"one of {sorted(set(KV_LAYOUTS.values()))}", got=layout)


def _int(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def attention_context(
    query: torch.Tensor, layer_name: LayerName, num_kv_heads: int, head_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kv_cache, block_table, query_start_loc, seq_lens, slot_mapping) of one layer.

    Read from vLLM's forward context as ``unified_attention_with_output`` reads them;
    ``kv_cache`` is the layer's ``[blocks, Nkv, block_size, 2*D]`` tensor itself. No
    metadata (vLLM's profile run) gives zero requests, an empty cache and slots -1:
    nothing is written and every output row is zero.
    """
    from vllm.model_executor.layers.attention.attention import get_attention_context

    name = layer_name.value
    metadata, layer, kv_cache, slot_mapping = get_attention_context(name)
    t = query.shape[0]
    if metadata is None or kv_cache.numel() == 0:
        dev = query.device
        return (
            query.new_zeros((0, num_kv_heads, 1, 2 * head_size)),
            torch.zeros((0, 1), dtype=torch.int32, device=dev),
            torch.zeros((1,), dtype=torch.int32, device=dev),
            torch.zeros((0,), dtype=torch.int32, device=dev),
            torch.full((t,), -1, dtype=torch.int64, device=dev),
        )
    if getattr(metadata, "causal", True) is not True:
        raise UnsupportedError(f"{name}: vLLM metadata asks for non-causal attention", expected="causal=True", got=getattr(metadata, "causal", None))
    if kv_cache.dim() != 4 or kv_cache.shape[1] != num_kv_heads or kv_cache.shape[3] != 2 * head_size:
        raise UnsupportedError(f"{name}: vLLM KV cache layout", expected=f"[blocks, {num_kv_heads}, block_size, {2 * head_size}]", got=tuple(kv_cache.shape))
    if slot_mapping is None:
        slot_mapping = torch.full((t,), -1, dtype=torch.int64, device=query.device)
    elif slot_mapping.shape[0] < t:
        # rows past vLLM's own padding (our bucket's padding) are padding too: never written
        slot_mapping = torch.cat([slot_mapping, slot_mapping.new_full((t - slot_mapping.shape[0],), -1)])
    elif slot_mapping.shape[0] > t:
        raise UnsupportedError(f"{name}: slot_mapping has more entries than the graph has tokens", expected=f"<= {t}", got=slot_mapping.shape[0])
    return (
        kv_cache,
        _int(metadata.block_table, torch.int32),
        _int(metadata.query_start_loc, torch.int32),
        _int(metadata.seq_lens, torch.int32),
        _int(slot_mapping, torch.int64),
    )


def vllm_paged_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layer_name: LayerName,
    num_kv_heads: int,
    head_size: int,
    kv_layout: str,
    scale: float,
    window: int,
) -> torch.Tensor:
    """One vLLM attention layer on our contract: ``reshape_and_cache`` + paged TND attention.

    The layer's KV cache and vLLM's persistent metadata are read from the forward context
    at run time (:func:`attention_context`) and used in place, so a captured graph replays
    with whatever the scheduler wrote into them. They stay inside this op on purpose:
    returned from an op they would be buffers the compiler thinks it owns (inductor may
    reuse such storage for its temporaries, and cannot size them). The FIA metadata rule
    (``T == query_start_loc[-1]``, dummy requests, KV length 1) is applied here, since
    vLLM pads tokens without adding requests.
    """
    from ..runtime.padding import fia_pad_metadata

    if query.device.type in VLLM_KERNEL_DEVICES:
        return _vllm_kernels(query, key, value, layer_name)
    kv_cache, block_table, cu_q, seq_lens, slots = attention_context(query, layer_name, num_kv_heads, head_size)
    k_cache, v_cache = split_kv_cache(kv_cache, kv_layout, num_kv_heads, head_size)
    torch.ops.ascend_graph.reshape_and_cache(key, value, k_cache, v_cache, slots)
    if cu_q.shape[0] > 1:
        cu_q, seq_lens = fia_pad_metadata(cu_q, seq_lens, query.shape[0])
    return torch.ops.ascend_graph.paged_attention(query, k_cache, v_cache, block_table, cu_q, seq_lens, None, scale, window)


def _vllm_kernels(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer_name: LayerName) -> torch.Tensor:
    """What the two replaced ops run, as one op: the rewritten graph makes one op call a
    layer where vLLM's makes two, and reads the layer's context once.

    On the CPU with no KV-transfer connector: the layer's context is read once and its
    backend's ``do_kv_cache_update`` and ``forward`` are called as vLLM's two ops call them
    (``unified_kv_cache_update``, ``unified_attention_with_output``). Elsewhere, or with a
    connector (its per-layer load/save hooks live in the ops' decorators, as do the
    breakable-CUDA-graph breaks), the Python functions vLLM registered as those two ops are
    called, decorators included, without a dispatcher round trip each."""
    output = query.new_empty(query.shape)
    if query.device.type == "cpu" and not has_kv_transfer_group():
        metadata, layer, kv_cache, slot_mapping = _VLLM_ATTENTION.get_attention_context(layer_name.value)
        if slot_mapping is not None:
            layer.impl.do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        layer.impl.forward(layer, query, key, value, kv_cache, metadata, output=output)
        return output
    dep = _VLLM_ATTENTION.unified_kv_cache_update(key, value, layer_name)
    _VLLM_ATTENTION.unified_attention_with_output(query, key, value, output, layer_name, kv_cache_dummy_dep=dep)
    return output


def _vllm_paged_attention_fake(query, key, value, layer_name, num_kv_heads, head_size, kv_layout, scale, window):
    return query.new_empty(query.shape)


# Registered as vLLM registers its own ops (``direct_register_custom_op``: a schema and one
# kernel), not with ``torch.library.custom_op``: that wrapper adds a Dynamo-disable context
# and an aliasing check to every call, and this op runs once a layer per step outside any
# device graph (on the CPU, measured in the engine, the wrapper alone cost more than the
# second vLLM op the rewrite removes). One kernel for every device
# (CompositeExplicitAutograd): the body picks its path by the query's device. Inference
# only: no autograd formula (vLLM runs the model under inference mode).
_LIB = torch.library.Library("ascend_graph", "FRAGMENT")
_LIB.define("vllm_paged_attention" + torch.library.infer_schema(vllm_paged_attention, mutates_args=()))
_LIB.impl("vllm_paged_attention", vllm_paged_attention, "CompositeExplicitAutograd")
torch.library.register_fake("ascend_graph::vllm_paged_attention", _vllm_paged_attention_fake, lib=_LIB)


# --------------------------------------------------------------------------- attention: rows


def attention_unsupported(layer: Any, query: Any = None) -> Optional[str]:
    """Why ``layer`` (a vLLM ``Attention``) cannot become paged TND attention, or None."""
    from vllm.model_executor.layers.attention import Attention
    from vllm.v1.attention.backend import AttentionType

    if not isinstance(layer, Attention):
        return f"not a vLLM Attention layer ({type(layer).__name__})"
    impl = layer.impl
    backend = layer.attn_backend.get_name()
    checks = [
        (layer.attn_type != AttentionType.DECODER, f"attn_type {layer.attn_type} (only decoder self-attention is causal paged attention)"),
        (backend not in KV_LAYOUTS, f"backend {backend} has a KV-cache layout we do not split (known: {sorted(KV_LAYOUTS)})"),
        (layer.kv_cache_dtype != "auto", f"quantized KV cache ({layer.kv_cache_dtype})"),
        (layer.kv_sharing_target_layer_name is not None, "KV cache shared with another layer"),
        (layer.head_size_v != layer.head_size, "V head size differs from K head size"),
        (layer.has_sink, "attention sinks"),
        (getattr(impl, "alibi_slopes", None) is not None, "ALiBi"),
        (bool(getattr(impl, "logits_soft_cap", None)), "logits soft cap"),
        (layer.query_quant is not None, "quantized query"),
        (layer.use_mm_prefix, "multimodal prefix (bidirectional) attention"),
        (getattr(impl, "dcp_world_size", 1) > 1, "decode context parallel"),
        (layer.head_size % HEAD_DIM_ALIGN != 0 or layer.head_size > MAX_HEAD_DIM, f"head size {layer.head_size} (FIA: a multiple of {HEAD_DIM_ALIGN}, at most {MAX_HEAD_DIM})"),
    ]
    for bad, why in checks:
        if bad:
            return why
    if query is not None:
        if query.dtype not in ATTN_DTYPES:
            return f"dtype {query.dtype}"
        if query.dim() != 3 or query.shape[1] != layer.num_heads or query.shape[2] != layer.head_size:
            return f"query shape {tuple(query.shape)} is not [T, {layer.num_heads}, {layer.head_size}]"
    return None


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _attention_check(match: Match) -> bool:
    name, layer = _layer_of_node(match.kwargs.get("layer_name"))
    if layer is None:
        log.debug("vLLM attention op not fused: layer %r not found in the current vLLM config", name)
        return False
    q = _val(match.kwargs.get("query"))
    why = attention_unsupported(layer, q)
    out = _val(match.kwargs.get("output"))
    if why is None and out is not None and (out.dtype != q.dtype or out.shape[-1] * (out.shape[-2] if out.dim() == 3 else 1) != layer.num_heads * layer.head_size):
        why = f"output {tuple(out.shape)} {out.dtype} differs from the query's heads/dtype"
    if why is not None:
        log.debug("vLLM attention op of %s not fused: %s", name, why)
        return False
    return True


def _paged(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer_name: Any) -> torch.Tensor:
    """The replacement body: one op, constants from the layer."""
    layer = compile_time_layer(layer_name_of(layer_name))
    return torch.ops.ascend_graph.vllm_paged_attention(
        query, key, value, layer_name, layer.num_kv_heads, layer.head_size,
        KV_LAYOUTS[layer.attn_backend.get_name()], float(layer.impl.scale), int(layer.sliding_window or 0),
    )


# v2 (torch's default functionalization; our AOT trace): output is a view of the base
def _attention_v2_pattern(query, key, value, output, layer_name):
    dep = KV_UPDATE(key, value, layer_name)
    t, h, d = query.shape  # sample sizes: wildcards in the pattern (retrace=False)
    af = auto_functionalized_v2(
        ATTN, query=query, key=key, value=value, layer_name=layer_name, output_scale=None, kv_cache_dummy_dep=dep,
        _output_base_index=0, _output_size=(t, h, d), _output_stride=(h * d, d, 1), _output_storage_offset=0,
        _output_block_scale_base_index=None, _all_bases=[output],
    )
    return af[1]


def _attention_v2_replacement(query, key, value, output, layer_name):
    return _paged(query, key, value, layer_name).reshape(output.shape)


# v1 (vLLM's inductor config sets enable_auto_functionalized_v2=False)
def _attention_v1_pattern(query, key, value, output, layer_name):
    dep = KV_UPDATE(key, value, layer_name)
    af = auto_functionalized(ATTN, query=query, key=key, value=value, output=output, layer_name=layer_name, output_scale=None, output_block_scale=None, kv_cache_dummy_dep=dep)
    return af[1]


def _attention_v1_replacement(query, key, value, output, layer_name):
    return _paged(query, key, value, layer_name).reshape(output.shape)


def _fake_inputs(*shapes: tuple[tuple[int, ...], torch.dtype]) -> list[Any]:
    # vLLM's ops have no CPU kernels usable here: patterns are traced on fake tensors.
    # Inside a compile (Dynamo's fake mode active) they must be that mode's tensors.
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensorMode

    with detect_fake_mode() or FakeTensorMode():
        return [torch.empty(s, dtype=dt) for s, dt in shapes]


_SAMPLE_LAYER = "ascend_graph.pattern.sample"  # example LayerName: the matcher turns it into a wildcard


def _attention_inputs(v2: bool) -> Any:
    def build() -> list[Any]:
        f32 = torch.float32
        out_shape = (5, 64) if v2 else (5, 4, 16)
        return [*_fake_inputs(((5, 4, 16), f32), ((5, 2, 16), f32), ((5, 2, 16), f32), (out_shape, f32)), LayerName(_SAMPLE_LAYER)]

    return build


# --------------------------------------------------------------------------- MoE: run-time ops


def _moe_layer(layer_name: LayerName) -> Any:
    from vllm.forward_context import get_forward_context

    return get_forward_context().no_compile_layers[layer_name.value]


@torch.library.custom_op("ascend_graph::vllm_moe_weights", mutates_args=())
def vllm_moe_weights(x: torch.Tensor, layer_name: LayerName, has_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w13 [E, 2I, H], w2 [E, H, I], e_score_correction_bias [E] or empty) of a vLLM MoE layer."""
    layer = _moe_layer(layer_name)
    experts = layer.routed_experts
    bias = layer.router.e_score_correction_bias if has_bias else None
    return experts.w13_weight, experts.w2_weight, (bias if bias is not None else x.new_empty((0,), dtype=torch.float32))


@vllm_moe_weights.register_fake
def _(x, layer_name, has_bias):
    # Static dims from the layer the graph was rewritten for; the expert count is an
    # unbacked symbol (these outputs alias the layer's parameters: see the module docstring).
    layer = compile_time_layer(layer_name_of(layer_name))
    w13, w2 = layer.routed_experts.w13_weight, layer.routed_experts.w2_weight
    bias = layer.router.e_score_correction_bias if has_bias else None
    e = torch.library.get_ctx().new_dynamic_size()
    return (
        x.new_empty((e, *w13.shape[1:]), dtype=w13.dtype),
        x.new_empty((e, *w2.shape[1:]), dtype=w2.dtype),
        x.new_empty((e if has_bias else 0,), dtype=bias.dtype if bias is not None else torch.float32),
    )


@torch.library.custom_op("ascend_graph::vllm_moe_router_logits", mutates_args=())
def vllm_moe_router_logits(x: torch.Tensor, layer_name: LayerName) -> torch.Tensor:
    """Router logits from the gate module a vLLM MoE runner holds (vLLM's own gate GEMM)."""
    out = _moe_layer(layer_name).gate(x)
    return out[0] if isinstance(out, tuple) else out


@vllm_moe_router_logits.register_fake
def _(x, layer_name):
    gate = compile_time_layer(layer_name_of(layer_name)).gate
    dtype = getattr(gate, "out_dtype", None) or x.dtype
    return x.new_empty((x.shape[0], gate.weight.shape[0]), dtype=dtype)


@torch.library.custom_op("ascend_graph::vllm_moe_shared_experts", mutates_args=())
def vllm_moe_shared_experts(x: torch.Tensor, layer_name: LayerName) -> torch.Tensor:
    """The shared experts of a vLLM MoE runner, run as vLLM runs them (its own module)."""
    return _moe_layer(layer_name).shared_experts._layer(x)


@vllm_moe_shared_experts.register_fake
def _(x, layer_name):
    return torch.empty_like(x)


# --------------------------------------------------------------------------- MoE: rows


def _enum_value(x: Any) -> Any:
    return getattr(x, "value", x)


def moe_routing(layer: Any) -> dict[str, Any]:
    """The ``moe_gating_topk`` arguments equivalent to the layer's router (after :func:`moe_unsupported`)."""
    router = layer.router
    grouped = getattr(router, "num_expert_group", None) is not None and (getattr(router, "use_grouped_topk", True))
    n_group = int(router.num_expert_group) if grouped else 1
    topk_group = int(router.topk_group) if grouped else 1
    if n_group > 1 and topk_group >= n_group:
        n_group = topk_group = 1  # every group kept: plain top-k
    return dict(
        top_k=int(router.top_k),
        scoring=str(getattr(router, "scoring_func", "softmax")),
        n_group=n_group,
        topk_group=topk_group,
        renormalize=bool(router.renormalize),
        routed_scaling_factor=float(getattr(router, "routed_scaling_factor", 1.0)),
        has_bias=getattr(router, "e_score_correction_bias", None) is not None,
    )


def moe_unsupported(layer: Any, shared: bool) -> Optional[str]:
    """Why ``layer`` (a vLLM ``MoERunner``) cannot become gating_topk + dispatch_ffn_combine, or None."""
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    if not isinstance(layer, MoERunner):
        return f"not a vLLM MoERunner ({type(layer).__name__})"
    router, experts, cfg = layer.router, layer.routed_experts, layer.moe_config
    qm = experts.quant_method
    backend = getattr(getattr(qm, "unquantized_backend", None), "name", None)
    activation = MOE_ACTIVATIONS.get(_enum_value(cfg.activation))
    router_kind = type(router).__name__
    checks = [
        (router_kind not in ("FusedTopKRouter", "FusedTopKBiasRouter", "GroupedTopKRouter", "CPURouter"), f"router {router_kind}"),
        (getattr(router, "custom_routing_function", None) is not None, "custom routing function"),
        (getattr(router, "_hash_indices_table", None) is not None, "hash routing"),
        (getattr(router, "bias_vl", None) is not None, "vision routing bias"),
        (getattr(router, "num_fused_shared_experts", 0), "shared experts fused into the routed experts"),
        (router.eplb_state is not None, "EPLB (logical->physical expert ids)"),
        (getattr(router, "scoring_func", "softmax") not in ("softmax", "sigmoid"), f"scoring {getattr(router, 'scoring_func', None)}"),
        (backend not in MOE_PLAIN_BACKENDS, f"MoE backend {backend} (quantized or weights converted to a kernel layout; plain: {MOE_PLAIN_BACKENDS})"),
        (cfg.has_bias, "expert biases"),
        (activation is None, f"activation {_enum_value(cfg.activation)}"),
        (getattr(experts, "apply_router_weight_on_input", False), "router weight applied on the input"),
        (cfg.moe_parallel_config.ep_size > 1 or cfg.moe_parallel_config.dp_size > 1 or cfg.pcp_size > 1, "expert/data/context parallel MoE (needs MC2 dispatch)"),
        (cfg.is_lora_enabled, "MoE LoRA"),
        (layer.routed_input_transform is not None, "routed input transform inside the op"),
        (layer._fse_fuse_gate, "gate fused with the shared-expert gate"),
        (shared and layer.shared_experts is None, "moe_forward_shared without shared experts"),
    ]
    for bad, why in checks:
        if bad:
            return why
    w13, w2 = experts.w13_weight, experts.w2_weight
    i, h = cfg.intermediate_size_per_partition, cfg.hidden_dim
    if tuple(w13.shape[1:]) != (2 * i, h) or tuple(w2.shape[1:]) != (h, i) or w13.shape[0] != w2.shape[0]:
        return f"expert weights w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)} are not [E, {2 * i}, {h}], [E, {h}, {i}]"
    routing = moe_routing(layer)
    if routing["n_group"] > 1 and not routing["has_bias"]:
        return "grouped top-k without a correction bias (vLLM scores groups by their max; our contract by the top-2 sum)"
    if layer.gate is not None and getattr(getattr(layer.gate, "quant_method", None), "__class__", type(None)).__name__ not in ("UnquantizedLinearMethod", "_GateLinearMethod"):
        return "quantized gate"
    return None


def _moe_check(shared: bool):
    def check(match: Match) -> bool:
        name, layer = _layer_of_node(match.kwargs.get("layer_name"))
        if layer is None:
            log.debug("vLLM MoE op not fused: layer %r not found in the current vLLM config", name)
            return False
        why = moe_unsupported(layer, shared)
        x = _val(match.kwargs.get("hidden_states"))
        if why is None and (x is None or x.dim() != 2 or x.shape[1] != layer.moe_config.hidden_dim):
            why = f"hidden_states {None if x is None else tuple(x.shape)} is not [T, {layer.moe_config.hidden_dim}]"
        if why is not None:
            log.debug("vLLM MoE op of %s not fused: %s", name, why)
            return False
        return True

    return check


def _routed(hidden_states: torch.Tensor, router_logits: torch.Tensor, layer_name: Any) -> torch.Tensor:
    layer = compile_time_layer(layer_name_of(layer_name))
    r = moe_routing(layer)
    logits = router_logits if layer.gate is None else torch.ops.ascend_graph.vllm_moe_router_logits(hidden_states, layer_name)
    w13, w2, bias = torch.ops.ascend_graph.vllm_moe_weights(hidden_states, layer_name, r["has_bias"])
    weights, ids = torch.ops.ascend_graph.moe_gating_topk(
        logits, r["top_k"], bias if r["has_bias"] else None, r["scoring"], r["n_group"], r["topk_group"], r["renormalize"], r["routed_scaling_factor"], 0.0
    )
    activation = MOE_ACTIVATIONS[_enum_value(layer.moe_config.activation)]
    return torch.ops.ascend_graph.moe_dispatch_ffn_combine(hidden_states, weights, ids, w13, w2, activation)


# The forms moe_forward takes after functionalization (it declares hidden_states mutated):
# v2 (our AOT trace) records whether the argument is its base or a same-shape alias of
# it (``MoERunner.forward`` views it to [T, H]); v1 (vLLM's inductor pipeline) passes it
# as is. The op's second output (the "mutated" hidden states) exists only where the
# graph still uses it (e.g. written back to a graph input); our replacement leaves the
# hidden states unchanged, so that output is the input itself.
def _moe_call(hidden_states, router_logits, layer_name, v2: bool, alias: bool):
    if v2:
        base: dict[str, Any] = {"_hidden_states_base_index": 0, **({"_hidden_states_alias": True} if alias else {})}
        return auto_functionalized_v2(MOE, router_logits=router_logits, shared_experts_input=None, input_ids=None, layer_name=layer_name, hidden_dim_unpadded=0, **base, _all_bases=[hidden_states])
    # schema order, as functionalization writes the kwargs (the matcher compares their order)
    return auto_functionalized(MOE, hidden_states=hidden_states, router_logits=router_logits, shared_experts_input=None, input_ids=None, layer_name=layer_name, hidden_dim_unpadded=0)


def _moe_rows_for(v2: bool, alias: bool, both_outputs: bool) -> tuple[Any, Any]:
    def pattern(hidden_states, router_logits, layer_name):
        af = _moe_call(hidden_states, router_logits, layer_name, v2, alias)
        return (af[0], af[1]) if both_outputs else af[0]

    def replacement(hidden_states, router_logits, layer_name):
        out = _routed(hidden_states, router_logits, layer_name)
        return (out, hidden_states) if both_outputs else out

    return pattern, replacement


def _moe_shared_pattern(hidden_states, router_logits, layer_name):
    # MoERunner.forward passes the unchanged hidden states as shared_experts_input
    out = MOE_SHARED(hidden_states, router_logits, hidden_states, None, layer_name, 0)
    return out[0], out[1]


def _moe_shared_replacement(hidden_states, router_logits, layer_name):
    shared = torch.ops.ascend_graph.vllm_moe_shared_experts(hidden_states, layer_name)
    return shared, _routed(hidden_states, router_logits, layer_name)


def _moe_inputs() -> list[Any]:
    return [*_fake_inputs(((5, 64), torch.float32), ((5, 8), torch.float32)), LayerName(_SAMPLE_LAYER)]


# --------------------------------------------------------------------------- tables and passes


def _attention_rows() -> tuple[Fusion, ...]:
    return (
        # retrace=False: functionalization records the output view's size/stride, which
        # the matcher's re-trace at the graph's shapes would turn into sym_size nodes
        Fusion("vllm_attention_v2", _attention_v2_pattern, _attention_v2_replacement, _attention_inputs(True), _attention_check, retrace=False),
        Fusion("vllm_attention_v1", _attention_v1_pattern, _attention_v1_replacement, _attention_inputs(False), _attention_check, retrace=False),
    )


def _moe_rows() -> tuple[Fusion, ...]:
    return (
        *(
            Fusion(f"vllm_moe_{'v2' if v2 else 'v1'}{'_alias' if alias else ''}{'_2out' if both else ''}", *_moe_rows_for(v2, alias, both), _moe_inputs, _moe_check(False), retrace=False)
            for v2, alias in ((True, True), (True, False), (False, False))
            for both in (False, True)
        ),
        Fusion("vllm_moe_shared", _moe_shared_pattern, _moe_shared_replacement, _moe_inputs, _moe_check(True), retrace=False),
    )


#: built once per process (the matcher cache is keyed by row identity)
ATTENTION_FUSIONS: tuple[Fusion, ...] = _attention_rows()
MOE_FUSIONS: tuple[Fusion, ...] = _moe_rows()


#: Devices where the attention rewrite is left out, and why (``stats()["skipped"]``).
ATTENTION_SKIPPED_ON = {
    # Measured in vLLM's CPU engine (benchmarks/vllm_engine.py, BENCHMARKS.md): on the CPU
    # the rewritten op runs vLLM's own CPU_ATTN kernels (one op and one context read a layer
    # instead of two), so there is nothing to gain; forced on, the engine is 1.03-1.05x of
    # vLLM's default compile but 1-2% below our graph with vLLM's two ops left in it.
    "cpu": "cpu: the rewritten op would run vLLM's own CPU attention kernels (nothing to gain here); measured 1-2% below keeping vLLM's ops in our graph, so they are kept",
}


class VllmAttentionPass(PatternPass):
    """vLLM's KV update + attention -> ``vllm_paged_attention``, where that is not slower."""

    def __init__(self, config: AscendConfig) -> None:
        super().__init__("vllm_attention", "attention", ATTENTION_FUSIONS, explain_node=config.explain_node)

    def __call__(self, graph: torch.fx.Graph) -> int:
        from ..passes.fusion.norm_rope import _graph_device

        reason = ATTENTION_SKIPPED_ON.get(_graph_device(graph) or "")
        if reason is not None:
            _stats.record_skip("attention", reason)
            return 0
        return super().__call__(graph)


def vllm_op_passes(config: AscendConfig) -> list[GraphPass]:
    """The passes over vLLM's attention and MoE ops, each gated by its fusion family."""
    out: list[GraphPass] = []
    if "attention" in config.fusions:
        out.append(VllmAttentionPass(config))
    if "moe" in config.fusions:
        out.append(PatternPass("vllm_moe", "moe", MOE_FUSIONS, explain_node=config.explain_node))
    return out
