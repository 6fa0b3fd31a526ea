"""Optimizer-step time of manic against its base optimizers and mechanic-pytorch.

Only ``opt.step()`` is timed: every model gets fixed random gradients once, then all methods
are stepped round-robin (interleaved, so machine noise hits them alike), and the median step
time per method is reported with its ratio to the base optimizer it wraps. Models are stacks
of square linear layers of the requested parameter count, float32.

    python benchmarks/step_overhead.py [--params 1e6 8e6 3e7] [--bases adamw_fused ...] [--quick]
    python benchmarks/step_overhead.py --compile-time [--tensors 128]
    python benchmarks/step_overhead.py --device cuda --methods base manic compile [--sequential]

``--methods`` keeps some of each base's variants (base, manic, store_delta=False, compile,
mechanic-pytorch); ``--sequential`` measures one method at a time and frees it before the next
(a model's memory at a time, for models too large to hold every method at once; not interleaved).
The CSV (next to the .md) is written with the csv module: method names hold commas.

The pass model (docs/performance.md, "The limit in passes over memory"): a step of Mechanic moves
``PASSES[method]`` parameter-sized tensors besides the base step, which moves ``BASE_PASSES[base]``;
at the base's own bandwidth the least a wrapper can cost is ``1 + BOUND / BASE_PASSES`` times the
base step. "of bound" is that least ratio over the measured one (1.00: at the bound).
``--compile-time`` measures the first ``compile=True`` step of a model of ``--tensors`` tensors in a
fresh process with an empty Inductor cache (what a user's first run pays).
"""

from __future__ import annotations

import argparse
import csv
import gc
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


# --methods: which of variants()'s entries, in its order
METHODS = ["base", "manic", "store_delta=False", "compile", "mechanic-pytorch"]


def kind(method: str, base: str) -> str:
    """The --methods name of one of variants(base)'s entries."""
    names = {base: "base", f"manic({base})": "manic", f"manic({base}, store_delta=False)": "store_delta=False",
             f"manic({base}, compile=True)": "compile", f"mechanic-pytorch({base})": "mechanic-pytorch"}
    return names[method]


# reads + writes of parameter-sized memory per step
BASE_PASSES = {"adamw_fused": 7, "adamw_foreach": 7, "sgd_foreach": 5}  # AdamW: read x g m v, write x m v
# Mechanic's extra work: sums (eager, 16/32-bit: the largest |g| for their scale 1 (aminmax), the scaled copy
# 2, <g,D> 2 and ||g||^2 1 on it, <x,D> 2, ||x||^2 1; fused: g, D and x in one pass) + rebase (eager
# store_delta: x - x_ref 3, u = . - S * Delta 3, nan_to_num 2, Delta + u 3, x = x_ref + S * Delta 3; fused:
# read x, x_ref, Delta, write Delta, x)
# store_delta=False: diffs x - x_ref (3) + sums (9) + rebase (sub 3, addcmul 3, nan_to_num 2, addcmul 3, addcmul 3)
PASSES = {"manic": 9 + 14, "manic, store_delta=False": 3 + 9 + 14, "manic, compile=True": 3 + 5}
BOUND = 2 + 5  # the sums read g and Delta; the rebase reads x, x_ref, Delta and writes Delta, x


def _passes(method: str) -> int | None:
    if not method.startswith("manic("):
        return None
    inner = method[len("manic("):-1].split(", ", 1)
    return PASSES["manic" + (", " + inner[1] if len(inner) > 1 else "")]


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


def _time_steps(opt: torch.optim.Optimizer, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    opt.step()
    _sync(device)
    return time.perf_counter() - start


def measure(n: float, bases: list[str], repeats: int, warmup: int, device: str = "cpu",
            methods: list[str] | None = None, sequential: bool = False) -> list[dict]:
    """Median step time of each method (``methods``: METHODS names; None: all) over each base. Interleaved
    (every method holds its model at once, stepped round-robin) unless ``sequential``: one method's model
    at a time, freed before the next."""
    methods = methods or METHODS
    makers = {name: (base, make) for base in bases for name, make in variants(base).items()
              if kind(name, base) in methods}
    if not any(kind(name, base) == "base" for name, (base, _) in makers.items()):
        raise SystemExit("--methods must include base (the ratios are to it)")
    times: dict[str, list[float]] = {name: [] for name in makers}
    n_actual = None
    if sequential:
        for name, (base, make) in makers.items():
            params = model_params(n, device=device)
            n_actual = sum(p.numel() for p in params)
            opt = make(params)
            for _ in range(warmup):  # includes torch.compile's first call
                opt.step()
            times[name] = [_time_steps(opt, device) for _ in range(repeats)]
            del opt, params
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    else:
        opts = {}
        for name, (base, make) in makers.items():
            params = model_params(n, device=device)
            n_actual = sum(p.numel() for p in params)
            opts[name] = make(params)
        for opt in opts.values():
            for _ in range(warmup):  # includes torch.compile's first call
                opt.step()
        for _ in range(repeats):
            for name, opt in opts.items():
                times[name].append(_time_steps(opt, device))
        del opts
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    median = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    rows = []
    for name, (base, _) in makers.items():
        row = {"params": n_actual, "method": name, "base": base, "ms": median[name],
               "ratio": median[name] / median[base], "overhead_ms": median[name] - median[base]}
        passes = _passes(name)
        if passes is not None:
            nbytes = 4 * n_actual  # float32
            row["passes"] = passes
            row["gbps"] = passes * nbytes / (row["overhead_ms"] * 1e6) if row["overhead_ms"] > 0 else float("inf")
            row["of_bound"] = (1 + BOUND / BASE_PASSES[base]) / row["ratio"]
        rows.append(row)
    for r in rows:  # manic's overhead relative to mechanic-pytorch's over the same base
        mp = next((x["overhead_ms"] for x in rows if x["method"] == f"mechanic-pytorch({r['base']})"), None)
        r["vs_mechanic_pytorch"] = r["overhead_ms"] / mp if mp and r["method"].startswith("manic") else None
    return rows


CSV_FIELDS = ["params", "method", "base", "ms", "ratio"]  # (the pass model's columns follow from PASSES)


def write_csv(path: Path, rows: list[dict]) -> None:
    """One row per (params, method), quoted where a field holds a comma (method names do)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(CSV_FIELDS)
        writer.writerows([r["params"], r["method"], r["base"], f"{r['ms']:.4f}", f"{r['ratio']:.4f}"] for r in rows)


def table(rows: list[dict]) -> str:
    lines = ["| params | method | step ms | x base | overhead / mechanic-pytorch's | passes | extra work GB/s | of bound |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        vs = f"{r['vs_mechanic_pytorch']:.2f}" if r["vs_mechanic_pytorch"] is not None else ""
        model = (f"{r['passes']} | {r['gbps']:.1f} | {r['of_bound']:.2f}" if "passes" in r else " | | ")
        lines.append(f"| {r['params'] / 1e6:.1f}M | {r['method']} | {r['ms']:.2f} | {r['ratio']:.2f} | {vs} | {model} |")
    return "\n".join(lines)


def _first_compiled_step(tensors: int) -> None:
    """(In a fresh process.) The first and second compile=True steps over fused AdamW, ``tensors``
    tensors (512x512 matrices, which compile=True compiles, and 512-vectors, which it leaves to the
    eager kernels, alternating)."""
    params = []
    for i in range(tensors):
        shape = (512, 512) if i % 2 == 0 else (512,)
        p = torch.nn.Parameter(torch.randn(shape) * 0.02)
        p.grad = torch.randn(shape) * 1e-3
        params.append(p)
    opt = manic.mechanize(torch.optim.AdamW(params, lr=1e-3, fused=True), compile=True)
    times = []
    for _ in range(3):  # (the second may compile again: what the first step's guards did not cover)
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    print("COMPILE " + " ".join(f"{t:.4f}" for t in times))


def compile_time(tensors: int, out: str) -> None:
    import os
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        proc = subprocess.run([sys.executable, __file__, "--_first-step", str(tensors)], env=env, capture_output=True,
                              text=True, check=True)
    first, second, third = (float(t) for t in next(line.split()[1:] for line in proc.stdout.splitlines()
                                                    if line.startswith("COMPILE")))
    text = (f"First `compile=True` steps, {tensors} tensors (512x512 and 512, fused AdamW base), empty Inductor cache: "
            f"the first {first:.1f} s, the second {second:.1f} s, together {first + second:.1f} s; the third step: "
            f"{third * 1e3:.0f} ms.\n\n"
            + _common.env_line("python benchmarks/step_overhead.py --compile-time --tensors " + str(tensors)))
    print(text)
    _common.save(out, "compile_time", False, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, nargs="+", default=[1e6, 8e6, 3e7],
                        help="parameter counts to measure (default 1e6 8e6 3e7; 1e8 works with ~6 GB)")
    parser.add_argument("--bases", nargs="+", default=list(BASES), choices=list(BASES))
    parser.add_argument("--repeats", type=int, default=30, help="timed steps per method (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                        help="which of each base's variants to time (default: all; base is required)")
    parser.add_argument("--sequential", action="store_true",
                        help="one method's model in memory at a time (not interleaved): for large models")
    parser.add_argument("--quick", action="store_true", help="one small model, few steps (smoke test)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--large", type=float, default=None,
                        help="also a model of this many parameters over fused AdamW only, --large-repeats steps "
                             "(1e8 needs ~6 GB), as a second table in the same file")
    parser.add_argument("--large-repeats", type=int, default=10)
    parser.add_argument("--compile-time", action="store_true", help="only the first compile=True step's time")
    parser.add_argument("--tensors", type=int, default=128, help="tensors of the --compile-time model")
    parser.add_argument("--_first-step", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._first_step:
        return _first_compiled_step(args._first_step)
    if args.compile_time:
        return compile_time(args.tensors, args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available (torch {torch.__version__})")
    if args.quick:
        args.params, args.repeats, args.bases = [2e5], 3, ["adamw_fused", "adamw_foreach"]
    rows = []
    for n in args.params:
        rows += measure(n, args.bases, args.repeats, warmup=2 if args.quick else 5, device=args.device,
                        methods=args.methods, sequential=args.sequential)
    how = "steps, one method at a time" if args.sequential else "interleaved steps"
    where = (f"{torch.cuda.get_device_name(args.device)}, " if args.device.startswith("cuda") else
             f"{torch.get_num_threads()} threads, ")
    env = _common.env_line("python benchmarks/step_overhead.py " + " ".join(sys.argv[1:]),
                           f"{where}median of {args.repeats} {how}")
    text = table(rows)
    if args.large:
        big = measure(args.large, ["adamw_fused"], args.large_repeats, warmup=2, device=args.device,
                      methods=args.methods, sequential=args.sequential)
        text += (f"\n\n{args.large / 1e6:g}M parameters (fused AdamW base only, to fit in memory; median of "
                 f"{args.large_repeats} {how}):\n\n" + table(big))
        rows += big
    text += "\n\n" + env
    print(text)
    md = _common.save(args.out, "step_overhead", args.quick, text)
    write_csv(md.with_suffix(".csv"), rows)

if __name__ == "__main__":
    main()
