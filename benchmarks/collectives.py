"""Collectives and bytes one Mechanic step sends, per parallel setup (real gloo ranks on CPU).

What is measured: every op in the ``c10d`` / ``_c10d_functional`` namespaces dispatched while
``opt.step()`` runs, for ``opt = manic.mechanize(torch.optim.AdamW(..., fused=True))`` on an MLP
wrapped in DDP, FSDP2 (``fully_shard``), HSDP (FSDP2 on a 2x2 replicate x shard mesh), FSDP1 and
tensor parallelism. A ``TorchDispatchMode`` counts the ops and sums the bytes of their tensor
arguments (an in-place all-reduce counts its buffer once; an all-gather or reduce-scatter counts
its input and output). Each setup trains a few steps; the table shows the count per step (a range
if it varied over steps or ranks). For contrast, in the same run: the same counts for the base
optimizer's step alone (plain fused AdamW, same setup), the collectives the setup itself issues in
forward + backward, and the bytes of one all-reduce of all gradients (what DDP moves per step).

    python benchmarks/collectives.py [--params 2e6] [--steps 4] [--quick]
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path
from typing import Any

import torch

import manic
from manic.testing import Count  # the collectives and their bytes
import _dist  # benchmarks/_dist.py: the tests' rank launcher (forkserver, gloo, TCPStore on port 0), mlp, wrap

SETUPS = [("ddp", 2), ("fsdp2", 2), ("hsdp", 4), ("fsdp1", 2), ("fsdp2", 4), ("tp", 2)]
QUICK_SETUPS = [("ddp", 2), ("fsdp2", 2)]


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
           steps: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]], Counter[str]]:
    """(count, bytes) of each step and of each forward + backward; the step's ops (last step).
    The first step is not counted: it also runs Mechanic's one-time configuration check."""
    steps_seen, fwd_bwd = [], []
    ops: Counter[str] = Counter()
    for i in range(steps + 1):
        opt.zero_grad()
        with Count() as fb:
            model(x).square().mean().backward()
        with Count() as c:
            opt.step()
        if i == 0:
            continue
        steps_seen.append((c.collectives, c.bytes))
        fwd_bwd.append((fb.collectives, fb.bytes))
        ops = Counter(name.split(".")[1] for name in c.names)  # c10d.allreduce_.default: allreduce_
    return steps_seen, fwd_bwd, ops


def rank_main(rank: int, world: int, setup: str, n_params: float, steps: int) -> dict[str, Any]:
    x = torch.randn(8, _dist.width(n_params))
    model = _dist.wrap(_dist.mlp(n_params), setup, world)
    opt = manic.mechanize(torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True))
    manic_steps, fwd_bwd, ops = _train(model, opt, x, steps)
    plain = _dist.wrap(_dist.mlp(n_params), setup, world)
    base_steps, _, _ = _train(plain, torch.optim.AdamW(plain.parameters(), lr=1e-3, fused=True), x, steps)
    full = _dist.mlp(n_params)
    grad_bytes = sum(p.numel() * p.element_size() for p in full.parameters())
    return {"manic": manic_steps, "base": base_steps, "fwd_bwd": fwd_bwd, "ops": dict(ops),
            "grad_allreduce_bytes": grad_bytes, "params": sum(p.numel() for p in full.parameters())}


def _span(values: list[int], fmt: str = "{:,}") -> str:
    lo, hi = min(values), max(values)
    return fmt.format(lo) if lo == hi else f"{fmt.format(lo)}–{fmt.format(hi)}"


def _row(setup: str, world: int, rs: list[dict[str, Any]]) -> str:
    def col(key: str, i: int) -> list[int]:
        return [step[i] for r in rs for step in r[key]]

    def last(key: str, i: int) -> list[int]:  # steady state (DDP rebuilds its buckets after step 1)
        return [r[key][-1][i] for r in rs]

    m_count, m_bytes = col("manic", 0), col("manic", 1)
    grad = rs[0]["grad_allreduce_bytes"]
    ops = ", ".join(f"{k} x{v}" for k, v in sorted(rs[0]["ops"].items())) or "none"
    fraction = f"{max(m_bytes) / grad:.1e}" if max(m_bytes) else "0"
    return (f"| {setup} | {world} | {_span(m_count)} | {_span(m_bytes)} | {ops} | "
            f"{_span(col('base', 0))} / {_span(col('base', 1))} | "
            f"{_span(last('fwd_bwd', 0))} / {_span(last('fwd_bwd', 1))} | {grad:,} | {fraction} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=2e6, help="MLP size in parameters (default 2e6)")
    parser.add_argument("--steps", type=int, default=4, help="steps counted per setup (default 4)")
    parser.add_argument("--quick", action="store_true", help="smoke test: a 0.5M-parameter MLP, ddp and fsdp2 only")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="results directory")
    args = parser.parse_args()
    setups = SETUPS
    if args.quick:
        args.params, args.steps, setups = 2e5, 2, QUICK_SETUPS
    lines = ["| setup | ranks | collectives / step | bytes / step | ops in the step | base step alone: "
             "collectives / bytes | setup's own fwd+bwd: collectives / bytes | one gradient all-reduce (bytes) "
             "| step bytes / gradient all-reduce |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    failures = []
    n_params = 0
    for setup, world in setups:
        try:
            rs = _dist.run(world, rank_main, setup, args.params, args.steps, timeout=600)
            n_params = rs[0]["params"]
            lines.append(_row(setup, world, rs))
        except Exception as e:  # noqa: BLE001 - report the setup as failing, go on
            lines.append(f"| {setup} | {world} | failed (traceback below) | | | | | | |")
            failures.append(f"### {setup}, {world} ranks\n\n```\n{str(e).strip()}\n```")
        print(lines[-1], flush=True)
    notes = [f"MLP of {n_params:,} float32 parameters, {args.steps} steps per setup, counts per step over all "
             "steps and ranks (a range if they varied). Bytes are the summed sizes of each collective's tensor "
             "arguments: an in-place all-reduce counts its buffer once, an all-gather or reduce-scatter its input "
             "and output. 'Base step alone' is fused AdamW without Mechanic on the same setup; 'fwd+bwd' is what the "
             "setup itself sends in the last step's forward and backward (DDP's bucketed gradient all-reduce, FSDP's all-gathers and "
             "reduce-scatters). Setups: ddp = DistributedDataParallel; fsdp2 = fully_shard per Linear and the root; "
             "hsdp = the same on init_device_mesh('cpu', (2, 2), mesh_dim_names=('replicate', 'shard')); "
             "fsdp1 = FullyShardedDataParallel(model, device_id=cpu); tp = alternating Colwise/RowwiseParallel."]
    _dist.publish("collectives", args, lines, notes, failures)


if __name__ == "__main__":
    main()
