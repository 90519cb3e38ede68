"""What site signatures cost per submit (docs/security.md): scheme v1 against v2, on the sender (the
forwarder's signing of an encode_submit block) and on the receiver (the framer's extra work for a
signed request, and the Verifier's check of it). The request is protocol.md §8.1's (22 headers)
with a 1 KiB body and its Content-MD5, as in bench_framing.py.

    pytest bench/bench_site_auth.py --benchmark-only
"""

from __future__ import annotations

import time

import pytest
from test_framing import MSG_ID

from bench_framing import BODY, submit_headers
from gwcore import auth
from gwcore._core import core

SECRET = b"a-site-secret-of-some-length-0123"
TARGET = "/RemoteSite/"
NOW_MS = 1_787_000_000_000


def _block(flat: list[bytes]) -> bytes:
    return b"".join(flat[i] + b": " + flat[i + 1] + b"\r\n" for i in range(0, len(flat), 2)
                    if flat[i] not in (b"Host", b"Content-Type", b"Content-Length"))


@pytest.fixture(scope="module")
def block() -> bytes:
    """The §8.1 header lines a forwarder signs (no Host, Content-Type, Content-Length)."""
    return _block(submit_headers())


def _flat(block: bytes) -> list[bytes]:
    out: list[bytes] = []
    for line in block.split(b"\r\n"):
        if line:
            out += line.split(b": ", 1)
    return out


def _v1(block: bytes, now: float) -> bytes:
    return block + b"".join(n + b": " + v + b"\r\n" for n, v in auth.signature_headers(
        SECRET, "hq", "POST", TARGET, MSG_ID, BODY, now))


def _v2(block: bytes, now: float) -> bytes:
    return block + auth.signature_lines(SECRET, "hq", "POST", TARGET, block, auth.body_digest(BODY), now)


@pytest.mark.benchmark(group="site-auth-sign")
@pytest.mark.parametrize("scheme", ["v1", "v2"])
def bench_sign_a_submit(benchmark, block, scheme):
    # what the forwarder adds per message: the body's SHA-256, the date, the HMAC (v2: the lines)
    sign = _v1 if scheme == "v1" else _v2
    signed = benchmark(sign, block, time.time())
    assert b"gwcore-Signature: " + scheme.encode() + b".hq." in signed


@pytest.mark.benchmark(group="site-auth-frame")
@pytest.mark.parametrize("scheme", ["unsigned", "v1", "v2"])
def bench_frame_a_signed_submit(benchmark, block, scheme):
    # the framer with signatures on: v2 also builds the covered header lines (auth_headers)
    flat = _flat(block if scheme == "unsigned" else (_v1 if scheme == "v1" else _v2)(block, time.time()))
    framer = core.Framer("RemoteSite", signatures=scheme != "unsigned")
    env = benchmark(framer.frame, flat, BODY, None, NOW_MS)
    assert env.id == MSG_ID and (env.auth_headers is not None) == (scheme == "v2")


@pytest.mark.benchmark(group="site-auth-verify")
@pytest.mark.parametrize("scheme", ["v1", "v2"])
def bench_verify_a_submit(benchmark, block, scheme):
    # Verifier.check of a framed submit: the body's SHA-256, the HMAC, the date window
    now = time.time()
    head = b"POST " + TARGET.encode() + b" HTTP/1.1\r\nHost: localhost\r\n" + (_v1 if scheme == "v1" else _v2)(block, now)
    parser = core.RequestParser(core.Framer("RemoteSite", signatures=True), [TARGET.lower().encode()],
                                max_headers=100, max_header_bytes=65536, max_body=1 << 20, allow_get=False)
    (_kind, _keep_alive, env), = parser.feed(head + b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY, NOW_MS)
    verifier = auth.Verifier([("hq", SECRET)], 300.0, False, clock=lambda: now)
    assert benchmark(verifier.check, env) is None
