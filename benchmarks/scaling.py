"""Per-rank Mechanic state and step time at 1, 2 and 4 ranks, FSDP2 against DDP (gloo, CPU).

For each setup and world size: bytes of Mechanic's state on one rank (the local shards of every
``mechanic_*`` tensor in ``opt.state``), as a multiple of the parameter bytes that rank holds,
and the median ``opt.step()`` time of manic and of the base optimizer alone (same run, same
setup; the max over ranks is reported). On a 2-core machine 4 ranks oversubscribe the CPU, so
the 4-rank times are pessimistic.

    python benchmarks/scaling.py [--params 4e6] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import manic
import _common
import _dist


def _local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def _median_step_ms(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, steps: int) -> float:
    times = []
    for i in range(steps + 3):
        opt.zero_grad()
        model(x).square().mean().backward()
        start = time.perf_counter()
        opt.step()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def rank_main(rank: int, world: int, setup: str, n_params: float, steps: int) -> dict:
    x = torch.randn(16, _dist.width(n_params))
    model = _dist.wrap(_dist.mlp(n_params), setup, world) if world > 1 else _dist.mlp(n_params)
    opt = manic.mechanize(torch.optim.AdamW(model.parameters(), lr=1e-3))
    manic_ms = _median_step_ms(model, opt, x, steps)
    state = sum(_local_bytes(v) for st in opt.state.values() for k, v in st.items() if k.startswith("mechanic_"))
    params = sum(_local_bytes(p) for p in model.parameters())
    plain_model = _dist.wrap(_dist.mlp(n_params), setup, world) if world > 1 else _dist.mlp(n_params)
    base_ms = _median_step_ms(plain_model, torch.optim.AdamW(plain_model.parameters(), lr=1e-3), x, steps)
    return {"state": state, "params": params, "manic_ms": manic_ms, "base_ms": base_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=4e6, help="model size (default 4e6)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (median)")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--quick", action="store_true", help="a tiny model, 1 and 2 ranks (smoke test)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    if args.quick:
        args.params, args.steps, args.worlds = 2e5, 3, [1, 2]
    lines = ["| setup | ranks | Mechanic state / rank (MB) | x param bytes / rank | step ms (manic) | step ms (base) "
             "| ratio |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for setup in ("ddp", "fsdp2"):
        for world in args.worlds:
            try:
                rs = _dist.run(world, rank_main, setup, args.params, args.steps, timeout=600)
            except Exception as e:  # noqa: BLE001 - report the setup as failing, go on
                lines.append(f"| {setup} | {world} | failed: {str(e).strip().splitlines()[-1][:100]} | | | | |")
                continue
            state = max(r["state"] for r in rs)
            ratio_p = state / max(r["params"] for r in rs)
            m, b = max(r["manic_ms"] for r in rs), max(r["base_ms"] for r in rs)
            lines.append(f"| {setup} | {world} | {state / 1e6:.2f} | {ratio_p:.2f} | {m:.2f} | {b:.2f} | {m / b:.2f} |")
    text = "\n".join(lines) + "\n\n" + _common.env_line("python benchmarks/scaling.py " + " ".join(sys.argv[1:]),
                                                         "gloo on CPU, 1 thread per rank")
    print(text)
    _common.save(args.out, "scaling", args.quick, text)


if __name__ == "__main__":
    main()
