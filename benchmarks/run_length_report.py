"""Tables and figures of the run-length study, from benchmarks/results/run_length.csv.

    python benchmarks/run_length_report.py      (also run by benchmarks/run_length.py and tools/sync_docs.py)

A ratio is a run's final validation loss over the best-tuned AdamW's of the same task, run length
and seed (the best of AdamW's lr grid); a ratio is averaged over seeds, and the spread is the
largest difference between the seeds' ratios. Divergence: a final validation loss that is not
finite or above the loss at step 0.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MAIN = ["manic", "manic_original", "prodigy", "dadapt_adam", "schedulefree_adamw", "mechanic_pytorch_adamw"]
LABELS = {"manic": "manic (default: invariant)", "manic_original": "manic (original)", "prodigy": "Prodigy",
          "dadapt_adam": "D-Adaptation Adam", "schedulefree_adamw": "schedule-free AdamW",
          "mechanic_pytorch_adamw": "mechanic-pytorch", "manic_wd1": "manic, weight_decay 1",
          "manic_wd2": "manic, weight_decay 2", "manic_s1e-4": "manic, s_init 1e-4", "manic_s1e-2": "manic, s_init 1e-2",
          "manic_per_group_kind": "manic, per_group: matrices / vectors",
          "manic_per_group_layer": "manic, per_group: per layer"}


def load(path: Path) -> list[dict]:
    """The rows of a run_length.csv, with numbers as numbers."""
    if not path.exists():
        return []
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["steps"], r["seed"] = int(r["steps"]), int(r["seed"])
        for k in ("lr", "val_loss", "val_acc", "train_loss", "loss0", "final_scale", "peak_eff_lr"):
            r[k] = float(r[k])
    return rows


def _ref(rows: list[dict]) -> dict[tuple, dict]:
    """(task, steps, seed) -> the best AdamW row."""
    best: dict[tuple, dict] = {}
    for r in rows:
        if r["method"] == "adamw" and math.isfinite(r["val_loss"]):
            k = (r["task"], r["steps"], r["seed"])
            if k not in best or r["val_loss"] < best[k]["val_loss"]:
                best[k] = r
    return best


def cells(rows: list[dict]) -> dict[tuple, dict]:
    """(task, steps, method, lr) -> seed-mean ratio, spread, accuracy gap (points), train loss, diverged."""
    ref = _ref(rows)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if (r["task"], r["steps"], r["seed"]) in ref:
            groups[(r["task"], r["steps"], r["method"], r["lr"])].append(r)
    out = {}
    for k, rs in groups.items():
        ratios, gaps = [], []
        for r in rs:
            b = ref[(r["task"], r["steps"], r["seed"])]
            ratios.append(r["val_loss"] / b["val_loss"] if math.isfinite(r["val_loss"]) else math.inf)
            gaps.append(100 * (b["val_acc"] - r["val_acc"]))
        diverged = any(not math.isfinite(r["val_loss"]) or r["val_loss"] > r["loss0"] for r in rs)
        out[k] = {"ratio": sum(ratios) / len(ratios), "spread": max(ratios) - min(ratios), "gap": sum(gaps) / len(gaps),
                  "train": sum(r["train_loss"] for r in rs) / len(rs), "diverged": diverged, "n": len(rs),
                  "peak": sum(r["peak_eff_lr"] for r in rs) / len(rs),
                  "end": sum(r["final_scale"] * r["lr"] for r in rs) / len(rs)}
    return out


def over_lrs(c: dict[tuple, dict], task: str, steps: int, method: str) -> list[dict]:
    """The cells of one method at one task and run length, one per base lr."""
    return [v for k, v in c.items() if k[:3] == (task, steps, method)]


def _header(first: str, second: str | None, lengths: list[int]) -> list[str]:
    cols = [first] + ([second] if second else [])
    return ["| " + " | ".join(cols) + " | " + " | ".join(f"{n} steps" for n in lengths) + " |",
            "|" + " --- |" * (len(cols) + len(lengths))]


def worst(c: dict[tuple, dict], task: str, steps: int, method: str) -> tuple[float, float, float, bool] | None:
    """Over the base-lr grid: (worst ratio, its spread, worst accuracy gap, any divergence)."""
    mine = over_lrs(c, task, steps, method)
    if not mine:
        return None
    w = max(mine, key=lambda v: v["ratio"])
    return w["ratio"], w["spread"], max(v["gap"] for v in mine), any(v["diverged"] for v in mine)


def front(rows: list[dict]) -> str:
    """The headline table: per task and run length, each method's worst loss ratio over the base lrs."""
    c = cells(rows)
    ref = _ref(rows)
    tasks = sorted({r["task"] for r in rows})
    lengths = sorted({r["steps"] for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    out = [f"Seeds {', '.join(map(str, seeds))} (1 thread per run, CPU; `python benchmarks/run_length.py`). "
           "manic at base lrs 1e-4, 1e-3, 1e-2, 1e-1 and 1; the peers at their defaults. Each cell: the worst "
           "over the base lrs of (final validation loss / best-tuned AdamW's), seed mean ± the spread between "
           "seeds, then the worst accuracy gap to best-tuned AdamW in points (positive: below it). "
           "`div`: a run diverged (final validation loss not finite or above its loss at step 0).", ""]
    for task in tasks:
        out += [f"**{task}**", "", *_header("method", None, lengths)]
        refs = []
        for n in lengths:
            bs = [ref[(task, n, s)] for s in seeds if (task, n, s) in ref]
            lrs = ", ".join(sorted({format(b["lr"], "g") for b in bs}))
            refs.append(f"{sum(b['val_loss'] for b in bs) / len(bs):.4f} (lr {lrs})" if bs else "")
        out.append("| best-tuned AdamW: val loss (lr) | " + " | ".join(refs) + " |")
        for method in [m for m in MAIN if any(r["method"] == m for r in rows)]:
            line = []
            for n in lengths:
                w = worst(c, task, n, method)
                line.append("" if w is None else f"{w[0]:.3f}x ± {w[1]:.3f}, {w[2]:+.1f} pt" + (" div" if w[3] else ""))
            out.append(f"| {LABELS[method]} | " + " | ".join(line) + " |")
        out.append("")
    return "\n".join(out).rstrip("\n")


def summary(rows: list[dict]) -> str:
    """The headline table, then per base lr, then the knobs of the default moved one at a time."""
    c = cells(rows)
    tasks = sorted({r["task"] for r in rows})
    lengths = sorted({r["steps"] for r in rows})
    out = [front(rows), "", "Per base lr, the default and the original form; seed means of: loss ratio / train loss "
           "(last 10% of steps) / peak `S * lr_t` / final `S` times the base lr (the effective peak lr the run "
           "ended with):", ""]
    for task in tasks:
        out += [f"**{task}**", "", *_header("method", "base lr", lengths)]
        for method in ("manic", "manic_original"):
            for lr in sorted({k[3] for k in c if k[0] == task and k[2] == method}):
                line = []
                for n in lengths:
                    v = c.get((task, n, method, lr))
                    line.append("" if v is None else
                                f"{v['ratio']:.3f}x / {v['train']:.3f} / {v['peak']:.2g} / {v['end']:.2g}")
                out.append(f"| {LABELS[method]} | {lr:g} | " + " | ".join(line) + " |")
        out.append("")
    abl = [m for m in LABELS if m.startswith(("manic_wd", "manic_s1", "manic_per_group"))]
    if any(r["method"] in abl for r in rows):
        out += ["One knob of the default moved (base lr 1e-2; loss ratio, seed mean; `per_group`: the default with "
                "one tuner per param group, the groups as named):", "",
                *_header("task", "setting", lengths)]
        for task in tasks:
            for method in ["manic"] + abl:
                line = [f"{c[(task, n, method, 1e-2)]['ratio']:.3f}x" if (task, n, method, 1e-2) in c else ""
                        for n in lengths]
                out.append(f"| {task} | {LABELS[method].replace('manic (default: invariant)', 'default')} | "
                           + " | ".join(line) + " |")
    grid = sorted({r["method"] for r in rows if r["method"].startswith("manic_original_s")},
                  key=lambda m: float(m[len("manic_original_s"):]))
    if grid:
        out += ["The original form at other starts (`s_init`; `python benchmarks/run_length.py --s-init-grid --seeds "
                "1`: seed 0 only, while 1e-6 is the 2-seed original row above). Worst / best loss ratio over the "
                "base lrs:", "", *_header("task", "s_init", lengths)]
        for task in tasks:
            for method in ["manic_original"] + grid:
                line = []
                for n in lengths:
                    v = [cell["ratio"] for cell in over_lrs(c, task, n, method)]
                    line.append(f"{max(v):.3f}x / {min(v):.3f}x" if v else "")
                label = method[len("manic_original_s"):] if method != "manic_original" else "1e-06"
                out.append(f"| {task} | {float(label):g} | " + " | ".join(line) + " |")
        out.append("")
    probes = sorted({r["method"] for r in rows if r["method"].startswith("probe")}, key=lambda m: int(m[5:]))
    if probes:
        out += ["Mechanic as a learning-rate probe: plain AdamW trained at the lr a short run of manic's default "
                "suggests (`S * lr` after the probe; warmup, then constant), compared with best-tuned AdamW. "
                "Worst loss ratio over the probe's base lrs (the suggested lrs in brackets):", "",
                *_header("task", "probe", lengths)]
        for task in tasks:
            for method in probes:
                line = []
                for n in lengths:
                    mine = over_lrs(c, task, n, method)
                    if not mine:
                        line.append("")
                        continue
                    lrs = sorted(v["end"] for v in mine)
                    line.append(f"{max(v['ratio'] for v in mine):.3f}x ({lrs[0]:.2g} - {lrs[-1]:.2g})")
                out.append(f"| {task} | {method[5:]} steps | " + " | ".join(line) + " |")
        out.append("")
    return "\n".join(out).rstrip("\n")


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = cells(rows)
    ref = _ref(rows)
    tasks = sorted({r["task"] for r in rows})
    lengths = sorted({r["steps"] for r in rows})
    seeds = sorted({r["seed"] for r in rows})

    def curve(ax, task: str, n: int) -> None:
        bar = sum(ref[(task, n, s)]["val_loss"] for s in seeds if (task, n, s) in ref) / len(seeds)
        ax.axhline(bar, color="black", lw=1.5, label="best-tuned AdamW")
        lrs = sorted({k[3] for k in c if k[:3] == (task, n, "manic")})
        for method, style in (("manic", "-o"), ("manic_original", "--s")):
            ys = [c[(task, n, method, lr)]["ratio"] * bar for lr in lrs if (task, n, method, lr) in c]
            ax.plot(lrs[:len(ys)], ys, style, label=LABELS[method])
        shown = [bar] + [c[k]["ratio"] * bar for k in c if k[:3] in ((task, n, "manic"), (task, n, "manic_original"))]
        for method, color, ls in (("prodigy", "tab:red", "-."), ("dadapt_adam", "tab:purple", ":"),
                                  ("schedulefree_adamw", "tab:green", "--")):
            v = [cell["ratio"] * bar for cell in over_lrs(c, task, n, method)]
            if v:
                ax.axhline(v[0], ls=ls, lw=1.3, color=color, label=f"{LABELS[method]} (its default)")
                shown.append(v[0])
        ax.set_xscale("log")
        ax.set_xlabel("base lr")
        ax.set_ylabel("final validation loss")
        ax.set_title(f"{task}, {n} steps")
        ax.set_ylim(bar * 0.95, min(max(shown), 2.2 * bar) * 1.04)

    fig, axes = plt.subplots(len(tasks), len(lengths), figsize=(4.2 * len(lengths), 3.6 * len(tasks)), squeeze=False)
    for i, task in enumerate(tasks):
        for j, n in enumerate(lengths):
            curve(axes[i][j], task, n)
    axes[0][0].legend(fontsize=6.5)
    fig.tight_layout()
    fig.savefig(out / "run_length.png", dpi=100)
    plt.close(fig)

    pick = [lengths[min(1, len(lengths) - 1)], lengths[-1]]
    fig, axes = plt.subplots(1, 2 * len(tasks), figsize=(4.2 * 2 * len(tasks), 3.6), squeeze=False)
    for i, task in enumerate(tasks):
        for j, n in enumerate(pick):
            curve(axes[0][2 * i + j], task, n)
    axes[0][0].legend(fontsize=6.5)
    fig.tight_layout()
    fig.savefig(out / "run_length_front.png", dpi=100)
    plt.close(fig)

    # the effective step S * lr_t over time, seed 0, at the middle length
    n = lengths[len(lengths) // 2]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for r in rows:
            if (r["task"], r["steps"], r["seed"]) == (task, n, 0) and r["method"] in ("manic", "manic_original") \
                    and r["eff_lr_trace"]:
                ys = [float(v) for v in r["eff_lr_trace"].split()]
                xs = [min(n - 1, i * max(1, n // 20)) for i in range(len(ys))]
                ax.plot(xs, ys, "-" if r["method"] == "manic" else "--", lw=1,
                        color=matplotlib.cm.viridis(math.log10(r["lr"]) / 4 + 1),
                        label=f"{LABELS[r['method']]}, base lr {r['lr']:g}")
        best = ref.get((task, n, 0))
        if best:
            for r in rows:
                if r is best or (r["method"], r["task"], r["steps"], r["seed"], r["lr"]) == \
                        ("adamw", task, n, 0, best["lr"]):
                    ys = [float(v) for v in r["eff_lr_trace"].split()]
                    ax.plot([min(n - 1, i * max(1, n // 20)) for i in range(len(ys))], ys, color="black", lw=2,
                            label=f"best-tuned AdamW (lr {best['lr']:g})")
                    break
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("S * lr_t (the step's effective lr)")
        ax.set_title(f"{task}, {n} steps, seed 0")
        ax.legend(fontsize=5.5, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "run_length_eff_lr.png", dpi=100)
    plt.close(fig)


def write(rows: list[dict], out: Path = RESULTS) -> None:
    """Draw the figures; the tables are written by benchmarks/report.py (also run by tools/sync_docs.py)."""
    plot(rows, out)
    import report

    report.main()


if __name__ == "__main__":
    write(load(RESULTS / "run_length.csv"))
    print((RESULTS / "run_length_summary.md").read_text())
