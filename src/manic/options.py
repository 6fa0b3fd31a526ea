"""Every keyword Mechanic takes, with its default and its check, written once.

``mechanize(...)``, ``Mechanic(...)`` and the launcher all build an ``Options``; README's option
tables list its fields (a test keeps the two in step).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, fields
from typing import Any, Callable

from .tuner import Hyper


# What s_init=None and weight_decay=None mean in each variant: the original's are optax's, the
# invariant form's come from the study in docs/tuning.md.
DEFAULTS = {"invariant": {"s_init": 1e-3, "weight_decay": 4.0}, "original": {"s_init": 1e-6, "weight_decay": 1e-2}}


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@dataclass(frozen=True)
class Options:
    """Mechanic's hyperparameters and options (keyword arguments of ``mechanize`` and ``Mechanic``)."""

    # hyperparameters of the tuner (docs/algorithm.md)
    weight_decay: float | None = field(default=None, metadata=_doc(
        "Mechanic's own decay lambda (None: 4 invariant, on S * lr; 1e-2 original, on S)"))
    eps: float = field(default=1e-8, metadata=_doc("numerical floor in the tuner"))
    s_init: float | None = field(default=None, metadata=_doc(
        "the start: an effective lr (invariant; None: 1e-3), or the initial scale (original; None: 1e-6)"))
    num_betas: int = field(default=6, metadata=_doc("betas 1 - 10**-i, i = 1..n"))
    store_delta: bool = field(default=True, metadata=_doc(
        "the older spelling of state: True 'ref+delta', False 'ref' (used when state is None)"))
    variant: str = field(default="invariant", metadata=_doc(
        "'invariant': the scale in units of the base lr; 'original': the authors' update"))
    per_group: bool = field(default=False, metadata=_doc("one tuner (and scale) per param group"))
    state: str | None = field(default=None, metadata=_doc(
        "what is kept per parameter: 'ref+delta' (x_ref and Delta), 'ref' (x_ref; Delta recomputed) or 'delta' "
        "(Delta; x_ref implied); None: from store_delta"))
    # how it runs
    reducer: Any = field(default=None, metadata=_doc("object with all_reduce_sum(tensor) -> tensor"))
    process_group: Any = field(default=None, metadata=_doc("group to all-reduce the sums over"))
    device_mesh: Any = field(default=None, metadata=_doc("mesh whose dims the sums are reduced over"))
    skip_nonfinite: bool = field(default=False, metadata=_doc("skip the base step when the sums are not finite"))
    compile: bool = field(default=False, metadata=_doc("fuse the per-tensor work with torch.compile"))
    fp32_reference: bool = field(default=False, metadata=_doc("x_ref in float32 for 16-bit parameters"))

    def __post_init__(self) -> None:
        self.hyper  # noqa: B018  (validates the hyperparameters)
        if self.reducer is not None:
            if not callable(getattr(self.reducer, "all_reduce_sum", None)):
                raise TypeError(f"Invalid reducer: {self.reducer!r}; pass an object with "
                                "all_reduce_sum(tensor) -> tensor")
            if self.process_group is not None or self.device_mesh is not None:
                raise ValueError("Pass one of reducer=, process_group= and device_mesh=")
        if self.process_group is not None and self.device_mesh is not None:
            raise ValueError("Pass process_group= or device_mesh=, not both")
        for name in ("skip_nonfinite", "compile", "fp32_reference"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Invalid {name}: {getattr(self, name)!r}; pass True or False")
        if self.fp32_reference and self.hyper.state == "delta":
            raise ValueError("fp32_reference=True widens x_ref, but state='delta' keeps no x_ref (its Delta is "
                             "float32 for 16-bit parameters already); drop fp32_reference")

    @property
    def hyper(self) -> Hyper:
        default = DEFAULTS.get(self.variant, DEFAULTS["original"])
        s_init = default["s_init"] if self.s_init is None else self.s_init
        weight_decay = default["weight_decay"] if self.weight_decay is None else self.weight_decay
        return Hyper(weight_decay=weight_decay, eps=self.eps, s_init=s_init, num_betas=self.num_betas,
                     store_delta=self.store_delta, variant=self.variant, per_group=self.per_group, state=self.state)

    @classmethod
    def from_kwargs(cls, where: str, kwargs: dict[str, Any]) -> "Options":
        unknown = sorted(set(kwargs) - set(NAMES))
        if unknown:
            raise TypeError(f"{where}() got unexpected keyword arguments {unknown}; Mechanic's keywords are "
                            f"{', '.join(NAMES)}")
        return cls(**kwargs)


NAMES = tuple(f.name for f in fields(Options))
HYPER_NAMES = NAMES[:7]


def with_options_signature(fn: Callable) -> Callable:
    """Give ``fn(first, **options)`` the keyword-only signature of ``Options``, for help() and IDEs."""
    sig = inspect.signature(fn)
    head = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    keywords = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
                for f in fields(Options)]
    fn.__signature__ = sig.replace(parameters=head + keywords)  # type: ignore[attr-defined]
    return fn
