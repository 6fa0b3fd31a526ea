#!/usr/bin/env bash
# Single-node run: NPROC processes (default 2) of launch/train.py under torchrun.
# Extra arguments go to the launcher, e.g.:  NPROC=4 launch/run_local.sh --parallel hsdp --steps 1000
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec torchrun --standalone --nproc-per-node "${NPROC:-2}" launch/train.py --out-dir "${OUT_DIR:-runs/local}" "$@"
