"""A small real file system for disk-full tests: a tmpfs the test mounts (root only)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from typing import Iterator

import pytest


@contextlib.contextmanager
def small_tmpfs(path, size: str) -> Iterator[str]:
    """Mount a tmpfs of *size* (``mount -o size=``, e.g. ``2m``) on *path* for the block; skip
    (a failure in CI) where that cannot be done."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount(8) to mount a small tmpfs")
    path = str(path)
    os.makedirs(path, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {res.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=False, capture_output=True)
