"""help() text of the public faces (``mechanize``, ``Mechanized``, ``Mechanic``): their docstrings are
written by hand but for what would repeat the code, which ``api_doc`` adds at import time: an Args entry
per field of ``Options`` (options.field_doc: its doc and what None means in each variant, from DEFAULTS),
and the readouts, from the docstrings of readout.TunerReadout."""

from __future__ import annotations

import inspect
import textwrap
from dataclasses import fields
from typing import Callable, TypeVar

from .options import Options, field_doc
from .readout import TunerReadout

T = TypeVar("T")
WIDTH = 100
READOUTS = ("scale", "effective_lr", "stats", "hyper", "options")
# What building a Mechanic raises (engine._check_optimizer, Options.__post_init__, from_kwargs), and, since it
# binds the parameters late, what its first step raises (layout.bind, step.lr_unit, reduce.check_config,
# partitions).
RAISES = """\
    TypeError: the first argument is not what it takes (``mechanize``: a ``torch.optim.Optimizer``;
        ``Mechanic``: a ``manic.Updater``); the base optimizer is already under Mechanic, or is
        ``torch.optim.LBFGS`` (not supported: it re-evaluates the closure at trial points); a keyword that is not
        an option; an option of the wrong type (``s_init=True``; a reducer without ``all_reduce_sum``).
    ValueError: an option out of range or at odds with another (``eps=0``, an unknown ``variant`` or ``state``,
        ``store_delta=False`` with another ``state``, ``fp32_reference=True`` with ``state="delta"``, two of
        ``reducer``, ``process_group`` and ``device_mesh``); a tensor listed twice in ``param_groups``; the base
        optimizer holds ``mechanic_*`` keys (a mechanized checkpoint loaded into the plain optimizer: wrap
        first, then load).

    At the first step, where Mechanic reads the parameters: ValueError if no parameter is under Mechanic, they
    are on several devices, the ranks built Mechanic differently, or (invariant form) the largest lr is not
    finite and positive; TypeError for complex or integer parameters; RuntimeError for sparse gradients;
    under DeepSpeed ZeRO with several parts, ValueError for ``skip_nonfinite=True`` and NotImplementedError
    for optimizer offload."""


def _entry(head: str, text: str) -> str:
    """One Google-style entry, ``head: text``, wrapped with the continuation indented."""
    return textwrap.fill(f"{head}: {' '.join(text.split())}", WIDTH, initial_indent="    ",
                         subsequent_indent="        ")


def options_args() -> str:
    """One Args entry per field of ``Options``: name, type and default, then its doc."""
    return "\n".join(_entry(f"{f.name} ({f.type}, default {f.default!r})", field_doc(f)) for f in fields(Options))


def readout_entries() -> str:
    """The values both faces expose (TunerReadout), one entry each, from their docstrings."""
    def entry(name: str) -> str:
        member = getattr(TunerReadout, name)
        return _entry(f"{name}()" if callable(member) else name, inspect.getdoc(member) or "")
    return "\n".join(entry(name) for name in READOUTS)


def _extend(doc: str, section: str, entries: str) -> str:
    """``doc`` with ``entries`` at the end of its section ``section:``, which ends at a blank line."""
    start = doc.index(f"\n{section}:")
    end = doc.find("\n\n", start + 1)
    end = len(doc) if end < 0 else end
    return doc[:end] + "\n" + entries + doc[end:]


def api_doc(*, options: bool = False, readouts: bool = False) -> Callable[[T], T]:
    """Complete the decorated object's docstring: with ``options``, every ``Options`` field at the end of its
    ``Args:`` section and what building a Mechanic raises at the end of ``Raises:``; with ``readouts``, the
    readouts at the end of its ``Readouts:`` section."""
    def complete(obj: T) -> T:
        if obj.__doc__ is None:  # python -OO
            return obj
        doc = inspect.cleandoc(obj.__doc__)
        if options:
            doc = _extend(_extend(doc, "Args", options_args()), "Raises", RAISES)
        if readouts:
            doc = _extend(doc, "Readouts", readout_entries())
        obj.__doc__ = doc
        return obj
    return complete
