"""Draw loss, Mechanic's scale, and the effective learning rate next to the base schedule against
step, from a run's metrics.csv:

    python launch/plot.py RUN_DIR        # writes RUN_DIR/metrics.png
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path


def _effective_lr(row: dict[str, str]) -> float | None:
    """The row's effective lr: its column, or S * lr in a CSV written before the column existed."""
    if row.get("effective_lr"):
        return float(row["effective_lr"])
    if row.get("lr"):
        return float(row["lr"]) * (float(row["scale"]) if row.get("scale") else 1.0)
    return None


def plot(run_dir: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4))
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
    ax2.set_ylabel("Mechanic scale S")
    # (a log axis: a schedule that ends at lr 0 is drawn up to its last positive point)
    lrs = [(s, float(r["lr"])) for s, r in zip(steps, rows) if r.get("lr") and float(r["lr"]) > 0]
    effective = [(s, _effective_lr(r)) for s, r in zip(steps, rows)]
    effective = [(s, e) for s, e in effective if e is not None and e > 0]
    if lrs:
        ax3.plot(*zip(*lrs), color="0.55", linestyle="--", label="base lr (schedule)")
    if effective:
        ax3.plot(*zip(*effective), color="C3", label="effective lr = S x base lr")
    if lrs or effective:
        ax3.set_yscale("log")
        ax3.legend()
    ax3.set_xlabel("step")
    ax3.set_ylabel("learning rate")
    fig.tight_layout()
    out = run_dir / "metrics.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    print(plot(sys.argv[1]))
