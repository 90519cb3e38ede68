"""Selected mode's publish path (gwcore/selected/dispatcher.py with the core's frames,
gwcore/amqp.py FramePublisher), on the real broker: what a remote sender can put in a message
must never stop the dispatcher, the outbox is bounded, and a load of messages arrives whole with
two batches in flight."""

from __future__ import annotations

import asyncio
import time
import uuid

from broker import drain, endpoint  # noqa: F401  (a fixture)
from test_selected import only_instance, port_of, selected_settings, submit, until

from gwcore._core import core
from gwcore.records import dedup_key


def test_a_reply_address_too_long_for_an_amqp_property_does_not_stop_the_dispatcher(tmp_path, endpoint, run):
    """A 300-byte NServiceBus.ReplyToAddress: pamqp cannot write it as a reply_to property (it
    raised, and the dispatcher tried that batch again forever, holding up every message after
    it). The core leaves the property out; the header carries it, and the next message follows."""
    long_reply = "Q" * 300

    async def main():
        async with only_instance(selected_settings(tmp_path, endpoint, "i1")) as gw:
            first = asyncio.ensure_future(submit(port_of(gw), endpoint, "long",
                                                 [("NServiceBus.Header.NServiceBus.ReplyToAddress", long_reply)]))
            assert await asyncio.wait_for(first, 10) == (200, "OK")
            assert await asyncio.wait_for(submit(port_of(gw), endpoint, "next"), 10) == (200, "OK")

    run(main())
    got = drain(endpoint)
    assert [m[0] for m in got] == ["long", "next"]
    assert got[0][1]["NServiceBus.ReplyToAddress"] == long_reply


def test_a_header_name_amqp_cannot_carry_is_refused_before_it_is_stored(tmp_path, endpoint, run):
    """A header name of 129 bytes cannot be a key of the broker's header table (pamqp cut it to
    128 bytes, another header than was sent): 400 with the reason, nothing stored, and the id is
    not taken (a corrected resend is stored)."""
    name = "NServiceBus.Header.X" + "n" * 128

    async def main():
        async with only_instance(selected_settings(tmp_path, endpoint, "i1")) as gw:
            status, reason = await submit(port_of(gw), endpoint, "bad", [(name, "v")])
            assert status == 400 and "header name of 129 bytes" in reason and "128" in reason
            assert gw.store.counts()["queue"] == 0 and not gw.selected.undone
            assert await submit(port_of(gw), endpoint, "bad") == (200, "OK")

    run(main())
    assert [m[0] for m in drain(endpoint)] == ["bad"]


def test_the_outbox_is_bounded_with_ack_stored(tmp_path, endpoint, run):
    """GWCORE_OUTBOX_MAX=5 and a dispatcher that is not getting through: five submits are
    answered 200 (stored), the sixth 503 outbox full with nothing stored, and once the dispatcher
    runs again all five reach the queue and the outbox takes submits again."""
    async def main():
        async with only_instance(selected_settings(tmp_path, endpoint, "i1", ack="stored", outbox_max=5)) as gw:
            dispatcher = gw.selected.dispatcher
            await dispatcher.stop()                      # the broker does not take anything now
            for i in range(5):
                assert await submit(port_of(gw), endpoint, f"m{i}") == (200, "OK")
            status, reason = await submit(port_of(gw), endpoint, "m5")
            assert status == 503 and "outbox full" in reason and "GWCORE_OUTBOX_MAX=5" in reason
            assert gw.store.counts()["queue"] == 5
            assert await submit(port_of(gw), endpoint, "m0") == (200, "OK")   # a duplicate is still answered
            dispatcher.start()
            dispatcher.kick()
            await until(lambda: not gw.selected.undone, 10, "the outbox to drain")
            assert await submit(port_of(gw), endpoint, "m5") == (200, "OK")
            await until(lambda: not gw.selected.undone, 10, "the last one")
            text = gw.render_metrics()
            assert "gwcore_outbox_refused_full_total 1.0" in text and "gwcore_outbox_max 5.0" in text

    run(main())
    assert sorted(m[0] for m in drain(endpoint)) == [f"m{i}" for i in range(6)]


def test_the_memory_outbox_is_bounded_by_count_with_ack_dispatched(tmp_path, endpoint, run):
    """With ack=dispatched the outbox is in memory: GWCORE_OUTBOX_MAX=3 and a dispatcher that
    is not getting through hold three submits (not answered yet), the fourth is 503 outbox full
    at once with nothing kept, and once the dispatcher runs the three are answered 200. A job of
    the writer's own pending meanwhile (a replica flush) is no part of the memory outbox: counting
    it refused the third submit (seen in CI)."""
    async def main():
        async with only_instance(selected_settings(tmp_path, endpoint, "i1", outbox_max=3)) as gw:
            dispatcher = gw.selected.dispatcher
            await dispatcher.stop()
            port = port_of(gw)
            busy = dispatcher.writer.call(lambda _txn: time.sleep(0.5))  # the writer has a job of its own
            held = [asyncio.ensure_future(submit(port, endpoint, f"m{i}")) for i in range(3)]
            await until(lambda: len(gw.selected.undone) == 3 or any(f.done() for f in held), 10,
                        "three submits in the outbox")
            assert not any(f.done() for f in held), [f.result() for f in held if f.done()]
            assert dispatcher.writer.pending >= 1
            await busy
            status, reason = await asyncio.wait_for(submit(port, endpoint, "m3"), 10)
            assert status == 503 and "outbox full" in reason and "GWCORE_OUTBOX_MAX=3" in reason
            assert len(gw.selected.undone) == 3 and not any(f.done() for f in held)
            dispatcher.start()
            dispatcher.kick()
            assert await asyncio.wait_for(asyncio.gather(*held), 10) == [(200, "OK")] * 3
            assert dispatcher.mem_bytes == 0 and not dispatcher._mem

    run(main())
    assert sorted(m[0] for m in drain(endpoint)) == ["m0", "m1", "m2"]


def test_the_memory_outbox_is_bounded_by_bytes_with_ack_dispatched(tmp_path, endpoint, run):
    """GWCORE_OUTBOX_MAX_BYTES=64KiB with a dispatcher that is not getting through: 30 KiB
    bodies fill it after two (whose senders then give up: their messages stay, within the bound),
    the third is 503 naming the bound, with nothing kept; the level is a metric; a body larger
    than the whole bound is still taken into the empty outbox, so no message is refused for good."""
    body = b'{"Blob":"' + b"x" * (30 * 1024) + b'"}'
    big = b'{"Blob":"' + b"y" * (100 * 1024) + b'"}'

    async def main():
        settings = selected_settings(tmp_path, endpoint, "i1", outbox_max_bytes=64 * 1024)
        async with only_instance(settings) as gw:
            dispatcher = gw.selected.dispatcher
            await dispatcher.stop()
            port = port_of(gw)
            held = [asyncio.ensure_future(submit(port, endpoint, f"b{i}", body=body)) for i in range(2)]
            await until(lambda: len(gw.selected.undone) == 2, 10, "two submits in the outbox")
            for f in held:            # the senders give up: their messages stay in the outbox
                f.cancel()
            level = dispatcher.mem_bytes
            assert 2 * len(body) < level < 64 * 1024
            status, reason = await asyncio.wait_for(submit(port, endpoint, "b2", body=body), 10)
            assert status == 503 and "outbox full" in reason and "GWCORE_OUTBOX_MAX_BYTES=65536" in reason
            assert dispatcher.mem_bytes == level and len(gw.selected.undone) == 2
            text = gw.render_metrics()
            assert f"gwcore_outbox_memory_bytes {float(level)}" in text
            assert "gwcore_outbox_refused_full_total 1.0" in text
            dispatcher.start()
            dispatcher.kick()
            await until(lambda: not gw.selected.undone, 10, "the outbox to drain")
            assert dispatcher.mem_bytes == 0
            assert await asyncio.wait_for(submit(port, endpoint, "b0", body=body), 10) == (200, "OK")  # a duplicate
            assert await asyncio.wait_for(submit(port, endpoint, "big", body=big), 10) == (200, "OK")
            assert dispatcher.mem_bytes == 0

    run(main())
    assert sorted(m[0] for m in drain(endpoint)) == ["b0", "b1", "big"]


async def send_all(port, endpoint, ids, senders, answered=None):
    """Submit every id, from ``senders`` concurrent senders each sending its share one after the
    other; the statuses, and ``answered(id)`` called as each 200 comes."""
    statuses = []

    async def sender(mine):
        for msg_id in mine:
            status = (await submit(port, endpoint, msg_id))[0]
            statuses.append(status)
            if status == 200 and answered is not None:
                answered(msg_id)

    await asyncio.gather(*(sender(ids[i::senders]) for i in range(senders)))
    return statuses


def test_a_load_arrives_whole_through_the_pipelined_dispatcher(tmp_path, endpoint, run):
    """3,000 submits from 64 concurrent senders with ack=dispatched: every 200 is in the queue
    once, unmarked, in no more than the order each sender sent its own."""
    n, senders = 3000, 64
    ids = [str(uuid.uuid4()) for _ in range(n)]

    async def main():
        async with only_instance(selected_settings(tmp_path, endpoint, "i1")) as gw:
            statuses = await send_all(port_of(gw), endpoint, ids, senders)
            assert statuses.count(200) == n
            assert gw.selected.dispatched == n and not gw.selected.undone

    run(main())
    got = drain(endpoint)
    assert sorted(m[0] for m in got) == sorted(ids)
    assert not any("gwcore.PossibleDuplicate" in h for _m, h, _b in got)


def test_no_message_is_published_before_its_intent_nor_answered_before_its_done(tmp_path, endpoint, run):
    """What a new leader can tell from the stream rests on two orders, checked here under 64
    concurrent senders: each message is published only after a stream record with its intent was
    confirmed, and its submitter is answered 200 only after a record saying it is done was
    confirmed. The appends and the publishes go on confirm channels of their own (an append
    waits behind no batch of publishes on the broker's side), so the orders hold across two
    channels."""
    n, senders = 2000, 64
    ids = [str(uuid.uuid4()) for _ in range(n)]

    async def main():
        async with only_instance(selected_settings(tmp_path, endpoint, "i1")) as gw:
            dispatcher, stream = gw.selected.dispatcher, gw.selected.stream
            intended: set[bytes] = set()
            done: set[bytes] = set()
            early: list[bytes] = []  # published without a confirmed intent
            late: list[str] = []  # answered 200 without a confirmed done
            append_batch = stream.append_batch

            async def recording_append(dones, intents):
                await append_batch(dones, intents)
                intended.update(intents)
                done.update(dones)

            stream.append_batch = recording_append

            class CheckingPublisher:  # the channel's FramePublisher, each publish checked first
                def __init__(self, inner):
                    self.inner = inner

                async def publish(self, items):
                    keys = [core.envelope_key(framed, dispatcher._key_prefix) for framed, _marked in items]
                    early.extend(k for k in keys if k not in intended)
                    return await self.inner.publish(items)

            assert dispatcher._frames.channel.number != stream._raw.number
            frames = dispatcher._frames = CheckingPublisher(dispatcher._frames)

            def answered(msg_id):
                if dedup_key(endpoint, msg_id) not in done:
                    late.append(msg_id)

            statuses = await send_all(port_of(gw), endpoint, ids, senders, answered)
            assert statuses.count(200) == n
            assert dispatcher._frames is frames  # the same channel all along: every publish was seen
            assert not early and not late
            assert gw.selected.dispatched == n and not gw.selected.undone

    run(main())
    assert sorted(m[0] for m in drain(endpoint)) == sorted(ids)
