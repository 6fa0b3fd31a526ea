"""Tuning quality against run length: what Mechanic costs next to best-tuned AdamW and the peers.

For each task, run length T, base lr (four decades, 1e-4 ... 1) and seed, train from the same initialisation
with warmup (5% of T) + cosine and record the final validation loss and accuracy, the train loss
(mean of the last 10% of steps), and the effective step size ``S * lr_t`` over time. Methods:

- ``adamw``: plain AdamW over a lr grid (1e-4, 3e-4, ... 0.3, 1); its best lr per (task, T, seed) is
  the reference. The grid is extended one point past any best that sits on its edge (3, 10, ... or
  3e-5, 1e-5, ...), and again, until every best has a worse neighbour on both sides;
- ``manic``: manic's default (the invariant form) over AdamW, and ``manic_original`` (the authors'
  update, ``variant="original"``) over AdamW, at base lrs 1e-4 ... 1;
- ``manic_original_s<v>``: the original form at other ``s_init`` values (``--s-init-grid``);
- the peers as their authors recommend them for this schedule (warmup, then cosine), not tuned:
  Prodigy at lr 1 with ``safeguard_warmup=True`` (its README: "To avoid issues with warm-up, use
  option safeguard_warmup=True"; ``use_bias_correction`` stays off, recommended there for diffusion
  models only), under the study's warmup + cosine (its README recommends cosine annealing);
  schedule-free AdamW at its default lr 0.0025 (2.5 times AdamW's default 1e-3: its README advises
  1x-10x a scheduled AdamW's lr) with ``warmup_steps`` = the study's warmup and no schedule (its
  README: "Using learning rate warmup is recommended"); D-Adaptation Adam (lr 1) and mechanic-pytorch
  over AdamW (lr 1e-3) at their defaults under the study's schedule. Every peer keeps its default
  weight decay.

Tasks (no download): ``digits`` (benchmarks/lr_sweep.py's MLP on scikit-learn's digits) and
``charlm``, the launcher's character GPT shrunk to fit 2 CPU cores: 1 layer, width 32, context 32,
batch 16 (lr_sweep.py uses 2 layers, width 64, context 64, batch 32).

    python benchmarks/run_length.py [--tasks digits charlm] [--lengths 100 300 1000 3000] [--seeds 2]
                                    [--jobs 2] [--s-init-grid] [--probe] [--replot]

``--probe`` runs the learning-rate probe study instead: manic's default over AdamW for 50, 100 or 300
steps (warmup, then constant) suggests ``S * lr``; plain AdamW is then trained at that lr with the
study's schedule and compared with best-tuned AdamW (rows ``probe<steps>``).

Rows are appended to benchmarks/results/run_length.csv as they finish (a rerun skips rows already
there); ``--replot`` only redraws run_length.png / run_length_front.png and rewrites
run_length_summary.md from the CSV. ``--quick`` (digits, 20 steps, 1 seed) only checks that it runs.
"""

from __future__ import annotations

import argparse
import csv
import math
import multiprocessing as mp
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lr_sweep  # noqa: E402
import report  # noqa: E402
import run_length_report  # noqa: E402
from run_length_report import load  # noqa: E402

import manic  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CSV = RESULTS / "run_length.csv"
BASE_LRS = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
ADAMW_LRS = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]
ADAMW_LIMITS = (1e-7, 100.0)  # the grid's automatic extension (past_edges) stops here
S_INIT_GRID = [1e-8, 1e-4, 1e-2]  # the original form's other starts (1e-6 is manic_original)
# the default form with one knob moved, at base lr 1e-2 only (the form is invariant to the base lr)
ABLATIONS = {"manic_wd1": {"weight_decay": 1.0}, "manic_wd2": {"weight_decay": 2.0},
             "manic_s1e-4": {"s_init": 1e-4}, "manic_s1e-2": {"s_init": 1e-2}}
# per_group=True (one tuner per param group), at base lr 1e-2, against the default's single tuner:
# "kind" splits matrices from vectors (biases, norms), the grouping of the usual decay/no-decay split;
# "layer" makes each matrix a group with the vectors that follow it (its bias, the next norm: manic.layer_groups)
PER_GROUP = {"manic_per_group_kind": "kind", "manic_per_group_layer": "layer"}
PROBES = [50, 100, 300]  # probe lengths (--probe)
PEERS = {"prodigy": 1.0, "dadapt_adam": 1.0, "schedulefree_adamw": 0.0025, "mechanic_pytorch_adamw": 1e-3}
FIELDS = ["task", "steps", "method", "lr", "seed", "val_loss", "val_acc", "train_loss", "loss0", "final_scale",
          "peak_eff_lr", "eff_lr_trace"]
LABELS = {"manic": "manic (default: invariant)", "manic_original": "manic (original)", "prodigy": "Prodigy",
          "dadapt_adam": "D-Adaptation Adam", "schedulefree_adamw": "schedule-free AdamW",
          "mechanic_pytorch_adamw": "mechanic-pytorch"}


def make_task(name: str, steps: int) -> lr_sweep.Task:
    if name == "digits":
        return lr_sweep.digits_task(steps)
    return lr_sweep.charlm_task(steps, n_layer=1, n_embd=32, block_size=32, batch_size=16)


def build(method: str, params: list[torch.Tensor], lr: float, warmup: int = 0) -> torch.optim.Optimizer:
    """The optimizer of ``method``; ``warmup``: the study's warmup steps, which the peers are told of
    as their authors recommend (Prodigy's ``safeguard_warmup``, schedule-free's ``warmup_steps``)."""
    if method == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, lr=lr, safeguard_warmup=warmup > 0)
    if method == "schedulefree_adamw":
        from schedulefree import AdamWScheduleFree

        return AdamWScheduleFree(params, lr=lr, warmup_steps=warmup)
    if method == "manic":
        return manic.mechanize(torch.optim.AdamW(params, lr=lr))
    if method in PER_GROUP:
        return manic.mechanize(torch.optim.AdamW(param_groups(params, PER_GROUP[method]), lr=lr), per_group=True)
    if method in ABLATIONS:  # the default form with one knob changed
        return manic.mechanize(torch.optim.AdamW(params, lr=lr), **ABLATIONS[method])
    if method.startswith("manic_original"):
        s_init = float(method.split("_s")[-1]) if "_s" in method else 1e-6
        return manic.mechanize(torch.optim.AdamW(params, lr=lr), variant="original", s_init=s_init)
    return lr_sweep.build(method, params, lr)


def param_groups(params: list[torch.Tensor], how: str) -> list[dict]:
    """``params`` (in the model's order) as param groups: "kind" or "layer" (see PER_GROUP)."""
    if how == "kind":
        return [{"params": [p for p in params if p.dim() >= 2]}, {"params": [p for p in params if p.dim() < 2]}]
    return manic.layer_groups(params)


def probe(name: str, steps: int, lr: float, seed: int) -> float:
    """Mechanic as a learning-rate probe: ``steps`` of manic's default over AdamW at base lr ``lr`` (warmup,
    then constant: a probe does not anneal); returns the lr it suggests for AdamW, ``S * lr``."""
    task = make_task(name, steps)
    model = task.make_model(seed)
    opt = manic.mechanize(torch.optim.AdamW(model.parameters(), lr=lr))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / warmup))
    for step in range(steps):
        x, y = task.batch(step, seed)
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, -2), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return float(opt.scale) * lr


def run(job: tuple[str, int, str, float, int]) -> dict:
    torch.set_num_threads(1)
    name, steps, method, lr, seed = job
    suggested = probe(name, int(method[len("probe"):]), lr, seed) if method.startswith("probe") else None
    task = make_task(name, steps)
    model = task.make_model(seed)
    # a probe row: AdamW at the lr the probe suggested; final_scale * lr records that lr
    warmup = max(1, steps // 20)
    opt = build("adamw" if suggested else method, list(model.parameters()), suggested or lr, warmup)
    cosine = lambda t: min(1.0, (t + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * t / steps))  # noqa: E731
    schedule_free = method == "schedulefree_adamw"
    sched = None if schedule_free else torch.optim.lr_scheduler.LambdaLR(opt, cosine)
    loss0 = task.evaluate(model)[0]
    every = max(1, steps // 20)
    train, trace = [], []
    for step in range(steps):
        if schedule_free:
            opt.train()
        x, y = task.batch(step, seed)
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, -2), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        train.append(loss.item())
        if step % every == 0 or step == steps - 1:
            if isinstance(opt, manic.Mechanized):
                trace.append(float(opt.effective_lr[0]))  # S * lr_t, the step this update was applied with
            elif not schedule_free:
                trace.append(opt.param_groups[0]["lr"] * opt.param_groups[0].get("d", 1.0))
        if sched:
            sched.step()
    if schedule_free:
        opt.eval()
    val_loss, val_acc = task.evaluate(model)
    if not math.isfinite(val_loss):
        val_loss, val_acc = float("nan"), 0.0
    tail = train[-max(1, steps // 10):]
    # (per_group: the first group's, as in the trace)
    scale = float(opt.scale.reshape(-1)[0]) if isinstance(opt, manic.Mechanized) else suggested / lr if suggested else float("nan")
    return {"task": name, "steps": steps, "method": method, "lr": lr, "seed": seed, "val_loss": val_loss,
            "val_acc": val_acc, "train_loss": sum(tail) / len(tail), "loss0": loss0, "final_scale": scale,
            "peak_eff_lr": max(trace) if trace else float("nan"), "eff_lr_trace": " ".join(f"{v:.3g}" for v in trace)}


def probe_jobs(tasks: list[str], lengths: list[int], seeds: int) -> list[tuple]:
    """AdamW trained at the lr a short Mechanic probe suggests, at every base lr (``--probe``)."""
    jobs = [(name, steps, f"probe{p}", lr, seed) for seed in range(seeds) for p in PROBES for name in tasks
            for steps in lengths if steps > p for lr in BASE_LRS]
    return sorted(jobs, key=lambda j: (j[4], j[1] == max(lengths), -j[1]))


def jobs_for(tasks: list[str], lengths: list[int], seeds: int, s_init_grid: bool) -> list[tuple]:
    jobs = []
    for name in tasks:
        for steps in lengths:
            for seed in range(seeds):
                jobs += [(name, steps, "adamw", lr, seed) for lr in ADAMW_LRS]
                for method in ["manic", "manic_original"] + ([f"manic_original_s{v:g}" for v in S_INIT_GRID]
                                                             if s_init_grid else []):
                    jobs += [(name, steps, method, lr, seed) for lr in BASE_LRS]
                jobs += [(name, steps, method, lr, seed) for method, lr in PEERS.items()]
                jobs += [(name, steps, method, 1e-2, seed) for method in [*ABLATIONS, *PER_GROUP]]
    # Everything below the longest length first (long runs first, so that the pool does not end on
    # one long job), then the longest length seed by seed: a cut-short study still has whole tables.
    longest = max(lengths)
    return sorted(jobs, key=lambda j: (j[1] == longest, j[4] if j[1] == longest else 0, -j[1]))


def _neighbour(lr: float, up: bool) -> float:
    """The next point of the 1-3-10 grid above (or below) ``lr``."""
    decade = abs(math.log10(lr) - round(math.log10(lr))) < 1e-9
    return float(f"{lr * (3 if decade else 10 / 3) if up else lr / (10 / 3 if decade else 3):.1g}")


def past_edges(tasks: list[str], lengths: list[int], seeds: int, path: Path | None = None) -> list[tuple]:
    """AdamW jobs one grid point past every best that sits on the edge of the lrs run so far (all seeds
    of that task and length), from the rows in ``path``; empty once every best is inside its grid."""
    rows = [r for r in load(path or CSV) if r["method"] == "adamw" and math.isfinite(r["val_loss"])]
    jobs = []
    for name in tasks:
        for steps in lengths:
            mine = [r for r in rows if (r["task"], r["steps"]) == (name, steps)]
            lrs = sorted({r["lr"] for r in mine} | set(ADAMW_LRS))
            for seed in range(seeds):
                runs = [r for r in mine if r["seed"] == seed]
                if not runs:
                    continue
                best = min(runs, key=lambda r: r["val_loss"])["lr"]
                for edge, up in ((lrs[-1], True), (lrs[0], False)):
                    nxt = _neighbour(edge, up)
                    if best == edge and ADAMW_LIMITS[0] <= nxt <= ADAMW_LIMITS[1]:
                        jobs += [(name, steps, "adamw", nxt, s) for s in range(seeds)]
    return sorted(set(jobs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["digits", "charlm"], choices=["digits", "charlm"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[100, 300, 1000, 3000])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (one thread each)")
    parser.add_argument("--s-init-grid", action="store_true", help=f"also the original form at s_init {S_INIT_GRID}")
    parser.add_argument("--probe", action="store_true",
                        help=f"only the LR-probe study: AdamW at the lr {PROBES}-step Mechanic probes suggest")
    parser.add_argument("--out", default=str(RESULTS), help="directory of the CSV and the figures")
    parser.add_argument("--quick", action="store_true", help="digits, 20 steps, 1 seed (a smoke test)")
    parser.add_argument("--replot", action="store_true", help="only redraw figures and summary from the CSV")
    args = parser.parse_args()
    path = Path(args.out) / ("run_length_quick.csv" if args.quick else CSV.name)
    if args.quick:
        args.tasks, args.lengths, args.seeds = ["digits"], [20], 1
    while not args.replot:  # again while AdamW's best sits on an edge of its grid (past_edges)
        done = {(r["task"], r["steps"], r["method"], r["lr"], r["seed"]) for r in load(path)}
        jobs = (probe_jobs(args.tasks, args.lengths, args.seeds) if args.probe
                else jobs_for(args.tasks, args.lengths, args.seeds, args.s_init_grid)
                + past_edges(args.tasks, args.lengths, args.seeds, path))
        todo = [j for j in dict.fromkeys(jobs) if j not in done]
        print(f"{len(todo)} runs to do ({len(done)} already in {path})", flush=True)
        if not todo:
            break
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with open(path, "a", newline="") as f, mp.get_context("forkserver").Pool(args.jobs) as pool:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                writer.writeheader()
            for i, row in enumerate(pool.imap_unordered(run, todo)):
                writer.writerow(row)
                f.flush()
                print(f"[{i + 1}/{len(todo)}] {row['task']} T={row['steps']} {row['method']} lr={row['lr']:g} "
                      f"seed={row['seed']}: val {row['val_loss']:.4f}", flush=True)
    if args.quick:
        print(run_length_report.front(load(path)))
    else:
        run_length_report.write(load(path), path.parent)
        report.main()  # the tables


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
