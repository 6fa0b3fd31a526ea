"""options.py: one validated Options object; every entry point takes exactly its fields, and the
documentation's option tables list exactly those fields with their defaults."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from pathlib import Path

import pytest
import torch

import manic
from manic import tuner
from manic.options import DEFAULTS, DISTANCE_FLOOR, HYPER_NAMES, NAMES, Hyper, Options

ROOT = Path(__file__).resolve().parents[1]


def documented_options() -> dict[str, object]:
    """{keyword: default} from every "| keyword | default | meaning |" table in README and docs/."""
    out: dict[str, object] = {}
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        in_table = False
        for line in path.read_text().splitlines():
            if re.match(r"\|\s*keyword\s*\|\s*default\s*\|", line):
                in_table = True
                continue
            if in_table and not line.startswith("|"):
                in_table = False
            if in_table and not line.startswith("| ---"):
                cells = [c.strip() for c in line.strip("|").split("|")]
                default = ast.literal_eval(cells[1].strip("`"))
                for name in re.findall(r"`(\w+)`", cells[0]):
                    assert name not in out or out[name] == default, f"{name} documented twice, differently"
                    out[name] = default
    return out


def test_documented_options_are_exactly_the_fields_with_their_defaults():
    documented = documented_options()
    fields = {f.name: f.default for f in dataclasses.fields(Options)}
    assert set(documented) == set(fields), (set(documented) ^ set(fields))
    for name, default in fields.items():
        assert documented[name] == default and type(documented[name]) is type(default), name


def test_documented_per_variant_defaults_are_manics():
    """The rows of the options that default to None say what None means in each variant, with
    the values of manic.options.DEFAULTS (which a study may still change)."""
    rows = {}
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for line in path.read_text().splitlines():
            cells = [c.strip() for c in line.strip("|").split("|")]
            if line.startswith("|") and len(cells) >= 3 and re.fullmatch(r"`(s_init|weight_decay)`", cells[0]):
                rows[cells[0].strip("`")] = cells[2]
    assert set(rows) == {"s_init", "weight_decay"}
    for name, meaning in rows.items():
        for variant, values in DEFAULTS.items():
            said = re.search(rf"`([^`]+)`[^`]*{variant}", meaning)  # "`value` ... variant"
            assert said and ast.literal_eval(said.group(1)) == values[name], (name, variant, meaning)


def test_none_resolves_per_variant():
    assert set(DEFAULTS) == {"invariant", "original"}
    assert DEFAULTS["original"] == {"s_init": 1e-6, "weight_decay": 1e-2}  # optax's (the invariant's may change)
    assert DISTANCE_FLOOR == {"invariant": False, "original": False}  # the original form has none
    assert Options().variant == "invariant" and Options().s_init is None and Options().weight_decay is None
    for variant, values in DEFAULTS.items():
        h = Options(variant=variant).hyper
        assert (h.variant, h.s_init, h.weight_decay) == (variant, values["s_init"], values["weight_decay"])
        assert h.distance_floor is DISTANCE_FLOOR[variant]
        # an explicit value is kept, in either variant
        h = Options(variant=variant, s_init=3e-4, weight_decay=0.0).hyper
        assert (h.s_init, h.weight_decay) == (3e-4, 0.0)
    with pytest.raises(ValueError, match="variant"):
        Options(variant="both")


@pytest.mark.parametrize("entry", ["mechanize", "Mechanic"])
def test_entry_points_show_the_options_signature(entry):
    fn = manic.mechanize if entry == "mechanize" else manic.Mechanic
    params = inspect.signature(fn).parameters
    keywords = {n: p.default for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert keywords == {f.name: f.default for f in dataclasses.fields(Options)}


def test_entry_points_build_the_same_options():
    kw = dict(weight_decay=0.05, eps=1e-7, s_init=1e-5, num_betas=3, store_delta=False, skip_nonfinite=True,
              fp32_reference=True, reducer=manic.NoReduce())
    p = [torch.zeros(2, requires_grad=True)]
    a = manic.mechanize(torch.optim.SGD(p, lr=0.1), **kw).options
    b = manic.Mechanic(manic.Updater(torch.optim.SGD(p, lr=0.1)), **kw).options
    c = manic.Mechanized(torch.optim.SGD(p, lr=0.1), Options(**kw)).options
    assert a == b == c == Options(**kw)
    assert a.hyper == manic.Hyper(weight_decay=0.05, eps=1e-7, s_init=1e-5, num_betas=3, store_delta=False,
                                  variant="invariant")
    kw["variant"] = "original"
    a = manic.mechanize(torch.optim.SGD(p, lr=0.1), **kw).options
    b = manic.Mechanic(manic.Updater(torch.optim.SGD(p, lr=0.1)), **kw).options
    assert a == b == Options(**kw) and a.hyper.variant == "original"


def test_options_are_frozen_and_validated_once():
    o = Options()
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.eps = 1.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="s_init"):
        Options(s_init=-1.0)
    with pytest.raises(TypeError, match="unexpected keyword.*lr"):
        Options.from_kwargs("mechanize", {"lr": 1.0})
    assert NAMES[:5] == ("weight_decay", "eps", "s_init", "num_betas", "store_delta")
    assert HYPER_NAMES == NAMES[:8] == (*NAMES[:5], "variant", "per_group", "distance_floor")


def test_the_launcher_builds_its_mechanic_options_from_options():
    import sys

    sys.path.insert(0, str(ROOT / "launch"))
    try:
        import config
    finally:
        sys.path.pop(0)
    assert config.parse([]).mechanic_options == Options()
    cfg = config.parse(["--s-init", "1e-4", "--no-store-delta", "--mechanic-eps", "1e-7", "--compile"])
    assert cfg.mechanic_options == Options(s_init=1e-4, store_delta=False, eps=1e-7, compile=True)
    cfg = config.parse(["--variant", "original", "--mechanic-weight-decay", "0.5"])
    assert cfg.mechanic_options == Options(variant="original", weight_decay=0.5)
    assert set(config.MECHANIC_FLAGS) == {f.name for f in dataclasses.fields(Options)} - {
        "reducer", "process_group", "device_mesh"}
    with pytest.raises(SystemExit, match="s_init"):
        config.parse(["--s-init", "-1"])
    with pytest.raises(SystemExit, match="variant"):
        config.parse(["--variant", "both"])


def test_the_launcher_follows_the_short_run_rule():
    """docs/tuning.md's rule: from scratch, runs of at most 300 steps start the invariant form at s_init=1e-2;
    an explicit --s-init, the original form and longer runs keep theirs."""
    import sys

    sys.path.insert(0, str(ROOT / "launch"))
    try:
        import config
    finally:
        sys.path.pop(0)
    assert config.parse(["--steps", "300"]).mechanic_options == Options(s_init=1e-2)
    assert config.parse(["--steps", "301"]).mechanic_options == Options()
    assert config.parse(["--steps", "100", "--s-init", "1e-3"]).mechanic_options == Options(s_init=1e-3)
    assert config.parse(["--steps", "100", "--variant", "original"]).mechanic_options == Options(variant="original")


# --------------------------------------------------------------------------- Hyper, the deprecated spelling
def test_hyper_defaults():
    """Hyper's own defaults are the original form's (Options resolves the per-variant defaults)."""
    h = Hyper()
    assert (h.weight_decay, h.eps, h.s_init, h.num_betas, h.store_delta) == (1e-2, 1e-8, 1e-6, 6, True)
    assert h.variant == "original"
    assert tuner.VARIANTS == ("invariant", "original")


@pytest.mark.parametrize("kwargs, exc, name", [
    ({"num_betas": 0}, ValueError, "num_betas"),
    ({"num_betas": -2}, ValueError, "num_betas"),
    ({"num_betas": 1.5}, ValueError, "num_betas"),
    ({"num_betas": True}, ValueError, "num_betas"),
    ({"weight_decay": -0.1}, ValueError, "weight_decay"),
    ({"weight_decay": float("nan")}, ValueError, "weight_decay"),
    ({"weight_decay": float("inf")}, ValueError, "weight_decay"),
    ({"weight_decay": "0.1"}, TypeError, "weight_decay"),
    ({"weight_decay": True}, TypeError, "weight_decay"),
    ({"eps": 0.0}, ValueError, "eps"),
    ({"eps": -1e-8}, ValueError, "eps"),
    ({"eps": float("-inf")}, ValueError, "eps"),
    ({"eps": None}, TypeError, "eps"),
    ({"s_init": 0.0}, ValueError, "s_init"),
    ({"s_init": -1.0}, ValueError, "s_init"),
    ({"s_init": float("nan")}, ValueError, "s_init"),
    ({"s_init": torch.tensor(1e-6)}, TypeError, "s_init"),
    ({"store_delta": 1}, TypeError, "store_delta"),
    ({"store_delta": "yes"}, TypeError, "store_delta"),
    ({"variant": "scale_free"}, ValueError, "variant"),
    ({"variant": None}, ValueError, "variant"),
    ({"variant": "Invariant"}, ValueError, "variant"),
])
def test_hyper_validation_names_the_argument(kwargs, exc, name):
    with pytest.raises(exc) as info:
        Hyper(**kwargs)
    assert f"Invalid {name}" in str(info.value)


def test_hyper_accepts_edge_values():
    Hyper(weight_decay=0.0, eps=1e-30, s_init=1, num_betas=1, store_delta=False)  # int accepted as float
    for variant in tuner.VARIANTS:
        Hyper(variant=variant)
