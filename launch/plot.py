"""Draw loss and Mechanic's scale against step from a run's metrics.csv:

    python launch/plot.py RUN_DIR        # writes RUN_DIR/metrics.png
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path


def plot(run_dir: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(steps, [float(r["train_loss"]) for r in rows], label="train")
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r["val_loss"]]
    if val:
        ax1.plot(*zip(*val), marker="o", label="validation")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss (nats / character)")
    ax1.legend()
    scales = [(s, float(r["scale"])) for s, r in zip(steps, rows) if r["scale"]]
    if scales:
        ax2.plot(*zip(*scales))
        ax2.set_yscale("log")
    ax2.set_xlabel("step")
    ax2.set_ylabel("Mechanic scale S (effective lr = S x base lr)")
    fig.tight_layout()
    out = run_dir / "metrics.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    print(plot(sys.argv[1]))
