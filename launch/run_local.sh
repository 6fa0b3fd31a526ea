#!/usr/bin/env bash
# Single-node run: NPROC processes of launch/train.py under torchrun. Extra arguments go to the
# launcher, e.g.:  NPROC=4 OUT_DIR=runs/hsdp launch/run_local.sh --parallel hsdp --steps 1000
#
# Environment: NPROC (default 2), OUT_DIR (default runs/local, relative to the repository root;
# --out-dir overrides it), OMP_NUM_THREADS (default 1).
# Signals: SIGTERM or SIGINT (Ctrl-C) to this script go to the workers, which save a checkpoint
# together and exit 128 + the signal (a stopped run has not finished), and so does this script. If
# this script dies, even by kill -9, torchrun gets SIGTERM (Linux) and stops its workers the same way.
# Exit status: torchrun's (0: the run finished); 128 + the signal when a signal to this script
# stopped the run; 1 with one line on stderr if the run is refused before it starts.
# Full description: docs/launcher.md
set -euo pipefail
nproc="${NPROC:-2}"
out="${OUT_DIR:-runs/local}"
# How to run this again (the launcher prints it with --resume after a stop).
printf -v MANIC_COMMAND '%q ' "NPROC=$nproc" "OUT_DIR=$out" "$0" "$@"
export MANIC_COMMAND="${MANIC_COMMAND% }"
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
args=(--out-dir "$out" "$@")
# What the workers would refuse (a directory a live run holds, an unfinished run's checkpoints
# without --resume), refused here in one line, before torchrun starts. With --help: the help.
python3 launch/rundir.py "${args[@]}"
for a in "$@"; do
  case "$a" in -h | --help) exit 0 ;; esac
done

children() { # the pids whose parent is $1
  if command -v pgrep >/dev/null 2>&1; then
    pgrep -P "$1" || true
    return
  fi
  local stat fields ppid
  for stat in /proc/[0-9]*/stat; do
    fields=$(cat "$stat" 2>/dev/null) || continue
    fields=${fields##*) } # after "(comm) ": state ppid ...
    read -r _ ppid _ <<<"$fields"
    [ "$ppid" = "$1" ] && basename "$(dirname "$stat")"
  done
  return 0
}

set +e # errexit would end this script when a trapped signal interrupts the wait below
agent=""
stops=0
sig=0
stop() { # forward to the workers; before they exist, to torchrun itself
  stops=$((stops + 1))
  sig=${1:-$sig}
  [ -n "$agent" ] || return 0
  local workers
  workers=$(children "$agent")
  # shellcheck disable=SC2086
  kill -TERM ${workers:-$agent} 2>/dev/null || true
}
trap 'stop 15' TERM
trap 'stop 2' INT

# torchrun in its own process group (Ctrl-C reaches only this script, which forwards it), with a
# parent-death signal (it gets SIGTERM when this script dies).
python3 -c '
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
except (AttributeError, OSError):
    pass
os.setpgid(0, 0)
if os.getppid() != int(sys.argv[1]):
    sys.exit(143)
os.execvp(sys.argv[2], sys.argv[2:])
' "$$" torchrun --standalone --nproc-per-node "$nproc" launch/train.py "${args[@]}" &
agent=$!
[ "$stops" -eq 0 ] || stop # a signal that came before torchrun did

rc=""
while :; do
  seen=$stops
  wait "$agent"
  r=$?
  if [ "$r" -eq 127 ] && [ -n "$rc" ]; then break; fi # already reaped: rc is torchrun's
  rc=$r
  [ "$stops" -eq "$seen" ] && break # not interrupted by a signal: rc is torchrun's
done
# stopped by a signal to this script (and not finished after all): 128 + that signal, like the workers
if [ "$stops" -gt 0 ] && [ "$rc" -ne 0 ]; then exit $((128 + sig)); fi
exit "$rc"
