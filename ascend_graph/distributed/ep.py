"""Expert parallelism off the NPU: ``moe_dispatch_ffn_combine`` across ranks on torch.distributed.

Entry point: :func:`ep_dispatch_ffn_combine`, which ``ops/moe.py`` calls when the op gets
``ep_world_size > 1`` on a device without the MC2 kernels (CPU with gloo, CUDA with
NCCL). :func:`shard_experts` and :func:`shard_experts_graph` cut a model's (or a fused
graph's) stacked expert weights into one rank's share.

Contract (the MC2 binding's, ``ops/kernels/npu/moe.py``): every rank of the group
``ep_group`` (a c10d group name, resolved through ``groups.resolve``) calls the op with
its own tokens ``x [T, H]``, global ``topk_ids [T, k]`` in ``[0, E)``, and its local experts
``w13 [E/ep, 2I, H]``, ``w2 [E/ep, H, I]``: rank ``r`` owns experts ``[r*E/ep, (r+1)*E/ep)``.
Each rank's output equals the single-device op over all ``E`` experts for its tokens. Ids
outside ``[0, E)`` and tokens with ``active_mask`` False do no expert work and move no data.
Shared experts are replicated: every rank runs them on its own tokens.

Steps of one call (each rank ``p``; ``ep`` ranks):

1. route: the (token, rank) pairs, one per token and destination rank that owns at least
   one of its ``k`` experts (a token is sent once to a rank however many of its experts
   live there, so a rank's partial sum over its local experts comes back as one row);
2. header exchange, ``all_to_all_single`` of a small int64 ``[ep, 8]`` tensor: the rows
   ``p`` sends each rank plus ``p``'s sizes (local experts, hidden, top-k, world size and
   rank it was given, dtype). Every rank then holds every rank's sizes, so all ranks reach
   the same verdict on a mismatch and raise together instead of one rank waiting forever
   in the next collective;
3. dispatch, one ``all_to_all_single`` of the token rows packed (as bytes) with their
   per-slot routing weights and local expert ids (``-1`` for slots owned elsewhere), with
   the exchanged counts as split sizes;
4. the local experts: the single-device op itself (``ep_world_size=1``: the CPU reference
   or the CUDA kernels), ``k`` slots a row, weighted by the routing weights;
5. combine, the reverse ``all_to_all_single`` of the partial sums, then an ``index_add``
   in float32 into ``out [T, H]`` (plus the shared experts), cast to ``x.dtype`` once.

Graph capture (CUDA graphs): steps 2-3 above use the counts as *host* split sizes, so the
exact path reads them back (a host sync) and its buffer sizes depend on the routing: it
cannot sit in a captured graph. While the current stream is capturing, the op takes the
static path instead (or when asked with ``static_shapes=True``): every rank sends every
rank a fixed ``T`` rows (capacity = all of its tokens, the most one rank can receive from
it under the one-row-per-(token, rank) rule), with ``-1`` ids on the slots a rank does not
own; equal splits need no split sizes, no header (the eager warm-up run before capture
already checked the sizes) and no host read, and the local experts skip ``-1`` rows. The
static path moves as many bytes as gathering every token to every rank, and needs one
token count on every rank (the runtime pads each rank to its bucket; the header checks it
whenever a host read is allowed); its saving over the gather is the expert work only.

Whether a c10d ``ProcessGroupNCCL`` collective replays safely inside a CUDA graph depends
on torch and NCCL (NCCL >= 2.9.6 captures collectives; vLLM and sglang capture raw NCCL
through their own communicators; sglang PR 33775 reports that c10d's per-call host
bookkeeping advances at capture and not on replay, so ranks can disagree on later calls).
``tests/distributed/test_ep_cuda.py`` captures and replays the static path over a one-rank
NCCL group; two or more GPUs have not been lent to this project, so a multi-rank capture
has not run.

Why the static path under graphs, and no split at the op (the design, #21): graphs are
captured for the small buckets, where a step is latency-bound and the static path's
extra bytes (those of an all-gather) cost little, while its saving (expert work on owned
slots only) stays; batches above the largest bucket run eagerly and take the exact path
by themselves. A split would instead run the exact path eagerly between captured pieces,
with a host read of the counts in every MoE layer of every step (the synchronisation
graphs exist to remove), and would need a piecewise runner this package does not have
(the runtime captures one graph per bucket; there is no ``capture/split.py``). Under
vLLM, whose piecewise backend splits at its attention-type ops (``splitting_ops``), the same holds.
Precondition, owned by whoever picks the bucket: every rank of the EP group replays the
same bucket in the same step. vLLM ensures it (``coordinate_batch_across_dp`` pads the
data-parallel ranks to one token count when CUDA graphs are on). Nothing here can check
it at replay (a replay reads nothing on the host), and the runner's eager run before a
capture takes the exact path, which needs no equal counts; the header's ``tokens`` check
fires on every rank only when the static path runs outside capture
(``static_shapes=True``: ``tests/distributed/test_ep_graphs.py``). So this package's own
bucketed runner, which picks each rank's bucket from that rank's batch alone, must be
given equal batches on the EP ranks (pad them as vLLM does) or run with ``graphs=False``;
agreeing on the bucket across the EP group inside the runner is left open (#21).
Should a multi-GPU run show c10d collectives unsafe to replay, the first fix to try is
the communicator (a raw NCCL one, as vLLM and sglang capture), before a split.

Errors: bad sizes on any rank raise :class:`DistributedError` on every rank (step 2); a
collective that fails (a dead peer, the group's timeout) is re-raised as
:class:`DistributedError` naming the step, within the group's timeout (set it with
``groups.acquire(..., timeout=timedelta(...))``).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.distributed as dist

from ..errors import UnsupportedError
from ..ops.moe import moe_dispatch_ffn_combine as _experts_op
from ..ops.moe import shared_experts_reference
from .groups import DistributedError, resolve

__all__ = ["ep_dispatch_ffn_combine", "route", "shard_experts", "shard_experts_graph", "DistributedError"]

log = logging.getLogger("ascend_graph.distributed.ep")

#: header fields (int64, one row per destination rank): rows to you, local experts, hidden,
#: top-k, ep_world_size given, ep_rank given, dtype (index in _DTYPES), tokens
_HEADER_FIELDS = ("rows", "local_experts", "hidden", "top_k", "ep_world_size", "ep_rank", "dtype", "tokens")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def shard_experts(w13: torch.Tensor, w2: torch.Tensor, ep_world_size: int, ep_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``ep_rank``'s experts of the stacked ``w13 [E, 2I, H]`` and ``w2 [E, H, I]`` (views)."""
    e = w13.shape[0]
    if ep_world_size < 1 or e % ep_world_size or not 0 <= ep_rank < ep_world_size:
        raise UnsupportedError(
            "experts cannot be split evenly over the expert-parallel ranks",
            expected=f"a number of experts divisible by ep_world_size and 0 <= ep_rank < ep_world_size",
            got=f"{e} experts, ep_world_size={ep_world_size}, ep_rank={ep_rank}",
            hint="choose an EP size that divides the expert count",
        )
    n = e // ep_world_size
    return w13[ep_rank * n : (ep_rank + 1) * n], w2[ep_rank * n : (ep_rank + 1) * n]


def route(topk_ids: torch.Tensor, local_experts: int, ep_world_size: int, active_mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dest [T, k], hit [T, ep])``: the owning rank of each slot (``ep`` for none) and
    whether a token has at least one expert on each rank. Pure; device-side."""
    ids = topk_ids.long()
    valid = (ids >= 0) & (ids < local_experts * ep_world_size)
    if active_mask is not None:
        valid = valid & active_mask.bool().unsqueeze(1)
    dest = torch.where(valid, ids.div(local_experts, rounding_mode="floor"), ep_world_size)
    hit = torch.zeros(ids.shape[0], ep_world_size + 1, dtype=torch.bool, device=ids.device).scatter_(1, dest, True)[:, :ep_world_size]
    return dest, hit


def _local_slots(ids: torch.Tensor, dest: torch.Tensor, rank_of_row: torch.Tensor, local_experts: int) -> torch.Tensor:
    # slot j of a row bound for rank r: its local expert id there, or -1 (owned elsewhere)
    r = rank_of_row.unsqueeze(1)
    return torch.where(dest == r, ids.long() - r * local_experts, -1)


def _pack(x: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    # token rows and their float32 routing side by side as bytes: one all-to-all instead
    # of two (at decode sizes a collective's latency, not its bytes, is the cost)
    return torch.cat([x.contiguous().view(torch.uint8), meta.contiguous().view(torch.uint8)], dim=1)


def _unpack(buf: torch.Tensor, dtype: torch.dtype, h: int) -> tuple[torch.Tensor, torch.Tensor]:
    nx = h * torch.empty((), dtype=dtype).element_size()
    return buf[:, :nx].contiguous().view(dtype), buf[:, nx:].contiguous().view(torch.float32)


def _collective(step: str, pg, fn, *args, **kwargs):
    try:
        return fn(*args, group=pg, **kwargs)
    except DistributedError:
        raise
    except RuntimeError as e:  # DistBackendError included: a dead peer, a timeout
        raise DistributedError(
            f"expert-parallel {step} failed on rank {dist.get_rank()}",
            expected=f"every rank of the group ({dist.get_world_size(pg)} ranks) in the same MoE call",
            got=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
            hint="a peer rank died, raised before the collective, or is stuck; the group's timeout bounds the wait",
        ) from e


def _check_headers(hdr: list[list[int]], group_size: int, same_tokens: bool) -> None:
    sizes = [row[1:4] + [row[6]] for row in hdr]
    worlds = [row[4] for row in hdr]
    ranks = [row[5] for row in hdr]
    if any(w != group_size for w in worlds):
        raise DistributedError("ranks disagree on the expert-parallel world size", expected=f"ep_world_size={group_size} (the group's size) on every rank", got=f"ep_world_size per rank: {worlds}")
    if ranks != list(range(group_size)):
        raise DistributedError("ep_rank must be each rank's rank in ep_group", expected=list(range(group_size)), got=f"ep_rank per group rank: {ranks}")
    local = [s[0] for s in sizes]
    if len(set(local)) != 1:
        raise DistributedError(
            "ranks hold different numbers of local experts (the experts are not split evenly over the EP ranks)",
            expected="the same E/ep local experts on every rank (E divisible by ep_world_size)",
            got=f"local experts per rank: {local}",
        )
    tokens = [row[7] for row in hdr]
    if same_tokens and len(set(tokens)) != 1:
        raise DistributedError(
            "the static (capturable) expert-parallel path needs the same token count on every rank",
            expected="every rank padded to one bucket size",
            got=f"tokens per rank: {tokens}",
            hint="pad each rank's batch to the bucket (the runtime does), or use the exact path",
        )
    if len({tuple(s) for s in sizes}) != 1:
        names = ("local experts", "hidden", "top_k", "dtype")
        raise DistributedError("ranks disagree on the MoE layer's sizes", expected=f"one {names} on every rank", got=f"per rank: {[dict(zip(names, s)) for s in sizes]}")


def ep_dispatch_ffn_combine(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    activation: str = "silu",
    active_mask: Optional[torch.Tensor] = None,
    shared_gate: Optional[torch.Tensor] = None,
    shared_up: Optional[torch.Tensor] = None,
    shared_down: Optional[torch.Tensor] = None,
    ep_group: str = "",
    ep_world_size: int = 1,
    ep_rank: int = 0,
    shared_expert_gate: Optional[torch.Tensor] = None,
    static_shapes: Optional[bool] = None,
) -> torch.Tensor:
    """``moe_dispatch_ffn_combine`` over the ranks of ``ep_group``; see the module docstring.

    ``static_shapes`` None picks the static (capturable) path only while a CUDA stream is
    capturing; True or False forces a path (tests, benchmarks).
    """
    pg = resolve(ep_group)
    group_size = dist.get_world_size(pg)
    capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
    if static_shapes is None:
        static_shapes = capturing
    t, h = x.shape
    k = topk_ids.shape[1]
    el = w13.shape[0]
    # sizes are validated against the group, not the arguments, so a wrong argument still
    # takes part in the header exchange and every rank raises (step 2), none hangs
    ep = group_size
    dest, hit = route(topk_ids, el, ep, active_mask)
    if not capturing:
        # step 2; on the static path too when a host read is allowed, since its equal splits
        # need the same token count on every rank (gloo aborts the process otherwise)
        send_counts = hit.sum(0)
        dtype_code = _DTYPES.index(x.dtype) if x.dtype in _DTYPES else 99
        hdr = torch.tensor([0, el, h, k, ep_world_size, ep_rank, dtype_code, t], dtype=torch.int64, device=x.device).repeat(ep, 1)  # _HEADER_FIELDS
        hdr[:, 0] = send_counts
        recv_hdr = torch.empty_like(hdr)
        _collective("header exchange", pg, dist.all_to_all_single, recv_hdr, hdr)
        rows = recv_hdr.tolist()  # the host sync that keeps the exact path out of captured graphs
        _check_headers(rows, group_size, same_tokens=static_shapes)
    if static_shapes:
        if ep_world_size != group_size:
            raise DistributedError("ep_world_size is not the size of ep_group", expected=group_size, got=ep_world_size)
        rank_of_row = torch.arange(ep, device=x.device).repeat_interleave(t)
        send_x = x.repeat(ep, 1)
        ids = _local_slots(topk_ids.repeat(ep, 1), dest.repeat(ep, 1), rank_of_row, el)
        meta = torch.cat([torch.where(ids >= 0, topk_weights.repeat(ep, 1).float(), 0.0), ids.float()], dim=1)
        send = _pack(send_x, meta)
        recv = torch.empty_like(send)
        _collective("dispatch", pg, dist.all_to_all_single, recv, send)
        recv_x, recv_meta = _unpack(recv, x.dtype, h)
        y = _experts_op(recv_x, recv_meta[:, :k].to(topk_weights.dtype), recv_meta[:, k:].long(), w13, w2, activation)
        back = torch.empty_like(y)
        _collective("combine", pg, dist.all_to_all_single, back, y)
        out = back.view(ep, t, h).float().sum(0)
    else:
        if capturing:
            raise DistributedError("the exact expert-parallel path reads counts on the host and cannot be captured", expected="static_shapes=True or None while capturing", got="static_shapes=False")
        rank_of_row, token_of_row = hit.t().nonzero(as_tuple=True)  # grouped by rank, then token
        send_split = send_counts.tolist()
        recv_split = [r[0] for r in rows]
        ids = _local_slots(topk_ids[token_of_row], dest[token_of_row], rank_of_row, el)
        meta = torch.cat([torch.where(ids >= 0, topk_weights[token_of_row].float(), 0.0), ids.float()], dim=1)
        send = _pack(x[token_of_row], meta)
        recv = send.new_empty(sum(recv_split), send.shape[1])
        _collective("dispatch", pg, dist.all_to_all_single, recv, send, recv_split, send_split)
        recv_x, recv_meta = _unpack(recv, x.dtype, h)
        if recv_x.shape[0]:
            y = _experts_op(recv_x, recv_meta[:, :k].to(topk_weights.dtype), recv_meta[:, k:].long(), w13, w2, activation)
        else:
            y = recv_x
        back = x.new_empty(send.shape[0], h)
        _collective("combine", pg, dist.all_to_all_single, back, y.contiguous(), send_split, recv_split)
        out = torch.zeros(t, h, dtype=torch.float32, device=x.device).index_add_(0, token_of_row, back.float())
    if shared_gate is not None:
        out = out + shared_experts_reference(x, shared_gate, shared_up, shared_down, activation, shared_expert_gate).float()
    return out.to(x.dtype)


def _schema_kwargs(node: torch.fx.Node) -> dict:
    schema = node.target._schema
    kwargs = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            kwargs[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            kwargs[arg.name] = node.kwargs[arg.name]
        else:
            kwargs[arg.name] = arg.default_value
    return kwargs


def _experts_of(gm: torch.fx.GraphModule, node: torch.fx.Node) -> int:
    val = node.meta.get("val")
    if val is not None:
        return int(val.shape[0])
    if node.op == "get_attr":
        obj = gm
        for part in node.target.split("."):
            obj = getattr(obj, part)
        return int(obj.shape[0])
    raise UnsupportedError("cannot tell the expert count of a weight node", expected="node.meta['val'] or a get_attr", got=node.format_node())


def shard_experts_graph(gm: torch.fx.GraphModule, ep_group: str, ep_world_size: int, ep_rank: int) -> int:
    """Make every single-device ``moe_dispatch_ffn_combine`` of a fused graph expert-parallel.

    Each such node gets this rank's slice of its stacked weights (``aten.slice`` views along
    the expert dim, so nothing is copied) and ``ep_group`` / ``ep_world_size`` /
    ``ep_rank``. Returns the number of nodes rewritten. Raises :class:`UnsupportedError`
    when a layer's experts do not divide by ``ep_world_size``. A real deployment loads
    only the local shard; this is how a fused graph of a whole model is run sharded.
    """
    target = torch.ops.ascend_graph.moe_dispatch_ffn_combine.default
    done = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not target:
            continue
        kw = _schema_kwargs(node)
        if kw["ep_world_size"] != 1:
            continue
        e = _experts_of(gm, kw["w13"])
        if e % ep_world_size:
            raise UnsupportedError(
                "experts cannot be split evenly over the expert-parallel ranks",
                expected=f"a number of experts divisible by ep_world_size={ep_world_size}",
                got=f"{e} experts in {node.name}",
                hint="choose an EP size that divides the expert count",
            )
        n = e // ep_world_size
        with gm.graph.inserting_before(node):
            for name in ("w13", "w2"):
                kw[name] = gm.graph.call_function(torch.ops.aten.slice.Tensor, (kw[name], 0, ep_rank * n, (ep_rank + 1) * n))
        kw.update(ep_group=ep_group, ep_world_size=ep_world_size, ep_rank=ep_rank)
        node.args, node.kwargs = (), kw
        done += 1
    if done:
        gm.graph.lint()
        gm.recompile()
    return done
