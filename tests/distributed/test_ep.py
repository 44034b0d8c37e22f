"""Expert parallelism on torch.distributed: real processes (spawn, gloo) against the
single-device op; bad input on every rank raises a typed error, never hangs."""


import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from ascend_graph.distributed import DistributedError
from ascend_graph.distributed.ep import ep_dispatch_ffn_combine, route, shard_experts, shard_experts_graph
from ascend_graph.errors import UnsupportedError

from . import workers
from .spawn import run_ranks

op = torch.ops.ascend_graph.moe_dispatch_ffn_combine
F32_TOL = 1e-5
BF16_TOL = 3e-2  # partial sums per rank come back rounded to bf16 before the fp32 combine


def _check_ops(results, world):
    for rank, res in enumerate(results):
        assert "error" not in res, res.get("trace")
        assert res["same_group"] and res["refs_left"] == 1
        assert res["stats"] == {"created": 1, "reused": 1, "destroyed": 1}
        assert len(res["worst"]) == 12
        for case, err in res["worst"].items():
            assert err <= (F32_TOL if "float32" in case else BF16_TOL), (rank, case, err)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_ranks(workers.two_rank_suite, 2, tmp_path_factory.mktemp("ep2"), timeout=240)


def test_two_ranks_equal_the_single_device_op(two_ranks):
    _check_ops([r["ops"] if "ops" in r else r for r in two_ranks], 2)


def test_four_ranks_equal_the_single_device_op(tmp_path):
    # rank 3 holds no tokens at all: it still serves its experts to the others
    _check_ops(run_ranks(workers.ops_equal_single_device, 4, tmp_path, timeout=240), 4)


def test_hf_deepseek_block_sharded_over_two_ranks_matches_one_rank(two_ranks):
    for res in two_ranks:
        r = res["hf"]["deepseek_v3"]
        assert r["sharded"] == 1 and r["err"] <= 1e-5 * max(1.0, r["scale"]), r


@pytest.mark.slow
def test_hf_moe_blocks_of_the_fusion_tests_sharded_over_two_ranks(tmp_path):
    results = run_ranks(workers.hf_blocks_sharded, 2, tmp_path, timeout=400)
    for res in results:
        assert "error" not in res, res.get("trace")
        assert set(res) == {"qwen3_moe", "deepseek_v3", "qwen2_moe"}
        for name, r in res.items():
            tol = 1e-5 if name == "deepseek_v3" else 2e-2  # bf16 blocks
            assert r["sharded"] == 1 and r["err"] <= tol * max(1.0, r["scale"]), (name, r)


def test_uneven_experts_and_mismatched_world_size_raise_on_every_rank(two_ranks):
    for res in two_ranks:
        bad = res["bad"]
        assert bad["uneven"]["error"] == "DistributedError" and bad["uneven"]["got"] == "local experts per rank: [2, 3]"
        assert bad["world"]["error"] == "DistributedError" and bad["world"]["got"] == "ep_world_size per rank: [2, 4]"


def test_a_dead_rank_is_a_typed_error_within_the_timeout(tmp_path):
    survivor, dead = run_ranks(workers.dead_peer, 2, tmp_path, timeout=120)
    assert dead == {"error": "died", "exitcode": 3}
    assert survivor["error"] == "DistributedError", survivor
    assert survivor["seconds"] < 15  # the group's timeout is 10 s; gloo sees the closed socket sooner


# -- in one process (a gloo world of one rank) ----------------------------------------


def _inputs(t=9, e=6, dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(t, 16, generator=g).to(dtype)
    ids = torch.randint(-1, e + 1, (t, 2), generator=g)  # -1 and e: out of range, no work
    w = torch.rand(t, 2, generator=g).to(dtype)
    w13, w2 = torch.randn(e, 10, 16, generator=g).to(dtype), torch.randn(e, 16, 5, generator=g).to(dtype)
    active = torch.arange(t) % 4 != 1
    return x, w, ids, w13, w2, active


@pytest.mark.parametrize("static", [False, True])
def test_one_rank_group_runs_both_paths_like_the_single_device_op(world_of_one, static):
    import torch.distributed as dist

    x, w, ids, w13, w2, active = _inputs()
    ref = op(x, w, ids, w13, w2, "gelu", active)
    got = ep_dispatch_ffn_combine(x, w, ids, w13, w2, "gelu", active, ep_group="", ep_world_size=1, ep_rank=0, static_shapes=static)
    torch.testing.assert_close(got, ref, atol=F32_TOL, rtol=F32_TOL)
    assert torch.all(got[~active] == 0)
    with pytest.raises(DistributedError) as e:  # the arguments must describe the group
        ep_dispatch_ffn_combine(x, w, ids, w13, w2, "gelu", active, ep_group="", ep_world_size=2, ep_rank=0, static_shapes=static)
    assert e.value.expected in (1, "ep_world_size=1 (the group's size) on every rank")
    assert dist.get_world_size() == 1


def test_route_sends_a_token_once_per_rank_that_owns_one_of_its_experts():
    ids = torch.tensor([[0, 1], [2, 5], [5, 4], [-1, 6]])
    dest, hit = route(ids, local_experts=2, ep_world_size=3, active_mask=torch.tensor([True, True, True, False]))
    assert dest.tolist() == [[0, 0], [1, 2], [2, 2], [3, 3]]  # 3: no rank (sentinel or inactive)
    assert hit.tolist() == [[True, False, False], [False, True, True], [False, False, True], [False, False, False]]


def test_shard_experts_views_and_uneven_split():
    w13, w2 = torch.randn(6, 4, 3), torch.randn(6, 3, 2)
    a, b = shard_experts(w13, w2, 3, 2)
    assert a.data_ptr() == w13[4].data_ptr() and torch.equal(b, w2[4:])
    with pytest.raises(UnsupportedError) as e:
        shard_experts(w13, w2, 4, 0)
    assert e.value.got == "6 experts, ep_world_size=4, ep_rank=0"


def _fused(x, w, ids, w13, w2):
    return op(x, w, ids, w13, w2, "silu")


def test_shard_experts_graph_rewrites_the_fused_op_and_refuses_uneven_experts():
    x, w, ids, w13, w2, _ = _inputs(e=6)
    gm = make_fx(_fused, tracing_mode="fake")(x, w, ids, w13, w2)
    assert shard_experts_graph(gm, "ep", 3, 1) == 1
    (node,) = [n for n in gm.graph.nodes if n.target is op.default]
    assert (node.kwargs["ep_group"], node.kwargs["ep_world_size"], node.kwargs["ep_rank"]) == ("ep", 3, 1)
    assert [a.args[1:] for a in (node.kwargs["w13"], node.kwargs["w2"])] == [(0, 2, 4), (0, 2, 4)]
    assert shard_experts_graph(gm, "ep", 3, 1) == 0  # already expert-parallel
    gm = make_fx(_fused, tracing_mode="fake")(x, w, ids, w13, w2)
    with pytest.raises(UnsupportedError) as e:
        shard_experts_graph(gm, "ep", 4, 0)
    assert "6 experts" in e.value.got


def test_ep_without_an_initialised_world_is_a_typed_error():
    x, w, ids, w13, w2, _ = _inputs(e=6)
    with pytest.raises(DistributedError):
        op(x, w, ids, w13[:3], w2[:3], "silu", ep_group="", ep_world_size=2, ep_rank=0)
