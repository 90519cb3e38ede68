"""Framer and envelope codec micro benchmarks on NServiceBus-shaped input: the §8.1 request of
protocol.md (22 headers as a Gateway 4+ sender encodes them) with a 1 KiB body and its Content-MD5.

    pytest bench/bench_framing.py --benchmark-only
"""

from __future__ import annotations

import pytest

import reference_impl  # tests/ is on sys.path through bench/conftest.py
from test_framing import MSG_ID
from test_framing import PLAIN_SUBMIT_MESSAGE_HEADERS as MESSAGE_HEADERS  # the §8.1 headers

from gwcore import _dedup

NOW = 1_787_000_000_000

BODY = (b'{"Sku":"HQ-0001","Price":12.5,"Note":"' + b"x" * 1024)[:1022] + b'"}'


def submit_headers(body: bytes = BODY, msg_id: str = MSG_ID) -> list[bytes]:
    """The flat raw header list httptools would deliver for protocol.md §8.1."""
    pairs = [
        ("Host", "localhost:25900"),
        ("NServiceBus.Id", msg_id),
        ("NServiceBus.CorrelationId", msg_id),
        ("NServiceBus.ReplyToAddress", "Headquarters"),
    ]
    pairs += [("NServiceBus.Header." + name, value) for name, value in MESSAGE_HEADERS.items()]
    pairs += [
        ("NServiceBus.Gateway", "True"),
        ("NServiceBus.CallType", "SingleCallSubmit"),
        ("Content-Type", "application/x-www-form-urlencoded"),
        ("Content-MD5", _dedup.content_md5(body)),
        ("Content-Length", str(len(body))),
    ]
    flat: list[bytes] = []
    for name, value in pairs:
        flat += [_dedup.url_encode(name).encode(), _dedup.url_encode(value).encode()]
    return flat


@pytest.fixture(scope="module")
def headers() -> list[bytes]:
    return submit_headers()


@pytest.mark.benchmark(group="framer")
@pytest.mark.parametrize("impl", ["extension", "reference"])
def bench_frame_submit(benchmark, headers, impl):
    framer = (_dedup if impl == "extension" else reference_impl).Framer("RemoteSite")
    env = benchmark(framer.frame, headers, BODY, None, NOW)
    assert env.id == MSG_ID and env.body == BODY and len(env.headers) == len(MESSAGE_HEADERS)


@pytest.mark.benchmark(group="framer")
def bench_frame_submit_without_md5(benchmark, headers):
    no_md5 = [item for i, item in enumerate(headers) if headers[i - (i & 1)] != b"Content-MD5"]
    env = benchmark(_dedup.Framer("RemoteSite").frame, no_md5, BODY, None, NOW)
    assert env.id == MSG_ID


@pytest.mark.benchmark(group="framer")
def bench_frame_md5_mismatch(benchmark, headers):
    result = benchmark(_dedup.Framer("RemoteSite").frame, headers, BODY + b" ", None, NOW)
    assert result.status == 412


@pytest.mark.benchmark(group="codec")
def bench_url_decode_value(benchmark):
    raw = _dedup.url_encode(MESSAGE_HEADERS["NServiceBus.EnclosedMessageTypes"]).encode()
    assert benchmark(_dedup.url_decode, raw) == MESSAGE_HEADERS["NServiceBus.EnclosedMessageTypes"]


@pytest.mark.benchmark(group="codec")
def bench_content_md5_1k(benchmark):
    assert len(benchmark(_dedup.content_md5, BODY)) == 24


@pytest.mark.benchmark(group="codec")
def bench_encode_envelope(benchmark):
    framed = benchmark(_dedup.encode_envelope, MSG_ID, MESSAGE_HEADERS, BODY, 0, NOW)
    assert framed.startswith(b"GW\x01")


@pytest.mark.benchmark(group="codec")
def bench_decode_envelope(benchmark):
    framed = _dedup.encode_envelope(MSG_ID, MESSAGE_HEADERS, BODY, 0, NOW)
    assert benchmark(_dedup.decode_envelope, framed) == (MSG_ID, MESSAGE_HEADERS, BODY, 0, NOW)
