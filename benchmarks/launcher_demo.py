"""The launcher's default job, with Mechanic and with the base optimizer alone, for the docs.

    python benchmarks/launcher_demo.py [--quick]

Runs ``torchrun --standalone --nproc-per-node 2 launch/train.py`` (README's command) twice, once
with ``--no-mechanic``, and keeps each run's metrics.csv and the Mechanic run's metrics.png as
benchmarks/results/launcher_fsdp2_2ranks{,_adamw}.csv / .png. ``benchmarks/report.py`` derives the
numbers the docs quote from those CSVs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--steps", "30", "--n-layer", "1", "--n-embd", "32", "--block-size", "32", "--batch-size", "4",
         "--data-bytes", "200000", "--eval-every", "10", "--log-every", "5", "--ckpt-every", "0"]


def run(extra: list[str], out: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "launch/train.py", "--out-dir", str(out), *extra]
    print("+", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 30-step run of a tiny model (smoke test)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    out = Path(args.out)
    stem = "launcher_fsdp2_2ranks" + ("_quick" if args.quick else "")
    with tempfile.TemporaryDirectory() as tmp:
        for suffix, extra in (("", []), ("_adamw", ["--no-mechanic"])):
            run_dir = Path(tmp) / f"run{suffix}"
            run((QUICK if args.quick else []) + extra, run_dir)
            shutil.copy(run_dir / "metrics.csv", out / f"{stem}{suffix}.csv")
            if not suffix:
                shutil.copy(run_dir / "metrics.png", out / f"{stem}.png")
    print(f"wrote {out / stem}.csv, {stem}_adamw.csv, {stem}.png")


if __name__ == "__main__":
    main()
