"""The life of one launcher process: the stop flag and its signals, dying with the torchrun agent,
the exit status of a stopped run, and the command line that started the run.

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
_SIGNAL = [0]  # the number of the last of those signals this process received (0: none)
_PARENT = os.getppid()  # read at import, as early as possible: under torchrun, the agent


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]]


_PARENT_CMDLINE = _cmdline(_PARENT)  # now, while the parent is surely alive


def install_stop_handlers(under_torchrun: bool) -> None:
    """SIGTERM and SIGINT only set STOP (and note which). Under torchrun, the death of the agent
    (even by ``kill -9``) sends this worker SIGTERM too, so it saves a checkpoint and exits instead
    of training on as an orphan."""
    def handler(signum: int, frame: object) -> None:  # noqa: ARG001
        _SIGNAL[0] = signum
        STOP.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    if under_torchrun:
        _die_with_parent()


def stop_signal() -> int:
    """The signal that set STOP in this process (SIGTERM, SIGINT), 0 if none did."""
    return _SIGNAL[0] if STOP.is_set() else 0


def exit_status(signum: int) -> int:
    """A run stopped by signal ``signum`` has not succeeded: it exits 128 + the signal, as a process
    killed by it would be reported by a shell. Under torchrun this is what makes every agent end at
    once: an agent whose workers all exit 0 takes the job for finished and waits in its exit
    barrier for the other agents, one of which may be dead (kill -9 of a node's agent); a failure
    stops it without that wait."""
    return 128 + signum


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
