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
from manic.options import NAMES, Options

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
    assert a.hyper == manic.Hyper(weight_decay=0.05, eps=1e-7, s_init=1e-5, num_betas=3, store_delta=False)


def test_options_are_frozen_and_validated_once():
    o = Options()
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.eps = 1.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="s_init"):
        Options(s_init=-1.0)
    with pytest.raises(TypeError, match="unexpected keyword.*lr"):
        Options.from_kwargs("mechanize", {"lr": 1.0})
    assert NAMES[:5] == ("weight_decay", "eps", "s_init", "num_betas", "store_delta")


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
    assert set(config.MECHANIC_FLAGS) == {f.name for f in dataclasses.fields(Options)} - {
        "reducer", "process_group", "device_mesh"}
    with pytest.raises(SystemExit, match="s_init"):
        config.parse(["--s-init", "-1"])
