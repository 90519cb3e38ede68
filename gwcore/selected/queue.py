"""The broker-backed consumer queue of selected mode: deliveries from the endpoint's input queue
(and this instance's reply queue) as :class:`BrokerMessage` s, what ``Gateway.messages()``
returns and ``GWCORE_HANDLER`` runs on.

The counters, the intercept hook and the retry/poison decision are the local queue's
(gwcore/delivery.py); what is the broker's here: a delivery is settled with an ack, a failed one
is handed back with a nack for the broker to redeliver (the quorum queue counts the attempts), and
a poisoned one is kept in this instance's error store.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator

from .._core import core
from ..amqp import broker_errors, from_amqp
from ..delivery import Delivery, DeliveryQueue
from ..records import append_errors, now_ms
from ..store import Store, Writer

__all__ = ("BrokerMessage", "BrokerQueue")

log = logging.getLogger("gwcore.selected")


class BrokerMessage(Delivery):
    """A message from the endpoint's input queue (or this instance's reply queue), with the
    interface of :class:`gwcore.consumer.Message`: ``await ack()``, ``release(error)``.

    Its :attr:`databus` blobs are files in this instance's blob dir, which must be the one the
    leader wrote them to (``GWCORE_BLOB_DIR`` shared by the instances) for a consumer on another
    instance."""

    __slots__ = ("_incoming",)

    def __init__(self, queue: "BrokerQueue", incoming: Any) -> None:
        self.id, self.headers, self.body, self.expiry_ms = from_amqp(incoming)
        self.seq = 0
        self.accepted_ms = 0
        # quorum queues count redeliveries in x-delivery-count
        self.attempt = int((incoming.headers or {}).get("x-delivery-count", 0) or 0) + 1
        self._incoming = incoming
        self._settled = False
        self._queue = queue

    @property
    def redelivered(self) -> bool:
        return self.attempt > 1 or bool(self._incoming.redelivered)

    @property
    def possible_duplicate(self) -> bool:
        """True when gwcore dispatched this message again after a crash (it may be there twice)."""
        return self.headers.get("gwcore.PossibleDuplicate") == "true"

    def __repr__(self) -> str:
        return f"<BrokerMessage id={self.id!r} attempt={self.attempt}>"


class BrokerQueue(DeliveryQueue):
    """Deliveries from the broker as an async iterator (what ``Gateway.messages()`` returns and
    ``GWCORE_HANDLER`` runs on in selected mode)."""

    FAMILIES = (
        ("gwcore_broker_consumer_delivered_total", "Deliveries from the broker to handlers.", "delivered"),
        ("gwcore_broker_consumer_acked_total", "Deliveries acknowledged to the broker.", "acked"),
    )
    _log = log

    def __init__(self, store: Store, writer: Writer, max_attempts: int) -> None:
        super().__init__(max_attempts)
        self.store = store
        self.writer = writer
        self._items: asyncio.Queue[BrokerMessage | None] = asyncio.Queue()

    async def deliver(self, incoming: Any) -> None:
        """The consumer callback of the input and reply queues."""
        msg = BrokerMessage(self, incoming)
        if not await self._taken(msg):
            self._items.put_nowait(msg)

    def close(self) -> None:
        self._items.put_nowait(None)

    def __aiter__(self) -> AsyncIterator[BrokerMessage]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[BrokerMessage]:
        while True:
            msg = await self._items.get()
            if msg is None:
                return
            self.delivered += 1
            yield msg

    async def _ack(self, msg: BrokerMessage, count: bool = True) -> None:
        await self._settle(msg, None, count)

    def _release(self, msg: BrokerMessage, error: BaseException | None) -> None:
        asyncio.ensure_future(self._settle(msg, error or Exception("released")))

    async def _settle(self, msg: BrokerMessage, error: BaseException | None, count: bool = True) -> None:
        incoming = msg._incoming
        try:
            if error is None:
                await incoming.ack()
                self.acked += count
                return
            reason = self._failed(msg, error)
            if reason is None:
                log.warning("message %s: attempt %d failed (%r); the broker redelivers it", msg.id, msg.attempt, error)
                await incoming.nack(requeue=True)
                return
            await self._poison(msg, reason)
            await incoming.ack()
        except broker_errors as exc:
            # the channel went with its connection: the broker redelivers the message
            log.info("message %s: settling failed (%s); the broker redelivers it", msg.id, exc)

    async def _poison(self, msg: BrokerMessage, reason: str) -> None:
        """Keep a message whose handler kept failing in this instance's error store."""
        framed = core.encode_envelope(msg.id, msg.headers, msg.body, msg.expiry_ms, now_ms())
        store = self.store

        await self.writer.call(lambda txn: append_errors(txn, store.errors, [framed], reason))
