"""The receiving side of site authentication (docs/security.md): signed requests against a real
gateway on a real socket, two gateways signing and verifying end to end, and TLS on the listener
with certificate verification on the sender."""

from __future__ import annotations

import time
import uuid

import pytest

from gwcore import Gateway, Settings, SiteClient, auth, make_client_ssl_context
from gwcore._core import core
from gwcore.egress import wire_headers
from gwcore.errors import SendTLSError
from httpclient import Client, nsb_request
from test_egress import drain, settings_for, until, url_of

SECRET = b"0123456789abcdef-hq-secret"
KEYS = (("hq", SECRET),)
BODY = b'{"Sku":"A1","Price":12.5}'


def signed(msg_id: str, body: bytes = BODY, *, path: str = "/RemoteSite/", secret: bytes = SECRET,
           key_id: str = "hq", now: float | None = None, sign_path: str | None = None,
           sign_body: bytes | None = None, call_type: str = "SingleCallSubmit") -> bytes:
    """A submit signed with gwcore.auth.signature_headers; sign_path/sign_body sign something else
    than what is sent (a request changed on the way)."""
    headers = auth.signature_headers(secret, key_id, "POST", sign_path or path, msg_id,
                                     body if sign_body is None else sign_body, now=now)
    extra = [(n.decode("ascii"), v.decode("ascii")) for n, v in headers]
    return nsb_request(msg_id, body, path=path, extra=extra, call_type=call_type)


def with_signature(msg_id: str, date: str | None, signature: str) -> bytes:
    """A submit carrying the given gwcore-Date (None: none) and gwcore-Signature as they are."""
    extra = ([("gwcore-Date", date)] if date is not None else []) + [("gwcore-Signature", signature)]
    return nsb_request(msg_id, BODY, extra=extra)


def signature_of(request: bytes) -> str:
    (line,) = [x for x in request.split(b"\r\n") if x.startswith(b"gwcore-Signature: ")]
    return line.partition(b": ")[2].decode()


async def post(gw: Gateway, data: bytes):
    async with Client(*gw.addresses[0]) as c:
        return await c.request(data)


def stored(gw: Gateway) -> list[str]:
    return [core.decode_envelope(framed)[0] for _seq, framed in gw.store.read_queue(0, 100)]


def assert_refused(r, reason: str) -> None:
    assert r.status == 401
    assert r.reason.startswith(f"Unauthorized: {reason} (") and r.body == r.reason.encode()
    assert r.headers["www-authenticate"] == "gwcore-v1"


def test_signed_request_is_accepted_and_stored(run, gateway_factory):
    async def main():
        async with gateway_factory(receive_keys=KEYS) as gw:
            msg_id = str(uuid.uuid4())
            r = await post(gw, signed(msg_id))
            assert (r.status, r.reason) == (200, "OK")
            assert stored(gw) == [msg_id]
            # a replay inside the window is a duplicate: 200, not stored twice
            assert (await post(gw, signed(msg_id))).status == 200
            assert stored(gw) == [msg_id]
            (msg,) = await drain(gw, 1)
            assert msg.body == BODY
            assert not any(name.lower().startswith("gwcore-") for name in msg.headers)

    run(main())


def test_unsigned_request_is_refused_and_nothing_is_stored(run, gateway_factory):
    async def main():
        async with gateway_factory(receive_keys=KEYS) as gw:
            r = await post(gw, nsb_request(str(uuid.uuid4())))
            assert_refused(r, "missing-signature")
            assert "docs/security.md" in r.reason
            assert stored(gw) == [] and gw.store.counts()["dedup"] == 0
            assert 'gwcore_http_requests_total{status="401"} 1' in gw.render_metrics()

    run(main())


@pytest.mark.parametrize("case,reason,advice", [
    ("wrong-secret", "bad-signature", "check the shared secret for key 'hq'"),
    ("unknown-key", "unknown-key", "key id 'elsewhere' is not in this site's [receive.keys]"),
    ("stale", "date-out-of-window", "s old (limit 300 s): stale or replayed"),
    ("future", "date-out-of-window", "in the future (limit 300 s): check the clocks"),
    ("body-tampered", "bad-signature", "check the shared secret for key 'hq'"),
    ("path-changed", "bad-signature", "check the shared secret for key 'hq'"),
    ("malformed", "malformed-signature", "gwcore-Signature must be 'v1.<key id>.<signature>'"),
    ("no-date", "missing-date", "no gwcore-Date header; sign with gwcore.auth.signature_headers"),
    ("iso-date", "bad-date", "gwcore-Date '2026-01-01T00:00:00Z' is not YYYYMMDDTHHMMSSZ"),
])
def test_bad_signatures_are_refused_with_the_reason(run, gateway_factory, case, reason, advice):
    msg_id = str(uuid.uuid4())
    data = {
        "wrong-secret": lambda: signed(msg_id, secret=b"not-the-secret-0123456789"),
        "unknown-key": lambda: signed(msg_id, key_id="elsewhere"),
        "stale": lambda: signed(msg_id, now=time.time() - 3600),   # a replay of an old request
        "future": lambda: signed(msg_id, now=time.time() + 3600),
        "body-tampered": lambda: signed(msg_id, BODY.replace(b"12.5", b"0.01"), sign_body=BODY),
        "path-changed": lambda: signed(msg_id, path="/RemoteSite/elsewhere", sign_path="/RemoteSite/"),
        "malformed": lambda: with_signature(msg_id, "20260101T000000Z", "v1.hq.tooshort"),
        "no-date": lambda: with_signature(msg_id, None, signature_of(signed(msg_id))),
        # the HMAC is right: the date is looked at after it
        "iso-date": lambda: with_signature(msg_id, "2026-01-01T00:00:00Z", "v1.hq." + auth.sign(
            SECRET, "POST", "/RemoteSite/", "2026-01-01T00:00:00Z", msg_id, auth.body_digest(BODY))),
    }[case]()

    async def main():
        async with gateway_factory(receive_keys=KEYS) as gw:
            r = await post(gw, data)
            assert_refused(r, reason)
            assert advice in r.reason
            assert stored(gw) == [] and gw.store.counts()["dedup"] == 0

    run(main())


def test_stale_replay_of_an_accepted_request_is_refused(run, gateway_factory):
    async def main():
        async with gateway_factory(receive_keys=KEYS) as gw:
            msg_id = str(uuid.uuid4())
            captured = signed(msg_id)
            assert (await post(gw, captured)).status == 200
            # the captured request played again ten minutes later (the window is 5 minutes)
            gw.states[0].verifier.clock = lambda: time.time() + 600
            assert_refused(await post(gw, captured), "date-out-of-window")
            assert stored(gw) == [msg_id]

    run(main())


def test_second_key_id_side_by_side_for_rotation(run, gateway_factory):
    async def main():
        new = b"fedcba9876543210-new-secret"
        async with gateway_factory(receive_keys=KEYS + (("hq-2026", new),)) as gw:
            a, b = str(uuid.uuid4()), str(uuid.uuid4())
            assert (await post(gw, signed(a))).status == 200
            assert (await post(gw, signed(b, secret=new, key_id="hq-2026"))).status == 200
            assert_refused(await post(gw, signed(str(uuid.uuid4()), secret=new)), "bad-signature")
            assert stored(gw) == [a, b]

    run(main())


def test_databus_part_is_authenticated(run, gateway_factory):
    async def main():
        async with gateway_factory(receive_keys=KEYS) as gw:
            key = [("NServiceBus.Gateway.DataBusKey", "NServiceBus.Header.NServiceBus.DataBus.k")]
            # unsigned: refused at its head, nothing written
            assert_refused(await post(gw, nsb_request(call_type="SingleCallDatabusProperty", extra=key)),
                           "missing-signature")
            msg_id = str(uuid.uuid4())
            # signed over another body: the digest of the streamed blob does not match
            req = signed(msg_id, sign_body=b"something else", call_type="SingleCallDatabusProperty")
            head, _, body = req.partition(b"\r\n\r\n")
            assert_refused(await post(gw, head + b"\r\nNServiceBus.Gateway.DataBusKey: k\r\n\r\n" + body),
                           "bad-signature")
            req = signed(msg_id, call_type="SingleCallDatabusProperty")
            head, _, body = req.partition(b"\r\n\r\n")
            r = await post(gw, head + b"\r\nNServiceBus.Gateway.DataBusKey: k\r\n\r\n" + body)
            assert (r.status, r.reason) == (200, "OK")
            assert gw.store.counts()["databus_parts"] == 1
            # signed without a DataBusKey: 400 after the signature check (framed whole)
            r = await post(gw, signed(str(uuid.uuid4()), call_type="SingleCallDatabusProperty"))
            assert (r.status, r.reason) == (400, "Required header 'NServiceBus.Gateway.DataBusKey' missing.")
            # framing errors found before the id is known are answered as before
            assert (await post(gw, nsb_request(msg_id=""))).status == 400

    run(main())


def test_allow_unsigned_accepts_unsigned_but_not_a_bad_signature(run, gateway_factory):
    async def main():
        async with gateway_factory(receive_keys=KEYS, allow_unsigned=True) as gw:
            msg_id = str(uuid.uuid4())
            assert (await post(gw, nsb_request(msg_id))).status == 200
            assert_refused(await post(gw, signed(str(uuid.uuid4()), secret=b"not-the-secret-0123456789")),
                           "bad-signature")
            assert stored(gw) == [msg_id]

    run(main())


def test_without_keys_anything_is_accepted_as_before(run, gateway_factory):
    async def main():
        async with gateway_factory() as gw:
            assert gw.states[0].verifier is None and not gw.states[0].framer.signatures
            a, b = str(uuid.uuid4()), str(uuid.uuid4())
            assert (await post(gw, nsb_request(a))).status == 200
            # a signature nobody checks is just another header
            assert (await post(gw, signed(b, secret=b"not-the-secret-0123456789"))).status == 200
            assert stored(gw) == [a, b]

    run(main())


def test_parser_gives_method_and_target_to_signed_requests_only():
    framer = core.Framer("RemoteSite", signatures=True)
    parser = core.RequestParser(framer, [b"/remotesite/"], max_headers=100, max_header_bytes=65536,
                                max_body=1 << 20, allow_get=False)
    msg_id = str(uuid.uuid4())
    (_, _, env), = parser.feed(signed(msg_id, path="/RemoteSite/x?y=1"), 0)
    assert (env.method, env.target) == ("POST", "/RemoteSite/x?y=1")
    assert env.auth_signature.startswith("v1.hq.") and len(env.auth_date) == 16
    (_, _, env), = parser.feed(nsb_request(msg_id), 0)
    assert (env.method, env.target, env.auth_signature, env.auth_date) == (None, None, None, None)


# -- two gateways, end to end ----------------------------------------------------------------------


def sender_config(tmp_path, url: str, secret: bytes, ca: str | None = None) -> str:
    path = tmp_path / "hq.toml"
    path.write_text(f'[sites.RemoteSite]\nurl = "{url}"\nsecret = "{secret.decode()}"\nkey_id = "hq"\n'
                    + (f'ca_file = "{ca}"\n' if ca else ""))
    return str(path)


async def send_and_receive(hq: Gateway, remote: Gateway) -> None:
    """hq sends one message to RemoteSite: it arrives once and leaves hq's outgoing queue."""
    msg_id = await hq.send_to_sites(["RemoteSite"], BODY)
    (msg,) = await drain(remote, 1)
    assert (msg.id, msg.body) == (msg_id, BODY)
    await until(lambda: hq.store.counts()["outgoing"] == 0)
    assert hq.store.counts()["outgoing_errors"] == 0


def test_signed_sends_between_two_gateways(run, tmp_path):
    async def main():
        async with Gateway(settings_for(tmp_path, "RemoteSite", receive_keys=KEYS)) as remote:
            cfg = sender_config(tmp_path, url_of(remote, "RemoteSite"), SECRET)
            async with Gateway(settings_for(tmp_path, "Headquarters", config_file=cfg)) as hq:
                await send_and_receive(hq, remote)

    run(main())


def test_wrong_secret_ends_in_the_senders_error_queue_at_once(run, tmp_path):
    async def main():
        async with Gateway(settings_for(tmp_path, "RemoteSite", receive_keys=KEYS)) as remote:
            cfg = sender_config(tmp_path, url_of(remote, "RemoteSite"), b"not-the-secret-0123456789")
            async with Gateway(settings_for(tmp_path, "Headquarters", config_file=cfg, retries=4)) as hq:
                await hq.send_to_sites(["RemoteSite"], BODY)
                await until(lambda: hq.store.counts()["outgoing_errors"] == 1)
                (_seq, rec), = hq.store.failed_sends()
                assert rec.attempt == 1 and rec.last_error.startswith("401 Unauthorized: bad-signature")
                assert remote.store.counts()["queue"] == 0

    run(main())


# -- TLS -----------------------------------------------------------------------------------------------


def tls_settings(tmp_path, pki, **kw) -> Settings:
    """RemoteSite on an https:// channel with a certificate from the test CA."""
    return Settings.from_env({}, data_dir=str(tmp_path / "RemoteSite"), endpoint="RemoteSite",
                             receive_channels="https://127.0.0.1:0/RemoteSite/",
                             tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"), **kw)


def https_url(gw: Gateway) -> str:
    host, port = gw.addresses[0]
    return f"https://{host}:{port}/RemoteSite/"


def test_https_listener_with_a_trusted_ca(run, tmp_path, pki):
    async def main():
        async with Gateway(tls_settings(tmp_path, pki)) as gw:
            ctx = make_client_ssl_context(str(pki / "ca.pem"))
            async with SiteClient(https_url(gw), ssl_context=ctx) as site:
                msg_id = str(uuid.uuid4())
                r = await site.post(wire_headers(msg_id, {"NServiceBus.MessageId": msg_id}, BODY), BODY)
                assert (r.status, r.reason) == (200, "OK")
            assert stored(gw) == [msg_id]

    run(main())


def test_https_listener_not_trusted_without_the_ca(run, tmp_path, pki):
    async def main():
        async with Gateway(tls_settings(tmp_path, pki)) as gw:
            async with SiteClient(https_url(gw)) as site:       # the system's CAs only
                msg_id = str(uuid.uuid4())
                with pytest.raises(SendTLSError, match="certificate"):
                    await site.post(wire_headers(msg_id, {"NServiceBus.MessageId": msg_id}, BODY), BODY)
            assert stored(gw) == []

    run(main())


def test_two_gateways_over_https_signed(run, tmp_path, pki):
    async def main():
        async with Gateway(tls_settings(tmp_path, pki, receive_keys=KEYS)) as remote:
            cfg = sender_config(tmp_path, https_url(remote), SECRET)
            settings = settings_for(tmp_path, "Headquarters", config_file=cfg, tls_ca=str(pki / "ca.pem"))
            async with Gateway(settings) as hq:
                await send_and_receive(hq, remote)

    run(main())
