"""The end of a job script run under torchrun."""

from __future__ import annotations

import os
import sys


def leave() -> None:
    """Exit 0 without the interpreter's teardown. Call once the results are written and the process groups
    destroyed: gloo's worker threads can still hold tensors while the interpreter finalizes, and the rank then
    aborts ("terminate called without an active exception", pytorch/pytorch#179291, #190489) after its work
    succeeded. Seen once in CI under load; a result file that exists is the job's answer."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
