"""help() documents the public faces: every Options field with its doc and default, what None means in each
variant (manic.options.DEFAULTS), what construction raises, what it returns, and what it reads out."""

from __future__ import annotations

import dataclasses
import pydoc
import re
import subprocess
import sys

import pytest
import torch

import manic
from manic.apidoc import READOUTS
from manic.options import DEFAULTS, Options

FACES = {"mechanize": manic.mechanize, "Mechanic": manic.Mechanic}


def help_text(obj: object) -> str:
    """What ``help(obj)`` prints, with whitespace runs made one space (the entries are wrapped)."""
    text = pydoc.render_doc(obj, renderer=pydoc.plaintext)
    return " ".join(re.sub(r"^ \|", "", text, flags=re.M).split())  # a class's lines start with " |"


def section(text: str, name: str) -> str:
    """The text of section ``name:`` up to the next section heading."""
    found = re.search(rf" {name}: (.*?)(?= (?:Args|Returns|Raises|Readouts|Method resolution order):|$)", text)
    assert found, f"no {name} section"
    return found.group(1)


@pytest.mark.parametrize("face", FACES)
def test_every_option_is_documented_with_its_default(face):
    args = section(help_text(FACES[face]), "Args")
    for f in dataclasses.fields(Options):
        doc = " ".join(f.metadata["doc"].split())
        assert doc, f"Options.{f.name} has no doc"
        assert f"{f.name} ({f.type}, default {f.default!r}): {doc}" in args, f.name


@pytest.mark.parametrize("face", FACES)
def test_none_is_documented_per_variant_from_defaults(face):
    args = section(help_text(FACES[face]), "Args")
    for name in {n for values in DEFAULTS.values() for n in values}:
        entry = re.search(rf"{name} \([^)]*\): .*?None: (.*?)(?= \w+ \(|$)", args)
        assert entry, name
        said = dict((v, float(x)) for x, v in re.findall(r"([-+.\deE]+) \((\w+)\)", entry.group(1)))
        assert said == {variant: values[name] for variant, values in DEFAULTS.items()}, (name, entry.group(1))


@pytest.mark.parametrize("face", [*FACES, "Mechanized"])
def test_readouts_are_documented_and_exist(face):
    obj = getattr(manic, face)
    readouts = section(help_text(obj), "Readouts")
    for name in READOUTS:
        assert re.search(rf"\b{name}(\(\))?: \S", readouts), name
    p = torch.nn.Parameter(torch.zeros(2))
    built = manic.mechanize(torch.optim.SGD([p], lr=0.1)) if face != "Mechanic" else \
        manic.Mechanic(manic.Updater(torch.optim.SGD([p], lr=0.1)))
    raw = obj.__doc__.split("\nReadouts:\n", 1)[1]
    for name in re.findall(r"^    (\w+)(?:\(\))?: ", raw, re.M):  # every entry's head
        assert hasattr(built, name), name


def test_sections_exist():
    assert section(help_text(manic.mechanize), "Returns").startswith("Mechanized: ")
    for obj in (manic.mechanize, manic.Mechanic, manic.Updater):
        text = help_text(obj)
        for name in ("Args", "Raises", "Readouts"):
            assert section(text, name), (obj, name)


def _sgd() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)


def _twice() -> torch.optim.Optimizer:
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.warns(UserWarning, match="duplicate"):  # torch only warns
        return torch.optim.SGD([p, p], lr=0.1)


# One construction per kind of error the Raises section names: (base optimizer, keywords, exception).
BAD = {"LBFGS": (lambda: torch.optim.LBFGS([torch.nn.Parameter(torch.zeros(2))]), {}, TypeError),
       "unknown keyword": (_sgd, {"lr": 1.0}, TypeError),
       "wrong type": (_sgd, {"s_init": True}, TypeError),
       "out of range": (_sgd, {"eps": 0.0}, ValueError),
       "tensor twice": (_twice, {}, ValueError)}


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("case", BAD)
def test_raises_names_what_construction_raises(face, case):
    make, keywords, exc = BAD[case]
    raises = section(help_text(FACES[face]), "Raises")
    opt = make()
    with pytest.raises(exc) as err:
        manic.mechanize(opt, **keywords) if face == "mechanize" else manic.Mechanic(manic.Updater(opt), **keywords)
    assert f"{type(err.value).__name__}: " in raises


def test_readme_names_resolve_after_import_manic():
    """README writes ``manic.integrations.readout(opt)`` after a plain ``import manic`` (a fresh interpreter:
    other tests import the subpackage themselves); no framework is imported by it."""
    code = ("import sys, torch, manic\n"
            "opt = manic.mechanize(torch.optim.AdamW(torch.nn.Linear(2, 2).parameters()))\n"
            "print(sorted(manic.integrations.readout(opt)))\n"
            "print(any(m.split('.')[0] in ('transformers', 'lightning', 'deepspeed') for m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:2] == ["['mechanic/effective_lr', 'mechanic/scale']", "False"], done.stdout
