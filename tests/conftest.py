import os
import sys

sys.path.insert(0, os.path.dirname(__file__))


import pytest  # noqa: E402
import torch.distributed as dist  # noqa: E402


@pytest.fixture
def one_rank():
    """A gloo process group of one rank for the test (DeepSpeed's partitions path looks up the model's copy
    of a part by rank); an existing group is left as it is."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
