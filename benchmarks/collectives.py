"""Collectives and bytes one Mechanic step sends, per parallel setup (real gloo ranks on CPU).

Counts every c10d / functional-collective op dispatched inside ``opt.step()`` (a
TorchDispatchMode) and the bytes of its tensor arguments, next to the bytes one gradient
all-reduce of the same model moves (what DDP sends per step anyway).

    python benchmarks/collectives.py [--params 2e6] [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import manic
import _common
import _dist

SETUPS = [("ddp", 2), ("fsdp2", 2), ("fsdp2", 4), ("hsdp", 4), ("fsdp1", 2), ("tp", 2)]


def rank_main(rank: int, world: int, setup: str, n_params: float, steps: int) -> dict:
    model = _dist.wrap(_dist.mlp(n_params), setup, world)
    base = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)  # no collective of its own
    opt = manic.mechanize(base)
    x = torch.randn(8, _dist.width(n_params))
    counts = []
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        with _dist.Collectives() as c:
            opt.step()
        counts.append((c.count, c.bytes))
    n = sum(p.numel() for p in _dist.mlp(n_params).parameters())
    return {"collectives": counts[-1][0], "bytes": counts[-1][1], "grad_allreduce_bytes": 4 * n, "params": n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=2e6, help="model size (default 2e6)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a tiny model, two setups (smoke test)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    setups = SETUPS
    if args.quick:
        args.params, setups = 2e5, [("ddp", 2), ("fsdp2", 2)]
    lines = ["| setup | ranks | collectives / step | bytes / step | one gradient all-reduce (bytes) |",
             "| --- | --- | --- | --- | --- |"]
    for setup, world in setups:
        try:
            r = _dist.run(world, rank_main, setup, args.params, args.steps, timeout=300)[0]
            lines.append(f"| {setup} | {world} | {r['collectives']} | {r['bytes']} | {r['grad_allreduce_bytes']:,} |")
        except Exception as e:  # noqa: BLE001 - report the setup as failing, go on
            lines.append(f"| {setup} | {world} | failed: {str(e).strip().splitlines()[-1][:120]} | | |")
    text = "\n".join(lines) + "\n\n" + _common.env_line("python benchmarks/collectives.py " + " ".join(sys.argv[1:]),
                                                         "gloo on CPU, 1 thread per rank")
    print(text)
    _common.save(args.out, "collectives", args.quick, text)


if __name__ == "__main__":
    main()
