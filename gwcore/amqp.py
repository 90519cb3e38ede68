"""RabbitMQ (AMQP 0.9.1, through aio-pika) for selected-instance mode: the connection with its
reconnect loop, the topology, message mapping and the confirmed publisher.

Names on the broker, for an endpoint ``E`` (``GWCORE_ENDPOINT``):

==============================  =============================================================
``E``                           the endpoint's input queue: durable quorum queue, every instance
                                consumes it (competing consumers, ``GWCORE_AMQP_PREFETCH``)
``E.gwcore.dedup``              stream queue (``x-max-age`` = ``GWCORE_DEDUP_TTL``): the dedup
                                and databus part records every instance follows into its own LMDB
``E.gwcore.leader``             exclusive queue: whoever declared it is the gateway receiver;
                                the broker deletes it when the owner's connection dies
``E.gwcore.instance.<name>``    one instance's reply queue (callbacks, ``request()``)
==============================  =============================================================

A message published to the input queue carries ``message_id`` = ``NServiceBus.Id``,
``correlation_id`` = ``NServiceBus.CorrelationId``, ``reply_to`` = ``NServiceBus.ReplyToAddress``,
``content_type`` = ``NServiceBus.ContentType`` and every message header as an AMQP header (string
values), so a plain RabbitMQ consumer can read it; the body is the message body.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

import aio_pika
import aiormq
from aiormq.abc import ChannelFrame
from pamqp.commands import Basic

from ._core import core

__all__ = ("Link", "Topology", "to_amqp", "from_amqp", "POSSIBLE_DUPLICATE", "broker_errors", "PublishRefused",
           "cancel_and_wait", "FramePublisher")

log = logging.getLogger("gwcore.amqp")

#: The header a message dispatched again after a crash carries (issue 5, design.md §4).
POSSIBLE_DUPLICATE = "gwcore.PossibleDuplicate"

class PublishRefused(ConnectionError):
    """The broker answered a publish with a nack (or returned it)."""


# What a lost connection or channel raises from aio-pika/aiormq calls.
broker_errors: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError, aio_pika.exceptions.AMQPException, ConnectionError, OSError, asyncio.TimeoutError,
)


class Topology:
    """The queue names of one endpoint and how they are declared."""

    def __init__(self, endpoint: str, instance: str, dedup_ttl: float) -> None:
        self.endpoint = endpoint
        self.input = endpoint
        self.dedup = f"{endpoint}.gwcore.dedup"
        self.leader = f"{endpoint}.gwcore.leader"
        self.instance_prefix = f"{endpoint}.gwcore.instance."
        self.instance = self.instance_prefix + instance
        self.dedup_ttl = dedup_ttl

    def input_args(self) -> dict[str, Any]:
        return {"x-queue-type": "quorum"}

    def dedup_args(self) -> dict[str, Any]:
        return {"x-queue-type": "stream", "x-max-age": f"{max(1, int(self.dedup_ttl))}s"}

    async def declare(self, channel: aio_pika.abc.AbstractChannel) -> None:
        await channel.declare_queue(self.input, durable=True, arguments=self.input_args())
        await channel.declare_queue(self.dedup, durable=True, arguments=self.dedup_args())
        # Not exclusive: a reply that arrives while this instance reconnects must wait for it;
        # the queue goes 10 minutes after its last consumer did.
        await channel.declare_queue(self.instance, durable=True, arguments={"x-expires": 600_000})

    def route(self, headers: dict[str, str]) -> str:
        """The queue a message goes to: the requesting instance's queue for a reply addressed by
        ``RouteTo`` (protocol.md §4.4) to one of ours, else the input queue."""
        # The receiving framer removes every "NServiceBus.Header." from a name, as NServiceBus
        # does, so the RouteTo a responder sets (protocol.md §4.4) arrives as plain "RouteTo".
        to = headers.get("RouteTo") or headers.get("NServiceBus.Header.RouteTo")
        if to is not None and to.startswith(self.instance_prefix):
            return to
        return self.input


def to_amqp(msg_id: str, headers: dict[str, str], body: bytes, expiry_ms: int,
            flagged: bool) -> tuple[Basic.Properties, bytes]:
    """The AMQP properties and body for a stored envelope's parts (``core.decode_envelope``)."""
    amqp_headers: dict[str, Any] = dict(headers)
    if flagged:
        amqp_headers[POSSIBLE_DUPLICATE] = "true"
    if expiry_ms:
        amqp_headers["gwcore.ExpiryMs"] = str(expiry_ms)
    props = Basic.Properties(
        headers=amqp_headers, message_id=msg_id,
        correlation_id=headers.get("NServiceBus.CorrelationId", msg_id),
        reply_to=headers.get("NServiceBus.ReplyToAddress"),
        content_type=headers.get("NServiceBus.ContentType"),
        delivery_mode=2,  # persistent
    )
    return props, body


def from_amqp(incoming: aio_pika.abc.AbstractIncomingMessage) -> tuple[str, dict[str, str], bytes, int]:
    """``(id, headers, body, expiry_ms)`` of a delivered message (any producer: a header that is
    not a string is turned into one)."""
    headers = {str(k): v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
               for k, v in (incoming.headers or {}).items()}
    expiry = headers.pop("gwcore.ExpiryMs", "")
    msg_id = incoming.message_id or headers.get("NServiceBus.MessageId", "")
    return msg_id, headers, incoming.body, int(expiry) if expiry.isdigit() else 0


class Link:
    """One broker connection, re-opened after it drops (backoff up to 2 s).

    ``on_up(connection)`` runs after each connect (declare, consume, elect); ``on_down()`` runs
    the moment the connection is lost (fencing). :attr:`connected` is exact: it turns false in
    the connection's close callback, before any other code of this process runs.
    """

    def __init__(self, url: str, name: str, on_up: Callable[[Any], Awaitable[None]],
                 on_down: Callable[[BaseException | None], None]) -> None:
        self.url = url
        self.name = name
        self.on_up = on_up
        self.on_down = on_down
        self.connection: Any = None
        self.connected = False
        self.last_error = "not connected yet"
        self.connects = 0
        self._task: asyncio.Task | None = None
        self._closed = asyncio.Event()
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        delay = 0.05
        while not self._stopping:
            try:
                conn = await aio_pika.connect(self.url, client_properties={"connection_name": self.name},
                                              timeout=5)
            except broker_errors as exc:
                self.last_error = f"cannot connect to {_safe(self.url)}: {exc or type(exc).__name__}"
                if delay >= 0.4:
                    log.warning("broker: %s (retrying)", self.last_error)
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)
                continue
            self._closed.clear()
            self.connection = conn
            self.connected = True
            self.connects += 1
            conn.close_callbacks.add(self._lost)
            try:
                await self.on_up(conn)
            except broker_errors as exc:
                log.warning("broker: setting up the connection failed: %s", exc)
                await conn.close()
            except Exception:
                log.exception("broker: setting up the connection failed")
                await conn.close()
            else:
                delay = 0.05
                log.info("broker: connected to %s", _safe(self.url))
            await self._closed.wait()
            if not self._stopping:
                await asyncio.sleep(delay)

    def _lost(self, _conn: Any, exc: BaseException | None = None) -> None:
        if not self.connected:
            return
        self.connected = False
        self.connection = None
        if not self._stopping:
            self.last_error = f"connection lost: {exc or 'closed'}"
            log.warning("broker: %s", self.last_error)
        try:
            self.on_down(exc)
        finally:
            self._closed.set()

    async def stop(self) -> None:
        self._stopping = True
        conn = self.connection
        if conn is not None:
            try:
                await asyncio.wait_for(conn.close(), 5)
            except broker_errors:
                pass
        self._closed.set()
        await cancel_and_wait(self._task)


async def cancel_and_wait(task: asyncio.Future | None) -> None:
    """Cancel *task* and wait until it has ended, whatever it ended with."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except BaseException:  # its cancellation, or the error it had ended with already
        pass


def _safe(url: str) -> str:
    """The URL without its password, for logs."""
    head, sep, tail = url.partition("@")
    if not sep:
        return url
    scheme, _, userinfo = head.partition("://")
    return f"{scheme}://{userinfo.split(':')[0]}@{tail}"


class FramePublisher:
    """Publishes a whole dispatch batch as one write on an aiormq channel in confirm mode: the
    core builds every ``basic.publish`` of the batch (``core.encode_publishes``, about 1.5 µs a
    message against about 60 through pamqp), and aiormq keeps doing what it does well: the
    connection, its writer and its reader, and matching the broker's confirms (``multiple``
    included) to the futures registered here, one per publish, under the channel's lock as its own
    ``basic_publish`` does. It relies on aiormq's channel attributes ``lock``, ``delivery_tag``,
    ``confirmations``, ``write_queue``, ``number`` and ``max_content_size`` (checked when made,
    and by tests/test_amqp_frames.py), so an aiormq that changes them fails loudly, not silently.
    """

    __slots__ = ("channel", "input_queue", "instance_prefix")

    def __init__(self, channel: Any, input_queue: str, instance_prefix: str) -> None:
        missing = [name for name in ("lock", "delivery_tag", "confirmations", "write_queue", "number",
                                     "max_content_size", "publisher_confirms", "create_future")
                   if not hasattr(channel, name)]
        if missing or not channel.publisher_confirms:
            raise RuntimeError(f"this aiormq channel cannot take gwcore's publishes (missing {missing or 'confirms'}); "
                               f"aiormq {getattr(aiormq, '__version__', '?')} is not a version gwcore supports")
        self.channel = channel
        self.input_queue = input_queue.encode()
        self.instance_prefix = instance_prefix.encode()

    async def publish(self, items: list[tuple[bytes, bool]]) -> tuple[list[asyncio.Future], list[int]]:
        """Publish ``(stored envelope, flagged)`` each; returns a confirm future per publish (in
        order; an ``Ack`` or an exception) and the indexes of the items the core could not encode
        (a header name longer than 128 bytes), which were not published."""
        ch = self.channel
        frames, refused = core.encode_publishes(items, ch.number, ch.max_content_size, self.input_queue,
                                                self.instance_prefix)
        n = len(items) - len(refused)
        if not n:
            return [], refused
        async with ch.lock:
            first = ch.delivery_tag + 1
            confirmations = ch.confirmations
            futures = []
            for tag in range(first, first + n):
                fut = ch.create_future()
                confirmations[tag] = fut
                futures.append(fut)
            ch.delivery_tag += n
            drained = ch.create_future()
            try:
                await ch.write_queue.put(ChannelFrame(payload=frames, should_close=False, drain_future=drained))
            except BaseException:
                # the broker has not seen these: their tags are free again (as aiormq does)
                ch.delivery_tag -= n
                for tag in range(first, first + n):
                    confirmations.pop(tag, None)
                for fut in futures:
                    fut.cancel()
                raise
            await drained
        return futures, refused
