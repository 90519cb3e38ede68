"""The worker protocol over HTTP: what ``gwcore worker`` processes call under ``/.gwcore/worker/``.

The protocol (docs/deployment.md) is served on the worker listener (``GWCORE_WORKER_LISTEN``,
loopback by default) and, only when worker keys are configured, on the gateway's receive channels
too; the listener routes its paths to :meth:`WorkerProtocol.handle` (the gateway attaches it as
``worker_api``). With worker keys every call is signed (gwcore/auth.py, "worker calls") and
checked before anything is handed out, taken back or deleted; a session belongs to the key that
enlisted it. The request parser keeps no body or query string for paths that are not channels,
so every parameter travels as a percent-encoded path segment; answers are JSON, but for a databus
blob, whose file the listener streams (:class:`gwcore.distributor.listener.FileAnswer`), and for
``take-frames``, the binary take answer built by the core (``core.encode_take``: the stored
envelopes as they are, no JSON or base64), which gwcore's own workers ask for.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import urllib.parse
from typing import Any, Awaitable, Callable

import orjson

from .. import auth, databus
from .._core import core
from ..consumer import Message
from ..errors import AuthenticationError, ConfigurationError, UnknownSessionError
from .listener import FileAnswer, Octets
from .scheduler import Distributor, _Refusal

__all__ = ("WorkerProtocol", "WORKER_PREFIX", "check_channels", "Answer")

log = logging.getLogger("gwcore.distributor")

#: The reserved path prefix of the worker protocol on the gateway's listener.
WORKER_PREFIX = b"/.gwcore/worker/"
_MAX_REASON = 2000
_BLOB_KEY = re.compile(r"[0-9a-f]{32}")

#: (status, reason, JSON body), for a blob a :class:`FileAnswer` as the body, for a binary take
#: answer :class:`Octets`.
Answer = tuple[int, str, "bytes | FileAnswer"]
_DATABUS_MARK = databus.DATABUS_PREFIX.encode("utf-8")
_STOPPING: Answer = (503, "Service Unavailable: the distributor is stopping", b"")


class WorkerProtocol:
    """Answers the worker protocol's requests for a :class:`Distributor`.

    :param distributor: the sessions and the queue the calls act on.
    :param keys: worker keys, (key id, secret) pairs (``GWCORE_WORKER_KEYS``): with any, every
        call must be signed by one of them; without, calls are anonymous (the worker listener on
        loopback is then the only place they are served).
    :param max_skew: ``GWCORE_AUTH_MAX_SKEW``, the date window of a signed call.
    """

    def __init__(self, distributor: Distributor, keys: tuple[tuple[str, bytes], ...] = (),
                 max_skew: float = 300.0) -> None:
        self.distributor = distributor
        self.verifier = auth.CallVerifier(keys, max_skew) if keys else None

    async def handle(self, method: bytes, path: bytes, alive: Callable[[], bool],
                     headers: dict[bytes, bytes] | None = None) -> Answer:
        """Answer one worker protocol request (``POST /.gwcore/worker/<op>/<arg>...``, or
        ``GET /.gwcore/worker/blob/<session>/<key>``).

        :param headers: the request's ``gwcore-*`` headers (its signature), lower-case names.
        """
        key: str | None = None
        if self.verifier is not None:
            # before anything else, also before telling a caller which operations exist
            try:
                key = self.verifier.check(method.decode("latin-1"), path.decode("latin-1"), headers)
            except AuthenticationError as exc:
                self.distributor.refused += 1
                return 401, f"Unauthorized: {exc.reason} ({str(exc).partition(': ')[2] or exc})", b""
        parts = [urllib.parse.unquote(p.decode("latin-1")) for p in path[len(WORKER_PREFIX):].split(b"/")]
        op, args = parts[0], parts[1:]
        if op == "blob":
            if method not in (b"GET", b"HEAD"):
                return 405, "Method Not Allowed: a blob is read with GET (or HEAD)", b""
            if self.distributor.closed:
                return _STOPPING
            # Everything after the session is the key: a key with a '/' in it is malformed (400),
            # not an unknown operation.
            return self.blob(args[0] if args else "", "/".join(args[1:]), key)
        if method != b"POST":
            return 405, "Method Not Allowed: the worker protocol uses POST", b""
        handler = _OPS.get(op)
        if handler is None or len(args) != handler[0]:
            return 404, f"Not Found: no worker operation {op!r} with {len(args)} argument(s)", b""
        if self.distributor.closed:
            return _STOPPING
        try:
            result = await handler[1](self.distributor, args, alive, key)
        except (UnknownSessionError, _Refusal) as exc:
            return self._refused(exc)
        except ValueError as exc:
            return 400, f"Bad Request: {exc}", b""
        return 200, "OK", result if isinstance(result, Octets) else orjson.dumps(result)

    def blob(self, sid: str, key: str, worker_key: str | None = None) -> Answer:
        """One databus blob for a worker: the file, opened, to be streamed by the listener.

        Only a blob that a message held by this session names is served, and only by its key
        (32 lowercase hex digits, the file name in the blob dir): nothing else of
        the data dir can be reached this way."""
        if not _BLOB_KEY.fullmatch(key):
            return 400, "Bad Request: a blob key is 32 lowercase hex digits", b""
        try:
            s = self.distributor.session(sid, worker_key)  # renews the lease, as every call does
        except (UnknownSessionError, _Refusal) as exc:
            return self._refused(exc)
        if not any(_names_blob(m, key) for m in s.inflight.values()):
            return 404, f"Not Found: blob {key} is named by no message worker session {sid} holds", b""
        store = self.distributor.store
        info = databus.blob_info(store, key)
        path = os.path.join(store.blob_dir, key)
        try:
            if info is None:
                raise FileNotFoundError(path)
            # O_NOFOLLOW: a link planted in the blob dir is not followed out of it. Once open, the
            # file can be streamed to its end even if its expiry removes it meanwhile.
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return 404, f"Not Found: blob {key} has expired (its message outlived the blob's TimeToBeReceived " \
                        "or GWCORE_DATABUS_TTL)", b""
        size = os.fstat(fd).st_size
        if size != info.size:
            os.close(fd)
            log.error("databus: blob %s is %d bytes on disk but %d in its record: not served", key, size, info.size)
            return 500, f"Internal Server Error: blob {key} is damaged ({size} bytes, {info.size} recorded)", b""
        headers = []
        if info.sha256:
            headers.append(("Content-Digest", databus.content_digest(info.sha256)))
        if info.md5:
            headers.append(("Content-MD5", info.md5))
        return 200, "OK", FileAnswer(fd, size, headers)

    def _refused(self, exc: UnknownSessionError | _Refusal) -> Answer:
        """The answer to a call the distributor refused: 404 for a session it does not know, else
        the refusal's status and reason (a 401 counted in ``refused``)."""
        if isinstance(exc, UnknownSessionError):
            return 404, f"Not Found: {exc}", b""
        if exc.status == 401:
            self.distributor.refused += 1
        return exc.status, exc.reason, b""


def _positive(text: str, what: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{what} must be a positive integer, got {text!r}")
    return n


def _names_blob(msg: Message, key: str) -> bool:
    return any(value == key and name.startswith(databus.DATABUS_PREFIX) for name, value in msg.headers.items())


def _blobs(d: Distributor, msg: Message) -> dict[str, Any]:
    """What a worker needs to know of the databus blobs *msg* names: header name -> key, size and
    digests, or None for a blob that expired before the message was handed out (reading it is a
    404). Most messages name none: their envelope does not even hold the prefix."""
    blobs: dict[str, Any] = {}
    if _DATABUS_MARK not in msg.framed:
        return blobs
    for name, key in msg.headers.items():
        if name.startswith(databus.DATABUS_PREFIX) and _BLOB_KEY.fullmatch(key):
            info = databus.blob_info(d.store, key)
            blobs[name] = None if info is None else {"key": key, "size": info.size, "sha256": info.sha256,
                                                     "md5": info.md5}
    return blobs


def _wire(d: Distributor, msg: Message, count: int) -> dict[str, Any]:
    wire = {"seq": msg.seq, "id": msg.id, "headers": msg.headers, "body": base64.b64encode(msg.body).decode("ascii"),
            "attempt": msg.attempt, "delivery_count": count, "redelivered": count > 1}
    blobs = _blobs(d, msg)
    if blobs:
        wire["databus"] = blobs
    return wire


def _record(d: Distributor, msg: Message, count: int) -> tuple[int, int, int, bytes, bytes]:
    blobs = _blobs(d, msg)
    return msg.seq, msg.attempt, count, msg.framed, orjson.dumps(blobs) if blobs else b""


async def _op_enlist(d: Distributor, args: list[str], alive: Callable[[], bool], key: str | None) -> dict[str, Any]:
    name = args[0]
    if not name or len(name) > 200:
        raise ValueError("a worker name of 1 to 200 characters is required")
    s = d.enlist(name, _positive(args[1], "capacity"), key)
    return {"session": s.id, "lease": d.lease, "max_wait": d.max_wait}


async def _take(d: Distributor, args: list[str], alive: Callable[[], bool],
                key: str | None) -> tuple[list[tuple[Message, int]], bool]:
    wait = _positive(args[1], "wait (milliseconds)") / 1000.0
    held = {_positive(x, "seq") for x in args[2].split(",") if x}
    return await d.take(args[0], wait, alive, held, key)


async def _op_take(d: Distributor, args: list[str], alive: Callable[[], bool], key: str | None) -> dict[str, Any]:
    batch, stop = await _take(d, args, alive, key)
    return {"messages": [_wire(d, m, c) for m, c in batch], "stop": stop}


async def _op_take_frames(d: Distributor, args: list[str], alive: Callable[[], bool], key: str | None) -> Octets:
    batch, stop = await _take(d, args, alive, key)
    return Octets(core.encode_take([_record(d, m, c) for m, c in batch], stop))


async def _op_ack(d: Distributor, args: list[str], alive: Callable[[], bool], key: str | None) -> dict[str, Any]:
    seqs = [_positive(x, "seq") for x in args[1].split(",") if x]
    return {"acked": await d.ack(args[0], seqs, key)}


async def _op_nack(d: Distributor, args: list[str], alive: Callable[[], bool], key: str | None) -> dict[str, Any]:
    return {"released": d.nack(args[0], _positive(args[1], "seq"), args[2][:_MAX_REASON], key)}


async def _op_drain(d: Distributor, args: list[str], alive: Callable[[], bool], key: str | None) -> dict[str, Any]:
    return {"drained": d.drain(args[0], key)}


async def _op_heartbeat(d: Distributor, args: list[str], alive: Callable[[], bool], key: str | None) -> dict[str, Any]:
    d.session(args[0], key)  # renews the lease
    return {"lease": d.lease}


async def _op_leave(d: Distributor, args: list[str], alive: Callable[[], bool], key: str | None) -> dict[str, Any]:
    return {"redelivered": d.leave(args[0], key)}


_Op = Callable[[Distributor, list[str], Callable[[], bool], "str | None"], Awaitable["dict[str, Any] | Octets"]]
# operation -> (number of path arguments, implementation)
_OPS: dict[str, tuple[int, _Op]] = {
    "enlist": (2, _op_enlist),    # enlist/<name>/<capacity>
    "take": (3, _op_take),        # take/<session>/<wait ms>/<seqs held>,...: JSON, base64 bodies
    "take-frames": (3, _op_take_frames),  # the same, answered in the binary layout (core.encode_take)
    "ack": (2, _op_ack),          # ack/<session>/<seq>,<seq>,...
    "nack": (3, _op_nack),        # nack/<session>/<seq>/<reason>
    "drain": (1, _op_drain),      # drain/<session or worker name>
    "heartbeat": (1, _op_heartbeat),  # heartbeat/<session>: a busy worker's sign of life
    "leave": (1, _op_leave),      # leave/<session>
}


def check_channels(paths: list[str]) -> None:
    """A channel at ``/`` (or anywhere on the way to, or below, the worker prefix) would swallow
    the worker protocol's paths."""
    prefix = WORKER_PREFIX.decode()
    for p in paths:
        if prefix.startswith(p.lower()) or p.lower().startswith(prefix):
            raise ConfigurationError(
                f"GWCORE_RECEIVE_CHANNELS: the channel path {p!r} covers {WORKER_PREFIX.decode()!r}, "
                "which distributor mode reserves for its workers")
