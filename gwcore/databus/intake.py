"""A connection's databus parts: each ``SingleCallDatabusProperty`` request from its head to its
answer (docs/databus.md).

The core frames a streamed part from its head and hands its body out in pieces; a part's body of
:data:`_DIRECT_BODY_MIN` bytes or more still to come is read by :class:`_PartBody` straight into
the blob's receive buffers instead. With request signing, a part's signature is checked at its
head, before a blob file exists: everything it covers is in the head, the body through the
``Content-Digest`` it declares (docs/security.md). Once the body is in, the blob is sealed (fsync,
rename), its digest checked against the ``Content-MD5`` or the ``Content-Digest``, its record
committed by the writer, and only then is the part answered 200. A part the parser framed whole
takes the same way from the checks of ``gwcore.http.HTTPProtocol._route``.

:class:`PartIntake` is the part of a client connection that does this, between the compiled
``core.ConnectionCore`` (which calls ``_part_begin``, ``_part_data``, ``_part_end`` and
``_take_part_body`` by name) and ``gwcore.http.HTTPProtocol``, which routes everything else and
renders every answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import TYPE_CHECKING, Any

from .._core import core
from ..records import part_key
from .digests import b64, digest_sha256
from .records import record_part
from .sink import BlobSink

__all__ = ("PartIntake",)

_KIND_DATABUS = core.REQUEST_KINDS.index("databus")

# The answers to part requests are the HTTP front end's, and are logged under its name.
log = logging.getLogger("gwcore.http")

_MD5_MISMATCH = "MD5 hash received does not match hash calculated on server. Please resubmit."
_DIGEST_MISMATCH = "Content-Digest received does not match the digest calculated on server. Please resubmit."
_CANNOT_STORE = "Service Unavailable: cannot store the databus property"
_TOO_MANY_PARTS = ("Service Unavailable: too many databus parts at once from your address "
                   "(GWCORE_HTTP_MAX_PARTS_PER_PEER)")

#: A part body this large (still to come) is read with _PartBody rather than through the parser.
_DIRECT_BODY_MIN = 64 << 10


class _Part:
    """A databus part being received: its slot, its framed head, and the blob it streams to
    (None when it was refused at its head and its body is only read past)."""

    __slots__ = ("slot", "env", "sink", "verified", "sha256", "counted")

    def __init__(self, slot: core.AnswerSlot, env: Any, sink: BlobSink | None, verified: bool = False) -> None:
        self.slot = slot
        self.env = env
        self.sink = sink
        self.verified = verified  # its digests were checked on the whole body already
        self.sha256: str | None = None  # what its Content-Digest says the body's SHA-256 is
        self.counted = False  # among its peer's parts being received (HTTPState.peer_parts)


class _PartBody(asyncio.BufferedProtocol):
    """The connection's protocol while the body of a databus part arrives: the socket is read
    straight into the blob's receive buffers (no copy into a new ``bytes`` per read, no parser
    pass), never past the body's end; then the connection goes back to its
    :class:`PartIntake` protocol, which reads what follows as usual."""

    __slots__ = ("http", "sink", "left")

    def __init__(self, http: PartIntake, sink: BlobSink, left: int) -> None:
        self.http = http
        self.sink = sink
        self.left = left

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.sink.receive_into(self.left)

    def buffer_updated(self, nbytes: int) -> None:
        http = self.http
        self.left -= nbytes
        http.parser.body_taken(nbytes)
        self.sink.received(nbytes)
        http.request_bytes += nbytes  # what the minimum rate counts (HTTPProtocol.check_timeouts)
        if self.left == 0:
            if http.transport is not None and not http.transport.is_closing():
                http.transport.set_protocol(http)
            http.data_received(b"")  # the parser ends the part: EV_PART_END
        else:
            http._update_reading()

    def eof_received(self) -> bool | None:
        return self.http.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.http.connection_lost(exc)

    def pause_writing(self) -> None:
        self.http.pause_writing()

    def resume_writing(self) -> None:
        self.http.resume_writing()


class PartIntake(core.ConnectionCore, asyncio.Protocol):
    """A client connection's databus parts; ``gwcore.http.HTTPProtocol`` builds on it. The
    methods the compiled base class calls by name are defined here, so a part's events cost one
    call each, as before."""

    #: Submits that wait for this connection's parts to be recorded (``parts_open`` is 0 again).
    held: list[tuple[core.AnswerSlot, Any]]
    #: The peer's address, the key of its count in ``state.peer_parts`` (gwcore.http.peer_key).
    peer: Any
    settings: Any

    if TYPE_CHECKING:  # what gwcore.http.HTTPProtocol provides
        def _route(self, slot: core.AnswerSlot, result: Any) -> None: ...
        def _answer(self, slot: core.AnswerSlot, status: int, reason: str, *, callback: str | None = None) -> None: ...
        def _answer_check(self, slot: core.AnswerSlot, refused: tuple[int, str], callback: str | None) -> None: ...
        def _answer_error(self, slot: core.AnswerSlot, exc: BaseException, what: str, callback: str | None) -> None: ...

    def _sink(self, slot: core.AnswerSlot, callback: str | None, signed: bool, md5: bool) -> BlobSink | None:
        """A blob for a part's body, or None once the part is answered 503 (no blob store, or the
        file cannot be created)."""
        blobs = self.state.blobs
        if blobs is not None:  # None: an HTTPState without a blob store (tests of the protocol alone)
            try:
                return blobs.sink(self._update_reading, signed=signed, md5=md5)
            except OSError as exc:
                log.error("databus: cannot create a blob file: %s", exc)
        self._answer(slot, 503, _CANNOT_STORE, callback=callback)
        return None

    def _claimed_sha256(self, slot: core.AnswerSlot, env: Any) -> tuple[bool, str | None]:
        """What a part's ``Content-Digest`` says its body's SHA-256 is: ``(True, base64)``,
        ``(True, None)`` when it names no SHA-256 (or is absent), ``(False, None)`` once a
        malformed one is answered 400."""
        if env.content_digest is None:
            return True, None
        try:
            return True, digest_sha256(env.content_digest)
        except ValueError as exc:
            self._answer(slot, 400, f"Bad Request: {exc}", callback=env.callback)
            return False, None

    def _whole_part(self, slot: core.AnswerSlot, env: Any) -> None:
        """A part the parser could not stream (framed whole, its Content-MD5 and signature
        already verified), past the checks ``_route`` makes of every submit."""
        slot.callback = env.callback
        ok, sha = self._claimed_sha256(slot, env)
        if not ok:
            return
        if sha is not None and sha != b64(hashlib.sha256(env.body).digest()):
            self._answer(slot, 412, _DIGEST_MISMATCH, callback=env.callback)
            return
        sink = self._sink(slot, env.callback, False, False)
        if sink is None:
            return
        sink.write(env.body)
        self._store_part(_Part(slot, env, sink, verified=True))

    def _part_begin(self, keep_alive: bool, env: Any) -> None:
        """The head of a streamed part: refuse it now, or open the blob its body goes to."""
        # A part whose request ends the connection (``Connection: close``, HTTP/1.0 as nginx
        # speaks to upstreams by default) still has its body to be read: the connection closes
        # after the part's answer, but stops reading only once the body is in (_part_end).
        slot = self._slot(True)
        slot.close = slot.close or not keep_alive
        slot.callback = env.callback
        slot.kind = _KIND_DATABUS
        state = self.state
        part = self.part = _Part(slot, env, None)
        unavailable = state.not_available()
        if unavailable is not None:
            self._answer(slot, 503, unavailable)
            return
        if state.verifier is not None:
            # Decided on the head alone: a signed part passes only with the Content-Digest its
            # signature covers, which the body is checked against as it is written.
            refused = state.verifier.check(env, streamed=True)
            if refused is not None:
                # Its body is not read: the connection closes after the answer (_linger), so
                # that a forged part costs its sender the upload and us nothing on disk.
                slot.close = True
                self.closing = True
                self._answer_check(slot, refused, env.callback)
                return
        ok, part.sha256 = self._claimed_sha256(slot, env)
        if not ok:
            return
        if not self._count_part(part):
            # Beyond the peer's share: refused before a blob is made, and the connection closes
            # after the answer instead of reading a body that may be gigabytes in vain.
            slot.close = True
            self.closing = True
            self._answer(slot, 503, _TOO_MANY_PARTS, callback=env.callback)
            return
        # One digest per part: a SHA-256 that is checked anyway (a Content-Digest, always there
        # on a signed part) proves the body as well as the MD5 would, and runs at 2-3 times its
        # speed on CPUs with SHA extensions, so the Content-MD5 is then not computed.
        with_sha = part.sha256 is not None
        part.sink = self._sink(slot, env.callback, with_sha, env.content_md5 is not None and not with_sha)

    def _count_part(self, part: _Part) -> bool:
        """Count *part* among its peer's parts being received, or False when the peer has
        ``GWCORE_HTTP_MAX_PARTS_PER_PEER`` already. Each holds at most one receive buffer and
        ``sink.HIGH_WATER`` bytes waiting for the disk (reading pauses beyond), so this bounds
        the memory one address can take with parts (docs/security.md, "Limits per client")."""
        state = self.state
        counts = state.peer_parts
        n = counts.get(self.peer, 0)
        if n >= self.settings.http_max_parts_per_peer:
            state.parts_refused_per_peer += 1
            return False
        counts[self.peer] = n + 1
        part.counted = True
        return True

    def _uncount_part(self, part: _Part) -> None:
        if part.counted:
            part.counted = False
            counts = self.state.peer_parts
            n = counts[self.peer] - 1
            if n:
                counts[self.peer] = n
            else:
                del counts[self.peer]

    def _take_part_body(self) -> None:
        """When the rest of a part's body is all still to come, read it with :class:`_PartBody`
        straight into the blob's receive buffers, not through the parser."""
        part = self.part
        if part is None or part.sink is None or self.closing or self.transport is None:
            return
        left = self.parser.streamed_body_left()
        if left >= _DIRECT_BODY_MIN:
            self.transport.set_protocol(_PartBody(self, part.sink, left))

    def _part_data(self, chunk: bytes) -> None:
        part = self.part
        if part is not None and part.sink is not None:
            part.sink.write(chunk)

    def _part_end(self) -> None:
        part, self.part = self.part, None
        if part is None:
            return
        self._uncount_part(part)  # its body is in: what is left waits for the disk alone
        if part.slot.close:
            self.closing = True  # the part's request was the connection's last (_part_begin)
        if part.sink is not None:
            self._store_part(part)

    def _drop_part(self) -> None:
        part, self.part = self.part, None
        if part is None:
            return
        self._uncount_part(part)
        if part.sink is not None:
            part.sink.abort()

    def _store_part(self, part: _Part) -> None:
        self.parts_open += 1
        task = asyncio.ensure_future(self._finish_part(part))
        self.state.part_tasks.add(task)
        task.add_done_callback(self._part_recorded)

    def _part_recorded(self, task: asyncio.Task) -> None:
        self.state.part_tasks.discard(task)
        self.parts_open -= 1
        if not self.parts_open and self.held:
            held, self.held = self.held, []
            for slot, result in held:
                self._route(slot, result)

    async def _finish_part(self, part: _Part) -> None:
        """The whole body is in: seal the blob, verify it, index it; then answer."""
        state, env, sink, slot = self.state, part.env, part.sink, part.slot
        assert sink is not None
        try:
            md5, sha = await sink.finish()
        except OSError as exc:
            log.error("databus: writing the property of message %s failed: %s", env.id, exc)
            self._answer(slot, 503, f"{_CANNOT_STORE} ({exc.strerror or exc})", callback=env.callback)
            return
        if not part.verified and part.sha256 is not None and part.sha256 != sha:
            sink.discard_sealed()
            self._answer(slot, 412, _DIGEST_MISMATCH, callback=env.callback)
            return
        if not part.verified and md5 is not None and env.content_md5 is not None and env.content_md5 != md5:
            sink.discard_sealed()
            self._answer(slot, 412, _MD5_MISMATCH, callback=env.callback)
            return
        writer = state.writer
        try:
            await writer.call(record_part(
                writer.store, part_key(env.key, env.databus_key), sink.name, sink.size, md5 or "", sha or "",
                writer.blob_expiry_ms(env.expiry_ms, env.accepted_ms), writer.doom))
        except Exception as exc:
            sink.discard_sealed()
            self._answer_error(slot, exc, f"databus: indexing the property of message {env.id}", env.callback)
            return
        self._answer(slot, 200, "OK", callback=env.callback)
