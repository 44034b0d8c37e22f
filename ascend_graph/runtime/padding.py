"""The padding planner: every padding rule, shared by the runtime and the FX passes.

Entry points:

- :func:`plan_padding`: shapes of every input/output of one call at a bucket (host, pure);
- :func:`plan_fia`: the FIA (TND paged attention) metadata layout of a padded batch
  (host, pure: a function of sizes only);
- :func:`pad_into`: write one input into its static buffer with its role's pad value
  (device ops only, no host synchronisation);
- :func:`fia_pad_metadata`: the in-graph form of the FIA rule (device ops only; what
  ``passes/padding.py`` inserts in front of ``ascend_graph::paged_attention``);
- :func:`fia_pad_lengths`: the same rule on FIA's host arrays (what
  ``runtime/npu_updates.py`` applies to the lengths it patches into an ACL graph);
- :func:`plan_drafter_batch`, :func:`drafter_token_mask`, :func:`drafter_sample_indices`,
  :func:`mask_rejected_slots`: the padded MTP drafter batch.

Batch to bucket: every dim that is a sympy expression of the batch symbol is padded by
substituting the bucket size (so an ``s*(1+k)`` token dim of an MTP verify batch pads
to ``bucket*(1+k)``); every other dim must be unchanged. Padded rows sit after the real
ones along each padded dim, so outputs are sliced back with ``narrow(dim, 0, real)``.

Pad values by role (``AscendConfig.pad_roles``, or a default chosen by input name):

=========  ===================================================  ===============================
role       used for                                             padded rows
=========  ===================================================  ===============================
zero       token ids, hidden states, anything else              0
index      positions, block_table rows                          0
slot       slot_mapping (a cache write index)                   -1: never writes
kv_len     KV / sequence lengths                                1
cu_len     cumulative query lengths (query_start_loc)           the FIA plan's dummy requests
mask       active-token masks (MoE)                             False
=========  ===================================================  ===============================

FIA rules (``npu_fused_infer_attention_score`` in TND; vllm-ascend issues #4518, #6524,
#6596, #10769: error 561002 "queryT must equal last element of actualSequenceLengthQ").
A padded batch of ``T`` real tokens in ``R`` real requests, padded to ``T_pad`` tokens
and ``R_pad`` request slots, is laid out by :func:`plan_fia` so that:

1. ``T_pad == cu_q[-1]``: the padded tokens belong to ``R_pad - R`` dummy requests
   appended after the real ones (cu_q is ``[R_pad + 1]``);
2. no dummy request holds more than ``max_query_len`` (16) query tokens: FIA's limit on
   the paged decode path; the tail is spread over the dummies as evenly as it goes
   (sizes differ by at most one), so a dummy is empty only when there are fewer padded
   tokens than dummies;
3. uniform decode (every request exactly ``q = 1+k`` tokens, ``T == q*R``): every dummy
   holds exactly ``q`` tokens too, so the padded batch is still uniform;
4. dummy requests read KV length 1 through block_table row 0, and their tokens carry
   slot -1 (they never write the KV cache).

A plan that would break one of these is a :class:`~ascend_graph.errors.PaddingError`
with ``expected`` and ``got``, raised when the plan is made, before any capture.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import sympy
import torch

from ..capture.shapes import ShapeInfo
from ..errors import PaddingError

__all__ = [
    "PadPlan",
    "plan_padding",
    "pad_into",
    "slice_output",
    "role_for",
    "PAD_VALUE",
    "DEFAULT_ROLES_BY_NAME",
    "FIA_MAX_QUERY_LEN",
    "FiaPlan",
    "FiaSpec",
    "plan_fia",
    "fia_specs",
    "fia_pad_metadata",
    "fia_pad_lengths",
    "DrafterPlan",
    "plan_drafter_batch",
    "drafter_token_mask",
    "drafter_sample_indices",
    "mask_rejected_slots",
]

PAD_VALUE: dict[str, Any] = {"zero": 0, "index": 0, "slot": -1, "kv_len": 1, "mask": False}

#: FIA in TND takes at most this many query tokens per request on the paged decode path
#: (vllm-ascend asserts ``1 + num_speculative_tokens <= 16`` in its metadata builder)
FIA_MAX_QUERY_LEN = 16

#: roles picked by input name when the user declared none (vLLM's and HF's names)
DEFAULT_ROLES_BY_NAME: dict[str, str] = {
    "slot_mapping": "slot",
    "slot_mappings": "slot",
    "cache_position": "index",
    "positions": "index",
    "position_ids": "index",
    "block_table": "index",
    "block_tables": "index",
    "seq_lens": "kv_len",
    "kv_lens": "kv_len",
    "context_lens": "kv_len",
    "query_start_loc": "cu_len",
    "cu_seqlens": "cu_len",
    "cu_seqlens_q": "cu_len",
    "is_padding": "mask",
    "active_mask": "mask",
}


def role_for(name: str, declared: Mapping[str, str]) -> str:
    if name in declared:
        return declared[name]
    return DEFAULT_ROLES_BY_NAME.get(name, "zero")


# --------------------------------------------------------------------------- FIA plan


@dataclass(frozen=True)
class FiaPlan:
    """The FIA metadata layout of one padded batch: host ints only, hashable.

    ``dummy_query_lens[i]`` is the query length of dummy request ``num_reqs + i``; the
    padded ``query_start_loc`` is the real one followed by :attr:`cu_tail`.
    """

    num_tokens: int
    padded_tokens: int
    num_reqs: int
    padded_reqs: int
    dummy_query_lens: tuple[int, ...]
    uniform_query_len: int | None = None
    max_query_len: int = FIA_MAX_QUERY_LEN

    @property
    def num_dummies(self) -> int:
        return self.padded_reqs - self.num_reqs

    @property
    def cu_tail(self) -> tuple[int, ...]:
        """``query_start_loc[num_reqs + 1:]`` of the padded batch."""
        out, acc = [], self.num_tokens
        for n in self.dummy_query_lens:
            acc += n
            out.append(acc)
        return tuple(out)

    def query_start_loc(self, real: Sequence[int]) -> list[int]:
        """The padded ``query_start_loc`` for a real one (host lists; tests and debug checks)."""
        real = [int(x) for x in real]
        if len(real) != self.num_reqs + 1 or real[-1] != self.num_tokens:
            raise PaddingError(
                "the real query_start_loc does not match the plan",
                expected=f"{self.num_reqs + 1} entries ending at {self.num_tokens} tokens",
                got=f"{len(real)} entries ending at {real[-1] if real else None}",
            )
        lens = [b - a for a, b in zip(real, real[1:])]
        q = self.uniform_query_len
        if any(n < 0 for n in lens) or (q is not None and any(n != q for n in lens)):
            raise PaddingError(
                "the real query lengths do not fit the plan",
                expected=f"every request exactly {q} tokens" if q is not None else "non-decreasing query_start_loc",
                got=lens,
            )
        return real + list(self.cu_tail)

    def check(self) -> None:
        """Every FIA invariant of the module docstring; PaddingError (expected/got) if one fails."""
        if self.num_reqs < 0 or self.num_tokens < 0:
            raise PaddingError("negative batch sizes", expected="tokens >= 0 and requests >= 0", got=(self.num_tokens, self.num_reqs))
        if self.padded_tokens < self.num_tokens or self.padded_reqs < self.num_reqs:
            raise PaddingError(
                "a padded batch smaller than the real one",
                expected=f">= {self.num_tokens} tokens and >= {self.num_reqs} requests",
                got=f"{self.padded_tokens} tokens, {self.padded_reqs} requests",
            )
        if len(self.dummy_query_lens) != self.num_dummies:
            raise PaddingError("one query length per dummy request", expected=self.num_dummies, got=len(self.dummy_query_lens))
        last = self.num_tokens + sum(self.dummy_query_lens)
        if last != self.padded_tokens:
            raise PaddingError(
                "FIA needs the padded token count to equal query_start_loc[-1] (error 561002)",
                expected=f"query_start_loc[-1] == {self.padded_tokens}",
                got=last,
                hint="the padded tokens must all belong to dummy requests",
            )
        if any(n < 0 or n > self.max_query_len for n in self.dummy_query_lens):
            raise PaddingError(
                f"a dummy request above FIA's {self.max_query_len} query tokens",
                expected=f"every dummy in [0, {self.max_query_len}]",
                got=list(self.dummy_query_lens),
            )
        if self.uniform_query_len is not None:
            q = self.uniform_query_len
            if self.num_tokens != q * self.num_reqs or any(n != q for n in self.dummy_query_lens):
                raise PaddingError(
                    f"a uniform decode batch keeps every request at exactly {q} tokens",
                    expected=f"{q} tokens per request, dummies included",
                    got=f"{self.num_tokens} real tokens in {self.num_reqs} requests, dummies {list(self.dummy_query_lens)}",
                )
        elif self.dummy_query_lens and max(self.dummy_query_lens) - min(self.dummy_query_lens) > 1:
            raise PaddingError("the tail is spread evenly over the dummies", expected="dummy sizes within one of each other", got=list(self.dummy_query_lens))


def plan_fia(
    num_tokens: int,
    num_reqs: int,
    padded_tokens: int,
    padded_reqs: int,
    *,
    uniform_query_len: int | None = None,
    max_query_len: int = FIA_MAX_QUERY_LEN,
) -> FiaPlan:
    """Lay out the padded tokens of a batch as dummy requests; checks every FIA rule.

    ``uniform_query_len=q``: a uniform decode batch (``num_tokens == q*num_reqs``, and so
    for the padded sizes); every dummy holds ``q`` tokens. Otherwise (mixed batches) the
    ``padded_tokens - num_tokens`` tail is spread evenly over ``padded_reqs - num_reqs``
    dummies, at most ``max_query_len`` each.
    """
    tail, dummies = padded_tokens - num_tokens, padded_reqs - num_reqs
    if tail < 0 or dummies < 0:
        raise PaddingError(
            "a padded batch smaller than the real one",
            expected=f">= {num_tokens} tokens and >= {num_reqs} requests",
            got=f"{padded_tokens} tokens, {padded_reqs} requests",
        )
    if uniform_query_len is not None:
        q = uniform_query_len
        if q < 1 or q > max_query_len:
            raise PaddingError(
                f"FIA's paged decode path takes at most {max_query_len} query tokens per request",
                expected=f"1 <= 1 + num_speculative_tokens <= {max_query_len}",
                got=q,
            )
        if num_tokens != q * num_reqs or padded_tokens != q * padded_reqs:
            raise PaddingError(
                f"a uniform decode batch has exactly {q} tokens per request",
                expected=f"tokens == {q} * requests (real and padded)",
                got=f"{num_tokens} tokens / {num_reqs} requests, padded {padded_tokens} / {padded_reqs}",
            )
        lens = (q,) * dummies
    else:
        if tail and not dummies:
            raise PaddingError(
                f"{tail} padded tokens but no dummy request to hold them: FIA needs tokens == query_start_loc[-1]",
                expected="a request dim that pads with the batch (query_start_loc of [batch + 1])",
                got=f"{num_reqs} request slots for {num_reqs} requests",
                hint="make the request count a function of the batch symbol (torch._check), or declare a role other than "
                "'cu_len' (pad_roles) for a query_start_loc that does not feed FIA",
            )
        if tail > dummies * max_query_len:
            raise PaddingError(
                f"{tail} padded tokens over {dummies} dummy requests puts more than {max_query_len} in one",
                expected=f"<= {dummies * max_query_len} padded tokens ({max_query_len} per dummy request)",
                got=tail,
                hint="add request slots (a larger request bucket) or smaller token buckets",
            )
        base, extra = divmod(tail, dummies) if dummies else (0, 0)
        lens = tuple(base + (i < extra) for i in range(dummies))
    plan = FiaPlan(num_tokens, padded_tokens, num_reqs, padded_reqs, lens, uniform_query_len, max_query_len)
    plan.check()
    return plan


@dataclass(frozen=True)
class FiaSpec:
    """Where a graph's FIA metadata sits, symbolically: which input is ``query_start_loc``,
    the token count and the request count as sympy expressions of the graph's symbols."""

    cu_input: int
    tokens: sympy.Expr
    requests: sympy.Expr
    uniform_query_len: int | None


def fia_specs(shapes: ShapeInfo, roles: Mapping[int, str], tokens: sympy.Expr) -> tuple[FiaSpec, ...]:
    """One spec per ``cu_len`` input: requests = its dim 0 minus one; uniform when the
    token count is a constant multiple ``q`` of the request count (``q*s`` tokens for
    ``s`` requests: a decode or MTP verify batch)."""
    out = []
    for i, role in sorted(roles.items()):
        v = shapes.inputs[i]
        if role != "cu_len" or v.kind != "tensor":
            continue
        if len(v.dims) != 1:
            raise PaddingError(f"a cu_len input ({v.name!r}) must be 1-D", expected="shape [num_requests + 1]", got=[str(d) for d in v.dims])
        requests = v.dims[0] - 1
        ratio = sympy.simplify(tokens / requests) if requests != 0 else None
        q = int(ratio) if ratio is not None and ratio.is_Integer and ratio > 0 else None
        out.append(FiaSpec(i, tokens, requests, q))
    return tuple(out)


# --------------------------------------------------------------------------- batch to bucket


@dataclass(frozen=True)
class PadPlan:
    """Shapes of one call at one bucket: real and padded, per input and per output."""

    bucket: int
    real_batch: int
    values: Mapping[sympy.Symbol, int]  # real values of every symbol
    padded_values: Mapping[sympy.Symbol, int]  # the same with the batch symbol at the bucket
    input_shapes: tuple[tuple[int, ...] | None, ...]  # padded shape per input (None: not a tensor)
    output_slices: tuple[tuple[tuple[int, int], ...] | None, ...]  # per output: (dim, real length) to narrow
    fia: Mapping[int, FiaPlan] = field(default_factory=dict)  # cu_len input index -> its FIA plan


def plan_padding(shapes: ShapeInfo, values: Mapping[sympy.Symbol, int], bucket: int, fia: Sequence[FiaSpec] = ()) -> PadPlan:
    """Padded shapes for every input, the slices that undo padding on every output, and
    the FIA plan of each ``fia`` spec (checked here: before any capture)."""
    batch = shapes.batch_symbol
    if batch is None:
        raise PaddingError("this graph has no batch symbol", expected="a graph with a symbolic batch dim", got="a static graph")
    real = int(values[batch])
    if bucket < real:
        raise PaddingError("bucket smaller than the batch", expected=f"a bucket >= {real}", got=bucket)
    padded = dict(values)
    padded[batch] = bucket
    in_shapes: list[tuple[int, ...] | None] = []
    for v in shapes.inputs:
        if v.kind not in ("tensor", "param"):
            in_shapes.append(None)
            continue
        target = shapes.evaluate(v, padded)
        actual = shapes.evaluate(v, values)
        for d, (t, a) in enumerate(zip(target, actual)):
            if t < a or (t != a and batch not in v.dims[d].free_symbols):
                raise PaddingError(
                    f"input {v.name!r} dim {d} would shrink or change without depending on the batch",
                    expected=f"{v.dims[d]} at batch {bucket} >= its real size {a}",
                    got=t,
                )
        in_shapes.append(target)
    out_slices: list[tuple[tuple[int, int], ...] | None] = []
    for o in shapes.outputs:
        if o.kind != "tensor":
            out_slices.append(None)
            continue
        cuts = []
        for d, expr in enumerate(o.dims):
            if batch in expr.free_symbols:
                cuts.append((d, int(expr.subs(values))))
        out_slices.append(tuple(cuts))
    fia_plans = {}
    for spec in fia:
        fia_plans[spec.cu_input] = plan_fia(
            int(spec.tokens.subs(values)),
            int(spec.requests.subs(values)),
            int(spec.tokens.subs(padded)),
            int(spec.requests.subs(padded)),
            uniform_query_len=spec.uniform_query_len,
        )
    return PadPlan(bucket, real, dict(values), padded, tuple(in_shapes), tuple(out_slices), fia_plans)


def pad_into(dst: torch.Tensor, src: torch.Tensor, role: str, cu_tail: torch.Tensor | None = None) -> None:
    """Copy ``src`` into the leading corner of ``dst`` and fill the rest by ``role``.

    ``dst`` has the padded shape, ``src`` the real one (same rank, every dim <= dst's).
    A padded ``cu_len`` input takes its tail from its FIA plan: ``cu_tail`` is
    :attr:`FiaPlan.cu_tail` as a tensor on ``dst``'s device (made once per plan), so
    this is device copies only, never a host synchronisation.
    """
    if dst.dim() != src.dim() or any(s > d for s, d in zip(src.shape, dst.shape)):
        raise PaddingError("cannot pad into a smaller or differently ranked buffer", expected=f"a buffer covering {tuple(src.shape)}", got=tuple(dst.shape))
    # A broadcast (stride-0) dim of the traced layout holds one value: write that one.
    for d, st in enumerate(dst.stride()):
        if st == 0 and dst.shape[d] > 1:
            dst = dst.narrow(d, 0, 1)
            src = src.narrow(d, 0, 1)
    if tuple(dst.shape) == tuple(src.shape):
        dst.copy_(src)
        return
    if role == "cu_len":
        _pad_cumulative(dst, src, cu_tail)
        return
    region = dst
    for d, n in enumerate(src.shape):
        region = region.narrow(d, 0, n)
    dst.fill_(PAD_VALUE.get(role, 0))
    region.copy_(src)


def _pad_cumulative(dst: torch.Tensor, src: torch.Tensor, cu_tail: torch.Tensor | None) -> None:
    """query_start_loc [R+1] -> [R_pad+1]: the real prefix, then the FIA plan's dummies."""
    if src.dim() != 1:
        raise PaddingError("a cu_len input must be 1-D", expected="shape [num_requests + 1]", got=tuple(src.shape))
    n, extra = src.shape[0], dst.shape[0] - src.shape[0]
    if cu_tail is None or cu_tail.shape[0] != extra:
        raise PaddingError(
            "a padded query_start_loc needs its FIA plan's tail (plan_fia)",
            expected=f"a tail of {extra} entries",
            got=None if cu_tail is None else cu_tail.shape[0],
        )
    dst[:n].copy_(src)
    dst[n:].copy_(cu_tail)


def slice_output(out: Any, cuts: Sequence[tuple[int, int]] | None) -> Any:
    if not cuts or not isinstance(out, torch.Tensor):
        return out
    for d, n in cuts:
        out = out.narrow(d, 0, n)
    return out


# --------------------------------------------------------------------------- in-graph FIA padding


def fia_pad_metadata(cu_seqlens_q: torch.Tensor, seq_lens_kv: torch.Tensor, num_tokens: int | torch.SymInt) -> tuple[torch.Tensor, torch.Tensor]:
    """The FIA rule on device: padded tokens go to the trailing empty requests.

    For metadata padded by someone else (vLLM's ``query_start_loc`` tail repeats its last
    value; a ``cumsum`` of zero-padded query lengths does the same): requests ``r`` with
    ``cu[r] == cu[-1]`` are dummies; the ``num_tokens - cu[-1]`` padded tokens are spread
    over them evenly (sizes within one of each other, as :func:`plan_fia` does), and
    their KV lengths are raised to at least 1. Metadata that already satisfies the rule
    (the runner's, planned by :func:`plan_fia`) comes back unchanged. Device ops only:
    no ``.item()``, so it traces into a graph and replays without host synchronisation.
    Tokens past ``cu[-1]`` with no empty request to hold them stay outside every request
    (FIA rejects that batch; the runtime's plan refuses it before capture).
    """
    cu = cu_seqlens_q
    last = cu[-1:]
    tail = num_tokens - last  # [1]
    empty = cu[:-1] == last  # [R]: trailing requests without tokens
    count = empty.sum(dtype=cu.dtype).clamp_min(1)
    rank = torch.cumsum(empty, 0, dtype=cu.dtype) - 1  # position among the empty requests
    base = torch.div(tail, count, rounding_mode="floor")
    extra = tail - base * count
    add = torch.where(empty, base + (rank < extra).to(cu.dtype), torch.zeros_like(rank))
    new_cu = torch.cat([cu[:1], cu[1:] + torch.cumsum(add, 0, dtype=cu.dtype)])
    new_lens = torch.where(empty, seq_lens_kv.clamp_min(1), seq_lens_kv)
    return new_cu, new_lens


def fia_pad_lengths(query_ends: Sequence[int], kv_lens: Sequence[int], num_tokens: int) -> tuple[list[int], list[int]]:
    """:func:`fia_pad_metadata` on FIA's host arrays: ``actual_seq_qlen`` (``cu[1:]``) and
    ``actual_seq_kvlen`` of a batch run at ``num_tokens`` query tokens.

    The trailing requests that end where the batch ends (``cu[r] == cu[-1]``) are the
    dummies; :func:`plan_fia` lays the ``num_tokens - cu[-1]`` padded tokens over them
    (evenly, at most 16 each) and their KV lengths are raised to 1. Metadata that already
    holds comes back equal. A batch the rule cannot repair (more padded tokens than the
    dummies can hold, or ``cu[-1] > num_tokens``) is the plan's :class:`PaddingError`.
    """
    ends = [int(x) for x in query_ends]
    kv = [int(x) for x in kv_lens]
    if len(ends) != len(kv):
        raise PaddingError("one query end per KV length", expected=len(kv), got=len(ends))
    starts = [0] + ends[:-1]
    last = ends[-1] if ends else 0
    dummies = 0
    while dummies < len(starts) and starts[len(starts) - 1 - dummies] == last:
        dummies += 1
    real = len(ends) - dummies
    plan = plan_fia(last, real, int(num_tokens), len(ends))
    return ends[:real] + list(plan.cu_tail), kv[:real] + [max(n, 1) for n in kv[real:]]


# --------------------------------------------------------------------------- MTP drafter batch


@dataclass(frozen=True)
class DrafterPlan:
    """A padded MTP drafter batch: ``num_reqs`` requests of exactly ``query_len = 1+k``
    tokens each, padded to ``bucket_tokens`` (a multiple of ``query_len``)."""

    num_reqs: int
    query_len: int
    bucket_tokens: int
    fia: FiaPlan

    @property
    def num_tokens(self) -> int:
        return self.num_reqs * self.query_len

    @property
    def padded_reqs(self) -> int:
        return self.bucket_tokens // self.query_len


def plan_drafter_batch(num_reqs: int, num_speculative_tokens: int, buckets: Sequence[int]) -> DrafterPlan | None:
    """The drafter batch of ``num_reqs`` requests at the smallest token bucket that holds
    it (None above the largest). Buckets must be multiples of ``1+k`` (``plan_buckets``
    with ``num_speculative_tokens=k`` makes them so): a drafter batch stays uniform."""
    q = 1 + num_speculative_tokens
    bad = [b for b in buckets if b % q]
    if bad:
        raise PaddingError(f"drafter buckets must be multiples of 1+k = {q}", expected=f"multiples of {q}", got=bad, hint="plan_buckets(..., num_speculative_tokens=k) rounds them")
    fits = sorted(b for b in buckets if b >= num_reqs * q)
    if not fits:
        return None
    bucket = fits[0]
    fia = plan_fia(num_reqs * q, num_reqs, bucket, bucket // q, uniform_query_len=q)
    return DrafterPlan(num_reqs, q, bucket, fia)


def drafter_token_mask(num_valid: torch.Tensor, query_len: int) -> torch.Tensor:
    """``[R*q]`` bool: token ``j`` of request ``r`` is real iff ``j < num_valid[r]``.

    ``num_valid[r]`` is the verify step's accepted tokens plus one (vLLM's
    ``valid_sampled_tokens_count``); rejected tokens and dummy requests (``num_valid``
    padded with 0) are masked. Device ops only.
    """
    j = torch.arange(query_len, device=num_valid.device)
    return (j[None, :] < num_valid[:, None]).reshape(-1)


def drafter_sample_indices(num_valid: torch.Tensor, query_len: int) -> torch.Tensor:
    """``[R]``: the token each request drafts from, its last valid one (vLLM's
    ``token_indices_to_sample``); a dummy request (0 valid) points at its first token."""
    r = torch.arange(num_valid.shape[0], device=num_valid.device)
    return r * query_len + (num_valid.long() - 1).clamp_min(0)


def mask_rejected_slots(slot_mapping: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Rejected and padded tokens get slot -1: they never write the drafter's KV cache."""
    return torch.where(token_mask, slot_mapping, torch.full_like(slot_mapping, -1))
