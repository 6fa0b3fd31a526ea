"""Keep README.md and docs/*.md true to the files they show: one command regenerates everything.

    python tools/sync_docs.py           # derive the summary tables from the benchmark CSVs, then
                                        # refresh every include block in README.md and docs/*.md
    python tools/sync_docs.py --check   # exit 1 if anything is out of date (a test runs this)

An include block is

    <!-- include: examples/quickstart.py -->
    ...whatever is here is replaced...
    <!-- end include -->

A ``.py`` file is shown as a fenced Python block, anything else (the ``.md`` tables the
benchmarks write) as it is. A number in a sentence is an inline include, on one line:

    compiled, it runs at <!-- include: benchmarks/results/step_overhead_numbers.md#compile_bandwidth -->50% / 57% / 71%<!-- end include --> of ...

which takes the value of the row whose key is ``compile_bandwidth`` in that file's
``| key | value | what |`` table (benchmarks/report.py writes these ``*_numbers.md`` files from
the CSVs). A few lines of an example, for a page that shows only the lines that matter, are a
fragment include:

    <!-- include: examples/fsdp2.py#fully_shard,build -->
    ...replaced by those lines of the file, as a fenced Python block...
    <!-- end include -->

Each comma-separated name picks, in the file's order: a top-level function or class (``build``), a
method with its class line (``Regression.configure_optimizers``), an imported name (its import
line), or every statement that assigns a variable (``opt``; also inside ``with``/``for``/``if``
blocks, dedented). So every snippet is a file a test runs, and every number a file a benchmark wrote.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- include: (?P<path>[^ #]+) -->\n)(?P<body>.*?)(<!-- end include -->)", re.S)
FRAGMENT = re.compile(r"(<!-- include: (?P<path>[^ #]+\.py)#(?P<names>[^ ]+) -->\n)(?P<body>.*?)(<!-- end include -->)", re.S)
INLINE = re.compile(r"(<!-- include: (?P<path>[^ #]+)#(?P<key>[^ ]+) -->)(?P<body>[^\n]*?)(<!-- end include -->)")


def render(path: str) -> str:
    text = (ROOT / path).read_text().rstrip("\n") + "\n"
    return f"```python\n{text}```\n" if path.endswith(".py") else text


def _blocks(body: list[ast.stmt]):
    """The statements of ``body`` and, recursively, of the blocks inside them (not of functions or classes)."""
    for node in body:
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                yield from _blocks(getattr(node, field, []) or [])


def _assigns(node: ast.stmt, name: str) -> bool:
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
        node, (ast.AnnAssign, ast.AugAssign)) else []
    return any(isinstance(t, ast.Name) and t.id == name for target in targets for t in ast.walk(target))


def fragment(path: str, names: str) -> str:
    """The lines of ``path`` that ``names`` pick (see the module docstring), as a fenced Python block."""
    source = (ROOT / path).read_text()
    lines, tree = source.splitlines(), ast.parse(source)
    picked: dict[int, str] = {}  # first line -> text
    for name in names.split(","):
        found = []
        if "." in name:
            owner, method = name.split(".", 1)
            for cls in tree.body:
                if isinstance(cls, ast.ClassDef) and cls.name == owner:
                    for node in cls.body:
                        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == method:
                            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                            found.append((cls.lineno, lines[cls.lineno - 1] + "\n" + "\n".join(
                                lines[first - 1:node.end_lineno])))
        else:
            for node in _blocks(tree.body):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name \
                        and node in tree.body:
                    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                elif isinstance(node, (ast.Import, ast.ImportFrom)) and any(
                        (a.asname or a.name) == name for a in node.names):
                    first = node.lineno
                elif _assigns(node, name):
                    first = node.lineno
                else:
                    continue
                found.append((first, textwrap.dedent("\n".join(lines[first - 1:node.end_lineno]))))
        if not found:
            raise SystemExit(f"{path} has no {name!r} to include")
        picked.update(found)
    text = "\n".join(picked[k] for k in sorted(picked))
    return f"```python\n# from {path}\n{text}\n```\n"


def values(path: str) -> dict[str, str]:
    """The ``| `key` | value | what |`` rows of a generated numbers file, as key -> value."""
    rows = re.findall(r"^\| `([^`]+)` \| ([^|]+?) \|", (ROOT / path).read_text(), re.M)
    return dict(rows)


def sync(doc: Path) -> str:
    text = doc.read_text()
    for m in [*BLOCK.finditer(text), *FRAGMENT.finditer(text), *INLINE.finditer(text)]:
        if not (ROOT / m["path"]).exists():
            raise SystemExit(f"{doc.relative_to(ROOT)} includes {m['path']}, which does not exist")
    text = BLOCK.sub(lambda m: m.group(1) + render(m["path"]) + m.group(4), text)
    text = FRAGMENT.sub(lambda m: m.group(1) + fragment(m["path"], m["names"]) + m.group(5), text)

    def value(m: re.Match) -> str:
        table = values(m["path"])
        if m["key"] not in table:
            raise SystemExit(f"{doc.relative_to(ROOT)} includes {m['path']}#{m['key']}, which has no such key")
        return m.group(1) + table[m["key"]] + m.group(5)

    return INLINE.sub(value, text)


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a document is stale")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import report  # benchmarks/report.py: summary tables derived from the benchmarks' CSVs

    stale = report.main(check=args.check)
    for doc in documents():
        new = sync(doc)
        if new != doc.read_text():
            stale.append(str(doc.relative_to(ROOT)))
            if not args.check:
                doc.write_text(new)
    if args.check and stale:
        raise SystemExit(f"out of date: {', '.join(stale)}; run python tools/sync_docs.py")
    print("up to date" if args.check else f"updated: {', '.join(stale) or 'nothing'}")


if __name__ == "__main__":
    main()
