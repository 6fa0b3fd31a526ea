"""Summary tables derived from the CSVs the benchmarks write (no training: seconds).

    python benchmarks/report.py            # writes benchmarks/results/*_summary.md
    python tools/sync_docs.py              # runs this, then refreshes README.md and docs/

Every number the documentation quotes about these runs is in one of these files.
"""

from __future__ import annotations

import ast
import csv
import math
import re
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
    low, top = min(steps, key=scale.__getitem__), max(steps, key=scale.__getitem__)
    tail = [scale[s] for s in steps if s > steps[-1] - 100]
    out.append(f"Scale: {scale[steps[0]]:.3g} at step {steps[0]} (the first logged); lowest {scale[low]:.3g} at step "
               f"{low}; highest {scale[top]:.3g} at step {top}; {scale[steps[-1]]:.3g} at the last step "
               f"({steps[-1]}); mean {statistics.fmean(tail):.3g} over the last 100 steps. The effective lr is the "
               f"scale times the schedule's lr, so it runs {_relation(scale[low], scale[top])} the schedule at every "
               f"logged step.")
    out += ["", "| step | validation loss, manic | validation loss, base optimizer alone |", "| --- | --- | --- |"]
    for r in rows:
        if r.get("val_loss"):
            other = base.get(r["step"], {}).get("val_loss") or ""
            out.append(f"| {r['step']} | {float(r['val_loss']):.3f} | {float(other):.3f} |" if other
                       else f"| {r['step']} | {float(r['val_loss']):.3f} | |")
    return "\n".join(out)


def _relation(low: float, high: float) -> str:
    """How a factor between ``low`` and ``high`` relates a value to its reference, in words."""
    if low >= 1:
        return f"{low:.3g} to {high:.3g} times above"
    if high <= 1:
        return f"{1 / high:.3g} to {1 / low:.3g} times below"
    return f"between {1 / low:.3g} times below and {high:.3g} times above"


def _constants(path: Path, *names: str) -> dict[str, object]:
    """Module-level constants of a benchmark script, read without importing it (and torch)."""
    out = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and getattr(node.targets[0], "id", None) in names:
            out[node.targets[0].id] = eval(compile(ast.Expression(node.value), str(path), "eval"), {"__builtins__": {}})
    return out


def step_overhead_rows(path: Path) -> list[dict]:
    """The rows of step_overhead.csv; a method name with an unquoted comma (older files) is rejoined."""
    with path.open(newline="") as f:
        header, *rows = list(csv.reader(f))
    out = []
    for row in rows:
        if len(row) > len(header):  # params, method (split at its commas), then the last fields
            tail = len(header) - 2
            row = [row[0], ",".join(row[1:len(row) - tail]), *row[len(row) - tail:]]
        out.append(dict(zip(header, row)))
    return out


def step_overhead_numbers(path: Path) -> str:
    """Numbers quoted in docs/performance.md's sentences: compile=True's work per second as a share of
    fused AdamW's own, from the step times (both move the same pass count: BOUND, BASE_PASSES)."""
    const = _constants(Path(__file__).with_name("step_overhead.py"), "BOUND", "BASE_PASSES")
    bound, base_passes = const["BOUND"], const["BASE_PASSES"]["adamw_fused"]
    ms = {(int(r["params"]), r["method"]): float(r["ms"]) for r in step_overhead_rows(path)
          if r.get("device", "cpu") == "cpu"}
    sizes = sorted(n for n, m in ms if m == "manic(adamw_fused, compile=True)" and n >= 5e6 and (n, "adamw_fused") in ms)
    base_gbps = [n * 4 * base_passes / ms[n, "adamw_fused"] / 1e6 for n in sizes]
    share = [(n * 4 * bound / (ms[n, "manic(adamw_fused, compile=True)"] - ms[n, "adamw_fused"]) / 1e6) / g
             for n, g in zip(sizes, base_gbps)]
    at = " / ".join(f"{n / 1e6:.0f}M" for n in sizes)
    pct = [round(100 * x) for x in share]
    return "\n".join([
        "| key | value | what |", "| --- | --- | --- |",
        f"| `adamw_fused_gbps` | {min(base_gbps):.0f}-{max(base_gbps):.0f} GB/s | fused AdamW's own {base_passes} passes "
        f"per second at {at} parameters |",
        f"| `compile_bandwidth` | {' / '.join(f'{x}%' for x in pct)} | `compile=True`'s {bound} passes per second as a "
        f"share of fused AdamW's, at {at} parameters |",
        f"| `compile_bandwidth_range` | {min(pct)}-{max(pct)}% | the same, lowest to highest |",
        *_step_ratios(ms)])


def _step_ratios(ms: dict[tuple[int, str], float]) -> list[str]:
    """``| key | value | what |`` rows: a method's step time over its base optimizer's alone, lowest to highest
    over the model sizes measured (README's cost)."""
    def span(method: str, base: str, least: float = 0) -> tuple[str, str]:
        sizes = sorted(n for n, m in ms if m == method and n >= least and (n, base) in ms)
        xs = [ms[n, method] / ms[n, base] for n in sizes]
        return f"{min(xs):.1f}-{max(xs):.1f}x", " / ".join(f"{n / 1e6:.0f}M" for n in sizes)

    rows = []
    for key, method, base, least, what in [
            ("default_x_fused", "manic(adamw_fused)", "adamw_fused", 0, "the default (eager) step over fused AdamW's"),
            ("default_x_foreach", "manic(adamw_foreach)", "adamw_foreach", 0,
             "the default (eager) step over foreach AdamW's (torch's default AdamW)"),
            ("compile_x_fused", "manic(adamw_fused, compile=True)", "adamw_fused", 5e6,
             "the `compile=True` step over fused AdamW's"),
            ("mechanic_pytorch_x_fused", "mechanic-pytorch(adamw_fused)", "adamw_fused", 0,
             "mechanic-pytorch's step over fused AdamW's")]:
        if any(m == method for _, m in ms):
            value, at = span(method, base, least)
            rows.append(f"| `{key}` | {value} | {what}, lowest to highest over {at} parameters |")
    for key, method, base, what in [
            ("default_x_fused_each", "manic(adamw_fused)", "adamw_fused", "the default (eager) step over fused AdamW's"),
            ("compile_x_fused_each", "manic(adamw_fused, compile=True)", "adamw_fused",
             "the `compile=True` step over fused AdamW's")]:
        sizes = sorted(n for n, m in ms if m == method and n >= 5e6 and (n, base) in ms)
        if sizes:
            rows.append(f"| `{key}` | {' / '.join(f'{ms[n, method] / ms[n, base]:.2f}x' for n in sizes)} | {what} "
                        f"at {' / '.join(f'{n / 1e6:.0f}M' for n in sizes)} parameters |")
    return rows


def _md_rows(path: Path) -> dict[str, list[str]]:
    """The first column -> the other cells, of every table row in a markdown file a benchmark wrote."""
    out = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and not line.startswith("| ---") and cells[0] not in out:
            out[cells[0]] = cells[1:]
    return out


def memory_numbers(path: Path) -> str:
    """Numbers README quotes about memory, from memory.md's one-process table: the extra bytes over plain
    AdamW as a multiple of the parameters' bytes, persistent (optimizer state) and at the peak."""
    rows = _md_rows(path)
    out = ["| key | value | what |", "| --- | --- | --- |"]
    for key, method, what in [("default", "manic", "the default `state=\"ref+delta\"`"),
                              ("delta", "manic_delta", "`state=\"delta\"` (one buffer)"),
                              ("ref", "manic_recompute", "`state=\"ref\"`"),
                              ("mechanic_pytorch", "mechanic_pytorch", "mechanic-pytorch"),
                              ("prodigy", "prodigy", "Prodigy"), ("dadapt_adam", "dadapt_adam", "D-Adaptation Adam")]:
        if method in rows:
            persistent, peak = rows[method][1], rows[method][3]
            out.append(f"| `{key}/persistent` | {persistent}x | {what}: persistent state over plain AdamW's, x the "
                       "parameters' bytes |")
            out.append(f"| `{key}/peak` | {peak}x | {what}: peak memory over plain AdamW's, x the parameters' bytes |")
    return "\n".join(out)


def train_overhead_numbers(path: Path) -> str:
    """Numbers README quotes about a full training step (forward, backward, step), from train_overhead.md."""
    rows = _md_rows(path)
    model = path.read_text().split(" parameters", 1)[0] + " parameters"  # "Launcher GPT, 0.88M parameters"
    out = ["| key | value | what |", "| --- | --- | --- |"]
    if "manic(adamw)" in rows:
        out.append(f"| `default` | {rows['manic(adamw)'][1]} | a full training step with the default manic over "
                   f"AdamW's ({model}) |")
    if "manic(adamw, compile=True)" in rows:
        out.append(f"| `compile` | {rows['manic(adamw, compile=True)'][1]} | the same with `compile=True` |")
    return "\n".join(out)


SUITE_PEERS = {"prodigy": "Prodigy", "schedulefree": "schedule-free AdamW", "mechanic_pytorch": "mechanic-pytorch",
               "dadapt": "D-Adaptation Adam"}


def suite_numbers(path: Path) -> str:
    """Numbers the docs quote about a half of the generalisation suite, from its report (suite_<half>.md, written by
    benchmarks/suite_report.py): per method, the mean and the worst ratio over the half's tasks at each run length,
    and the peers whose mean is below manic's default."""
    text = path.read_text()
    half = path.stem.split("_")[1]
    if "## Summary" not in text or "## Per task" not in text:
        raise SystemExit(f"{path.name} has no '## Summary' or '## Per task' section, which benchmarks/report.py's "
                         "suite_numbers reads (README quotes them)")
    summary = text.split("## Summary", 1)[1].split("## ", 1)[0]
    header = next(line for line in summary.splitlines() if line.startswith("| method |"))
    lengths = [c.strip().split()[0] for c in header.strip("|").split("|")[1:]]
    rows: dict[str, list[str]] = {}
    for line in summary.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] not in ("method", "---"):
            rows[cells[0]] = cells[1:]
    per_task = text.split("## Per task", 1)[1].split("## ", 1)[0]
    tasks = re.findall(r"^\*\*(\w[\w.-]*)\*\*$", per_task, re.M)
    seeds = re.search(r"seeds ((?:\d+, )+)[\d.]+ CPU hours", text)  # "seeds 0, 1, 0.50 CPU hours"
    at = " / ".join(lengths)
    out = ["| key | value | what |", "| --- | --- | --- |",
           f"| `{half}/lengths` | {at} | the run lengths (steps) |",
           f"| `{half}/tasks` | {len(tasks)} | tasks in the {half} half: {', '.join(tasks)} |"]
    if seeds:
        out.append(f"| `{half}/seeds` | {len(seeds.group(1).split(', ')) - 1} | seeds per cell |")
    means = {}
    for method in ["manic", "manic_distance", *SUITE_PEERS, *sorted(m for m in rows if m.startswith("cand_"))]:
        if method not in rows:
            continue
        worst = [c.split(" / ")[0] if c else "" for c in rows[method]]
        mean = [c.split(" / ")[1].split(" (")[0] if " / " in c else "" for c in rows[method]]
        if not method.startswith("cand_"):
            means[method] = mean
        label = SUITE_PEERS.get(method, {"manic": "manic (default)", "manic_distance": "manic, distance_floor=True"}.get(
            method, f"candidate {method[len('cand_'):]} (benchmarks/candidates.py)"))
        out.append(f"| `{half}/{method}/mean` | {' / '.join(mean)} | {label}: mean ratio to best-tuned AdamW over the "
                   f"tasks at {at} steps |")
        out.append(f"| `{half}/{method}/worst` | {' / '.join(worst)} | {label}: worst ratio over the tasks (which task) "
                   f"at {at} steps |")
    if "manic" in means:
        def ratio(v: str) -> float:
            return float(v.rstrip("x")) if v.endswith("x") else math.inf

        lower = []
        for method, label in SUITE_PEERS.items():
            ns = [n for n, a, b in zip(lengths, means["manic"], means.get(method, [])) if a and b and ratio(b) < ratio(a)]
            if ns:
                lower.append(f"{label} at " + ("every length" if len(ns) == len(lengths) else
                                               (ns[0] if len(ns) == 1 else ", ".join(ns[:-1]) + " and " + ns[-1])
                                               + " steps"))
        out.append(f"| `{half}/manic/peers_lower` | {'; '.join(lower) or 'none'} | the peers whose mean ratio over "
                   "the tasks is below manic's default, and where |")
    if "manic" in rows and rows["manic"][-1]:
        task = rows["manic"][-1].split("(")[1].split(")")[0]
        lrs = _suite_scale_rows(text, task)
        if lrs:
            out.append(f"| `{half}/manic/worst_task_lr` | on {task}, " + "; ".join(
                f"{n}: {final} against {best} (oracle {oracle})" for n, (best, final, oracle) in lrs.items())
                + f" | on {task} (manic's worst task at {lengths[-1]} steps), per run length: manic's final S·lr "
                "against best-tuned AdamW's lr, and the greedy oracle's S'·lr at the end (geometric means over seeds) |")
    return "\n".join(out)


def _suite_scale_rows(text: str, task: str) -> dict[str, tuple[str, str, str]]:
    """From the report's scale-against-oracle section, manic's rows for ``task``: {T: (best AdamW lr,
    final S·lr, the oracle's S'·lr at 100% of T)}."""
    section = text.split("## Mechanic's scale", 1)[-1].split("\n## ", 1)[0]
    block = section.split(f"**{task}**", 1)[-1].split("\n**", 1)[0] if f"**{task}**" in section else ""
    out = {}
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 10 and cells[1] == "manic" and cells[0].isdigit():
            out[cells[0]] = (cells[2], cells[3], cells[9].split(" / ")[-1])
    return out


def main(check: bool = False) -> list[str]:
    """Write (or, with ``check``, compare) the summaries; return the stale ones."""
    jobs = {"lr_sweep_summary.md": (lr_sweep, RESULTS / "lr_sweep.csv"),
            "lr_sweep_charlm.md": (lambda p: lr_sweep(p, ("charlm",)), RESULTS / "lr_sweep.csv")}
    if (RESULTS / "run_length.csv").exists():
        import run_length_report as rl

        jobs["run_length_summary.md"] = (lambda p: rl.summary(rl.load(p)), RESULTS / "run_length.csv")
        jobs["run_length_front.md"] = (lambda p: rl.front(rl.load(p)), RESULTS / "run_length.csv")
        jobs["run_length_numbers.md"] = (lambda p: rl.numbers(rl.load(p)), RESULTS / "run_length.csv")
        jobs["run_length_versus.md"] = (lambda p: rl.versus_table(rl.load(p)), RESULTS / "run_length.csv")
    if (RESULTS / "step_overhead.csv").exists():
        jobs["step_overhead_numbers.md"] = (step_overhead_numbers, RESULTS / "step_overhead.csv")
    if (RESULTS / "memory.md").exists():
        jobs["memory_numbers.md"] = (memory_numbers, RESULTS / "memory.md")
    if (RESULTS / "train_overhead.md").exists():
        jobs["train_overhead_numbers.md"] = (train_overhead_numbers, RESULTS / "train_overhead.md")
    for half in ("dev", "test"):
        if (RESULTS / f"suite_{half}.md").exists():
            jobs[f"suite_{half}_numbers.md"] = (suite_numbers, RESULTS / f"suite_{half}.md")
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
