"""Training-step overhead of Mechanic on the launcher's model: forward + backward + step.

The launcher's character GPT (launch/model.py, default size) on the launcher's data, one process,
AdamW alone against manic over AdamW (default and compile=True), stepped round-robin and timed per
full training step (median). Target: <= 5% overhead.

    python benchmarks/train_overhead.py [--steps 30] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import _common
import manic

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
from data import CharData  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per method (median)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="a tiny model, 3 steps (smoke test)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    if args.quick:
        args.steps, args.n_layer, args.n_embd, args.block_size, args.batch_size = 3, 1, 32, 32, 4
    data = CharData.load(300_000 if args.quick else 2_000_000)
    cfg = GPTConfig(data.vocab_size, args.n_layer, 4, args.n_embd, args.block_size)
    methods = {"adamw": lambda p: torch.optim.AdamW(p, lr=1e-3),
               "manic(adamw)": lambda p: manic.mechanize(torch.optim.AdamW(p, lr=1e-3)),
               "manic(adamw, compile=True)": lambda p: manic.mechanize(torch.optim.AdamW(p, lr=1e-3), compile=True)}
    runs = {}
    for name, make in methods.items():
        torch.manual_seed(0)
        model = GPT(cfg).to(args.device)
        runs[name] = (model, make(model.parameters()))
    times: dict[str, list[float]] = {name: [] for name in runs}
    for step in range(args.steps + 3):
        x, y = (t.to(args.device) for t in data.batch("train", args.batch_size, args.block_size, seed=0, step=step))
        for name, (model, opt) in runs.items():
            start = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if step >= 3:  # warm-up (and the compile) excluded
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["adamw"])
    n = sum(p.numel() for p in runs["adamw"][0].parameters())
    lines = [f"Launcher GPT, {n / 1e6:.2f}M parameters, batch {args.batch_size} x {args.block_size} characters, "
             f"median of {args.steps} full training steps (forward + backward + step).", "",
             "| method | step ms | overhead vs AdamW |", "| --- | --- | --- |"]
    for name, t in times.items():
        m = statistics.median(t)
        lines.append(f"| {name} | {m * 1e3:.1f} | {100 * (m / base - 1):+.1f}% |")
    text = "\n".join(lines) + "\n\n" + _common.env_line("python benchmarks/train_overhead.py " + " ".join(sys.argv[1:]))
    print(text)
    _common.save(args.out, "train_overhead", args.quick, text)


if __name__ == "__main__":
    main()
