"""The life of one launcher process: the stop flag and its signals, dying with the torchrun agent,
and the command line that started the run.

Standard library only: train.py installs the signal handlers before it imports torch.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

STOP = threading.Event()  # set by SIGTERM / SIGINT; the ranks agree on it at the next step boundary
_PARENT = os.getppid()  # read at import, as early as possible: under torchrun, the agent


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]]


_PARENT_CMDLINE = _cmdline(_PARENT)  # now, while the parent is surely alive


def install_stop_handlers(under_torchrun: bool) -> None:
    """SIGTERM and SIGINT only set STOP. Under torchrun, the death of the agent (even by
    ``kill -9``) sends this worker SIGTERM too, so it saves a checkpoint and exits instead of
    training on as an orphan."""
    def handler(signum: int, frame: object) -> None:  # noqa: ARG001
        STOP.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    if under_torchrun:
        _die_with_parent()


def _die_with_parent() -> None:
    try:  # Linux: the kernel sends SIGTERM when the parent exits, whatever killed it
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(signal.SIGTERM), 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    except (AttributeError, OSError):  # elsewhere: watch the parent from a thread
        threading.Thread(target=_watch_parent, daemon=True, name="parent-watch").start()
    if os.getppid() != _PARENT:  # the agent died before the signal was armed
        os.kill(os.getpid(), signal.SIGTERM)


def _watch_parent() -> None:
    while os.getppid() == _PARENT:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


def command() -> str:
    """The command line that started this run, as its user typed it (as far as it can be known):
    ``MANIC_COMMAND`` if a wrapper set it (run_local.sh does), else the torchrun agent's command
    line, else this interpreter's."""
    if os.environ.get("MANIC_COMMAND"):
        return os.environ["MANIC_COMMAND"]
    if "TORCHELASTIC_RUN_ID" in os.environ:
        args = _PARENT_CMDLINE
        if len(args) > 1 and Path(args[1]).name == "torchrun":
            args = ["torchrun", *args[2:]]  # [python, .../bin/torchrun, ...] was typed as torchrun ...
        return shlex.join(args or ["torchrun", "...", *sys.argv])
    return shlex.join(["python", *getattr(sys, "orig_argv", ["python", *sys.argv])[1:]])


def agent_died() -> bool:
    """Under torchrun: the agent is gone (its death is what stopped this worker)."""
    return "TORCHELASTIC_RUN_ID" in os.environ and os.getppid() != _PARENT


def resume_command() -> str:
    cmd = command()
    try:
        resumes = "--resume" in shlex.split(cmd)
    except ValueError:
        resumes = False
    return cmd if resumes else cmd + " --resume"
