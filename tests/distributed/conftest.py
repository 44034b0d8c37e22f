import datetime

import pytest
import torch.distributed as dist

from .spawn import free_port


@pytest.fixture
def world_of_one():
    """A gloo default group of one rank in the test process, torn down afterwards."""
    assert not dist.is_initialized(), "a test left torch.distributed initialised"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1, timeout=datetime.timedelta(seconds=30))
    try:
        yield
    finally:
        from ascend_graph.distributed import groups

        groups.registry().clear()
        dist.destroy_process_group()
