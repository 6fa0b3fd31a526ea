"""Train a character-level GPT on Python's standard library with manic.

    torchrun --standalone --nproc-per-node 2 launch/train.py --steps 500
    python launch/train.py --help
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import process  # noqa: E402  (first: it notes the parent process before anything slow runs)
from config import Config, parse  # noqa: E402


def build_optimizer(cfg: Config, model):  # noqa: ANN001, ANN201
    import torch

    params = model.parameters()
    if cfg.mechanic and cfg.mechanic_options.per_group:  # a tuner per layer (docs/tuning.md, "Per-group scales")
        import manic

        params = manic.layer_groups(params)
    if cfg.optimizer == "sgd":
        base = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    else:
        kind = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        base = kind(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if not cfg.mechanic:
        return base
    import manic

    return manic.Mechanized(base, cfg.mechanic_options)


def lr_factor(cfg: Config):  # noqa: ANN201
    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, cfg.warmup))
        if cfg.schedule == "constant":
            return warm
        return warm * 0.5 * (1 + math.cos(math.pi * min(step, cfg.steps) / cfg.steps))
    return factor


def main(argv: list[str] | None = None) -> int:
    # SIGTERM / SIGINT (torchrun forwards them to every worker) only set a flag: the ranks agree on
    # it at the next step boundary and save one checkpoint together. Under torchrun, the agent's
    # death sends this worker SIGTERM as well. Installed before torch is imported (parse imports
    # manic for its options).
    process.install_stop_handlers(under_torchrun="TORCHELASTIC_RUN_ID" in os.environ)
    cfg = parse(argv)  # --help exits here, before torch.distributed is touched
    import parallel

    import loop

    rank, world, device = parallel.setup(cfg.device, cfg.timeout)
    try:
        return loop.train(cfg, rank, world, device, build_optimizer, lr_factor(cfg))
    finally:
        parallel.teardown()


if __name__ == "__main__":
    sys.exit(main())
