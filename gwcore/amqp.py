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
``E.gwcore.instance.<name>``    one instance's reply queue (callbacks, ``request()``): durable
                                quorum queue, gone 10 minutes after its instance last used it
==============================  =============================================================

Every queue but the leader queue is replicated over a cluster's nodes (quorum queues, a stream),
so any majority of the nodes serves them: :class:`Link` connects to whichever node of
``GWCORE_AMQP_URL`` answers and moves on to the next one when its node goes. The leader queue
lives on the node of its owner's connection and goes with it, which is what ends a leadership.

A message published to the input queue carries ``message_id`` = ``NServiceBus.Id``,
``correlation_id`` = ``NServiceBus.CorrelationId``, ``reply_to`` = ``NServiceBus.ReplyToAddress``,
``content_type`` = ``NServiceBus.ContentType`` and every message header as an AMQP header (string
values), so a plain RabbitMQ consumer can read it; the body is the message body.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any, Awaitable, Callable, Sequence

import aio_pika
import aiormq
from aiormq.abc import ChannelFrame
from pamqp.commands import Basic

from ._core import core
from .config import redacted_url, split_amqp_urls
from .selectedbase import cancel_and_wait

__all__ = ("Link", "Topology", "to_amqp", "from_amqp", "POSSIBLE_DUPLICATE", "broker_errors", "PublishReturned",
           "cancel_and_wait", "FramePublisher")

log = logging.getLogger("gwcore.amqp")

#: The header a message dispatched again after a crash carries (issue 5, design.md §4).
POSSIBLE_DUPLICATE = "gwcore.PossibleDuplicate"

class PublishReturned(ConnectionError):
    """The broker returned a mandatory publish (``basic.return``): no queue took it."""

    @classmethod
    def of(cls, returned: Any) -> "PublishReturned":
        """From what aiormq hands back for a returned publish (its DeliveredMessage)."""
        frame = getattr(returned, "delivery", None)
        return cls(f"the broker returned a publish to {getattr(frame, 'routing_key', '?')!r}: "
                   f"{getattr(frame, 'reply_text', 'returned')} (no queue takes it)")


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

    def instance_args(self) -> dict[str, Any]:
        # Not exclusive: a reply that arrives while this instance reconnects must wait for it;
        # the queue goes 10 minutes after its last consumer did. A quorum queue, so that it does
        # not live on one node of a cluster: a classic queue cannot be declared, nor read, while
        # its node is down, and the instance could not set up its connection on another node.
        return {"x-queue-type": "quorum", "x-expires": 600_000}

    def dedup_args(self) -> dict[str, Any]:
        return {"x-queue-type": "stream", "x-max-age": f"{max(1, int(self.dedup_ttl))}s"}

    async def declare(self, channel: aio_pika.abc.AbstractChannel) -> None:
        """The endpoint's input queue and stream (:meth:`declare_instance`: the reply queue)."""
        await channel.declare_queue(self.input, durable=True, arguments=self.input_args())
        await channel.declare_queue(self.dedup, durable=True, arguments=self.dedup_args())

    async def declare_instance(self, connection: aio_pika.abc.AbstractConnection) -> aio_pika.abc.AbstractQueue:
        """This instance's reply queue, declared on a channel of its own, which the caller
        consumes it on. One an earlier gwcore declared as a classic queue (the broker refuses the
        quorum declaration: inequivalent arguments) is used as it is until it expires."""
        channel = await connection.channel()
        try:
            return await channel.declare_queue(self.instance, durable=True, arguments=self.instance_args())
        except aiormq.exceptions.ChannelPreconditionFailed:
            log.warning("broker: the reply queue %s is a classic queue (declared by an earlier gwcore): it is used "
                        "as it is, and is out of reach while its node is down; it becomes a quorum queue once it "
                        "has been deleted or has expired, 10 minutes after its instance stopped", self.instance)
        channel = await connection.channel()  # the refusal closed the first one
        return await channel.declare_queue(self.instance, durable=True, arguments={"x-expires": 600_000})

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


#: Seconds a connection must have lasted for the next one to be opened without a backoff.
_STEADY = 1.0
#: What opening a channel raises on a lost connection (aiormq: RuntimeError once it is closed).
_CHANNEL_ERRORS: tuple[type[BaseException], ...] = (*broker_errors, RuntimeError)
#: Link.renew_channel: the pause before a new channel, and how long the old one stays open.
_RENEW_PAUSE = 0.1
_OLD_CHANNEL_GRACE = 5.0


class Link:
    """One broker connection, re-opened after it drops, to one node of a list (a cluster).

    *urls*: one URL, or the URLs of a cluster's nodes (``Settings.amqp_urls``, or the
    comma-separated ``Settings.amqp_url``). The first connection goes to a node picked at random
    (the instances of an endpoint spread over the nodes, so one node's loss drops a share of their
    connections, not all); after that the nodes are tried in their order from there. A node that
    cannot be reached (refused, or no answer within 5 s) is passed over for the next one at once,
    and a lost connection is re-opened on the next node first: the node that dropped it is the
    likeliest to be gone. Only a round in which no node answered is followed by a pause (backoff
    up to 2 s) before the next round.

    ``on_up(connection)`` runs after each connect (declare, consume, elect); ``on_down()`` runs
    the moment the connection is lost (fencing). :attr:`connected` is exact: it turns false in
    the connection's close callback, before any other code of this process runs.
    """

    def __init__(self, urls: str | Sequence[str], name: str, on_up: Callable[[Any], Awaitable[None]],
                 on_down: Callable[[BaseException | None], None], *, first: int | None = None) -> None:
        """:param urls: the URLs, or ``Settings.amqp_url`` as it is (comma-separated).
        :param first: the index of the node to try first (default: one picked at random)."""
        self.urls: tuple[str, ...] = tuple(split_amqp_urls(urls) if isinstance(urls, str) else urls)
        if not self.urls:
            raise ValueError("no broker URL")
        self._next = random.randrange(len(self.urls)) if first is None else first % len(self.urls)
        self._at = self._next  # the index of the node connected to, or tried last
        #: the node connected to, or tried last
        self.url = self.urls[self._at]
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

    @property
    def node(self) -> str:
        """The node connected to (or tried last), without the password: for logs."""
        return redacted_url(self.url)

    def describe(self) -> str:
        """The broker's node(s), without passwords: for logs."""
        return ", ".join(redacted_url(u).partition("@")[2] or redacted_url(u) for u in self.urls)

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _connect(self) -> Any:
        """A connection to the first node, from :attr:`_next` on, that answers; None if none did
        (:attr:`last_error` says why)."""
        failed: list[str] = []
        for _ in range(len(self.urls)):
            self._at = self._next
            self.url = self.urls[self._at]
            self._next = (self._at + 1) % len(self.urls)
            try:
                conn = await aio_pika.connect(self.url, client_properties={"connection_name": self.name}, timeout=5)
            except broker_errors as exc:
                failed.append(f"{self.node}: {exc or type(exc).__name__}")
                continue
            if failed:
                log.warning("broker: cannot connect to %s; connected to %s instead", "; ".join(failed), self.node)
            return conn
        if len(self.urls) == 1:
            self.last_error = f"cannot connect to {failed[0]}"
        else:
            self.last_error = f"cannot connect to any of the {len(self.urls)} nodes ({'; '.join(failed)})"
        return None

    async def _run(self) -> None:
        delay = 0.05
        while not self._stopping:
            conn = await self._connect()
            if conn is None:
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
            where = self.node if len(self.urls) == 1 else f"{self.node} (node {self._at + 1} of {len(self.urls)})"
            up: float | None = None  # when the connection was set up, if it was
            try:
                await self.on_up(conn)
            except broker_errors as exc:
                log.warning("broker: setting up the connection to %s failed: %s", where, exc)
                await conn.close()
            except Exception:
                log.exception("broker: setting up the connection to %s failed", where)
                await conn.close()
            else:
                log.info("broker: connected to %s", where)
                up = asyncio.get_running_loop().time()
            await self._closed.wait()
            if self._stopping:
                break
            # A connection that served a while is re-opened at once; one that could not be set
            # up, or was closed right after (a cluster node whose stream replica is not running
            # yet closes a follower's connection), backs off as a failed connect does.
            if up is not None and asyncio.get_running_loop().time() - up >= _STEADY:
                delay = 0.05
            else:
                delay = min(2.0, delay * 2)
            # _connect starts at the next node: the one that dropped the connection (or could
            # not set it up) is the likeliest to be in trouble
            await asyncio.sleep(delay)

    def _lost(self, _conn: Any, exc: BaseException | None = None) -> None:
        if not self.connected:
            return
        self.connected = False
        self.connection = None
        if not self._stopping:
            self.last_error = f"connection to {self.node} lost: {exc or 'closed'}"
            log.warning("broker: %s", self.last_error)
        try:
            self.on_down(exc)
        finally:
            self._closed.set()

    def drop(self, reason: str) -> None:
        """Close the connection, if it is up, because of *reason*: something its setup started
        ended on a channel error while the connection stayed up (a cluster node whose stream
        replica is not running refuses a stream consumer with ``PRECONDITION_FAILED``), and
        cannot go on on this connection. The reconnect loop sets everything up again, on the next
        node. A no-op once the connection is gone, or while stopping."""
        conn = self.connection
        if conn is None or not self.connected or self._stopping:
            return
        log.warning("broker: closing the connection to %s: %s", self.node, reason)

        async def close() -> None:
            try:
                await conn.close()
            except BaseException:  # noqa: BLE001 - closed already
                pass

        asyncio.ensure_future(close())

    async def renew_channel(self, old: Any, **kwargs: Any) -> Any:
        """A new channel on this connection in place of *old*, on which the broker refused a
        publish; None if the connection went (or was replaced) meanwhile. *old* is closed a
        while later (whatever still runs on it ends first).

        Why: a channel's client of a quorum queue whose first publish to it falls in the queue's
        leader election (its leader's node has just died) can keep that dead leader: RabbitMQ
        3.10 refuses every later publish on the channel until the dead node is back, while a new
        channel's reach the new leader. After a short pause (the election is likely still under
        way), so a run of refusals does not become a storm of channels."""
        conn = self.connection
        await asyncio.sleep(_RENEW_PAUSE)
        if conn is None or self.connection is not conn:
            return None
        try:
            channel = await conn.channel(**kwargs)
        except _CHANNEL_ERRORS as exc:
            log.info("broker: opening a new channel failed: %s", exc)
            return None
        if self.connection is not conn:
            return None
        if old is not None:
            asyncio.get_running_loop().call_later(_OLD_CHANNEL_GRACE, _close_quietly, old)
        log.info("broker: publishing on a new channel (the broker refused a publish on the old one)")
        return channel

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


def _close_quietly(channel: Any) -> None:
    async def close() -> None:
        try:
            await channel.close()
        except BaseException:  # noqa: BLE001 - gone with its connection, or closed already
            pass

    asyncio.ensure_future(close())


class FramePublisher:
    """Publishes a whole dispatch batch as one write on an aiormq channel in confirm mode: the
    core builds every ``basic.publish`` of the batch (``core.encode_publishes``, about 1.5 µs a
    message against about 60 through pamqp), and aiormq keeps doing what it does well: the
    connection, its writer and its reader, and matching the broker's confirms (``multiple``
    included) to what is registered here for each publish (:class:`BatchConfirms`, one future a
    batch), and a returned publish to its tag by message id, under the channel's lock as its own
    ``basic_publish`` does. It relies on aiormq's channel attributes ``lock``, ``delivery_tag``,
    ``confirmations``, ``message_id_delivery_tag``, ``write_queue``, ``number`` and
    ``max_content_size`` (checked when made, and by tests/test_amqp_frames.py), so an aiormq that
    changes them fails loudly, not silently.
    """

    __slots__ = ("channel", "input_queue", "instance_prefix")

    def __init__(self, channel: Any, input_queue: str, instance_prefix: str) -> None:
        missing = [name for name in ("lock", "delivery_tag", "confirmations", "message_id_delivery_tag",
                                     "write_queue", "number", "max_content_size", "publisher_confirms",
                                     "create_future")
                   if not hasattr(channel, name)]
        if missing or not channel.publisher_confirms:
            raise RuntimeError(f"this aiormq channel cannot take gwcore's publishes (missing {missing or 'confirms'}); "
                               f"aiormq {getattr(aiormq, '__version__', '?')} is not a version gwcore supports")
        self.channel = channel
        self.input_queue = input_queue.encode()
        self.instance_prefix = instance_prefix.encode()

    async def publish(self, items: list[tuple[bytes, bool]]) -> tuple[asyncio.Future | None, list[int]]:
        """Publish ``(stored envelope, flagged)`` each; returns one future for the batch's
        confirms (None if nothing was published), which resolves once the broker has
        acknowledged every publish and fails on the first nack, return or channel error, and the
        indexes of the items the core could not encode (a header name longer than 128 bytes),
        which were not published."""
        ch = self.channel
        ids: list[str | None] = []
        frames, refused = core.encode_publishes(items, ch.number, ch.max_content_size, self.input_queue,
                                                self.instance_prefix, mandatory=True, ids=ids)
        n = len(items) - len(refused)
        if not n:
            return None, refused
        async with ch.lock:
            first = ch.delivery_tag + 1
            confirmations = ch.confirmations
            batch = ch.create_future()  # the channel's: rejected if the channel closes first
            # Mandatory: a publish no queue takes (the endpoint's queue deleted) comes back as a
            # basic.return, which aiormq matches to its tag by message_id, and fails the batch;
            # without it the broker would acknowledge the publish and drop the message.
            by_id = ch.message_id_delivery_tag
            counter = BatchConfirms(batch, n, by_id, ids, first)
            for tag, msg_id in zip(range(first, first + n), ids):
                confirmations[tag] = counter
                if msg_id is not None:
                    by_id[msg_id] = tag
            ch.delivery_tag += n
            drained = ch.create_future()
            try:
                await ch.write_queue.put(ChannelFrame(payload=frames, should_close=False, drain_future=drained))
            except BaseException:
                # the broker has not seen these: their tags are free again (as aiormq does)
                ch.delivery_tag -= n
                for tag in range(first, first + n):
                    confirmations.pop(tag, None)
                counter.forget()
                batch.cancel()
                raise
            await drained
        return batch, refused


class BatchConfirms:
    """What FramePublisher registers in aiormq's confirmation map for each publish of a batch,
    in place of a future per publish: the broker's acks count down to one future for the
    batch (a 75-message batch then costs one future and no gather, not 75 of each). aiormq
    calls one of ``set_result`` (an ack) or ``set_exception`` (a nack, or a returned message) for
    each tag, and ``done``/``cancelled`` to skip a confirmation nobody waits for any more. Once
    every tag has had its call, the batch's entries leave the channel's message_id map."""

    __slots__ = ("future", "left", "_by_id", "_ids", "_first")

    def __init__(self, future: asyncio.Future, n: int, by_id: dict | None = None,
                 ids: list[str | None] | None = None, first: int = 0) -> None:
        self.future = future
        self.left = n
        # aiormq's message_id -> delivery tag map (for returns), this batch's ids and first tag:
        # its entries go once the batch is over
        self._by_id = by_id
        self._ids = ids
        self._first = first

    def forget(self) -> None:
        """Drop this batch's entries from the channel's message_id map (those still its own)."""
        by_id, ids, self._by_id = self._by_id, self._ids, None
        if by_id is None or ids is None:
            return
        tag = self._first
        for msg_id in ids:
            if msg_id is not None and by_id.get(msg_id) == tag:
                del by_id[msg_id]
            tag += 1

    def done(self) -> bool:
        # a failed batch still takes its other tags' acks quietly; only a cancelled one is over
        return self.future.cancelled()

    def cancelled(self) -> bool:
        return self.future.cancelled()

    def set_result(self, frame: Any) -> None:
        if not isinstance(frame, Basic.Ack):
            # a returned message, on a channel that does not raise for returns (aiormq then
            # "confirms" the publish with the message itself)
            self.set_exception(PublishReturned.of(frame))
            return
        self.left -= 1
        if not self.left:
            self.forget()
            if not self.future.done():
                self.future.set_result(frame)

    def set_exception(self, exc: BaseException) -> None:
        self.left -= 1
        if not self.left:
            self.forget()
        if not self.future.done():
            self.future.set_exception(exc)
