"""The generalisation task suite (issue 26): manic and its peers against best-tuned AdamW on tasks
manic's defaults were not tuned on, with the diagnostics of Mechanic's scale.

Tasks (benchmarks/suite_tasks.py, ``HALVES``): a DEVELOPMENT half (manic's two tuning tasks and three
more) and a TEST half (English prose, word-level, fine-tuning, tabular, a reparametrised transformer).
Tune defaults on dev only; test is for checking them.

Methods, each trained from the same initialisation for T steps (``--lengths``) with warmup over 10%
of T, then cosine to 0, unless its authors say otherwise:

- ``adamw``: torch AdamW (weight_decay 0.01) over the half-decade grid ``ADAMW_GRID``, swept
  adaptively per (task, T, seed): three lrs around the task's ``lr_hint``, then one more at a time in
  the direction of the best until the best has a worse neighbour on both sides (or is at the grid's
  end). Its best final validation loss is the reference; ratio = a run's final val loss / that.
- the manic candidates, ``MANIC``: ``manic.mechanize(torch.optim.AdamW(params, lr=base_lr,
  weight_decay=0.01), **kwargs)`` at base lr ``MANIC_BASE_LR`` (1e-2) unless the entry says ``base_lr``;
  ``manic_lr1e-3`` checks the default form's invariance to the base lr.
- the peers, ``PEERS``, at the settings their authors recommend (``PEER_SETTINGS`` says exactly which).

Diagnostics of every manic run (any optimizer that is a ``manic.Mechanized``): ``S * lr_t``
(``opt.effective_lr[0]``) at ~20 points (``eff_lr_trace``; every method has this trace, with its own
effective lr), the final ``S`` and ``S * base_lr`` (``final_eff_lr``: the peak lr the run ended with,
comparable with AdamW's lr), and the greedy oracle (``oracle_trace``): at 10, 25, 50, 75, 90 and 100%
of T, the training loss on ``ORACLE_BATCHES`` fixed train batches along Mechanic's line
``x(S') = x_ref + S' * Delta`` for ``S' = S * 2**k`` (k = -5..5, extended while the best is at an end, then refined to quarter
octaves around the best), parameters restored after. Each entry of the trace is ``step,S*base_lr,S'*base_lr,loss(S),loss(S'),edge``
with ``S'`` the argmin (``edge`` 1: the argmin is at the extended grid's end, 2**+-12).

Usage:

    python benchmarks/suite.py [--half dev|test|all] [--tasks ...] [--methods ...] [--lengths 150 300 1000 3000]
                               [--seeds 2] [--jobs 1] [--quick] [--replot] [--manic NAME=JSON ...]

Rows are appended to benchmarks/results/suite.csv as they finish and a rerun skips the rows already
there, so an interrupted run resumes. Jobs run seed by seed, and within a seed by length, short first,
so that a run cut short still has whole tables. After the runs (and with ``--replot`` alone),
benchmarks/suite_report.py writes suite_dev.md, suite_test.md and suite.png from the CSV.
``--quick`` (3 tasks, 20 steps, 1 seed) writes the ``*_quick.*`` files instead, which git ignores.

To add a manic candidate, put a line in ``MANIC``, e.g. ``"manic_wd2": {"weight_decay": 2.0}``
(keys: mechanize's keywords, plus ``base_lr``), or a callable ``(params) -> optimizer``; then run only
it (AdamW's sweep is reused from the CSV, or run if missing) with

    python benchmarks/suite.py --half dev --methods adamw manic_wd2

or, without editing this file, ``--manic 'manic_wd2={"weight_decay": 2.0}' --methods adamw manic_wd2``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import csv
import io
import json
import math
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import candidates  # noqa: E402
import suite_tasks  # noqa: E402
from suite_tasks import HALF, HALVES, warmup_cosine  # noqa: E402

import manic  # noqa: E402

RESULTS = Path(__file__).parent / "results"
ADAMW_GRID = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]
WEIGHT_DECAY = 0.01
MANIC_BASE_LR = 1e-2
# name -> mechanize's keywords (plus "base_lr", the AdamW lr it wraps), or a callable (params) -> optimizer
MANIC: dict[str, dict[str, Any] | Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {
    "manic": {},
    "manic_lr1e-3": {"base_lr": 1e-3},
    "manic_distance": {"distance_floor": True},  # the library form of cand_distance (docs/algorithm.md)
}
# the non-greedy candidates of benchmarks/candidates.py (a research prototype): run only when named
CANDIDATES = {f"cand_{name}": functools.partial(candidates.Candidate, kind=kind, **knobs)
              for name, (kind, knobs) in candidates.CANDIDATES.items()}
SCHEDULEFREE_LR = 0.0025
PEER_SETTINGS = {
    "prodigy": "prodigyopt.Prodigy(params, lr=1.0, weight_decay=0.01, safeguard_warmup=True, "
               "use_bias_correction=True), warmup 10% + cosine (its README: lr 1, cosine annealing, "
               "safeguard_warmup=True with warm-up)",
    "schedulefree": f"schedulefree.AdamWScheduleFree(params, lr={SCHEDULEFREE_LR}, warmup_steps=T//10, "
                    "weight_decay=0.01), no scheduler, opt.train() before each step, opt.eval() before "
                    "evaluating (lr: the package default; its README asks for warmup_steps and no schedule)",
    "mechanic_pytorch": "mechanic_pytorch.mechanize(torch.optim.AdamW)(params, lr=1e-3, weight_decay=0.01) "
                        "(the authors' defaults: s_decay 0.01, s_init 1e-8), warmup 10% + cosine "
                        "(as benchmarks/run_length.py)",
    "dadapt": "dadaptation.DAdaptAdam(params, lr=1.0, weight_decay=0.01, decouple=True), warmup 10% + cosine "
              "(its README: lr 1, the usual schedule, decouple=True for AdamW-style decay)",
}
PEERS = list(PEER_SETTINGS)
ORACLE_AT = [0.1, 0.25, 0.5, 0.75, 0.9, 1.0]
ORACLE_BATCHES = 4
ORACLE_K = (-5, 5)  # S' = S * 2**k; extended while the argmin is at an end, up to ORACLE_K_MAX
ORACLE_K_MAX = 12
ORACLE_REFINE = (-0.5, -0.25, 0.25, 0.5)  # then S * 2**(k + d) around the best k
FIELDS = ["task", "half", "steps", "method", "lr", "seed", "val_loss", "val_metric", "loss0", "train_loss",
          "final_scale", "final_eff_lr", "eff_lr_trace", "oracle_trace", "diverged", "seconds"]
QUICK_TASKS = ["digits_mlp_c10", "breast_cancer_mlp", "charlm_prose_c0.1"]


def methods() -> list[str]:
    return ["adamw", *MANIC, *PEERS]


# ---------------------------------------------------------------- optimizers

def build(method: str, params: list[torch.Tensor], steps: int, lr: float | None, spec: Any = None
          ) -> tuple[torch.optim.Optimizer, float, bool]:
    """(optimizer, the lr to record, whether the warmup + cosine schedule applies)."""
    if method == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=WEIGHT_DECAY), lr, True
    if spec is None and method in MANIC:
        spec = MANIC[method]
    if spec is None and method in CANDIDATES:
        spec = CANDIDATES[method]
    if spec is not None:
        if callable(spec):
            opt = spec(params)
            return opt, opt.param_groups[0]["lr"], True
        kw = dict(spec)
        base_lr = kw.pop("base_lr", MANIC_BASE_LR)
        return manic.mechanize(torch.optim.AdamW(params, lr=base_lr, weight_decay=WEIGHT_DECAY), **kw), base_lr, True
    if method == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, lr=1.0, weight_decay=WEIGHT_DECAY, safeguard_warmup=True,
                       use_bias_correction=True), 1.0, True
    if method == "schedulefree":
        from schedulefree import AdamWScheduleFree

        return AdamWScheduleFree(params, lr=SCHEDULEFREE_LR, warmup_steps=steps // 10,
                                 weight_decay=WEIGHT_DECAY), SCHEDULEFREE_LR, False
    if method == "mechanic_pytorch":
        from mechanic_pytorch import mechanize

        return mechanize(torch.optim.AdamW)(params, lr=1e-3, weight_decay=WEIGHT_DECAY), 1e-3, True
    if method == "dadapt":
        from dadaptation import DAdaptAdam

        return DAdaptAdam(params, lr=1.0, weight_decay=WEIGHT_DECAY, decouple=True), 1.0, True
    raise ValueError(f"unknown method {method!r}; known: {methods()}")


def scale_of(opt: torch.optim.Optimizer) -> float:
    """The factor the method puts on its lr: manic's S, Prodigy's / D-Adaptation's d, mechanic-pytorch's
    sum of s; NaN for AdamW and schedule-free."""
    if isinstance(opt, manic.Mechanized):
        return float(opt.scale.reshape(-1)[0])
    g = opt.param_groups[0]
    if "d" in g:
        return float(g["d"])
    mech = opt.state.get("_mechanic") if isinstance(opt.state, dict) else None
    if mech is not None:
        return float(mech["s"].sum())
    return math.nan


def eff_lr(opt: torch.optim.Optimizer) -> float:
    """The lr the step just taken was applied with."""
    if isinstance(opt, manic.Mechanized):
        return float(opt.effective_lr[0])
    g = opt.param_groups[0]
    if "scheduled_lr" in g:  # schedule-free
        return float(g["scheduled_lr"])
    s = scale_of(opt)
    return g["lr"] * (1.0 if math.isnan(s) else s)


# ---------------------------------------------------------------- the greedy oracle

@torch.no_grad()
def oracle(opt: manic.Mechanized, model: torch.nn.Module, task: suite_tasks.SuiteTask,
           batches: list, base_lr: float, step: int) -> str | None:
    """The scale a greedy line search would pick now: argmin over S' of the training loss on
    ``batches`` at ``x_ref + S' * Delta``. Returns one oracle_trace entry; None for per-group scales."""
    S = opt.scale
    if S.dim():
        return None
    S = float(S)
    line = []
    for p in (q for g in opt.param_groups for q in g["params"]):
        st = opt.state.get(p, {})
        ref, delta = st.get("mechanic_ref"), st.get("mechanic_delta")
        if ref is None and delta is None:
            continue
        if ref is None:
            ref = p - S * delta
        if delta is None:
            delta = (p - ref) / S if S else torch.zeros_like(p)
        line.append((p, p.detach().clone(), ref, delta))
    if not line or not S or not math.isfinite(S):
        return None
    was_training = model.training
    model.eval()

    def f(k: float) -> float:
        for p, _, ref, delta in line:
            p.copy_(ref + (S * 2.0**k) * delta)
        v = sum(task.loss(model, b).item() for b in batches) / len(batches)
        return v if math.isfinite(v) else math.inf

    lo, hi = ORACLE_K
    vals = {float(k): f(k) for k in range(lo, hi + 1)}

    def argmin() -> float:
        return min(vals, key=lambda k: (vals[k], abs(k)))

    while True:
        best = argmin()
        if best == min(vals) and best > -ORACLE_K_MAX:
            vals[best - 1] = f(best - 1)
        elif best == max(vals) and best < ORACLE_K_MAX:
            vals[best + 1] = f(best + 1)
        else:
            break
    edge = int(abs(best) == ORACLE_K_MAX)
    for d in ORACLE_REFINE:  # a quarter-octave resolution around the best power of 2
        if abs(best + d) <= ORACLE_K_MAX:
            vals[best + d] = f(best + d)
    best = argmin()
    for p, saved, _, _ in line:
        p.copy_(saved)
    model.train(was_training)
    return f"{step},{S * base_lr:.4g},{S * 2.0**best * base_lr:.4g},{vals[0]:.5g},{vals[best]:.5g},{edge}"


# ---------------------------------------------------------------- one run

def train(name: str, method: str, steps: int, seed: int, lr: float | None = None, spec: Any = None) -> dict:
    torch.set_num_threads(1)
    t0 = time.process_time()
    task = suite_tasks.get(name)
    model = task.make_model(seed)
    with contextlib.redirect_stdout(io.StringIO()):  # Prodigy and D-Adaptation print at construction
        opt, lr, scheduled = build(method, list(model.parameters()), steps, lr, spec)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: warmup_cosine(t, steps)) if scheduled else None
    schedule_free = hasattr(opt, "train") and "train_mode" in opt.param_groups[0]
    mechanized = isinstance(opt, manic.Mechanized)
    loss0 = task.evaluate(model)[0]
    batches = [task.batch(10**7 + i, seed) for i in range(ORACLE_BATCHES)] if mechanized else []
    checkpoints = {max(1, round(f * steps)) for f in ORACLE_AT}
    every = max(1, steps // 20)
    losses, trace, oracles = [], [], []
    finite = True
    for step in range(steps):
        if schedule_free:
            opt.train()
        loss = task.loss(model, task.batch(step, seed))
        if not math.isfinite(loss.item()):
            finite = False
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % every == 0 or step == steps - 1:
            trace.append(eff_lr(opt))
        if sched:
            sched.step()
        if mechanized and step + 1 in checkpoints:
            entry = oracle(opt, model, task, batches, lr, step + 1)
            if entry:
                oracles.append(entry)
    if schedule_free:
        opt.eval()
    val_loss, val_metric = task.evaluate(model) if finite else (math.nan, math.nan)
    if not math.isfinite(val_loss):
        val_loss, val_metric = math.nan, math.nan
    tail = losses[-max(1, steps // 10):] if finite and losses else [math.nan]
    scale = scale_of(opt)
    final_eff = scale * lr if not math.isnan(scale) else lr
    return {"task": name, "half": HALF[name], "steps": steps, "method": method, "lr": lr, "seed": seed,
            "val_loss": val_loss, "val_metric": val_metric, "loss0": loss0, "train_loss": sum(tail) / len(tail),
            "final_scale": scale, "final_eff_lr": final_eff, "eff_lr_trace": " ".join(f"{v:.3g}" for v in trace),
            "oracle_trace": " ".join(oracles), "diverged": int(not math.isfinite(val_loss) or val_loss > loss0),
            "seconds": round(time.process_time() - t0, 2)}


def _grid_losses(have: dict[float, float]) -> dict[int, float]:
    """AdamW's results so far, by index into ADAMW_GRID (a diverged run counts as inf)."""
    return {i: (v if math.isfinite(v) else math.inf) for i, g in enumerate(ADAMW_GRID)
            for lr, v in have.items() if math.isclose(lr, g, rel_tol=1e-9)}


def _next_lr(loss: dict[int, float]) -> int | None:
    """The sweep's rule: the grid index to run next, None when the best has a worse (or no) neighbour
    on both sides. The tried lrs are always a contiguous range of the grid; a gap (a row lost to an
    interruption) is filled first."""
    tried = sorted(loss)
    gap = next((i for i in range(tried[0], tried[-1]) if i not in loss), None)
    if gap is not None:
        return gap
    best = min(tried, key=lambda i: (loss[i], i))
    if best == tried[0] and best > 0:
        return best - 1
    if best == tried[-1] and best < len(ADAMW_GRID) - 1:
        return best + 1
    return None


def sweep(name: str, steps: int, seed: int, done: dict[float, float]) -> list[dict]:
    """AdamW's adaptive sweep for one (task, T, seed); ``done`` maps the lrs already in the CSV to
    their val loss. Returns the new rows."""
    loss = _grid_losses(done)
    rows = []

    def run(i: int) -> None:
        row = train(name, "adamw", steps, seed, ADAMW_GRID[i])
        rows.append(row)
        loss[i] = row["val_loss"] if math.isfinite(row["val_loss"]) else math.inf

    if not loss:  # the core: three lrs around the task's hint
        hint = suite_tasks.get(name).lr_hint
        c = min(range(len(ADAMW_GRID)), key=lambda i: abs(math.log(ADAMW_GRID[i] / hint)))
        c = min(max(c, 1), len(ADAMW_GRID) - 2)
        for i in (c - 1, c, c + 1):
            run(i)
    while (i := _next_lr(loss)) is not None:
        run(i)
    return rows


def run_job(job: tuple) -> list[dict]:
    kind, name, steps, seed, extra = job
    torch.set_num_threads(1)
    if kind == "adamw":
        return sweep(name, steps, seed, extra)
    method, spec = extra
    return [train(name, method, steps, seed, spec=spec)]


# ---------------------------------------------------------------- the runner

def load(path: Path) -> list[dict]:
    import suite_report

    return suite_report.load(path)


def jobs_for(tasks: list[str], chosen: list[str], lengths: list[int], seeds: int, rows: list[dict],
             specs: dict[str, Any]) -> list[tuple]:
    done = {(r["task"], r["steps"], r["method"], r["seed"]) for r in rows}
    jobs = []
    for seed in range(seeds):
        for steps in sorted(lengths):
            for name in tasks:
                for method in chosen:
                    if method == "adamw":
                        have = {r["lr"]: r["val_loss"] for r in rows
                                if (r["task"], r["steps"], r["method"], r["seed"]) == (name, steps, "adamw", seed)}
                        if not have or _next_lr(_grid_losses(have)) is not None:
                            jobs.append(("adamw", name, steps, seed, have))
                    elif (name, steps, method, seed) not in done:
                        jobs.append(("one", name, steps, seed, (method, specs.get(method))))
    return jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--half", choices=["dev", "test", "all"], default="all")
    parser.add_argument("--tasks", nargs="+", choices=list(suite_tasks.TASKS), help="default: the half's tasks")
    parser.add_argument("--methods", nargs="+", help=f"default: all of {methods()}")
    parser.add_argument("--manic", nargs="+", default=[], metavar="NAME=JSON",
                        help="extra manic candidates, e.g. 'manic_wd2={\"weight_decay\": 2.0}'")
    parser.add_argument("--lengths", nargs="+", type=int)
    parser.add_argument("--seeds", type=int)
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (one thread each)")
    parser.add_argument("--out", default=str(RESULTS), help="directory of the CSV, tables and figure")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_TASKS}, 20 steps, 1 seed: a smoke test")
    parser.add_argument("--replot", action="store_true", help="only rewrite the tables and figure from the CSV")
    args = parser.parse_args()
    for entry in args.manic:
        name, _, kw = entry.partition("=")
        MANIC[name] = json.loads(kw or "{}")
    specs = {m: MANIC[m] for m in MANIC if isinstance(MANIC[m], dict)}
    chosen = args.methods or methods()
    unknown = [m for m in chosen if m not in methods() and m not in CANDIDATES]
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {methods()}")
    if args.quick:
        args.tasks = args.tasks or QUICK_TASKS
        args.lengths = args.lengths or [20]
        args.seeds = args.seeds or 1
    tasks = args.tasks or (HALVES["dev"] + HALVES["test"] if args.half == "all" else HALVES[args.half])
    lengths = args.lengths or [150, 300, 1000, 3000]
    seeds = args.seeds or 2
    out = Path(args.out)
    path = out / ("suite_quick.csv" if args.quick else "suite.csv")
    if not args.replot:
        jobs = jobs_for(tasks, chosen, lengths, seeds, load(path), specs)
        print(f"{len(jobs)} jobs to do ({path}); tasks {tasks}, methods {chosen}, lengths {lengths}, "
              f"seeds {seeds}", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        t0 = time.time()
        with open(path, "a", newline="") as f, mp.get_context("forkserver").Pool(args.jobs) as pool:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                writer.writeheader()
            for i, rows in enumerate(pool.imap_unordered(run_job, jobs)):
                for row in rows:
                    writer.writerow(row)
                    f.flush()
                    print(f"[{i + 1}/{len(jobs)} {time.time() - t0:.0f}s] {row['task']} T={row['steps']} "
                          f"{row['method']} lr={row['lr']:g} seed={row['seed']}: val {row['val_loss']:.4f} "
                          f"({row['seconds']:.1f} s CPU)", flush=True)
    import suite_report

    for p in suite_report.write(path, out, quick=args.quick):
        print(f"wrote {p}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
