"""The refcounted group registry: one group per (ranks, backend, options), shared, counted."""

import datetime

import pytest
import torch
import torch.distributed as dist

import ascend_graph
from ascend_graph.distributed import DistributedError, groups


def test_second_request_gets_the_same_group_and_last_release_destroys_it(world_of_one):
    pg = groups.acquire()
    again = groups.acquire()
    assert again is pg and groups.registry().refs(pg) == 2
    assert ascend_graph.stats()["groups"] == {"created": 1, "reused": 1, "destroyed": 0}
    assert groups.resolve(pg.group_name) is pg  # what a fused op's ep_group names
    assert groups.release(again) == 1
    t = torch.ones(3)
    dist.all_reduce(t, group=pg)  # still usable while a reference is held
    assert groups.release(pg) == 0 and groups.registry().refs(pg) == 0
    assert ascend_graph.stats()["groups"] == {"created": 1, "reused": 1, "destroyed": 1}
    with pytest.raises(DistributedError):
        groups.release(pg)


def test_other_backend_or_options_make_another_group(world_of_one):
    with groups.group([0], "gloo") as a, groups.group([0], "gloo", timeout=datetime.timedelta(seconds=5)) as b, groups.group([0], "gloo") as c:
        assert a is not b and a is c
        assert ascend_graph.stats()["groups"]["created"] == 2 and ascend_graph.stats()["groups"]["reused"] == 1
    assert ascend_graph.stats()["groups"]["destroyed"] == 2


def test_bad_requests_are_typed_errors(world_of_one):
    with pytest.raises(DistributedError) as e:
        groups.acquire([0, 3])
    assert e.value.expected == "ranks in [0, 1)"
    with pytest.raises(DistributedError):
        groups.resolve("no-such-group")
    assert groups.resolve("") is dist.group.WORLD


def test_registry_needs_an_initialised_world():
    assert not dist.is_initialized()
    with pytest.raises(DistributedError) as e:
        groups.acquire()
    assert "init_process_group" in str(e.value.expected)
