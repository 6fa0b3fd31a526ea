"""manic: the Mechanic learning-rate-scale tuner for PyTorch (Cutkosky, Defazio & Mehta, 2023).

The map. Two public faces, ``Mechanized`` (optimizer.py, from ``mechanize``) and the seed pair
``Updater`` / ``Mechanic`` (seed.py), share what users read (readout.py: scale, effective lr, stats;
apidoc.py completes their help() text from ``Options``) and drive one ``Engine`` (engine.py;
``engine_of`` finds it), which holds the state between steps. Configuration is ``Options`` (options.py:
every default and check), resolved into the record the tuner reads. One step: the engine binds the
parameters from the base optimizer's param groups (layout.py; the reducer from reduce.py), then step.py's
``prepare`` has the state mode (modes.py: ``ref+delta``, ``ref``, ``delta``) give each tensor's direction
D, sums <g, D>, <x, D>, ||g||^2, ||x||^2 per tuner with a kernel set (kernels/: eager foreach or
compiled), reduces them in one collective and runs the pure tuner update (tuner.py) into an immutable
plan; the base optimizer steps (its lazy state init blind to Mechanic's buffers, storage.py); the engine
installs the plan and the mode rebases x to the new scale (a parameter edited in place between steps
keeps the edit: edits.py). The engine's tensors are published into the
base optimizer and saved and loaded by storage.py, in the versioned checkpoint format of state.py.
compat.py holds what torch does not promise; testing.py runs real process groups for tests.
"""

from .groups import layer_groups
from .optimizer import Mechanized, mechanize
from .options import Hyper, Options  # (Hyper: deprecated, not in __all__; CHANGELOG.md)
from .engine import engine_of
from .reduce import NoReduce, ProcessGroupReducer, Reducer
from .seed import Mechanic, Updater
from . import integrations  # (``manic.integrations.readout`` after ``import manic``; no framework is imported)

__all__ = ["Mechanic", "Options", "Mechanized", "NoReduce", "ProcessGroupReducer", "Reducer", "Updater", "engine_of",
           "layer_groups", "mechanize"]
__version__ = "0.3.0"
