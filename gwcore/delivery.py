"""What the two consumer queues share: the local queue (:class:`gwcore.consumer.LocalQueue`) and
selected mode's broker queue (:class:`gwcore.selected.BrokerQueue`).

Both hand their consumers messages with one interface (:class:`Delivery`: ``await ack()``,
``release(error)``, ``attempt``, ``databus`` ...), and both decide the same things the same way
(:class:`DeliveryQueue`): what they count, that a message past its TimeToBeReceived is discarded
and one the intercept hook takes (a reply a ``request()`` waits for) is acknowledged instead of
delivered, and when a failed message is tried again and when it goes to the error store. A queue
keeps only what its backing does: where messages come from, how an acknowledgement is made
durable, how a failed message comes back and where a poisoned one is kept.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, ClassVar

from . import databus
from .metrics import Families, counter
from .records import now_ms

__all__ = ("Delivery", "DeliveryQueue")


class Delivery:
    """One message handed to a consumer, whichever queue it came from.

    :ivar id: the NServiceBus message id (``NServiceBus.Id``).
    :ivar headers: message headers, names as sent (``NServiceBus.Header.`` prefix removed).
    :ivar body: the message body.
    :ivar attempt: 1 for the first delivery, more for redeliveries after failures.
    """

    __slots__ = ("id", "headers", "body", "seq", "expiry_ms", "accepted_ms", "attempt", "_queue", "_settled")

    id: str
    headers: dict[str, str]
    body: bytes
    seq: int
    expiry_ms: int
    accepted_ms: int
    attempt: int
    _queue: DeliveryQueue
    _settled: bool

    @property
    def delivery_count(self) -> int:
        """Deliveries of this message so far, this one included (the attempt here)."""
        return self.attempt

    @property
    def redelivered(self) -> bool:
        """True when this message was delivered before (an earlier attempt failed)."""
        return self.attempt > 1

    @property
    def databus(self) -> dict[str, databus.Blob]:
        """The claim-check properties: header name (``NServiceBus.DataBus.<sender's key>``) ->
        :class:`gwcore.databus.Blob` (``.path``, ``.open()``) of the local blob it names."""
        return databus.message_blobs(self._queue.store.blob_dir, self.headers)

    async def ack(self) -> None:
        """Remove the message from its queue (durably) once it has been handled."""
        if not self._settled:
            self._settled = True
            await self._queue._ack(self)

    def release(self, error: BaseException | None = None) -> None:
        """Hand the message back for a later redelivery (after a failed attempt)."""
        if not self._settled:
            self._settled = True
            self._queue._release(self, error)


class DeliveryQueue:
    """The counters, the intercept hook and the retry/poison decision of a consumer queue.

    A subclass sets :attr:`store` (whose blob dir :attr:`Delivery.databus` reads), :attr:`FAMILIES`
    and ``_log``, and implements :meth:`_ack` and :meth:`_release`.
    """

    #: The metric families :meth:`metrics` reports: (name, help, the counter attribute).
    FAMILIES: ClassVar[tuple[tuple[str, str, str], ...]] = ()
    #: Where the queue's decisions are logged.
    _log: ClassVar[logging.Logger]
    store: Any

    def __init__(self, max_attempts: int) -> None:
        self.max_attempts = max_attempts
        #: Called with each message before it is delivered; True = taken (e.g. a reply a
        #: request() waits for): it is acknowledged and not delivered.
        self.intercept: Callable[[Any], bool] | None = None
        self.delivered = 0
        self.acked = 0
        self.failed = 0
        self.expired = 0
        self.poisoned = 0

    def metrics(self) -> Families:
        return [counter(name, doc, getattr(self, attr)) for name, doc, attr in self.FAMILIES]

    async def _taken(self, msg: Any) -> bool:
        """Settle *msg* here rather than deliver it, when it is past its TimeToBeReceived
        (discarded: NServiceBus semantics, not received in time) or the intercept hook takes it
        (acknowledged). True when it was."""
        if msg.expiry_ms and msg.expiry_ms < now_ms():
            self._discarding(msg)
            self.expired += 1
            msg._settled = True  # a later ack() or release() of it is a no-op, as for any settled one
            await self._ack(msg, count=False)
            return True
        if self.intercept is not None and self.intercept(msg):
            msg._settled = True
            await self._ack(msg)
            return True
        return False

    def _discarding(self, msg: Any) -> None:
        """An expired message is about to be discarded (a queue may say so)."""

    def _failed(self, msg: Any, error: BaseException | None) -> str | None:
        """Count a failed attempt at *msg*: None when it is tried again, else (it has had
        ``max_attempts``) the reason it goes to the error store with."""
        self.failed += 1
        if msg.attempt < self.max_attempts:
            return None
        self.poisoned += 1
        reason = f"handler failed {msg.attempt} times: {error!r}"
        self._log.error("message %s moved to the error store: %s", msg.id, reason)
        return reason

    async def _ack(self, msg: Any, count: bool = True) -> None:
        """Acknowledge *msg* durably (*count*: as a handled message)."""
        raise NotImplementedError

    def _release(self, msg: Any, error: BaseException | None) -> None:
        """A failed attempt at *msg*: have it delivered again, or keep it in the error store."""
        raise NotImplementedError
