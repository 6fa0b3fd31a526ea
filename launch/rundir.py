"""A run's directories: the lock that keeps a second live run out, the checkpoints found there,
their retention, and the decision taken before anything is written.

Standard library only, so that `launch/run_local.sh` can ask the same questions before it starts
torchrun:

    python launch/rundir.py [launcher options]   # exit 1 with one line if the run would be refused
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

MARKER = "COMPLETE"  # written by rank 0 once every rank has written its part of a checkpoint
LOCK = ".lock"
_held: list[int] = []  # lock-file descriptors, open (and so locked) until the process exits


class Busy(Exception):
    """A directory is held by another live run."""


def lock_dirs(dirs: list[Path], cmd: str, probe: bool = False) -> None:
    """Hold ``DIR/.lock`` for each directory until this process exits. flock: the kernel drops the
    lock when its holder dies, however it dies, so a lock is never stale. Raises Busy naming the
    holder if another process holds one. ``probe``: only check, keep nothing locked."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return
    info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": cmd})
    seen = set()
    for d in dirs:
        d = Path(d).resolve()
        if d in seen:
            continue
        seen.add(d)
        if probe and not (d / LOCK).exists():
            continue
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(d / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise Busy(f"{d} is in use by {holder}; wait for it to end, stop it (kill -TERM on that pid saves "
                       "a checkpoint), or choose another --out-dir / --ckpt-dir") from None
        except OSError as e:  # a filesystem without flock (some network filesystems)
            os.close(fd)
            print(f"manic launcher: warning: cannot lock {d} ({e.strerror}); nothing keeps a second run out of it",
                  file=sys.stderr, flush=True)
            continue
        if probe:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.pwrite(fd, (info + "\n").encode(), 0)
        _held.append(fd)


def _holder(fd: int) -> str:
    for _ in range(20):  # the holder may be between its flock and its write
        text = os.pread(fd, 65536, 0).decode(errors="replace").strip()
        try:
            h = json.loads(text)
            return f"pid {h['pid']} on host {h['host']} (since {h['since']}; command: {h['command']})"
        except (ValueError, KeyError, TypeError):
            time.sleep(0.05)
    return "another process (it has not written its pid yet)"


def step_of(path: Path) -> int:
    return int(path.name.split("_")[1])


def _checkpoints(root: str | Path) -> list[Path]:
    return sorted((p for p in Path(root).glob("step_*") if p.is_dir() and p.name[5:].isdigit()), key=step_of)


def complete(root: str | Path) -> list[Path]:
    """The complete checkpoints under ``root``, oldest first."""
    return [p for p in _checkpoints(root) if (p / MARKER).exists()]


def incomplete(root: str | Path) -> list[Path]:
    """Checkpoint directories without the marker: cut short by a kill, never resumed from."""
    return [p for p in _checkpoints(root) if not (p / MARKER).exists()]


def latest(root: str | Path) -> Path | None:
    done = complete(root)
    return done[-1] if done else None


def remove(path: Path) -> None:
    """Marker first: a removal cut short leaves an incomplete checkpoint, never a broken complete one."""
    (path / MARKER).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def prune(root: str | Path, keep_last: int, keep: Path | None = None) -> list[Path]:
    """Rank 0, right after a complete save: remove all but the ``keep_last`` newest complete
    checkpoints (0: keep all) and every incomplete one; ``keep`` (the checkpoint the run resumed
    from) stays. Returns what was removed."""
    gone = incomplete(root)
    if keep_last > 0:
        gone += [p for p in complete(root)[:-keep_last] if keep is None or p.resolve() != keep.resolve()]
    for p in gone:
        remove(p)
    return gone


def dirs(cfg: object) -> tuple[Path, Path]:
    out = Path(cfg.out_dir)
    return out, Path(cfg.ckpt_dir) if cfg.ckpt_dir else out / "checkpoints"


def finished(out: Path, last: Path) -> bool:
    """The run that wrote ``last`` ended normally: final.pt is written after its last checkpoint."""
    final = out / "final.pt"
    return final.exists() and final.stat().st_mtime_ns >= (last / MARKER).stat().st_mtime_ns


def plan(cfg: object, cmd: str, probe: bool = False) -> dict:
    """Rank 0, before anything is written: take the directories' locks; without --resume, start
    over a finished earlier run (its checkpoints removed) but refuse an unfinished one's; drop
    checkpoints cut short by a kill; pick the checkpoint to resume from. ``probe``: decide only,
    change nothing (run_local.sh, before torchrun)."""
    out, ckpt_dir = dirs(cfg)
    try:
        lock_dirs([out, ckpt_dir], cmd, probe=probe)
    except Busy as e:
        return {"refused": str(e)}
    last = latest(ckpt_dir)
    note = None
    if last is not None and not cfg.resume:
        if not finished(out, last):
            return {"refused": f"{ckpt_dir} holds the checkpoints of an unfinished run (latest: step {step_of(last)}); "
                               "add --resume to continue it, or remove them / choose another --out-dir"}
        note = (f"starting over: removed the finished earlier run's checkpoints (up to step {step_of(last)}) "
                f"from {ckpt_dir}")
        if not probe:
            for p in complete(ckpt_dir):
                remove(p)
        last = None
    if not probe:
        for p in incomplete(ckpt_dir):
            remove(p)
    return {"refused": None, "note": note, "resume": str(last) if last else None, "step": step_of(last) if last else 0}


REFUSED = "manic launcher: refusing to start: "

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from config import parse

    decision = plan(parse(sys.argv[1:]), "", probe=True)
    if decision["refused"]:
        print(REFUSED + decision["refused"], file=sys.stderr)
        sys.exit(1)
