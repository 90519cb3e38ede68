"""In-process HTTP round trips over loopback: 64 pipelined NServiceBus submits per round.

Compares fsync'd group commit with GWCORE_STORE_SYNC=0 on the same loop, so the cost of
durability shows up as a ratio. The wrk load driver (bench/load/run_load.py) is the end-to-end
measurement; this one is for quick A/B work on the Python path.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
import uvloop
from httpclient import nsb_request, read_response

from gwcore import Gateway, Settings

PIPELINE = 64
BODY = b"x" * 1024


@pytest.fixture(params=[True, False], ids=["fsync", "nosync"])
def running_gateway(request, tmp_path):
    loop = uvloop.new_event_loop()
    settings = Settings.from_env({}, data_dir=str(tmp_path / "store"), endpoint="RemoteSite",
                                 receive_channels="http://127.0.0.1:0/RemoteSite/", store_sync=request.param)
    gw = Gateway(settings)
    loop.run_until_complete(gw.start())
    host, port = gw.addresses[0]
    reader, writer = loop.run_until_complete(asyncio.open_connection(host, port))
    yield loop, reader, writer
    writer.close()
    loop.run_until_complete(gw.stop())
    loop.close()


@pytest.mark.benchmark(group="http-pipelined-64")
def bench_pipelined_submits(benchmark, running_gateway):
    loop, reader, writer = running_gateway

    async def round_trip() -> None:
        writer.write(b"".join(nsb_request(str(uuid.uuid4()), body=BODY) for _ in range(PIPELINE)))
        for _ in range(PIPELINE):
            r = await read_response(reader)
            assert r.status == 200

    benchmark(lambda: loop.run_until_complete(round_trip()))
