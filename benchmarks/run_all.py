"""Regenerate every benchmark: ``--quick`` runs each in its smallest mode (minutes on a laptop);
without it, the full study whose tables and figures the docs show. Then refresh the docs from the
new results with ``python tools/sync_docs.py``.

    python benchmarks/run_all.py [--quick]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["step_overhead.py", "memory.py", "train_overhead.py", "collectives.py", "scaling.py", "lr_sweep.py",
           "run_length.py", "launcher_demo.py", "suite.py"]
# the full study's arguments, as the docs' tables name them in their "command:" lines
FULL = {"step_overhead.py": [["--large", "1e8"], ["--compile-time", "--tensors", "128"]],
        "memory.py": [["--fsdp2", "--params", "3.2e7"]], "train_overhead.py": [["--steps", "100"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="each script's smallest mode")
    parser.add_argument("--only", nargs="+", choices=SCRIPTS, help="run only these")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    failed = []
    for script in args.only or SCRIPTS:
        for extra in [["--quick"]] if args.quick else FULL.get(script, [[]]):
            cmd = [sys.executable, str(HERE / script), "--out", args.out] + extra
            print(f"== {script} {' '.join(extra)}", flush=True)
            start = time.monotonic()
            if subprocess.run(cmd).returncode != 0:
                failed.append(script)
            print(f"== {script}: {time.monotonic() - start:.0f} s", flush=True)
    if failed:
        raise SystemExit(f"failed: {failed}")


if __name__ == "__main__":
    main()
