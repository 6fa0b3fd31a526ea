"""Tables and figure of the generalisation suite, from benchmarks/results/suite.csv (benchmarks/suite.py).

    python benchmarks/suite_report.py [--quick]     (also run by suite.py at its end and by --replot)

Writes suite_dev.md and suite_test.md (one per half) and suite.png; every number in them comes from
the CSV. A ratio is a run's final validation loss over the best-tuned AdamW's of the same task, run
length and seed (the best of AdamW's adaptive lr sweep); ratios are averaged over the seeds that have
both. A run diverged if its final validation loss is not finite or above its loss at step 0.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import env_line  # noqa: E402

RESULTS = Path(__file__).parent / "results"
NUMERIC = ("lr", "val_loss", "val_metric", "loss0", "train_loss", "final_scale", "final_eff_lr", "seconds")


def load(path: Path) -> list[dict]:
    """The rows of a suite CSV, numbers as numbers."""
    if not Path(path).exists():
        return []
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["steps"], r["seed"], r["diverged"] = int(r["steps"]), int(r["seed"]), int(r["diverged"])
        for k in NUMERIC:
            r[k] = float(r[k])
    return rows


def best_adamw(rows: list[dict]) -> dict[tuple, dict]:
    """(task, steps, seed) -> the best AdamW row, with "edge" True when it is at an end of the grid
    (no worse neighbour on one side: the sweep could not bracket it)."""
    import run_length_report
    from suite import ADAMW_GRID

    ends = (ADAMW_GRID[0], ADAMW_GRID[-1])
    return {k: {**r, "edge": any(math.isclose(r["lr"], e) for e in ends)}
            for k, r in run_length_report.best_adamw(rows).items()}


def cells(rows: list[dict]) -> dict[tuple, dict]:
    """(task, steps, method) -> seed-mean ratio, spread, diverged, n (AdamW: its best lr's row)."""
    ref = best_adamw(rows)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r["method"] != "adamw" and (r["task"], r["steps"], r["seed"]) in ref:
            groups[(r["task"], r["steps"], r["method"])].append(r)
    out = {}
    for k, rs in groups.items():
        ratios = [r["val_loss"] / ref[(r["task"], r["steps"], r["seed"])]["val_loss"]
                  if math.isfinite(r["val_loss"]) else math.inf for r in rs]
        out[k] = {"ratio": sum(ratios) / len(ratios), "spread": max(ratios) - min(ratios),
                  "diverged": any(r["diverged"] for r in rs), "n": len(rs), "rows": rs}
    return out


def gmean(xs: list[float]) -> float:
    xs = [x for x in xs if x > 0 and math.isfinite(x)]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else math.nan


def fmt_ratio(v: float) -> str:
    return "div" if not math.isfinite(v) else f"{v:.3f}x"


def _order(rows: list[dict]) -> list[str]:
    from suite import methods

    known = [m for m in methods() if m != "adamw"]
    seen = sorted({r["method"] for r in rows} - {"adamw"} - set(known))
    return [m for m in known + seen if any(r["method"] == m for r in rows)]


def _header(cols: list[str], lengths: list[int]) -> list[str]:
    return ["| " + " | ".join(cols + [f"{n} steps" for n in lengths]) + " |",
            "|" + " --- |" * (len(cols) + len(lengths))]


def summary_table(rows: list[dict], tasks: list[str], lengths: list[int]) -> list[str]:
    """method x length: worst-over-tasks ratio (which task) / mean-over-tasks ratio."""
    c = cells(rows)
    out = _header(["method"], lengths)
    for method in _order(rows):
        line = []
        for n in lengths:
            have = [(c[(t, n, method)]["ratio"], t) for t in tasks if (t, n, method) in c]
            if not have:
                line.append("")
                continue
            worst = max(have)
            mean = sum(v for v, _ in have) / len(have)
            part = "" if len(have) == len(tasks) else f" ({len(have)}/{len(tasks)} tasks)"
            line.append(f"{fmt_ratio(worst[0])} ({worst[1]}) / {fmt_ratio(mean)}{part}")
        out.append(f"| {method} | " + " | ".join(line) + " |")
    return out


def task_table(rows: list[dict], task: str, lengths: list[int]) -> list[str]:
    c = cells(rows)
    ref = best_adamw(rows)
    seeds = sorted({r["seed"] for r in rows})
    out = _header(["method"], lengths)
    refs = []
    for n in lengths:
        bs = [ref[(task, n, s)] for s in seeds if (task, n, s) in ref]
        lrs = ", ".join(f"{b['lr']:g}" + ("!" if b["edge"] else "") for b in bs)
        refs.append(f"{sum(b['val_loss'] for b in bs) / len(bs):.4f} (lr {lrs})" if bs else "")
    out.append("| best-tuned AdamW: val loss (lr per seed) | " + " | ".join(refs) + " |")
    for method in _order(rows):
        line = []
        for n in lengths:
            v = c.get((task, n, method))
            if v is None:
                line.append("")
            else:
                line.append(fmt_ratio(v["ratio"]) + (f" ± {v['spread']:.3f}" if v["n"] > 1 and
                                                      math.isfinite(v["spread"]) else "")
                            + (" div" if v["diverged"] else ""))
        out.append(f"| {method} | " + " | ".join(line) + " |")
    return out


def parse_oracle(trace: str) -> list[dict]:
    out = []
    for entry in trace.split():
        step, s_lr, o_lr, l_s, l_o, edge = entry.split(",")
        out.append({"step": int(step), "s_lr": float(s_lr), "o_lr": float(o_lr), "loss_s": float(l_s),
                    "loss_o": float(l_o), "edge": int(edge)})
    return out


def manic_methods(rows: list[dict]) -> list[str]:
    return [m for m in _order(rows) if any(r["method"] == m and r["oracle_trace"] for r in rows)]


def diag_table(rows: list[dict], task: str, lengths: list[int]) -> list[str]:
    """Per (T, manic candidate): best AdamW lr, the final S * base_lr, and at each oracle checkpoint
    S * base_lr / the oracle's S' * base_lr (geometric means over seeds)."""
    from suite import ORACLE_AT

    ref = best_adamw(rows)
    out = ["| T | method | best AdamW lr | final S·lr | " + " | ".join(f"{int(100 * f)}%: S·lr / oracle"
                                                                  for f in ORACLE_AT) + " | Prodigy d·lr |",
           "|" + " --- |" * (5 + len(ORACLE_AT))]
    for n in lengths:
        best = gmean([ref[k]["lr"] for k in ref if k[:2] == (task, n)])
        prod = gmean([r["final_eff_lr"] for r in rows if (r["task"], r["steps"], r["method"]) == (task, n, "prodigy")])
        for method in manic_methods(rows):
            rs = [r for r in rows if (r["task"], r["steps"], r["method"]) == (task, n, method)]
            if not rs:
                continue
            pts = [parse_oracle(r["oracle_trace"]) for r in rs]
            cols = []
            for j in range(len(ORACLE_AT)):
                at = [p[j] for p in pts if len(p) > j]
                if not at:
                    cols.append("")
                    continue
                edge = "!" if any(a["edge"] for a in at) else ""
                cols.append(f"{gmean([a['s_lr'] for a in at]):.2g} / {gmean([a['o_lr'] for a in at]):.2g}{edge}")
            out.append(f"| {n} | {method} | {best:.2g} | {gmean([r['final_eff_lr'] for r in rs]):.2g} | "
                       + " | ".join(cols) + f" | {prod:.2g} |")
    return out


def diag_summary(rows: list[dict], tasks: list[str], lengths: list[int]) -> list[str]:
    """Per manic candidate and length, medians over tasks (and seeds) of: final S·lr / best AdamW lr;
    S / the oracle's S' at 50% and at 100% of T; and the share of checkpoints with S' above S."""
    ref = best_adamw(rows)
    out = _header(["method", "median over tasks of"], lengths)
    what = [("final S·lr / best AdamW lr", None), ("S / oracle S' at 50% of T", 2), ("S / oracle S' at 100% of T", 5),
            ("checkpoints with oracle S' > S", "share")]
    for method in manic_methods(rows):
        for label, how in what:
            line = []
            for n in lengths:
                vals = []
                for r in rows:
                    k = (r["task"], r["steps"], r["seed"])
                    if r["method"] != method or r["task"] not in tasks or r["steps"] != n or k not in ref:
                        continue
                    pts = parse_oracle(r["oracle_trace"])
                    if how is None:
                        vals.append(r["final_eff_lr"] / ref[k]["lr"])
                    elif how == "share":
                        vals += [float(p["o_lr"] > p["s_lr"]) for p in pts]
                    elif len(pts) > how:
                        vals.append(pts[how]["s_lr"] / pts[how]["o_lr"])
                if not vals:
                    line.append("")
                elif how == "share":
                    line.append(f"{100 * sum(vals) / len(vals):.0f}% of {len(vals)}")
                else:
                    line.append(f"{statistics.median(vals):.2g}")
            out.append(f"| {method} | {label} | " + " | ".join(line) + " |")
    return out


def settings(half: str, present: list[str]) -> list[str]:
    import suite
    import suite_tasks

    out = ["Settings (benchmarks/suite.py): every run warms up over 10% of T, then follows a cosine to 0, "
           "unless its authors say otherwise.", "",
           f"- `adamw`: torch.optim.AdamW(weight_decay={suite.WEIGHT_DECAY}), lr swept adaptively per (task, T, seed) "
           f"over {', '.join(f'{v:g}' for v in suite.ADAMW_GRID)} until its best has a worse neighbour on both "
           "sides; `!` after an lr: the best is at the grid's end (not bracketed)."]
    for name, spec in suite.MANIC.items():
        if isinstance(spec, dict):
            kw = {k: v for k, v in spec.items() if k != "base_lr"}
            out.append(f"- `{name}`: manic.mechanize(torch.optim.AdamW(params, lr={spec.get('base_lr', suite.MANIC_BASE_LR):g}, "
                       f"weight_decay={suite.WEIGHT_DECAY}){''.join(f', {k}={v!r}' for k, v in kw.items())}), "
                       "warmup 10% + cosine")
        else:
            out.append(f"- `{name}`: {getattr(spec, '__doc__', None) or 'a callable building the optimizer'}")
    out += [f"- `{name}`: {text}" for name, text in suite.PEER_SETTINGS.items()]
    others = [m for m in present if m not in ("adamw", *suite.MANIC, *suite.PEER_SETTINGS)]
    if others:
        out.append(f"- {', '.join(f'`{m}`' for m in others)}: run by name, defined outside suite.MANIC and "
                   "suite.PEER_SETTINGS (see benchmarks/suite.py's imports)")
    out += ["", f"Tasks of the {half} half (benchmarks/suite_tasks.py):", ""]
    out += [f"- `{n}`: {suite_tasks.ABOUT[n]}" for n in suite_tasks.HALVES[half]]
    return out


def half_report(rows: list[dict], half: str, command: str) -> str:
    import suite_tasks

    tasks = [t for t in suite_tasks.HALVES[half] if any(r["task"] == t for r in rows)]
    mine = [r for r in rows if r["task"] in tasks]
    lengths = sorted({r["steps"] for r in mine})
    seeds = sorted({r["seed"] for r in mine})
    cpu_h = sum(r["seconds"] for r in mine) / 3600
    out = [f"# Generalisation suite: the {half.upper()} half", "",
           f"Generated by benchmarks/suite_report.py from the CSV ({len(mine)} runs, seeds "
           f"{', '.join(map(str, seeds))}, {cpu_h:.2f} CPU hours; {env_line(command, '1 thread per run')}). "
           "Ratio: final validation loss / best-tuned AdamW's (same task, T, seed), seed mean; "
           "`div`: a run diverged (final val loss not finite or above its step-0 loss).", "",
           "## Summary", "",
           "Per method and run length: the worst ratio over the tasks (which task) / the mean ratio over the tasks.",
           "", *summary_table(mine, tasks, lengths), "", "## Per task", "",
           "Seed-mean ratio ± the spread between seeds.", ""]
    for t in tasks:
        out += [f"**{t}**", "", *task_table(mine, t, lengths), ""]
    if manic_methods(mine):
        out += ["## Mechanic's scale against the greedy oracle and the best AdamW lr", "",
                "Every lr here is a peak lr (the scale times the base lr, before the schedule's factor), comparable "
                "with AdamW's swept lr. The oracle: at 10/25/50/75/90/100% of T, the S' minimising the training loss on "
                "4 fixed train batches along Mechanic's line x_ref + S'·Delta (log grid 2^k around S, then quarter "
                "octaves around the best; `!`: argmin at 2^±12, the grid's end). Short-horizon hypothesis: S tracks the oracle's S' and both sit well below "
                "the best AdamW lr.", "",
                "Medians over tasks and seeds:", "", *diag_summary(mine, tasks, lengths), "",
                "Per task (geometric means over seeds):", ""]
        for t in tasks:
            out += [f"**{t}**", "", *diag_table(mine, t, lengths), ""]
    out += ["## Settings", "", *settings(half, sorted({r["method"] for r in mine}))]
    return "\n".join(out).rstrip("\n") + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import suite_tasks

    c = cells(rows)
    halves = [h for h in suite_tasks.HALVES if any(r["half"] == h for r in rows)]
    methods = _order(rows)
    plt.rcParams.update({"font.size": 13})
    cap = 10.0
    fig, axes = plt.subplots(2, len(halves), figsize=(4.6 * len(halves) if len(halves) > 1 else 7, 8.2),
                             squeeze=False)
    cmap = plt.get_cmap("tab10")
    handles = {}
    for j, half in enumerate(halves):
        tasks = suite_tasks.HALVES[half]
        lengths = sorted({r["steps"] for r in rows if r["half"] == half})
        for i, (label, agg) in enumerate((("mean", lambda v: sum(v) / len(v)), ("worst", max))):
            ax = axes[i][j]
            ax.axhline(1.0, color="black", lw=1.5)
            top, bottom = 1.1, 0.97
            for m_i, method in enumerate(methods):
                if not any(k[0] in tasks and k[2] == method for k in c):
                    continue
                xs, ys = [], []
                for n in lengths:
                    v = [c[(t, n, method)]["ratio"] for t in tasks if (t, n, method) in c]
                    if v:
                        xs.append(n)
                        ys.append(agg(v))
                if not xs:
                    continue
                shown = [min(y, cap) for y in ys]
                top, bottom = max(top, max(shown)), min(bottom, min(shown) * 0.97)
                style = "-o" if method.startswith("manic") else "--s"
                line, = ax.plot(xs, shown, style, color=cmap(m_i % 10), lw=2, ms=6, label=method)
                handles[method] = line
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(lengths)
            ax.set_xticklabels([str(n) for n in lengths])
            ax.set_ylim(bottom, top * 1.08)
            ticks = [t for t in (1, 1.2, 1.5, 2, 3, 5, 10) if bottom <= t <= top * 1.08]
            ax.set_yticks(ticks)
            ax.set_yticklabels([f"{t:g}" for t in ticks])
            ax.minorticks_off()
            ax.set_title(f"{half} half: {label} over tasks")
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel(f"val loss / best AdamW's (cap {cap:g})")
            if i == 1:
                ax.set_xlabel("run length (steps)")
    if handles:  # (none without AdamW's rows to take ratios to, e.g. --methods without adamw)
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(4, len(handles)), frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.035 * (max(len(handles) - 1, 0) // 4), 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(csv_path: Path, out: Path = RESULTS, quick: bool = False) -> list[Path]:
    rows = load(csv_path)
    if not rows:
        return []
    tag = "_quick" if quick else ""
    command = "python benchmarks/suite.py" + (" --quick" if quick else "")
    paths = []
    for half in ("dev", "test"):
        if any(r["half"] == half for r in rows):
            p = Path(out) / f"suite_{half}{tag}.md"
            p.write_text(half_report(rows, half, command))
            paths.append(p)
    p = Path(out) / f"suite{tag}.png"
    plot(rows, p)
    return paths + [p]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    for path in write(Path(args.out) / ("suite_quick.csv" if args.quick else "suite.csv"), Path(args.out), args.quick):
        print(f"wrote {path}")
