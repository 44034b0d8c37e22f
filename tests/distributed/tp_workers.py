"""Per-rank bodies of the tensor-parallel fusion tests (module-level so spawn can pickle them).

A row-parallel linear's tail as models write it: each rank multiplies its slice of the
input features by its slice of the weight, the partial outputs are summed over the TP
group (torch's functional ``all_reduce`` + ``wait_tensor``, or vLLM's
``torch.ops.vllm.all_reduce``), and the sum feeds the next layer's residual add + RMSNorm.
Every rank compiles the same function twice (norm_rope family on, then no fusion family)
and returns both outputs, the eager output, the rewrite counts and the post-pass graph
code, which the test process checks.
"""

from __future__ import annotations

import torch

import ascend_graph.ops  # noqa: F401  (registers the ops in the spawned process)

T, H_IN, H = 7, 10, 24  # odd sizes; H_IN is split over the ranks (5 features each on 2)
EPS = 1e-6


def _hf_norm(x, w, eps=EPS):
    # LlamaRMSNorm.forward
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def _vllm_norm(x, w, eps=EPS):
    # vLLM RMSNorm.forward_native (fused_add_rms_norm's native form): the weight after the cast
    h = x.to(torch.float32)
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def _make(reduce: str, name: str, norm, residual_kind: str = "stream"):
    """``fn(x_shard, w_shard, residual, gamma) -> (normed, new_residual)``; ``reduce`` is
    "funcol" or "vllm", ``name`` the group's name."""
    import torch.distributed._functional_collectives as funcol

    def fn(x, w, residual, gamma):
        y = x @ w.t()  # the row-parallel linear's partial output on this rank
        if reduce == "funcol":
            y = funcol.all_reduce(y, "sum", name)
        else:
            y = torch.ops.vllm.all_reduce(y, group_name=name)
        s = residual + y if residual_kind == "stream" else y + residual  # "bias": residual is [H]
        return norm(s, gamma), s

    return fn


def _inputs(rank: int, world: int, dtype, residual_kind: str = "stream"):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(T, H_IN, generator=g).to(dtype)
    w = (torch.randn(H, H_IN, generator=g) * 0.3).to(dtype)
    residual = torch.randn(T, H, generator=g).to(dtype) if residual_kind == "stream" else torch.randn(H, generator=g).to(dtype)
    gamma = (1 + 0.1 * torch.randn(H, generator=g)).to(dtype)
    cols = H_IN // world
    return x[:, rank * cols : (rank + 1) * cols].contiguous(), w[:, rank * cols : (rank + 1) * cols].contiguous(), residual, gamma


def _compile(fn, inputs, families, dump_dir):
    import ascend_graph

    torch._dynamo.reset()
    ascend_graph.reset_stats()
    options = {"codegen": "fx", "fusions": list(families), "graphs": False, "dump_dir": dump_dir, "debug": True}
    compiled = torch.compile(fn, backend="ascend", options=options, dynamic=False, fullgraph=True)
    with torch.no_grad():
        out = compiled(*inputs)
    return out, dict(ascend_graph.stats()["fusions"])


def _case(rank, world, out_dir, reduce, name, norm, dtype, residual_kind="stream"):
    import glob
    import os

    inputs = _inputs(rank, world, dtype, residual_kind)
    fn = _make(reduce, name, norm, residual_kind)
    tag = f"{reduce}-{norm.__name__}-{dtype}-{residual_kind}-rank{rank}"
    dump = os.path.join(out_dir, tag)
    fused, counts = _compile(fn, inputs, ("norm_rope",), dump)
    plain, _ = _compile(fn, inputs, (), os.path.join(out_dir, tag + "-plain"))
    with torch.no_grad():
        eager = fn(*inputs)
        # the single-device reference: the whole linear on one rank, no collective
        g = _inputs(0, 1, dtype, residual_kind)
        full_y = g[0] @ g[1].t()
        s = g[2] + full_y if residual_kind == "stream" else full_y + g[2]
        single = (norm(s, g[3]), s)
    after = "".join(open(p).read() for p in sorted(glob.glob(os.path.join(dump, "*fuse_norm_rope.after.py"))))
    before = "".join(open(p).read() for p in sorted(glob.glob(os.path.join(dump, "*fuse_norm_rope.before.py"))))
    return {"fused": fused, "plain": plain, "eager": eager, "single": single, "counts": counts, "after": after, "before": before}


def tp_add_rms_norm(rank: int, world: int, out_dir: str):
    """torch's functional all_reduce in the HF and vLLM norm forms (bf16 and fp32), and the
    negative case (a broadcast [H] add is not a residual stream)."""
    from ascend_graph.distributed import groups

    pg = groups.acquire()
    res = {"group": pg.group_name}
    for norm in (_hf_norm, _vllm_norm):
        for dtype in (torch.bfloat16, torch.float32):
            res[f"{norm.__name__}-{dtype}"] = _case(rank, world, out_dir, "funcol", pg.group_name, norm, dtype)
    res["bias"] = _case(rank, world, out_dir, "funcol", pg.group_name, _hf_norm, torch.float32, residual_kind="bias")
    groups.release(pg)
    return res


def tp_add_rms_norm_vllm_op(rank: int, world: int, out_dir: str):
    """vLLM's own TP all-reduce op (``torch.ops.vllm.all_reduce``) over a real vLLM
    ``GroupCoordinator`` on gloo (its CPU communicator), in vLLM's norm form."""
    from vllm.distributed import parallel_state as ps

    coord = ps.GroupCoordinator(group_ranks=[list(range(world))], local_rank=rank, torch_distributed_backend="gloo", use_device_communicator=True, group_name="tp")
    res = {"group": coord.unique_name, "communicator": type(coord.device_communicator).__name__}
    # vLLM 0.32's CPU communicator reduces in place and returns its input
    # (cpu_communicator.py: ``all_reduce(input_); return input_``), an aliased output torch
    # only warns about, except with ``CI`` set, where it raises on the first call
    # (torch._functorch.config.error_on_custom_op_aliasing). That is vLLM's op, not ours:
    # keep torch's default (a warning) so the test means the same everywhere.
    from torch._functorch import config as functorch_config

    with functorch_config.patch(error_on_custom_op_aliasing=False):
        res["vllm"] = _case(rank, world, out_dir, "vllm", coord.unique_name, _vllm_norm, torch.bfloat16)
    coord.destroy()
    return res


# -- EP MoE combine + residual add + RMSNorm (moe_combine_add_rms_norm) ------------------


def moe_norm_graph(ep_group: str, ep_world_size: int, ep_rank: int, norm, masked: bool = True, shared: bool = False, dtype=torch.bfloat16):
    """``(gm, inputs)``: EP MoE -> ``residual + moe`` -> RMSNorm, traced with fake tensors
    (the EP op needs its group only when run); ``inputs`` are this rank's real tensors."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch._subclasses.fake_tensor import FakeTensorMode

    from . import workers

    op = torch.ops.ascend_graph.moe_dispatch_ffn_combine.default
    w13, w2, (sg, su, sd, _) = workers._experts(dtype)
    n = w13.shape[0] // ep_world_size
    x, w, ids, active = workers._tokens(ep_rank, 9, dtype)
    g = torch.Generator().manual_seed(5 + ep_rank)
    residual = torch.randn(x.shape, generator=g).to(dtype)
    gamma = (1 + 0.1 * torch.randn(x.shape[1], generator=g)).to(dtype)
    inputs = [x, w, ids, w13[ep_rank * n : (ep_rank + 1) * n], w2[ep_rank * n : (ep_rank + 1) * n], active, residual, gamma] + ([sg, su, sd] if shared else [])

    def fn(x, w, ids, w13, w2, active, residual, gamma, *sh):
        kw = dict(shared_gate=sh[0], shared_up=sh[1], shared_down=sh[2]) if sh else {}
        y = op(x, w, ids, w13, w2, "silu", active if masked else None, ep_group=ep_group, ep_world_size=ep_world_size, ep_rank=ep_rank, **kw)
        s = residual + y
        return norm(s, gamma), s

    from ascend_graph.capture.trace import decompositions

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:  # the decompositions AOT tracing uses
        gm = make_fx(fn, decompositions(), tracing_mode="fake")(*[mode.from_tensor(t) for t in inputs])
    return gm, inputs, (w13, w2)


def moe_combine_norm(rank: int, world: int):
    """Each rank: the EP MoE + add + norm graph (HF and vLLM norm forms), rewritten by the
    NPU-only rows (called directly here, where no NPU exists), run for real over gloo:
    equal to the unfused graph and to the single-device computation for this rank's tokens."""
    import copy

    from ascend_graph.distributed import groups
    from ascend_graph.passes.fusion.norm_rope import fuse_moe_combine_norm

    pg = groups.acquire()
    out = {}
    for norm in (_hf_norm, _vllm_norm):
        gm, inputs, (w13, w2) = moe_norm_graph(pg.group_name, world, rank, norm)
        fused = copy.deepcopy(gm)
        count = fuse_moe_combine_norm(fused.graph)
        fused.graph.lint()
        fused.recompile()
        with torch.no_grad():
            got, plain = fused(*inputs), gm(*inputs)
            x, w, ids, _, _, active, residual, gamma = inputs
            y = torch.ops.ascend_graph.moe_dispatch_ffn_combine(x, w, ids, w13, w2, "silu", active)  # all experts, one device
            s = residual + y
            single = (norm(s, gamma), s)
        out[norm.__name__] = {"count": count, "code": fused.code, "got": got, "plain": plain, "single": single}
    groups.release(pg)
    return out


def static_path_needs_one_bucket(rank: int, world: int):
    """The static (capturable) EP path with a different token count on each rank, as two
    ranks at different buckets would have, run outside capture: every rank raises after
    the header exchange instead of a collective hanging."""
    import time

    from ascend_graph.distributed import groups
    from ascend_graph.distributed.ep import ep_dispatch_ffn_combine, shard_experts

    from . import workers

    pg = groups.acquire()
    lw13, lw2 = shard_experts(*workers._experts()[:2], world, rank)
    x, w, ids, active = workers._tokens(rank, 5 + 2 * rank)
    start = time.monotonic()
    try:
        ep_dispatch_ffn_combine(x, w, ids, lw13, lw2, "silu", active, ep_group=pg.group_name, ep_world_size=world, ep_rank=rank, static_shapes=True)
        res = {"error": None}
    except Exception as e:
        res = {"error": type(e).__name__, "expected": getattr(e, "expected", None), "got": getattr(e, "got", None), "seconds": time.monotonic() - start}
    groups.release(pg)
    return {"static": res}
