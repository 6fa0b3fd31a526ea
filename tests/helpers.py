"""Shared test utilities: run manic in either form on fed gradients, side by side with the reference; run
a script in a session of its own."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import manic

import reference as ref

SHAPES = [(3, 4), (5,), (2, 2, 2)]

# name -> (torch factory(params, lr), reference factory(lr), base lr)
BASES = {
    "sgd": (lambda p, lr: torch.optim.SGD(p, lr=lr), lambda lr: ref.SGD(lr), 0.1),
    "sgd_nesterov": (lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-3),
                     lambda lr: ref.SGD(lr, momentum=0.9, nesterov=True, weight_decay=1e-3), 0.05),
    "adam": (lambda p, lr: torch.optim.Adam(p, lr=lr), lambda lr: ref.Adam(lr), 1e-2),
    "adamw": (lambda p, lr: torch.optim.AdamW(p, lr=lr), lambda lr: ref.AdamW(lr), 1e-2),
    "rmsprop": (lambda p, lr: torch.optim.RMSprop(p, lr=lr), lambda lr: ref.RMSprop(lr), 1e-2),
    "adagrad": (lambda p, lr: torch.optim.Adagrad(p, lr=lr), lambda lr: ref.Adagrad(lr), 1e-1),
}


def init_params(seed: int = 0, dtype=torch.float64, shapes=SHAPES) -> list[torch.Tensor]:
    """Weights of magnitude 0.5-1.5 with random signs (none zero)."""
    rng = np.random.default_rng(seed)
    out = []
    for shape in shapes:
        mag = rng.uniform(0.5, 1.5, size=shape) * rng.choice([-1.0, 1.0], size=shape)
        out.append(torch.tensor(mag, dtype=dtype, requires_grad=True))
    return out


def flat(tensors) -> np.ndarray:
    return np.concatenate([t.detach().double().reshape(-1).numpy() for t in tensors])


def unflat(vec: np.ndarray, like: list[torch.Tensor]) -> list[torch.Tensor]:
    out, i = [], 0
    for t in like:
        n = t.numel()
        out.append(torch.tensor(vec[i:i + n].reshape(t.shape), dtype=t.dtype))
        i += n
    return out


class Runner:
    """One training run of manic in a chosen form over fed gradients."""

    def __init__(self, form: str, params: list[torch.Tensor], base: torch.optim.Optimizer,
                 schedule: Callable[[int], float] | None = None, **hyper):
        self.params, self.form, self.base = params, form, base
        if form == "dropin":
            self.opt = manic.mechanize(base, **hyper)
            self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, schedule) if schedule else None
        elif form == "seed":
            sched = torch.optim.lr_scheduler.LambdaLR(base, schedule) if schedule else None
            self.updater = manic.Updater(base, sched)
            self.mechanic = manic.Mechanic(self.updater, **hyper)
        else:
            raise ValueError(form)

    @property
    def scale(self) -> torch.Tensor:
        return self.opt.scale if self.form == "dropin" else self.mechanic.scale

    def step(self, grads: list[torch.Tensor | None]) -> None:
        for p, g in zip(self.params, grads):
            p.grad = None if g is None else g.to(p.dtype).clone()
        if self.form == "dropin":
            self.opt.step()
            if self.sched:
                self.sched.step()
        else:
            self.mechanic.step()
            self.updater.step()


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


# What a launcher may have left in the environment would change how a script starts its ranks.
LAUNCH_VARS = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "ROLE_RANK",
               "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
               "TORCHELASTIC_MAX_RESTARTS", "PL_GLOBAL_SEED", "PL_TRAINER_GPUS")


def run_session(cmd: list[str], cwd: Path | str, timeout: float, merge: bool = True,
                kill: Callable[[int], None] | None = None) -> tuple[int | None, str, str]:
    """Run ``cmd`` in ``cwd`` in a session of its own, one OpenMP thread and no launcher variables in its
    environment: (exit code, stdout, stderr; ``merge``: stderr in stdout). On a timeout ``kill(pid)`` (default:
    its process group) and exit code None."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if merge else subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err or ""
    except subprocess.TimeoutExpired:
        (kill or (lambda pid: os.killpg(pid, signal.SIGKILL)))(proc.pid)
        out, err = proc.communicate()
        return None, out, err or ""
