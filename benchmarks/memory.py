"""Memory cost of Mechanic and its peers, as multiples of the parameters' bytes.

Measured per method, each in a fresh process (so allocator high-water marks do not mix):
- persistent extra: bytes of every tensor in the optimizer's state (and param groups), minus
  the same for plain AdamW, the base every method is compared with;
- peak extra: how far the steps raise the process's high-water RSS above where it stood right
  before the first step, with the model, its gradients and the optimizer built (ru_maxrss; on CUDA
  torch.cuda.max_memory_allocated after resetting the peak to what is allocated before the first
  step), minus the same for plain AdamW: the state the steps create plus the largest transient of
  a step, without the process's own noise.
The model is a stack of 1024x1024 linear layers with fixed random gradients.
``--fsdp2`` adds the same per rank under FSDP2 at 1, 2 and 4 ranks (gloo on CPU; local shards),
where a method that fails under FSDP2 is reported as failing.

    python benchmarks/memory.py [--params 8e6] [--fsdp2] [--quick]
    python benchmarks/memory.py --device cuda --params 1e8 --methods adamw manic manic_delta

Writes memory.md and memory.csv (bytes per method) to --out; each method's process has --timeout
seconds.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

import _common

METHODS = ["adamw", "manic", "manic_recompute", "manic_delta", "mechanic_pytorch", "prodigy", "dadapt_adam"]
STATE = {"manic": "ref+delta", "manic_recompute": "ref", "manic_delta": "delta"}  # manic's state= per method


def build(method: str, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    lr = 1e-3
    if method == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    if method in STATE:
        import manic

        return manic.mechanize(torch.optim.AdamW(params, lr=lr), state=STATE[method])
    if method == "mechanic_pytorch":
        from mechanic_pytorch import mechanize

        return mechanize(torch.optim.AdamW)(params, lr=lr)
    if method == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, lr=1.0)
    if method == "dadapt_adam":
        from dadaptation import DAdaptAdam

        return DAdaptAdam(params, lr=1.0)
    raise ValueError(method)


def tensor_bytes(obj: Any, seen: set[int]) -> int:
    """Bytes of the distinct tensors reachable from obj (dicts, lists, tuples)."""
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen:
            return 0
        seen.add(id(obj))
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    return 0


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def worker(method: str, n_params: float, steps: int, device: str, fsdp2: bool = False) -> dict[str, float]:
    torch.manual_seed(0)
    layers = max(1, round(n_params / (1024 * 1024 + 1024)))
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(layers)]).to(device)
    if fsdp2:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            fully_shard(layer)
        fully_shard(model)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = build(method, params)
    cuda = device.startswith("cuda")
    if cuda:  # the high-water mark from here: what is allocated before the first step
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = float(torch.cuda.memory_allocated(device))
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0
    for _ in range(steps):
        opt.step()
    seen = {id(p) for p in params} | {id(p.grad) for p in params}
    if fsdp2:
        state = sum(_local(t).numel() * _local(t).element_size() for st in opt.state.values() if isinstance(st, dict)
                    for t in st.values() if isinstance(t, torch.Tensor) and id(t) not in seen)
        return {"param_bytes": float(sum(_local(p).numel() * _local(p).element_size() for p in params)),
                "state_bytes": float(state),
                "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0 - before}
    state = tensor_bytes(dict(opt.state), seen) + tensor_bytes(
        [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups], seen)
    if cuda:
        torch.cuda.synchronize(device)
        peak = float(torch.cuda.max_memory_allocated(device)) - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0 - before
    return {"param_bytes": float(sum(p.numel() * p.element_size() for p in params)), "state_bytes": float(state),
            "peak_bytes": peak}


def _rank_worker(rank: int, world: int, method: str, n_params: float, steps: int) -> dict[str, float]:
    return worker(method, n_params, steps, "cpu", fsdp2=True)


def fsdp2_table(args: argparse.Namespace) -> list[str]:
    """Per-rank extra bytes over AdamW under FSDP2 (each method and world size in fresh ranks)."""
    import _dist

    worlds, methods = ([2], ["adamw", "manic"]) if args.quick else ([1, 2, 4], METHODS)
    lines = ["Per rank under FSDP2 (local shards; extra over AdamW at the same world size, x the rank's "
             "parameter bytes):", "", "| method | " + " | ".join(f"{w} rank(s): persistent / peak" for w in worlds)
             + " |", "| --- |" + " --- |" * len(worlds)]
    results: dict[tuple[str, int], object] = {}
    for world in worlds:
        for method in methods:
            try:
                rs = _dist.run(world, _rank_worker, method, args.params, args.steps, timeout=300)
                results[(method, world)] = max(rs, key=lambda r: r["peak_bytes"])
            except Exception as e:  # noqa: BLE001 - a peer failing under FSDP2 is a result
                errors = [ln.strip() for ln in str(e).splitlines() if re.match(r"\s*\w+(Error|Exception)\b", ln)]
                results[(method, world)] = (errors[-1] if errors else str(e).strip().splitlines()[0])[:90]
    for method in methods:
        cells = []
        for world in worlds:
            r, base = results[(method, world)], results[("adamw", world)]
            if isinstance(r, str) or isinstance(base, str):
                cells.append(f"fails: {r}" if isinstance(r, str) else "base failed")
                continue
            pb = r["param_bytes"]
            cells.append(f"{(r['state_bytes'] - base['state_bytes']) / pb:.2f} / "
                         f"{(r['peak_bytes'] - base['peak_bytes']) / pb:.2f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=8e6, help="approximate parameter count (default 8e6)")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per run (default 5)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="a small model and two steps (smoke test)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="results directory")
    parser.add_argument("--fsdp2", action="store_true", help="also per rank under FSDP2 at 1, 2 and 4 ranks")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS,
                        help="methods to measure (adamw, the base of the comparison, always runs)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per method's process")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.params, args.steps = 2e6, 2
    if args.worker:
        print(json.dumps(worker(args.worker, args.params, args.steps, args.device)))
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available (torch {torch.__version__})")

    rows = {}
    for method in ["adamw", *[m for m in args.methods if m != "adamw"]]:
        rows[method] = run_method(method, args)
    base = rows["adamw"]
    if "error" in base:
        raise SystemExit(f"memory.py: plain AdamW, the base of every comparison, failed: {base['error']}")
    pb = base["param_bytes"]
    high_water = "max_memory_allocated" if args.device.startswith("cuda") else "RSS"
    lines = [f"Model: {pb / 1e6:.1f} MB of float32 parameters on {args.device}; {args.steps} steps; extra = "
             "method minus plain AdamW (persistent: optimizer-state tensors; peak: how far the steps raise the "
             f"high-water {high_water} above its level before the first step, in a fresh process).", "",
             "| method | persistent extra (MB) | x param bytes | peak extra (MB) | x param bytes |",
             "| --- | --- | --- | --- | --- |"]
    for method, r in rows.items():
        if "error" in r:
            lines.append(f"| {method} | failed: {r['error']} | | | |")
            continue
        pers, peak = r["state_bytes"] - base["state_bytes"], r["peak_bytes"] - base["peak_bytes"]
        lines.append(f"| {method} | {pers / 1e6:.1f} | {pers / pb:.2f} | {peak / 1e6:.1f} | {peak / pb:.2f} |")
    env = _common.env_line("python benchmarks/memory.py " + " ".join(sys.argv[1:]))
    if args.fsdp2:
        lines += ["", *fsdp2_table(args)]
    text = "\n".join(lines + ["", env])
    print(text)
    md = _common.save(args.out, "memory", args.quick, text)
    write_csv(md.with_suffix(".csv"), rows, args.device)


def run_method(method: str, args: argparse.Namespace) -> dict:
    """One method in a fresh process (its own high-water marks), within ``args.timeout`` seconds."""
    cmd = [sys.executable, __file__, "--worker", method, "--params", str(args.params), "--steps",
           str(args.steps), "--device", args.device]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout:g} s"}
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


CSV_FIELDS = ["device", "method", "param_bytes", "state_bytes", "peak_bytes", "persistent_extra_x", "peak_extra_x",
              "error"]


def write_csv(path: Path, rows: dict[str, dict], device: str) -> None:
    """Bytes per method and the extras over plain AdamW as multiples of the parameters' bytes."""
    base = rows["adamw"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, lineterminator="\n")
        writer.writeheader()
        for method, r in rows.items():
            if "error" in r:
                writer.writerow({"device": device, "method": method, "error": r["error"]})
                continue
            pb = r["param_bytes"]
            writer.writerow({"device": device, "method": method, "param_bytes": int(pb),
                             "state_bytes": int(r["state_bytes"]), "peak_bytes": int(r["peak_bytes"]),
                             "persistent_extra_x": f"{(r['state_bytes'] - base['state_bytes']) / pb:.4f}",
                             "peak_extra_x": f"{(r['peak_bytes'] - base['peak_bytes']) / pb:.4f}", "error": ""})


if __name__ == "__main__":
    main()
