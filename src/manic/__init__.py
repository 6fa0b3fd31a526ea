"""manic: the Mechanic learning-rate-scale tuner for PyTorch (Cutkosky, Defazio & Mehta, 2023)."""

from .groups import layer_groups
from .optimizer import Mechanized, mechanize
from .options import Options
from .reduce import NoReduce, ProcessGroupReducer, Reducer
from .seed import Mechanic, Updater
from .tuner import Hyper

__all__ = ["Hyper", "Mechanic", "Options", "Mechanized", "NoReduce", "ProcessGroupReducer", "Reducer", "Updater", "layer_groups",
           "mechanize"]
__version__ = "0.3.0"
