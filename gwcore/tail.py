"""The store's zeroed tail: the data file kept written with zeros ahead of LMDB's last page.

Why: LMDB appends a growing store's new pages at the end of ``data.mdb``, and a write that extends
a file makes its ``fdatasync`` commit file-system metadata as well (the new size, the blocks
allocated for it), where a write into blocks that already hold data syncs the data alone. Measured
on this project's disk (docs/benchmarks.md, "The cost of a sync"), a 4 KiB write plus
``fdatasync`` took 190–270 µs at the end of a file and 100–160 µs into blocks written before,
and a small gwcore commit (LMDB's data sync, then its meta page written with ``O_DSYNC``)
0.79–0.86 of its time with the tail. Blocks that are only allocated (``fallocate``) do not help: their first write
converts them, which is metadata again.

So a thread of its own writes zeros past the last page, in pieces, and syncs them, keeping
``ahead`` bytes ready (``GWCORE_STORE_PREALLOCATE``); LMDB's commits then write into blocks that
exist. What makes it safe:

- LMDB writes the file only while it commits a write transaction, and only pages below the last
  page of the map after that commit; the store commits through :meth:`ZeroedTail.commit`, which
  holds :attr:`lock` across the commit and then records the new end of the used pages.
- The tail writes only under the same lock and only at or beyond that end, so it never writes
  where LMDB has written, and LMDB never writes while it does. Pages LMDB writes later into the
  zeroed part simply replace zeros.
- It writes nothing while the store grows faster than :data:`MAX_GROWTH`: under heavy load the
  metadata is a small part of a large commit's sync, and zeros would double what goes to the disk.
  What it saves is on small commits: a lightly loaded gateway, a single sender's round trip.
- It stays within the map (LMDB's pages never go beyond it) and never takes the disk's last
  ``ahead`` bytes: a nearly full disk makes it stop, not the store fail earlier. A write error
  (the disk full after all, an I/O error) is logged, counted, and retried no sooner than
  :data:`RETRY_AFTER` seconds later; the store goes on as without a tail.

The file is therefore up to ``ahead`` bytes larger than what the store holds
(:meth:`gwcore.store.Store.size_bytes` counts pages, not the file).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable

__all__ = ("ZeroedTail", "PIECE", "RETRY_AFTER")

log = logging.getLogger("gwcore.store")

#: Bytes of zeros written per lock hold (a commit waits for at most one piece).
PIECE = 256 << 10
#: Zeros written between two syncs of the tail's own.
SYNC_EVERY = 4 << 20
#: Seconds before a failed tail is tried again.
RETRY_AFTER = 30.0
#: The store's growth (bytes per second) above which the tail writes nothing: under heavy load a
#: commit carries many pages and the metadata is a small part of its sync, while the zeros would
#: double the bytes going to the disk and take the writer's core (measured: at 256 connections a
#: tail that kept up cost a quarter of the throughput; docs/benchmarks.md).
MAX_GROWTH = 4 << 20
_RATE_WINDOW = 0.25  # seconds over which the growth is measured


class ZeroedTail:
    """Keeps ``ahead`` bytes of zeros past LMDB's used pages in the data file at *path*.

    :param limit: the map size now (called from the tail's thread, so a grown map counts).
    :param size_bytes: the bytes LMDB uses (``Store.size_bytes``): read at open and after each commit.
    """

    def __init__(self, path: str, ahead: int, *, limit: Callable[[], int], size_bytes: Callable[[], int],
                 piece: int = PIECE, sync_every: int = SYNC_EVERY) -> None:
        self.path = path
        self.ahead = ahead
        self.piece = piece
        self.sync_every = sync_every
        self._limit = limit
        self._size_bytes = size_bytes
        #: held by a commit and by each piece of zeros
        self.lock = threading.Lock()
        self._fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        #: bytes of the file that hold data or zeros (from the start)
        self.end = os.fstat(self._fd).st_size
        #: bytes LMDB uses, as of the last commit
        self.used = used = size_bytes()
        #: zeros written, and write errors, since the store opened (metrics)
        self.written = 0
        self.errors = 0
        self._retry_at = 0.0
        self._window = (time.monotonic(), used)
        #: the store's growth in bytes per second, over the last window with commits
        self.growth = 0.0
        self._closed = False
        self._wake = threading.Event()
        self._zeros = memoryview(bytes(piece))
        self._thread = threading.Thread(target=self._run, name="gwcore-tail", daemon=True)
        # Nothing at open: a store that is opened and not written (a passive node's check, a
        # tool, a test) costs no zeros; the first commits wake the thread.
        self._thread.start()

    @property
    def runway(self) -> int:
        """Zeroed bytes past the used pages: what the next commits write without growing the file."""
        return max(0, self.end - self.used)

    def commit(self, txn: Any) -> None:
        """Commit *txn* (a write transaction of the store's environment) under the lock, then
        note the new end of the used pages and wake the thread when the runway is short."""
        with self.lock:
            txn.commit()
            self.used = used = self._size_bytes()
        now = time.monotonic()
        since, was = self._window
        if now - since >= _RATE_WINDOW:
            self.growth = max(0, used - was) / (now - since)
            self._window = (now, used)
        if self.end - used < self.ahead // 2:
            self._wake.set()

    def _busy(self) -> bool:
        # Growing fast: leave the disk and the core to the commits. A store that has not
        # committed for a window is not busy, whatever its last rate was.
        return self.growth > MAX_GROWTH and time.monotonic() - self._window[0] < 2 * _RATE_WINDOW

    def close(self) -> None:
        """Stop the thread (it finishes the piece it is writing) and close the descriptor."""
        self._closed = True
        self._wake.set()
        self._thread.join()
        os.close(self._fd)

    # -- the tail's thread -------------------------------------------------------------------------

    def _run(self) -> None:
        paused = False
        while True:
            # paused for a busy store: look again once it may have calmed down, commits or not
            self._wake.wait(2 * _RATE_WINDOW if paused else None)
            self._wake.clear()
            if self._closed:
                return
            if time.monotonic() < self._retry_at:
                continue
            try:
                paused = self._fill()
            except OSError as exc:
                self.errors += 1
                self._retry_at = time.monotonic() + RETRY_AFTER
                log.warning("store: cannot write zeros ahead of the data in %s (%s); commits extend the "
                            "file instead, retried in %.0f s", self.path, exc.strerror or exc, RETRY_AFTER)

    def _fill(self) -> bool:
        # Zeros up to `ahead` past the used pages; True: stopped because the store is busy.
        unsynced = 0
        try:
            while not self._closed:
                if self._busy():
                    return True
                st = os.fstatvfs(self._fd)  # (not under the lock: a commit need not wait for it)
                if st.f_bavail * st.f_frsize < self.ahead + self.piece:
                    return False  # the disk's last bytes are the store's and the blobs', not zeros
                with self.lock:
                    start = max(self.end, self.used)
                    target = min(self.used + self.ahead, self._limit())
                    if start >= target:
                        return False
                    n = min(self.piece, target - start)
                    done = os.pwrite(self._fd, self._zeros[:n], start)
                    self.end = start + done
                    self.written += done
                unsynced += done
                if unsynced >= self.sync_every:
                    os.fdatasync(self._fd)
                    unsynced = 0
            return False
        finally:
            if unsynced:
                os.fdatasync(self._fd)
