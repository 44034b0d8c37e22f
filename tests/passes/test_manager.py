"""Pass manager: explicit order, counting into stats, dumps, lint in debug, uuids."""

import os

import pytest
import torch
import torch.fx
from torch.fx.experimental.proxy_tensor import make_fx

import ascend_graph
from ascend_graph.config import AscendConfig
from ascend_graph.errors import CaptureError
from ascend_graph.passes.base import GraphPass
from ascend_graph.passes.cleanup import DeadCodeElimination, NoOpElimination
from ascend_graph.passes.manager import PassManager, build_pass_manager


def graph():
    def f(x):
        y = x.view(x.shape) + 1  # a no-op view
        unused = y * 3  # noqa: F841  dead
        return y.clone().relu()

    return make_fx(f)(torch.randn(3, 4))


class CountingPass(GraphPass):
    def __init__(self, name, log, family=None, n=1):
        self.name, self.log, self.family, self.n = name, log, family, n

    def __call__(self, graph):
        self.log.append(self.name)
        return self.n


def test_order_is_cleanup_fusion_extra_cleanup():
    pm = build_pass_manager(AscendConfig(fusions=()), extra=[CountingPass("padding_x", [])])
    assert pm.names == ["noop_elimination", "dead_code_elimination", "padding_x", "noop_elimination", "dead_code_elimination"]
    assert build_pass_manager(AscendConfig(fusions=(), cleanup=False)).names == []


def test_fusion_families_follow_config_order():
    names = build_pass_manager(AscendConfig(fusions=("moe",), cleanup=False)).names
    assert len(names) == 1 and "moe" in names[0]
    assert build_pass_manager(AscendConfig(fusions=(), cleanup=False)).names == []


def test_counts_go_to_stats_by_family():
    log = []
    pm = PassManager([CountingPass("a", log, family="attention", n=2), CountingPass("b", log, family="padding", n=3), CountingPass("c", log)])
    counts = pm(graph())
    assert log == ["a", "b", "c"]
    assert counts == {"a": 2, "b": 3, "c": 1}
    st = ascend_graph.stats()
    assert st["fusions"]["attention"] == 2
    assert st["padding"]["rewrites"] == 3
    assert st["passes"]["c"]["rewrites"] == 1 and st["passes"]["c"]["seconds"] >= 0


def test_restore_counts_a_stored_run_without_running_it():
    """A graph-cache hit that loads the compiled graph restores the build's rewrite counts."""
    log = []
    passes = [CountingPass("a", log, family="attention", n=2), CountingPass("b", log, family="padding", n=3), CountingPass("c", log)]
    pm = PassManager(passes)
    pm(graph())
    records = pm.last_records
    assert [(r["name"], r["family"], r["rewrites"]) for r in records] == [("a", "attention", 2), ("b", "padding", 3), ("c", None, 1)]
    assert all(r["seconds"] >= 0 for r in records)
    built = ascend_graph.stats()

    ascend_graph.reset_stats()
    log.clear()
    fresh = PassManager(passes)
    assert fresh.restore(records) == {"a": 2, "b": 3, "c": 1}
    assert log == []  # nothing ran
    st = ascend_graph.stats()
    assert st["fusions"] == built["fusions"]
    assert st["padding"]["rewrites"] == 3
    assert st["passes"]["a"] == {"rewrites": 2, "seconds": 0.0, "runs": 1}
    assert fresh.last_counts == {"a": 2, "b": 3, "c": 1}


def test_cleanup_rewrites_and_keeps_outputs():
    gm = graph()
    x = torch.randn(3, 4)
    ref = gm(x)
    counts = PassManager([NoOpElimination(), DeadCodeElimination()])(gm)
    assert counts["noop_elimination"] == 2  # the view and the clone
    assert counts["dead_code_elimination"] == 1  # the unused multiply
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.view.default not in targets and torch.ops.aten.clone.default not in targets
    gm.graph.lint()
    torch.testing.assert_close(gm(x), ref)


def test_dumps_before_and_after_each_pass(tmp_path):
    pm = PassManager([NoOpElimination(), DeadCodeElimination()], dump_dir=str(tmp_path))
    pm(graph(), graph_id="g7")
    files = sorted(os.listdir(tmp_path))
    assert files == [
        "g7.00.noop_elimination.after.py",
        "g7.00.noop_elimination.before.py",
        "g7.01.dead_code_elimination.after.py",
        "g7.01.dead_code_elimination.before.py",
    ]
    before = (tmp_path / "g7.00.noop_elimination.before.py").read_text()
    after = (tmp_path / "g7.00.noop_elimination.after.py").read_text()
    assert "aten.view" in before and "aten.view" not in after


class BreakingPass(GraphPass):
    name = "breaks_graph"

    def __call__(self, graph):
        node = next(n for n in graph.nodes if n.op == "call_function")
        node.args = (node,) + tuple(node.args[1:])  # a node that uses itself
        return 1


def test_debug_lints_after_each_pass_and_names_the_pass():
    with pytest.raises(CaptureError, match="breaks_graph"):
        PassManager([BreakingPass()], debug=True)(graph())


def test_uuid_hashes_pass_source():
    a, b = NoOpElimination(), DeadCodeElimination()
    assert a.uuid() == NoOpElimination().uuid()
    pm1, pm2 = PassManager([a, b]), PassManager([b, a])
    assert pm1.uuid() != pm2.uuid()


def test_pass_uuids_are_the_same_in_every_process():
    """A uuid that changes per process (a repr with an address) makes every cache lookup miss."""
    import subprocess
    import sys

    code = "from ascend_graph.passes.manager import build_pass_manager as b; from ascend_graph.config import AscendConfig as C; print(b(C()).uuid())"
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300).stdout.strip() for _ in range(2)}
    assert len(runs) == 1 and "" not in runs


class HalfDoneFusion(GraphPass):
    """A fusion pass that rewrites one node (relu -> sigmoid), then raises, as a pattern
    replacement that fails half way through a graph would."""

    name, family = "half_done", "attention"

    def __call__(self, graph):
        node = next(n for n in graph.nodes if n.target == torch.ops.aten.relu.default)
        node.target = torch.ops.aten.sigmoid.default
        raise RuntimeError("replacement raised on a data-dependent value")


def test_a_fusion_pass_that_raises_leaves_the_graph_as_it_was_and_is_counted():
    gm = graph()
    x = torch.randn(3, 4)
    ref = gm(x)
    log = []
    counts = PassManager([HalfDoneFusion(), CountingPass("after", log, family="moe", n=0)])(gm)
    assert counts == {"half_done": 0, "after": 0} and log == ["after"]  # later passes still run
    assert torch.ops.aten.sigmoid.default not in [n.target for n in gm.graph.nodes]
    torch.testing.assert_close(gm(x), ref)  # the half-done rewrite is gone
    failures = ascend_graph.stats()["pass_failures"]
    assert failures["half_done"]["count"] == 1 and "data-dependent" in failures["half_done"]["last"]
    with pytest.raises(RuntimeError, match="data-dependent"):  # debug surfaces it
        PassManager([HalfDoneFusion()], debug=True)(graph())


def test_stats_count_our_ops_left_in_the_graph():
    """``graph_ops``: what the passes left, per op (a fused router without its experts shows)."""
    import torch.nn.functional as F

    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, scale=0.3)

    ascend_graph.reset_stats()
    torch._dynamo.reset()
    q, k, v = (torch.randn(2, 4, 8, 32) for _ in range(3))
    torch.compile(f, backend="ascend", options={"codegen": "fx", "graphs": False})(q, k, v)
    assert ascend_graph.stats()["graph_ops"] == {"attention": 1}
