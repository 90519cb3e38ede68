"""The receiving side of site authentication (docs/security.md): signed requests against a real
gateway on a real socket, two gateways signing and verifying end to end, and TLS on the listener
with certificate verification on the sender."""

from __future__ import annotations

import time
import uuid

import pytest

from gwcore import Gateway, Settings, SiteClient, auth, make_client_ssl_context
from gwcore._core import core
from gwcore.egress import failed_sends, wire_headers
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


DIGEST_MISMATCH = "Content-Digest received does not match the digest calculated on server. Please resubmit."


def digest_line(body: bytes) -> bytes:
    """A Content-Digest header line declaring *body*'s SHA-256, URL-encoded as gwcore sends it."""
    return b"Content-Digest: " + core.url_encode(f"sha-256=:{auth.body_digest(body)}:").encode()


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


def assert_refused(r, reason: str, challenge: str = "gwcore-v2, gwcore-v1") -> None:
    assert r.status == 401
    assert r.reason.startswith(f"Unauthorized: {reason} (") and r.body == r.reason.encode()
    assert r.headers["www-authenticate"] == challenge


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


NO_MATCH = "the signature does not match: a key id or secret this site does not have, or a request changed on the way"


@pytest.mark.parametrize("case,reason,advice", [
    ("wrong-secret", "bad-signature", NO_MATCH),
    ("unknown-key", "bad-signature", NO_MATCH),
    ("stale", "date-out-of-window", "s old (limit 300 s): stale or replayed"),
    ("future", "date-out-of-window", "in the future (limit 300 s): check the clocks"),
    ("body-tampered", "bad-signature", NO_MATCH),
    ("path-changed", "bad-signature", NO_MATCH),
    ("malformed", "malformed-signature", "gwcore-Signature is not 'v1.<key id>.<signature>' or 'v2.<key id>.<signature>'"),
    ("no-date", "missing-date", "no gwcore-Date header; sign with gwcore.auth.signature_headers_v2"),
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
            # v1 covers the body by its digest: a streamed part must declare it, to be checked at its head
            req = signed(msg_id, call_type="SingleCallDatabusProperty")
            head, _, body = req.partition(b"\r\n\r\n")
            assert_refused(await post(gw, head + b"\r\nNServiceBus.Gateway.DataBusKey: k\r\n\r\n" + body),
                           "missing-digest")
            # signed over another body, and declaring that body's digest: the blob does not match (412)
            other = b"something else"
            req = signed(msg_id, sign_body=other, call_type="SingleCallDatabusProperty")
            head, _, body = req.partition(b"\r\n\r\n")
            r = await post(gw, head + b"\r\nNServiceBus.Gateway.DataBusKey: k\r\n" + digest_line(other) + b"\r\n\r\n" + body)
            assert (r.status, r.reason) == (412, DIGEST_MISMATCH)
            # the digest it declares is not the one signed
            head, _, body = signed(msg_id, call_type="SingleCallDatabusProperty").partition(b"\r\n\r\n")
            assert_refused(await post(gw, head + b"\r\nNServiceBus.Gateway.DataBusKey: k\r\n" + digest_line(other)
                                      + b"\r\n\r\n" + body), "bad-signature")
            r = await post(gw, head + b"\r\nNServiceBus.Gateway.DataBusKey: k\r\n" + digest_line(BODY) + b"\r\n\r\n" + body)
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
                (_seq, rec), = failed_sends(hq.store)
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


# -- scheme v2 on the wire ------------------------------------------------------------------------------

import asyncio  # noqa: E402
import os  # noqa: E402

from gwcore import databus  # noqa: E402

PATH = "/RemoteSite/"


def blob_dir_entries(gw: Gateway) -> list[str]:
    """Every name in the blob dir: sealed blobs and .tmp files of parts being written alike."""
    d = databus.blob_dir(gw.settings.data_dir)
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def md5_of(body: bytes) -> str:
    return core.url_encode(core.content_md5(body))


def base_headers(msg_id: str, body: bytes = BODY, **more: str) -> list[tuple[str, str]]:
    """A gateway submit's headers, as written on the wire (values URL-encoded)."""
    return [("NServiceBus.Id", msg_id), ("NServiceBus.CorrelationId", msg_id),
            ("NServiceBus.Header.NServiceBus.MessageId", msg_id),
            *[(n.replace("_", "."), v) for n, v in more.items()],
            ("NServiceBus.Gateway", "True"), ("NServiceBus.CallType", "SingleCallSubmit"),
            ("Content-MD5", md5_of(body))]


def v2_signed(headers: list[tuple[str, str]], body: bytes = BODY, *, secret: bytes = SECRET, key_id: str = "hq",
              sign_body: bytes | None = None, now: float | None = None) -> list[tuple[str, str]]:
    """*headers* and the three that sign them (gwcore.auth.signature_headers_v2)."""
    added = auth.signature_headers_v2(secret, key_id, "POST", PATH, [(n.encode(), v.encode()) for n, v in headers],
                                      body if sign_body is None else sign_body, now=now)
    return headers + [(n.decode(), v.decode()) for n, v in added]


def raw_request(headers: list[tuple[str, str]], body: bytes = BODY, *, length: int | None = None) -> bytes:
    lines = [f"POST {PATH} HTTP/1.1", "Host: localhost", *[f"{n}: {v}" for n, v in headers],
             f"Content-Length: {len(body) if length is None else length}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def changed(name: str, value: str):
    return lambda hs: [(n, value if n == name else v) for n, v in hs]


def added(name: str, value: str):
    return lambda hs: hs + [(name, value)]


def removed(name: str):
    return lambda hs: [(n, v) for n, v in hs if n != name]


EMT = "NServiceBus.Header.NServiceBus.EnclosedMessageTypes"


@pytest.mark.parametrize("base,tamper", [
    # headers added on the way: each would be stored with the message or change how it is handled
    ({}, added(EMT, "Evil.Command%2C+Evil")),
    ({}, added("NServiceBus.ReplyToAddress", "Elsewhere")),
    ({}, added("NServiceBus.TimeToBeReceived", "00%3A00%3A01")),
    ({}, added("NServiceBus.Header.Custom", "x")),
    ({}, added("nservicebus.header.lower-cased", "x")),
    ({}, added("NServiceBus.Gateway.DataBusKey", "k")),
    ({}, added("gwcore-Forwarded", "1")),
    # values changed on the way
    ({EMT: "Shared.UpdatePrice%2C+Shared"}, changed(EMT, "Shared.DeleteAll%2C+Shared")),
    ({"NServiceBus.ReplyToAddress": "Headquarters"}, changed("NServiceBus.ReplyToAddress", "Elsewhere")),
    ({"NServiceBus.TimeToBeReceived": "00%3A10%3A00"}, changed("NServiceBus.TimeToBeReceived", "1.00%3A00%3A00")),
    ({}, changed("NServiceBus.CallType", "0")),
    ({}, changed("NServiceBus.Header.NServiceBus.MessageId", "another")),
    ({}, changed("Content-MD5", md5_of(b"x"))),
    # a signed header removed
    ({"NServiceBus.TimeToBeReceived": "00%3A10%3A00"}, removed("NServiceBus.TimeToBeReceived")),
], ids=lambda x: getattr(x, "__name__", None) if callable(x) else None)
def test_v2_a_header_added_changed_or_removed_on_the_way_is_refused(run, gateway_factory, base, tamper):
    async def main():
        async with gateway_factory(receive_keys=KEYS) as gw:
            good = str(uuid.uuid4())
            r = await post(gw, raw_request(v2_signed(base_headers(good, **base))))
            assert (r.status, r.reason) == (200, "OK")
            msg_id = str(uuid.uuid4())
            assert_refused(await post(gw, raw_request(tamper(v2_signed(base_headers(msg_id, **base))))),
                           "bad-signature")
            assert stored(gw) == [good] and gw.store.counts()["dedup"] == 1

    run(main())


def test_v2_an_added_call_type_is_refused(run, gateway_factory):
    # signed without a call type (a 400), sent with one (a submit)
    async def main():
        async with gateway_factory(receive_keys=KEYS) as gw:
            msg_id = str(uuid.uuid4())
            headers = [h for h in base_headers(msg_id) if h[0] != "NServiceBus.CallType"]
            r = await post(gw, raw_request(v2_signed(headers)))
            assert (r.status, r.reason) == (400, "Required header 'NServiceBus.CallType' missing.")
            assert_refused(await post(gw, raw_request(v2_signed(headers) + [("NServiceBus.CallType", "SingleCallSubmit")])),
                           "bad-signature")
            assert stored(gw) == []

    run(main())


def test_v2_signed_message_is_stored_with_its_headers(run, gateway_factory):
    async def main():
        async with gateway_factory(receive_keys=KEYS, auth_accept_v1=False) as gw:
            msg_id = str(uuid.uuid4())
            r = await post(gw, raw_request(v2_signed(base_headers(msg_id, **{EMT: "Shared.UpdatePrice%2C+Shared"}))))
            assert (r.status, r.reason) == (200, "OK")
            (msg,) = await drain(gw, 1)
            assert (msg.id, msg.body) == (msg_id, BODY)
            assert msg.headers["NServiceBus.EnclosedMessageTypes"] == "Shared.UpdatePrice, Shared"

    run(main())


def test_v2_submit_whose_body_does_not_match_its_digest_is_412(run, gateway_factory):
    async def main():
        async with gateway_factory(receive_keys=KEYS) as gw:
            msg_id = str(uuid.uuid4())
            body = b'{"Sku":"A1","Price":0.01}'
            # signed over the declared digest of BODY, sent with another body (and its right MD5)
            headers = v2_signed(base_headers(msg_id, body), body, sign_body=BODY)
            r = await post(gw, raw_request(headers, body))
            assert (r.status, r.reason) == (412, DIGEST_MISMATCH)
            assert stored(gw) == [] and gw.store.counts()["dedup"] == 0
            # a v2 signature without a Content-Digest
            headers = [h for h in v2_signed(base_headers(msg_id)) if h[0] != "Content-Digest"]
            r = await post(gw, raw_request(headers))
            assert_refused(r, "missing-digest")
            assert "Content-Digest: sha-256=:<base64 SHA-256 of the body>: (RFC 9530)" in r.reason
            assert stored(gw) == []

    run(main())


def part_headers(msg_id: str, body: bytes, *, md5: bool = True) -> list[tuple[str, str]]:
    return [("NServiceBus.Id", msg_id), ("NServiceBus.CorrelationId", msg_id),
            ("NServiceBus.Header.NServiceBus.DataBus.k", "k"),
            ("NServiceBus.Gateway.DataBusKey", "NServiceBus.Header.NServiceBus.DataBus.k"),
            ("NServiceBus.Gateway", "True"), ("NServiceBus.CallType", "SingleCallDatabusProperty"),
            *([("Content-MD5", md5_of(body))] if md5 else [])]


@pytest.mark.parametrize("size", [10, 300_000])
def test_v2_part_whose_body_does_not_match_its_digest_is_412_and_its_blob_removed(run, gateway_factory, size):
    async def main():
        async with gateway_factory(receive_keys=KEYS) as gw:
            body = os.urandom(size)
            msg_id = str(uuid.uuid4())
            headers = v2_signed(part_headers(msg_id, body, md5=False), body, sign_body=os.urandom(size))
            r = await post(gw, raw_request(headers, body))
            assert (r.status, r.reason) == (412, DIGEST_MISMATCH)
            deadline = time.monotonic() + 10
            while blob_dir_entries(gw):  # removed by a blob thread just after the answer
                assert time.monotonic() < deadline, blob_dir_entries(gw)
                await asyncio.sleep(0.01)
            assert gw.store.counts()["databus_parts"] == 0 and gw.store.counts()["databus_blobs"] == 0
            # the same part, right: stored
            r = await post(gw, raw_request(v2_signed(part_headers(msg_id, body, md5=False), body), body))
            assert (r.status, r.reason) == (200, "OK")
            assert gw.store.counts()["databus_parts"] == 1
            # a signed part whose DataBusKey was changed on the way: refused at its head
            headers = changed("NServiceBus.Gateway.DataBusKey", "NServiceBus.Header.NServiceBus.DataBus.other")(
                v2_signed(part_headers(str(uuid.uuid4()), body), body))
            assert_refused(await post(gw, raw_request(headers, body)), "bad-signature")
            assert gw.store.counts()["databus_parts"] == 1

    run(main())


FORGED = "A" * 43


def forged_part(shape: str, msg_id: str, size: int) -> bytes:
    """The head of a *size*-byte part signed in one of the ways a forger may try."""
    declared = ("Content-Digest", core.url_encode(f"sha-256=:{auth.body_digest(b'anything')}:"))
    date = ("gwcore-Date", auth.format_date(time.time()))
    headers = part_headers(msg_id, b"", md5=False)
    if shape == "v1":                       # the key id of the sender, a made-up HMAC
        headers += [declared, date, ("gwcore-Signature", f"v1.hq.{FORGED}")]
    elif shape == "v1-no-digest":
        headers += [date, ("gwcore-Signature", f"v1.hq.{FORGED}")]
    elif shape == "v1-unknown-key":
        headers += [declared, date, ("gwcore-Signature", f"v1.Headquarters.{FORGED}")]
    elif shape == "v2":
        headers += [declared, date, ("gwcore-Signature", f"v2.hq.{FORGED}")]
    elif shape == "v2-wrong-secret":        # everything right but the secret
        headers = v2_signed(headers, sign_body=b"anything", secret=b"not-the-secret-0123456789")
    else:
        assert shape == "v2-unknown-key"
        headers = v2_signed(headers, sign_body=b"anything", key_id="Headquarters")
    return raw_request(headers, b"", length=size)


@pytest.mark.parametrize("shape,reason", [
    ("v1", "bad-signature"), ("v1-no-digest", "missing-digest"), ("v1-unknown-key", "bad-signature"),
    ("v2", "bad-signature"), ("v2-wrong-secret", "bad-signature"), ("v2-unknown-key", "bad-signature"),
])
def test_forged_64_mib_part_is_refused_at_its_head_with_nothing_written(run, gateway_factory, shape, reason):
    size = 64 << 20
    sent = 1 << 20

    async def main():
        async with gateway_factory(receive_keys=KEYS) as gw:
            async with Client(*gw.addresses[0]) as c:
                await c.send(forged_part(shape, str(uuid.uuid4()), size) + os.urandom(sent))
                # answered while the client has sent 1 MiB of the 64: the body was not waited for
                r = await asyncio.wait_for(c.response(), 10)
                assert_refused(r, reason)
                assert blob_dir_entries(gw) == []       # no blob, no .tmp file: nothing was opened
                assert await c.closed()                 # and the rest of the body is not read
            assert blob_dir_entries(gw) == []
            counts = gw.store.counts()
            assert counts["databus_parts"] == counts["databus_blobs"] == counts["dedup"] == 0
            assert 'gwcore_http_requests_total{status="401"} 1' in gw.render_metrics()

    run(main())


def test_unknown_key_id_and_wrong_secret_get_the_same_answer(run, gateway_factory):
    async def main():
        async with gateway_factory(receive_keys=KEYS) as gw:
            answers = []
            for secret, key_id in ((b"not-the-secret-0123456789", "hq"), (SECRET, "Headquarters"),
                                   (b"not-the-secret-0123456789", "Branch")):
                v1 = await post(gw, signed(str(uuid.uuid4()), secret=secret, key_id=key_id))
                v2 = await post(gw, raw_request(v2_signed(base_headers(str(uuid.uuid4())), secret=secret, key_id=key_id)))
                answers += [(v1.status, v1.reason), (v2.status, v2.reason)]
            assert len(set(answers)) == 1 and answers[0][0] == 401
            assert "Headquarters" not in answers[0][1] and "Branch" not in answers[0][1]
            assert stored(gw) == []

    run(main())


def accept_v1_config(tmp_path, value: str) -> str:
    path = tmp_path / "remote.toml"
    path.write_text(f'[receive]\naccept_v1 = {value}\n[receive.keys]\nhq = "{SECRET.decode()}"\n')
    return str(path)


def test_accept_v1_setting(tmp_path):
    assert Settings.from_env({}).auth_accept_v1 is True
    assert Settings.from_env({"GWCORE_AUTH_ACCEPT_V1": "0"}).auth_accept_v1 is False
    cfg = accept_v1_config(tmp_path, "false")
    s = Settings.from_env({"GWCORE_CONFIG": cfg})
    assert (s.auth_accept_v1, s.receive_keys, s.allow_unsigned) == (False, (("hq", SECRET),), False)
    # the environment wins over the file
    assert Settings.from_env({"GWCORE_CONFIG": cfg, "GWCORE_AUTH_ACCEPT_V1": "1"}).auth_accept_v1 is True
    from gwcore.errors import ConfigurationError
    with pytest.raises(ConfigurationError, match="GWCORE_AUTH_ACCEPT_V1"):
        Settings.from_env({"GWCORE_AUTH_ACCEPT_V1": "maybe"})
    with pytest.raises(ConfigurationError, match="accept_v1 must be true or false"):
        Settings.from_env({"GWCORE_CONFIG": accept_v1_config(tmp_path, '"no"')})


def test_v1_is_accepted_by_default_and_refused_with_accept_v1_off(run, gateway_factory, tmp_path):
    async def main():
        async with gateway_factory(receive_keys=KEYS) as gw:
            msg_id = str(uuid.uuid4())
            assert (await post(gw, signed(msg_id))).status == 200
            assert stored(gw) == [msg_id]
        async with gateway_factory(receive_keys=KEYS, auth_accept_v1=False,
                                   data_dir=str(tmp_path / "v2only")) as gw:
            r = await post(gw, signed(str(uuid.uuid4())))
            assert_refused(r, "v1-refused", challenge="gwcore-v2")
            assert "this site accepts scheme v2 signatures only (accept_v1 = false)" in r.reason
            msg_id = str(uuid.uuid4())
            assert (await post(gw, raw_request(v2_signed(base_headers(msg_id))))).status == 200
            assert stored(gw) == [msg_id]

    run(main())


def test_gateway_to_gateway_signs_with_v2_submits_and_parts(run, tmp_path):
    """The real sender against a receiver that refuses v1 (GWCORE_CONFIG [receive] accept_v1 =
    false): a message with headers and two databus properties arrives whole."""
    async def main():
        settings = settings_for(tmp_path, "RemoteSite", config_file=accept_v1_config(tmp_path, "false"))
        async with Gateway(settings) as remote:
            assert remote.states[0].verifier.accept_v1 is False
            cfg = sender_config(tmp_path, url_of(remote, "RemoteSite"), SECRET)
            async with Gateway(settings_for(tmp_path, "Headquarters", config_file=cfg)) as hq:
                big = os.urandom(300_000)
                msg_id = await hq.send_to_sites(["RemoteSite"], BODY, {"NServiceBus.EnclosedMessageTypes": "Shared.X"},
                                                databus={"Big": big, "Empty": b""})
                (msg,) = await drain(remote, 1)
                assert (msg.id, msg.body) == (msg_id, BODY)
                assert msg.headers["NServiceBus.EnclosedMessageTypes"] == "Shared.X"
                assert {k: b.read() for k, b in msg.databus.items()} == {
                    "NServiceBus.DataBus.Big": big, "NServiceBus.DataBus.Empty": b""}
                await until(lambda: hq.store.counts()["outgoing"] == 0)
                assert hq.store.counts()["outgoing_errors"] == 0
                assert remote.states[0].requests_by_status[401] == 0

    run(main())


def test_selected_mode_forwards_a_held_signed_submit_signed_again(run, gateway_factory):
    """A standby that held a submit through a handover posts it to the new leader framed again from
    its stored form (gwcore/selected/handover.py): a v2 signature over the headers as sent would
    not hold there, so the standby, having verified it, signs it again with the same key."""
    from types import SimpleNamespace

    from gwcore.selected.handover import Handover

    async def main():
        async with gateway_factory(receive_keys=KEYS, auth_accept_v1=False) as leader:
            verifier = auth.Verifier(KEYS, 300.0, False)
            parser = core.RequestParser(core.Framer("RemoteSite", signatures=True), [b"/remotesite/"],
                                        max_headers=100, max_header_bytes=65536, max_body=1 << 20, allow_get=False)
            v2_id, v1_id = str(uuid.uuid4()), str(uuid.uuid4())
            held = [parser.feed(raw_request(v2_signed(base_headers(v2_id, **{EMT: "Shared.X"}))), 0)[0][2],
                    parser.feed(signed(v1_id), 0)[0][2]]
            standby = SimpleNamespace(leader_url=url_of(leader, "RemoteSite"))
            for env in held:
                assert verifier.check(env) is None
                assert await Handover._post(standby, env, verifier) == (200, "OK", b"OK")
            assert stored(leader) == [v2_id, v1_id]
            msgs = {m.id: m for m in await drain(leader, 2)}
            assert msgs[v2_id].headers["NServiceBus.EnclosedMessageTypes"] == "Shared.X"

    run(main())
