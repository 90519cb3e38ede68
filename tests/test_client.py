"""gwcore.client.SiteClient against real loopback sockets (a scripted server and a real Gateway),
on asyncio and on uvloop."""

from __future__ import annotations

import asyncio
import socket
import ssl
import uuid
from dataclasses import dataclass

import pytest

from gwcore._core import core
from gwcore.client import MAX_RESPONSE_BODY, SiteClient, make_client_ssl_context
from gwcore.errors import (
    ConfigurationError,
    ResponseTooLargeError,
    SendConnectError,
    SendError,
    SendProtocolError,
    SendTimeoutError,
    SendTLSError,
)

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: 2\r\n\r\nOK"


async def until(predicate, what: str, timeout: float = 10.0) -> None:
    """Poll *predicate* (every 5 ms) until it holds; fail naming *what* after *timeout* s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


@dataclass
class Seen:
    conn: int          # which connection (1-based, in accept order)
    nth: int           # which request on that connection (1-based)
    head: bytes        # request line and headers, exactly as received
    body: bytes


class ScriptedServer:
    """A tiny HTTP/1.1 server: reads requests (Content-Length bodies), answers what ``respond``
    returns: ``(bytes to write, close after writing)``; ``respond`` may be async."""

    def __init__(self, respond=None, ssl_context: ssl.SSLContext | None = None, raw=None,
                 host: str = "127.0.0.1") -> None:
        self.host = host
        self.respond = respond or (lambda seen: (OK, False))
        self.raw = raw                 # optional handler(reader, writer) replacing the HTTP loop
        self.ssl_context = ssl_context
        self.accepted = 0
        self.open = 0
        self.max_open = 0
        self.requests: list[Seen] = []
        self.eofs = 0                  # connections the client closed
        self.peercerts: list = []      # TLS client certificates seen
        self.server: asyncio.base_events.Server | None = None

    async def __aenter__(self) -> "ScriptedServer":
        self.server = await asyncio.start_server(self._handle, self.host, 0, ssl=self.ssl_context)
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        # a handler blocked on a read has its transport aborted below; then wait_closed returns
        for task in [t for t in asyncio.all_tasks() if t.get_name().startswith("scripted-")]:
            task.cancel()
        await self.server.wait_closed()

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1]

    def url(self, path: str = "/RemoteSite/", scheme: str = "http") -> str:
        return f"{scheme}://{self.host}:{self.port}{path}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        asyncio.current_task().set_name(f"scripted-{id(writer)}")
        self.accepted += 1
        conn = self.accepted
        if self.ssl_context is not None and writer.get_extra_info("peercert"):
            self.peercerts.append(writer.get_extra_info("peercert"))
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        try:
            if self.raw is not None:
                await self.raw(reader, writer)
                return
            nth = 0
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError as exc:
                    if not exc.partial:
                        self.eofs += 1
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                nth += 1
                seen = Seen(conn, nth, head, body)
                self.requests.append(seen)
                action = self.respond(seen)
                if asyncio.iscoroutine(action):
                    action = await action
                data, close = action
                if data:
                    writer.write(data)
                    await writer.drain()
                if close:
                    return
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.open -= 1
            writer.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HEADERS = [(b"NServiceBus.Id", b"abc"), (b"X-MiXeD-CaSe", b"v%2Fw+x")]


# -- the request on the wire -------------------------------------------------------------------------


def test_request_bytes_are_exactly_as_given(run):
    async def main():
        async with ScriptedServer() as srv, SiteClient(srv.url("/RemoteSite/")) as site:
            r = await site.post(HEADERS, b"body")
            assert (r.status, r.reason, r.body) == (200, "OK", b"OK")
            assert (b"Content-Type", b"application/json; charset=utf-8") in r.headers
            assert srv.requests[0].head == (
                b"POST /RemoteSite/ HTTP/1.1\r\n"
                b"Host: 127.0.0.1:%d\r\n"
                b"NServiceBus.Id: abc\r\n"
                b"X-MiXeD-CaSe: v%%2Fw+x\r\n"
                b"Content-Type: application/x-www-form-urlencoded\r\n"
                b"Content-Length: 4\r\n\r\n" % srv.port)
            assert srv.requests[0].body == b"body"

    run(main())


def test_path_is_the_channel_address_with_nothing_appended(run):
    async def main():
        async with ScriptedServer() as srv:
            for path in ("/SiteB/", "/a/Deep/Path/", "/x?y=1", "/Zürich Site/", "/a%2Fb/"):
                async with SiteClient(srv.url(path)) as site:
                    await site.post([], b"")
            assert [s.head.split(b"\r\n")[0] for s in srv.requests] == [
                b"POST /SiteB/ HTTP/1.1", b"POST /a/Deep/Path/ HTTP/1.1", b"POST /x?y=1 HTTP/1.1",
                b"POST /Z%C3%BCrich%20Site/ HTTP/1.1", b"POST /a%2Fb/ HTTP/1.1"]
            assert b"\r\nContent-Length: 0\r\n" in srv.requests[0].head

    run(main())


@pytest.mark.parametrize("headers", [
    [(b"X-A", b"line\r\nInjected: yes")],
    [(b"X-A", b"nul\x00")],
    [(b"Bad Name", b"v")],
    [(b"X-A:", b"v")],
    [(b"Content-Length", b"5")],
    [(b"host", b"elsewhere")],
    [(b"Transfer-Encoding", b"chunked")],
])
def test_unsafe_or_reserved_headers_are_refused(run, headers):
    async def main():
        async with ScriptedServer() as srv, SiteClient(srv.url()) as site:
            with pytest.raises(ValueError):
                await site.post(headers, b"")
            assert srv.accepted == 0

    run(main())


def test_bad_urls_are_configuration_errors():
    for url in ("ftp://h/x/", "http:///nohost/", "localhost:80/x/", "http://h:99999/x/"):
        with pytest.raises(ConfigurationError):
            SiteClient(url)
    with pytest.raises(ConfigurationError):
        SiteClient("http://h/x/", concurrency=0)


# -- the connection pool -----------------------------------------------------------------------------


def test_one_connection_serves_many_requests(run):
    async def main():
        async with ScriptedServer() as srv, SiteClient(srv.url()) as site:
            for i in range(25):
                r = await site.post(HEADERS, b"%d" % i)
                assert r.status == 200
            assert srv.accepted == 1 and site.connections_opened == 1
            assert [s.nth for s in srv.requests] == list(range(1, 26))
            assert site.open_connections == 1

    run(main())


def test_concurrency_bound_is_never_exceeded(run):
    async def slow(seen):
        await asyncio.sleep(0.03)
        return OK, False

    async def main():
        async with ScriptedServer(slow) as srv, SiteClient(srv.url(), concurrency=4) as site:
            peak = 0

            async def one(i):
                nonlocal peak
                r = await site.post(HEADERS, b"%d" % i)
                peak = max(peak, site.open_connections)
                return r.status

            statuses = await asyncio.gather(*(one(i) for i in range(40)))
            assert statuses == [200] * 40
            assert srv.max_open == 4          # parallel up to the bound ...
            assert srv.accepted == 4          # ... and the connections were reused, not replaced
            assert peak <= 4
            # later requests reuse the idle connections
            await asyncio.gather(*(one(i) for i in range(8)))
            assert srv.accepted == 4

    run(main())


def test_stale_keep_alive_connection_is_retried_once_on_a_fresh_one(run):
    # The server takes the 2nd request on a connection and closes without answering: the race of
    # an idle timeout on the server meeting our reuse.
    def respond(seen):
        return (b"", True) if seen.nth == 2 else (OK, False)

    async def main():
        async with ScriptedServer(respond) as srv, SiteClient(srv.url()) as site:
            assert (await site.post(HEADERS, b"one")).status == 200
            r = await site.post(HEADERS, b"two")
            assert r.status == 200
            assert site.stale_retries == 1 and srv.accepted == 2
            assert [(s.conn, s.nth, s.body) for s in srv.requests] == [(1, 1, b"one"), (1, 2, b"two"), (2, 1, b"two")]

    run(main())


def test_fresh_connection_closed_before_a_response_is_not_retried(run):
    async def main():
        async with ScriptedServer(lambda seen: (b"", True)) as srv, SiteClient(srv.url()) as site:
            with pytest.raises(SendProtocolError) as err:
                await site.post(HEADERS, b"x")
            assert srv.url() in str(err.value) and "before responding" in str(err.value)
            assert len(srv.requests) == 1 and site.stale_retries == 0

    run(main())


def test_stale_retry_happens_only_once(run):
    def respond(seen):
        return (OK, False) if seen.conn == 1 and seen.nth == 1 else (b"", True)

    async def main():
        async with ScriptedServer(respond) as srv, SiteClient(srv.url()) as site:
            await site.post(HEADERS, b"one")
            with pytest.raises(SendProtocolError):
                await site.post(HEADERS, b"two")
            assert site.stale_retries == 1 and len(srv.requests) == 3

    run(main())


def test_connection_closed_by_server_while_idle_is_dropped(run):
    async def main():
        async with ScriptedServer(lambda seen: (OK, True)) as srv, SiteClient(srv.url()) as site:
            await site.post(HEADERS, b"one")
            await until(lambda: site.open_connections == 0, "the client to see the EOF")
            assert (await site.post(HEADERS, b"two")).status == 200
            assert srv.accepted == 2 and site.stale_retries == 0

    run(main())


def test_connection_close_response_is_not_reused(run):
    close_ok = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nOK"

    async def main():
        # the server keeps its side open: the client must close and not reuse on its own
        async with ScriptedServer(lambda seen: (close_ok, False)) as srv, SiteClient(srv.url()) as site:
            for _ in range(3):
                assert (await site.post(HEADERS, b"x")).status == 200
            assert srv.accepted == 3 and [s.nth for s in srv.requests] == [1, 1, 1]
            await until(lambda: srv.eofs == 3, "the client to close each connection")
            assert site.open_connections == 0

    run(main())


def test_http_1_0_response_without_keep_alive_is_not_reused(run):
    async def main():
        resp = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nOK"
        async with ScriptedServer(lambda seen: (resp, False)) as srv, SiteClient(srv.url()) as site:
            await site.post(HEADERS, b"x")
            await site.post(HEADERS, b"x")
            assert srv.accepted == 2

    run(main())


def test_idle_connections_are_closed_after_idle_timeout(run):
    async def main():
        async with ScriptedServer() as srv, SiteClient(srv.url(), idle_timeout=0.1) as site:
            await site.post(HEADERS, b"x")
            assert site.open_connections == 1
            await until(lambda: site.open_connections == 0 and srv.eofs == 1, "the idle connection to close")
            await site.post(HEADERS, b"x")
            assert srv.accepted == 2 and site.stale_retries == 0

    run(main())


def test_close_closes_idle_connections_and_refuses_new_posts(run):
    async def main():
        async with ScriptedServer() as srv:
            site = SiteClient(srv.url())
            async with site:
                await site.post(HEADERS, b"x")
            await until(lambda: srv.eofs == 1, "the server to see the close")
            assert site.open_connections == 0
            with pytest.raises(SendError, match="closed"):
                await site.post(HEADERS, b"x")

    run(main())


# -- responses ---------------------------------------------------------------------------------------


def test_chunked_response(run):
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"2\r\nOK\r\n3\r\n!!!\r\n0\r\n\r\n")

    async def main():
        async with ScriptedServer(lambda seen: (chunked, False)) as srv, SiteClient(srv.url()) as site:
            for _ in range(2):
                r = await site.post(HEADERS, b"x")
                assert (r.status, r.body) == (200, b"OK!!!")
            assert srv.accepted == 1          # a chunked response keeps the connection usable

    run(main())


def test_response_split_into_single_bytes(run):
    async def dribble(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        for i in range(len(OK)):
            writer.write(OK[i:i + 1])
            await writer.drain()
            await asyncio.sleep(0)
        await reader.read()

    async def main():
        async with ScriptedServer(raw=dribble) as srv, SiteClient(srv.url()) as site:
            r = await site.post([], b"")
            assert (r.status, r.reason, r.body) == (200, "OK", b"OK")

    run(main())


def test_body_delimited_by_close(run):
    resp = b"HTTP/1.1 412 MD5 hash received does not match\r\nConnection: close\r\n\r\nthe whole body"

    async def main():
        async with ScriptedServer(lambda seen: (resp, True)) as srv, SiteClient(srv.url()) as site:
            r = await site.post(HEADERS, b"x")
            assert (r.status, r.reason, r.body) == (412, "MD5 hash received does not match", b"the whole body")

    run(main())


def test_interim_100_continue_is_skipped(run):
    resp = b"HTTP/1.1 100 Continue\r\n\r\n" + OK

    async def main():
        async with ScriptedServer(lambda seen: (resp, False)) as srv, SiteClient(srv.url()) as site:
            r = await site.post(HEADERS, b"x")
            assert (r.status, r.body) == (200, b"OK")

    run(main())


def test_error_statuses_are_returned_not_raised(run):
    resp = b"HTTP/1.1 400 Required header 'NServiceBus.Id' missing.\r\nContent-Length: 5\r\n\r\nnope!"

    async def main():
        async with ScriptedServer(lambda seen: (resp, False)) as srv, SiteClient(srv.url()) as site:
            r = await site.post(HEADERS, b"x")
            assert (r.status, r.reason, r.body) == (400, "Required header 'NServiceBus.Id' missing.", b"nope!")
            assert (await site.post(HEADERS, b"x")).status == 400
            assert srv.accepted == 1

    run(main())


def test_oversized_content_length_is_refused_before_the_body(run):
    big = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (MAX_RESPONSE_BODY + 1)

    async def main():
        async with ScriptedServer(lambda seen: (big, False)) as srv, SiteClient(srv.url()) as site:
            with pytest.raises(ResponseTooLargeError) as err:
                await site.post(HEADERS, b"x")
            assert srv.url() in str(err.value)
            await until(lambda: site.open_connections == 0, "the connection to be dropped")  # never reused

    run(main())


def test_oversized_chunked_body_is_refused(run):
    async def flood(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n" % 65536 + b"z" * 65536 + b"\r\n"
        try:
            for _ in range(40):                  # 2.5 MiB at most, then give up
                writer.write(chunk)
                await writer.drain()
        except ConnectionError:
            pass

    async def main():
        async with ScriptedServer(raw=flood) as srv, SiteClient(srv.url()) as site:
            with pytest.raises(ResponseTooLargeError, match="over 1048576"):
                await site.post(HEADERS, b"x")

    run(main())


def test_oversized_header_section_is_refused(run):
    async def flood(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n")
        try:
            for i in range(2000):                # 200 KB of headers, never finished
                writer.write(b"X-Junk-%d: %s\r\n" % (i, b"j" * 90))
                await writer.drain()
        except ConnectionError:
            pass

    async def main():
        async with ScriptedServer(raw=flood) as srv, SiteClient(srv.url()) as site:
            with pytest.raises(ResponseTooLargeError, match="header section"):
                await site.post(HEADERS, b"x")

    run(main())


def test_malformed_response_is_a_protocol_error(run):
    async def main():
        async with ScriptedServer(lambda seen: (b"SMTP ready\r\n\r\n", False)) as srv, SiteClient(srv.url()) as site:
            with pytest.raises(SendProtocolError) as err:
                await site.post(HEADERS, b"x")
            assert srv.url() in str(err.value) and "invalid response" in str(err.value)

    run(main())


def test_connection_cut_inside_the_response(run):
    async def main():
        cut = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nOK"
        async with ScriptedServer(lambda seen: (cut, True)) as srv, SiteClient(srv.url()) as site:
            with pytest.raises(SendProtocolError, match="in the middle of the response"):
                await site.post(HEADERS, b"x")

    run(main())


# -- failures ----------------------------------------------------------------------------------------


def test_connect_refused_names_the_url(run):
    async def main():
        url = f"http://127.0.0.1:{free_port()}/RemoteSite/"
        async with SiteClient(url) as site:
            with pytest.raises(SendConnectError) as err:
                await site.post(HEADERS, b"x")
        assert url in str(err.value) and err.value.url == url
        assert isinstance(err.value, ConnectionError)

    run(main())


def test_request_timeout(run):
    async def never(seen):
        await asyncio.sleep(30)
        return OK, False

    async def main():
        async with ScriptedServer(never) as srv, SiteClient(srv.url(), request_timeout=0.2) as site:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(SendTimeoutError) as err:
                await site.post(HEADERS, b"x")
            assert loop.time() - t0 < 15  # the 0.2 s timeout, not the server's 30 s (generous: a busy machine)
            assert srv.url() in str(err.value) and isinstance(err.value, TimeoutError)
            assert site.open_connections == 0 or site._idle == []  # the timed-out connection is dropped

    run(main())


def test_connect_timeout_covers_the_tls_handshake(run):
    async def silent(reader, writer):
        await reader.read()                    # accept TCP, never speak TLS

    async def main():
        async with ScriptedServer(raw=silent) as srv:
            async with SiteClient(srv.url(scheme="https"), connect_timeout=0.2) as site:
                with pytest.raises(SendTimeoutError, match="connect timed out"):
                    await site.post(HEADERS, b"x")

    run(main())


# -- TLS ---------------------------------------------------------------------------------------------


def server_tls(pki) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki / "server.pem", pki / "server.key")
    return ctx


def test_tls_with_the_ca_file(run, pki):
    async def main():
        async with ScriptedServer(ssl_context=server_tls(pki)) as srv:
            ctx = make_client_ssl_context(str(pki / "ca.pem"))
            async with SiteClient(srv.url(scheme="https"), ssl_context=ctx) as site:
                for _ in range(3):
                    r = await site.post(HEADERS, b"secret")
                    assert (r.status, r.body) == (200, b"OK")
            assert srv.accepted == 1 and srv.requests[0].body == b"secret"
            assert srv.requests[0].head.startswith(b"POST /RemoteSite/ HTTP/1.1\r\nHost: 127.0.0.1:")

    run(main())


def test_tls_untrusted_ca_is_a_clear_error(run, pki):
    async def main():
        async with ScriptedServer(ssl_context=server_tls(pki)) as srv:
            url = srv.url(scheme="https")
            async with SiteClient(url) as site:     # system CAs only
                with pytest.raises(SendTLSError) as err:
                    await site.post(HEADERS, b"x")
            assert url in str(err.value) and "certificate" in str(err.value)
            assert isinstance(err.value, SendConnectError)
            assert srv.requests == []

    run(main())


def test_tls_host_name_is_checked(run, pki):
    async def main():
        # 127.0.0.2 is loopback too, but not in the certificate
        async with ScriptedServer(ssl_context=server_tls(pki), host="127.0.0.2") as srv:
            ctx = make_client_ssl_context(str(pki / "ca.pem"))
            async with SiteClient(srv.url(scheme="https"), ssl_context=ctx) as site:
                with pytest.raises(SendTLSError, match="127.0.0.2"):
                    await site.post(HEADERS, b"x")

    run(main())


def test_mutual_tls_presents_the_client_certificate(run, pki):
    async def main():
        server_ctx = server_tls(pki)
        server_ctx.verify_mode = ssl.CERT_REQUIRED
        server_ctx.load_verify_locations(pki / "ca.pem")
        async with ScriptedServer(ssl_context=server_ctx) as srv:
            ctx = make_client_ssl_context(str(pki / "ca.pem"), str(pki / "client.pem"), str(pki / "client.key"))
            async with SiteClient(srv.url(scheme="https"), ssl_context=ctx) as site:
                assert (await site.post(HEADERS, b"x")).status == 200
            subject = dict(item[0] for item in srv.peercerts[0]["subject"])
            assert subject["commonName"] == "Headquarters"

    run(main())


def test_make_client_ssl_context_bad_files(tmp_path):
    with pytest.raises(ConfigurationError, match="nope.pem"):
        make_client_ssl_context(str(tmp_path / "nope.pem"))
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ConfigurationError):
        make_client_ssl_context(None, certfile=str(tmp_path / "junk.pem"))


# -- signed requests -------------------------------------------------------------------------------


def test_signed_request_verifies_at_the_receiving_end(run):
    from gwcore import auth

    secret = b"k" * 32
    body = b'{"Hello":"World"}'

    def verify(seen):
        lines = seen.head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ")
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        try:
            auth.verify({"hq": secret}, method, target, lambda n: headers.get(n.lower()),
                        core.url_decode(headers["nservicebus.id"].encode()), auth.body_digest(seen.body),
                        1_800_000_010, 300)
        except Exception as exc:
            reason = str(exc).encode("ascii", "replace")
            return b"HTTP/1.1 401 %s\r\nContent-Length: 0\r\n\r\n" % reason, False
        return OK, False

    async def main():
        async with ScriptedServer(verify) as srv, SiteClient(srv.url("/Zürich/")) as site:
            msg_id = "id with spaces/ü"
            headers = [(b"NServiceBus.Id", core.url_encode(msg_id).encode())]
            headers += auth.signature_headers(secret, "hq", "POST", site.target, msg_id, body, now=1_800_000_000)
            r = await site.post(headers, body)
            assert (r.status, r.reason) == (200, "OK")
            r = await site.post(headers, body + b" ")           # body changed after signing
            assert (r.status, r.reason.split(":")[0]) == (401, "bad-signature")

    run(main())


# -- against a real gwcore Gateway -------------------------------------------------------------------


def submit_headers(msg_id: str, body: bytes, md5: str | None = None) -> list[tuple[bytes, bytes]]:
    """A protocol.md §8.1 submit's headers, names and values encoded with the core's .NET rules."""
    plain = [
        ("NServiceBus.Id", msg_id),
        ("NServiceBus.CorrelationId", msg_id),
        ("NServiceBus.ReplyToAddress", "Headquarters"),
        ("NServiceBus.Header.NServiceBus.MessageId", msg_id),
        ("NServiceBus.Header.NServiceBus.MessageIntent", "Send"),
        ("NServiceBus.Header.NServiceBus.CorrelationId", msg_id),
        ("NServiceBus.Header.NServiceBus.ContentType", "application/json"),
        ("NServiceBus.Header.NServiceBus.EnclosedMessageTypes",
         "Shared.UpdatePrice, Shared, Version=1.0.0.0, Culture=neutral, PublicKeyToken=null"),
        ("NServiceBus.Header.NServiceBus.TimeSent", "2026-08-20 10:15:30:123456 Z"),
        ("NServiceBus.Header.NServiceBus.OriginatingSite", "http,http://localhost:25899/Headquarters/"),
        ("NServiceBus.Header.$.diagnostics.hostid", "Zürich a b~c"),
        ("NServiceBus.Gateway", "True"),
        ("NServiceBus.CallType", "SingleCallSubmit"),
        ("Content-MD5", md5 if md5 is not None else core.content_md5(body)),
    ]
    return [(core.url_encode(n).encode("ascii"), core.url_encode(v).encode("ascii")) for n, v in plain]


def test_submit_to_a_real_gateway_is_queued(run, gateway_factory):
    async def main():
        async with gateway_factory() as gw:
            host, port = gw.addresses[0]
            async with SiteClient(f"http://{host}:{port}/RemoteSite/") as site:
                ids = [str(uuid.uuid4()) for _ in range(5)]
                for msg_id in ids:
                    r = await site.post(submit_headers(msg_id, b'{"Hello":"World"}'), b'{"Hello":"World"}')
                    assert (r.status, r.reason, r.body) == (200, "OK", b"OK")
                # a replay (the stale-retry case) is a duplicate: 200, stored once
                r = await site.post(submit_headers(ids[0], b'{"Hello":"World"}'), b'{"Hello":"World"}')
                assert r.status == 200
                bad = await site.post(submit_headers(str(uuid.uuid4()), b"x", md5=core.content_md5(b"y")), b"x")
                assert (bad.status, bad.reason) == (
                    412, "MD5 hash received does not match hash calculated on server. Please resubmit.")
                assert site.connections_opened == 1
            got = []
            for _ in ids:
                msg = await asyncio.wait_for(gw.messages().get(), 5)
                got.append(msg)
            assert [m.id for m in got] == ids
            m = got[0]
            assert m.body == b'{"Hello":"World"}'
            assert m.headers["NServiceBus.EnclosedMessageTypes"].startswith("Shared.UpdatePrice, Shared,")
            assert m.headers["NServiceBus.TimeSent"] == "2026-08-20 10:15:30:123456 Z"
            assert m.headers["$.diagnostics.hostid"] == "Zürich a b~c"
            assert m.headers["NServiceBus.OriginatingSite"] == "http,http://localhost:25899/Headquarters/"
            assert len(gw.store.read_queue(0, 100)) == 5

    run(main())


def test_gateway_closing_idle_connections_is_survived(run, gateway_factory):
    async def main():
        async with gateway_factory(http_keepalive_timeout=0.2) as gw:
            host, port = gw.addresses[0]
            async with SiteClient(f"http://{host}:{port}/RemoteSite/") as site:
                body = b'{"n":1}'
                assert (await site.post(submit_headers(str(uuid.uuid4()), body), body)).status == 200
                await until(lambda: not gw.states[0].connections, "the gateway to close the idle connection")
                assert (await site.post(submit_headers(str(uuid.uuid4()), body), body)).status == 200
                assert site.connections_opened == 2

    run(main())
