"""Summary tables derived from the CSVs the benchmarks write (no training: seconds).

    python benchmarks/report.py            # writes benchmarks/results/*_summary.md
    python tools/sync_docs.py              # runs this, then refreshes README.md and docs/

Every number the documentation quotes about these runs is in one of these files.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PEERS = {"prodigy", "dadapt_adam"}  # sweep a multiplier of their own estimate, not a learning rate
NAMES = {"adamw": "AdamW", "manic_adamw": "manic (original) over AdamW", "manic_sgd": "manic (original) over SGD (momentum)",
         "mechanic_pytorch_adamw": "mechanic-pytorch over AdamW", "schedulefree_adamw": "schedule-free AdamW",
         "prodigy": "Prodigy (multiplier)", "dadapt_adam": "D-Adaptation Adam (multiplier)"}


def _fmt(x: float, digits: int = 2) -> str:
    return "diverged" if not math.isfinite(x) else f"{x:.{digits}f}"


def lr_sweep(path: Path, tasks: tuple[str, ...] = ()) -> str:
    rows = [r for r in csv.DictReader(path.open()) if not tasks or r["task"] in tasks]
    cell: dict[tuple[str, str, float], list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        cell[r["task"], r["method"], float(r["lr"])].append((float(r["val_loss"]), float(r["val_acc"])))
    out = ["Seed means of the final validation loss (and accuracy for digits) at each point of the sweep. "
           "Learning rates 1e-6 ... 1 for every method but Prodigy and D-Adaptation, which sweep a multiplier "
           "1e-3 ... 1e3 of their own estimate (same column order). `diverged`: a seed ended non-finite.", ""]
    for task in sorted({r["task"] for r in rows}):
        methods = [m for m in NAMES if any(k[0] == task and k[1] == m for k in cell)]
        for metric, idx, digits in (("val loss", 0, 2), ("val acc", 1, 3)):
            if task != "digits" and metric == "val acc":
                continue
            out += [f"**{task}, {metric}**", "",
                    "| method | " + " | ".join(f"lr 1e{e}" for e in range(-6, 1)) + " | range over the sweep |",
                    "| --- " * 9 + "|"]
            for m in methods:
                lrs = sorted(lr for (t, mm, lr) in cell if t == task and mm == m)
                means = [statistics.fmean(v[idx] for v in cell[task, m, lr]) for lr in lrs]
                finite = [x for x in means if math.isfinite(x)]
                span = f"{_fmt(min(finite), digits)} - {_fmt(max(finite), digits)}" if finite else ""
                out.append(f"| {NAMES[m]} | " + " | ".join(_fmt(x, digits) for x in means) + f" | {span} |")
            out.append("")
        ramp = _ramp(rows, task)
        if ramp:
            out += [f"manic (original) over AdamW on {task}, seed 0: {ramp}", ""]
    return "\n".join(out)


def _ramp(rows: list[dict[str, str]], task: str) -> str:
    """Steps the scale needs to reach half of its final value, over the swept learning rates
    (lr_sweep.py records the scale after steps 1, 11, 21, ...)."""
    steps = []
    for r in rows:
        if r["task"] == task and r["method"] == "manic_adamw" and r["seed"] == "0" and r["scales"]:
            s = [float(v) for v in r["scales"].split()]
            steps.append(next(10 * i + 1 for i, v in enumerate(s) if v >= s[-1] / 2))
    if not steps:
        return ""
    return (f"the scale first reaches half of its final value after {min(steps)} - {max(steps)} steps "
            f"(median {statistics.median(steps):g}; recorded every 10 steps) of {10 * len(s)}, across the "
            f"{len(steps)} learning rates.")


def launcher(path: Path) -> str:
    """The launcher's default job with Mechanic (``path``) and with the base optimizer alone (``*_adamw.csv``)."""
    rows = list(csv.DictReader(path.open()))
    alone = path.with_name(path.stem + "_adamw.csv")
    base = {r["step"]: r for r in csv.DictReader(alone.open())} if alone.exists() else {}
    scale = {int(r["step"]): float(r["scale"]) for r in rows if r.get("scale")}
    marks = [s for s in (10, 20, 40, 60, 80, 100, 150, 200, 300, 400, 500) if s in scale]
    out = ["| step | " + " | ".join(map(str, marks)) + " |", "| --- " * (len(marks) + 1) + "|",
           "| scale | " + " | ".join(f"{scale[s]:.3g}" for s in marks) + " |", ""]
    steps = sorted(scale)
    first = next((s for s in steps if scale[s] >= 0.1), None)
    top = max(steps, key=scale.__getitem__)
    out.append(f"Scale: {scale[steps[0]]:.3g} at step {steps[0]}; first at or above 0.1 at step {first}; highest "
               f"{scale[top]:.3g} at step {top}; {scale[steps[-1]]:.3g} at the last step ({steps[-1]}).")
    out += ["", "| step | validation loss, manic | validation loss, base optimizer alone |", "| --- | --- | --- |"]
    for r in rows:
        if r.get("val_loss"):
            other = base.get(r["step"], {}).get("val_loss") or ""
            out.append(f"| {r['step']} | {float(r['val_loss']):.3f} | {float(other):.3f} |" if other
                       else f"| {r['step']} | {float(r['val_loss']):.3f} | |")
    return "\n".join(out)


def main(check: bool = False) -> list[str]:
    """Write (or, with ``check``, compare) the summaries; return the stale ones."""
    jobs = {"lr_sweep_summary.md": (lr_sweep, RESULTS / "lr_sweep.csv"),
            "lr_sweep_charlm.md": (lambda p: lr_sweep(p, ("charlm",)), RESULTS / "lr_sweep.csv")}
    if (RESULTS / "run_length.csv").exists():
        import run_length_report as rl

        jobs["run_length_summary.md"] = (lambda p: rl.summary(rl.load(p)), RESULTS / "run_length.csv")
        jobs["run_length_front.md"] = (lambda p: rl.front(rl.load(p)), RESULTS / "run_length.csv")
    for csv_path in sorted(RESULTS.glob("launcher_*.csv")):
        if not csv_path.stem.endswith(("_adamw", "_quick")):
            jobs[f"{csv_path.stem}_summary.md"] = (launcher, csv_path)
    stale = []
    for name, (make, source) in jobs.items():
        text = make(source).rstrip("\n") + f"\n\nDerived from {source.relative_to(RESULTS.parent.parent)} by " \
                                           "benchmarks/report.py.\n"
        target = RESULTS / name
        if not target.exists() or target.read_text() != text:
            stale.append(str(target.relative_to(RESULTS.parent.parent)))
            if not check:
                target.write_text(text)
    return stale


if __name__ == "__main__":
    print("written:", ", ".join(main()) or "nothing changed")
