"""Attention fusion: attention as models write it -> ``ascend_graph::attention``.

Entry point: :func:`make_pass` (family ``"attention"``; rewrites are counted in
``stats()["fusions"]["attention"]``).

What is matched (all after AOT tracing with inductor's decompositions, the graph the
pass manager sees):

- ``F.scaled_dot_product_attention`` in each backend form it is traced to:
  ``aten._scaled_dot_product_flash_attention_for_cpu`` (CPU),
  ``_scaled_dot_product_efficient_attention``, ``_scaled_dot_product_flash_attention``,
  ``_scaled_dot_product_cudnn_attention`` (CUDA); with an explicit (bool or additive)
  mask, ``is_causal``, or neither; with an explicit ``scale`` or the default ``1/sqrt(D)``;
- K/V either as given (``enable_gqa``, MHA, MLA) or through HF's ``repeat_kv``
  (``unsqueeze -> expand -> clone -> view``), folded into the op's GQA;
- HF's eager attention ``softmax(q @ k^T * scale + mask, float32).to(q.dtype) @ v``,
  with or without a mask, fp32 and half graphs (the casts differ);
- GptOss's eager attention with learned per-head sink logits (``cat([scores, sinks])``,
  a max shift, softmax, the sink column dropped) -> the op's ``sinks`` (FIA v2's
  ``learnable_sink`` on the NPU); q contiguous (its rope ends in a ``cat``), K/V through
  ``repeat_kv``, with or without a mask.

The table :data:`FUSIONS` is built from the product of those forms (one row each).
Sliding windows and padding reach the op inside the mask (HF builds them into it), so
the replacement passes the mask through; the op's own ``window`` argument is for
graphs that build attention directly.

``extra_check`` (see :func:`_supported`) rejects what the NPU contract cannot run:
dtypes other than fp16/bf16/fp32; q/k head dims or v head dims not a multiple of 16 or
above 256; masks with a per-head dim (FIA takes ``[B|1, 1, Sq, Skv]``); dropout; and
SDPA's ``is_causal`` when ``Sq != Skv`` (SDPA aligns it top-left, our op and FIA
bottom-right: they agree only on square scores).
"""

from __future__ import annotations

import functools
import itertools
import logging
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
import torch.nn.functional as F

from ...config import AscendConfig
from ...ops import attention as _attention_ops  # noqa: F401  (registers ascend_graph::attention)
from ..base import GraphPass
from ..pattern import Fusion, Path, PatternPass, known_eq

if TYPE_CHECKING:
    from torch._inductor.pattern_matcher import Match


__all__ = ["make_pass", "FUSIONS", "SUPPORTED_DTYPES", "MAX_HEAD_DIM", "HEAD_DIM_ALIGN"]

log = logging.getLogger("ascend_graph.passes.fusion.attention")

aten = torch.ops.aten

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: FIA takes head dims aligned to 16 elements (32 bytes of fp16/bf16)
HEAD_DIM_ALIGN = 16
MAX_HEAD_DIM = 256
#: sample value the ``scale`` argument is traced with (a pattern input, not a magic constant)
_SCALE_SAMPLE = 0.125

_SDPA_OPS = {
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
}


# --------------------------------------------------------------------------- building blocks


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """HF ``repeat_kv``: [B, Nkv, S, D] -> [B, Nkv*n_rep, S, D]."""
    b, h, s, d = x.shape
    return x.unsqueeze(2).expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def _sdpa_cpu(q, k, v, mask, causal, scale):
    kw: dict[str, Any] = {}
    if mask is not None:
        kw["attn_mask"] = mask
    if scale is not None:
        kw["scale"] = scale
    args = (q, k, v, 0.0, True) if causal else (q, k, v)
    return aten._scaled_dot_product_flash_attention_for_cpu(*args, **kw)[0]


def _sdpa_efficient(q, k, v, mask, causal, scale):
    kw = {"scale": scale} if scale is not None else {}
    args = (q, k, v, mask, False, 0.0, True) if causal else (q, k, v, mask, False)
    return aten._scaled_dot_product_efficient_attention(*args, **kw)[0]


def _sdpa_flash(q, k, v, mask, causal, scale):
    kw = {"scale": scale} if scale is not None else {}
    args = (q, k, v, 0.0, True) if causal else (q, k, v)
    return aten._scaled_dot_product_flash_attention(*args, **kw)[0]


def _sdpa_cudnn(q, k, v, mask, causal, scale):
    kw = {"scale": scale} if scale is not None else {}
    args = (q, k, v, mask, False, 0.0, True) if causal else (q, k, v, mask, False)
    return aten._scaled_dot_product_cudnn_attention(*args, **kw)[0]


def _eager(q, k, v, mask, causal, scale):
    """HF ``eager_attention_forward`` as it reads after AOT tracing and the cleanup passes.

    Written at the ATen level because ``torch.matmul``'s decomposition inserts expands
    that the cleanup pass (which runs before fusion) removes from the model's graph;
    tracing ``torch.matmul`` here would keep them and never match. q is HF's transposed
    [B, S, N, D] (copied to contiguous for the bmm); k/v are contiguous after
    ``repeat_kv`` (GQA) and transposed, hence copied, otherwise.
    """
    b, n, s, d = q.shape
    skv, dv = k.shape[2], v.shape[3]
    contiguous = torch.contiguous_format
    # decode (Sq == 1): the transposed q is already contiguous and needs no copy
    qf = aten.view(q if q.is_contiguous() else aten.clone(q, memory_format=contiguous), [b * n, s, d])
    kt = aten.permute(k, [0, 1, 3, 2])
    vv = v
    if not k.is_contiguous():
        kt = aten.clone(kt, memory_format=contiguous)
        vv = aten.clone(v, memory_format=contiguous)
    w = aten.mul(aten.view(aten.bmm(qf, aten.view(kt, [b * n, d, skv])), [b, n, s, skv]), scale)
    if mask is not None:
        w = aten.add(w, mask)
    if q.dtype != torch.float32:
        w = torch.ops.prims.convert_element_type(w, torch.float32)
    w = aten.sub(w, aten.amax(w, [-1], True))
    w = aten.exp(w)
    w = aten.div(w, aten.sum(w, [-1], True))
    if q.dtype != torch.float32:
        w = torch.ops.prims.convert_element_type(w, q.dtype)
    out = aten.bmm(aten.view(w, [b * n, s, skv]), aten.view(vv, [b * n, skv, dv]))
    return aten.view(out, [b, n, s, dv])


def _mergeable(x: torch.Tensor) -> bool:
    """Whether ``x.view(B*N, ...)`` works (dims 0 and 1 merge), as matmul's reshape decides it."""
    return x.shape[0] == 1 or x.shape[1] == 1 or x.stride(0) == x.shape[1] * x.stride(1)


def _causal_bias(s: int, skv: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """SDPA's math path's causal mask: ``where(tril, 0, -inf)`` built from two iotas."""
    full = aten.full([s, skv], True, dtype=torch.bool, layout=torch.strided, device=device, pin_memory=False)
    rows = aten.unsqueeze(torch.ops.prims.iota(skv, start=0, step=1, dtype=torch.int64, device=device, requires_grad=False), -2)
    cols = aten.unsqueeze(torch.ops.prims.iota(s, start=0, step=1, dtype=torch.int64, device=device, requires_grad=False), -1)
    keep = aten.logical_and(aten.le.Scalar(aten.sub.Tensor(rows, cols), 0), full)
    neg = aten.scalar_tensor(float("-inf"), dtype=dtype, device=device)
    zero = aten.scalar_tensor(0.0, dtype=dtype, layout=torch.strided, device=device)
    return aten.where.self(keep, zero, neg)


def _sdpa_math(q, k, v, mask, causal, scale):
    """SDPA's math path (``_scaled_dot_product_attention_math``) after decomposition and cleanup.

    The CPU dispatcher takes it where the flash kernel cannot run, e.g. MLA's v head dim
    != q/k head dim (DeepSeek-V2/V3). q and k are each scaled by ``sqrt(scale)``, so the
    pattern's ``scale`` binds that square root (the replacement squares it); half inputs
    are upcast to fp32 and the result cast back; a row whose every score is ``-inf``
    gives zeros. q/k/v are copied before the bmm only when their batch and head dims do
    not merge (as matmul's reshape decides), which the example layouts fix per row.
    """
    dtype = q.dtype
    if dtype != torch.float32:
        q, k, v = (torch.ops.prims.convert_element_type(x, torch.float32) for x in (q, k, v))
    b, n, s, d = q.shape
    skv, dv = k.shape[2], v.shape[3]
    contiguous = torch.contiguous_format
    qs = aten.mul.Scalar(q, scale)
    ks = aten.mul.Scalar(aten.permute(k, [0, 1, 3, 2]), scale)
    qf = aten.view(qs if _mergeable(qs) else aten.clone(qs, memory_format=contiguous), [b * n, s, d])
    kf = aten.view(ks if _mergeable(ks) else aten.clone(ks, memory_format=contiguous), [b * n, d, skv])
    w = aten.view(aten.bmm(qf, kf), [b, n, s, skv])
    if causal:
        w = aten.add.Tensor(w, _causal_bias(s, skv, torch.float32, q.device))
    elif mask is not None:
        w = aten.add.Tensor(w, mask)
    e = aten.exp(aten.sub.Tensor(w, aten.amax(w, [-1], True)))
    p = aten.div.Tensor(e, aten.sum.dim_IntList(e, [-1], True))
    dead = aten.logical_not(aten.any.dim(aten.logical_not(aten.eq.Scalar(w, float("-inf"))), -1, True))
    p = aten.where.self(dead, aten.full([b, n, s, skv], 0, dtype=torch.float32, layout=torch.strided, device=q.device, pin_memory=False), p)
    vf = aten.view(v if _mergeable(v) else aten.clone(v, memory_format=contiguous), [b * n, skv, dv])
    out = aten.view(aten.bmm(aten.view(p, [b * n, s, skv]), vf), [b, n, s, dv])
    if dtype != torch.float32:
        out = torch.ops.prims.convert_element_type(out, dtype)
    return out


#: form name -> (callable, supports a mask, supports causal, device the pattern is traced on)
_FORMS: dict[str, tuple[Callable[..., torch.Tensor], bool, bool, str]] = {
    "sdpa_cpu": (_sdpa_cpu, True, True, "cpu"),
    "sdpa_efficient": (_sdpa_efficient, True, True, "meta"),
    "sdpa_flash": (_sdpa_flash, False, True, "meta"),
    "sdpa_cudnn": (_sdpa_cudnn, True, True, "meta"),
    "eager": (_eager, True, False, "cpu"),
    "sdpa_math": (_sdpa_math, True, True, "cpu"),
}

#: ops each form's pattern contains (``Fusion.requires``: a graph without them is not
#: traced against the form's rows); the eager forms (and SDPA's math path, and the sinks)
#: are bmm + softmax after the decompositions
_EAGER_OPS = (aten.bmm.default, aten.amax.default)
_REQUIRES: dict[str, tuple[Any, ...]] = {
    "sdpa_cpu": (aten._scaled_dot_product_flash_attention_for_cpu.default,),
    "sdpa_efficient": (aten._scaled_dot_product_efficient_attention.default,),
    "sdpa_flash": (aten._scaled_dot_product_flash_attention.default,),
    "sdpa_cudnn": (aten._scaled_dot_product_cudnn_attention.default,),
    "eager": _EAGER_OPS,
    "sdpa_math": _EAGER_OPS,
    "eager_sinks": _EAGER_OPS,
}
#: and the eager forms' softmax feeds the second bmm (through the softmax's own ops, casts,
#: views, a mask's where and the sinks' slice): a router's softmax (Mixtral's, Qwen3-Next's)
#: reaches a bmm only through top-k and an index, so an MoE model with SDPA attention
#: does not trace the 50 eager rows (2.1 s of Qwen3-Next's first compile on the CPU)
_SOFTMAX_TO_BMM = Path(
    aten.amax.default,
    aten.bmm.default,
    through=frozenset(
        {
            aten.sub.Tensor, aten.exp.default, aten.div.Tensor, aten.mul.Tensor,
            torch.ops.prims.convert_element_type.default, aten._to_copy.default,
            aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default,
            aten.clone.default, aten.slice.Tensor, aten.where.self, aten.unsqueeze.default,
            aten.squeeze.dim, aten.permute.default, aten.transpose.int,
        }
    ),
    hops=10,
)
_REQUIRES_PATH: dict[str, Path] = {"eager": _SOFTMAX_TO_BMM, "sdpa_math": _SOFTMAX_TO_BMM, "eager_sinks": _SOFTMAX_TO_BMM}

#: math-form example layouts: (q, k, v) each HF's transposed [B, S, N, D] view ("t") or
#: contiguous BNSD ("c"). "ttt": HF prefill; "cct": MLA (q and k concatenated from their
#: nope/rope parts, v split off the kv projection); "ccc": decode over a concatenated cache
_MATH_LAYOUTS = ("ttt", "cct", "ccc")
#: with the GQA expansion: q transposed (prefill) or contiguous (decode)
_MATH_GQA_LAYOUTS = ("ttt", "ccc")


def _attention(q, k, v, mask, sinks, scale, causal):
    """The op with a constant scale, or with a graph-valued one folded into q.

    Under ``dynamic=True`` Dynamo keeps a module's float attribute (``self.scaling``)
    as a graph input, a 0-dim tensor, not a constant: the op's ``scale`` is a float, so
    ``q * scale`` goes in with scale 1 (the same scores: ``(q s) k^T = s (q k^T)``).
    """
    if isinstance(scale, (int, float)):
        return torch.ops.ascend_graph.attention(q, k, v, mask, sinks, float(scale), causal, -1)
    return torch.ops.ascend_graph.attention(q * scale, k, v, mask, sinks, 1.0, causal, -1)


def _fused(q, k, v, mask, scale, causal):
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return _attention(q, k, v, mask, None, scale, causal)


def _fused_sqrt_scale(q, k, v, mask, scale, causal):
    """For the math form, whose ``scale`` binds the square root of the softmax scale."""
    return _fused(q, k, v, mask, float(scale) * float(scale) if isinstance(scale, (int, float)) else scale * scale, causal)


def _row_functions(form: str, mask: bool, causal: bool, scale: bool, repeat: bool):
    """(pattern, replacement) with exactly the inputs this row needs, as named arguments."""
    call = _FORMS[form][0]
    fused = _fused_sqrt_scale if form == "sdpa_math" else _fused

    def kv(q, k, v):
        if not repeat:
            return k, v
        n_rep = q.shape[1] // k.shape[1]
        return _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)

    # register_replacement maps graph values to these functions by argument name, so each
    # arity gets its own signature.
    if mask and scale:

        def pattern(q, k, v, mask, scale):
            return call(q, *kv(q, k, v), mask, causal, scale)

        def replacement(q, k, v, mask, scale):
            return fused(q, k, v, mask, scale, causal)

    elif mask:

        def pattern(q, k, v, mask):
            return call(q, *kv(q, k, v), mask, causal, None)

        def replacement(q, k, v, mask):
            return fused(q, k, v, mask, None, causal)

    elif scale:

        def pattern(q, k, v, scale):
            return call(q, *kv(q, k, v), None, causal, scale)

        def replacement(q, k, v, scale):
            return fused(q, k, v, None, scale, causal)

    else:

        def pattern(q, k, v):
            return call(q, *kv(q, k, v), None, causal, None)

        def replacement(q, k, v):
            return fused(q, k, v, None, None, causal)

    return pattern, replacement


def _math_example_inputs(layout: str, mask: bool, dtype: torch.dtype, repeat: bool = False) -> Callable[[], list[torch.Tensor]]:
    def build() -> list[torch.Tensor]:
        b, n, s, d, dv = 2, 4, 8, 16, 8  # dv != d: the case that takes the math path

        def make(kind: str, dim: int, heads: int) -> torch.Tensor:
            if kind == "t":
                return torch.randn(b, s, heads, dim, dtype=dtype).transpose(1, 2)
            return torch.randn(b, heads, s, dim, dtype=dtype)

        nkv = n // 2 if repeat else n
        out = [make(layout[0], d, n), make(layout[1], d, nkv), make(layout[2], dv, nkv)]
        if mask:
            out.append(torch.zeros(b, 1, s, s, dtype=torch.float32))  # additive, fp32 (after the upcast)
        return out

    return build


def _example_inputs(form: str, mask: bool, repeat: bool, dtype: torch.dtype, decode: bool = False) -> Callable[[], list[torch.Tensor]]:
    device = _FORMS[form][3]

    def build() -> list[torch.Tensor]:
        b, nq, s, d = 2, 4, 8, 16
        nkv = 2 if repeat else nq
        sq = 1 if decode else s
        # HF layouts: q (and k, v without repeat_kv) are [B, S, N, D] transposed to BNSD;
        # the strides decide how matmul decomposes, so the patterns need the same ones.
        # Decode: one query token (q contiguous), K/V concatenated onto the cache (contiguous).
        q = torch.empty(b, sq, nq, d, device=device, dtype=dtype).transpose(1, 2)
        k = torch.empty(b, s, nkv, d, device=device, dtype=dtype).transpose(1, 2)
        v = torch.empty(b, s, nkv, d, device=device, dtype=dtype).transpose(1, 2)
        if decode:
            k, v = k.contiguous(), v.contiguous()
        if device == "cpu":
            q, k, v = (x.normal_() for x in (q, k, v))
        out = [q, k, v]
        if mask:
            m = torch.zeros(b, 1, sq, s, device=device, dtype=dtype)
            out.append(m)
        return out

    return build


def _eager_sinks(q, k, v, mask, sinks, scale):
    """GptOss ``eager_attention_forward`` (transformers 5.x) after AOT tracing and cleanup.

    The bmm halves are written at the ATen level for the reason :func:`_eager` gives; the
    sink half in plain torch, which traces to the model's own decomposition of
    ``max(dim).values`` and ``softmax(dtype=scores.dtype)`` (casts included in half
    types). Subtracting the row max first changes nothing in a softmax, and the sink
    column adds ``exp(sink)`` to each row's denominator only: the op's ``sinks``.
    """
    b, n, s, d = q.shape
    skv, dv = k.shape[2], v.shape[3]
    w = aten.bmm(aten.view(q, [b * n, s, d]), aten.view(aten.permute(k, [0, 1, 3, 2]), [b * n, d, skv]))
    w = aten.mul(aten.view(w, [b, n, s, skv]), scale)
    if mask is not None:
        w = aten.add(w, mask)
    combined = torch.cat([w, sinks.reshape(1, -1, 1, 1).expand(b, -1, s, -1)], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    p = F.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1].to(v.dtype)
    return aten.view(aten.bmm(aten.view(p, [b * n, s, skv]), aten.view(v, [b * n, skv, dv])), [b, n, s, dv])


def _sinks_mask_pattern(q, k, v, mask, sinks, scale):
    n_rep = q.shape[1] // k.shape[1]
    return _eager_sinks(q, _repeat_kv(k, n_rep), _repeat_kv(v, n_rep), mask, sinks, scale)


def _sinks_mask_replacement(q, k, v, mask, sinks, scale):
    return _attention(q, k, v, mask, sinks, scale, False)


def _sinks_pattern(q, k, v, sinks, scale):
    n_rep = q.shape[1] // k.shape[1]
    return _eager_sinks(q, _repeat_kv(k, n_rep), _repeat_kv(v, n_rep), None, sinks, scale)


def _sinks_replacement(q, k, v, sinks, scale):
    return _attention(q, k, v, None, sinks, scale, False)


def _sinks_example_inputs(mask: bool, dtype: torch.dtype) -> Callable[[], list[torch.Tensor]]:
    def build() -> list[torch.Tensor]:
        b, nq, nkv, s, d = 2, 4, 2, 8, 16
        out = [torch.randn(b, nq, s, d, dtype=dtype), torch.randn(b, nkv, s, d, dtype=dtype), torch.randn(b, nkv, s, d, dtype=dtype)]
        if mask:
            out.append(torch.zeros(b, 1, s, s, dtype=dtype))
        out.append(torch.randn(nq, dtype=dtype))
        return out

    return build


def _sinks_supported(match: Match, *, mask: bool) -> bool:
    sinks, q = _val(match, "sinks"), _val(match, "q")
    if sinks is None or q is None or sinks.dim() != 1 or not known_eq(sinks.shape[0], q.shape[1]) or not sinks.is_floating_point():
        return False
    return _supported(match, causal=False, form="eager_sinks", mask=mask, scale=True)


# --------------------------------------------------------------------------- checks


def _val(match: Match, name: str) -> Optional[torch.Tensor]:
    node = match.kwargs.get(name)
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _sdpa_node(match: Match) -> Optional[torch.fx.Node]:
    for node in match.nodes:
        if node.op == "call_function" and node.target in _SDPA_OPS:
            return node
    return None


#: the forms written with views of explicit sizes (bmm halves): matched without the
#: matcher's re-trace (``retrace=False``). Under dynamic shapes the re-trace builds the sizes
#: from ``sym_size`` calls and shared products that the model's graph computes otherwise
#: (from the size inputs Dynamo passes, shared with nodes outside the match), so it never
#: matched a dynamic graph (DeepSeek-V3's MLA and GptOss's sinks fused in static graphs
#: only). Without it the ints of the pattern are wildcards: :func:`_int_args_hold` checks
#: the ones that decide what is computed.
_RETRACE_FREE_FORMS = ("eager", "sdpa_math", "eager_sinks")


def _dims(x: Any) -> list[int]:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _int_args_hold(match: Match) -> bool:
    """The wildcard ints of a retrace-free row: softmax reductions over the key dim, k
    transposed as [0, 1, 3, 2], the sink column concatenated last and dropped."""
    for node in match.nodes:
        if node.op != "call_function":
            continue
        val = node.args[0].meta.get("val") if node.args and isinstance(node.args[0], torch.fx.Node) else None
        ndim = val.dim() if isinstance(val, torch.Tensor) else None
        last = (-1, ndim - 1) if ndim else (-1,)
        if node.target in (aten.amax.default, aten.sum.dim_IntList, aten.any.dim, aten.max.dim):
            if len(node.args) < 2 or not all(d in last for d in _dims(node.args[1])):
                return False
        elif node.target is aten.permute.default and ndim == 4:
            if list(node.args[1]) not in ([0, 1, 3, 2], [0, 2, 1, 3]):
                return False
        elif node.target is aten.cat.default:
            tensors = node.args[0]
            ndim = tensors[0].meta["val"].dim() if tensors and isinstance(tensors[0], torch.fx.Node) and "val" in tensors[0].meta else None
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            if ndim is None or dim not in (-1, ndim - 1):
                return False
        elif node.target is aten.slice.Tensor and ndim == 4:
            dim, start, end = (list(node.args[1:]) + [0, 0, None])[:3]
            if dim not in (-1, 3) or start != 0 or end != -1:
                return False
    return True


def _graph_scale(x: Any) -> bool:
    """A scale computed by the graph that the replacement can fold into q: a 0-dim
    floating tensor or a symbolic float."""
    val = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
    if isinstance(val, torch.Tensor):
        return val.dim() == 0 and val.is_floating_point()
    return isinstance(val, torch.SymFloat)


def _supported(match: Match, *, causal: bool, form: str, mask: bool, scale: bool) -> bool:
    if form in _RETRACE_FREE_FORMS and not _int_args_hold(match):
        return False
    # the op takes the scale as a float; a scale that is a graph value (GptOss under
    # dynamic=True: its float attribute became a 0-dim tensor input) is folded into q by
    # the replacement (_attention). Anything else stays (float() on a symbolic value
    # raised inside the backend, which Dynamo turned into graph breaks).
    if "scale" in match.kwargs and not isinstance(match.kwargs["scale"], (int, float)) and not _graph_scale(match.kwargs["scale"]):
        return False
    q, k, v = _val(match, "q"), _val(match, "k"), _val(match, "v")
    if q is None or k is None or v is None:
        return False
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    for d in (q.shape[-1], v.shape[-1]):
        if not isinstance(d, int) or d % HEAD_DIM_ALIGN or d > MAX_HEAD_DIM:
            return False
    if not isinstance(q.shape[1], int) or not isinstance(k.shape[1], int) or q.shape[1] % k.shape[1]:
        return False
    m = _val(match, "mask")
    if m is not None:
        if m.dim() != 4 or not known_eq(m.shape[1], 1):
            return False
        if m.dtype != torch.bool and m.dtype not in SUPPORTED_DTYPES:
            return False
    if causal and not known_eq(q.shape[2], k.shape[2]):
        return False
    node = _sdpa_node(match)
    if node is not None:
        # Positional scalars are wildcards in the pattern: read the real values here.
        schema = node.target._schema
        bound = {a.name: (node.args[i] if i < len(node.args) else node.kwargs.get(a.name, a.default_value)) for i, a in enumerate(schema.arguments)}
        if bound.get("dropout_p", 0.0) not in (0, 0.0, None):
            return False
        if bool(bound.get("is_causal", False)) != causal:
            return False
        if bound.get("return_debug_mask", False):
            return False
        # The matcher ignores a node's kwargs that the pattern does not name, so a row
        # without a mask (or with the default scale) would also match a node that has
        # one: check that the node really has none.
        if not mask and (bound.get("attn_mask") is not None or bound.get("attn_bias") is not None):
            return False
        if not scale and bound.get("scale") is not None:
            return False
    return True


# --------------------------------------------------------------------------- table


def _rows() -> list[Fusion]:
    rows: list[Fusion] = []
    for form, (_, takes_mask, takes_causal, _dev) in _FORMS.items():
        if form == "sdpa_math":
            continue
        eager = form == "eager"
        combos = itertools.product(
            (torch.float32, torch.float16) if eager else (torch.float32,),  # dtype (casts differ in eager)
            ((True, False), (False, True), (False, False)),  # (mask, causal)
            (True,) if eager else (True, False),  # explicit scale
            (False, True),  # through repeat_kv
            (False, True) if eager else (False,),  # decode layouts (strides differ in eager)
        )
        for dtype, (mask, causal), scale, repeat, decode in combos:
            if (mask and not takes_mask) or (causal and not takes_causal):
                continue
            pattern, replacement = _row_functions(form, mask, causal, scale, repeat)
            name = (
                f"{form}{'_mask' if mask else ''}{'_causal' if causal else ''}{'' if scale else '_defaultscale'}"
                f"{'_repeatkv' if repeat else ''}{'_decode' if decode else ''}_{str(dtype)[6:]}"
            )
            rows.append(
                Fusion(
                    name=name,
                    pattern=pattern,
                    replacement=replacement,
                    example_inputs=_example_inputs(form, mask, repeat, dtype, decode),
                    extra_check=functools.partial(_supported, causal=causal, form=form, mask=mask, scale=scale),
                    scalar_workaround={"scale": _SCALE_SAMPLE} if scale else {},
                    retrace=form not in _RETRACE_FREE_FORMS,
                    requires=_REQUIRES[form],
                    requires_path=_REQUIRES_PATH.get(form),
                )
            )
    # SDPA's math path: the scale is always there (a constant sqrt). Without repeat_kv
    # (MLA expands its shared rope key to every head itself), and with it: the math
    # path's own ``enable_gqa`` expansion is HF's repeat_kv op for op (unsqueeze, expand,
    # clone, view). CUDA takes this path for fp32 GQA models: HF passes ``enable_gqa``
    # when there is no mask, flash takes no fp32 and the efficient kernel no enable_gqa.
    # K/V are contiguous after the expansion, so only q's layout varies there.
    math_rows = [(layout, False) for layout in _MATH_LAYOUTS] + [(layout, True) for layout in _MATH_GQA_LAYOUTS]
    for dtype, (mask, causal), (layout, repeat) in itertools.product(
        (torch.float32, torch.float16), ((True, False), (False, True), (False, False)), math_rows
    ):
        pattern, replacement = _row_functions("sdpa_math", mask, causal, True, repeat)
        rows.append(
            Fusion(
                name=f"sdpa_math{'_mask' if mask else ''}{'_causal' if causal else ''}{'_gqa' if repeat else ''}_{layout}_{str(dtype)[6:]}",
                pattern=pattern,
                replacement=replacement,
                example_inputs=_math_example_inputs(layout, mask, dtype, repeat),
                extra_check=functools.partial(_supported, causal=causal, form="sdpa_math", mask=mask, scale=True),
                scalar_workaround={"scale": _SCALE_SAMPLE},
                retrace=False,
                requires=_REQUIRES["sdpa_math"],
                requires_path=_REQUIRES_PATH["sdpa_math"],
            )
        )
    # GptOss: eager attention with learned sink logits (fp32 graphs have no casts, half
    # graphs upcast around the softmax; dtypes are wildcards, so bf16 covers fp16)
    for dtype, mask in itertools.product((torch.float32, torch.bfloat16), (True, False)):
        rows.append(
            Fusion(
                name=f"eager_sinks{'_mask' if mask else ''}_repeatkv_{str(dtype)[6:]}",
                pattern=_sinks_mask_pattern if mask else _sinks_pattern,
                replacement=_sinks_mask_replacement if mask else _sinks_replacement,
                example_inputs=_sinks_example_inputs(mask, dtype),
                extra_check=functools.partial(_sinks_supported, mask=mask),
                scalar_workaround={"scale": _SCALE_SAMPLE},
                retrace=False,
                requires=_REQUIRES["eager_sinks"],
                requires_path=_REQUIRES_PATH["eager_sinks"],
            )
        )
    return rows


#: the fusion table (built once: rows are immutable and PatternPass memoises matchers by row identity)
FUSIONS: tuple[Fusion, ...] = tuple(_rows())


#: SDPA kernels whose ``attn_bias`` (argument 3) CUDA pads to an aligned last dim
_BIAS_OPS = {aten._scaled_dot_product_efficient_attention.default, aten._scaled_dot_product_cudnn_attention.default}


def _padded_bias_source(bias: Any) -> Optional[torch.fx.Node]:
    """The mask under CUDA's bias alignment and head expansion, or None.

    SDPA's CUDA dispatch expands the bias to every head and, for a key length that is not
    a multiple of 16, first pads its last dim and slices the pad off again (aligned rows):
    ``expand(slice(constant_pad_nd(m, [0, p]), -1, 0, L), [B, H, S, L])``, or
    ``expand(m, [B, H, S, L])``. What the model gave is ``m`` (``[B|1, 1, S, L]``): the op
    takes it as is (its heads broadcast).
    """
    if not isinstance(bias, torch.fx.Node) or bias.target is not aten.expand.default:
        return None
    m = bias.args[0]
    if isinstance(m, torch.fx.Node) and m.target is aten.slice.Tensor:
        padded, dim, start, end = (list(m.args) + [0, 0, None])[:4]
        step = m.args[4] if len(m.args) > 4 else 1
        if not isinstance(padded, torch.fx.Node) or padded.target is not aten.constant_pad_nd.default:
            return None
        m, pad = padded.args[0], list(padded.args[1])
        val = m.meta.get("val") if isinstance(m, torch.fx.Node) else None
        if not isinstance(val, torch.Tensor) or len(pad) != 2 or pad[0] != 0:
            return None
        if dim not in (-1, val.dim() - 1) or start != 0 or step != 1 or end is None or not known_eq(end, val.shape[-1]):
            return None
    val = m.meta.get("val") if isinstance(m, torch.fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dim() != 4:
        return None
    sizes = list(bias.args[1])
    if len(sizes) != 4 or not all(known_eq(a, 1) or known_eq(a, b) or b == -1 for a, b in zip(val.shape, sizes)):
        return None
    return m


class AttentionPass(PatternPass):
    """The table, with CUDA's aligned-bias form of a mask taken back to the mask first.

    The bias argument of every efficient/cuDNN SDPA node is pointed at the model's mask
    (:func:`_padded_bias_source`) for the match, and put back on each node that did not
    fuse: their kernels need the aligned rows. fp32 models reach those kernels on CUDA
    (no flash kernel for fp32) with a mask, so without this none of their layers fused.
    """

    def __call__(self, graph: torch.fx.Graph) -> int:
        swapped: list[tuple[torch.fx.Node, Any]] = []
        for node in graph.nodes:
            if node.op == "call_function" and node.target in _BIAS_OPS and len(node.args) > 3:
                m = _padded_bias_source(node.args[3])
                if m is not None:
                    swapped.append((node, node.args[3]))
                    node.update_arg(3, m)
        try:
            return super().__call__(graph)
        finally:
            if swapped:
                alive = set(graph.nodes)
                for node, bias in swapped:
                    if node in alive:
                        node.update_arg(3, bias)


def make_pass(config: AscendConfig) -> Optional[GraphPass]:
    if "attention" not in config.fusions:
        return None
    return AttentionPass("attention_fusion", "attention", FUSIONS, explain_node=config.explain_node)
