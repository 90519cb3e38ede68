"""The HTTP front end on real loopback sockets, on asyncio and on uvloop."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from httpclient import Client, get, nsb_request, read_response

MSG_ID = "0b1f6f0e-5d8a-4f43-b1d5-b3a400c1d2e3"


def addr(gw):
    return gw.addresses[0]


async def queued(gw):
    out = []
    for seq, framed in gw.store.read_queue(0, 1_000_000):
        out.append(seq)
    return out


def test_submit_is_stored_and_answered_like_nservicebus(run, gateway_factory):
    async def main():
        async with gateway_factory() as gw:
            async with Client(*addr(gw)) as c:
                r = await c.request(nsb_request(MSG_ID))
            assert (r.status, r.reason, r.body) == (200, "OK", b"OK")
            assert r.headers["content-type"] == "application/json; charset=utf-8"
            assert r.headers["content-length"] == "2"
            msg = await asyncio.wait_for(gw.messages().get(), 5)
            assert msg.id == MSG_ID
            assert msg.body == b'{"Hello":"World"}'
            assert msg.headers["NServiceBus.ContentType"] == "application/json"
            assert msg.headers["NServiceBus.EnclosedMessageTypes"].startswith("Shared.UpdatePrice, Shared, Version=1.0.0.0")
            assert msg.headers["NServiceBus.OriginatingSite"] == "http,http://localhost:25899/Headquarters/"
            assert msg.headers["NServiceBus.CorrelationId"] == MSG_ID
            assert "NServiceBus.Id" not in msg.headers and "Content-MD5" not in msg.headers

    run(main())


def test_duplicate_is_200_and_stored_once(run, gateway_factory):
    async def main():
        async with gateway_factory() as gw:
            async with Client(*addr(gw)) as c:
                for _ in range(3):
                    r = await c.request(nsb_request(MSG_ID))
                    assert (r.status, r.body) == (200, b"OK")
                retry = nsb_request(MSG_ID, extra=[("NServiceBus.Header.NServiceBus.Retries", "1")])
                assert (await c.request(retry)).status == 200
            assert len(await queued(gw)) == 1
            assert gw.writer.stats.duplicates == 3

    run(main())


def test_concurrent_submits_of_one_id_store_it_once(run, gateway_factory):
    async def main():
        async with gateway_factory() as gw:
            async def one():
                async with Client(*addr(gw)) as c:
                    return (await c.request(nsb_request(MSG_ID))).status

            statuses = await asyncio.gather(*(one() for _ in range(40)))
            assert statuses == [200] * 40
            assert len(await queued(gw)) == 1

    run(main())


ERROR_CASES = [
    (dict(msg_id=""), 400, "Required header 'NServiceBus.Id' missing."),
    (dict(call_type=None), 400, "Required header 'NServiceBus.CallType' missing."),
    (dict(call_type="Submit"), 400, "Invalid CallType 'Submit'. CallTypes supported 'SingleCallSubmit, SingleCallDatabusProperty'"),
    (dict(call_type="Ack"), 400, "Invalid CallType 'Ack'. CallTypes supported 'SingleCallSubmit, SingleCallDatabusProperty'"),
    (dict(call_type="DatabusProperty"), 400, "Invalid CallType 'DatabusProperty'. CallTypes supported 'SingleCallSubmit, SingleCallDatabusProperty'"),
    (dict(md5="1B2M2Y8AsgTpgAmY7PhCfg%3D%3D"), 412, "MD5 hash received does not match hash calculated on server. Please resubmit."),
    (dict(correlation=False), 502, "Unexpected server error"),
    (dict(extra=[("NServiceBus.Header.NServiceBus.DataBus.9999-12-31_23%2Fabc", "9999-12-31_23%2Fabc")]),
     412, "Expected 1 claimcheck properties. None were received. Please resubmit."),
]


@pytest.mark.parametrize("kwargs,status,reason", ERROR_CASES, ids=[c[2][:30] for c in ERROR_CASES])
def test_error_rows_leave_no_trace(run, gateway_factory, kwargs, status, reason):
    kwargs = dict(kwargs)  # parametrized values are shared between the two loops

    async def main():
        async with gateway_factory() as gw:
            async with Client(*addr(gw)) as c:
                r = await c.request(nsb_request(kwargs.pop("msg_id", MSG_ID), **kwargs))
                assert (r.status, r.reason, r.body.decode()) == (status, reason, reason)
                # the connection stays usable after a rejected request
                assert (await c.request(nsb_request(str(uuid.uuid4())))).status == 200
            assert len(await queued(gw)) == 1
            assert not gw.writer.is_recorded("RemoteSite", MSG_ID)

    run(main())


def test_databus_part_without_its_key_is_400(run, gateway_factory):
    async def main():
        async with gateway_factory() as gw:
            async with Client(*addr(gw)) as c:
                r = await c.request(nsb_request(MSG_ID, call_type="SingleCallDatabusProperty"))
            assert (r.status, r.reason) == (400, "Required header 'NServiceBus.Gateway.DataBusKey' missing.")
            assert gw.store.counts()["databus_parts"] == 0

    run(main())


def test_missing_md5_is_accepted_unverified(run, gateway_factory):
    async def main():
        async with gateway_factory() as gw:
            async with Client(*addr(gw)) as c:
                assert (await c.request(nsb_request(MSG_ID, md5=None))).status == 200

    run(main())


def test_pipelined_requests_answered_in_order(run, gateway_factory):
    async def main():
        async with gateway_factory() as gw:
            ids = [str(uuid.uuid4()) for _ in range(30)]
            # interleave good, duplicate and bad requests in one write
            reqs = []
            expected = []
            for i, mid in enumerate(ids):
                if i % 5 == 3:
                    reqs.append(nsb_request(mid, call_type="Ack"))
                    expected.append(400)
                else:
                    reqs.append(nsb_request(mid))
                    expected.append(200)
            async with Client(*addr(gw)) as c:
                await c.send(b"".join(reqs))
                got = [(await c.response()).status for _ in reqs]
            assert got == expected
            assert len(await queued(gw)) == expected.count(200)

    run(main())


def test_back_pressure_bounds_unanswered_requests(run, gateway_factory, monkeypatch):
    from gwcore import http

    depths = []
    sizes = []
    original = http.HTTPProtocol._update_reading

    def spy(self):
        depths.append(len(self.slots))
        original(self)

    monkeypatch.setattr(http.HTTPProtocol, "_update_reading", spy)

    async def main():
        async with gateway_factory(http_max_pipeline=4, commit_max_delay_us=5000) as gw:
            reqs = [nsb_request(str(uuid.uuid4()), body=b"b" * 8192) for _ in range(200)]
            sizes.append(len(reqs[0]))
            async with Client(*addr(gw)) as c:
                await c.send(b"".join(reqs))
                got = [(await c.response()).status for _ in reqs]
            assert got == [200] * 200
            assert len(await queued(gw)) == 200

    run(main())
    # Reading pauses at the limit; the parser still finishes the chunk in hand, so allow what one
    # read (at most 256 KiB on either loop) can hold beyond it, but never the whole pipeline.
    assert 4 <= max(depths) <= 4 + (256 * 1024) // sizes[0] + 1


def test_body_too_large_413_and_close(run, gateway_factory):
    async def main():
        async with gateway_factory(max_body=1024) as gw:
            async with Client(*addr(gw)) as c:
                r = await c.request(nsb_request(MSG_ID, body=b"x" * 2048))
                assert r.status == 413 and "GWCORE_MAX_BODY=1024" in r.reason
                assert r.headers.get("connection") == "close"
                assert await c.closed()
            # chunked bodies are counted as they arrive
            async with Client(*addr(gw)) as c:
                head = nsb_request(MSG_ID, body=b"").split(b"Content-Length: 0\r\n")[0]
                await c.send(head + b"Transfer-Encoding: chunked\r\n\r\n" + b"800\r\n" + b"y" * 2048 + b"\r\n0\r\n\r\n")
                r = await c.response()
                assert r.status == 413
            assert await queued(gw) == []

    run(main())


def test_too_many_or_too_large_headers_431(run, gateway_factory):
    async def main():
        async with gateway_factory(http_max_headers=30, http_max_header_bytes=4096) as gw:
            async with Client(*addr(gw)) as c:
                extra = [(f"X-H{i}", "v") for i in range(40)]
                r = await c.request(nsb_request(MSG_ID, extra=extra))
                assert r.status == 431 and "more than 30 headers" in r.reason
                assert await c.closed()
            async with Client(*addr(gw)) as c:
                r = await c.request(nsb_request(MSG_ID, extra=[("X-Big", "a" * 5000)]))
                assert r.status == 431 and "4096 bytes" in r.reason
            async with Client(*addr(gw)) as c:
                # a header that never ends is cut off too
                await c.send(b"POST /RemoteSite/ HTTP/1.1\r\nX-Endless: ")
                for _ in range(10):
                    await c.send(b"a" * 2000)
                    await asyncio.sleep(0.01)
                r = await c.response()
                assert r.status == 431
            assert await queued(gw) == []

    run(main())


def test_slow_client_gets_408_and_close(run, gateway_factory):
    async def main():
        async with gateway_factory(http_request_timeout=0.3) as gw:
            async with Client(*addr(gw)) as c:
                req = nsb_request(MSG_ID)
                await c.send(req[:-5])  # body never completes
                r = await c.response()
                assert r.status == 408 and "Request Timeout" in r.reason
                assert await c.closed()
            assert await queued(gw) == []

    run(main())


def test_idle_keepalive_connection_is_closed(run, gateway_factory):
    async def main():
        async with gateway_factory(http_keepalive_timeout=0.2) as gw:
            async with Client(*addr(gw)) as c:
                assert (await c.request(nsb_request(MSG_ID))).status == 200
                assert await c.closed(timeout=3)

    run(main())


def test_methods_paths_and_malformed(run, gateway_factory):
    async def main():
        async with gateway_factory() as gw:
            async with Client(*addr(gw)) as c:
                r = await c.request(nsb_request(MSG_ID, method="GET"))
                assert r.status == 405 and r.headers["allow"] == "POST" and "GWCORE_HTTP_ALLOW_GET" in r.reason
                r = await c.request(nsb_request(MSG_ID, path="/OtherSite/"))
                assert r.status == 404 and "/OtherSite/" in r.reason
                # any path below the channel prefix is the channel (HttpListener prefix rules)
                assert (await c.request(nsb_request(MSG_ID, path="/remotesite/sub"))).status == 200
            async with Client(*addr(gw)) as c:
                r = await c.request(b"POST /RemoteSite/ HTTP/1.1\r\nContent-Length: zz\r\n\r\n")
                assert r.status == 400 and "malformed HTTP" in r.reason
                assert await c.closed()
            async with Client(*addr(gw)) as c:
                r = await c.request(b"NONSENSE\r\n\r\n")
                assert r.status == 400
            async with Client(*addr(gw)) as c:
                r = await c.request(b"POST /RemoteSite/ HTTP/1.1\r\n: empty\r\nContent-Length: 0\r\n\r\n")
                assert r.status == 400

    run(main())


def test_get_query_and_jsonp_when_enabled(run, gateway_factory):
    async def main():
        async with gateway_factory(http_allow_get=True) as gw:
            host, port = addr(gw)
            # the docs' JSONP web client: everything in the query, double-encoded where it must be
            q = (f"callback=cb&Message=%257B%2522a%2522%253A1%257D&NServiceBus.CallType=SingleCallSubmit"
                 f"&NServiceBus.Id={MSG_ID}&NServiceBus.EnclosedMessageTypes=My.Cmd")
            async with Client(host, port) as c:
                r = await c.request(f"GET /RemoteSite/?{q} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                assert r.status == 200
                assert r.body == b"cb({ status: 'OK'})"
                assert r.headers["content-type"] == "application/javascript; charset=utf-8"
                r = await c.request(b"GET /RemoteSite/?callback=cb HTTP/1.1\r\nHost: x\r\n\r\n")
                assert r.status == 400 and r.body == b"cb({ status: 'Required header 'NServiceBus.Id' missing.'})"
            msg = await asyncio.wait_for(gw.messages().get(), 5)
            assert msg.body == b'{"a":1}'
            assert msg.headers["NServiceBus.EnclosedMessageTypes"] == "My.Cmd"

    run(main())


def test_health_ready_metrics(run, gateway_factory):
    async def main():
        async with gateway_factory() as gw:
            host, port = addr(gw)
            assert (await get(host, port, "/healthz")).status == 200
            assert (await get(host, port, "/readyz")).status == 200
            async with Client(host, port) as c:
                await c.request(nsb_request(MSG_ID))
                await c.request(nsb_request(MSG_ID))
                await c.request(nsb_request(MSG_ID, call_type="Ack"))
            m = await get(host, port, "/metrics")
            text = m.body.decode()
            assert m.headers["content-type"].startswith("text/plain; version=0.0.4")
            assert 'gwcore_http_requests_total{status="200"} 2' in text
            assert 'gwcore_http_requests_total{status="400"} 1' in text
            assert "gwcore_messages_accepted_total 1" in text
            assert "gwcore_messages_duplicate_total 1" in text
            assert "gwcore_queue_depth 1" in text
            assert "gwcore_commit_seconds_bucket" in text

    run(main())


def test_connection_limit_503(run, gateway_factory):
    async def main():
        async with gateway_factory(http_max_connections=2) as gw:
            host, port = addr(gw)
            async with Client(host, port) as a, Client(host, port) as b:
                # both busy: a request begun on each (an idle one would be closed to make room)
                req = nsb_request(str(uuid.uuid4()))
                await a.send(req[:-3])
                await b.send(req[:-3])
                while sum(conn.in_request for conn in gw.states[0].connections) < 2:
                    await asyncio.sleep(0.005)
                async with Client(host, port) as c:
                    r = await read_response(c.reader)
                    assert r.status == 503 and "GWCORE_HTTP_MAX_CONNECTIONS" in r.reason
                await a.send(req[-3:])
                assert (await a.response()).status == 200

    run(main())


def test_graceful_stop_answers_in_flight_requests(run, gateway_factory):
    async def main():
        gw = gateway_factory(commit_max_delay_us=200_000)  # a slow group commit keeps requests in flight
        await gw.start()
        host, port = addr(gw)
        ids = [str(uuid.uuid4()) for _ in range(20)]
        async with Client(host, port) as c:
            await c.send(b"".join(nsb_request(i) for i in ids))
            # stopped once the gateway has read all 20 (answered, or waiting for the group commit,
            # which is held back for 200 ms)
            state = gw.states[0]
            deadline = asyncio.get_running_loop().time() + 10
            while gw.writer.pending + state.status_counts()[200] < len(ids):
                assert asyncio.get_running_loop().time() < deadline, "the requests were not read"
                await asyncio.sleep(0.001)
            stopping = asyncio.ensure_future(gw.stop())
            got = [(await c.response()).status for _ in ids]
            await stopping
        assert got == [200] * 20
        # reopen: every answered message is there
        gw2 = gateway_factory()
        await gw2.start()
        try:
            assert len(gw2.store.read_queue(0, 100)) == 20
        finally:
            await gw2.stop()

    run(main())


def test_expect_100_continue_is_answered_before_the_body(run, gateway_factory):
    async def main():
        async with gateway_factory() as gw:
            req = nsb_request(MSG_ID, extra=[("Expect", "100-continue")])
            head, body = req.split(b"\r\n\r\n", 1)
            async with Client(*addr(gw)) as c:
                await c.send(head + b"\r\n\r\n")
                interim = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 2)
                assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
                await c.send(body)
                r = await c.response()
                assert (r.status, r.body) == (200, b"OK")
            # an oversized body is refused instead of invited
        async with gateway_factory(max_body=8) as gw:
            async with Client(*addr(gw)) as c:
                r = await c.request(nsb_request(MSG_ID, extra=[("Expect", "100-continue")]).split(b"\r\n\r\n")[0] + b"\r\n\r\n")
                assert r.status == 413

    run(main())


def test_store_full_answers_503_with_the_reason_and_keeps_duplicates(run, gateway_factory):
    async def main():
        async with gateway_factory(store_map_size=256 << 10, store_max_size=1 << 20) as gw:
            statuses = []
            async with Client(*addr(gw)) as c:
                first = str(uuid.uuid4())
                assert (await c.request(nsb_request(first, body=b"f" * 20_000))).status == 200
                for _ in range(100):
                    r = await c.request(nsb_request(str(uuid.uuid4()), body=b"f" * 20_000))
                    statuses.append(r.status)
                    if r.status == 503:
                        assert r.reason.startswith("Service Unavailable: store full")
                        assert "GWCORE_STORE_MAX_SIZE" in r.reason
                        break
                assert statuses[-1] == 503
                # a retry of a stored id is still a duplicate, answered 200
                assert (await c.request(nsb_request(first, body=b"f" * 20_000))).status == 200
            counts = gw.store.counts()
            assert counts["queue"] == counts["dedup"] == statuses.count(200) + 1

    run(main())


def test_duplicates_and_refusals_are_logged_at_debug_with_the_id(run, gateway_factory, caplog):
    import logging

    caplog.set_level(logging.DEBUG, logger="gwcore.http")

    async def main():
        async with gateway_factory() as gw:
            async with Client(*addr(gw)) as c:
                await c.request(nsb_request(MSG_ID))
                await c.request(nsb_request(MSG_ID))
                await c.request(nsb_request(MSG_ID, call_type="Ack"))

    run(main())
    text = caplog.text
    assert f"message {MSG_ID} has already been accepted" in text
    assert text.count("has already been accepted") == 1
    assert "request refused: 400 Invalid CallType 'Ack'" in text


def test_several_receive_channels_on_one_or_more_listeners(run, gateway_factory):
    async def main():
        channels = "http://127.0.0.1:0/SiteA/,http://127.0.0.1:0/SiteB/,http://127.0.0.2:0/SiteC/"
        async with gateway_factory(receive_channels=channels) as gw:
            assert len(gw.addresses) == 2  # SiteA and SiteB share a listener
            (h1, p1), (h2, p2) = gw.addresses
            async with Client(h1, p1) as c:
                assert (await c.request(nsb_request("a", path="/SiteA/"))).status == 200
                assert (await c.request(nsb_request("b", path="/SiteB/"))).status == 200
                assert (await c.request(nsb_request("c", path="/SiteC/"))).status == 404
            async with Client(h2, p2) as c:
                assert (await c.request(nsb_request("c", path="/SiteC/"))).status == 200
                assert (await c.request(nsb_request("a2", path="/SiteA/"))).status == 404
            assert sorted(m for m in [gw.writer.is_recorded("RemoteSite", i) for i in "abc"]) == [True] * 3

    run(main())


def test_head_on_builtins_has_no_body_and_keeps_the_connection_usable(run, gateway_factory):
    async def main():
        async with gateway_factory() as gw:
            async with Client(*addr(gw)) as c:
                await c.send(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                head = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 2)
                assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Content-Length: 2\r\n" in head
                # the next response starts right after the headers: no body bytes in between
                r = await c.request(nsb_request(MSG_ID))
                assert (r.status, r.body) == (200, b"OK")

    run(main())
