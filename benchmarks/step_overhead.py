"""Optimizer-step time of manic against its base optimizers and mechanic-pytorch.

Only ``opt.step()`` is timed: every model gets fixed random gradients once, then all methods
are stepped round-robin (interleaved, so machine noise hits them alike), and the median step
time per method is reported with its ratio to the base optimizer it wraps. Models are stacks
of square linear layers of the requested parameter count, float32.

    python benchmarks/step_overhead.py [--params 1e6 8e6 3e7] [--bases adamw_fused ...] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

import _common
import manic

# name -> (optimizer class, keyword arguments)
BASES: dict[str, tuple[type, dict]] = {
    "adamw_fused": (torch.optim.AdamW, {"lr": 1e-3, "fused": True}),
    "adamw_foreach": (torch.optim.AdamW, {"lr": 1e-3, "foreach": True}),
    "sgd_foreach": (torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9, "foreach": True}),
}


def variants(base: str) -> dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]]:
    cls, kwargs = BASES[base]

    def mechanic_pytorch(p: list[torch.Tensor]) -> torch.optim.Optimizer:
        from mechanic_pytorch import mechanize  # wraps an optimizer class

        return mechanize(cls)(p, **kwargs)

    return {
        base: lambda p: cls(p, **kwargs),
        f"manic({base})": lambda p: manic.mechanize(cls(p, **kwargs)),
        f"manic({base}, store_delta=False)": lambda p: manic.mechanize(cls(p, **kwargs), store_delta=False),
        f"manic({base}, compile=True)": lambda p: manic.mechanize(cls(p, **kwargs), compile=True),
        f"mechanic-pytorch({base})": mechanic_pytorch,
    }


def model_params(n: float, seed: int = 0, device: str = "cpu") -> list[torch.Tensor]:
    width = 1024 if n >= 4e6 else 512
    layers = max(1, round(n / (width * width + width)))
    torch.manual_seed(seed)
    params = []
    for _ in range(layers):
        for shape in ((width, width), (width,)):
            p = torch.nn.Parameter(torch.randn(shape, device=device) * 0.02)
            p.grad = torch.randn(shape, device=device) * 1e-3
            params.append(p)
    return params


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(n: float, bases: list[str], repeats: int, warmup: int, device: str = "cpu") -> list[dict]:
    opts = {}
    for base in bases:
        for name, make in variants(base).items():
            opts[name] = (base, make(model_params(n, device=device)))
    times: dict[str, list[float]] = {name: [] for name in opts}
    for name, (_, opt) in opts.items():
        for _ in range(warmup):  # includes torch.compile's first call
            opt.step()
    for _ in range(repeats):
        for name, (_, opt) in opts.items():
            _sync(device)
            start = time.perf_counter()
            opt.step()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    n_actual = sum(p.numel() for p in opts[bases[0]][1].param_groups[0]["params"])
    rows = []
    for name, (base, _) in opts.items():
        rows.append({"params": n_actual, "method": name, "base": base, "ms": median[name],
                     "ratio": median[name] / median[base], "overhead_ms": median[name] - median[base]})
    for r in rows:  # manic's overhead relative to mechanic-pytorch's over the same base
        mp = next((x["overhead_ms"] for x in rows if x["method"] == f"mechanic-pytorch({r['base']})"), None)
        r["vs_mechanic_pytorch"] = r["overhead_ms"] / mp if mp and r["method"].startswith("manic") else None
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| params | method | step ms | x base | overhead / mechanic-pytorch's |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        vs = f"{r['vs_mechanic_pytorch']:.2f}" if r["vs_mechanic_pytorch"] is not None else ""
        lines.append(f"| {r['params'] / 1e6:.1f}M | {r['method']} | {r['ms']:.2f} | {r['ratio']:.2f} | {vs} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, nargs="+", default=[1e6, 8e6, 3e7],
                        help="parameter counts to measure (default 1e6 8e6 3e7; 1e8 works with ~6 GB)")
    parser.add_argument("--bases", nargs="+", default=list(BASES), choices=list(BASES))
    parser.add_argument("--repeats", type=int, default=30, help="timed steps per method (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="one small model, few steps (smoke test)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.params, args.repeats, args.bases = [2e5], 3, ["adamw_fused", "adamw_foreach"]
    rows = []
    for n in args.params:
        rows += measure(n, args.bases, args.repeats, warmup=2 if args.quick else 5, device=args.device)
    env = _common.env_line("python benchmarks/step_overhead.py " + " ".join(sys.argv[1:]),
                           f"{torch.get_num_threads()} threads, median of {args.repeats} interleaved steps")
    text = table(rows) + "\n\n" + env
    print(text)
    md = _common.save(args.out, "step_overhead", args.quick, text)
    with open(md.with_suffix(".csv"), "w") as f:
        f.write("params,method,base,ms,ratio\n")
        f.writelines(f"{r['params']},{r['method']},{r['base']},{r['ms']:.4f},{r['ratio']:.4f}\n" for r in rows)


if __name__ == "__main__":
    main()
