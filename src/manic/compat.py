"""Every place manic relies on something torch does not promise, in one section.

Each function here has a test of its own in tests/test_compat.py named after it, so a torch
release that changes one of these fails one named test instead of a distant symptom.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch
from torch import Tensor

# torch.compile must not trace into (de)serialisation; torch.optim uses the same decorator.
disable_dynamo: Callable[[Callable], Callable] = torch._disable_dynamo

# Multi-tensor kernels: the same ones torch.optim's foreach implementations use (one dispatch for a list of
# tensors; a list of 0-dim tensors as a factor is broadcast per tensor, on the device, without a host sync).
foreach_sub = torch._foreach_sub
foreach_sub_ = torch._foreach_sub_
foreach_add_ = torch._foreach_add_
foreach_mul_ = torch._foreach_mul_
foreach_addcmul_ = torch._foreach_addcmul_
foreach_copy_ = torch._foreach_copy_
foreach_norm = torch._foreach_norm


def foreach_norm_out(tensors: list[Tensor], out: list[Tensor]) -> None:
    """``out[i] = ||tensors[i]||_2`` (float32 outputs: 16-bit inputs accumulate in float32) in one dispatch."""
    torch.ops.aten._foreach_norm.Scalar_out(tensors, 2, out[0].dtype, out=out)


def is_dtensor(t: Any) -> bool:
    """True for a DTensor (FSDP2, TP parameters). Without importing torch.distributed.tensor
    (a second at start-up): no DTensor can exist before that module is loaded."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local(t: Tensor) -> Tensor:
    """The part of ``t`` this rank holds."""
    return t.to_local() if is_dtensor(t) else t


def dispatch_mode_active() -> bool:
    """A TorchDispatchMode is on (FlopCounterMode, a test's op counter): torch.compile'd code refuses to
    run under one, so compile=True steps on the eager kernels then."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode() is not None


def is_fsdp1_flat(p: Tensor) -> bool:
    """FSDP1's flat parameters and, with use_orig_params=True, the original parameters viewing
    them: FSDP1 marks both with the private flag ``_fsdp_flattened``."""
    return bool(getattr(p, "_fsdp_flattened", False))


def root_mesh(mesh: Any) -> Any:
    """The mesh a sliced DeviceMesh was cut from (the mesh itself if it was not sliced)."""
    return mesh._get_root_mesh() if hasattr(mesh, "_get_root_mesh") else mesh


def is_strided_shard(placement: Any) -> bool:
    """FSDP2 + TP shard a dim twice with the private placement ``_StridedShard``."""
    return type(placement).__name__ == "_StridedShard"


def init_optimizer_hooks(optimizer: torch.optim.Optimizer) -> None:
    """Set up the hook registries and step profiling of ``torch.optim.Optimizer.__init__``
    without its parameter handling (``Optimizer.__setstate__`` does exactly that)."""
    torch.optim.Optimizer.__setstate__(optimizer, {})


def is_optimizer_internal(name: str) -> bool:
    """Instance attributes that torch.optim keeps out of pickles and deep copies: the hook
    registries, and the step wrapper and flag an LR scheduler puts on the optimizer."""
    return name in ("step", "_opt_called") or name.startswith("_optimizer_")


def has_own_hook(optimizer: torch.optim.Optimizer, kind: str, hook: Any) -> bool:
    """Whether ``hook`` is among the optimizer instance's own hooks of ``kind`` ("step_pre",
    "load_state_dict_pre", ...: torch keeps them in private OrderedDicts and offers no lookup)."""
    return hook in getattr(optimizer, f"_optimizer_{kind}_hooks", {}).values()


def step_with_own_hooks(optimizer: torch.optim.Optimizer, closure: Any = None) -> Any:
    """``optimizer.step()`` without the global optimizer hooks (the mechanized optimizer's
    step already ran them), but with the instance's own hooks, as torch's step wrapper does."""
    step = type(optimizer).step
    inner = getattr(step, "__wrapped__", None) if getattr(step, "hooked", False) else None
    args = () if closure is None else (closure,)
    if inner is None:
        return optimizer.step(*args)
    for hook in optimizer._optimizer_step_pre_hooks.values():
        hook(optimizer, args, {})
    out = inner(optimizer, *args)
    for hook in optimizer._optimizer_step_post_hooks.values():
        hook(optimizer, args, {})
    optimizer._opt_called = True  # type: ignore[attr-defined]  # an LR scheduler built on the base checks it
    return out
