"""Command-line options of the launcher, as one documented dataclass; Mechanic's own options
come from ``manic.Options`` (the defaults and checks the library uses, written once)."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, field, fields

from manic import Options
from manic.options import field_doc, for_run_length

# Mechanic's options the launcher exposes, and their flag names where the plain one would clash
# with the base optimizer's (--weight-decay); the reducer options are chosen by --parallel.
MECHANIC_FLAGS = {"weight_decay": "mechanic_weight_decay", "eps": "mechanic_eps", "s_init": "s_init",
                  "num_betas": "num_betas", "store_delta": "store_delta", "variant": "variant", "per_group": "per_group",
                  "state": "state", "skip_nonfinite": "skip_nonfinite", "compile": "compile",
                  "fp32_reference": "fp32_reference", "distance_floor": "distance_floor"}


@dataclass
class Config:
    parallel: str | None = None  # none | ddp | fsdp2 | fsdp1 | hsdp; None: fsdp2 with >1 process, else none
    optimizer: str = "adamw"  # base optimizer: adamw | adam | sgd
    lr: float = 1e-3  # base learning rate (the peak of the schedule)
    schedule: str = "cosine"  # cosine (linear warmup, then cosine to 0) | constant (after warmup)
    warmup: int = 20  # warmup steps
    weight_decay: float = 0.0  # the base optimizer's weight decay
    mechanic: bool = True  # wrap the base optimizer with manic.mechanize
    mechanic_options: Options = field(default_factory=Options)  # flags: MECHANIC_FLAGS
    steps: int = 500  # optimizer steps in total
    batch_size: int = 16  # sequences per rank and step
    seed: int = 0
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    block_size: int = 128  # context length in characters
    data_bytes: int = 4_000_000  # characters of the standard library's source to read
    ckpt_dir: str | None = None  # default: OUT_DIR/checkpoints
    ckpt_every: int = 100  # steps between checkpoints (0: only at the end and on SIGTERM)
    keep_last: int = 3  # complete checkpoints kept (0: all); the one resumed from is kept as well
    resume: bool = False  # continue from the latest complete checkpoint in ckpt_dir
    log_every: int = 10  # steps between CSV rows / progress-bar updates
    eval_every: int = 100  # steps between validation losses
    eval_batches: int = 8  # batches per validation loss (per rank)
    out_dir: str = "runs/latest"  # CSV, PNG, final.pt, checkpoints
    device: str = "auto"  # auto (cuda if available) | cpu | cuda
    timeout: float = 300.0  # process-group timeout in seconds: a dead rank fails the others within it


HELP = {
    "parallel": "parallelism: none | ddp | fsdp2 | fsdp1 | hsdp (default: fsdp2 with more than one process, "
                "else none); hsdp needs an even number of processes",
    "optimizer": "base optimizer: adamw | adam | sgd (momentum 0.9)",
    "lr": "base learning rate, the schedule's peak; Mechanic learns a scale on top of it",
    "schedule": "learning-rate schedule after the linear warmup: cosine (to 0) | constant",
    "warmup": "linear warmup steps",
    "weight_decay": "the base optimizer's weight decay",
    "mechanic": "tune the learning-rate scale with Mechanic (--no-mechanic: the base optimizer alone)",
    "steps": "optimizer steps in total",
    "batch_size": "sequences per rank and step",
    "seed": "seed of the model's initialisation and of the batches",
    "n_layer": "transformer blocks",
    "n_embd": "model width",
    "n_head": "attention heads",
    "block_size": "context length in characters",
    "data_bytes": "characters of Python's standard-library source to train on (90%% train, 10%% validation)",
    "ckpt_dir": "checkpoint directory (default: OUT_DIR/checkpoints)",
    "ckpt_every": "steps between checkpoints (0: only at the end and on SIGTERM / SIGINT)",
    "keep_last": "keep the K newest complete checkpoints, delete older ones (0: keep all); the checkpoint "
                 "a run resumed from is kept as well",
    "resume": "continue from the latest complete checkpoint in the checkpoint directory (without one: "
              "start from step 0). Without --resume, a finished run in the directory is started over "
              "(its checkpoints removed) and an unfinished one refused",
    "log_every": "steps between CSV rows and progress-bar updates",
    "eval_every": "steps between validation losses",
    "eval_batches": "batches per validation loss on each rank",
    "out_dir": "output directory: metrics.csv, metrics.png, final.pt, checkpoints/",
    "device": "auto (cuda if available, with NCCL) | cpu (gloo) | cuda",
    "timeout": "process-group timeout in seconds: a failed rank makes the others fail within it",
}


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where the help text does not state its default itself and
    there is one to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None:
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch/train.py",
        description="Train a character-level GPT on Python's standard library with manic (Mechanic). "
                    "Run with: torchrun --standalone --nproc-per-node 2 launch/train.py [options]. "
                    "Outputs, signals, locking, resume and retention: docs/launcher.md",
        formatter_class=_Formatter)
    for f in fields(Config):
        if f.name != "mechanic_options":
            _add(parser, f.name, f.type, f.default, HELP[f.name])
    group = parser.add_argument_group("Mechanic (the keywords of manic.mechanize; docs/options.md)")
    for f in fields(Options):
        if f.name in MECHANIC_FLAGS:
            _add(group, MECHANIC_FLAGS[f.name], f.type, f.default, f"Mechanic's {f.name}: {field_doc(f)}")
    return parser


def _add(parser: argparse._ActionsContainer, name: str, kind: object, default: object, text: str) -> None:
    assert default is not MISSING
    flag = "--" + name.replace("_", "-")
    if kind in (bool, "bool", "bool | None"):  # (None: unset, the option's own default)
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
    else:
        # an optional field ("float | None", default None: per variant) takes the type of its values
        kind = str(kind).removesuffix(" | None")
        parser.add_argument(flag, type={"float": float, "int": int}.get(kind, str), default=default, help=text)


def parse(argv: list[str] | None = None) -> Config:
    args = vars(build_parser().parse_args(argv))
    try:
        options = Options(**{name: args.pop(flag) for name, flag in MECHANIC_FLAGS.items()})
    except (TypeError, ValueError) as e:
        raise SystemExit(f"launch/train.py: {e}") from None
    cfg = Config(**args, mechanic_options=for_run_length(options, args["steps"]))
    if cfg.parallel not in (None, "none", "ddp", "fsdp2", "fsdp1", "hsdp"):
        raise SystemExit(f"--parallel must be none, ddp, fsdp2, fsdp1 or hsdp, got {cfg.parallel!r}")
    if cfg.optimizer not in ("adamw", "adam", "sgd"):
        raise SystemExit(f"--optimizer must be adamw, adam or sgd, got {cfg.optimizer!r}")
    if cfg.schedule not in ("cosine", "constant"):
        raise SystemExit(f"--schedule must be cosine or constant, got {cfg.schedule!r}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise SystemExit(f"--device must be auto, cpu or cuda, got {cfg.device!r}")
    if cfg.keep_last < 0:
        raise SystemExit(f"--keep-last must be 0 (keep all) or more, got {cfg.keep_last}")
    return cfg
