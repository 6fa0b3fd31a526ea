"""Learning-rate robustness: final validation metrics across six decades of base lr (1e-6 ... 1).

For every task, method, base lr and seed, train from the same initialisation and record the final
validation loss and accuracy. Methods: AdamW alone (the bar: its best lr), manic's original form
(``variant="original"``; benchmarks/run_length.py studies the default form) over AdamW and over SGD, mechanic-pytorch over AdamW, and the learning-rate-free peers Prodigy, D-Adaptation Adam and
schedule-free AdamW, each swept over its own lr (a multiplier of 1 for Prodigy/D-Adaptation is
their default). Base optimizers follow warmup + cosine, Prodigy included (without its
``safeguard_warmup``); schedule-free runs without a schedule and without warmup (``warmup_steps=0``).
benchmarks/run_length.py runs Prodigy and schedule-free as their authors recommend under warmup.

Tasks (no download): ``digits``, an MLP on scikit-learn's 8x8 digits; ``charlm``, the launcher's
character-level GPT on the Python standard library's source (launch/).

    python benchmarks/lr_sweep.py [--tasks digits charlm] [--seeds 3] [--quick]

Writes benchmarks/results/lr_sweep.csv, lr_sweep.png (metric vs lr) and lr_sweep_scale.png (the
scale's trajectory for a few base lrs).
"""

from __future__ import annotations

import argparse
import csv
import math
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

import manic

RESULTS = Path(__file__).parent / "results"
GRID = [10.0**e for e in range(-6, 1)]  # base lr 1e-6 ... 1: 7 points, 6 decades
MULTIPLIERS = [10.0**e for e in range(-3, 4)]  # Prodigy / D-Adaptation lr multipliers


@dataclass
class Task:
    name: str
    steps: int
    make_model: Callable[[int], torch.nn.Module]
    batch: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]  # (step, seed) -> train batch
    evaluate: Callable[[torch.nn.Module], tuple[float, float]]  # -> (val loss, val accuracy)


def digits_task(steps: int) -> Task:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    train, val = perm[:1400], perm[1400:]

    def make_model(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))

    def batch(step: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = train[torch.randint(len(train), (64,), generator=torch.Generator().manual_seed(seed * 100003 + step))]
        return X[idx], y[idx]

    @torch.no_grad()
    def evaluate(model: torch.nn.Module) -> tuple[float, float]:
        out = model(X[val])
        return torch.nn.functional.cross_entropy(out, y[val]).item(), (out.argmax(1) == y[val]).float().mean().item()

    return Task("digits", steps, make_model, batch, evaluate)


def charlm_task(steps: int, n_layer: int = 2, n_embd: int = 64, block_size: int = 64, batch_size: int = 32) -> Task:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
    from data import CharData  # type: ignore[import-not-found]
    from model import GPT, GPTConfig  # type: ignore[import-not-found]

    data = CharData.load(max_bytes=1_000_000)
    cfg = GPTConfig(vocab_size=data.vocab_size, n_layer=n_layer, n_head=4, n_embd=n_embd, block_size=block_size)

    def make_model(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return GPT(cfg)

    def batch(step: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return data.batch("train", batch_size, cfg.block_size, seed=seed, step=step)

    @torch.no_grad()
    def evaluate(model: torch.nn.Module) -> tuple[float, float]:
        losses, hits = [], []
        for i in range(8):
            x, y = data.batch("val", batch_size, cfg.block_size, seed=10**6, step=i)
            logits = model(x).flatten(0, 1)
            losses.append(torch.nn.functional.cross_entropy(logits, y.flatten()).item())
            hits.append((logits.argmax(1) == y.flatten()).float().mean().item())
        return sum(losses) / len(losses), sum(hits) / len(hits)  # accuracy: next character, top-1

    return Task("charlm", steps, make_model, batch, evaluate)


def build(method: str, params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    if method == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    if method == "manic_adamw":
        return manic.mechanize(torch.optim.AdamW(params, lr=lr), variant="original")
    if method == "manic_sgd":
        return manic.mechanize(torch.optim.SGD(params, lr=lr, momentum=0.9), variant="original")
    if method == "mechanic_pytorch_adamw":
        from mechanic_pytorch import mechanize

        return mechanize(torch.optim.AdamW)(params, lr=lr)
    if method == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, lr=lr)
    if method == "dadapt_adam":
        from dadaptation import DAdaptAdam

        return DAdaptAdam(params, lr=lr)
    if method == "schedulefree_adamw":
        from schedulefree import AdamWScheduleFree

        return AdamWScheduleFree(params, lr=lr, warmup_steps=0)
    raise ValueError(method)


METHODS = ["adamw", "manic_adamw", "manic_sgd", "mechanic_pytorch_adamw", "prodigy", "dadapt_adam",
           "schedulefree_adamw"]


def run(task: Task, method: str, lr: float, seed: int) -> dict:
    model = task.make_model(seed)
    opt = build(method, list(model.parameters()), lr)
    warmup = max(1, task.steps // 20)
    cosine = lambda t: min(1.0, (t + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * t / task.steps))  # noqa: E731
    sched = None if method == "schedulefree_adamw" else torch.optim.lr_scheduler.LambdaLR(opt, cosine)
    schedule_free = hasattr(opt, "train") and method == "schedulefree_adamw"
    scales = []
    for step in range(task.steps):
        if schedule_free:
            opt.train()
        x, y = task.batch(step, seed)
        out = model(x)
        loss = torch.nn.functional.cross_entropy(out.flatten(0, -2), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched:
            sched.step()
        if isinstance(opt, manic.Mechanized) and step % 10 == 0:
            scales.append(opt.scale.item())
    if schedule_free:
        opt.eval()
    val_loss, val_acc = task.evaluate(model)
    if not math.isfinite(val_loss):
        val_loss, val_acc = float("nan"), 0.0
    return {"task": task.name, "method": method, "lr": lr, "seed": seed, "val_loss": val_loss, "val_acc": val_acc,
            "scales": " ".join(f"{s:.4g}" for s in scales)}


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for method in METHODS:
            pts = [r for r in rows if r["task"] == task and r["method"] == method]
            lrs = sorted({r["lr"] for r in pts})
            if not lrs:
                continue
            vals = [[r["val_loss"] for r in pts if r["lr"] == lr] for lr in lrs]
            mean = [sum(v) / len(v) for v in vals]
            line, = ax.plot(lrs, mean, marker="o", label=method)
            ax.fill_between(lrs, [min(v) for v in vals], [max(v) for v in vals], alpha=0.15, color=line.get_color())
        ax.set_xscale("log")
        ax.set_xlabel("lr (base lr; multiplier for prodigy / dadapt_adam)")
        ax.set_ylabel("final validation loss")
        ax.set_title(task)
        ax.set_ylim(top=min(ax.get_ylim()[1], 2 * max(r["val_loss"] for r in rows if r["task"] == task
                                                      and r["method"] == "adamw" and math.isfinite(r["val_loss"]))))
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "lr_sweep.png", dpi=110)

    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for r in rows:
            if r["task"] == task and r["method"] == "manic_adamw" and r["seed"] == 0 and r["scales"]:
                s = [float(v) for v in r["scales"].split()]
                ax.plot([10 * i for i in range(len(s))], s, label=f"base lr {r['lr']:g}")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("Mechanic scale S")
        ax.set_title(f"{task}: manic over AdamW")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "lr_sweep_scale.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["digits", "charlm"], choices=["digits", "charlm"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="override each task's step count")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--quick", action="store_true", help="1 seed, 3 lrs, few steps (a smoke test)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--replot", metavar="CSV", help="only redraw figures and summary from a results CSV")
    args = parser.parse_args()
    if args.replot:
        with open(args.replot) as f:
            rows = [{**r, "lr": float(r["lr"]), "seed": int(r["seed"]), "val_loss": float(r["val_loss"]),
                     "val_acc": float(r["val_acc"])} for r in csv.DictReader(f)]
        plot(rows, Path(args.out))
        print(summarize(rows))
        return
    torch.set_num_threads(1)
    grid, mults, seeds = GRID, MULTIPLIERS, range(args.seeds)
    default_steps = {"digits": 600, "charlm": 300}
    if args.quick:
        grid, mults, seeds = [1e-5, 1e-3, 1e-1], [0.1, 1.0, 10.0], range(1)
        default_steps = {"digits": 40, "charlm": 10}
    makers = {"digits": digits_task, "charlm": charlm_task}
    jobs = []
    for name in args.tasks:
        task = makers[name](args.steps or default_steps[name])
        for method in args.methods:
            for lr in (mults if method in ("prodigy", "dadapt_adam") else grid):
                jobs += [(task, method, lr, seed) for seed in seeds]
    rows = [run(*job) for job in tqdm(jobs, desc="lr sweep")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "lr_sweep_quick" if args.quick else "lr_sweep"
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if not args.quick:
        plot(rows, out)
    summary = summarize(rows)
    env = (f"torch {torch.__version__}, {platform.machine()}, 1 thread; "
           f"command: python benchmarks/lr_sweep.py {' '.join(sys.argv[1:])}")
    (out / f"{stem}.md").write_text(summary + "\n\n" + env + "\n")
    print(summary)


def summarize(rows: list[dict]) -> str:
    """Per task and method (seed means over the lr grid): the best validation loss and accuracy,
    and at how many lrs the method comes within 10% of the best-tuned AdamW's loss and within
    2 points of its accuracy."""
    lines = ["| task | method | best val loss (lr) | lrs within 10% of AdamW's best loss | best val acc | "
             "lrs within 2 points of AdamW's best acc |", "| --- | --- | --- | --- | --- | --- |"]
    for task in sorted({r["task"] for r in rows}):
        runs: dict[tuple[str, float], list[dict]] = {}
        for r in rows:
            if r["task"] == task:
                runs.setdefault((r["method"], r["lr"]), []).append(r)
        loss = {k: sum(r["val_loss"] for r in v) / len(v) for k, v in runs.items()}
        acc = {k: sum(r["val_acc"] for r in v) / len(v) for k, v in runs.items()}
        bar_loss = min(v for (m, _), v in loss.items() if m == "adamw" and math.isfinite(v))
        bar_acc = max(v for (m, _), v in acc.items() if m == "adamw")
        for method in METHODS:
            keys = [k for k in runs if k[0] == method]
            if not keys:
                continue
            finite = [k for k in keys if math.isfinite(loss[k])]
            best = min(finite, key=loss.get) if finite else None
            good_loss = sum(1 for k in finite if loss[k] <= 1.1 * bar_loss)
            good_acc = sum(1 for k in keys if acc[k] >= bar_acc - 0.02)
            best_txt = f"{loss[best]:.4f} ({best[1]:g})" if best else "diverged"
            lines.append(f"| {task} | {method} | {best_txt} | {good_loss}/{len(keys)} | "
                         f"{max(acc[k] for k in keys):.3f} | {good_acc}/{len(keys)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
