"""The sending side in one process: framing on the wire, two gateways talking, fan-out, retries, the
outgoing error queue, replies and request/response."""

from __future__ import annotations

import asyncio
import urllib.parse

import pytest
from hypothesis import given, settings, strategies as st

from gwcore import Gateway, Settings
from gwcore._core import core
from gwcore.egress import (
    OutgoingRecord, append_records, encode_failed, encode_outgoing, failed_sends, outgoing_records, outgoing_schedule,
    wire_headers,
)
from gwcore.errors import UnknownSiteError
from gwcore.store import Store
from test_framing import PLAIN_SUBMIT_MESSAGE_HEADERS

MSG_ID = "0b1f6f0e-5d8a-4f43-b1d5-b3a400c1d2e3"

# protocol.md §8.1, the request's header lines between Host and Content-Type (Content-Type and
# Content-Length belong to the HTTP client), then Content-MD5.
SECTION_8_1 = """\
NServiceBus.Id: 0b1f6f0e-5d8a-4f43-b1d5-b3a400c1d2e3
NServiceBus.CorrelationId: 0b1f6f0e-5d8a-4f43-b1d5-b3a400c1d2e3
NServiceBus.ReplyToAddress: Headquarters
NServiceBus.Header.NServiceBus.MessageId: 0b1f6f0e-5d8a-4f43-b1d5-b3a400c1d2e3
NServiceBus.Header.NServiceBus.MessageIntent: Send
NServiceBus.Header.NServiceBus.ConversationId: 5c0e9a47-3a5e-4d0c-9a1c-b3a400c1d2e3
NServiceBus.Header.NServiceBus.CorrelationId: 0b1f6f0e-5d8a-4f43-b1d5-b3a400c1d2e3
NServiceBus.Header.NServiceBus.ReplyToAddress: Headquarters
NServiceBus.Header.NServiceBus.OriginatingEndpoint: Headquarters
NServiceBus.Header.NServiceBus.OriginatingMachine: HQ-SRV01
NServiceBus.Header.NServiceBus.ContentType: application%2Fjson
NServiceBus.Header.NServiceBus.EnclosedMessageTypes: Shared.UpdatePrice%2C+Shared%2C+Version%3D1.0.0.0%2C+Culture%3Dneutral%2C+PublicKeyToken%3Dnull
NServiceBus.Header.NServiceBus.Version: 10.2.8
NServiceBus.Header.NServiceBus.TimeSent: 2026-08-20+10%3A15%3A30%3A123456+Z
NServiceBus.Header.NServiceBus.DestinationSites: RemoteSite
NServiceBus.Header.NServiceBus.OriginatingSite: http%2Chttp%3A%2F%2Flocalhost%3A25899%2FHeadquarters%2F
NServiceBus.Gateway: True
NServiceBus.CallType: SingleCallSubmit
Content-MD5: 0S9RmNGZjrrjq41F3ZZBjw%3D%3D"""

MESSAGE_HEADERS = PLAIN_SUBMIT_MESSAGE_HEADERS  # protocol.md §8.1, as tests/test_framing.py has them


def test_wire_headers_match_section_8_1_line_for_line():
    got = [f"{n.decode()}: {v.decode()}" for n, v in wire_headers(MSG_ID, MESSAGE_HEADERS, b'{"Hello":"World"}')]
    assert got == SECTION_8_1.splitlines()


def test_wire_headers_encode_names_and_add_ttbr_first():
    h = {"NServiceBus.MessageId": "x", "NServiceBus.TimeToBeReceived": "00:10:00", "$.diagnostics.hostid": "a b~c",
         "City": "Zürich"}
    got = wire_headers("x", h, b"")
    assert got[:3] == [(b"NServiceBus.Id", b"x"), (b"NServiceBus.CorrelationId", b"x"),
                       (b"NServiceBus.TimeToBeReceived", b"00%3A10%3A00")]
    assert (b"NServiceBus.Header.%24.diagnostics.hostid", b"a+b%7Ec") in got
    assert (b"NServiceBus.Header.City", b"Z%C3%BCrich") in got
    assert got[-1] == (b"Content-MD5", b"1B2M2Y8AsgTpgAmY7PhCfg%3D%3D")


def settings_for(tmp_path, name: str, port: int = 0, sites: str = "", **kw) -> Settings:
    kw.setdefault("retry_delays", (0.05,))
    return Settings.from_env({}, data_dir=str(tmp_path / name), endpoint=name,
                             receive_channels=f"http://127.0.0.1:{port}/{name}/", sites=sites, **kw)


def url_of(gw: Gateway, name: str) -> str:
    host, port = gw.addresses[0]
    return f"http://{host}:{port}/{name}/"


async def drain(gw: Gateway, n: int, timeout: float = 20.0) -> list:
    out = []
    async with asyncio.timeout(timeout):
        async for msg in gw.messages():
            out.append(msg)
            await msg.ack()
            if len(out) == n:
                return out
    return out


async def until(predicate, timeout: float = 20.0, step: float = 0.02) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(step)


def test_two_gateways_fan_out_one_copy_per_site(run, tmp_path):
    async def main():
        async with Gateway(settings_for(tmp_path, "SiteB")) as b, Gateway(settings_for(tmp_path, "SiteC")) as c:
            sites = f"SiteB={url_of(b, 'SiteB')},SiteC={url_of(c, 'SiteC')}"
            async with Gateway(settings_for(tmp_path, "Headquarters", sites=sites)) as hq:
                msg_id = await hq.send_to_sites(["SiteB", "SiteC"], b'{"Price":12.5}',
                                                {"NServiceBus.EnclosedMessageTypes": "Shared.UpdatePrice, Shared"})
                (at_b,) = await drain(b, 1)
                (at_c,) = await drain(c, 1)
                await until(lambda: hq.store.counts()["outgoing"] == 0)
                for msg, key in ((at_b, "SiteB"), (at_c, "SiteC")):
                    assert msg.id == msg_id and msg.body == b'{"Price":12.5}'
                    assert msg.headers["NServiceBus.EnclosedMessageTypes"] == "Shared.UpdatePrice, Shared"
                    assert msg.headers["NServiceBus.DestinationSites"] == key
                    assert msg.headers["NServiceBus.OriginatingSite"] == f"http,{url_of(hq, 'Headquarters')}"
                    assert msg.headers["NServiceBus.MessageIntent"] == "Send"
                    assert msg.headers["NServiceBus.CorrelationId"] == msg_id
                assert hq.forwarder.sent == 2

    run(main())


def test_unknown_sites_are_named_at_once(run, tmp_path):
    async def main():
        async with Gateway(settings_for(tmp_path, "Headquarters", sites="Known=http://127.0.0.1:9/Known/")) as hq:
            with pytest.raises(UnknownSiteError, match="The following sites have not been configured: Nowhere, Elsewhere"):
                await hq.send_to_sites(["Known", "Nowhere", "Elsewhere"], b"x")
            assert hq.store.counts()["outgoing"] == 0

    run(main())


class ScriptedSite:
    """A real HTTP server answering from a script of statuses (then 200), recording each request."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = list(statuses)
        self.requests: list[dict[str, str]] = []
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/Scripted/"

    async def _client(self, reader, writer) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {}
                for line in lines[1:]:
                    if line:
                        name, _, value = line.partition(": ")
                        headers[urllib.parse.unquote_plus(name)] = urllib.parse.unquote_plus(value)
                body = await reader.readexactly(int(headers.get("Content-Length", "0")))
                headers["_body"] = body.decode("latin-1")
                self.requests.append(headers)
                status = self.statuses.pop(0) if self.statuses else 200
                reason = "OK" if status == 200 else "Scripted failure"
                text = reason.encode()
                writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Length: {len(text)}\r\n\r\n".encode() + text)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        self.server.close()
        await self.server.wait_closed()


def test_transient_failures_are_retried_with_retry_headers(run, tmp_path):
    async def main():
        site = ScriptedSite([503, 503])
        url = await site.start()
        async with Gateway(settings_for(tmp_path, "Headquarters", sites=f"Scripted={url}", retries=4)) as hq:
            msg_id = await hq.send_to_sites(["Scripted"], b"hello")
            await until(lambda: hq.forwarder.sent == 1)
            assert [r["NServiceBus.Id"] for r in site.requests] == [msg_id] * 3
            assert "NServiceBus.Header.NServiceBus.Retries" not in site.requests[0]
            assert [r.get("NServiceBus.Header.NServiceBus.Retries") for r in site.requests[1:]] == ["1", "2"]
            assert site.requests[2]["_body"] == "hello"
            assert core.content_md5(b"hello") == site.requests[2]["Content-MD5"]
            await until(lambda: hq.store.counts()["outgoing"] == 0)
            assert hq.forwarder.retried == 2 and hq.store.counts()["outgoing_errors"] == 0
        await site.close()

    run(main())


@pytest.mark.parametrize("status", [400, 401, 403, 413])
def test_permanent_refusals_go_to_the_error_queue_at_once(run, tmp_path, status):
    async def main():
        site = ScriptedSite([status])
        url = await site.start()
        async with Gateway(settings_for(tmp_path, "Headquarters", sites=f"Scripted={url}", retries=4)) as hq:
            msg_id = await hq.send_to_sites(["Scripted"], b"hello")
            await until(lambda: hq.store.counts()["outgoing_errors"] == 1)
            assert len(site.requests) == 1 and hq.store.counts()["outgoing"] == 0
            (rec,) = failed_sends(hq.store)
            assert rec[1].last_error == f"{status} Scripted failure" and rec[1].attempt == 1
            # `gwcore retry`: the site answers 200 now
            assert await hq.retry_failed([msg_id]) == [msg_id]
            await until(lambda: hq.forwarder.sent == 1)
            assert hq.store.counts()["outgoing_errors"] == 0
            assert await hq.retry_failed(["not-there"]) == []
        await site.close()

    run(main())


def test_retries_run_out_into_the_error_queue(run, tmp_path):
    async def main():
        site = ScriptedSite([503] * 10)
        url = await site.start()
        async with Gateway(settings_for(tmp_path, "Headquarters", sites=f"Scripted={url}", retries=2)) as hq:
            await hq.send_to_sites(["Scripted"], b"hello")
            await until(lambda: hq.store.counts()["outgoing_errors"] == 1)
            assert len(site.requests) == 3  # the first attempt and 2 retries
            (rec,) = failed_sends(hq.store)
            assert rec[1].attempt == 3 and rec[1].last_error.startswith("503")
        await site.close()

    run(main())


def test_unreachable_site_is_retried_until_it_comes_up(run, tmp_path):
    async def main():
        async with Gateway(settings_for(tmp_path, "SiteB")) as b:
            b_url = url_of(b, "SiteB")
        # SiteB is down now; Headquarters keeps trying, then SiteB comes back on the same port
        port = urllib.parse.urlsplit(b_url).port
        async with Gateway(settings_for(tmp_path, "Headquarters", sites=f"SiteB={b_url}", retries=1000)) as hq:
            msg_id = await hq.send_to_sites(["SiteB"], b"patience")
            await until(lambda: hq.forwarder.retried >= 2)
            async with Gateway(settings_for(tmp_path, "SiteB", port=port)) as b:
                (msg,) = await drain(b, 1)
                assert msg.id == msg_id
            assert hq.store.counts()["outgoing_errors"] == 0

    run(main())


def test_reply_and_request_between_two_gateways(run, tmp_path):
    async def main():
        async def remote_handler(msg):
            if msg.headers.get("Silent") != "yes":
                await remote.reply(msg, b"ack:" + msg.body, {"Handled-By": "RemoteSite"})

        remote = Gateway(settings_for(tmp_path, "RemoteSite", sites=""), handler=remote_handler)
        async with remote:
            sites = f"RemoteSite={url_of(remote, 'RemoteSite')}"
            seen = []
            async with Gateway(settings_for(tmp_path, "Headquarters", sites=sites), handler=seen.append) as hq:
                reply = await hq.request("RemoteSite", b"price-1", timeout=20)
                assert reply.body == b"ack:price-1"
                assert reply.headers["NServiceBus.MessageIntent"] == "Reply"
                assert reply.headers["Handled-By"] == "RemoteSite"
                request_id = reply.headers["NServiceBus.RelatedTo"]
                assert reply.headers["NServiceBus.CorrelationId"] == request_id
                assert reply.headers["NServiceBus.OriginatingSite"] == f"http,{url_of(remote, 'RemoteSite')}"
                # a second one, and the reply went to the request, not to the handler
                assert (await hq.request("RemoteSite", b"price-2", timeout=20)).body == b"ack:price-2"
                assert seen == []
                # the caller may choose the request's id, e.g. to log it before sending
                reply = await hq.request("RemoteSite", b"price-3", timeout=20, message_id="price-3-id")
                assert reply.headers["NServiceBus.CorrelationId"] == reply.headers["NServiceBus.RelatedTo"] == "price-3-id"
                silent = asyncio.ensure_future(
                    hq.request("RemoteSite", b"x", {"Silent": "yes"}, timeout=0.5, message_id="silent"))
                await asyncio.sleep(0)
                with pytest.raises(ValueError, match="already waiting"):
                    await hq.request("RemoteSite", b"y", timeout=0.5, message_id="silent")
                with pytest.raises(TimeoutError, match="no reply to request silent"):
                    await silent

    run(main())


def test_reply_without_originating_site_is_refused(run, tmp_path):
    async def main():
        async with Gateway(settings_for(tmp_path, "RemoteSite")) as gw:
            from gwcore.consumer import Message

            msg = Message.__new__(Message)
            msg.id, msg.headers = "x", {}
            with pytest.raises(Exception, match="No destination found for message"):
                await gw.reply(msg, b"r")

    run(main())


@pytest.mark.parametrize("extra", [None, [("NServiceBus.Retries", "2"), ("NServiceBus.Retries.Timestamp", "t")],
                                   [("NServiceBus.ReplyToAddress", "Other Endpoint")]])
def test_core_encoder_matches_wire_headers(extra):
    headers = dict(MESSAGE_HEADERS, **{"NServiceBus.TimeToBeReceived": "00:10:00", "Zürich ~ x": "a+b/c=d"})
    framed = core.encode_envelope(MSG_ID, headers, b'{"Hello":"World"}', 0, 1)
    msg_id, body, expiry, block = core.encode_submit(framed, extra)
    expected_headers = dict(headers)
    expected_headers.update(extra or [])
    expected = b"".join(n + b": " + v + b"\r\n" for n, v in wire_headers(MSG_ID, expected_headers, body))
    assert (msg_id, body, expiry, block) == (MSG_ID, b'{"Hello":"World"}', 0, expected)


def test_core_encoder_without_correlation_header_uses_the_id():
    framed = core.encode_envelope("only-id", {}, b"", 5, 1)
    assert core.encode_submit(framed) == ("only-id", b"", 5, b"".join(
        n + b": " + v + b"\r\n" for n, v in wire_headers("only-id", {}, b"")))
    with pytest.raises(Exception, match="envelope"):
        core.encode_submit(framed[:-1])


_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)


@settings(max_examples=300, deadline=None)
@given(msg_id=_text.filter(bool), headers=st.dictionaries(_text, _text, max_size=8), body=st.binary(max_size=64),
       retries=st.none() | st.integers(1, 9))
def test_core_encoder_agrees_with_the_reference(msg_id, headers, body, retries):
    extra = [("NServiceBus.Retries", str(retries))] if retries else None
    framed = core.encode_envelope(msg_id, headers, body, 0, 1)
    expected_headers = dict(headers)
    expected_headers.update(extra or [])
    expected = b"".join(n + b": " + v + b"\r\n" for n, v in wire_headers(msg_id, expected_headers, body))
    assert core.encode_submit(framed, extra) == (msg_id, body, 0, expected)


def test_store_readers_of_the_outgoing_records(tmp_path):
    # what the forwarder schedules at start, and what `gwcore inspect` and `gwcore retry` read
    store = Store(str(tmp_path / "store"))
    try:
        first, second = (core.encode_envelope(i, {}, b"", 0, 1) for i in ("m1", "m2"))
        with store.env.begin(write=True) as txn:
            assert append_records(store, [("SiteB", first), ("SiteC", second)])(txn) == [1, 2]
            txn.put(core.pack_seq(2), encode_outgoing(OutgoingRecord("SiteC", 1, 5_000, "503", second)), db=store.outgoing)
            txn.put(core.pack_seq(9), encode_failed(7, OutgoingRecord("SiteD", 4, 0, "400 no", first)),
                    db=store.outgoing_errors)
        assert outgoing_schedule(store) == [(1, "SiteB", 0), (2, "SiteC", 5_000)]
        assert [(seq, rec.dest, rec.attempt, bytes(rec.framed)) for seq, rec in outgoing_records(store)] == [
            (1, "SiteB", 0, first), (2, "SiteC", 1, second)]
        ((seq, rec),) = failed_sends(store)
        assert (seq, rec.dest, rec.attempt, rec.last_error, bytes(rec.framed)) == (9, "SiteD", 4, "400 no", first)
    finally:
        store.close()
