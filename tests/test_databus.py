"""The claim check (databus) over the gateway: durable parts, the submit's rewrite, expiry, the
sending side, two sites, a SIGKILL between parts and submit, and memory while a 1 GiB part
streams in."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest
from httpclient import Client, nsb_request
from procs import ROOT, ServerProcess, free_port, gwcore_cli, vm_hwm_kib

from gwcore import Gateway, Settings, databus
from gwcore.egress import failed_sends, outgoing_records
from gwcore.store import Store

MSG_ID = "0b1f6f0e-5d8a-4f43-b1d5-b3a400c1d2e3"
SENDER_KEY = "9999-12-31_23/7d0d3c1e-2f4a-4b7e-9a51-0c8d2f6e4b11"
SENDER_KEY_WIRE = "9999-12-31_23%2F7d0d3c1e-2f4a-4b7e-9a51-0c8d2f6e4b11"
PART_HEADER = "NServiceBus.Header.NServiceBus.DataBus." + SENDER_KEY
BLOB = b'"AAECAw=="'

# protocol.md §8.3, request 1 and request 2, byte for byte (the "all NServiceBus.Header.* lines of
# 8.1" spelled out).
_COMMON = (
    "Host: localhost:25900\r\n"
    f"NServiceBus.Id: {MSG_ID}\r\n"
    f"NServiceBus.CorrelationId: {MSG_ID}\r\n"
    "NServiceBus.ReplyToAddress: Headquarters\r\n"
    f"NServiceBus.Header.NServiceBus.MessageId: {MSG_ID}\r\n"
    "NServiceBus.Header.NServiceBus.MessageIntent: Send\r\n"
    "NServiceBus.Header.NServiceBus.ConversationId: 5c0e9a47-3a5e-4d0c-9a1c-b3a400c1d2e3\r\n"
    f"NServiceBus.Header.NServiceBus.CorrelationId: {MSG_ID}\r\n"
    "NServiceBus.Header.NServiceBus.ReplyToAddress: Headquarters\r\n"
    "NServiceBus.Header.NServiceBus.OriginatingEndpoint: Headquarters\r\n"
    "NServiceBus.Header.NServiceBus.OriginatingMachine: HQ-SRV01\r\n"
    "NServiceBus.Header.NServiceBus.ContentType: application%2Fjson\r\n"
    "NServiceBus.Header.NServiceBus.EnclosedMessageTypes: Shared.UpdatePrice%2C+Shared%2C+Version%3D1.0.0.0%2C+Culture%3Dneutral%2C+PublicKeyToken%3Dnull\r\n"
    "NServiceBus.Header.NServiceBus.Version: 10.2.8\r\n"
    "NServiceBus.Header.NServiceBus.TimeSent: 2026-08-20+10%3A15%3A30%3A123456+Z\r\n"
    "NServiceBus.Header.NServiceBus.DestinationSites: RemoteSite\r\n"
    "NServiceBus.Header.NServiceBus.OriginatingSite: http%2Chttp%3A%2F%2Flocalhost%3A25899%2FHeadquarters%2F\r\n"
    f"NServiceBus.Header.NServiceBus.DataBus.{SENDER_KEY_WIRE}: {SENDER_KEY_WIRE}\r\n"
    "NServiceBus.Header.NServiceBus.DataBusConfig.ContentType: application%2Fjson\r\n"
)
PART_8_3 = (
    "POST /RemoteSite/ HTTP/1.1\r\n" + _COMMON
    + f"NServiceBus.Gateway.DataBusKey: NServiceBus.Header.NServiceBus.DataBus.{SENDER_KEY_WIRE}\r\n"
    "NServiceBus.Gateway: True\r\n"
    "NServiceBus.CallType: SingleCallDatabusProperty\r\n"
    "Content-Type: application/x-www-form-urlencoded\r\n"
    "Content-MD5: Nbvu6YGnTj%2B9Hqh2OyA2jw%3D%3D\r\n"
    "Content-Length: 10\r\n"
    "\r\n"
).encode() + BLOB
SUBMIT_8_3 = (
    "POST /RemoteSite/ HTTP/1.1\r\n" + _COMMON
    + "NServiceBus.Gateway: True\r\n"
    "NServiceBus.CallType: SingleCallSubmit\r\n"
    "Content-Type: application/x-www-form-urlencoded\r\n"
    "Content-MD5: 0S9RmNGZjrrjq41F3ZZBjw%3D%3D\r\n"
    "Content-Length: 17\r\n"
    "\r\n"
).encode() + b'{"Hello":"World"}'


def addr(gw):
    return gw.addresses[0]


def blob_files(data_dir: str) -> list[str]:
    d = databus.blob_dir(data_dir)
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


async def until_no_blob_files(gw, timeout: float = 10.0) -> None:
    """A refused part's file is removed by a blob thread, just after the answer: wait for it."""
    deadline = time.monotonic() + timeout
    while blob_files(gw.settings.data_dir):
        assert time.monotonic() < deadline, f"blob files left: {blob_files(gw.settings.data_dir)}"
        await asyncio.sleep(0.01)


def wire_md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode().replace("+", "%2B").replace("/", "%2F").replace("=", "%3D")


def part_request(msg_id: str, key: str, blob: bytes, *, md5: str | None = "auto", ttbr: str | None = None,
                 databus_key: bool = True, parts: tuple[str, ...] | None = None, chunked: bool = False,
                 path: str = "/RemoteSite/") -> bytes:
    """A SingleCallDatabusProperty request for the property *key* of message *msg_id*."""
    names = parts if parts is not None else (key,)
    extra = [(f"NServiceBus.Header.NServiceBus.DataBus.{k}", k) for k in names]
    if ttbr is not None:
        extra.insert(0, ("NServiceBus.TimeToBeReceived", ttbr))
    if databus_key:
        extra.append(("NServiceBus.Gateway.DataBusKey", f"NServiceBus.Header.NServiceBus.DataBus.{key}"))
    req = nsb_request(msg_id, blob, call_type="SingleCallDatabusProperty", extra=extra, path=path,
                      md5=wire_md5(blob) if md5 == "auto" else md5)
    if chunked:
        head, _, body = req.partition(b"\r\n\r\n")
        head = head.replace(f"Content-Length: {len(blob)}".encode(), b"Transfer-Encoding: chunked")
        pieces = [blob[i:i + 7] for i in range(0, len(blob), 7)]
        req = head + b"\r\n\r\n" + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    return req


def submit_request(msg_id: str, parts: tuple[str, ...], body: bytes = b'{"Hello":"World"}', *,
                   path: str = "/RemoteSite/") -> bytes:
    return nsb_request(msg_id, body, extra=[(f"NServiceBus.Header.NServiceBus.DataBus.{k}", k) for k in parts],
                       path=path)


# -- receiving ---------------------------------------------------------------------------------------

def test_protocol_8_3_exchange_byte_for_byte(run, gateway_factory):
    async def main():
        async with gateway_factory() as gw:
            async with Client(*addr(gw)) as c:
                await c.send(PART_8_3)
                raw = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\nOK"), 5)
                assert raw.startswith(b"HTTP/1.1 200 OK\r\n")
                assert b"Content-Type: application/json; charset=utf-8\r\nContent-Length: 2\r\n" in raw
                r = await c.request(SUBMIT_8_3)
                assert (r.status, r.reason, r.body) == (200, "OK", b"OK")
            msg = await asyncio.wait_for(gw.messages().get(), 5)
            name = "NServiceBus.DataBus." + SENDER_KEY
            local = msg.headers[name]
            assert local != SENDER_KEY and len(local) == 32         # the name keeps the sender's key
            assert msg.headers["NServiceBus.DataBusConfig.ContentType"] == "application/json"
            assert msg.body == b'{"Hello":"World"}'
            assert list(msg.databus) == [name]
            blob = msg.databus[name]
            assert blob.key == local and blob.path == os.path.join(gw.store.blob_dir, local)
            with blob.open() as f:
                assert f.read() == BLOB
            assert gw.store.counts()["databus_parts"] == 0            # the part became the message's
            assert gw.store.counts()["databus_blobs"] == 1

    run(main())


def test_submit_8_3_without_its_part_is_412_with_nservicebus_text(run, gateway_factory):
    async def main():
        async with gateway_factory() as gw:
            async with Client(*addr(gw)) as c:
                r = await c.request(SUBMIT_8_3)
                assert (r.status, r.reason) == (412, "Expected 1 claimcheck properties. None were received. Please resubmit.")
                assert r.body == r.reason.encode()
                r = await c.request(PART_8_3.replace(
                    f"NServiceBus.Gateway.DataBusKey: NServiceBus.Header.NServiceBus.DataBus.{SENDER_KEY_WIRE}\r\n".encode(), b""))
                assert (r.status, r.reason) == (400, "Required header 'NServiceBus.Gateway.DataBusKey' missing.")
            assert gw.store.counts()["queue"] == 0 and gw.store.counts()["dedup"] == 0
            assert blob_files(gw.settings.data_dir) == []

    run(main())


def test_part_with_bad_hash_is_412_and_nothing_is_kept(run, gateway_factory):
    async def main():
        async with gateway_factory() as gw:
            async with Client(*addr(gw)) as c:
                for chunked in (False, True):
                    r = await c.request(part_request(str(uuid.uuid4()), "k", b"x" * 5000, md5=wire_md5(b"other"),
                                                     chunked=chunked))
                    assert (r.status, r.reason) == (412, "MD5 hash received does not match hash calculated on server. Please resubmit.")
                # the connection still works
                assert (await c.request(nsb_request())).status == 200
            await until_no_blob_files(gw)
            assert gw.store.counts()["databus_parts"] == 0 and gw.store.counts()["databus_blobs"] == 0

    run(main())


def test_one_part_missing_names_it_and_a_retry_with_all_parts_succeeds(run, gateway_factory):
    async def main():
        async with gateway_factory() as gw:
            msg_id = str(uuid.uuid4())
            keys = ("a", "b")
            async with Client(*addr(gw)) as c:
                assert (await c.request(part_request(msg_id, "a", b"AAA", parts=keys))).status == 200
                r = await c.request(submit_request(msg_id, keys))
                assert (r.status, r.reason) == (412, "ClaimCheck property NServiceBus.Header.NServiceBus.DataBus.b was never received. Please resubmit.")
                # the sender re-sends every part (the first one replaces its earlier blob), then the submit
                assert (await c.request(part_request(msg_id, "a", b"AAA2", parts=keys, chunked=True))).status == 200
                assert (await c.request(part_request(msg_id, "b", b"BBB", parts=keys))).status == 200
                assert (await c.request(submit_request(msg_id, keys))).status == 200
                # a duplicate submit (with its parts sent again) is 200 and stores nothing
                assert (await c.request(part_request(msg_id, "a", b"AAA3", parts=keys))).status == 200
                assert (await c.request(part_request(msg_id, "b", b"BBB3", parts=keys))).status == 200
                assert (await c.request(submit_request(msg_id, keys))).status == 200
            msg = await asyncio.wait_for(gw.messages().get(), 5)
            assert {k: b.read() for k, b in msg.databus.items()} == {
                "NServiceBus.DataBus.a": b"AAA2", "NServiceBus.DataBus.b": b"BBB"}
            counts = gw.store.counts()
            assert (counts["queue"], counts["databus_parts"], counts["databus_blobs"]) == (1, 0, 2)
            assert sorted(blob_files(gw.settings.data_dir)) == sorted(b.key for b in msg.databus.values())

    run(main())


def test_orphaned_part_expires_with_its_time_to_be_received(run, gateway_factory):
    async def main():
        async with gateway_factory() as gw:
            async with Client(*addr(gw)) as c:
                # NServiceBus clamps a TimeToBeReceived below a second to one second
                r = await c.request(part_request(str(uuid.uuid4()), "k", b"orphan", ttbr="00:00:00.2"))
                assert r.status == 200
                keep = str(uuid.uuid4())
                assert (await c.request(part_request(keep, "k", b"kept"))).status == 200
            assert len(blob_files(gw.settings.data_dir)) == 2
            deadline = time.monotonic() + 10
            while gw.store.counts()["databus_blobs"] != 1:
                assert time.monotonic() < deadline, "the orphaned part did not expire"
                await asyncio.sleep(0.1)
            assert gw.writer.blobs_expired == 1
            assert gw.store.counts()["databus_parts"] == 1
            metrics = gw.render_metrics()
            assert "gwcore_databus_expired_total 1" in metrics
            assert "gwcore_databus_parts_waiting 1" in metrics and "gwcore_databus_blobs 1" in metrics
            assert len(blob_files(gw.settings.data_dir)) == 1

    run(main())


def test_orphan_without_ttbr_expires_after_databus_ttl(run, gateway_factory):
    async def main():
        async with gateway_factory(databus_ttl=0.3) as gw:
            async with Client(*addr(gw)) as c:
                assert (await c.request(part_request(str(uuid.uuid4()), "k", b"orphan"))).status == 200
            deadline = time.monotonic() + 10
            while blob_files(gw.settings.data_dir):
                assert time.monotonic() < deadline, "the orphaned part did not expire"
                await asyncio.sleep(0.1)
            assert gw.store.counts()["databus_parts"] == 0

    run(main())


def test_part_over_max_blob_is_413(run, gateway_factory):
    async def main():
        async with gateway_factory(max_blob=1000, max_body=100_000) as gw:
            async with Client(*addr(gw)) as c:
                r = await c.request(part_request(str(uuid.uuid4()), "k", b"x" * 1001))
                assert r.status == 413 and "GWCORE_MAX_BLOB=1000" in r.reason
            async with Client(*addr(gw)) as c:
                r = await c.request(part_request(str(uuid.uuid4()), "k", b"x" * 1001, chunked=True))
                assert r.status == 413 and "GWCORE_MAX_BLOB=1000" in r.reason
            await until_no_blob_files(gw)

    run(main())


def test_part_larger_than_max_body_streams_and_keeps_the_loop_serving(run, gateway_factory):
    async def main():
        async with gateway_factory(max_body=64 << 10) as gw:
            blob = os.urandom(3 << 20)
            msg_id = str(uuid.uuid4())
            async with Client(*addr(gw)) as c, Client(*addr(gw)) as other:
                req = part_request(msg_id, "big", blob)
                head = req[:-len(blob)]
                await c.send(head + blob[:1 << 20])
                # while the part is half sent, another connection is served
                assert (await other.request(nsb_request())).status == 200
                await c.send(blob[1 << 20:])
                assert (await c.response()).status == 200
                assert (await c.request(submit_request(msg_id, ("big",)))).status == 200
            msgs = [await asyncio.wait_for(gw.messages().get(), 5) for _ in range(2)]
            big = next(m for m in msgs if m.id == msg_id)
            assert big.databus["NServiceBus.DataBus.big"].read() == blob

    run(main())


# -- sending, and two sites ----------------------------------------------------------------------------

from test_auth_receive import KEYS, SECRET  # noqa: E402
from test_egress import ScriptedSite, settings_for, until, url_of  # noqa: E402


def test_ten_mib_property_both_ways_between_two_sites(run, tmp_path):
    request_blob = os.urandom(10 << 20)
    reply_blob = os.urandom(10 << 20)
    reply_file = tmp_path / "reply.bin"
    reply_file.write_bytes(reply_blob)

    async def main():
        got = {}

        async def remote_handler(msg):
            blob = msg.databus["NServiceBus.DataBus.Payload"]
            got["request"] = blob.read()
            # reply with a property taken from a file path (streamed, never read whole)
            await remote.reply(msg, b'{"ok":true}', databus={"Answer": str(reply_file)})

        remote = Gateway(settings_for(tmp_path, "RemoteSite"), handler=remote_handler)
        async with remote:
            sites = f"RemoteSite={url_of(remote, 'RemoteSite')}"
            seen = []  # a consumer must run for request() to see its reply
            async with Gateway(settings_for(tmp_path, "Headquarters", sites=sites), handler=seen.append) as hq:
                import io
                reply = await hq.request("RemoteSite", b'{"Payload":"claim"}', timeout=30,
                                         databus={"Payload": io.BytesIO(request_blob)})
                assert got["request"] == request_blob
                blob = reply.databus["NServiceBus.DataBus.Answer"]
                with blob.open() as f:
                    assert f.read() == reply_blob
                # both sites keep their copy of each property until it expires
                assert sorted(b.size for b in databus.blobs(hq.store)) == [10 << 20, 10 << 20]
                assert seen == []
            assert remote.forwarder.sent == 1

    run(main(), timeout=90)


def test_signed_sites_sign_each_part_with_its_blob_digest(run, tmp_path):
    async def main():
        async with Gateway(settings_for(tmp_path, "RemoteSite", receive_keys=KEYS)) as remote:
            cfg = tmp_path / "hq.toml"
            cfg.write_text(f'[sites.RemoteSite]\nurl = "{url_of(remote, "RemoteSite")}"\n'
                           f'secret = "{SECRET.decode()}"\nkey_id = "hq"\n')
            async with Gateway(settings_for(tmp_path, "Headquarters", config_file=str(cfg))) as hq:
                msg_id = await hq.send_to_sites(["RemoteSite"], b"{}", databus={"A": b"a" * 70_000, "B": b""})
                msg = await asyncio.wait_for(remote.messages().get(), 20)
                assert msg.id == msg_id
                assert {k: b.read() for k, b in msg.databus.items()} == {
                    "NServiceBus.DataBus.A": b"a" * 70_000, "NServiceBus.DataBus.B": b""}
                assert remote.states[0].requests_by_status[401] == 0

    run(main())


def test_sender_resends_the_parts_at_once_when_the_submit_finds_them_missing(run, tmp_path):
    """The rule for failover (docs/databus.md): a 412 to a submit whose parts were all accepted
    means another node (or a restarted one) got the submit; the parts go again immediately."""
    async def main():
        site = ScriptedSite([200, 412])  # part, submit 412; then part and submit 200
        url = await site.start()
        async with Gateway(settings_for(tmp_path, "Headquarters", sites=f"Scripted={url}", retries=4,
                                        retry_delays=(60.0,))) as hq:
            await hq.send_to_sites(["Scripted"], b"body", databus={"P": b"property"})
            await until(lambda: hq.forwarder.sent == 1)
            calls = [r["NServiceBus.CallType"] for r in site.requests]
            assert calls == ["SingleCallDatabusProperty", "SingleCallSubmit"] * 2
            assert hq.forwarder.retried == 0
            part = site.requests[0]
            assert part["_body"] == "property"
            assert part["NServiceBus.Gateway.DataBusKey"] == "NServiceBus.Header.NServiceBus.DataBus.P"
            assert part["Content-MD5"] == base64.b64encode(hashlib.md5(b"property").digest()).decode()
            assert part["Content-Digest"] == "sha-256=:" + base64.b64encode(hashlib.sha256(b"property").digest()).decode() + ":"
            assert part["NServiceBus.Header.NServiceBus.DataBus.P"] == site.requests[1]["NServiceBus.Header.NServiceBus.DataBus.P"]
            # the part carries the submit's header set (protocol.md §1.4)
            submit_names = [k for k in site.requests[1] if k not in ("Content-MD5", "Content-Digest", "NServiceBus.CallType", "_body", "Content-Length")]
            assert [k for k in part if k in submit_names] == submit_names
        await site.close()

    run(main())


def test_a_blob_gone_from_the_sender_is_a_permanent_failure(run, tmp_path):
    async def main():
        site = ScriptedSite([])
        url = await site.start()
        async with Gateway(settings_for(tmp_path, "Headquarters", sites=f"Scripted={url}")) as hq:
            hq.forwarder._closed = True  # queue without sending, then remove the blob file
            await hq.send_to_sites(["Scripted"], b"body", databus={"P": b"x"})
            for name in blob_files(hq.settings.data_dir):
                os.unlink(os.path.join(hq.store.blob_dir, name))
            hq.forwarder._closed = False
            (seq, _rec), = list(outgoing_records(hq.store))
            hq.forwarder.schedule(seq, "Scripted")
            await until(lambda: hq.store.counts()["outgoing_errors"] == 1)
            (_s, rec), = failed_sends(hq.store)
            assert "is no longer in the blob store" in rec.last_error
            assert site.requests == []
        await site.close()

    run(main())


# -- real server processes -----------------------------------------------------------------------------

def _post(port: int, data: bytes) -> tuple[int, str]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(data)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            assert chunk, "connection closed before a response"
            buf += chunk
        line = buf.split(b"\r\n", 1)[0].decode()
        _v, status, reason = line.split(" ", 2)
        return int(status), reason


def test_receiver_sigkilled_between_parts_and_submit_keeps_the_parts(tmp_path):
    data_dir = str(tmp_path / "store")
    port = free_port()
    server = ServerProcess(data_dir, port).start()
    msg_id = str(uuid.uuid4())
    keys = ("first", "second")
    blobs = {"first": os.urandom(300_000), "second": b"second property"}
    try:
        for key in keys:
            assert _post(port, part_request(msg_id, key, blobs[key], parts=keys)) == (200, "OK")
        server.kill()
        server = ServerProcess(data_dir, port).start()
        listing = gwcore_cli("inspect", "blobs", data_dir=data_dir)
        assert listing.count(f"waiting for the submit of {msg_id}") == 2
        # the submit alone (no part re-sent) succeeds after the restart
        assert _post(port, submit_request(msg_id, keys)) == (200, "OK")
        (line,) = gwcore_cli("inspect", "queue", "--json", data_dir=data_dir).splitlines()
        headers = json.loads(line)["headers"]
        for key in keys:
            local = headers[f"NServiceBus.DataBus.{key}"]
            with open(os.path.join(databus.blob_dir(data_dir), local), "rb") as f:
                assert f.read() == blobs[key]
        blobs_json = [json.loads(x) for x in gwcore_cli("inspect", "blobs", "--json", data_dir=data_dir).splitlines()]
        assert sorted(b["state"] for b in blobs_json) == ["message", "message"]
        assert all(b["expires"] != "never" for b in blobs_json)
        assert "databus: 2 blobs, 0 parts waiting" in gwcore_cli("inspect", "dedup", data_dir=data_dir)
    finally:
        server.terminate()


def test_receiving_a_1_gib_part_keeps_the_server_under_100_mib(tmp_path):
    size = 1 << 30
    data_dir = str(tmp_path / "store")
    free = os.statvfs(str(tmp_path)).f_bavail * os.statvfs(str(tmp_path)).f_frsize
    if free < size + (512 << 20):
        pytest.skip("needs 1.5 GiB of free disk")
    port = free_port()
    server = ServerProcess(data_dir, port).start()
    try:
        pid = server.proc.pid
        before = vm_hwm_kib(pid)
        msg_id = str(uuid.uuid4())
        # the body is generated piece by piece; its MD5 is computed beforehand the same way
        piece = os.urandom(1 << 20)
        md5 = hashlib.md5()
        for _ in range(size // len(piece)):
            md5.update(piece)
        head = part_request(msg_id, "huge", b"", md5=None).replace(b"Content-Length: 0", b"Content-Length: %d" % size)
        head = head.replace(b"\r\n\r\n", ("\r\nContent-MD5: " + wire_md5_digest(md5.digest()) + "\r\n\r\n").encode(), 1)
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            s.sendall(head)
            for _ in range(size // len(piece)):
                s.sendall(piece)
            reply = s.recv(4096)
        assert reply.startswith(b"HTTP/1.1 200 OK\r\n"), reply
        hwm = vm_hwm_kib(pid)
        assert hwm < 100 * 1024, f"VmHWM {hwm} KiB (at start {before} KiB)"
        print(f"VmHWM {hwm} KiB (at start {before} KiB)")
        (info,) = [json.loads(x) for x in gwcore_cli("inspect", "blobs", "--json", data_dir=data_dir).splitlines()]
        assert info["size"] == size and os.path.getsize(info["path"]) == size
    finally:
        server.terminate()


def wire_md5_digest(digest: bytes) -> str:
    return base64.b64encode(digest).decode().replace("+", "%2B").replace("/", "%2F").replace("=", "%3D")


# -- the parser: a part's body leaves in pieces, whatever the split ----------------------------------

def _parse_all(pieces: list[bytes], max_body: int = 64, max_blob: int = 1 << 20):
    from gwcore._core import core

    parser = core.RequestParser(core.Framer("RemoteSite"), [b"/remotesite/"], max_headers=100,
                                max_header_bytes=1 << 16, max_body=max_body, allow_get=False, max_blob=max_blob)
    events = []
    for piece in pieces:
        events += parser.feed(piece, 1000)
    return core, events


@pytest.mark.parametrize("chunked", [False, True])
def test_part_body_streams_out_at_every_split_point(chunked):
    blob = bytes(range(256)) * 2                       # longer than max_body: never buffered whole
    stream = part_request("id-1", "k", blob, chunked=chunked) + nsb_request("id-2")
    for cut in range(1, len(stream)):
        core, events = _parse_all([stream[:cut], stream[cut:]])
        kinds = [e[0] for e in events]
        assert kinds[0] == core.EV_PART_BEGIN and kinds[-1] == core.EV_SUBMIT, (cut, kinds)
        assert kinds.count(core.EV_PART_END) == 1
        head = events[0][2]
        assert (head.id, head.databus_key, head.body) == ("id-1", "NServiceBus.Header.NServiceBus.DataBus.k", b"")
        assert head.content_md5 == base64.b64encode(hashlib.md5(blob).digest()).decode()
        body = b"".join(e[1] for e in events if e[0] == core.EV_PART_DATA)
        assert body == blob, cut
        assert events[-1][2].id == "id-2"
    # byte at a time
    core, events = _parse_all([stream[i:i + 1] for i in range(len(stream))])
    assert b"".join(e[1] for e in events if e[0] == core.EV_PART_DATA) == blob


def test_a_refused_part_head_is_read_whole_and_answered_as_a_rejection():
    core, events = _parse_all([part_request("id-1", "k", b"x" * 10, databus_key=False)])
    (kind, _keep_alive, result), = events
    assert kind == core.EV_SUBMIT and (result.status, result.reason) == (
        400, "Required header 'NServiceBus.Gateway.DataBusKey' missing.")
    # and a refused part's body is bounded by max_body, not max_blob
    core, events = _parse_all([part_request("id-1", "k", b"x" * 100, databus_key=False)])
    assert events[-1][0] == core.EV_ERROR and events[-1][1] == 413


def test_cli_send_with_a_databus_file_between_two_server_processes(tmp_path):
    a_dir, b_dir = str(tmp_path / "a" / "store"), str(tmp_path / "b" / "store")
    a_port, b_port = free_port(), free_port()
    a_env = dict(GWCORE_ENDPOINT="SiteA", GWCORE_SITES=f"SiteB=http://127.0.0.1:{b_port}/SiteB/")
    prop = tmp_path / "report.bin"
    prop.write_bytes(os.urandom(2 << 20))
    b = ServerProcess(b_dir, b_port, GWCORE_ENDPOINT="SiteB").start()
    a = ServerProcess(a_dir, a_port, **a_env).start()
    try:
        msg_id = gwcore_cli("send", "--to", "SiteB", "--body", "{}", "--databus", f"Report={prop}",
                            data_dir=a_dir, **a_env).strip()
        deadline = time.monotonic() + 30
        while not gwcore_cli("inspect", "queue", data_dir=b_dir).strip():
            assert time.monotonic() < deadline, "the message did not arrive"
            time.sleep(0.1)
    finally:
        a.terminate()
        b.terminate()
    (line,) = gwcore_cli("inspect", "queue", "--json", data_dir=b_dir).splitlines()
    got = json.loads(line)
    assert got["id"] == msg_id
    with open(os.path.join(databus.blob_dir(b_dir), got["headers"]["NServiceBus.DataBus.Report"]), "rb") as f:
        assert f.read() == prop.read_bytes()


def test_a_schema_2_store_gains_the_databus_databases_when_opened(tmp_path):
    path = str(tmp_path / "store")
    store = Store(path)
    with store.env.begin(write=True) as txn:
        for db in (store.databus_parts, store.databus_blobs, store.databus_expiry):
            txn.drop(db, delete=True)
        txn.put(b"schema", b"2", db=store.meta)
    store.close()
    old = Store(path, readonly=True)               # inspection of an old store: no blobs there
    try:
        assert old.databus_blobs is None and list(databus.blobs(old)) == []
        assert old.counts()["databus_blobs"] == 0
    finally:
        old.close()
    store = Store(path)
    try:
        assert store.get(store.meta, b"schema") == b"4"
        assert store.counts()["databus_parts"] == 0
    finally:
        store.close()
    # a store from a newer schema is refused with a clear message
    store = Store(path)
    with store.env.begin(write=True) as txn:
        txn.put(b"schema", b"5", db=store.meta)
    store.close()
    from gwcore.errors import StoreError
    with pytest.raises(StoreError, match="has schema 5, this gwcore needs 4"):
        Store(path)
