"""A databus part on a request that ends its connection (``Connection: close``, or HTTP/1.0
without keep-alive, which is how nginx talks to its upstreams by default) is received, recorded
and answered like any other part; then the connection closes."""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest
from httpclient import Client, read_response
from nginx import Nginx
from procs import free_port
from test_databus import addr, blob_files, part_request, submit_request

from gwcore.databus import intake


def _closing(req: bytes, how: str) -> bytes:
    head, sep, body = req.partition(b"\r\n\r\n")
    if how == "close":
        head += b"\r\nConnection: close"
    elif how == "http10":
        head = head.replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1)
    elif how == "http10-close":
        head = head.replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1) + b"\r\nConnection: close"
    else:
        raise ValueError(how)
    return head + sep + body


async def _send_closing(host: str, port: int, req: bytes, pieces: int = 1):
    """Send *req* on a new connection in *pieces* writes; the answer, and whether the server
    closed the connection after it."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        step = max(1, len(req) // pieces)
        for i in range(0, len(req), step):
            writer.write(req[i:i + step])
            await writer.drain()
            if pieces > 1:
                await asyncio.sleep(0.005)
        response = await asyncio.wait_for(read_response(reader), 10)
        rest = await asyncio.wait_for(reader.read(), 5)
        return response, rest == b""
    finally:
        writer.close()


@pytest.mark.parametrize("how", ["close", "http10", "http10-close"])
@pytest.mark.parametrize("size", [10, 100_000, 3 << 20], ids=["10B", "100KB", "3MiB"])
def test_a_part_that_ends_its_connection_is_recorded_and_answered_200(run, gateway_factory, how, size):
    """Sizes: framed whole by the parser (10 B), streamed through the parser (100 KB), and read
    straight into the blob buffers by the part reader (3 MiB)."""

    async def main():
        async with gateway_factory() as gw:
            msg_id = str(uuid.uuid4())
            blob = os.urandom(size)
            response, closed = await _send_closing(*addr(gw), _closing(part_request(msg_id, "k", blob), how),
                                                   pieces=1 if size < 1000 else 8)
            assert (response.status, response.reason) == (200, "OK")
            assert closed
            async with Client(*addr(gw)) as c:
                assert (await c.request(submit_request(msg_id, ("k",)))).status == 200
            m = await asyncio.wait_for(gw.messages().get(), 5)
            assert m.databus["NServiceBus.DataBus.k"].read() == blob

    run(main())


def test_a_refused_part_that_ends_its_connection_is_answered_and_leaves_no_file(run, gateway_factory):
    async def main():
        async with gateway_factory() as gw:
            blob = os.urandom(2 << 20)
            req = _closing(part_request(str(uuid.uuid4()), "k", blob, md5="1B2M2Y8AsgTpgAmY7PhCfg%3D%3D"), "close")
            response, closed = await _send_closing(*addr(gw), req, pieces=8)
            assert response.status == 412
            assert closed
            for _ in range(300):
                if not blob_files(gw.settings.data_dir):
                    break
                await asyncio.sleep(0.01)
            assert blob_files(gw.settings.data_dir) == []

    run(main())


def test_the_part_reader_hands_a_closing_connection_back_and_closes_it(run, gateway_factory):
    """A large part with Connection: close is read by the part reader like any other."""

    async def main():
        async with gateway_factory() as gw:
            blob = os.urandom(4 << 20)
            req = _closing(part_request(str(uuid.uuid4()), "k", blob), "close")
            reader, writer = await asyncio.open_connection(*addr(gw))
            writer.write(req[:len(req) - len(blob) + (1 << 20)])
            await writer.drain()
            (state,) = gw.states
            for _ in range(300):
                if state.connections and isinstance(next(iter(state.connections)).transport.get_protocol(),
                                                     intake._PartBody):
                    break
                await asyncio.sleep(0.01)
            assert isinstance(next(iter(state.connections)).transport.get_protocol(), intake._PartBody)
            writer.write(req[len(req) - len(blob) + (1 << 20):])
            await writer.drain()
            r = await asyncio.wait_for(read_response(reader), 10)
            assert r.status == 200
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()

    run(main())


def test_parts_through_nginx_with_its_default_upstream_settings(run, gateway_factory, tmp_path):
    """nginx's defaults: HTTP/1.0 to the upstream with ``Connection: close``, the body buffered
    first. Parts and their submits sent through it are all accepted and the messages have their
    blobs."""

    async def main():
        async with gateway_factory(max_body=16 << 20) as gw:
            proxy = Nginx(str(tmp_path / "nginx"), free_port(), [addr(gw)[1]], upstream_defaults=True).start()
            try:
                big, small = str(uuid.uuid4()), str(uuid.uuid4())
                blob = os.urandom(3 << 20)
                async with Client("127.0.0.1", proxy.port) as c:
                    for req in (part_request(big, "k", blob), part_request(small, "s", b"tiny"),
                                submit_request(big, ("k",)), submit_request(small, ("s",))):
                        r = await c.request(req)
                        assert (r.status, r.reason) == (200, "OK")
                got = {}
                for _ in range(2):
                    m = await asyncio.wait_for(gw.messages().get(), 5)
                    got[m.id] = m
                assert got[big].databus["NServiceBus.DataBus.k"].read() == blob
                assert got[small].databus["NServiceBus.DataBus.s"].read() == b"tiny"
            finally:
                proxy.stop()
            assert [status for _, status, _ in proxy.answers()] == [200, 200, 200, 200]

    run(main())
