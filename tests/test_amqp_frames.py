"""The basic.publish frames the core builds from stored envelopes (``encode_publishes``,
gwcore/_parts/amqp.pyx) against pamqp's encoding of what ``gwcore.amqp.to_amqp`` describes: the
same bytes for any envelope, routing, flag and frame size, and the cases where the two part ways on
purpose (a property longer than an AMQP short string, a header name longer than a field name)."""

from __future__ import annotations

import pytest
from broker import endpoint  # noqa: F401  (a fixture: a fresh endpoint on the test broker)
from hypothesis import given, settings, strategies as st

from pamqp import body as pbody, commands, frame, header  # the broker extra, gwcore[rabbitmq]

from gwcore import _dedup as core
from gwcore.amqp import to_amqp
from gwcore.errors import FramingError

INPUT = "Sales"
PREFIX = "Sales.gwcore.instance."


def reference(framed: bytes, flagged: bool, channel: int, max_content: int, mandatory: bool = False) -> bytes:
    """pamqp's frames for the publish gwcore.amqp describes (*mandatory*: to the input queue only)."""
    msg_id, headers, body, expiry_ms, _accepted = core.decode_envelope(framed)
    props, body = to_amqp(msg_id, headers, body, expiry_ms, flagged)
    for name in ("message_id", "correlation_id", "reply_to", "content_type"):
        # the documented difference: a value longer than a short string is no property (pamqp
        # cannot write it; the header table has it)
        value = getattr(props, name)
        if value is not None and len(value.encode()) > 255:
            setattr(props, name, None)
    to = headers.get("RouteTo") or headers.get("NServiceBus.Header.RouteTo")
    key = to if to is not None and to.startswith(PREFIX) else INPUT
    out = frame.marshal(commands.Basic.Publish(exchange="", routing_key=key, mandatory=mandatory and key == INPUT),
                        channel)
    out += frame.marshal(header.ContentHeader(0, len(body), props), channel)
    for i in range(0, len(body), max_content):
        out += frame.marshal(pbody.ContentBody(body[i:i + max_content]), channel)
    return out


def encode(items, channel=1, max_content=131_064, **kw):
    return core.encode_publishes(items, channel, max_content, INPUT.encode(), PREFIX.encode(), **kw)


_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
_NAMES = st.one_of(st.sampled_from(["NServiceBus.CorrelationId", "NServiceBus.ReplyToAddress",
                                    "NServiceBus.ContentType", "RouteTo", "NServiceBus.Header.RouteTo",
                                    "gwcore.PossibleDuplicate", "gwcore.ExpiryMs", "NServiceBus.MessageId"]),
                   st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30))
_VALUES = st.one_of(_TEXT, st.just(""), st.sampled_from([PREFIX + "a1", PREFIX, "Other.gwcore.instance.x"]),
                    st.text(st.characters(blacklist_categories=("Cs",)), min_size=200, max_size=3000))  # long


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.text(st.characters(blacklist_categories=("Cs",)), max_size=60),  # ids: 1-4 bytes a char
                          st.lists(st.tuples(_NAMES, _VALUES), max_size=60),   # many headers too
                          st.binary(max_size=700), st.sampled_from([0, 1, 1_787_000_000_123]), st.booleans()),
                min_size=1, max_size=4),
       st.integers(1, 65535), st.sampled_from([1, 7, 256, 131_064]), st.booleans())
def test_the_frames_are_what_pamqp_writes_for_the_reference_publish(messages, channel, max_content, mandatory):
    """Also: *mandatory* sets the bit on publishes to the input queue (not on replies routed to
    an instance queue), and *ids* gets each publish's message_id property (None if too long)."""
    items, want = [], b""
    for msg_id, headers, body, expiry_ms, flagged in messages:
        framed = core.encode_envelope(msg_id, headers, body, expiry_ms, 1)
        items.append((framed, flagged))
        want += reference(framed, flagged, channel, max_content, mandatory)
    ids: list = []
    got, refused = encode(items, channel, max_content, mandatory=mandatory, ids=ids)
    assert refused == []
    assert got == want
    assert ids == [m if len(m.encode()) <= 255 else None for m, *_rest in messages]


def test_a_typical_nservicebus_message():
    headers = [("NServiceBus.MessageId", "7c1f"), ("NServiceBus.CorrelationId", "7c1f"),
               ("NServiceBus.ContentType", "application/json"), ("NServiceBus.ReplyToAddress", "HQ"),
               ("NServiceBus.EnclosedMessageTypes", "Shop.Order, Shop")] + [(f"X-{i}", "v" * i) for i in range(15)]
    framed = core.encode_envelope("7c1f", headers, b"{}" * 512, 1_787_000_000_000, 1)
    got, refused = encode([(framed, False), (framed, True)])
    assert refused == [] and got == reference(framed, False, 1, 131_064) + reference(framed, True, 1, 131_064)


def test_a_property_longer_than_a_short_string_stays_in_the_header_table_only():
    """pamqp cannot write a reply_to of 300 bytes (it raises, and a dispatcher using it would try
    that message again forever); the core leaves the property out and keeps the header."""
    long_reply = "R" * 300
    framed = core.encode_envelope("m" * 256, [("NServiceBus.CorrelationId", "c"),
                                              ("NServiceBus.ReplyToAddress", long_reply)], b"b", 0, 1)
    with pytest.raises(TypeError):      # pamqp with to_amqp's properties as they are
        frame.marshal(header.ContentHeader(0, 1, to_amqp(*core.decode_envelope(framed)[:4], False)[0]), 1)
    got, refused = encode([(framed, False)])
    assert got == reference(framed, False, 1, 1000)   # the reference leaves it out likewise
    assert refused == []
    assert long_reply.encode() in got and b"m" * 256 not in got[:-1]   # the id in no property
    short = core.encode_envelope("m", [("NServiceBus.ReplyToAddress", "R")], b"b", 0, 1)
    method, rest = got.split(b"\xce", 1)
    assert method == reference(short, False, 1, 1000).split(b"\xce", 1)[0]
    flags = int.from_bytes(rest[7 + 12:7 + 14], "big")
    assert flags & (1 << 9) == 0 and flags & (1 << 7) == 0    # no reply_to, no message_id
    assert flags & (1 << 13) and flags & (1 << 12) and flags & (1 << 10)  # headers, delivery mode, correlation


def test_a_header_name_longer_than_a_field_name_is_not_encoded_and_said_so():
    """pamqp truncates such a name to 128 bytes (another header than was sent); the core leaves
    that message out and returns its index, the others are encoded."""
    good = core.encode_envelope("a", [("h", "v")], b"x", 0, 1)
    bad = core.encode_envelope("b", [("n" * 129, "v")], b"x", 0, 1)
    at_limit = core.encode_envelope("c", [("n" * 128, "v")], b"x", 0, 1)
    got, refused = encode([(good, False), (bad, False), (at_limit, False)])
    assert refused == [1]
    assert got == reference(good, False, 1, 1000) + reference(at_limit, False, 1, 1000)


def test_a_broken_envelope_is_a_framing_error():
    framed = core.encode_envelope("a", [], b"x", 0, 1)
    with pytest.raises(FramingError):
        encode([(framed[:-1], False)])
    with pytest.raises(ValueError):
        core.encode_publishes([], 1, 0, b"q", b"p")
    assert encode([]) == (b"", [])


# -- on a real broker -----------------------------------------------------------------------------

def test_frame_publisher_on_a_real_broker(endpoint):
    """Three dispatch batches through FramePublisher on a confirm channel: every publish
    confirmed, each message in its queue with what to_amqp says (id, correlation, reply-to,
    content type, headers, persistent), a reply routed to an instance queue, the message with a
    too-long header name left out and said so."""
    import asyncio

    import aio_pika
    from broker import AMQP_URL, drain

    from gwcore.amqp import FramePublisher, Topology

    topology = Topology(endpoint, "i0", 60)
    headers = [("NServiceBus.CorrelationId", "corr"), ("NServiceBus.ReplyToAddress", "HQ"),
               ("NServiceBus.ContentType", "application/json"), ("Shop.Note", "ünïcode")]
    body = b"{}" * 512
    big = b"x" * 300_000            # three body frames at the default frame_max (131,072)
    sent: list[str] = []

    async def main():
        conn = await aio_pika.connect(AMQP_URL)
        try:
            ch = await conn.channel(publisher_confirms=True)
            await topology.declare(ch)
            replies = await topology.declare_instance(conn)
            raw = await ch.get_underlay_channel()
            pub = FramePublisher(raw, topology.input, topology.instance_prefix)
            for batch in range(3):
                items = []
                for i in range(50):
                    msg_id = f"m{batch}-{i}"
                    sent.append(msg_id)
                    items.append((core.encode_envelope(msg_id, headers, big if i == 0 else body,
                                                       1_787_000_000_000 if i % 2 else 0, 1), i % 3 == 0))
                if batch == 1:
                    items.append((core.encode_envelope("too-long", [("n" * 129, "v")], b"", 0, 1), False))
                    items.append((core.encode_envelope("reply", [("RouteTo", topology.instance)], b"r", 0, 1),
                                  False))
                tags = range(raw.delivery_tag + 1, raw.delivery_tag + 1 + len(items) - (batch == 1))
                confirms, refused = await pub.publish(items)
                assert refused == ([50] if batch == 1 else [])
                assert type(await confirms).__name__ == "Ack"
                # one future for the batch, resolved only once every publish of it was acknowledged
                assert not any(tag in raw.confirmations for tag in tags)
            reply = await replies.get(timeout=5)
            assert (reply.message_id, reply.body) == ("reply", b"r")
            await reply.ack()
        finally:
            await conn.close()

    asyncio.run(main())
    got = drain(endpoint)
    assert [m for m, _h, _b in got] == sent
    for msg_id, h, b in got:
        i = int(msg_id.split("-")[1])
        assert b == (big if i == 0 else body)
        assert h["NServiceBus.CorrelationId"] == "corr" and h["Shop.Note"] == "ünïcode"
        assert (h.get("gwcore.PossibleDuplicate") == "true") == (i % 3 == 0)
        assert (h.get("gwcore.ExpiryMs") == "1787000000000") == (i % 2 == 1)


def test_batch_confirms_count_down_to_one_future():
    """What FramePublisher puts in aiormq's confirmation map for each publish of a batch: the
    batch's future resolves at the last ack, not before; a nack (set_exception) or a returned
    message (aiormq "confirms" it with the message itself) fails it at once, and the calls after
    it are taken quietly; a cancelled batch is one aiormq skips; once every tag had its call,
    the batch's message ids leave the channel's map (those still its own)."""
    import asyncio

    from gwcore.amqp import BatchConfirms, PublishReturned

    ack = commands.Basic.Ack

    async def main():
        loop = asyncio.get_running_loop()
        by_id = {"a": 10, "b": 11, "c": 99}  # "c": a later publish of the same id took the entry
        ok = BatchConfirms(loop.create_future(), 3, by_id, ["a", "b", "c"], 10)
        for i in range(2):
            ok.set_result(ack(10 + i))
            assert not ok.future.done() and not ok.done()
        assert by_id == {"a": 10, "b": 11, "c": 99}
        ok.set_result(ack(12))
        assert (await ok.future).delivery_tag == 12
        assert by_id == {"c": 99}

        nacked = BatchConfirms(loop.create_future(), 3)
        nacked.set_result(ack(1))
        nacked.set_exception(ConnectionError("nack"))
        nacked.set_result(ack(3))  # after the failure: no InvalidStateError, still failed
        assert not nacked.done()   # aiormq would log each later ack as ignored otherwise
        with pytest.raises(ConnectionError, match="nack"):
            await nacked.future

        class Returned:  # what aiormq hands back for a basic.return: the message, its frame
            delivery = commands.Basic.Return(312, "NO_ROUTE", "", "Sales")

        returned = BatchConfirms(loop.create_future(), 2)
        returned.set_result(Returned())
        with pytest.raises(PublishReturned, match="'Sales': NO_ROUTE"):
            await returned.future

        gone = BatchConfirms(loop.create_future(), 2)
        gone.future.cancel()
        assert gone.done() and gone.cancelled()

    asyncio.run(main())
