"""Per-rank bodies of the multi-process tests (module-level so spawn can pickle them).

Every rank builds the same full expert set from one seed and its own tokens from its
rank, so the single-device reference for its tokens is computed right there.
"""

from __future__ import annotations

import datetime
import os
import time

import torch

import ascend_graph.ops  # noqa: F401  (registers the ops in the spawned process)

H, I, E, K = 24, 10, 8, 3


def _experts(dtype=torch.float32, e=E):
    g = torch.Generator().manual_seed(1234)
    w13 = (torch.randn(e, 2 * I, H, generator=g) * 0.2).to(dtype)
    w2 = (torch.randn(e, H, I, generator=g) * 0.2).to(dtype)
    shared = [(torch.randn(*s, generator=g) * 0.2).to(dtype) for s in ((7, H), (7, H), (H, 7), (1, H))]
    return w13, w2, shared


def _tokens(rank: int, t: int, dtype=torch.float32, e=E):
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(t, H, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(e, generator=g)[:K] for _ in range(t)]) if t else torch.zeros(0, K, dtype=torch.int64)
    w = torch.rand(t, K, generator=g).to(dtype)
    if t > 2:
        ids[1, 0] = -1  # an expert-parallel sentinel: contributes nothing
    active = torch.ones(t, dtype=torch.bool)
    active[t // 2 :: 3] = False  # padding rows of a bucket
    return x, w, ids, active


def ops_equal_single_device(rank: int, world: int):
    """Each rank's EP output (exact and static paths, with/without shared experts, fp32 and
    bf16) against the single-device op over all experts for its tokens; plus the registry."""
    import ascend_graph
    from ascend_graph.distributed import groups
    from ascend_graph.distributed.ep import ep_dispatch_ffn_combine, shard_experts

    op = torch.ops.ascend_graph.moe_dispatch_ffn_combine
    ascend_graph.reset_stats()
    pg = groups.acquire(timeout=datetime.timedelta(seconds=20))
    again = groups.acquire(timeout=datetime.timedelta(seconds=20))
    res = {"same_group": pg is again, "name": pg.group_name}
    # ranks hold different token counts, the last of 4 none at all
    t = 0 if (world == 4 and rank == 3) else 5 + 2 * rank
    worst = {}
    for dtype in (torch.float32, torch.bfloat16):
        w13, w2, (sg, su, sd, sgate) = _experts(dtype)
        lw13, lw2 = shard_experts(w13, w2, world, rank)
        x, w, ids, active = _tokens(rank, t, dtype)
        cases = {
            "plain": ((), {}),
            "mask": ((), {"active_mask": active}),
            "shared": ((), {"active_mask": active, "shared_gate": sg, "shared_up": su, "shared_down": sd, "shared_expert_gate": sgate}),
        }
        for name, (_, kw) in cases.items():
            ref = op(x, w, ids, w13, w2, "silu", **kw)
            got = op(x, w, ids, lw13, lw2, "silu", ep_group=pg.group_name, ep_world_size=world, ep_rank=rank, **kw)
            # the static path wants one token count on every rank: pad to the bucket
            # (largest rank's count) with inactive rows, as the runtime does
            b = 5 + 2 * (world - 1)
            pad = lambda a, v: torch.cat([a, a.new_full((b - t, *a.shape[1:]), v)])  # noqa: E731
            skw = dict(kw, active_mask=pad(kw.get("active_mask", torch.ones(t, dtype=torch.bool)), False))
            stat = ep_dispatch_ffn_combine(pad(x, 0), pad(w, 0), pad(ids, 0), lw13, lw2, "silu", ep_group=pg.group_name, ep_world_size=world, ep_rank=rank, static_shapes=True, **skw)[:t]
            assert got.shape == ref.shape and got.dtype == ref.dtype
            worst[f"{dtype}-{name}-exact"] = (got.float() - ref.float()).abs().max().item() if t else 0.0
            worst[f"{dtype}-{name}-static"] = (stat.float() - ref.float()).abs().max().item() if t else 0.0
            if t and name != "shared":  # padding rows and ids out of range give zeros
                assert torch.all(got[~active] == 0) if name == "mask" else True
    res["worst"] = worst
    res["refs_left"] = groups.release(again)
    groups.release(pg)
    res["stats"] = ascend_graph.stats()["groups"]
    return res


def _hf_blocks():
    from transformers import DeepseekV3Config, Qwen2MoeConfig, Qwen3MoeConfig
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    # the blocks of tests/passes/test_moe_fusion.py, with expert counts that split over 2
    q3 = Qwen3MoeConfig(hidden_size=40, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=3, norm_topk_prob=True)
    ds = DeepseekV3Config(hidden_size=32, moe_intermediate_size=24, n_routed_experts=12, num_experts_per_tok=3, n_group=4, topk_group=2, routed_scaling_factor=2.5, n_shared_experts=2)
    q2 = Qwen2MoeConfig(hidden_size=40, moe_intermediate_size=24, shared_expert_intermediate_size=56, num_experts=6, num_experts_per_tok=2, norm_topk_prob=False)
    for cfg in (q3, ds, q2):
        cfg._experts_implementation = "grouped_mm"
    return {
        "qwen3_moe": (Qwen3MoeSparseMoeBlock(q3), torch.bfloat16, 40),
        "deepseek_v3": (DeepseekV3MoE(ds), torch.float32, 32),
        "qwen2_moe": (Qwen2MoeSparseMoeBlock(q2), torch.bfloat16, 40),
    }


class _ShardingPasses:
    """The backend's pass manager, then this rank's expert sharding of the fused graph."""

    def __init__(self, inner, group_name: str, world: int, rank: int):
        self.inner, self.group_name, self.world, self.rank = inner, group_name, world, rank
        self.sharded = 0

    @property
    def last_records(self):
        return self.inner.last_records

    def __call__(self, gm, graph_id):
        from ascend_graph.distributed.ep import shard_experts_graph

        counts = self.inner(gm, graph_id)
        self.sharded += shard_experts_graph(gm, self.group_name, self.world, self.rank)
        return counts


def hf_blocks_sharded(rank: int, world: int, names=("qwen3_moe", "deepseek_v3", "qwen2_moe")):
    """The HF MoE blocks of the fusion tests, fused by the backend, experts sharded over
    the ranks, each rank on its own sequence of one batch: equal to the 1-rank output."""
    from ascend_graph.backend import build_pass_manager, compile_graph
    from ascend_graph.config import AscendConfig
    from ascend_graph.distributed import groups

    pg = groups.acquire()
    out = {}
    for name, (block, dtype, h) in _hf_blocks().items():
        if name not in names:
            continue
        torch.manual_seed(0)
        for p in block.parameters():
            torch.nn.init.normal_(p, std=0.2)
        for b in block.buffers():
            torch.nn.init.normal_(b, std=0.1)
        block = block.to(dtype).eval()
        x = torch.randn(world, 9, h, generator=torch.Generator().manual_seed(7)).to(dtype)
        cfg = AscendConfig(codegen="fx", fusions=("moe",), graphs=False, debug=True)
        passes = _ShardingPasses(build_pass_manager(cfg), pg.group_name, world, rank)

        def backend(gm, example_inputs, passes=passes, cfg=cfg):
            return compile_graph(gm, example_inputs, cfg, wrap_runtime=False, pass_manager=passes)

        torch._dynamo.reset()
        compiled = torch.compile(block, backend=backend, dynamic=False, fullgraph=True)
        with torch.no_grad():
            got = compiled(x[rank : rank + 1])
            ref = block(x)[rank : rank + 1]  # the whole batch on one rank, all experts
        out[name] = {"sharded": passes.sharded, "err": (got.float() - ref.float()).abs().max().item(), "scale": ref.float().abs().max().item()}
    groups.release(pg)
    return out


def bad_inputs(rank: int, world: int):
    """Uneven experts, then a wrong world size on one rank: every rank raises, none hangs."""
    from ascend_graph.distributed import groups
    from ascend_graph.distributed.ep import shard_experts

    op = torch.ops.ascend_graph.moe_dispatch_ffn_combine
    pg = groups.acquire(timeout=datetime.timedelta(seconds=20))
    seen = {}
    # 5 experts over 2 ranks: rank 0 holds 2, rank 1 holds 3
    w13, w2, _ = _experts(e=5)
    mine = (w13[:2], w2[:2]) if rank == 0 else (w13[2:], w2[2:])
    x, w, ids, _ = _tokens(rank, 6, e=5)
    even13, even2 = shard_experts(*_experts()[:2], world, rank)
    cases = (
        ("uneven", mine, ids, world),  # 5 experts over 2 ranks: 2 and 3 local experts
        ("world", (even13, even2), ids.clamp(max=E - 1), world if rank == 0 else 2 * world),  # rank 1 thinks EP is 4
    )
    for case, (l13, l2), case_ids, ep in cases:
        start = time.monotonic()
        try:
            op(x, w, case_ids, l13, l2, "silu", ep_group=pg.group_name, ep_world_size=ep, ep_rank=rank)
            seen[case] = {"error": None}
        except Exception as e:
            seen[case] = {"error": type(e).__name__, "message": str(e), "expected": getattr(e, "expected", None), "got": getattr(e, "got", None), "seconds": time.monotonic() - start}
    groups.release(pg)
    return seen


def dead_peer(rank: int, world: int):
    """Rank 1 dies before the MoE call; rank 0 gets a DistributedError, not a hang."""
    from ascend_graph.distributed import groups
    from ascend_graph.distributed.ep import shard_experts

    pg = groups.acquire(timeout=datetime.timedelta(seconds=10))
    if rank == 1:
        os._exit(3)
    w13, w2, _ = _experts()
    lw13, lw2 = shard_experts(w13, w2, world, rank)
    x, w, ids, _ = _tokens(rank, 6)
    torch.ops.ascend_graph.moe_dispatch_ffn_combine(x, w, ids, lw13, lw2, "silu", ep_group=pg.group_name, ep_world_size=world, ep_rank=rank)
    return {"error": None}


def two_rank_suite(rank: int, world: int):
    """One spawn for the 2-rank checks of the default suite (a spawn costs seconds)."""
    return {
        "ops": ops_equal_single_device(rank, world),
        "hf": hf_blocks_sharded(rank, world, names=("deepseek_v3",)),
        "bad": bad_inputs(rank, world),
    }
