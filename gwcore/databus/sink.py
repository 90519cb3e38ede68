"""Writing blobs as they arrive: :class:`BlobWriter` makes a :class:`BlobSink` per part, whose
bytes land in page-aligned receive buffers (copied there, or read there straight from the socket)
and go to ``<blob dir>/.tmp-<name>`` from blob threads, written (``O_DIRECT`` where the file
system allows it) and hashed side by side, in order, never whole in memory. At the part's end the
file is fsync'd, renamed to its blob name and the directory fsync'd; only then may its record be
committed and the part answered.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import fcntl
import hashlib
import mmap
import os
import threading
from typing import Callable, Iterator

from ..filemodes import PRIVATE, Modes
from .digests import b64
from .layout import TMP, blob_dir, fsync_dir, new_name

__all__ = ("BlobWriter", "BlobSink", "HIGH_WATER", "BUF", "ALIGN", "POOL_KEEP")

#: Bytes of a part received but not yet written before the connection stops being read.
HIGH_WATER = 8 << 20
#: One receive buffer of a part (a socket read fills at most this much), a multiple of ALIGN.
BUF = 1 << 20
#: The block size O_DIRECT writes keep to (file offset, length and memory address).
ALIGN = 4096
#: Receive buffers kept for reuse, over all parts (more are mapped while many parts arrive).
POOL_KEEP = 16


class _Buf:
    """One receive buffer of a part: ``BUF`` bytes of anonymous memory, so page aligned (what
    ``O_DIRECT`` needs), filled in order and then read by each lane of the sink that filled it."""

    __slots__ = ("view", "holds")

    def __init__(self) -> None:
        self.view = memoryview(mmap.mmap(-1, BUF))
        self.holds = 0  # lanes that have not yet finished with the whole buffer


class BlobWriter:
    """Makes :class:`BlobSink` objects for one data dir; owns the threads that write blobs and
    the receive buffers they reuse.

    :param direct_io: write blob files with ``O_DIRECT`` where the file system allows it (the
        bytes go from the receive buffer to the disk without a copy into the page cache; the file
        is still fsync'd before a part is acknowledged). Falls back to ordinary writes per file
        when the file system refuses it.
    :param directory: the blob dir (``GWCORE_BLOB_DIR``), default ``<data_dir>/blobs``.
    :param prefix: the store's blob name prefix (:func:`new_name`).
    """

    def __init__(self, data_dir: str, loop: asyncio.AbstractEventLoop, *, direct_io: bool = True,
                 directory: str | None = None, prefix: str = "", modes: Modes = PRIVATE) -> None:
        self.directory = directory or blob_dir(data_dir)
        self.prefix = prefix
        self.modes = modes
        modes.make_dir(self.directory)
        self.loop = loop
        self.direct_io = direct_io and hasattr(os, "O_DIRECT")
        # One blob's work stays in order (one write job and one hash job at a time per sink);
        # four threads let a second upload go on beside the first one's.
        self.executor = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="gwcore-blob")
        # Receive buffers come back here once every lane is done with them: memory that is
        # mapped once and stays faulted in, instead of a fresh allocation per read.
        self._free: list[_Buf] = []
        self._free_lock = threading.Lock()

    def sink(self, on_drain: Callable[[], None], *, signed: bool = False, md5: bool = True) -> "BlobSink":
        """:param signed: compute the SHA-256 (the signature's body digest).
        :param md5: compute the MD5 (the request has a ``Content-MD5`` to verify)."""
        return BlobSink(self, on_drain, signed, md5)

    def _take(self, holds: int) -> _Buf:
        with self._free_lock:
            buf = self._free.pop() if self._free else None
        if buf is None:
            buf = _Buf()
        buf.holds = holds
        return buf

    def _release(self, buf: _Buf) -> None:
        """A lane (any thread) is done with *buf*; the last one gives it back."""
        with self._free_lock:
            buf.holds -= 1
            if buf.holds == 0 and len(self._free) < POOL_KEEP:
                self._free.append(buf)

    def _give_back(self, buf: _Buf) -> None:
        """The sink's last, partly filled buffer, once no lane can still touch it."""
        with self._free_lock:
            buf.holds = 0
            if len(self._free) < POOL_KEEP:
                self._free.append(buf)

    def close(self) -> None:
        self.executor.shutdown(wait=True)


#: A run of received bytes: ``view[start:end]`` of one receive buffer.
_Region = tuple  # (_Buf, int, int)


class _Lane:
    """One in-order stream of work over a sink's regions (writing, or hashing), run by one job in
    a blob thread that keeps taking what arrives until nothing is left, so a busy part never
    waits for the event loop between batches."""

    __slots__ = ("fn", "pending", "queued", "running", "lock", "whole")

    def __init__(self, fn: Callable[[list], None], whole: bool = False) -> None:
        self.fn = fn
        self.whole = whole               # takes only whole buffers (the O_DIRECT write lane)
        self.pending: list[_Region] = []
        self.queued = 0                  # bytes handed to this lane and not yet processed
        self.running = False             # a job is in a blob thread (or about to be)
        self.lock = threading.Lock()


def _runs(regions: list[_Region]) -> Iterator[tuple[_Buf, int, int]]:
    """Adjacent regions of one buffer merged: one hash update or write call per run."""
    buf = None
    start = end = 0
    for b, s, e in regions:
        if b is buf and s == end:
            end = e
            continue
        if buf is not None:
            yield buf, start, end
        buf, start, end = b, s, e
    if buf is not None:
        yield buf, start, end


class BlobSink:
    """One blob being received: its bytes land in page-aligned receive buffers (copied there by
    :meth:`write`, or read there straight from the socket through :meth:`receive_into` and
    :meth:`received`), and blob threads write them, and hash them, in order, side by side.

    Neither call blocks; :attr:`behind` says the disk (or the hashing) lags more than
    ``HIGH_WATER`` bytes (the caller pauses reading, and ``on_drain`` is called on the loop once
    the lag is below half of that).
    """

    def __init__(self, owner: BlobWriter, on_drain: Callable[[], None], signed: bool, md5: bool = True) -> None:
        self.owner = owner
        self.loop = owner.loop
        self.name = new_name(owner.prefix)
        self.tmp = os.path.join(owner.directory, TMP + self.name)
        self.path = os.path.join(owner.directory, self.name)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        self.direct = False
        if owner.direct_io:
            try:
                self.fd = owner.modes.open_new(self.tmp, flags | os.O_DIRECT)
                self.direct = True
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # tmpfs and some others refuse O_DIRECT
                    raise
        if not self.direct:
            self.fd = owner.modes.open_new(self.tmp, flags)
        # Only the digests the request needs: MD5 is the slowest step of a part (about 730 MiB/s
        # a core here), and a sender may leave Content-MD5 out.
        self.md5 = hashlib.md5(usedforsecurity=False) if md5 else None
        self.sha = hashlib.sha256() if signed else None
        self.size = 0
        self._on_drain = on_drain
        # Writing and hashing run side by side in two lanes (hashlib and os.write release the
        # GIL), so neither waits for the other: a part goes at the pace of the slower one.
        self._lanes = [_Lane(self._write_regions, whole=self.direct)]
        if self.md5 is not None or self.sha is not None:
            self._lanes.append(_Lane(self._hash_regions))
        self._cur: _Buf | None = None    # the buffer being filled (loop thread)
        self._fill = 0                   # bytes of it filled
        self._wbuf: _Buf | None = None   # the write lane's partly written (or held back) buffer
        self._wpos = 0                   # bytes of it written
        self._idle: asyncio.Future | None = None
        self._error: BaseException | None = None
        self._closed = False

    @property
    def behind(self) -> bool:
        return max(lane.queued for lane in self._lanes) >= HIGH_WATER

    # -- the loop side ------------------------------------------------------------------------------

    def write(self, chunk: bytes | memoryview) -> None:
        """Take *chunk* (copied into the receive buffers)."""
        view = memoryview(chunk).cast("B")
        while view:
            room = self.receive_into(len(view))
            n = len(room)
            room[:] = view[:n]
            self.received(n)
            view = view[n:]

    def receive_into(self, limit: int) -> memoryview:
        """Where the next at most *limit* bytes of the blob go (a socket reads into it); then
        :meth:`received` says how many came."""
        if self._cur is None:
            self._cur = self.owner._take(len(self._lanes))
            self._fill = 0
        return self._cur.view[self._fill:self._fill + min(limit, BUF - self._fill)]

    def received(self, n: int) -> None:
        """*n* bytes were put where :meth:`receive_into` said: hand them to the lanes."""
        if n <= 0 or self._closed or self._error is not None:
            return  # a failed blob is read past (the buffer is reused), answered at its end
        buf, start = self._cur, self._fill
        assert buf is not None
        self._fill = end = start + n
        self.size += n
        if end == BUF:
            self._cur = None  # full: the lanes give it back once both are done with it
        region = (buf, start, end)
        for lane in self._lanes:
            if lane.whole:
                # the O_DIRECT writer is woken once per full buffer, not per read
                if end != BUF:
                    continue
                take, nbytes = (buf, 0, BUF), BUF
            else:
                take, nbytes = region, n
            with lane.lock:
                lane.pending.append(take)
                lane.queued += nbytes
                begin = not lane.running
                lane.running = True
            if begin:
                self.owner.executor.submit(self._run, lane)

    # -- the blob threads ---------------------------------------------------------------------------

    def _run(self, lane: _Lane) -> None:
        # In a blob thread: hashlib and os.write release the GIL on large buffers.
        while True:
            with lane.lock:
                regions, lane.pending = lane.pending, []
                if not regions or self._error is not None or self._closed:
                    lane.pending = []
                    lane.running = False
                    break
            try:
                lane.fn(regions)
            except BaseException as exc:  # reported by finish()
                self._error = self._error or exc
            n = sum(e - s for _b, s, e in regions)
            with lane.lock:
                was_behind = lane.queued >= HIGH_WATER
                lane.queued -= n
                drained = was_behind and lane.queued < HIGH_WATER // 2
            if drained:
                self.loop.call_soon_threadsafe(self._drained)
        self.loop.call_soon_threadsafe(self._lane_stopped)

    def _hash_regions(self, regions: list[_Region]) -> None:
        for buf, start, end in _runs(regions):
            piece = buf.view[start:end]
            if self.md5 is not None:
                self.md5.update(piece)
            if self.sha is not None:
                self.sha.update(piece)
            if end == BUF:
                self.owner._release(buf)

    def _write_regions(self, regions: list[_Region]) -> None:
        if self.direct:
            # The O_DIRECT lane is handed whole buffers only (a write waits for the device, so
            # small ones are slow): consecutive ones go in one call, the last one's tail at _seal.
            full = [buf for buf, _start, _end in _runs(regions)]
            self._write_out([buf.view for buf in full])
            for buf in full:
                self.owner._release(buf)
            return
        for buf, _start, end in _runs(regions):
            # from 0 for a buffer new to this lane: it may have skipped the start of it while
            # it took whole buffers only (O_DIRECT, given up on since)
            begin = self._wpos if buf is self._wbuf else 0
            if end > begin:
                self._write_out([buf.view[begin:end]])
            self._wbuf, self._wpos = buf, end
            if end == BUF:
                self.owner._release(buf)

    def _write_out(self, views: list[memoryview]) -> None:
        """Write *views* in order, whatever the short writes; leaves O_DIRECT for good when the
        file system refuses it at a write or a short write leaves the file off the block grid."""
        views = [v for v in views if len(v)]
        while views:
            try:
                n = os.writev(self.fd, views)
            except OSError as exc:
                if not (self.direct and exc.errno == errno.EINVAL):
                    raise
                self._buffered()  # the file system took the open but not the write
                continue
            while views and n >= len(views[0]):
                n -= len(views.pop(0))
            if views:
                views[0] = views[0][n:]
                if self.direct and n % ALIGN:
                    self._buffered()

    def _buffered(self) -> None:
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.direct = False
        self._lanes[0].whole = False

    def _busy(self) -> bool:
        return any(lane.running for lane in self._lanes)

    def _drained(self) -> None:
        if not self.behind:
            self._on_drain()

    def _lane_stopped(self) -> None:
        if self._busy():
            return
        if self._idle is not None and not self._idle.done():
            self._idle.set_result(None)
        if self._closed:
            self._discard()
        self._drained()

    async def finish(self) -> tuple[str | None, str | None]:
        """Everything written: fsync the file, rename it into place, fsync the directory.
        Returns ``(Content-MD5, SHA-256)`` in base64, each None when not computed.

        :raises OSError: a write or the fsync failed (the temp file is removed).
        """
        while self._busy():
            self._idle = self.loop.create_future()
            await self._idle
        if self._error is not None:
            self.abort()
            raise self._error
        try:
            await self.loop.run_in_executor(self.owner.executor, self._seal)
        except BaseException:
            self.abort()
            raise
        return (b64(self.md5.digest()) if self.md5 is not None else None,
                b64(self.sha.digest()) if self.sha is not None else None)

    def _seal(self) -> None:
        # The lanes are idle: what the write lane held back of the last buffer goes now.
        buf, fill = self._cur, self._fill
        if buf is not None:
            begin = self._wpos if buf is self._wbuf else 0
            if self.direct:
                whole = fill - fill % ALIGN
                self._write_out([buf.view[:whole]])
                begin = whole
                if fill > whole:
                    self._buffered()
            self._write_out([buf.view[begin:fill]])
            self._cur = self._wbuf = None
            self.owner._give_back(buf)
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        os.rename(self.tmp, self.path)
        fsync_dir(self.owner.directory)

    def abort(self) -> None:
        """Give up on this blob: its file goes (after a write in progress ends)."""
        if self._closed:
            return
        self._closed = True
        for lane in self._lanes:
            with lane.lock:
                lane.pending = []
        if not self._busy():
            self._discard()

    def _discard(self) -> None:
        fd, self.fd = self.fd, -1
        tmp = self.tmp
        # Buffers still held by this blob are left to the garbage collector, not reused.
        self._cur = self._wbuf = None

        def remove() -> None:
            if fd >= 0:
                os.close(fd)
            for path in (tmp, self.path):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

        try:
            self.loop.run_in_executor(self.owner.executor, remove)
        except RuntimeError:  # the blob threads are gone (shutting down): remove it here
            remove()

    def discard_sealed(self) -> None:
        """Remove a sealed blob whose index record will not be written (401, store refused)."""
        self._closed = True
        self._discard()
