"""What every fuzz target shares: the import paths, and running its ``check(data)`` under atheris.

A target (``fuzz/fuzz_*.py``) defines ``check(data: bytes) -> None``, which raises (or crashes) on a
finding and returns otherwise, and calls :func:`fuzz` when run as a script. ``check`` needs neither
atheris nor the fuzz build: ``tests/test_fuzz_regressions.py`` replays the corpus and every crash
through it on the normal build.
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Callable

ROOT = pathlib.Path(__file__).resolve().parent.parent


def add_paths() -> None:
    """gwcore from this checkout, and tests/ for the pure-Python oracle (tests/reference_impl.py)."""
    for path in (str(ROOT), str(ROOT / "tests")):
        if path not in sys.path:
            sys.path.insert(0, path)


def fuzz(check: Callable[[bytes], None]) -> None:
    """libFuzzer's main loop over ``check``; the arguments are libFuzzer's (fuzz/run passes them)."""
    mode_file = ROOT / "build" / "gwcore-mode"
    mode = mode_file.read_text() if mode_file.exists() else "unknown"
    if mode != "fuzz":
        # an uninstrumented core gives libFuzzer no coverage of the compiled code: say so
        sys.exit(f"{sys.argv[0]}: the core in place is a {mode} build; run `make fuzz` (or "
                 "GWCORE_FUZZ=1 python setup.py build_ext --inplace and fuzz/run)")
    import atheris

    atheris.Setup(sys.argv, check)
    atheris.Fuzz()


def wrap(data: bytes, way: int, index: int) -> object:
    """*data* as the buffer kind a caller may hand the core: *way* 0 bytes, 1 a bytearray, 2 a
    memoryview into a larger buffer (as a receive buffer would be), 3 each of them in turn by
    *index*."""
    if way == 3:
        way = index % 3
    if way == 1:
        return bytearray(data)
    if way == 2:
        return memoryview(b"<" + data + b">")[1:-1]
    return data
