"""The protocol on a fake transport: every split point of a request, byte at a time, pipelines
cut anywhere. No sockets: the point is that framing never depends on how TCP chunks arrive."""

from __future__ import annotations

import asyncio
import re
import uuid

from httpclient import nsb_request

from gwcore import Settings
from gwcore.http import HTTPProtocol, HTTPState


class MockTransport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False
        self.paused = False

    def write(self, data: bytes) -> None:
        self.out += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_extra_info(self, name: str, default=None):
        return ("127.0.0.1", 40000) if name == "peername" else default


class RecordingWriter:
    """Stands in for the writer thread: answers at once and keeps what it was given."""

    pending = 0

    def __init__(self) -> None:
        self.envelopes: list = []

    def ingest_then(self, envelope, done) -> None:
        self.envelopes.append(envelope)
        done(True, True)


def make_protocol(**overrides):
    settings = Settings.from_env({}, endpoint="RemoteSite", receive_channels="http://127.0.0.1:0/RemoteSite/",
                                 **overrides)
    writer = RecordingWriter()
    state = HTTPState(settings, writer, channel_paths=["/RemoteSite/"])
    state.active = True
    proto = HTTPProtocol(state)
    transport = MockTransport()
    proto.connection_made(transport)
    return proto, transport, writer


def statuses(raw: bytes) -> list[int]:
    # responses follow each other directly (a body is not followed by CRLF)
    return [int(m.group(1)) for m in re.finditer(rb"HTTP/1\.1 (\d{3}) ", raw)]


def feed(pieces) -> tuple:
    async def main():
        proto, transport, writer = make_protocol()
        for piece in pieces:
            proto.data_received(piece)
        return transport, writer

    return asyncio.run(main())


def test_every_split_point_of_a_submit_gives_the_same_envelope():
    req = nsb_request("0b1f6f0e-5d8a-4f43-b1d5-b3a400c1d2e3")
    whole_t, whole_w = feed([req])
    assert statuses(bytes(whole_t.out)) == [200]
    expected = whole_w.envelopes[0]
    for cut in range(1, len(req)):
        transport, writer = feed([req[:cut], req[cut:]])
        assert statuses(bytes(transport.out)) == [200], cut
        env = writer.envelopes[0]
        assert (env.id, env.key, env.headers, env.body, env.expiry_ms) == \
            (expected.id, expected.key, expected.headers, expected.body, expected.expiry_ms), cut


def test_byte_at_a_time_pipeline_of_good_and_bad_requests():
    ids = [str(uuid.uuid4()) for _ in range(4)]
    reqs = [nsb_request(ids[0]), nsb_request(ids[1], call_type="Ack"), nsb_request(ids[2], md5="x"),
            nsb_request(ids[3])]
    stream = b"".join(reqs)
    transport, writer = feed([stream[i:i + 1] for i in range(len(stream))])
    assert statuses(bytes(transport.out)) == [200, 400, 412, 200]
    assert [e.id for e in writer.envelopes] == [ids[0], ids[3]]


def test_pipeline_cut_at_random_points():
    import random

    rng = random.Random(7)
    ids = [str(uuid.uuid4()) for _ in range(30)]
    stream = b"".join(nsb_request(i) for i in ids)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(stream)), 15))
        pieces = [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)])]
        transport, writer = feed(pieces)
        assert statuses(bytes(transport.out)) == [200] * 30
        assert [e.id for e in writer.envelopes] == ids
