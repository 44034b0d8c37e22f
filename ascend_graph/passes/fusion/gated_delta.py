"""Gated delta rule fusion: transformers' torch fallback -> ``ascend_graph.recurrent_gated_delta_rule``.

Entry point: :func:`make_pass` (family ``"gated_delta_rule"``), one :class:`Fusion` row
per shape of the subgraph, applied by ``passes/pattern.py``'s ``PatternPass``.

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
  ``extra_check``: fp32 inputs (HF casts to fp32 first; in an fp32 model the casts are
  no-ops and the cleanup pass removes them, in a bf16 model they remain and the row does
  not match), and the divisor is ``sqrt(K)`` (float constants are not part of the
  structural match).

- **prefill** (``torch_chunk_gated_delta_rule``) is **not** matched. After Dynamo the
  chunk loop is unrolled once per chunk, and the number of chunks is
  ``ceil(seq_len / 64)`` of the traced shape: one pattern per chunk count would be
  needed (each a full trace of the pattern, ~1 s per row) and a graph with more chunks
  than the largest row would still not fuse; the zero-length pad for sequence lengths
  that are multiples of 64 changes the structure again. The sound fix is upstream of
  this pass: have the model call ``ascend_graph.ops.gated_delta.chunk_gated_delta_rule``
  directly (vLLM-style integration), or register it as the transformers kernel for
  ``chunk_gated_delta_rule``, so the whole call is one opaque op before tracing.

Negative: a step without the decay (``state * exp(g)``) is another recurrence (plain
delta rule) and does not match.
"""

from __future__ import annotations

import math

import torch

from ...config import AscendConfig
from ...ops import gated_delta as _ops  # noqa: F401  (registers the ops the replacements call)
from ..base import GraphPass
from ..pattern import Fusion, Match, PatternPass

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


def _val(node):
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _decode_check(match: Match) -> bool:
    q = _val(match.kwargs.get("q"))
    vals = [_val(match.kwargs.get(n)) for n in ("q", "k", "v", "g", "beta", "state")]
    if q is None or any(x is None or x.dtype != torch.float32 for x in vals):
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
)


def make_pass(config: AscendConfig) -> GraphPass | None:
    if "gated_delta_rule" not in config.fusions:
        return None
    return PatternPass("gated_delta_fusion", "gated_delta_rule", FUSIONS, explain_node=config.explain_node)
