"""README.md and docs/ say only what the repository shows: includes are in sync, links resolve,
every Python snippet is a tested example, the tests the guarantees cite exist, and CI runs the
two commands README gives."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_includes_are_in_sync():
    out = subprocess.run([sys.executable, "tools/sync_docs.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_links_resolve():
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" not in target and not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_every_python_snippet_is_an_included_example():
    free = []
    for doc in DOCS:
        outside = re.sub(r"<!-- include: [^ ]+ -->\n.*?<!-- end include -->", "", doc.read_text(), flags=re.S)
        if "```python" in outside:
            free.append(str(doc.relative_to(ROOT)))
    assert not free, f"Python blocks outside an include of examples/: {free}"


def test_no_citation_of_a_missing_specification():
    """The specification is docs/algorithm.md; nothing may cite a file the repository lacks."""
    offenders = []
    for path in [*DOCS, *ROOT.glob("src/manic/*.py"), *ROOT.glob("tests/**/*.py"), *ROOT.glob("benchmarks/*.py")]:
        if path.name == "test_docs.py":
            continue
        if "ALGORITHM.md" in path.read_text():
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, offenders


def test_cited_tests_exist():
    missing = []
    text = (ROOT / "docs" / "guarantees.md").read_text()
    for file, names in re.findall(r"`((?:distributed/|frameworks/)?test_\w+\.py|distributed/scenarios\.py)"
                                  r"((?:::\w+)?)`", text):
        path = ROOT / "tests" / file
        if not path.exists():
            missing.append(file)
        elif names and f"def {names[2:]}" not in path.read_text():
            missing.append(file + names)
    for name in re.findall(r"`::(\w+)`", text):  # "`file::a`, `::b`": b is in the same file as a
        if not any(f"def {name}(" in p.read_text() for p in (ROOT / "tests").rglob("test_*.py")):
            missing.append(name)
    assert not missing, missing


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- setup commands: .*? -->\n```bash\n(.*?)```", text, re.S)
    assert block, "README lost its setup commands block"
    return block.group(1).strip().splitlines()


def test_ci_runs_exactly_the_readme_commands():
    lines = readme_commands()
    assert len(lines) == 2 and "pip install" in lines[0] and "pytest" in lines[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "setup commands" in ci and "README.md" in ci  # it reads them from README, not a copy
    out = subprocess.run(["bash", ".ci/run", "--print"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().splitlines() == lines, out.stdout + out.stderr
