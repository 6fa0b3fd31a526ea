"""The training loop: steps, evaluation, logging, checkpoints, SIGTERM handling."""

from __future__ import annotations

import csv
import os
import threading
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.nn import functional as F

import checkpoint
import parallel
from config import Config
from data import CharData
from model import GPT, GPTConfig

FIELDS = ["step", "train_loss", "val_loss", "lr", "scale", "step_time"]
STOP = threading.Event()  # set by the SIGTERM handler (train.py)


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


def train(cfg: Config, rank: int, world: int, device: torch.device, build_optimizer: Callable,
          lr_factor: Callable[[int], float]) -> int:
    out = Path(cfg.out_dir)
    ckpt_dir = Path(cfg.ckpt_dir) if cfg.ckpt_dir else out / "checkpoints"
    (out / "pids").mkdir(parents=True, exist_ok=True)
    (out / "pids" / f"rank{rank}.pid").write_text(str(os.getpid()))
    mode = cfg.parallel or ("fsdp2" if world > 1 else "none")

    torch.manual_seed(cfg.seed)
    data = CharData.load(cfg.data_bytes)
    gpt = GPT(GPTConfig(data.vocab_size, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size))
    model = parallel.wrap(gpt, mode, world, device)
    opt = build_optimizer(cfg, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    start = 0
    if cfg.resume:
        path = checkpoint.latest(ckpt_dir)
        if path is not None:
            trainer = checkpoint.load(path, model, opt)
            start = trainer["step"]
            sched.load_state_dict(trainer["sched"])
    if rank == 0:
        _metrics_file(out, start)
        print(f"manic launcher: {mode} on {world} x {device.type}, {sum(p.numel() for p in gpt.parameters()):,} "
              f"parameters, steps {start}..{cfg.steps}, mechanic={'on' if cfg.mechanic else 'off'}", flush=True)
    bar = None
    if rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="train", dynamic_ncols=True)

    def save(step: int) -> None:
        checkpoint.save(ckpt_dir, step, model, opt, {"step": step, "sched": sched.state_dict()})

    tokens = cfg.batch_size * cfg.block_size * world
    for step in range(start, cfg.steps):
        if parallel.agree(STOP.is_set(), device):
            save(step)
            if rank == 0:
                print(f"stopped by SIGTERM at step {step}; checkpoint saved", flush=True)
            return 0
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
            val = _val_loss(model, data, cfg, rank, device) if done % cfg.eval_every == 0 or done == cfg.steps else None
            scale = opt.scale.item() if hasattr(opt, "scale") else None
            if rank == 0:
                with open(out / "metrics.csv", "a", newline="") as f:
                    csv.DictWriter(f, fieldnames=FIELDS).writerow(
                        {"step": done, "train_loss": f"{train_loss:.5f}", "val_loss": "" if val is None else f"{val:.5f}",
                         "lr": f"{opt.param_groups[0]['lr']:.6g}", "scale": "" if scale is None else f"{scale:.6g}",
                         "step_time": f"{dt:.5f}"})
                bar.set_postfix(loss=f"{train_loss:.3f}", scale=f"{scale:.3g}" if scale else "-",
                                tok_s=f"{tokens / dt:,.0f}")
        if bar is not None:
            bar.update(1)
        if cfg.ckpt_every and done % cfg.ckpt_every == 0 and done < cfg.steps:
            save(done)
    save(cfg.steps)
    _final(model, opt, cfg, out, rank)
    if bar is not None:
        bar.close()
    return 0


def _final(model: torch.nn.Module, opt: torch.optim.Optimizer, cfg: Config, out: Path, rank: int) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        scale = opt.scale.item() if hasattr(opt, "scale") else None
        torch.save({"model": full, "scale": scale, "steps": cfg.steps}, out / "final.pt")
        from plot import plot

        plot(out)
        print(f"done: {out / 'metrics.csv'}, {out / 'metrics.png'}, {out / 'final.pt'}", flush=True)
    if dist.is_initialized():
        dist.barrier()
