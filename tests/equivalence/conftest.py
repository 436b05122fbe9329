"""Profiles of the equivalence suite.

* fast (default, CI): widths 256, 1024, 4096 for the rate tests, 2048 for the property tests, a
  dozen property examples. Runs in a few minutes on 2 cores.
* slow (``--slow`` or ``PINET_SLOW=1``): adds width 16384 (8192 for depth 3, whose three n × n
  float64 layers would not fit in memory at 16384), more property examples. For release checks.

The profile is read from ``PINET_SLOW`` when a test module is imported; ``tests/conftest.py`` sets
it from ``--slow``. The option is registered here as well so that ``pytest tests/equivalence
--slow`` also works if this directory is used without the top-level conftest.
"""

from __future__ import annotations

import os

# Large float64 tensors (n × n weights, their gradients and projections) are allocated fresh at
# every step; transparent huge pages cut the page-fault cost of those allocations roughly in half
# (measured: a 4096 × 4096 outer product 117 ms -> 68 ms on the 2-core CI machine). PyTorch reads
# this variable lazily, at its first large CPU allocation. Only speed is affected.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def pytest_addoption(parser):
    try:
        parser.addoption("--slow", action="store_true", default=False, help="run release-check (slow) tests too")
    except ValueError:
        pass  # already registered by tests/conftest.py


def pytest_configure(config):
    if config.getoption("--slow", default=False):
        os.environ["PINET_SLOW"] = "1"
