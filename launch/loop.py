"""The training loop: start-up checks, steps, evaluation, logging, checkpoints, clean stops."""

from __future__ import annotations

import csv
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.nn import functional as F

import checkpoint
import parallel
import process
import rundir
from config import Config
from data import CharData
from model import GPT, GPTConfig

FIELDS = ["step", "train_loss", "val_loss", "lr", "scale", "effective_lr", "step_time"]


def _val_loss(model: torch.nn.Module, data: CharData, cfg: Config, rank: int, device: torch.device) -> float:
    losses = []
    with torch.no_grad():
        for i in range(cfg.eval_batches):
            x, y = data.batch("val", cfg.batch_size, cfg.block_size, cfg.seed + 1_000_000, i, rank)
            losses.append(F.cross_entropy(model(x.to(device)).flatten(0, 1), y.to(device).flatten()).item())
    return parallel.mean(sum(losses) / len(losses), device)


def _metrics_file(out: Path, start: int) -> None:
    """Rank 0: a fresh CSV, or on resume the rows up to the checkpoint's step."""
    path = out / "metrics.csv"
    rows = []
    if start and path.exists():
        with open(path) as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def train(cfg: Config, rank: int, world: int, device: torch.device, build_optimizer: Callable,
          lr_factor: Callable[[int], float]) -> int:
    out, ckpt_dir = rundir.dirs(cfg)
    plan = None
    if rank == 0:
        plan = rundir.plan(cfg, process.command())
        if plan["refused"]:
            print(rundir.REFUSED + plan["refused"], file=sys.stderr, flush=True)
        elif plan["note"]:
            print(plan["note"], flush=True)
    plan = parallel.share(plan)
    if plan["refused"]:
        return 1  # every rank, quietly: rank 0 said why
    resume_from = Path(plan["resume"]) if plan["resume"] else None
    start = plan["step"]
    if rank == 0 and cfg.resume:
        print(f"resuming from {resume_from} (step {start})" if resume_from else
              f"no complete checkpoint in {ckpt_dir}: starting from step 0", flush=True)
    finished = resume_from is not None and start >= cfg.steps
    if finished and rank == 0:
        print(f"already finished: {resume_from} is at step {start} (--steps {cfg.steps}); nothing to train",
              flush=True)
    if finished and (out / "final.pt").exists():
        return 0  # the run is left exactly as it was
    mode = cfg.parallel or ("fsdp2" if world > 1 else "none")

    torch.manual_seed(cfg.seed)
    data = CharData.load(cfg.data_bytes)
    gpt_cfg = GPTConfig(data.vocab_size, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size)
    gpt = GPT(gpt_cfg)
    model = parallel.wrap(gpt, mode, world, device)
    opt = build_optimizer(cfg, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    last = {"train_loss": None, "val_loss": None, "scale": None}
    if finished:  # but final.pt is missing (a kill between the last checkpoint and it): write it
        checkpoint.load(resume_from, model, opt)
        _final(model, opt, cfg, gpt_cfg, out, rank, start, last)
        return 0
    if resume_from is not None:
        trainer = checkpoint.load(resume_from, model, opt)
        sched.load_state_dict(trainer["sched"])
    if rank == 0:
        _metrics_file(out, start)
        print(f"manic launcher: {mode} on {world} x {device.type}, {sum(p.numel() for p in gpt.parameters()):,} "
              f"parameters, steps {start}..{cfg.steps}, mechanic={'on' if cfg.mechanic else 'off'}", flush=True)
    bar = None
    if rank == 0:
        try:
            from tqdm import tqdm
        except ImportError:  # the progress bar is optional (pip install tqdm); metrics.csv has every step
            tqdm = None
        if tqdm is not None:
            bar = tqdm(total=cfg.steps, initial=start, desc="train", dynamic_ncols=True)

    saved = resume_from

    def save(step: int) -> None:
        nonlocal saved
        saved = checkpoint.save(ckpt_dir, step, model, opt, {"step": step, "sched": sched.state_dict()})
        if rank == 0:
            rundir.prune(ckpt_dir, cfg.keep_last, keep=resume_from)

    tokens = cfg.batch_size * cfg.block_size * world
    try:
        for step in range(start, cfg.steps):
            signum = parallel.agree(process.stop_signal(), device)  # any rank's signal stops them all
            if signum:
                if saved is None or rundir.step_of(saved) != step:
                    save(step)
                if bar is not None:
                    bar.close()
                    why = " (the torchrun agent died)" if process.agent_died() else ""
                    val = "" if last["val_loss"] is None else f", val loss {last['val_loss']:.3f}"
                    print(f"stopped by signal at step {step}{why}{val}, checkpoint at {saved}, "
                          f"resume with: {process.resume_command()}", flush=True)
                # checkpointed, but not finished: every rank (also those the signal did not reach)
                # exits 128 + the signal, so that every torchrun agent ends at once (process.exit_status)
                return process.exit_status(signum)
            t0 = time.perf_counter()
            x, y = data.batch("train", cfg.batch_size, cfg.block_size, cfg.seed, step, rank)
            loss = F.cross_entropy(model(x.to(device)).flatten(0, 1), y.to(device).flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                dt = time.perf_counter() - t0
                train_loss = parallel.mean(loss.item(), device)
                evaluate = done % cfg.eval_every == 0 or done == cfg.steps
                val = _val_loss(model, data, cfg, rank, device) if evaluate else None
                lr = opt.param_groups[0]["lr"]  # after the schedule stepped: the lr the next step starts with
                scale, effective_lr = None, lr  # with --no-mechanic the effective lr is the lr
                if hasattr(opt, "scale"):
                    from manic.integrations import readout  # S and S * lr, in one host sync

                    shown = readout(opt)
                    scale, effective_lr = shown["mechanic/scale"], shown["mechanic/effective_lr"]
                last.update(train_loss=train_loss, scale=scale, **({} if val is None else {"val_loss": val}))
                if rank == 0:
                    with open(out / "metrics.csv", "a", newline="") as f:
                        csv.DictWriter(f, fieldnames=FIELDS).writerow(
                            {"step": done, "train_loss": f"{train_loss:.5f}",
                             "val_loss": "" if val is None else f"{val:.5f}", "lr": f"{lr:.6g}",
                             "scale": "" if scale is None else f"{scale:.6g}", "effective_lr": f"{effective_lr:.6g}",
                             "step_time": f"{dt:.5f}"})
                    shown_now = dict(loss=f"{train_loss:.3f}", val=_fmt(last["val_loss"]), scale=_fmt(scale, ".3g"),
                                     tok_s=f"{tokens / dt:,.0f}")
                    if bar is not None:
                        bar.set_postfix(**shown_now, refresh=False)
                    else:  # no tqdm: a line per logged step instead of the bar
                        print(f"step {done}: " + ", ".join(f"{k} {v}" for k, v in shown_now.items()), flush=True)
            if bar is not None:
                bar.update(1)
            if cfg.ckpt_every and done % cfg.ckpt_every == 0 and done < cfg.steps:
                save(done)
        save(cfg.steps)
    finally:
        if bar is not None:
            bar.close()  # before any closing line or traceback, so neither lands on the bar
    _final(model, opt, cfg, gpt_cfg, out, rank, cfg.steps, last)
    return 0


def _final(model: torch.nn.Module, opt: torch.optim.Optimizer, cfg: Config, gpt_cfg: GPTConfig, out: Path, rank: int,
           step: int, last: dict) -> None:
    """final.pt: the whole model (unsharded, on CPU) and the run's last numbers; see docs/launcher.md."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        scale = opt.scale.item() if hasattr(opt, "scale") else None
        torch.save({"model": full, "model_config": asdict(gpt_cfg), "config": asdict(cfg), "steps": step,
                    "scale": scale, "train_loss": last["train_loss"], "val_loss": last["val_loss"]}, out / "final.pt")
        wrote = [out / "metrics.csv", out / "final.pt"]
        if (out / "metrics.csv").exists():
            from plot import plot

            try:
                wrote.insert(1, plot(out))
            except ImportError as e:  # the figure is optional: the run has succeeded
                print(f"no metrics.png ({e}): pip install matplotlib, then python launch/plot.py {out}", flush=True)
        print(f"done: step {step}, train loss {_fmt(last['train_loss'])}, val loss {_fmt(last['val_loss'])}, "
              f"scale {_fmt(scale, '.3g')}; wrote {', '.join(map(str, wrote))}", flush=True)
    if dist.is_initialized():
        dist.barrier()
