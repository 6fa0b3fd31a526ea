"""The rank launcher lives in the package (benchmarks use it too): manic.testing."""

from manic.testing import run  # noqa: F401
