"""Param groups for ``per_group=True``: the grouping the run-length study found worth a tuner each."""

from __future__ import annotations

from typing import Any, Iterable

from torch import Tensor


def layer_groups(params: Iterable[Tensor], **group: Any) -> list[dict[str, Any]]:
    """``params`` (in the model's order, e.g. ``model.parameters()``) as one param group per layer:
    each matrix (``dim() >= 2``) opens a group that takes the vectors after it (its bias, a following
    norm's weight and bias); leading vectors form a group of their own. ``group`` (e.g. ``lr=``,
    ``weight_decay=``) goes into every group. For ``mechanize(AdamW(layer_groups(...)), per_group=True)``,
    see docs/tuning.md, "Per-group scales"."""
    out: list[dict[str, Any]] = []
    for p in params:
        if not out or p.dim() >= 2:
            out.append({**group, "params": []})
        out[-1]["params"].append(p)
    if not out:
        raise ValueError("layer_groups got no parameters; pass e.g. model.parameters()")
    return out
