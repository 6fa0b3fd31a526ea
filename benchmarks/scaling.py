"""Per-rank Mechanic state and step time at 1, 2 and 4 ranks, FSDP2 against DDP (gloo, CPU).

What is measured, per setup (DDP, or FSDP2 with ``fully_shard`` per Linear and on the root) and
world size (ranks are real processes on one machine, gloo on CPU, 1 thread each; a world of 1 is
the same wrapper on a 1-rank group):

* Mechanic state per rank: the bytes of the local shards of every ``opt.state[p]`` entry whose key
  starts with ``mechanic_``, also as a multiple of the parameter bytes that rank holds.
* ``opt.step()`` time of ``manic.mechanize(AdamW(fused=True))`` and of the base optimizer alone
  (the same AdamW on an identically built and wrapped model, same run). The two are stepped
  alternately: forward + backward, a barrier (so skew from backward is not timed), then the timed
  step. After the warm-up steps, the median over the timed steps is taken on each rank; the table
  shows the max over ranks.

With more ranks than cores, ranks share cores: those timings are pessimistic.

    python benchmarks/scaling.py [--params 4e6] [--steps 20] [--worlds 1 2 4] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import manic
import _dist  # benchmarks/_dist.py: the tests' rank launcher (forkserver, gloo, TCPStore on port 0), mlp, wrap

SETUPS = ("ddp", "fsdp2")


def _local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def _timed_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> float:
    """Forward, backward, barrier, then ``opt.step()``; its wall time in seconds."""
    opt.zero_grad()
    model(x).square().mean().backward()
    dist.barrier()
    start = time.perf_counter()
    opt.step()
    return time.perf_counter() - start


def rank_main(rank: int, world: int, setup: str, n_params: float, warmup: int, steps: int,
              fused: bool) -> dict[str, Any]:
    x = torch.randn(16, _dist.width(n_params))
    model = _dist.wrap(_dist.mlp(n_params), setup, world)
    opt = manic.mechanize(torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused))
    plain = _dist.wrap(_dist.mlp(n_params), setup, world)
    base = torch.optim.AdamW(plain.parameters(), lr=1e-3, fused=fused)
    times: dict[str, list[float]] = {"manic": [], "base": []}
    for i in range(warmup + steps):
        pairs = [("manic", model, opt), ("base", plain, base)]
        for name, m, o in pairs if i % 2 == 0 else pairs[::-1]:  # alternate which goes first
            t = _timed_step(m, o, x)
            if i >= warmup:
                times[name].append(t)
    state = sum(_local_bytes(v) for st in opt.state.values() for k, v in st.items() if k.startswith("mechanic_"))
    return {"state": state, "params": sum(_local_bytes(p) for p in model.parameters()),
            "n_params": sum(p.numel() for p in model.parameters()),
            "manic_ms": statistics.median(times["manic"]) * 1e3, "base_ms": statistics.median(times["base"]) * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=4e6, help="MLP size in parameters (default 4e6)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps, median taken (default 20)")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4], help="world sizes (default 1 2 4)")
    parser.add_argument("--foreach", action="store_true", help="AdamW(foreach) instead of AdamW(fused=True)")
    parser.add_argument("--quick", action="store_true", help="smoke test: a 0.5M-parameter MLP, 1 and 2 ranks")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="results directory")
    args = parser.parse_args()
    if args.quick:
        args.params, args.warmup, args.steps, args.worlds = 2e5, 2, 3, [1, 2]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    lines = ["| setup | ranks | Mechanic state / rank (MB) | x param bytes / rank | step ms (manic) | step ms (base) "
             "| ratio |", "| --- | --- | --- | --- | --- | --- | --- |"]
    failures = []
    n_params = 0
    for setup in SETUPS:
        for world in args.worlds:
            try:
                rs = _dist.run(world, rank_main, setup, args.params, args.warmup, args.steps, not args.foreach,
                               timeout=900)
            except Exception as e:  # noqa: BLE001 - report the setup as failing, go on
                lines.append(f"| {setup} | {world} | failed (traceback below) | | | | |")
                failures.append(f"### {setup}, {world} ranks\n\n```\n{str(e).strip()}\n```")
                print(lines[-1], flush=True)
                continue
            n_params = rs[0]["n_params"]
            state, params = max(r["state"] for r in rs), max(r["params"] for r in rs)
            m, b = max(r["manic_ms"] for r in rs), max(r["base_ms"] for r in rs)
            star = " \\*" if world > cores else ""  # timings of an oversubscribed CPU
            lines.append(f"| {setup} | {world} | {state / 1e6:.2f} | {state / params:.2f} | {m:.2f}{star} "
                         f"| {b:.2f}{star} | {m / b:.2f} |")
            print(lines[-1], flush=True)
    impl = "foreach" if args.foreach else "fused=True"
    notes = [f"MLP of {n_params:,} float32 parameters (Linear + Tanh blocks), batch 16, AdamW({impl}, lr=1e-3) "
             f"as the base. Step time: median over {args.steps} timed steps after {args.warmup} warm-up steps, "
             "max over ranks; manic and the base alone step alternately in the same run, each after a barrier. "
             "MB = 1e6 bytes. Under DDP every rank holds the whole model, so its Mechanic state does not shrink "
             "with more ranks; under FSDP2 it is sharded like the parameters.",
             "",
             f"\\* This machine has {cores} cores: with more ranks than cores the ranks share cores (and FSDP2's "
             "all-reduce inside the step waits for descheduled ranks), so those timings are pessimistic."]
    _dist.publish("scaling", args, lines, notes, failures)


if __name__ == "__main__":
    main()
