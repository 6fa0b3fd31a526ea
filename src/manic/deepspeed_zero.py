"""DeepSpeed ZeRO behind an engine: finding it, and what it shows the client optimizer at each part.

Under ZeRO-1/2 DeepSpeed steps the client optimizer once per param group, showing it that group alone
(``param_groups = [group]``); under ZeRO-3 once per sub-group, showing every group with only that
sub-group's flat fp32 partition in it. A *part* here is one such flat partition. With several parts,
Mechanic's step spans them (partitions.py); with one part (one param group, and under ZeRO-3 one
sub-group) the engine's ordinary step runs, and ``of`` marks the engine ``NOT_UNDER_ZERO``.

Refused, before the first part steps (the message names the cause and the fix):
  - ``skip_nonfinite=True``: when the global sums are not finite the one-group step skips the base step,
    but the earlier parts have already taken theirs (DeepSpeed itself skips a step whose gradients are
    not finite, before the client optimizer sees it).
  - optimizer offload (``offload_optimizer``): under ZeRO-3 a sub-group's fp32 partition and state may
    be swapped out, or stepped by DeepSpeed's second optimizer, before the last sub-group; under ZeRO-1/2
    the model's copies are made through DeepSpeed's offload buffers, which this module does not redo.
    Untested, so not supported with several parts.

What this relies on in DeepSpeed (0.19.8), all checked where it is used, so that a DeepSpeed that
changes it fails loudly here: the client step is called from ``_optimizer_step`` (whose ``self`` is the
ZeRO optimizer, ``.optimizer`` the client; under ZeRO-1/2 its local ``original_param_groups`` holds the
full groups); the parts are ``single_partition_of_fp32_groups`` (ZeRO-1/2, one per group) or
``fp32_partitioned_groups_flat`` with ``sub_group_to_group_id`` (ZeRO-3), stepped in that order; the
model's copy of part k is ``parallel_partitioned_bit16_groups[k][rank in real_dp_process_group[k]]``
(ZeRO-1/2) or made by ``_reassign_or_swap_out_partitioned_parameters(k)`` (ZeRO-3).
"""

from __future__ import annotations

import sys
import weakref
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

from torch import Tensor

from .compat import disable_dynamo

if TYPE_CHECKING:
    from .engine import Engine
    from .partitions import Pending

NOT_UNDER_ZERO = "not under ZeRO"  # the engine's mark: steps do not come part by part (looked once)
_DEPTH = 20  # frames between DeepSpeed's _optimizer_step and here (~8 through a GradScaler and torch's hooks)


def of(engine: Engine) -> Zero | None:
    """The DeepSpeed ZeRO optimizer stepping ``engine``'s optimizer part by part, or None (looked up at
    the engine's first step, and again after a load; refuses what it cannot step exactly)."""
    zero = getattr(engine, "parts", None)
    if zero is None:
        zero = engine.parts = _detect(engine) or NOT_UNDER_ZERO
    return None if zero == NOT_UNDER_ZERO else zero


@disable_dynamo  # (frames are the interpreter's: looked at eagerly under torch.compile(opt.step))
def _caller(engine: Engine) -> tuple[Any, Any] | None:
    """DeepSpeed's ZeRO optimizer whose ``_optimizer_step`` is stepping this engine's optimizer now, and
    that call's ``original_param_groups`` (ZeRO-1/2: the full groups); None if no such call is on the
    stack (a walk of a few frames: at the first step, and at each part of a step over several)."""
    f = sys._getframe(1)
    try:
        for _ in range(_DEPTH):
            f = f.f_back
            if f is None:
                return None
            if f.f_code.co_name == "_optimizer_step":
                zero = f.f_locals.get("self")
                client = getattr(zero, "optimizer", None)
                if client is engine.optimizer or getattr(client, "_engine", None) is engine:
                    return zero, f.f_locals.get("original_param_groups")
        return None
    finally:
        del f


def _detect(engine: Engine) -> Zero | None:
    found = _caller(engine)
    if found is None:
        return None
    zero = found[0]
    if hasattr(zero, "fp32_partitioned_groups_flat") and hasattr(zero, "sub_group_to_group_id"):
        stage3 = True
    elif hasattr(zero, "single_partition_of_fp32_groups"):
        stage3 = False
    else:
        return None  # a DeepSpeed optimizer that shows the client all its groups at once
    z = Zero(zero, stage3)
    n = len(z.parts())
    if n < 2:
        return None  # one part: the ordinary step
    what = (f"DeepSpeed ZeRO-{3 if stage3 else '1/2'} steps the client optimizer once per "
            + ("sub-group" if stage3 else "param group") + f", {n} times per step here")
    fix = ("give the client optimizer one param group" + (" and keep sub_group_size at least each rank's "
           "share of the parameters" if stage3 else ""))
    if engine.options.skip_nonfinite:
        raise ValueError(
            f"{what}, and Mechanic's sums are global: when they are not finite, skip_nonfinite=True skips the "
            "base step, but the parts before the last have taken theirs by then. Pass skip_nonfinite=False "
            "(DeepSpeed itself skips a step whose gradients are not finite, before Mechanic sees it), or "
            f"{fix}")
    if getattr(zero, "cpu_offload", False) or getattr(zero, "offload_optimizer", False) \
            or getattr(zero, "swap_optimizer", False):
        where = ("a sub-group's fp32 partition and state may be swapped out, or stepped by DeepSpeed's second "
                 "optimizer, before the last sub-group" if stage3 else "the model's copy of each part is made "
                 "through DeepSpeed's offload buffers, which Mechanic does not make again")
        raise NotImplementedError(
            f"{what}, with optimizer offload: Mechanic rebases every part at the last one, and {where}; not "
            f"supported with several parts (untested). Turn offload_optimizer off, or {fix}")
    return z


class Zero:
    """DeepSpeed's ZeRO optimizer that steps an engine's optimizer part by part, and the step in progress."""

    def __init__(self, zero: Any, stage3: bool) -> None:
        self._zero = weakref.ref(zero)
        self.stage3 = stage3
        self.pending: Pending | None = None  # the step in progress over the parts (partitions.py)

    def __repr__(self) -> str:
        return f"<{len(self.parts())} parts of DeepSpeed ZeRO-{3 if self.stage3 else '1/2'}>"

    @property
    def zero(self) -> Any:
        zero = self._zero()
        if zero is None:
            raise RuntimeError("DeepSpeed's ZeRO optimizer that stepped this Mechanic is gone")
        return zero

    def parts(self) -> list[Tensor]:
        z = self.zero
        return list(z.fp32_partitioned_groups_flat if self.stage3 else z.single_partition_of_fp32_groups)

    def group_of(self, k: int) -> int:
        return self.zero.sub_group_to_group_id[k] if self.stage3 else k

    def now(self, engine: Engine) -> tuple[int, list[dict[str, Any]]]:
        """(the part DeepSpeed is stepping, the full param groups)."""
        found = _caller(engine)
        if found is None or found[0] is not self.zero:
            raise RuntimeError(
                f"Mechanic is under DeepSpeed ZeRO ({self!r}) and was stepped outside DeepSpeed's step: step "
                "the model through the DeepSpeed engine (engine.step()), which steps each part in turn")
        groups = engine.optimizer.param_groups if self.stage3 else found[1]
        shown = [p for g in engine.optimizer.param_groups for p in g["params"]]
        parts = self.parts()
        k = next((k for k, p in enumerate(parts) if len(shown) == 1 and shown[0] is p), None)
        if k is None or not isinstance(groups, list) or len(groups) <= self.group_of(len(parts) - 1) \
                or not self.stage3 and groups[k] is not engine.optimizer.param_groups[0]:
            raise RuntimeError(
                f"DeepSpeed's ZeRO optimizer ({type(self.zero).__name__}) shows Mechanic {len(shown)} tensors, "
                f"not one of its {len(parts)} fp32 partitions: this DeepSpeed steps its client optimizer in a "
                "way Mechanic does not know (tested with deepspeed 0.19.8); give the client optimizer one "
                "param group (and one ZeRO-3 sub-group)")
        return k, groups

    @contextmanager
    def showing_all(self, engine: Engine, groups: list[dict[str, Any]]) -> Iterator[None]:
        """While the block runs, the base optimizer's param groups are ``groups`` with every part in its
        group (ZeRO-1/2: the groups as they are; ZeRO-3: as DeepSpeed's checkpoint shows them)."""
        opt = engine.optimizer
        view, saved = opt.param_groups, [g["params"] for g in groups]
        opt.param_groups = groups
        if self.stage3:
            by_group: list[list[Tensor]] = [[] for _ in groups]
            for k, p in enumerate(self.parts()):
                by_group[self.group_of(k)].append(p)
            for g, params in zip(groups, by_group):
                g["params"] = params
        try:
            yield
        finally:
            for g, params in zip(groups, saved):
                g["params"] = params
            opt.param_groups = view

    def copy_to_model(self, k: int) -> None:
        """Make the model's copy of part k from its fp32 partition again, as DeepSpeed does after its step."""
        z = self.zero
        if self.stage3:
            z._reassign_or_swap_out_partitioned_parameters(k)
            return
        import torch.distributed as dist

        rank = dist.get_rank(group=z.real_dp_process_group[k])
        z.parallel_partitioned_bit16_groups[k][rank].data.copy_(z.single_partition_of_fp32_groups[k].data)

