"""Every keyword Mechanic takes, with its default and its check, written once.

``mechanize(...)``, ``Mechanic(...)`` and the launcher all build an ``Options``; docs/options.md's
tables list its fields (a test keeps the two in step), and ``field_doc`` writes each field's doc for help()
(apidoc.py) and the launcher's ``--help``. ``Options.hyper`` resolves it into
``tuner.Resolved``, the record the tuner and the state modes read: every default applied, no defaults or
checks of its own.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import Field, dataclass, field, fields, replace
from typing import Any, Callable

from .modes import MODES
from .tuner import VARIANTS, Resolved

# What s_init=None and weight_decay=None mean in each variant: the original's are optax's, the
# invariant form's come from the study in docs/tuning.md.
DEFAULTS = {"invariant": {"s_init": 1e-3, "weight_decay": 4.0}, "original": {"s_init": 1e-6, "weight_decay": 1e-2}}
# What distance_floor=None means in each variant (docs/algorithm.md, "The distance floor"; only the invariant
# form can turn it on). Kept apart from DEFAULTS, whose entries the tests pass on to the NumPy reference.
DISTANCE_FLOOR = {"invariant": False, "original": False}
# The measured rule of docs/tuning.md ("How the defaults were chosen"): training from scratch for at
# most this many steps, the invariant form starts better at s_init=1e-2 than at its default.
SHORT_RUN_STEPS, SHORT_RUN_S_INIT = 300, 1e-2
STATES = tuple(MODES)


def _doc(text: str, hyper: bool = False) -> dict[str, Any]:
    """A field's metadata: its one-line doc, and whether it is one of the tuner's hyperparameters."""
    return {"doc": text, "hyper": hyper}


@dataclass(frozen=True)
class Options:
    """Mechanic's hyperparameters and options (keyword arguments of ``mechanize`` and ``Mechanic``)."""

    # hyperparameters of the tuner (docs/algorithm.md)
    weight_decay: float | None = field(default=None, metadata=_doc(
        "Mechanic's own decay lambda, on S * lr in the invariant form and on S in the original", hyper=True))
    eps: float = field(default=1e-8, metadata=_doc("numerical floor in the tuner", hyper=True))
    s_init: float | None = field(default=None, metadata=_doc(
        "the start: an effective lr in the invariant form, the initial scale in the original", hyper=True))
    num_betas: int = field(default=6, metadata=_doc("betas 1 - 10**-i, i = 1..n", hyper=True))
    store_delta: bool = field(default=True, metadata=_doc(
        "the older spelling of state: True 'ref+delta', False 'ref' (used when state is None)", hyper=True))
    variant: str = field(default="invariant", metadata=_doc(
        "'invariant': the scale in units of the base lr; 'original': the authors' update", hyper=True))
    per_group: bool = field(default=False, metadata=_doc("one tuner (and scale) per param group", hyper=True))
    distance_floor: bool | None = field(default=None, metadata=_doc(
        "keep the scale above a Prodigy-style distance estimate (invariant form only; None: the variant's "
        "default, off)", hyper=True))
    # how it runs
    state: str | None = field(default=None, metadata=_doc(
        "what is kept per parameter: 'ref+delta' (x_ref and Delta), 'ref' (x_ref; Delta recomputed) or 'delta' "
        "(Delta; x_ref implied); None: from store_delta"))
    reducer: Any = field(default=None, metadata=_doc(
        "object with all_reduce_sum(tensor) -> tensor; None (with process_group and device_mesh None): the ranks "
        "are detected from the parameters"))
    process_group: Any = field(default=None, metadata=_doc("group to all-reduce the sums over"))
    device_mesh: Any = field(default=None, metadata=_doc("mesh whose dims the sums are reduced over"))
    skip_nonfinite: bool = field(default=False, metadata=_doc("skip the base step when the sums are not finite"))
    compile: bool = field(default=False, metadata=_doc("fuse the per-tensor work with torch.compile"))
    fp32_reference: bool = field(default=False, metadata=_doc("x_ref in float32 for 16-bit parameters"))

    def __post_init__(self) -> None:
        def bad(name: str, value: object, fix: str) -> ValueError:
            return ValueError(f"Invalid {name}: {value!r}; {fix}")

        if isinstance(self.num_betas, bool) or not isinstance(self.num_betas, int) or self.num_betas < 1:
            raise bad("num_betas", self.num_betas, "pass a positive int (default 6)")
        for name in ("weight_decay", "eps", "s_init"):
            value = getattr(self, name)
            if value is None and name != "eps":
                continue  # per variant (DEFAULTS)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"Invalid {name}: {value!r}; pass a Python float")
            if value != value or value in (math.inf, -math.inf):
                raise bad(name, value, "pass a finite float")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise bad("weight_decay", self.weight_decay, "pass a value >= 0")
        if self.eps <= 0:
            raise bad("eps", self.eps, "pass a value > 0 (default 1e-8)")
        if self.s_init is not None and self.s_init <= 0:
            raise bad("s_init", self.s_init, "pass a value > 0")
        for name in ("store_delta", "per_group"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Invalid {name}: {getattr(self, name)!r}; pass True or False")
        if self.variant not in VARIANTS:
            raise bad("variant", self.variant, f"pass one of {', '.join(map(repr, VARIANTS))}")
        if self.distance_floor is not None and not isinstance(self.distance_floor, bool):
            raise TypeError(f"Invalid distance_floor: {self.distance_floor!r}; pass True, False or None")
        if self.distance_floor and self.variant != "invariant":
            raise ValueError(f"Invalid distance_floor=True with variant={self.variant!r}: the distance floor is an "
                             "effective learning rate, which only the invariant form's scale is; pass "
                             "variant='invariant' or drop distance_floor")
        if self.state is not None and self.state not in STATES:
            raise bad("state", self.state, f"pass one of {', '.join(map(repr, STATES))}")
        if self.state not in (None, "ref") and not self.store_delta:
            raise ValueError(f"Invalid store_delta=False with state={self.state!r}: store_delta=False is the older "
                             "spelling of state='ref'; pass only state=")
        check_sources(self.reducer, self.process_group, self.device_mesh)
        for name in ("skip_nonfinite", "compile", "fp32_reference"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Invalid {name}: {getattr(self, name)!r}; pass True or False")
        if self.fp32_reference and self.hyper.state == "delta":
            raise ValueError("fp32_reference=True widens x_ref, but state='delta' keeps no x_ref (its Delta is "
                             "float32 for 16-bit parameters already); drop fp32_reference")

    @property
    def hyper(self) -> Resolved:
        """These options as the tuner uses them: the variant's defaults applied, the state mode resolved."""
        default = DEFAULTS[self.variant]
        floor = DISTANCE_FLOOR[self.variant] if self.distance_floor is None else self.distance_floor
        return Resolved(variant=self.variant,
                        weight_decay=default["weight_decay"] if self.weight_decay is None else self.weight_decay,
                        eps=self.eps, s_init=default["s_init"] if self.s_init is None else self.s_init,
                        num_betas=self.num_betas,
                        # store_delta lives on only here, as the older spelling of state
                        state=self.state or ("ref+delta" if self.store_delta else "ref"), per_group=self.per_group,
                        distance_floor=floor)

    @classmethod
    def from_kwargs(cls, where: str, kwargs: dict[str, Any]) -> Options:
        unknown = sorted(set(kwargs) - set(NAMES))
        if unknown:
            raise TypeError(f"{where}() got unexpected keyword arguments {unknown}; Mechanic's keywords are "
                            f"{', '.join(NAMES)}")
        return cls(**kwargs)


def check_sources(reducer: Any, process_group: Any, device_mesh: Any) -> None:
    """Where the sums are reduced over: at most one of a reducer, a process group and a device mesh."""
    if reducer is not None:
        if not callable(getattr(reducer, "all_reduce_sum", None)):
            raise TypeError(f"Invalid reducer: {reducer!r}; pass an object with all_reduce_sum(tensor) -> tensor")
        if process_group is not None or device_mesh is not None:
            raise ValueError("Pass one of reducer=, process_group= and device_mesh=")
    if process_group is not None and device_mesh is not None:
        raise ValueError("Pass process_group= or device_mesh=, not both")


def for_run_length(options: Options, steps: int) -> Options:
    """``options`` for a run of ``steps`` steps from scratch: the invariant form's s_init=None starts at
    SHORT_RUN_S_INIT in runs of at most SHORT_RUN_STEPS steps (docs/tuning.md); else ``options``."""
    if options.s_init is None and options.variant == "invariant" and steps <= SHORT_RUN_STEPS:
        return replace(options, s_init=SHORT_RUN_S_INIT)
    return options


def Hyper(**kwargs: Any) -> Resolved:  # noqa: N802  (the name of the record it replaced)
    """Deprecated (not in ``manic.__all__``; see CHANGELOG.md): ``Options(variant="original", **kwargs).hyper``,
    what ``manic.Hyper(...)`` built when it was a record of its own with the original form's defaults."""
    return Options(**{"variant": "original", **kwargs}).hyper


NAMES = tuple(f.name for f in fields(Options))


def field_doc(f: Field) -> str:
    """A field's doc and, for the fields whose None depends on the variant, what None means in each (DEFAULTS)."""
    per_variant = [f"{values[f.name]!r} ({variant})" for variant, values in DEFAULTS.items() if f.name in values]
    return f.metadata["doc"] + (f"; None: {', '.join(per_variant)}" if per_variant else "")
HYPER_NAMES = tuple(f.name for f in fields(Options) if f.metadata["hyper"])


def with_options_signature(fn: Callable) -> Callable:
    """Give ``fn(first, **options)`` the keyword-only signature of ``Options``, for help() and IDEs."""
    sig = inspect.signature(fn)
    head = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    keywords = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
                for f in fields(Options)]
    fn.__signature__ = sig.replace(parameters=head + keywords)  # type: ignore[attr-defined]
    return fn
