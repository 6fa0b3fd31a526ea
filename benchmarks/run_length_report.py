"""Tables and figures of the run-length study, from benchmarks/results/run_length.csv.

    python benchmarks/run_length_report.py      (the figures; also run by benchmarks/run_length.py. The
                                                tables: benchmarks/report.py, which reads them from here)

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


def best_adamw(rows: list[dict]) -> dict[tuple, dict]:
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
    ref = best_adamw(rows)
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


def blocks(lines: list[str]) -> str:
    """``lines`` joined, with a blank line after every table (a line after a table row that is not a
    row itself would render as one more row), and no trailing blank lines."""
    out: list[str] = []
    for line in "\n".join(lines).split("\n"):
        if out and out[-1].startswith("|") and line and not line.startswith("|"):
            out.append("")
        out.append(line)
    return "\n".join(out).rstrip("\n")


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
    ref = best_adamw(rows)
    tasks = sorted({r["task"] for r in rows})
    lengths = sorted({r["steps"] for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    out = [f"Seeds {', '.join(map(str, seeds))} (1 thread per run, CPU; `python benchmarks/run_length.py`). "
           "manic at base lrs 1e-4, 1e-3, 1e-2, 1e-1 and 1; the peers once each, as their authors recommend for "
           "this schedule (Prodigy with `safeguard_warmup=True`, schedule-free AdamW with the study's warmup as "
           "`warmup_steps`; benchmarks/run_length.py lists the settings). Each cell: the worst "
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
    return blocks(out)


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
    return blocks(out)


def versus(c: dict[tuple, dict], task: str, lengths: list[int], method: str, peer: str) -> str:
    """Where ``method``'s worst ratio over its base lrs is below (ahead) or above (behind) ``peer``'s, by
    more than the larger of the two seed spreads, and where the two are within it, in words."""
    by: dict[str, list[int]] = {"ahead": [], "behind": [], "within the seed spread": []}
    for n in lengths:
        a, b = worst(c, task, n, method), worst(c, task, n, peer)
        if a is None or b is None:
            continue
        key = ("within the seed spread" if abs(a[0] - b[0]) <= max(a[1], b[1])
               else "ahead" if a[0] < b[0] else "behind")
        by[key].append(n)
    parts = []
    for key, ns in by.items():
        if ns:
            at = "at every length" if len(ns) == len(lengths) else "at " + _and([str(n) for n in ns]) + " steps"
            parts.append(f"{key} {at}")
    return "; ".join(parts)


PEERS = ["prodigy", "schedulefree_adamw", "mechanic_pytorch_adamw", "dadapt_adam"]


def versus_table(rows: list[dict]) -> str:
    """manic's default against each peer, per task, in words (``versus``): the comparison the front
    table holds, read out."""
    c = cells(rows)
    tasks = sorted({r["task"] for r in rows})
    lengths = sorted({r["steps"] for r in rows})
    peers = [p for p in PEERS if any(r["method"] == p for r in rows)]
    out = ["manic's default against each peer, from the front table: its worst loss ratio over the base lrs "
           "against the peer's, ahead (lower) or behind (higher) where they differ by more than the larger of "
           "the two seed spreads.", "", "| peer | " + " | ".join(tasks) + " |", "|" + " --- |" * (len(tasks) + 1)]
    for peer in peers:
        out.append(f"| {LABELS[peer]} | " + " | ".join(versus(c, t, lengths, "manic", peer) for t in tasks) + " |")
    return blocks(out)


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def numbers(rows: list[dict]) -> str:
    """The numbers the documents quote in sentences, as a ``| key | value | what |`` table for
    tools/sync_docs.py's inline includes (``<!-- include: ...run_length_numbers.md#key -->``)."""
    c = cells(rows)
    ref = best_adamw(rows)
    tasks = sorted({r["task"] for r in rows})
    lengths = sorted({r["steps"] for r in rows})
    methods = [m for m in LABELS if any(r["method"] == m for r in rows)]
    out = ["| key | value | what |", "| --- | --- | --- |"]
    for task in tasks:
        bests = []
        for n in lengths:
            lrs = sorted({ref[k]["lr"] for k in ref if k[:2] == (task, n)})
            bests.append(", ".join(f"{lr:g}" for lr in lrs))
        out.append(f"| `{task}/adamw/lr` | {' / '.join(bests)} | best-tuned AdamW's lr at "
                   f"{' / '.join(map(str, lengths))} steps (each seed's best) |")
        for method in methods:
            ws = [worst(c, task, n, method) for n in lengths]
            if all(w is None for w in ws):
                continue
            out.append(f"| `{task}/{method}` | " + " / ".join("" if w is None else f"{w[0]:.3f}x" for w in ws)
                       + f" | {LABELS[method]}: worst loss ratio over its base lrs at {' / '.join(map(str, lengths))} "
                       "steps (seed mean) |")
        for method in methods:
            lrs = sorted({k[3] for k in c if k[:3:2] == (task, method)})
            if len(lrs) < 2 and method not in ("manic", "manic_original"):
                continue
            for lr in lrs:
                vs = [c.get((task, n, method, lr)) for n in lengths]
                out.append(f"| `{task}/{method}@{lr:g}` | " + " / ".join("" if v is None else f"{v['ratio']:.3f}x" for v in vs)
                           + f" | {LABELS[method]} at base lr {lr:g}: loss ratio at {' / '.join(map(str, lengths))} steps "
                           "(seed mean) |")
        for peer in PEERS:
            words = versus(c, task, lengths, "manic", peer)
            if words:
                out.append(f"| `{task}/manic/vs/{peer}` | {words} | the default against {LABELS[peer]}: worst "
                           "ratios compared beyond the larger seed spread |")
        lower = []
        for peer in PEERS:
            ns = [n for n in lengths if (a := worst(c, task, n, "manic")) and (b := worst(c, task, n, peer))
                  and b[0] < a[0]]
            if ns:
                lower.append(f"{LABELS[peer]} at " + ("every length" if len(ns) == len(lengths)
                                                      else _and([str(n) for n in ns]) + " steps"))
        if any(r["method"] in PEERS and r["task"] == task for r in rows):
            out.append(f"| `{task}/manic/peers_lower` | {'; '.join(lower) or 'none'} | the peers whose worst ratio "
                       "(seed mean) is below the default's, by any margin, and where |")
        default = [(n, over_lrs(c, task, n, "manic")) for n in lengths]
        moves = [max(v["ratio"] for v in cs) - min(v["ratio"] for v in cs) for _, cs in default if cs]
        spreads = [v["spread"] for _, cs in default for v in cs]
        if moves:
            out.append(f"| `{task}/manic/lr_move` | {max(moves):.3f} | the default: largest difference in loss ratio "
                       "between two base lrs at one length |")
            out.append(f"| `{task}/manic/seed_spread` | {max(spreads):.3f} | the default: largest difference in loss "
                       "ratio between the seeds of one cell |")
    mine = [v for k, v in c.items() if k[2] == "manic"]
    if mine:
        out.append(f"| `manic/end_over_peak` | {max(v['end'] / v['peak'] for v in mine):.2f} | the default: largest "
                   "final `S * lr` over the run's peak `S * lr_t` (seed means, any task, length, base lr) |")
        runs = [r for r in rows if r["method"] == "manic"]
        bad = sum(1 for r in runs if not math.isfinite(r["val_loss"]) or r["val_loss"] > r["loss0"])
        out.append(f"| `manic/diverged` | {'no run' if bad == 0 else f'{bad} of {len(runs)} runs'} | the default: "
                   "runs that diverged |")
    return "\n".join(out)


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = cells(rows)
    ref = best_adamw(rows)
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

    front_figure(rows, out)

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


# the front figure's look: one colour and marker per method, the same in both panels
STYLE = {"manic": ("tab:blue", "o", "-"), "manic_original": ("tab:cyan", "s", "--"),
         "prodigy": ("tab:red", "^", "-"), "dadapt_adam": ("tab:purple", "v", ":"),
         "schedulefree_adamw": ("tab:green", "D", "-."), "mechanic_pytorch_adamw": ("tab:orange", "P", "--")}


def front_figure(rows: list[dict], out: Path, cap: float = 3.0) -> None:
    """run_length_front.png: the front table as lines, for a page about 900 pixels wide (GitHub's
    README column): one panel per task, the loss ratio to best-tuned AdamW (worst over manic's base
    lrs; the peers' one setting) against the run length, seed spread as error bars, one legend.
    A ratio above ``cap`` is drawn at the top edge with its value written next to it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    c = cells(rows)
    tasks = sorted({r["task"] for r in rows})
    lengths = sorted({r["steps"] for r in rows})
    methods = [m for m in MAIN if any(r["method"] == m for r in rows)]
    short = {"manic": "manic (default)", "manic_original": "manic (original form)"}
    with plt.rc_context({"font.size": 15, "axes.titlesize": 17, "axes.labelsize": 15, "legend.fontsize": 14}):
        fig, axes = plt.subplots(1, len(tasks), figsize=(6.2 * len(tasks), 6.4), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            ax.axhline(1.0, color="black", lw=2, label="best-tuned AdamW (= 1)")
            top, above = 1.0, {}
            for k, method in enumerate(methods):
                ws = [(n, w) for n in lengths if (w := worst(c, task, n, method)) is not None]
                if not ws:
                    continue
                color, marker, ls = STYLE[method]
                shift = 1 + 0.04 * (k - (len(methods) - 1) / 2)  # side by side: error bars do not hide each other
                xs = [n * shift for n, _ in ws]
                ys = [min(w[0], cap) for _, w in ws]
                half = [0.0 if w[0] > cap else w[1] / 2 for _, w in ws]
                ax.errorbar(xs, ys, yerr=[[min(h, y - 0.9) for h, y in zip(half, ys)], half], color=color,
                            marker=marker, ls=ls, lw=2.2, ms=9, capsize=3, elinewidth=1.2,
                            label=short.get(method, LABELS[method]))
                for x, (n, w) in zip(xs, ws):
                    if w[0] > cap:  # stacked above the edge, one line per clipped method at this length
                        above[n] = above.get(n, 0) + 1
                        ax.annotate(f"{w[0]:.1f}x", (n, cap), textcoords="offset points",
                                    xytext=(0, 16 * above[n] - 6), ha="center", fontsize=12, color=color)
                top = max(top, max(y + h for y, h in zip(ys, half)))
            top = min(top, cap)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.xaxis.set_major_locator(FixedLocator(lengths))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticklabels([str(n) for n in lengths])
            ticks = [t for t in (1, 1.1, 1.25, 1.5, 2, 3, 5, 10) if t <= top * 1.02]
            ax.yaxis.set_major_locator(FixedLocator(ticks))
            ax.yaxis.set_minor_locator(NullLocator())
            ax.set_yticklabels([f"{t:g}x" for t in ticks])
            ax.set_ylim(0.95, top * (1.05 + 0.09 * max(above.values(), default=0)))
            ax.set_xlim(lengths[0] / 1.45, lengths[-1] * 1.45)
            ax.grid(True, axis="y", alpha=0.3)
            ax.set_xlabel("run length (steps)")
            ax.set_title(task)
        axes[0][0].set_ylabel("final val loss / tuned AdamW's")
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=3, frameon=False)
        fig.suptitle("Loss ratio to best-tuned AdamW, lower is better\n"
                     "(manic: its worst base lr of 1e-4 ... 1; the peers: one setting each)", fontsize=16)
        fig.tight_layout(rect=(0, 0.17, 1, 1))
        fig.savefig(out / "run_length_front.png", dpi=80)
        plt.close(fig)


def write(rows: list[dict], out: Path = RESULTS) -> None:
    """Draw the figures (the tables: benchmarks/report.py, also run by tools/sync_docs.py)."""
    plot(rows, out)


if __name__ == "__main__":
    rows = load(RESULTS / "run_length.csv")
    write(rows)
    print(summary(rows))
