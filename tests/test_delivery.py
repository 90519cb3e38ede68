"""What the local queue and selected mode's broker queue share (gwcore/delivery.py): counting, the
intercept hook, TimeToBeReceived, when a failed message is tried again and when it is poisoned."""

from __future__ import annotations

import asyncio
import logging

from gwcore.consumer import LocalQueue, Message
from gwcore.delivery import Delivery, DeliveryQueue
from gwcore.records import now_ms
from gwcore.selected import BrokerMessage, BrokerQueue


class Queue(DeliveryQueue):
    FAMILIES = (("test_acked_total", "Acked.", "acked"), ("test_failed_total", "Failed.", "failed"))
    _log = logging.getLogger("test")

    def __init__(self, max_attempts: int) -> None:
        super().__init__(max_attempts)
        self.store = None
        self.settled: list[tuple[str, bool]] = []

    async def _ack(self, msg, count=True):
        self.settled.append((msg.id, count))
        self.acked += count

    def _release(self, msg, error):
        self.settled.append((msg.id, self._failed(msg, error)))


class Item(Delivery):
    __slots__ = ()

    def __init__(self, queue, msg_id, attempt=1, expiry_ms=0, headers=None):
        self.id, self.attempt, self.expiry_ms, self.headers = msg_id, attempt, expiry_ms, headers or {}
        self._queue, self._settled = queue, False


def test_both_queues_and_their_messages_share_one_base():
    assert issubclass(LocalQueue, DeliveryQueue) and issubclass(BrokerQueue, DeliveryQueue)
    assert issubclass(Message, Delivery) and issubclass(BrokerMessage, Delivery)


def test_expired_and_intercepted_messages_are_settled_not_delivered():
    q = Queue(3)
    q.intercept = lambda msg: msg.headers.get("reply") == "yes"

    async def main():
        assert await q._taken(Item(q, "late", expiry_ms=now_ms() - 1000))
        assert await q._taken(Item(q, "reply", headers={"reply": "yes"}))
        assert not await q._taken(Item(q, "plain", expiry_ms=now_ms() + 60_000))

    asyncio.run(main())
    assert q.settled == [("late", False), ("reply", True)]
    assert (q.expired, q.acked, q.delivered) == (1, 1, 0)


def test_a_failed_message_is_tried_again_until_max_attempts_then_poisoned():
    q = Queue(3)
    for attempt in (1, 2, 3):
        Item(q, f"m{attempt}", attempt=attempt).release(ValueError("boom"))
    assert q.settled[:2] == [("m1", None), ("m2", None)]
    assert q.settled[2] == ("m3", "handler failed 3 times: ValueError('boom')")
    assert (q.failed, q.poisoned) == (3, 1)


def test_a_message_is_settled_once():
    q = Queue(3)
    msg = Item(q, "m")
    asyncio.run(msg.ack())
    msg.release(ValueError("late"))
    asyncio.run(msg.ack())
    assert q.settled == [("m", True)] and q.failed == 0
    assert (msg.delivery_count, msg.redelivered) == (1, False)


def test_each_queue_names_its_own_metric_families():
    q = Queue(3)
    q.acked, q.failed = 4, 2
    assert [(m.name, m.samples[0].value) for m in q.metrics()] == [("test_acked", 4), ("test_failed", 2)]
    assert [m.name for m in BrokerQueue(None, None, 5).metrics()] == [
        "gwcore_broker_consumer_delivered", "gwcore_broker_consumer_acked"]
    assert [m.name for m in LocalQueue(None, None).metrics()] == [
        f"gwcore_consumer_{n}" for n in ("delivered", "acked", "failed", "expired", "poisoned")]


class _Incoming:
    """What aio-pika hands the broker queue's consumer callback, counting how it is settled."""

    def __init__(self, msg_id: str, headers: dict) -> None:
        self.message_id, self.headers, self.body, self.redelivered = msg_id, headers, b"{}", False
        self.acks = self.nacks = 0

    async def ack(self) -> None:
        self.acks += 1

    async def nack(self, requeue: bool = True) -> None:
        self.nacks += 1


def test_a_broker_message_settled_instead_of_delivered_is_not_settled_again():
    """An intercepted reply (a request() waiting for it) and an expired message are acknowledged
    by the broker queue itself; a later ack() or release() on the same message must not reach the
    broker again (a second ack of a delivery tag makes RabbitMQ close the channel, and release()
    counted a failure and could put a delivered reply in the error store)."""
    taken = []

    class Queue(BrokerQueue):
        def _discarding(self, msg):
            taken.append(msg)

    q = Queue(None, None, max_attempts=1)
    q.intercept = lambda msg: taken.append(msg) or msg.id == "reply"
    reply = _Incoming("reply", {})
    late = _Incoming("late", {"gwcore.ExpiryMs": str(now_ms() - 1000)})

    async def main():
        await q.deliver(reply)
        await q.deliver(late)
        for msg in taken:
            await msg.ack()
            msg.release(ValueError("after the fact"))
        await asyncio.sleep(0.05)       # a release settles in a task of its own

    asyncio.run(main())
    assert [m.id for m in taken] == ["reply", "late"]
    assert (reply.acks, reply.nacks, late.acks, late.nacks) == (1, 0, 1, 0)
    assert (q.failed, q.poisoned, q.acked, q.expired) == (0, 0, 1, 1)
