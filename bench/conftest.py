"""Benchmarks run on release builds only; as smoke tests (--benchmark-disable) any build will do."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

import gwcore  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    disabled = config.getoption("benchmark_disable", default=False)
    if gwcore.DEBUG_BUILD and not disabled:
        pytest.exit("refusing to benchmark a debug build of gwcore._dedup: run `make compile` first", returncode=2)
