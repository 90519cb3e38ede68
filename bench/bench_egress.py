"""The sending side's framing: a stored envelope to the protocol.md §1.3 header block, in the core
(``encode_submit``) against the readable Python reference (``egress.wire_headers``).

    pytest bench/bench_egress.py --benchmark-only
"""

from __future__ import annotations

import pytest

from gwcore._core import core
from gwcore.egress import wire_headers
from test_framing import PLAIN_SUBMIT_MESSAGE_HEADERS as HEADERS  # the §8.1 headers

BODY = b'{"Sku":"HQ-0001","Price":12.5}'.ljust(1024, b" ")
FRAMED = core.encode_envelope(HEADERS["NServiceBus.MessageId"], HEADERS, BODY, 0, 1)


@pytest.mark.benchmark(group="egress-framing")
def bench_encode_submit(benchmark):
    msg_id, body, _expiry, block = benchmark(core.encode_submit, FRAMED)
    assert body == BODY and block.endswith(b"\r\n")


@pytest.mark.benchmark(group="egress-framing")
def bench_wire_headers_reference(benchmark):
    def reference():
        msg_id, headers, body, _e, _a = core.decode_envelope(FRAMED)
        return b"".join(n + b": " + v + b"\r\n" for n, v in wire_headers(msg_id, headers, body))

    assert benchmark(reference) == core.encode_submit(FRAMED)[3]
