"""One named test per torch behaviour manic relies on without torch promising it (src/manic/compat.py).

If a torch release breaks one, the failing test's name says which."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import manic
from manic import compat
from manic import testing as harness


def test_disable_dynamo():
    calls = []

    @compat.disable_dynamo
    def f(x):
        calls.append(1)
        return x + 1

    assert torch.equal(f(torch.ones(2)), torch.full((2,), 2.0)) and calls == [1]


def test_foreach_kernels():
    a = [torch.tensor([3.0, 4.0]), torch.tensor([[1.0, 2.0], [2.0, 4.0]])]
    b = [torch.ones(2), torch.ones(2, 2)]
    diff = compat.foreach_sub(a, b)
    assert torch.equal(diff[0], torch.tensor([2.0, 3.0])) and torch.equal(a[0], torch.tensor([3.0, 4.0]))
    compat.foreach_sub_(a, b)
    assert torch.equal(a[1], torch.tensor([[0.0, 1.0], [1.0, 3.0]]))
    # a list of 0-dim tensors as the factor, broadcast per tensor (what the eager rebase passes: no host sync)
    k = torch.tensor(-2.0)
    compat.foreach_addcmul_(a, b, [k, k])
    assert torch.equal(a[0], torch.tensor([0.0, 1.0])) and torch.equal(a[1], torch.tensor([[-2.0, -1.0], [-1.0, 1.0]]))
    compat.foreach_add_(a, b)
    compat.foreach_mul_(a, torch.tensor(2.0))
    assert torch.equal(a[0], torch.tensor([2.0, 4.0]))
    out = [torch.empty(2), torch.empty(2, 2)]
    compat.foreach_copy_(out, [torch.ones(2, dtype=torch.bfloat16), torch.zeros(2, 2, dtype=torch.float64)])
    assert out[0].dtype == torch.float32 and torch.equal(out[0], torch.ones(2))
    norms = torch.empty(2)
    compat.foreach_norm_out([torch.tensor([3.0, 4.0]), torch.tensor([1.0, 0.0], dtype=torch.bfloat16)], list(norms.unbind()))
    assert norms.tolist() == [5.0, 1.0]


def test_init_optimizer_hooks():
    class Bare(torch.optim.Optimizer):
        defaults: dict = {}
        param_groups: list = []

        def __init__(self):  # no Optimizer.__init__: as Mechanized, which has no parameters of its own
            compat.init_optimizer_hooks(self)

    opt = Bare()
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    opt.register_state_dict_pre_hook(lambda o: seen.append("sd"))
    assert len(opt._optimizer_step_pre_hooks) == 1 and len(opt._optimizer_state_dict_pre_hooks) == 1


def test_is_optimizer_internal():
    """What torch.optim.Optimizer.__getstate__ leaves out of a pickle/deepcopy: hooks and the
    LR scheduler's step wrapper (it points back at the optimizer)."""
    p = torch.zeros(2, requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.1)
    torch.optim.lr_scheduler.StepLR(opt, 10)
    opt.step()
    internal = {k for k in opt.__dict__ if compat.is_optimizer_internal(k)}
    assert {"_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_opt_called"} <= internal
    assert not {"param_groups", "state", "defaults"} & internal
    assert set(opt.__getstate__()) >= {"param_groups", "state", "defaults"}


def test_has_own_hook():
    """Finds an instance's own step and load pre-hooks, each under its kind, and only while registered."""
    base = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.5)

    def hook(*args):
        return None

    for kind, register in (("step_pre", base.register_step_pre_hook),
                           ("load_state_dict_pre", base.register_load_state_dict_pre_hook)):
        assert not compat.has_own_hook(base, kind, hook)
        handle = register(hook)
        assert compat.has_own_hook(base, kind, hook)
        assert not compat.has_own_hook(base, "state_dict_pre", hook)
        handle.remove()
        assert not compat.has_own_hook(base, kind, hook)


def test_step_with_own_hooks():
    """The base's step runs its own hooks once, no global hook, and marks the step for an LR scheduler."""
    p = torch.zeros(2, requires_grad=True)
    p.grad = torch.ones(2)
    base = torch.optim.SGD([p], lr=0.5)
    sched = torch.optim.lr_scheduler.StepLR(base, 10)
    seen = []
    base.register_step_pre_hook(lambda o, a, k: seen.append("own pre"))
    base.register_step_post_hook(lambda o, a, k: seen.append("own post"))
    handle = register_optimizer_step_pre_hook(lambda o, a, k: seen.append("global"))
    try:
        compat.step_with_own_hooks(base)
    finally:
        handle.remove()
    assert seen == ["own pre", "own post"]
    assert torch.equal(p.detach(), torch.full((2,), -0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "lr_scheduler.step() before optimizer.step()" would be raised
        sched.step()


def test_local_on_a_plain_tensor():
    t = torch.ones(3)
    assert compat.local(t) is t and not compat.is_dtensor(t)


def test_is_dtensor_needs_no_import():
    """``import manic`` does not load torch.distributed.tensor (checked in a fresh interpreter)."""
    import subprocess
    import sys

    code = "import sys, manic; print('torch.distributed.tensor' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def _distributed_checks(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    out = {}
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    d = distribute_tensor(torch.arange(4.0), mesh, [Shard(0)])
    out["local"] = compat.local(d).tolist() if compat.is_dtensor(d) else None
    mesh2 = init_device_mesh("cpu", (world, 1), mesh_dim_names=("dp", "tp"))
    out["root_mesh"] = compat.root_mesh(mesh2["dp"]) == mesh2 and compat.root_mesh(mesh2) == mesh2
    from torch.distributed.tensor.placement_types import _StridedShard
    out["strided"] = compat.is_strided_shard(_StridedShard(0, split_factor=2)) and not compat.is_strided_shard(Shard(0))
    flat = FSDP(torch.nn.Linear(4, 4), device_id=torch.device("cpu"))
    orig = FSDP(torch.nn.Linear(4, 4), device_id=torch.device("cpu"), use_orig_params=True)
    plain = torch.nn.Linear(4, 4)
    fully_shard(plain)
    out["fsdp1"] = (all(compat.is_fsdp1_flat(p) for p in flat.parameters())
                    and all(compat.is_fsdp1_flat(p) for p in orig.parameters())
                    and not any(compat.is_fsdp1_flat(p) for p in plain.parameters()))
    return out


@pytest.fixture(scope="module")
def distributed():
    return harness.run(2, _distributed_checks, timeout=100)


@pytest.mark.timeout(120)
def test_local_on_a_dtensor(distributed):
    assert [r["local"] for r in distributed] == [[0.0, 1.0], [2.0, 3.0]]


@pytest.mark.timeout(120)
def test_root_mesh(distributed):
    assert all(r["root_mesh"] for r in distributed)


@pytest.mark.timeout(120)
def test_is_strided_shard(distributed):
    assert all(r["strided"] for r in distributed)


@pytest.mark.timeout(120)
def test_is_fsdp1_flat(distributed):
    assert all(r["fsdp1"] for r in distributed)


def test_mechanized_uses_these_and_only_these():
    """The package touches torch's private names only in compat.py (and its kernels' foreach ops
    come from there too)."""
    import pathlib
    import re

    src = pathlib.Path(manic.__file__).parent
    offenders = []
    for path in src.glob("*.py"):
        if path.name == "compat.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if re.search(r"torch\._[a-z]|\._fsdp|_get_root_mesh|_StridedShard|_optimizer_step_|_opt_called", code):
                offenders.append(f"{path.name}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_dispatch_mode_active():
    from torch.utils.flop_counter import FlopCounterMode

    assert not compat.dispatch_mode_active()
    with FlopCounterMode(display=False):
        assert compat.dispatch_mode_active()
    assert not compat.dispatch_mode_active()
