"""The listener's side of distributor mode: a worker call from its routing to its answer.

``gwcore.http.HTTPProtocol._other`` routes the paths under ``/.gwcore/worker/`` of a listener that
serves workers to :meth:`WorkerCalls._worker_call`: the call runs as a task of the listener
(``state.worker_api``, :meth:`gwcore.distributor.protocol.WorkerProtocol.handle`; a take may wait
long for work) and is answered, in request order, when it ends. A databus blob is answered with a
:class:`FileAnswer`, whose file is streamed in pieces as the connection takes them, never read
whole.

:class:`WorkerCalls` is a base class of ``gwcore.http.HTTPProtocol``, beside
:class:`gwcore.databus.intake.PartIntake`, on the compiled ``core.ConnectionCore``. Every answer
ends with a call of ``_flush``, which the compiled base calls by name too: while a file waits for
the answers before it, :meth:`WorkerCalls._answer_file` swaps in the connection's own
``_flush_then_stream``, and takes it back once no file waits.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
from typing import TYPE_CHECKING, Any, Awaitable

from .._core import core
from ..httphead import ascii_reason, render_head

__all__ = ("FileAnswer", "Octets", "WorkerCalls")

# What a connection answers is the HTTP front end's, and is logged under its name.
log = logging.getLogger("gwcore.http")

_OCTETS = b"application/octet-stream"


class Octets(bytes):
    """A worker call's answer that is binary (``application/octet-stream``), not JSON."""

    __slots__ = ()


class FileAnswer:
    """A worker call's answer whose body is a file (a databus blob), streamed to the client in
    pieces as the connection takes them (never read whole). The listener owns *fd* from here
    on and closes it when the answer is written or abandoned.

    :param headers: further response headers, ``(name, value)`` of visible ASCII.
    """

    __slots__ = ("fd", "size", "headers")

    def __init__(self, fd: int, size: int, headers: list[tuple[str, str]]) -> None:
        self.fd = fd
        self.size = size
        self.headers = headers

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


#: One read of a streamed file: the transport's buffer holds about this much more than its
#: high-water mark at worst (the loop stops reading the file while the peer is behind).
_FILE_PIECE = 256 << 10


class WorkerCalls(core.ConnectionCore):
    """A client connection's worker calls and file answers; ``gwcore.http.HTTPProtocol`` builds
    on it and initialises the attributes below."""

    #: Files to stream as answers once the answers before them are out: (slot, head, FileAnswer).
    files_waiting: collections.deque[tuple[core.AnswerSlot, bytes, FileAnswer]]
    #: A streamed answer waits on it while writing is paused (resolved by ``resume_writing``).
    writable: asyncio.Future[None] | None
    settings: Any

    if TYPE_CHECKING:  # what gwcore.http.HTTPProtocol provides
        def _answer(self, slot: core.AnswerSlot, status: int, reason: str, *, body: bytes | None = None,
                    content_type: bytes = ..., count: bool = True) -> None: ...
        def _refuse(self, slot: core.AnswerSlot, refusal: str, callback: str | None, *,
                    count: bool = True) -> None: ...
        def _answer_error(self, slot: core.AnswerSlot, exc: BaseException, what: str, callback: str | None, *,
                          count: bool = True) -> None: ...

    def _worker_call(self, slot: core.AnswerSlot, method: bytes, path: bytes, headers: dict[bytes, bytes] | None) -> None:
        """A distributor worker's request: answered when its (possibly long-polling) call ends."""
        slot.head = method == b"HEAD"
        call = self._listener_task(self.state.worker_api(method, path, self._open, headers))
        call.add_done_callback(lambda done: self._worker_answer(slot, done))

    def _open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def _worker_answer(self, slot: core.AnswerSlot, call: asyncio.Future) -> None:
        if call.cancelled():
            self._answer(slot, 503, "Service Unavailable: gwcore is shutting down", count=False)
        elif (exc := call.exception()) is not None:
            self._answer_error(slot, exc, "worker protocol request", None, count=False)
        else:
            status, reason, body = call.result()
            if status == 401:
                self._refuse(slot, reason, None, count=False)
            elif isinstance(body, FileAnswer):
                self._answer_file(slot, status, reason, body)
            elif isinstance(body, Octets):
                self._answer(slot, status, reason, body=body, content_type=_OCTETS, count=False)
            else:
                self._answer(slot, status, reason, body=body or None, count=False)

    # -- answers streamed from a file (databus blobs) ---------------------------------------------

    def _answer_file(self, slot: core.AnswerSlot, status: int, reason: str, answer: FileAnswer) -> None:
        self.state.observe(slot, status)
        extra = b"".join(b"%s: %s\r\n" % (name.encode("ascii"), value.encode("ascii"))
                         for name, value in answer.headers)
        head = render_head(status, ascii_reason(reason), self.state.date(), answer.size, _OCTETS, slot.close, extra)
        if slot.head or answer.size == 0:
            answer.close()
            slot.data = head
            self._flush()
            return
        # Answers go out in request order: the body streams once every answer before it is
        # written, and the answers after it wait (its slot has no data until the body is out).
        if not self.files_waiting and self.slots and self.slots[0] is slot:
            self._start_stream(slot, head, answer)
            return
        if not self.files_waiting:
            # Every answer ends with a call of self._flush (the compiled path calls it by name
            # too): while files wait their turn, this connection's own _flush starts each one.
            # Only this connection pays for the detour, and only until then.
            self._flush = self._flush_then_stream  # type: ignore[method-assign]
        self.files_waiting.append((slot, head, answer))

    def _flush_then_stream(self) -> None:
        core.ConnectionCore._flush(self)
        files = self.files_waiting
        while files:
            slot, head, answer = files[0]
            gone = self.transport is None or self.transport.is_closing()
            if not gone and slot in self.slots and self.slots[0] is not slot:
                break  # not its turn yet
            files.popleft()
            if gone or slot not in self.slots:
                answer.close()
            else:
                self._start_stream(slot, head, answer)
                break
        if not files:
            del self._flush

    def _drop_files(self) -> None:
        files = self.files_waiting
        if files:
            while files:
                files.popleft()[2].close()
            del self._flush

    def _start_stream(self, slot: core.AnswerSlot, head: bytes, answer: FileAnswer) -> None:
        self._listener_task(self._stream_file(slot, head, answer))

    def _listener_task(self, work: Awaitable[Any]) -> asyncio.Future:
        """*work* as a task, held in the listener's ``worker_calls`` until it ends."""
        task = asyncio.ensure_future(work)
        self.state.worker_calls.add(task)
        task.add_done_callback(self.state.worker_calls.discard)
        return task

    async def _stream_file(self, slot: core.AnswerSlot, head: bytes, answer: FileAnswer) -> None:
        """Write *head*, then the file in pieces read off the loop (a thread, the next piece read
        while the last one is sent), waiting whenever the transport's buffer is over its
        high-water mark: memory stays at a few pieces whatever the file's size. A peer that takes
        nothing for ``GWCORE_HTTP_REQUEST_TIMEOUT`` is cut off; so is one whose file turns out
        shorter than announced (the length is out already)."""
        transport = self.transport
        loop = self.loop
        timeout = self.settings.http_request_timeout
        offset, size = 0, answer.size
        reading: asyncio.Future[bytes] | None = None
        done = False
        try:
            if transport is None or transport.is_closing():
                return
            transport.write(head)
            reading = next_piece = loop.run_in_executor(None, os.pread, answer.fd, min(_FILE_PIECE, size), 0)
            while offset < size:
                piece = await next_piece
                reading = None
                if transport.is_closing():
                    return
                if not piece:
                    log.error("a streamed file ended after %d of %d bytes: connection closed", offset, size)
                    return
                transport.write(piece)
                offset += len(piece)
                if offset < size:
                    reading = next_piece = loop.run_in_executor(
                        None, os.pread, answer.fd, min(_FILE_PIECE, size - offset), offset)
                while self.writing_paused and not transport.is_closing():
                    if self.writable is None:
                        self.writable = loop.create_future()
                    try:
                        await asyncio.wait_for(asyncio.shield(self.writable), timeout)
                    except asyncio.TimeoutError:
                        log.warning("a worker took nothing of a blob for %g s (GWCORE_HTTP_REQUEST_TIMEOUT): "
                                    "connection closed after %d of %d bytes", timeout, offset, size)
                        return
            done = True
        except OSError as exc:
            log.error("reading a streamed file failed after %d of %d bytes: %s", offset, size, exc)
        finally:
            if reading is not None and not reading.done():
                # the file is closed once the read in its thread is over, never under it
                def close(read: asyncio.Future[bytes]) -> None:
                    if not read.cancelled():
                        read.exception()  # retrieved: a failed read of an abandoned answer is no news
                    answer.close()

                reading.add_done_callback(close)
            else:
                answer.close()
            if done:
                slot.data = b""  # the answer is out: the ones behind it may follow
                self._flush()
            elif transport is not None and not transport.is_closing():
                transport.abort()  # the client must not take a short body for a whole one
