"""The sending side's framing: a stored envelope to the protocol.md §1.3 header block, in the core
(``encode_submit``) against the readable Python reference (``egress.wire_headers``).

    pytest bench/bench_egress.py --benchmark-only
"""

from __future__ import annotations

import pytest

from gwcore._core import core
from gwcore.egress import wire_headers

BODY = b'{"Sku":"HQ-0001","Price":12.5}'.ljust(1024, b" ")
HEADERS = {
    "NServiceBus.MessageId": "0b1f6f0e-5d8a-4f43-b1d5-b3a400c1d2e3",
    "NServiceBus.MessageIntent": "Send",
    "NServiceBus.ConversationId": "5c0e9a47-3a5e-4d0c-9a1c-b3a400c1d2e3",
    "NServiceBus.CorrelationId": "0b1f6f0e-5d8a-4f43-b1d5-b3a400c1d2e3",
    "NServiceBus.ReplyToAddress": "Headquarters",
    "NServiceBus.OriginatingEndpoint": "Headquarters",
    "NServiceBus.OriginatingMachine": "HQ-SRV01",
    "NServiceBus.ContentType": "application/json",
    "NServiceBus.EnclosedMessageTypes": "Shared.UpdatePrice, Shared, Version=1.0.0.0, Culture=neutral, PublicKeyToken=null",
    "NServiceBus.Version": "10.2.8",
    "NServiceBus.TimeSent": "2026-08-20 10:15:30:123456 Z",
    "NServiceBus.DestinationSites": "RemoteSite",
    "NServiceBus.OriginatingSite": "http,http://localhost:25899/Headquarters/",
}
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
