"""Limits per request and per client, on real loopback sockets (asyncio and uvloop): a request's
deadline that later bytes cannot move (``GWCORE_HTTP_REQUEST_TIMEOUT``, then
``GWCORE_HTTP_MIN_RATE``), connections per address and the oldest idle connection closed to make
room at ``GWCORE_HTTP_MAX_CONNECTIONS``, and streamed databus parts per address.

Distinct client addresses are 127.0.0.2, 127.0.0.3, ...: Linux routes all of 127/8 to the loopback
interface, so a client socket bound to one of them before it connects is a peer of its own.
Nothing here asserts a speed: the clients send at rates far from the limits, and every wait is a
poll with a generous deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid

from httpclient import Client, get, nsb_request, read_response
from test_databus import blob_files, part_request, submit_request

KIB = 1 << 10
MIB = 1 << 20
A, B = "127.0.0.2", "127.0.0.3"  # two client addresses


def addr(gw):
    return gw.addresses[0]


def new_id() -> str:
    return str(uuid.uuid4())


async def until(predicate, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def tmp_files(gw) -> list[str]:
    return [n for n in blob_files(gw.settings.data_dir) if n.startswith(".tmp-")]


async def trickle(c: Client, every: float) -> None:
    """One byte every *every* seconds until cancelled or the server closes."""
    with contextlib.suppress(ConnectionError, OSError):
        while True:
            c.writer.write(b"x")
            await c.writer.drain()
            await asyncio.sleep(every)


async def answer_while_trickling(c: Client, every: float, timeout: float = 30.0):
    """The answer the server gives while *c* trickles (the server's deadline, not ours, ends it:
    *timeout* is only there so that a server that never answers fails the test)."""
    task = asyncio.ensure_future(trickle(c, every))
    try:
        return await asyncio.wait_for(c.response(), timeout)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def metrics(gw) -> str:
    return (await get(*addr(gw), "/metrics")).body.decode()


# -- a deadline that later bytes cannot move ----------------------------------------------------------

def test_a_trickled_part_is_cut_off_and_leaves_no_blob_file(run, gateway_factory):
    """256 KiB, then a byte every half second: cut off at about the request timeout plus what
    256 KiB buys at the minimum rate (1 s + 2 s here), however long the trickle would go on."""
    async def main():
        async with gateway_factory(http_request_timeout=1.0, http_min_rate=128 * KIB) as gw:
            req = part_request(new_id(), "k", os.urandom(MIB))
            head_and_some = req[:len(req) - MIB + 256 * KIB]
            async with Client(*addr(gw)) as c:
                await c.send(head_and_some)
                await until(lambda: tmp_files(gw), "the part's blob file")
                trickled = asyncio.ensure_future(answer_while_trickling(c, 0.5))
                # meanwhile others are served
                async with Client(*addr(gw)) as other:
                    assert (await other.request(nsb_request(new_id()))).status == 200
                r = await trickled
                assert r.status == 408, (r.status, r.reason)
                assert "GWCORE_HTTP_MIN_RATE" in r.reason and r.body == r.reason.encode()
                assert r.headers.get("connection") == "close"
                assert await c.closed(timeout=10)
            await until(lambda: not blob_files(gw.settings.data_dir), "the cut-off part's file to be removed")
            assert gw.store.counts()["databus_parts"] == 0
            assert gw.states[0].peer_parts == {}
            assert "gwcore_http_requests_too_slow_total 1" in await metrics(gw)
            assert 'gwcore_http_requests_total{status="408"} 1' in await metrics(gw)

    run(main())


def test_a_trickled_submit_body_is_cut_off_below_the_min_rate(run, gateway_factory):
    async def main():
        async with gateway_factory(http_request_timeout=1.0, http_min_rate=64 * KIB) as gw:
            req = nsb_request(new_id(), body=b"b" * (512 * KIB))
            async with Client(*addr(gw)) as c:
                await c.send(req[:len(req) - 384 * KIB])
                r = await answer_while_trickling(c, 0.3)
                assert r.status == 408 and "GWCORE_HTTP_MIN_RATE" in r.reason, (r.status, r.reason)
            assert gw.store.counts()["queue"] == 0 and gw.store.counts()["dedup"] == 0

    run(main())


def test_a_trickled_batch_is_cut_off_and_none_of_its_messages_stored(run, gateway_factory):
    """A batch is a request like any other: 200 messages whose body stops coming at the minimum
    rate is 408 and closed, and not one of its messages (complete in the bytes sent) is stored."""
    from test_batch import _post_batch, block_of

    from gwcore import _dedup

    async def main():
        async with gateway_factory(http_request_timeout=1.0, http_min_rate=256 * KIB) as gw:
            body = b"b" * 2048
            batch = _dedup.encode_batch([(block_of(new_id(), body), body) for _ in range(200)])
            req = _post_batch("/RemoteSite/", batch)
            async with Client(*addr(gw)) as c:
                await c.send(req[:len(req) - 64 * KIB])   # the first ~170 messages whole
                r = await answer_while_trickling(c, 0.3)
                assert r.status == 408 and "GWCORE_HTTP_MIN_RATE" in r.reason, (r.status, r.reason)
                assert r.headers.get("connection") == "close"
                assert await c.closed(timeout=10)
            assert gw.store.counts()["queue"] == 0 and gw.store.counts()["dedup"] == 0
            assert "gwcore_http_requests_too_slow_total 1" in await metrics(gw)

    run(main())


def test_a_submit_above_the_min_rate_may_take_longer_than_the_request_timeout(run, gateway_factory):
    """480 KiB at about 160 KiB/s, ten times the minimum rate: three times the request timeout,
    and stored."""
    async def main():
        async with gateway_factory(http_request_timeout=1.0, http_min_rate=16 * KIB) as gw:
            msg, body = new_id(), os.urandom(480 * KIB)
            req = nsb_request(msg, body=body)
            async with Client(*addr(gw)) as c:
                started = time.monotonic()
                for i in range(0, len(req), 16 * KIB):
                    await c.send(req[i:i + 16 * KIB])
                    await asyncio.sleep(0.1)
                took = time.monotonic() - started
                r = await c.response()
                assert (r.status, r.reason) == (200, "OK")
            assert took > 1.0  # longer than the request timeout indeed
            got = await asyncio.wait_for(gw.messages().get(), 5)
            assert (got.id, got.body) == (msg, body)

    run(main())


def test_a_fast_large_part_is_stored_though_it_takes_longer_than_the_request_timeout(run, gateway_factory):
    async def main():
        async with gateway_factory(http_request_timeout=0.5) as gw:  # the default minimum rate
            msg, blob = new_id(), os.urandom(8 * MIB)
            req = part_request(msg, "k", blob)
            async with Client(*addr(gw)) as c:
                started = time.monotonic()
                for i in range(0, len(req), MIB):
                    await c.send(req[i:i + MIB])
                    await asyncio.sleep(0.1)
                took = time.monotonic() - started
                assert (await c.response()).status == 200
                assert (await c.request(submit_request(msg, ("k",)))).status == 200
            assert took > 0.5
            got = await asyncio.wait_for(gw.messages().get(), 5)
            with got.databus["NServiceBus.DataBus.k"].open() as f:
                assert f.read() == blob

    run(main())


def test_time_a_part_waits_for_the_disk_is_not_counted_against_its_client(run, gateway_factory, monkeypatch):
    """While the blob threads lag behind the socket the connection is not read (back-pressure):
    however long that lasts, it is not the client's time."""
    from gwcore.databus.sink import BlobSink

    lagging = {"on": False}
    real = BlobSink.behind
    monkeypatch.setattr(BlobSink, "behind", property(lambda sink: lagging["on"] or real.fget(sink)))

    async def main():
        async with gateway_factory(http_request_timeout=0.5) as gw:
            msg, blob = new_id(), os.urandom(4 * MIB)
            req = part_request(msg, "k", blob)
            rest = len(req) - len(blob) + 256 * KIB
            async with Client(*addr(gw)) as c:
                await c.send(req[:rest])
                await until(lambda: tmp_files(gw), "the part's blob file")
                (conn,) = gw.states[0].connections
                lagging["on"] = True  # the disk is slow: the next read pauses the connection
                c.writer.write(req[rest:])
                await until(lambda: conn.reading_paused, "the connection to pause")
                await asyncio.sleep(2.0)  # four times the request timeout, paused
                assert conn.in_request and not conn.closing
                lagging["on"] = False
                conn._update_reading()  # what the sink's drain callback does
                await c.writer.drain()
                r = await c.response()
                assert (r.status, r.reason) == (200, "OK")
                assert (await c.request(submit_request(msg, ("k",)))).status == 200
            got = await asyncio.wait_for(gw.messages().get(), 5)
            with got.databus["NServiceBus.DataBus.k"].open() as f:
                assert f.read() == blob

    run(main())


# -- connections per address, and room made at the limit ----------------------------------------------

def test_one_address_cannot_take_every_connection(run, gateway_factory):
    async def main():
        async with gateway_factory(http_max_connections=50, http_max_connections_per_peer=20) as gw:
            state = gw.states[0]
            async with contextlib.AsyncExitStack() as stack:
                for i in range(60):  # idle connections from A, one after the other
                    c = await stack.enter_async_context(Client(*addr(gw), local=A))
                    await until(lambda: len(state.connections) + state.rejected_connections == i + 1,
                                "the server to take the connection in or refuse it")
                    if i >= 20:
                        r = await asyncio.wait_for(read_response(c.reader), 5)
                        assert (r.status, r.reason) == (503, "Service Unavailable: too many connections from "
                                                             "your address (GWCORE_HTTP_MAX_CONNECTIONS_PER_PEER)")
                        assert r.headers.get("connection") == "close" and await c.closed()
                assert state.peer_connections == {A: 20} and state.rejected_per_peer == 40
                # another address is served all the same, on new connections each time
                for _ in range(5):
                    async with Client(*addr(gw), local=B) as c:
                        r = await c.request(nsb_request(new_id()))
                        assert (r.status, r.reason) == (200, "OK")
                text = await metrics(gw)
                assert "gwcore_http_connections_refused_per_peer_total 40" in text
                assert "gwcore_http_connections_refused_total 40" in text
            await until(lambda: not state.connections and not state.peer_connections and not state.idle_connections,
                        "every connection to be forgotten")

    run(main())


def test_at_the_limit_the_oldest_idle_connection_makes_room(run, gateway_factory):
    async def main():
        async with gateway_factory(http_max_connections=5) as gw:
            state = gw.states[0]
            async with contextlib.AsyncExitStack() as stack:
                idle = []
                for _ in range(5):  # five connections from A, idle in this order
                    c = await stack.enter_async_context(Client(*addr(gw), local=A))
                    assert (await c.request(nsb_request(new_id()))).status == 200
                    idle.append(c)
                assert len(state.connections) == 5
                # a newcomer from B is served: the connection idle the longest is closed for it
                async with Client(*addr(gw), local=B) as newcomer:
                    assert (await newcomer.request(nsb_request(new_id()))).status == 200
                    assert await idle[0].closed()
                    # the others are open; a request makes idle[1] the newest idle one
                    assert (await idle[1].request(nsb_request(new_id()))).status == 200
                    async with Client(*addr(gw), local=B) as second:
                        assert (await second.request(nsb_request(new_id()))).status == 200
                        assert await idle[2].closed()
                        assert state.idle_closed == 2 and len(state.connections) == 5
                        # idle the longest first: the order each went idle in
                        order = [conn.transport.get_extra_info("peername")[1] for conn in state.idle_connections]
                        assert order == [c.writer.get_extra_info("sockname")[1]
                                         for c in (idle[3], idle[4], newcomer, idle[1], second)]
                        # now every connection busy (a request begun on each): a newcomer is refused
                        busy = [idle[1], idle[3], idle[4], newcomer, second]
                        reqs = [nsb_request(new_id()) for _ in busy]
                        for c, req in zip(busy, reqs):
                            await c.send(req[:-3])
                        await until(lambda: sum(conn.in_request for conn in state.connections) == 5,
                                    "five requests begun")
                        assert not state.idle_connections
                        async with Client(*addr(gw), local=B) as refused:
                            r = await asyncio.wait_for(read_response(refused.reader), 5)
                            assert (r.status, r.reason) == (
                                503, "Service Unavailable: too many connections (GWCORE_HTTP_MAX_CONNECTIONS)")
                            assert await refused.closed()
                        # and nothing of the busy ones was lost
                        for c, req in zip(busy, reqs):
                            await c.send(req[-3:])
                            assert (await c.response()).status == 200
                text = await metrics(gw)
                assert "gwcore_http_idle_connections_closed_total 2" in text
                assert "gwcore_http_connections_refused_total 1" in text
                assert gw.store.counts()["queue"] == 5 + 3 + 5

    run(main())


def test_the_address_a_connection_counts_under():
    from gwcore.http import peer_key

    assert peer_key(("192.0.2.7", 50000)) == "192.0.2.7"
    assert peer_key(("2001:db8::1", 50000, 0, 0)) == "2001:db8::1"
    assert peer_key(("::ffff:192.0.2.7", 50000, 0, 0)) == "192.0.2.7"  # a dual-stack socket's IPv4 peer
    assert peer_key("") is None and peer_key(None) is None  # a unix socket, or nothing known: one key


# -- streamed parts per address ---------------------------------------------------------------------

def test_parts_beyond_the_per_peer_cap_are_refused_at_their_head(run, gateway_factory):
    async def main():
        async with gateway_factory(http_max_parts_per_peer=2) as gw:
            state = gw.states[0]
            msg = new_id()
            blobs = {k: os.urandom(300 * KIB) for k in ("a", "b", "c", "d", "e")}
            reqs = {k: part_request(msg, k, blob) for k, blob in blobs.items()}
            async with Client(*addr(gw), local=A) as a1, Client(*addr(gw), local=A) as a2:
                # two parts from A under way: heads and 100 KiB of each body
                for c, k in ((a1, "a"), (a2, "b")):
                    await c.send(reqs[k][:len(reqs[k]) - 200 * KIB])
                await until(lambda: len(tmp_files(gw)) == 2, "two parts under way")
                # a third from A: 503 at its head, before a byte of its body is sent; no file for it
                async with Client(*addr(gw), local=A) as a3:
                    head = reqs["c"][:len(reqs["c"]) - len(blobs["c"])]
                    await a3.send(head)
                    r = await asyncio.wait_for(a3.response(), 5)
                    assert (r.status, r.reason) == (503, "Service Unavailable: too many databus parts at once "
                                                         "from your address (GWCORE_HTTP_MAX_PARTS_PER_PEER)")
                    assert r.headers.get("connection") == "close" and await a3.closed()
                assert len(blob_files(gw.settings.data_dir)) == 2 and state.peer_parts == {A: 2}
                # another address is not held back by A's parts
                async with Client(*addr(gw), local=B) as b:
                    assert (await b.request(reqs["d"])).status == 200
                # A's two complete, and free its share again
                for c, k in ((a1, "a"), (a2, "b")):
                    await c.send(reqs[k][len(reqs[k]) - 200 * KIB:])
                    assert (await c.response()).status == 200
                assert state.peer_parts == {}
                assert (await a1.request(reqs["e"])).status == 200
                assert (await a1.request(submit_request(msg, ("a", "b", "d", "e")))).status == 200
            got = await asyncio.wait_for(gw.messages().get(), 5)
            assert sorted(got.databus) == [f"NServiceBus.DataBus.{k}" for k in ("a", "b", "d", "e")]
            for k in ("a", "b", "d", "e"):
                with got.databus[f"NServiceBus.DataBus.{k}"].open() as f:
                    assert f.read() == blobs[k]
            assert state.parts_refused_per_peer == 1
            assert "gwcore_databus_parts_refused_per_peer_total 1" in await metrics(gw)

    run(main())
