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
the CSVs). So every snippet is a file a test runs, and every number a file a benchmark wrote.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- include: (?P<path>[^ #]+) -->\n)(?P<body>.*?)(<!-- end include -->)", re.S)
INLINE = re.compile(r"(<!-- include: (?P<path>[^ #]+)#(?P<key>[^ ]+) -->)(?P<body>[^\n]*?)(<!-- end include -->)")


def render(path: str) -> str:
    text = (ROOT / path).read_text().rstrip("\n") + "\n"
    return f"```python\n{text}```\n" if path.endswith(".py") else text


def values(path: str) -> dict[str, str]:
    """The ``| `key` | value | what |`` rows of a generated numbers file, as key -> value."""
    rows = re.findall(r"^\| `([^`]+)` \| ([^|]+?) \|", (ROOT / path).read_text(), re.M)
    return dict(rows)


def sync(doc: Path) -> str:
    text = doc.read_text()
    for m in [*BLOCK.finditer(text), *INLINE.finditer(text)]:
        if not (ROOT / m["path"]).exists():
            raise SystemExit(f"{doc.relative_to(ROOT)} includes {m['path']}, which does not exist")
    text = BLOCK.sub(lambda m: m.group(1) + render(m["path"]) + m.group(4), text)

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
