"""Gated delta rule fusion: transformers' torch fallbacks -> ``ascend_graph``'s gated delta ops.

Entry point: :func:`make_pass` (family ``"gated_delta_rule"``): a :class:`GatedDeltaPass`
that applies the static decode row and the prefill rows it builds per graph, each through
``passes/pattern.py``'s ``PatternPass``.

What is matched (Qwen3-Next / Qwen3.5 in transformers, ``modeling_qwen3_next.py``):

- **decode** (``torch_recurrent_gated_delta_rule`` with one token per request, the call
  ``Qwen3NextGatedDeltaNet`` makes once the cache holds a state): after Dynamo and AOT
  the token loop is one unrolled step. The row matches that step from the ``[B, 1, H, *]``
  inputs (their transposes, q/k L2 norm, ``q / sqrt(K)``) through decay, delta update and
  read-out, with two outputs: the token's output ``[B, H, V]`` and the new state
  ``[B, H, K, V]``. The zero buffer HF scatters the output into, and HF's in-place copy
  of the new state into its cache, stay outside the pattern (they are cheap, and they
  are not the delta rule). The replacement copies the state and runs the recurrent op
  over that copy (slot ``b`` = request ``b``), so the graph stays free of new aliasing.
  Two rows: an fp32 model (HF's casts to fp32 are no-ops the cleanup pass removes) and a
  bf16/fp16 model (the casts of q, k, v and beta stay in the graph and are part of the
  pattern; g and the state are fp32 there; the op takes the 16-bit inputs, upcasts them
  as HF does, and its output goes back to fp32 for HF's own final cast). ``extra_check``:
  those dtypes, and the divisor is ``sqrt(K)`` (float constants are not part of the
  structural match).

- **prefill** (``torch_chunk_gated_delta_rule``, called on the prompt and on every
  later multi-token step over a cached prefix): Dynamo unrolls its chunk loop once per
  chunk of the traced length, so no fixed row can match it. The rows are built on demand
  instead, one per *region signature*: the exact shape, stride and dtype of the six
  inputs (which fix the chunk count, the pad, the casts and every view size) and whether
  the final state is used. :class:`GatedDeltaPass` anchors on the region's cumulative
  decay (``cumsum`` over a ``[B, H, C, 64]`` fp32 tensor), reads candidate signatures
  off the graph's metadata (the ``[B, T, H, *]`` tensors transposed first, with
  ``ceil(T / 64) == C``), and for each builds a row whose pattern is HF's own function
  traced the way our pipeline traces a model (functionalized, inductor's decompositions,
  on fake tensors, then our cleanup passes), memoised per signature. The match is exact:
  every op, int and float of the traced region must agree (the scale ``K ** -0.5``, the
  pad, the chunk size, the L2-norm eps); a candidate that does not is simply not fused.
  The graph is put through inductor's ``remove_noop_ops`` first, the cleaning the
  pattern matcher gives every pattern, so both sides are in one normal form (e.g. the
  zero-length pad of a length that is a multiple of 64). The initial state binds to
  whatever feeds HF's ``initial_state.to(fp32)`` (the cached state, or the zeros HF
  makes when there is none). The replacement flattens the ``[B, T]`` batch to ``B``
  sequences of ``T`` tokens with chunk metadata built from the static shape in the graph
  (no host read) and returns the op's output and its state copy, which goes where HF's
  ``last_recurrent_state`` went (the cache update). Cost: one trace of the unrolled
  function per new signature (every layer of a model shares one), then one replacement
  trace per layer.

  Under dynamic shapes (``dynamic=True``, or Dynamo's automatic dynamic after a second
  prompt length) the loop still reaches the backend unrolled: Dynamo guards on the chunk
  count (``range(num_chunks)`` specialises it) and keeps B and T symbolic, so each chunk
  count is its own graph. Such a region's signature is symbolic: its row is traced once,
  on fake tensors of the graph's own shape environment (the same symbols, the loop
  specialised as Dynamo specialised it), and every argument that trace computes from a
  size is a wildcard of the match; every other int (dims, the chunk size, loop
  indices), float and dtype must match as traced. AOT reads the chunk count and the
  (symbolic) chunk size off the region's padded views; those reads are rebuilt from the
  inputs first (``cleanup.hoist_size_reads``), or the region's inner nodes would have
  users outside it. The check then holds the inputs to the signature's symbols; a
  signature whose q, k, v, g and beta lengths are not provably one symbol (inputs
  marked dynamic one by one) is skipped before any trace. Unfused, torch 2.11's row-loop
  region under symbolic shapes took 529 s to compile on the CPU (Qwen3-Next,
  ``dynamic=True``) and timed out on the GPU.

  HF's function has two branches for the UT system: ``solve_triangular``, or a Python
  row loop (``for i in range(1, 64)``, unrolled by Dynamo too) taken when
  ``is_torchdynamo_exporting()`` is true: under ``torch.export``, and under
  ``torch.compile`` on a torch whose Dynamo folds ``is_exporting()`` to True (torch 2.11,
  pytorch#176347; ``capture/torch_fixes.py`` fixes that where the backend is used, and
  the compile then holds the solve). Both are matched: the signature records the branch,
  the graph's own ops say which to try first, and the pattern trace pins HF's predicate
  to that branch.

Negative: a step without the decay (``state * exp(g)``) is another recurrence (plain
delta rule) and does not match; neither does the chunked function without the q/k L2
norm or with another chunk size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing, make_fx

from ...capture.trace import decompositions
from ...config import AscendConfig
from ...ops import gated_delta as _ops  # registers the ops the replacements call
from ..base import GraphPass
from ..cleanup import DeadCodeElimination, NoOpElimination, hoist_size_reads
from ..pattern import Fusion, PatternPass, known_eq

if TYPE_CHECKING:
    from torch._inductor.pattern_matcher import Match


__all__ = ["make_pass", "FUSIONS"]

aten = torch.ops.aten


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    # transformers' l2norm (the FLA one): x * rsqrt(sum(x^2) + 1e-6)
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + 1e-6)


def _decode_pattern(q, k, v, g, beta, state):
    # torch_recurrent_gated_delta_rule, one token: [B, 1, H, *] -> [B, H, 1, *]
    q, k, v, beta, g = (x.transpose(1, 2) for x in (q, k, v, beta, g))
    q = _l2norm(q)
    k = _l2norm(k)
    q = q / (q.shape[-1] ** 0.5)
    q_t, k_t, v_t = q[:, :, 0], k[:, :, 0], v[:, :, 0]
    state = state * g[:, :, 0].exp()[..., None, None]  # decay
    kv_mem = (state * k_t.unsqueeze(-1)).sum(dim=-2)
    delta = (v_t - kv_mem) * beta[:, :, 0].unsqueeze(-1)  # delta rule
    state = state + k_t.unsqueeze(-1) * delta.unsqueeze(-2)
    out = (state * q_t.unsqueeze(-1)).sum(dim=-2)
    return out, state


def _decode_pattern_lowp(q, k, v, g, beta, state):
    # the same step in a bf16/fp16 model: HF upcasts q, k, v and beta after the transpose
    # (g is computed in fp32 by the model, the state cache is fp32)
    q, k, v, beta = (x.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format) for x in (q, k, v, beta))
    g = g.transpose(1, 2)
    q = _l2norm(q)
    k = _l2norm(k)
    q = q / (q.shape[-1] ** 0.5)
    q_t, k_t, v_t = q[:, :, 0], k[:, :, 0], v[:, :, 0]
    state = state * g[:, :, 0].exp()[..., None, None]
    kv_mem = (state * k_t.unsqueeze(-1)).sum(dim=-2)
    delta = (v_t - kv_mem) * beta[:, :, 0].unsqueeze(-1)
    state = state + k_t.unsqueeze(-1) * delta.unsqueeze(-2)
    out = (state * q_t.unsqueeze(-1)).sum(dim=-2)
    return out, state


def _decode_replacement_lowp(q, k, v, g, beta, state):
    # the op upcasts its inputs exactly as HF does and returns v's dtype; HF keeps the step's
    # output in fp32 only until it casts it to the model dtype, so the one rounding is the same
    out, cache = _decode_replacement(q, k, v, g, beta, state)
    return out.to(torch.float32), cache


def _decode_replacement(q, k, v, g, beta, state):
    B, _, H, K = q.shape
    V = v.shape[-1]
    cache = state.clone()  # the op updates its own copy: the graph's state input is not mutated
    out = torch.ops.ascend_graph.recurrent_gated_delta_rule(
        q.reshape(B, H, K), k.reshape(B, H, K), v.reshape(B, H, V), g.reshape(B, H), beta.reshape(B, H),
        cache, None, None, None, K ** -0.5, True,
    )
    return out, cache


def _decode_inputs():
    B, H, K, V = 2, 4, 16, 8
    return [
        torch.randn(B, 1, H, K), torch.randn(B, 1, H, K), torch.randn(B, 1, H, V),
        torch.randn(B, 1, H), torch.randn(B, 1, H), torch.randn(B, H, K, V),
    ]


def _decode_inputs_lowp():
    q, k, v, g, beta, state = _decode_inputs()
    return [q.bfloat16(), k.bfloat16(), v.bfloat16(), g, beta.bfloat16(), state]


def _val(node):
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _decode_check(match: Match, lowp: bool = False) -> bool:
    q = _val(match.kwargs.get("q"))
    vals = [_val(match.kwargs.get(n)) for n in ("q", "k", "v", "g", "beta", "state")]
    if q is None or any(x is None for x in vals):
        return False
    if lowp:
        # q, k, v, beta in one 16-bit dtype; g and the state in fp32 (what HF's bf16 model has)
        if q.dtype not in (torch.bfloat16, torch.float16) or any(x.dtype != q.dtype for x in (vals[1], vals[2], vals[4])):
            return False
        if vals[3].dtype != torch.float32 or vals[5].dtype != torch.float32:
            return False
    elif any(x.dtype != torch.float32 for x in vals):
        return False
    if q.dim() != 4 or q.shape[1] != 1:
        return False
    want = math.sqrt(q.shape[-1])
    divisors = [n.args[1] for n in match.nodes if n.target is aten.div.Tensor and isinstance(n.args[1], (int, float))]
    return len(divisors) == 1 and math.isclose(divisors[0], want, rel_tol=1e-6)


FUSIONS = (
    # o_t = q_t^T S_t, S_t = e^{g_t} S_{t-1} + k_t (beta_t (v_t - k_t^T e^{g_t} S_{t-1}))^T  ->  recurrent op
    Fusion(
        name="hf_recurrent_decode_step",
        pattern=_decode_pattern,
        replacement=_decode_replacement,
        example_inputs=_decode_inputs,
        extra_check=_decode_check,
    ),
    Fusion(
        name="hf_recurrent_decode_step_lowp",
        pattern=_decode_pattern_lowp,
        replacement=_decode_replacement_lowp,
        example_inputs=_decode_inputs_lowp,
        extra_check=functools.partial(_decode_check, lowp=True),
    ),
)


# ----------------------------------------------------------------------------------
# prefill: rows built on demand, one per region signature
# ----------------------------------------------------------------------------------


def _hf_chunk_fn():
    from transformers.models.qwen3_next import modeling_qwen3_next as m

    fn = m.torch_chunk_gated_delta_rule
    return getattr(fn, "__wrapped__", fn)  # the torch fallback under the hub-kernel decorator


@dataclass(frozen=True)
class _TensorMeta:
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, x: torch.Tensor) -> "_TensorMeta":
        return cls(tuple(int(d) for d in x.shape), tuple(int(d) for d in x.stride()), x.dtype)

    def empty(self, device) -> torch.Tensor:
        return torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device=device)

    def sizes(self) -> tuple:
        return (*self.shape, *self.stride)


@dataclass(frozen=True)
class _SymMeta:
    """A region input with symbolic sizes or strides (``dynamic=True``): the graph's own
    expressions and their hints (the signature), and the graph's fake tensor, whose sizes
    the row is traced with, in the graph's shape environment."""

    shape: tuple[str, ...]
    stride: tuple[str, ...]
    dtype: torch.dtype
    hints: tuple[int, ...]
    val: Any = dataclasses.field(compare=False, hash=False, repr=False)

    @classmethod
    def of(cls, x: torch.Tensor) -> "_SymMeta":
        hints = tuple(_hint(d) for d in (*x.shape, *x.stride()))
        return cls(tuple(str(d) for d in x.shape), tuple(str(d) for d in x.stride()), x.dtype, hints, x)

    def empty(self, device) -> torch.Tensor:
        # under the graph's fake mode (GatedDeltaPass._prefill enters it)
        return torch.empty_strided(self.val.shape, self.val.stride(), dtype=self.dtype, device=device)

    def sizes(self) -> tuple:
        return (*self.val.shape, *self.val.stride())


def _hint(d: Any) -> int | None:
    """An int size, or a backed SymInt's hint (read without guarding on it); None if unbacked."""
    if isinstance(d, int):
        return d
    hint = getattr(getattr(d, "node", None), "hint", None)
    return int(hint) if hint is not None else None


def _meta_of(x: torch.Tensor) -> "_TensorMeta | _SymMeta":
    return _TensorMeta.of(x) if _static(x.shape) and _static(x.stride()) else _SymMeta.of(x)


@dataclass(frozen=True)
class _PrefillSignature:
    """What the structure of one traced ``torch_chunk_gated_delta_rule`` call depends on."""

    q: _TensorMeta
    k: _TensorMeta
    v: _TensorMeta
    g: _TensorMeta
    beta: _TensorMeta
    state: _TensorMeta
    output_final_state: bool
    #: the UT system inverted by HF's row loop (its export branch) instead of solve_triangular
    row_loop: bool = False

    @property
    def metas(self) -> tuple:
        return (self.q, self.k, self.v, self.g, self.beta, self.state)

    @property
    def symbolic(self) -> bool:
        return any(isinstance(m, _SymMeta) for m in self.metas)

    def sizes_agree(self) -> bool:
        """q, k, v, g and beta provably share B and T, and the state B (always true of a
        static signature). Symbols Dynamo gave input by input (``mark_dynamic``, or its
        automatic dynamic after a recompile) are only guarded to give equal chunk counts:
        the op, one length for all, would then be an assumption. Checked before tracing."""
        if not self.symbolic:
            return True
        bt = [m.sizes()[:2] for m in (self.q, self.k, self.v, self.g, self.beta)]
        return all(known_eq(a, b) for s in bt[1:] for a, b in zip(bt[0], s)) and known_eq(bt[0][0], self.state.sizes()[0])

    def fake_mode(self) -> Any:
        """The graph's fake mode, for a symbolic signature (its row is traced in it)."""
        return _graph_fake_mode(self.metas)


def _graph_fake_mode(metas: tuple) -> Any:
    """The fake mode of the graph symbolic metas come from; None for static ones."""
    return next((m.val.fake_mode for m in metas if isinstance(m, _SymMeta)), None)


_traced: dict[tuple, torch.fx.GraphModule] = {}
_traced_lock = threading.RLock()


#: names of the predicate HF's chunk fallback branches on (``solve_triangular`` when False,
#: its row loop when True), across transformers versions
_BRANCH_PREDICATES = ("is_torchdynamo_exporting", "is_torchdynamo_compiling")


@contextlib.contextmanager
def _hf_branch(hf, row_loop: bool):
    """Trace HF's function down the branch the model's graph took.

    Which branch Dynamo takes depends on the torch / transformers pair (torch 2.13 with
    transformers 5.17 traces ``solve_triangular``; torch 2.11 traces the row loop), while a
    plain make_fx trace always takes the eager one; so the predicate HF reads is pinned
    for the length of the trace (under ``_traced_lock``).
    """
    names = [n for n in _BRANCH_PREDICATES if n in hf.__code__.co_names and n in hf.__globals__]
    saved = {n: hf.__globals__[n] for n in names}
    try:
        for n in names:
            hf.__globals__[n] = (lambda: True) if row_loop else (lambda: False)
        yield
    finally:
        hf.__globals__.update(saved)


def _normalised_hf_chunk(metas: tuple[_TensorMeta, ...], device: torch.device, output_final_state: bool, row_loop: bool = False) -> torch.fx.GraphModule:
    """transformers' chunk fallback for inputs of exactly these metas, as our pipeline sees it.

    Traced the way ``capture/trace.py`` traces a Dynamo graph (functionalized, inductor's
    decompositions, on fake tensors: no arithmetic runs) and cleaned up by the same
    cleanup passes the pass manager runs before the fusions, then by ``remove_noop_ops``
    as ``fwd_only`` cleans a pattern (so the row uses it as its traced pattern as is).
    Memoised per signature. Without the final state it is the with-state trace less its
    state output (HF's last state update is then dead code): one trace serves both.
    """
    key = (metas, str(device), output_final_state, row_loop)
    with _traced_lock:
        gm = _traced.get(key)
        if gm is not None:
            return gm
    if not output_final_state:
        full = _normalised_hf_chunk(metas, device, True, row_loop)
        graph = torch.fx.Graph()
        outputs = graph.graph_copy(full.graph, {})
        graph.output(outputs[0])
        DeadCodeElimination()(graph)
        gm = torch.fx.GraphModule(full, graph)
        with _traced_lock:
            return _traced.setdefault(key, gm)
    hf = _hf_chunk_fn()

    def call(q, k, v, g, beta, state):
        o, s = hf(q, k, v, g=g, beta=beta, initial_state=state, output_final_state=output_final_state, use_qk_l2norm_in_kernel=True)
        return (o, s) if output_final_state else o

    # a symbolic signature is traced in the graph's own fake mode and shape environment:
    # the sizes stay the graph's symbols, and what the trace specialises (the chunk count
    # of range(num_chunks)) it specialises as Dynamo did when it traced the model
    mode = _graph_fake_mode(metas) or FakeTensorMode(allow_non_fake_inputs=False)
    with _traced_lock, _hf_branch(hf, row_loop), disable_proxy_modes_tracing(), mode:
        inputs = [m.empty(device) for m in metas]
        gm = make_fx(torch.func.functionalize(call), decompositions(), tracing_mode="real")(*inputs)
    NoOpElimination()(gm.graph)
    DeadCodeElimination()(gm.graph)
    from torch._inductor.fx_passes.post_grad import remove_noop_ops

    remove_noop_ops(gm.graph)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    with _traced_lock:
        _traced[key] = gm
    return gm


def _make_prefill_pattern(sig: "_PrefillSignature"):
    def pattern(q, k, v, g, beta, state):
        gm = _normalised_hf_chunk(sig.metas, q.device, sig.output_final_state, sig.row_loop)
        return gm(q, k, v, g, beta, state)

    return pattern


def _prefill_replacement_common(q, k, v, g, beta, state):
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = (T + _ops.CHUNK_SIZE - 1) // _ops.CHUNK_SIZE
    dev = q.device
    cache = state.to(torch.float32, copy=True)  # the op updates its own copy: no input is mutated
    # batch b is tokens [b*T, (b+1)*T); chunk metadata from the static shape (no host read)
    cu = torch.arange(B + 1, dtype=torch.int32, device=dev) * T
    flat = torch.arange(B * C, dtype=torch.int32, device=dev)
    chunk_indices = torch.stack([flat // C, flat % C], dim=-1)
    chunk_offsets = torch.arange(B + 1, dtype=torch.int32, device=dev) * C
    o = torch.ops.ascend_graph.chunk_gated_delta_rule(
        q.reshape(B * T, H, K), k.reshape(B * T, H, K), v.reshape(B * T, H, V), g.reshape(B * T, H), beta.reshape(B * T, H),
        cache, cu, None, None, chunk_indices, chunk_offsets, K ** -0.5, True,
    )
    return o.reshape(B, T, H, V).to(q.dtype), cache


def _prefill_replacement(q, k, v, g, beta, state):
    return _prefill_replacement_common(q, k, v, g, beta, state)


def _prefill_replacement_no_state(q, k, v, g, beta, state):
    return _prefill_replacement_common(q, k, v, g, beta, state)[0]


def _prefill_check(signature: _PrefillSignature):
    def check(match: Match) -> bool:
        vals = [_val(match.kwargs.get(n)) for n in ("q", "k", "v", "g", "beta", "state")]
        if any(x is None for x in vals):
            return False
        if not all(_hint(_val(n).shape[-1]) == _ops.CHUNK_SIZE for n in match.nodes if n.target is aten.cumsum.default and _val(n) is not None and _val(n).dim() == 4):
            return False
        if not signature.symbolic:
            return all(_static(x.shape) and _static(x.stride()) for x in vals) and tuple(_TensorMeta.of(x) for x in vals) == signature.metas
        # sizes and strides provably the signature's (the same symbols), dtypes equal
        return all(
            x.dtype == m.dtype and x.dim() == len(m.shape) and all(known_eq(a, b) for a, b in zip((*x.shape, *x.stride()), m.sizes()))
            for x, m in zip(vals, signature.metas)
        )

    return check


_rows: dict[tuple[_PrefillSignature, str], Fusion] = {}

# A row built for one signature fixes every int of its pattern, so where pattern.py can
# match a pattern exactly as traced (no generic match and re-trace at the graph's shapes,
# which costs a full trace of the unrolled loop per layer), the prefill rows ask for it.
_EXACT = {"exact": True} if "exact" in {f.name for f in dataclasses.fields(Fusion)} else {}


def _prefill_row(sig: _PrefillSignature, device: torch.device) -> Fusion:
    key = (sig, str(device))
    with _traced_lock:
        row = _rows.get(key)
    if row is not None:
        return row
    metas = sig.metas
    # static: matched exactly as traced; symbolic: the sizes the graph computes (its
    # symbols, traced as such) are wildcards, every other int, float and op exact
    how = {"symbolic": True} if sig.symbolic else _EXACT
    row = Fusion(
        name=f"hf_chunk_prefill_{'state' if sig.output_final_state else 'nostate'}{'_sym' if sig.symbolic else ''}",
        pattern=_make_prefill_pattern(sig),
        replacement=_prefill_replacement if sig.output_final_state else _prefill_replacement_no_state,
        example_inputs=lambda: [m.empty(device) for m in metas],
        extra_check=_prefill_check(sig),
        traced=lambda: _normalised_hf_chunk(metas, device, sig.output_final_state, sig.row_loop),
        **how,
    )
    with _traced_lock:
        return _rows.setdefault(key, row)


def _is_anchor(n: torch.fx.Node) -> bool:
    # HF's cumulative decay: cumsum over the position in the chunk of a [B, H, C, 64] fp32 tensor
    if n.target is not aten.cumsum.default or (n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")) not in (3, -1):
        return False
    x = _val(n)
    if x is None or x.dim() != 4 or x.dtype != torch.float32:
        return False
    # under dynamic=True every size may be symbolic, the chunk size included: it reaches
    # the graph as (T + pad) // ((T + pad) // 64), which no guard-free check proves is 64.
    # Its hint is read here; the row's check reads it again on the match
    return _hint(x.shape[-1]) == _ops.CHUNK_SIZE and all(_hint(d) is not None for d in x.shape)


def _static(shape) -> bool:
    return all(isinstance(d, int) for d in shape)


def _signatures(graph: torch.fx.Graph, anchor: torch.fx.Node, row_loop_first: bool) -> list[_PrefillSignature]:
    """Candidate signatures of the region whose cumulative decay is ``anchor`` (from metadata only).

    The region's inputs are the tensors HF transposes first (``x.transpose(1, 2)``):
    ``[B, T, H, K|V]`` and ``[B, T, H]`` with ``ceil(T / 64) == C``, the anchor being
    ``[B, H, C, 64]``. Which candidate is the real one is left to the exact match.
    """
    # sizes compared by their hints (a symbolic one read without a guard): this only
    # proposes candidates; the match decides
    anchor_val = _val(anchor)
    B, H, C = (_hint(d) for d in anchor_val.shape[:3])
    lo, hi = (C - 1) * _ops.CHUNK_SIZE + 1, C * _ops.CHUNK_SIZE
    four: dict[int, dict[int, set]] = {}  # T -> last dim -> metas
    three: dict[int, set] = {}
    uses: dict[tuple[int, int], int] = {}  # (T, last dim) -> transposes seen (q and k: two per region, v: one)
    normed: set = set()  # metas of transposes HF L2-normalises (q and k)
    for p in graph.find_nodes(op="call_function", target=aten.permute.default):
        src = _val(p.args[0])
        if not isinstance(src, torch.Tensor) or src.dim() < 3:
            continue
        shape = [_hint(d) for d in src.shape]
        if None in shape or any(_hint(d) is None for d in src.stride()):
            continue
        if shape[0] != B or shape[2] != H or not lo <= shape[1] <= hi:
            continue
        dims = list(p.args[1])
        if dims == [0, 2, 1, 3] and src.dim() == 4:
            meta = _meta_of(src)
            four.setdefault(shape[1], {}).setdefault(shape[3], set()).add(meta)
            uses[shape[1], shape[3]] = uses.get((shape[1], shape[3]), 0) + 1
            if _l2_normed(p):
                normed.add(meta)
        elif dims == [0, 2, 1] and src.dim() == 3:
            three.setdefault(shape[1], set()).add(_meta_of(src))
    candidates = []
    for T, by_dim in four.items():
        gb = sorted(three.get(T, set()), key=str)
        dims_by_use = sorted(by_dim, key=lambda d: -uses[T, d])
        pairs = [(K, V) for K in dims_by_use for V in dims_by_use if K != V or len(by_dim) == 1]
        for K, V in pairs:
            qk, vv = sorted(by_dim[K], key=str), sorted(by_dim[V], key=str)
            state = _state_meta(anchor_val, qk[0], vv[0])
            combos = list(itertools.product(qk, qk, vv, gb, gb))
            # most plausible first (each try costs a trace): q and k L2-normalised and v not
            # (where K == V, the one thing that tells q's layout from v's), g in float32 (HF
            # computes it with .float()), beta in the model dtype (v's), q and k alike, and
            # where K == V offers two layouts with q and k sharing one, v in the other
            combos.sort(
                key=lambda c: (
                    2 * ((c[0] not in normed) + (c[1] not in normed) + (c[2] in normed))
                    + (c[3].dtype != torch.float32) + (c[4].dtype != c[2].dtype) + (c[0] != c[1]) + (len(vv) > 1 and c[2] == c[0])
                )
            )
            candidates += [(c, state) for c in combos]
    # the branch the graph's own ops point at, for every candidate, before the other one
    out = [
        _PrefillSignature(q, k, v, g, beta, state, out_state, row_loop)
        for row_loop in (row_loop_first, not row_loop_first)
        for (q, k, v, g, beta), state in candidates
        for out_state in (True, False)
    ]
    return out[:_MAX_SIGNATURES]


def _l2_normed(transpose: torch.fx.Node, depth: int = 6) -> bool:
    """Whether a transposed input reaches an ``rsqrt`` within a few ops: HF's L2 norm of q and
    k (``x * rsqrt(sum(x * x) + eps)``, after the fp32 copy) does, v and the gates do not.
    Orders candidates only; the match decides."""
    frontier, seen = [transpose], {transpose}
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u.target is aten.rsqrt.default:
                    return True
                if u not in seen:
                    seen.add(u)
                    nxt.append(u)
        frontier = nxt
    return False


def _state_meta(anchor_val: torch.Tensor, qk: "_TensorMeta | _SymMeta", v: "_TensorMeta | _SymMeta") -> "_TensorMeta | _SymMeta":
    """The contiguous ``[B, H, K, V]`` fp32 state, each size as the graph has it (under
    dynamic shapes, symbols: a fake tensor of the graph's mode carries them)."""
    B, H = anchor_val.shape[:2]
    K = qk.val.shape[3] if isinstance(qk, _SymMeta) else qk.shape[3]
    V = v.val.shape[3] if isinstance(v, _SymMeta) else v.shape[3]
    if _static((B, H, K, V)):
        return _TensorMeta((B, H, K, V), (H * K * V, K * V, V, 1), torch.float32)
    with anchor_val.fake_mode:
        return _SymMeta.of(torch.empty((B, H, K, V), dtype=torch.float32, device=anchor_val.device))


#: signatures tried per region before giving up (each costs a trace of the pattern)
_MAX_SIGNATURES = 24


class GatedDeltaPass(GraphPass):
    """The decode row (static) and the prefill rows (built per region signature)."""

    name = "gated_delta_fusion"
    family = "gated_delta_rule"

    def __init__(self, explain_node: str | None = None):
        self.explain_node = explain_node
        self.decode = PatternPass(self.name, self.family, FUSIONS, explain_node=explain_node)

    def __call__(self, graph: torch.fx.Graph) -> int:
        return self.decode(graph) + self._prefill(graph)

    def _prefill(self, graph: torch.fx.Graph) -> int:
        anchors = [n for n in graph.find_nodes(op="call_function", target=aten.cumsum.default) if _is_anchor(n)]
        if not anchors:
            return 0
        # the pattern matcher cleans every pattern with inductor's remove_noop_ops; the graph
        # gets the same cleaning so both sides are in one normal form. That can leave dead
        # nodes (a noop copy's destination view: HF's output buffer of a single chunk
        # kept a dead select, one more user of a node inside the region than the pattern
        # has, so a prompt under 64 tokens never fused in the row-loop branch), which go too
        from torch._inductor.fx_passes.post_grad import remove_noop_ops

        remove_noop_ops(graph)
        DeadCodeElimination()(graph)
        # under dynamic shapes AOT reads the chunk count and chunk size off the region's
        # padded views: those reads are recomputed from the inputs, or the region's inner
        # nodes have users outside it and no match is allowed
        hoist_size_reads(graph)
        # which branch of HF's function the graph holds: try that one first
        row_loop_first = not graph.find_nodes(op="call_function", target=aten.linalg_solve_triangular.default)
        count = 0
        tried: set[_PrefillSignature] = set()
        for anchor in anchors:
            if _erased(anchor):
                continue  # fused already by an earlier region's row
            device = _val(anchor).device
            for sig in _signatures(graph, anchor, row_loop_first):
                if sig in tried:
                    continue
                tried.add(sig)
                if not sig.sizes_agree():
                    continue
                rows = PatternPass(self.name, self.family, (_prefill_row(sig, device),), explain_node=self.explain_node)
                # traced on fake tensors: no arithmetic at the region's real sizes (a
                # symbolic row in the graph's own mode: its sizes are the graph's symbols)
                with sig.fake_mode() or FakeTensorMode():
                    rows.matcher
                count += rows(graph)
                if _erased(anchor):
                    break
        return count

    def uuid_sources(self) -> list[Any]:
        return super().uuid_sources() + self.decode.uuid_sources() + [_hf_chunk_fn()]


def _erased(node: torch.fx.Node) -> bool:
    return bool(getattr(node, "_erased", False))


def make_pass(config: AscendConfig) -> GraphPass | None:
    if "gated_delta_rule" not in config.fusions:
        return None
    return GatedDeltaPass(explain_node=config.explain_node)
