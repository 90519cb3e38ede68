"""A distributor worker: enlists with a gateway in distributor mode and runs a handler on the
messages it is handed (docs/deployment.md).

::

    async with gwcore.Worker("http://distributor:25900", 4, handle) as worker:
        await worker.wait_closed()      # until drained (worker.drain(), or `gwcore worker --drain`)

The worker never takes more than its capacity: it asks for work only while a slot is free, and the
distributor hands out at most the session's free slots. Each message is acknowledged after the
handler returned; a handler that raises is reported (the distributor retries it with backoff and
moves it to the error store after ``GWCORE_HANDLER_MAX_ATTEMPTS``).

A message's databus properties (``message.databus``) are the distributor's blobs: each is read
from a local blob directory when the worker was given one that has it, else streamed from the
distributor (``GET /.gwcore/worker/blob/<session>/<key>``) and checked against the blob's digest
on the way (docs/databus.md, "Distributor workers").
"""

from __future__ import annotations

import asyncio
import base64
import collections
import errno
import hashlib
import http.client
import io
import logging
import os
import queue
import shutil
import socket
import ssl
import tempfile
import threading
import urllib.parse
from typing import Any, BinaryIO, Callable

import orjson

from ._core import core
from . import auth, databus
from .client import SiteClient
from .consumer import handler_caller
from .errors import BlobError, BlobIntegrityError, ConfigurationError, GatewayError, SendError

__all__ = ("Worker", "WorkerMessage", "WorkerBlob", "drain_worker")

log = logging.getLogger("gwcore.worker")

_PREFIX = "/.gwcore/worker/"
_RETRY_DELAY = 1.0
_PIECE = 1 << 20  # one read of a blob from the distributor's connection (or a local file)
_HEX = frozenset("0123456789abcdef")


class _Signer:
    """Signs a worker's calls with its key (gwcore/auth.py, "worker calls"); one per worker, its
    nonces shared by the loop and the blob readers' threads."""

    def __init__(self, key_id: str, secret: bytes) -> None:
        auth.check_key_id(key_id)
        self.key_id = key_id
        self._secret = secret
        self._nonces = auth.NonceSource()
        self._lock = threading.Lock()

    def headers(self, method: str, target: str) -> list[tuple[bytes, bytes]]:
        with self._lock:
            nonce = self._nonces.next()
        return auth.call_headers(self._secret, self.key_id, method, target, nonce)


def _signer(key_id: str | None, secret: bytes | None, secret_file: str | None) -> _Signer | None:
    if secret is not None and secret_file is not None:
        raise ConfigurationError("give the worker's secret or its secret file, not both")
    if secret_file is not None:
        try:
            with open(secret_file, "rb") as f:
                secret = f.read().strip()
        except OSError as exc:
            raise ConfigurationError(f"worker secret file {secret_file!r}: {exc.strerror or exc}") from None
    if (key_id is None) != (secret is None):
        raise ConfigurationError("a worker key needs both its key id and its secret (--key-id and --secret-file)")
    if key_id is None or secret is None:
        return None
    if len(secret) < auth.MIN_SECRET_BYTES:
        raise ConfigurationError(f"worker key {key_id!r}: a secret needs at least {auth.MIN_SECRET_BYTES} bytes")
    try:
        return _Signer(key_id, secret)
    except ValueError as exc:
        raise ConfigurationError(f"worker key: {exc}") from None


class _BlobAccess:
    """Where a worker's messages read their blobs: the distributor (address, TLS, socket timeout),
    a local blob directory, and the directory for downloads made by ``WorkerBlob.path``."""

    def __init__(self, url: str, ssl_context: ssl.SSLContext | None, timeout: float,
                 blob_dir: str | None, download_dir: str | None, signer: _Signer | None = None) -> None:
        parts = urllib.parse.urlsplit(url)
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = ssl_context
        self.timeout = timeout
        self.blob_dir = blob_dir
        self.signer = signer
        self.download_parent = download_dir
        self._downloads: str | None = None
        self._lock = threading.Lock()

    def connect(self) -> http.client.HTTPConnection:
        if self.ssl is not None:
            return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=self.ssl)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def downloads(self) -> str:
        """This worker's own directory for downloaded blobs (made on first use)."""
        with self._lock:
            if self._downloads is None:
                self._downloads = tempfile.mkdtemp(prefix="gwcore-worker-", dir=self.download_parent)
            return self._downloads

    def remove_downloads(self) -> None:
        with self._lock:
            path, self._downloads = self._downloads, None
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)


class WorkerBlob:
    """A databus property of a message handed to a worker: the distributor's blob behind one
    header, the worker's counterpart of :class:`gwcore.Blob`.

    It is read from ``<blob_dir>/<key>`` when the worker was given a blob directory that has it
    (the distributor's blob dir on a shared or the same disk; :attr:`local` is True),
    else streamed from the distributor. A streamed blob is checked as it arrives: its length and
    its SHA-256 (or, for a blob received with only a ``Content-MD5``, its MD5) must be the
    distributor's, or reading raises :class:`gwcore.BlobIntegrityError`. The distributor serves
    it only while the worker holds the message, so read it in the handler (all of this blocks:
    in an async handler call it through ``asyncio.to_thread``).

    :ivar header: the message header (``NServiceBus.DataBus.<sender's key>``).
    :ivar key: the distributor's blob key (the header's value).
    """

    __slots__ = ("header", "key", "_size", "_sha256", "_md5", "_session", "_access", "_local", "_download",
                 "_lock")

    def __init__(self, header: str, key: str, info: dict[str, Any] | None, session: str, access: _BlobAccess) -> None:
        self.header = header
        self.key = key
        self._size: int | None = info["size"] if info else None
        self._sha256: str | None = (info.get("sha256") or None) if info else None
        self._md5: str | None = (info.get("md5") or None) if info else None
        self._session = session
        self._access = access
        self._local: str | None = None
        if access.blob_dir is not None:
            path = os.path.join(access.blob_dir, key)
            if os.path.isfile(path):
                self._local = path
        self._download: str | None = None
        self._lock = threading.Lock()

    @property
    def local(self) -> bool:
        """True when the blob is read from the local blob directory, not from the distributor."""
        return self._local is not None

    @property
    def size(self) -> int:
        """The blob's size in bytes (from the distributor's record; no request for it).

        :raises FileNotFoundError: the blob has expired."""
        if self._size is None:
            if self._local is not None:
                self._size = os.path.getsize(self._local)
            else:
                with _BlobReader(self, "HEAD") as head:
                    self._size = head.size
        return self._size

    @property
    def path(self) -> str:
        """A local file with the blob: the local blob directory's, or else a download into a
        directory of this worker's own (made on first access, checked like :meth:`open`;
        removed once the handler returned, and the directory when the worker stops).

        :raises FileNotFoundError: the blob has expired.
        :raises gwcore.BlobIntegrityError: what arrived is not the blob."""
        if self._local is not None:
            return self._local
        with self._lock:
            if self._download is None:
                fd, tmp = tempfile.mkstemp(prefix=self.key + "-", dir=self._access.downloads())
                try:
                    with os.fdopen(fd, "wb") as out, self.open() as src:
                        shutil.copyfileobj(src, out, _PIECE)
                except BaseException:
                    os.unlink(tmp)
                    raise
                self._download = tmp
            return self._download

    def open(self) -> BinaryIO:
        """A binary reader of the blob: the local (or downloaded) file, or a stream from the
        distributor, read in pieces whatever the blob's size.

        :raises FileNotFoundError: the blob has expired (or is no longer the worker's to read).
        :raises gwcore.BlobError: the distributor cannot be reached or refused (``503`` while it
            stops or is passive).
        """
        path = self._local or self._download
        if path is not None:
            return open(path, "rb")
        return io.BufferedReader(_BlobReader(self, "GET"), _PIECE)  # type: ignore[return-value]

    def read(self) -> bytes:
        """The whole property (only for properties that fit in memory)."""
        with self.open() as f:
            return f.read()

    def _target(self) -> str:
        return f"{_PREFIX}blob/{_seg(self._session)}/{self.key}"

    def _cleanup(self) -> None:
        with self._lock:
            path, self._download = self._download, None
        if path is not None:
            try:
                os.unlink(path)
            except OSError:
                pass

    def __repr__(self) -> str:
        return f"<WorkerBlob {self.header!r} key={self.key!r}{' local' if self._local else ''}>"


class _BlobReader(io.RawIOBase):
    """One blob streamed from the distributor over a connection of its own (blocking), its
    length and digest checked as the last byte arrives."""

    def __init__(self, blob: WorkerBlob, method: str) -> None:
        super().__init__()
        self.blob = blob
        what = f"blob {blob.key} ({blob.header})"
        self.what = what
        self.conn = blob._access.connect()
        try:
            target = blob._target()
            signer = blob._access.signer
            headers = {} if signer is None else {
                k.decode("ascii"): v.decode("ascii") for k, v in signer.headers(method, target)}
            self.conn.request(method, target, headers=headers)
            self.resp = resp = self.conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            self.conn.close()
            raise BlobError(f"{what}: cannot read it from the distributor: {exc!r}") from exc
        if resp.status != 200:
            text = resp.read(2000).decode("utf-8", "replace").strip() if method != "HEAD" else ""
            self.conn.close()
            reason = text or f"{resp.status} {resp.reason}"
            if resp.status == 404:
                raise FileNotFoundError(errno.ENOENT, f"{what}: {reason}")
            raise BlobError(f"{what}: the distributor answered {resp.status}: {reason}")
        try:
            length = int(resp.getheader("Content-Length", ""))
            sha = databus.digest_sha256(resp.getheader("Content-Digest", "")) or blob._sha256
        except ValueError as exc:
            self.conn.close()
            raise BlobError(f"{what}: the distributor's answer is malformed: {exc}") from exc
        md5 = resp.getheader("Content-MD5") or blob._md5
        if blob._size is not None and length != blob._size:
            self.conn.close()
            raise BlobIntegrityError(f"{what}: the distributor sends {length} bytes, the message says {blob._size}")
        self.size = self.left = length
        # One digest: the SHA-256 where the distributor has one, else the MD5 of a part that
        # came with only a Content-MD5; a blob with neither is checked for its length alone.
        self.expected = sha or md5
        self.algorithm = "SHA-256" if sha else "MD5" if md5 else None
        self.hash = hashlib.sha256() if sha else hashlib.md5(usedforsecurity=False) if md5 else None
        if method == "GET" and not length:
            self._check()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.left == 0:
            return 0
        view = memoryview(buffer).cast("B")[:self.left]
        try:
            n = self.resp.readinto(view)
        except (OSError, http.client.HTTPException) as exc:
            raise BlobError(f"{self.what}: the transfer broke after {self.size - self.left} of {self.size} "
                            f"bytes: {exc!r}") from exc
        if not n:
            raise BlobError(f"{self.what}: the distributor ended the transfer after {self.size - self.left} "
                            f"of {self.size} bytes")
        if self.hash is not None:
            self.hash.update(view[:n])
        self.left -= n
        if self.left == 0:
            self._check()
        return n

    def readall(self) -> bytes:
        out = bytearray(self.left)
        view = memoryview(out)
        got = 0
        while got < len(out):
            got += self.readinto(view[got:got + _PIECE])
        return bytes(out)

    def _check(self) -> None:
        if self.hash is None:
            return
        got = base64.b64encode(self.hash.digest()).decode("ascii")
        if got != self.expected:
            raise BlobIntegrityError(
                f"{self.what}: the {self.algorithm} of the {self.size} bytes received is {got}, the distributor's "
                f"record says {self.expected}: the blob was damaged on the way or on the distributor's disk")

    def close(self) -> None:
        if not self.closed:
            self.conn.close()
        super().close()


class WorkerMessage:
    """One message handed to this worker.

    :ivar id: the NServiceBus message id.
    :ivar headers: message headers (``NServiceBus.Header.`` prefix removed).
    :ivar body: the message body.
    :ivar seq: its position in the distributor's queue.
    :ivar attempt: 1, or more when earlier handler attempts failed.
    :ivar delivery_count: deliveries so far, this one included (a worker that died or stalled
        holding the message, or a failed attempt, counts as one).
    :ivar redelivered: True when the message was handed out before (it may have been processed).
    :ivar databus: the claim-check properties: header name (``NServiceBus.DataBus.<sender's
        key>``) -> :class:`WorkerBlob` (``.key``, ``.size``, ``.open()``, ``.read()``, ``.path``).
    """

    __slots__ = ("id", "headers", "body", "seq", "attempt", "delivery_count", "redelivered", "databus")

    def __init__(self, id: str, headers: dict[str, str], body: bytes, seq: int, attempt: int, delivery_count: int,
                 blob_infos: dict[str, Any] | None = None, *, session: str = "",
                 blobs: _BlobAccess | None = None) -> None:
        self.id = id
        self.headers = headers
        self.body = body
        self.seq = seq
        self.attempt = attempt
        self.delivery_count = delivery_count
        self.redelivered = delivery_count > 1
        self.databus: dict[str, WorkerBlob] = {}
        if blobs is not None and blob_infos is not None:
            for name, value in headers.items():
                if name.startswith(databus.DATABUS_PREFIX) and len(value) == 32 and _HEX.issuperset(value):
                    self.databus[name] = WorkerBlob(name, value, blob_infos.get(name), session, blobs)

    @classmethod
    def from_json(cls, wire: dict[str, Any], *, session: str = "", blobs: _BlobAccess | None = None) -> "WorkerMessage":
        """A message of a JSON take answer (``take``: the body in base64)."""
        return cls(wire["id"], wire["headers"], base64.b64decode(wire["body"]), wire["seq"], wire["attempt"],
                   wire["delivery_count"], wire.get("databus") or {}, session=session, blobs=blobs)

    @classmethod
    def from_record(cls, record: tuple[int, int, int, str, dict[str, str], bytes, int, bytes], *, session: str = "",
                    blobs: _BlobAccess | None = None) -> "WorkerMessage":
        """A message of a binary take answer (``take-frames``, ``core.decode_take``)."""
        seq, attempt, count, msg_id, headers, body, _expiry, extra = record
        # extra is the JSON of the databus blobs the message names, empty when it names none
        return cls(msg_id, headers, body, seq, attempt, count, orjson.loads(extra) if extra else None,
                   session=session, blobs=blobs)

    def _cleanup(self) -> None:
        """The handler returned: downloads made for ``.path`` go."""
        for blob in self.databus.values():
            blob._cleanup()

    def __repr__(self) -> str:
        return f"<WorkerMessage id={self.id!r} seq={self.seq} delivery_count={self.delivery_count}>"


class _Refused(GatewayError):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status


def _base_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(f"distributor URL {url!r}: need http:// or https:// and a host")
    return f"{parts.scheme}://{parts.netloc}/"


def _seg(text: str) -> str:
    return urllib.parse.quote(text, safe="")


class _HandlerThreads:
    """Runs a sync handler in up to *size* threads of its own (started as they are needed) and
    hands the outcomes back to the event loop in batches: one loop wake-up for whatever finished
    meanwhile, instead of a future, a done-callback chain and a wake-up per message as a
    ``ThreadPoolExecutor`` costs. A message is given to the first free thread; a thread that
    finishes one takes the next waiting without sleeping."""

    def __init__(self, size: int, handler: Callable[[Any], Any], loop: asyncio.AbstractEventLoop,
                 on_done: Callable[[tuple[str, Any], BaseException | None], None]) -> None:
        self._size = size
        self._handler = handler
        self._loop = loop
        self._on_done = on_done
        self._work: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._finished: list[tuple[tuple[str, Any], BaseException | None]] = []
        self._collect_scheduled = False
        self._threads: list[threading.Thread] = []
        self._idle = 0      # threads started and not handling a message
        self._waiting = 0   # messages put and not taken by a thread yet
        self._closed = False

    def put(self, item: tuple[str, Any]) -> None:
        """Handle ``item[1]``; *item* comes back to ``on_done`` with the handler's exception."""
        with self._lock:
            self._waiting += 1
            start = self._waiting > self._idle and len(self._threads) < self._size and not self._closed
            if start:
                self._idle += 1
        if start:
            t = threading.Thread(target=self._run, name=f"gwcore-handler-{len(self._threads)}", daemon=True)
            self._threads.append(t)
            t.start()
        self._work.put(item)

    def _run(self) -> None:
        work, handler, lock = self._work, self._handler, self._lock
        while True:
            item = work.get()
            if item is None:
                return
            with lock:
                self._idle -= 1
                self._waiting -= 1
            exc: BaseException | None = None
            try:
                handler(item[1])
            except BaseException as e:  # the handler's failure is the message's outcome (a nack)
                exc = e
            with lock:
                self._idle += 1
                self._finished.append((item, exc))
                wake = not self._collect_scheduled
                self._collect_scheduled = True
            if wake:
                try:
                    self._loop.call_soon_threadsafe(self._collect)
                except RuntimeError:
                    return  # the loop is closed: the worker is gone, its session lapses

    def _collect(self) -> None:
        with self._lock:
            finished, self._finished = self._finished, []
            self._collect_scheduled = False
        on_done = self._on_done
        for item, exc in finished:
            on_done(item, exc)

    def close(self) -> None:
        """Stop the threads once they are idle (what is waiting is not started)."""
        self._closed = True
        while True:
            try:
                self._work.get_nowait()
            except queue.Empty:
                break
        for _ in self._threads:
            self._work.put(None)


class _Protocol:
    """The worker protocol's calls over one keep-alive client, signed when the worker has a key."""

    def __init__(self, url: str, concurrency: int, wait: float, signer: _Signer | None = None) -> None:
        self.client = SiteClient(_base_url(url), concurrency=concurrency, request_timeout=wait + 30.0)
        self.signer = signer
        self.last_answer = 0.0  # loop time of the last answer (every call renews the lease)

    async def call(self, *segments: str) -> dict[str, Any]:
        result: dict[str, Any] = orjson.loads(await self.call_raw(*segments))
        return result

    async def call_raw(self, *segments: str) -> bytes:
        """The answer's body of a call (200), unparsed."""
        text = _PREFIX + "/".join(_seg(s) for s in segments)
        block = b""
        if self.signer is not None:
            block = b"".join(b"%s: %s\r\n" % kv for kv in self.signer.headers("POST", text))
        response = await self.client.post_block(block, b"", target=text.encode("ascii"))
        self.last_answer = asyncio.get_running_loop().time()
        if response.status != 200:
            raise _Refused(response.status, response.reason)
        return bytes(response.body)


class Worker:
    """Works off a distributor's queue: ``await worker.run()`` or ``async with``.

    :param url: the distributor node's base URL (``http://host:25900``).
    :param capacity: messages handled at once (the slots enlisted with).
    :param handler: sync or async callable taking one :class:`WorkerMessage`; a sync handler runs
        in a thread of its own pool (one thread per slot).
    :param name: the worker's name on the distributor (default ``host-pid``); enlisting under a
        name that has a session ends that session (a restarted worker).
    :param wait: longest a request for work waits on the distributor (it may cut this shorter).
    :param blob_dir: the distributor's blob dir (``GWCORE_BLOB_DIR`` there, by default
        ``<data dir>/blobs``) where this host sees it: databus blobs found there are read from it
        instead of being streamed.
    :param download_dir: where ``WorkerBlob.path`` downloads go (a directory of the worker's own
        is made in it); default the system's temporary directory.
    :param key_id: the worker key's id (the distributor's ``GWCORE_WORKER_KEYS``): every call is
        then signed with it; needed wherever the distributor has worker keys.
    :param secret: that key's secret, or *secret_file*, a file holding it.
    """

    def __init__(self, url: str, capacity: int, handler: Callable[[Any], Any], *,
                 name: str | None = None, wait: float = 10.0, blob_dir: str | None = None,
                 download_dir: str | None = None, key_id: str | None = None, secret: bytes | None = None,
                 secret_file: str | None = None) -> None:
        if capacity < 1:
            raise ConfigurationError(f"worker capacity must be at least 1, got {capacity}")
        signer = _signer(key_id, secret, secret_file)
        self.url = url
        self.capacity = capacity
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.wait = wait
        self._handler = handler
        self._proto = _Protocol(url, capacity + 2, wait, signer)
        self._blobs = _BlobAccess(_base_url(url), self._proto.client.ssl, wait + 30.0, blob_dir, download_dir, signer)
        self._threads: _HandlerThreads | None = None  # a sync handler's threads
        self._frames = True  # takes answered in the binary layout (False: the distributor is older)
        self.session: str | None = None
        self._tasks: set[asyncio.Future[Any]] = set()  # async handlers running (one per busy slot)
        self._sync_running = 0  # messages given to the sync handler's threads, not finished yet
        self._sync_idle = asyncio.Event()
        # seqs taken and not yet answered, with how many copies: after a takeover the new active
        # may hand a message out again while the old session's copy is still being handled
        self._held: collections.Counter[int] = collections.Counter()
        # Acks of the messages finished in one loop turn go out as one request.
        self._acks: list[tuple[str, int]] = []   # (session, seq) to acknowledge this loop turn
        self._acking: set[asyncio.Future[None]] = set()  # acks and nacks not answered yet
        self._room = asyncio.Event()
        self._draining = False
        self._run_task: asyncio.Task | None = None
        self._drain_task: asyncio.Future | None = None
        self._lease = 30.0  # the session's lease, as the distributor said at enlisting
        #: Messages handled and acknowledged / whose handler raised.
        self.processed = 0
        self.failed = 0
        #: Most messages held at once (never above capacity).
        self.max_in_flight = 0

    @property
    def in_flight(self) -> int:
        """Messages being handled (each holds a slot)."""
        return len(self._tasks) + self._sync_running

    # -- running -----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Enlist, handle messages until drained, finish what is in flight, leave."""
        loop = asyncio.get_running_loop()
        handler = self._handler
        # a sync handler (it may block) runs in threads of its own; an async one on the loop
        call = None if handler_caller(handler) is not handler else handler
        if call is None:
            self._threads = _HandlerThreads(self.capacity, handler, loop, self._sync_handled)
        heartbeat = loop.create_task(self._heartbeat())
        try:
            while not self._draining:
                if self.session is None and not await self._enlist():
                    await asyncio.sleep(_RETRY_DELAY)
                    continue
                while self.in_flight >= self.capacity and not self._draining:
                    self._room.clear()
                    await self._room.wait()
                if self._draining:
                    break
                try:
                    stop, messages = await self._take()
                except _Refused as exc:
                    if exc.status == 404:
                        self.session = None  # the distributor forgot us (restart, or we lapsed)
                    else:
                        log.warning("distributor refused a take: %s", exc)
                        await asyncio.sleep(_RETRY_DELAY)
                    continue
                except SendError as exc:
                    log.warning("distributor unreachable: %s", exc)
                    await asyncio.sleep(_RETRY_DELAY)
                    continue
                session = self.session or ""
                held = self._held
                for msg in messages:
                    held[msg.seq] += 1
                for msg in messages:
                    self._start(loop, call, session, msg)
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                if stop:
                    log.info("worker %r drained by the distributor: finishing %d message(s)", self.name, self.in_flight)
                    self._draining = True
            while self._tasks or self._sync_running or self._acks or self._acking:
                # the handlers still running, then every acknowledgement answered
                if self._tasks:
                    await asyncio.gather(*self._tasks, return_exceptions=True)
                if self._sync_running:
                    self._sync_idle.clear()
                    await self._sync_idle.wait()
                if self._acks:
                    self._send_acks()
                if self._acking:
                    await asyncio.gather(*self._acking, return_exceptions=True)
            if self.session is not None:
                try:
                    await self._proto.call("leave", self.session)
                except (SendError, _Refused) as exc:
                    log.warning("leaving the distributor failed (the session lapses instead): %s", exc)
                self.session = None
        finally:
            heartbeat.cancel()
            await self._proto.client.close()
            if self._threads is not None:
                self._threads.close()
            self._blobs.remove_downloads()

    async def _take(self) -> tuple[bool, list[WorkerMessage]]:
        """Ask for work: ``(stop, messages)``. In the binary layout (``take-frames``), unless the
        distributor is a gwcore that does not know it yet: then in JSON (``take``) from then on."""
        session = self.session or ""
        args = (session, str(int(self.wait * 1000)), ",".join(map(str, sorted(self._held))))
        if self._frames:
            try:
                stop, records = core.decode_take(await self._proto.call_raw("take-frames", *args))
            except _Refused as exc:
                if exc.status != 404 or "no worker operation" not in str(exc):
                    raise
                log.info("the distributor at %s answers takes in JSON only (an older gwcore)", self.url)
                self._frames = False
            else:
                return stop, [WorkerMessage.from_record(r, session=session, blobs=self._blobs) for r in records]
        answer = await self._proto.call("take", *args)
        return bool(answer["stop"]), [WorkerMessage.from_json(w, session=session, blobs=self._blobs)
                                      for w in answer["messages"]]

    async def _enlist(self) -> bool:
        try:
            answer = await self._proto.call("enlist", self.name, str(self.capacity))
        except (SendError, _Refused) as exc:
            log.warning("cannot enlist with the distributor at %s: %s", self.url, exc)
            return False
        self.session = answer["session"]
        self._lease = float(answer["lease"])
        log.info("worker %r enlisted at %s with capacity %d", self.name, self.url, self.capacity)
        return True

    async def _heartbeat(self) -> None:
        """While every slot is busy (or draining) no take is sent: renew the lease some other way,
        so a long handler is not mistaken for a dead worker."""
        loop = asyncio.get_running_loop()
        while True:
            # (not enlisted yet: look again soon, the lease is not known)
            await asyncio.sleep(min(1.0, self._lease / 6) if self.session is not None else 0.05)
            session = self.session
            if session is not None and loop.time() - self._proto.last_answer >= self._lease / 3:
                try:
                    await self._proto.call("heartbeat", session)
                except _Refused as exc:
                    log.warning("heartbeat refused: %s", exc)
                    if exc.status == 404 and self.session == session:
                        self.session = None  # lapsed after all: enlist again when a slot frees
                except SendError as exc:
                    log.warning("heartbeat failed: %s", exc)

    def _start(self, loop: asyncio.AbstractEventLoop, call: Callable[[WorkerMessage], Any] | None,
               session: str, msg: WorkerMessage) -> None:
        """Run the handler on *msg* in a slot: an async handler as a task of its own, a sync one
        in the handler's threads (no future around it: :class:`_HandlerThreads`)."""
        if call is None:
            assert self._threads is not None
            self._sync_running += 1
            self._threads.put((session, msg))
            return
        fut = loop.create_task(call(msg))
        self._tasks.add(fut)
        fut.add_done_callback(lambda done: self._task_handled(session, msg, done))

    def _task_handled(self, session: str, msg: WorkerMessage, done: asyncio.Future[Any]) -> None:
        self._tasks.discard(done)
        if done.cancelled():
            self._room.set()
            msg._cleanup()
            self._unhold(msg.seq)  # stopped mid-handler: not a failed attempt, it is handed out again
            return
        self._handled(session, msg, done.exception())

    def _sync_handled(self, item: tuple[str, WorkerMessage], exc: BaseException | None) -> None:
        self._sync_running -= 1
        if not self._sync_running:
            self._sync_idle.set()
        self._handled(item[0], item[1], exc)

    def _handled(self, session: str, msg: WorkerMessage, exc: BaseException | None) -> None:
        """The handler returned or raised: its slot is free now. The acknowledgement goes out with
        the others of this loop turn, and the message stays held until it is answered, so that
        takes keep listing it; a failure is reported (nack) the same way."""
        self._room.set()
        msg._cleanup()
        if exc is None:
            self.processed += 1
            if not self._acks:
                asyncio.get_running_loop().call_soon(self._send_acks)
            self._acks.append((session, msg.seq))
            return
        self.failed += 1
        log.warning("handler failed on message %s (attempt %d): %r", msg.id, msg.attempt, exc)
        self._answering(self._nack(session, msg, repr(exc)))

    def _answering(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._acking.add(task)
        task.add_done_callback(self._acking.discard)

    async def _nack(self, session: str, msg: WorkerMessage, reason: str) -> None:
        try:
            await self._answer(msg, "nack", session, str(msg.seq), reason)
        finally:
            self._unhold(msg.seq)

    def _unhold(self, seq: int) -> None:
        # held until answered: a take lists it, so the distributor does not hand it out again
        self._held[seq] -= 1
        if self._held[seq] <= 0:
            del self._held[seq]

    def _send_acks(self) -> None:
        batch, self._acks = self._acks, []
        by_session: dict[str, list[int]] = {}
        for session, seq in batch:
            by_session.setdefault(session, []).append(seq)
        for session, seqs in by_session.items():
            self._answering(self._ack_batch(session, seqs))

    async def _ack_batch(self, session: str, seqs: list[int]) -> None:
        what = f"{len(seqs)} message(s)" if len(seqs) > 1 else f"seq {seqs[0]}"
        try:
            await self._answer_call(what, "ack", session, ",".join(map(str, seqs)))
        finally:
            for seq in seqs:
                self._unhold(seq)

    async def _answer(self, msg: WorkerMessage, *call: str) -> None:
        await self._answer_call(f"message {msg.id}", *call)

    async def _answer_call(self, what: str, *call: str) -> None:
        for attempt in range(3):
            try:
                await self._proto.call(*call)
                return
            except _Refused as exc:
                log.warning("%s of %s refused (%s): the distributor redelivers it", call[0], what, exc)
                return
            except SendError as exc:
                if attempt == 2:
                    log.warning("%s of %s failed (%s): the distributor redelivers it", call[0], what, exc)
                    return
                await asyncio.sleep(_RETRY_DELAY)

    def drain(self) -> None:
        """Take nothing new; finish and acknowledge what is in flight, then leave (``run`` returns).
        Safe to call from a signal handler on the loop."""
        if self._draining:
            return
        self._draining = True
        self._room.set()
        if self.session is not None:
            # The waiting take returns at once (with whatever was already assigned to it).
            self._drain_task = asyncio.ensure_future(self._drain_call(self.session))

    async def _drain_call(self, session: str) -> None:
        try:
            await self._proto.call("drain", session)
        except (SendError, _Refused) as exc:
            log.warning("drain request failed: %s", exc)

    async def wait_closed(self) -> None:
        """Until :meth:`run` (started by ``async with``) returns."""
        if self._run_task is not None:
            await asyncio.shield(self._run_task)

    async def __aenter__(self) -> "Worker":
        self._run_task = asyncio.ensure_future(self.run())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.drain()
        await self.wait_closed()


async def drain_worker(url: str, name: str, *, key_id: str | None = None, secret: bytes | None = None,
                       secret_file: str | None = None) -> bool:
    """Tell the distributor at *url* to give worker *name* nothing new (it finishes and leaves).
    Returns False when no worker of that name is enlisted. With worker keys on the distributor,
    the call must be signed with the key that worker enlisted with.

    :raises gwcore.GatewayError: the distributor refused (``401`` for a wrong key)."""
    proto = _Protocol(url, 1, 1.0, _signer(key_id, secret, secret_file))
    try:
        answer = await proto.call("drain", name)
    finally:
        await proto.client.close()
    return bool(answer["drained"])
