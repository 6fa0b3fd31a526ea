"""Golden trajectories: what manic computes, bit for bit, recorded once and compared after every change
that is meant to leave behaviour alone (tests/golden/test_golden.py).

Every run trains a small float64 MLP (three param groups with different lrs, a 3-element gain) for 12
full-batch steps under a warmup-then-cosine ``LambdaLR`` whose first lr is 0 (so Mechanic idles at
the first step), and records, in float64: the scale after every step, the final parameters, Mechanic's
per-parameter buffers and tuner tensors, and the last statistics.

single (one process): AdamW and SGD-momentum x variant (invariant, original) x state mode
(ref+delta, ref, delta) x per_group x compile; float32 and bf16 parameters (and bf16 with
fp32_reference); a non-finite gradient with and without skip_nonfinite; a state-dict round trip into
fresh objects mid-run (the drop-in form and the seed pair); parameters added and frozen mid-run.
fsdp2 (two gloo ranks, FSDP2): variant x state mode x per_group x compile, per rank.
compile=True runs with ``manic.kernels.SMALL = 0`` (every tensor through the compiled kernels), all in one
thread (a compiled reduction splits its work by the thread count).

    python tests/golden/make_golden.py            # (re)write tests/golden/golden.pt: only when behaviour
                                                  # is meant to change
    python tests/golden/make_golden.py --check single|fsdp2   # recompute one part, compare bitwise
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch

import trajectories  # (this directory: sys.path[0] when run as a script; the ranks import their runs from it)

FILE = Path(__file__).resolve().parent / "golden.pt"


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int64) if t.dtype == torch.float64 else t


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal (NaN where the other has NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        nan = a.isnan()
        return torch.equal(nan, b.isnan()) and torch.equal(_bits(a[~nan]), _bits(b[~nan]))
    return torch.equal(a, b)


def compare(got: dict[str, dict], want: dict[str, dict]) -> list[str]:
    bad = []
    if set(got) != set(want):
        bad.append(f"runs differ: {sorted(set(got) ^ set(want))}")
    for name in sorted(set(got) & set(want)):
        g, w = got[name], want[name]
        if set(g) != set(w):
            bad.append(f"{name}: entries differ: {sorted(set(g) ^ set(w))}")
        bad += [f"{name}: {k}" for k in sorted(set(g) & set(w)) if not same(g[k], w[k])]
    return bad


def pack(runs: dict[str, dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Each run as one flat float64 tensor and its entries' (name, shape, dtype): a small file."""
    out = {}
    for name, rec in runs.items():
        meta = [(k, list(t.shape), str(t.dtype).removeprefix("torch.")) for k, t in rec.items()]
        out[name] = {"entries": meta, "values": torch.cat([t.reshape(-1).to(torch.float64) for t in rec.values()])}
    return out


def unpack(packed: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for name, run_ in packed.items():
        rec, i, values = {}, 0, run_["values"]
        for k, shape, dtype in run_["entries"]:
            n = math.prod(shape)
            rec[k] = values[i:i + n].reshape(shape).to(getattr(torch, dtype))
            i += n
        out[name] = rec
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", choices=["single", "fsdp2"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.check:
        got = trajectories.single() if args.check == "single" else trajectories.fsdp2()
        want = {k: v for k, v in unpack(torch.load(FILE, weights_only=True)).items()
                if k.startswith("fsdp2/") == (args.check == "fsdp2")}
        bad = compare(got, want)
        print(f"{len(want)} runs compared, {len(bad)} differences")
        for line in bad[:60]:
            print("  " + line)
        sys.exit(1 if bad else 0)
    out = {**trajectories.single(), **trajectories.fsdp2()}
    torch.save(pack(out), FILE)
    assert not compare(unpack(torch.load(FILE, weights_only=True)), out)
    print(f"wrote {len(out)} runs to {FILE}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
