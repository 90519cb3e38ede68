"""glibc malloc for a batch receiver: its buffers kept in the heap instead of faulted in afresh.

A gwcore batch's receive buffer grows to the batch (megabytes) and shrinks once the request is
framed. With glibc's defaults such a block is a mapping of its own, unmapped when it shrinks, so
every batch faulted all its pages in again and had the kernel zero them (558 faults for a
1,100-message batch; about a tenth of the receiver's loop thread in a ``perf`` profile). With
blocks below 32 MiB from the heap and up to 64 MiB of free heap kept, the same buffers cost no
fault after the first (``tests/test_malloc_tuning.py``). Both settings are needed: either alone
turns off glibc's own adjustment of the other and faults more than the defaults.

The same settings measured slower for one-message-per-request NServiceBus traffic (the receiver at
256 connections, 8 rounds each: 0.416 against 0.449 of the strict bare server, median), so they are
applied only once a listener takes its first batch (:func:`batch_seen`), and only in a process that
``gwcore serve`` runs (:func:`allow`): an embedding application's malloc is its own business, and an
operator's ``GLIBC_TUNABLES`` malloc settings win (``config.malloc_set_by_operator``).
"""

from __future__ import annotations

import ctypes
import logging

__all__ = ("allow", "batch_seen", "tune", "MMAP_THRESHOLD", "TRIM_THRESHOLD")

log = logging.getLogger("gwcore")

#: Blocks below this come from the heap, not a mapping of their own (32 MiB is glibc's largest).
MMAP_THRESHOLD = 32 << 20
#: Free heap up to this is kept for reuse rather than given back.
TRIM_THRESHOLD = 64 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers

_allowed = False
_applied = False


def tune() -> bool:
    """Apply the settings now (glibc only); returns whether they were applied."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: musl's mallopt does nothing
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) & bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def allow(set_by_operator: bool) -> None:
    """``gwcore serve``: the settings may be applied at the first batch, unless the operator set
    malloc options of their own."""
    global _allowed
    _allowed = not set_by_operator


def batch_seen() -> bool:
    """A listener takes a batch: the first time in a process :func:`allow` allowed, apply the
    settings. Returns whether this call applied them."""
    global _applied
    if not _allowed or _applied:
        return False
    _applied = True
    if tune():
        log.info("glibc malloc: blocks below %d MiB from the heap, %d MiB of free heap kept (a batch "
                 "receiver's buffers)", MMAP_THRESHOLD >> 20, TRIM_THRESHOLD >> 20)
        return True
    return False
