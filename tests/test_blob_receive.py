"""How a databus part's bytes reach the disk: the blob sink's page-aligned receive buffers and
O_DIRECT writes (against a plain in-memory oracle, at every awkward size), the fallback where the
file system refuses O_DIRECT, and the connection reading a part's body straight into those
buffers (the parser bypassed until the body ends, then the connection back to normal)."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import random
import uuid

import pytest
from httpclient import Client, nsb_request
from test_databus import addr, blob_files, part_request, submit_request

from gwcore import databus, http
from gwcore.databus import intake
from gwcore.databus.digests import b64

BUF = databus.BUF


def _direct_ok(directory) -> bool:
    """Whether this file system takes O_DIRECT (ext4 and xfs do, tmpfs does not)."""
    probe = os.path.join(directory, ".probe")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError as exc:
        assert exc.errno == errno.EINVAL
        return False
    os.close(fd)
    os.unlink(probe)
    return True


async def _sink_roundtrip(data_dir: str, data: bytes, rng: random.Random, direct_io: bool,
                          signed: bool = True) -> tuple[databus.BlobSink, bool, tuple]:
    """Feed *data* to a new sink in random pieces, half copied in (write) and half read into
    its buffers (receive_into/received, as a socket does), then finish it."""
    writer = databus.BlobWriter(data_dir, asyncio.get_running_loop(), direct_io=direct_io)
    try:
        sink = writer.sink(lambda: None, signed=signed, md5=True)
        was_direct = sink.direct
        pos = 0
        while pos < len(data):
            n = min(len(data) - pos, rng.choice((1, 7, 4095, 4096, 4097, 65536, 100_003, BUF - 1, BUF, 3 * BUF)))
            if rng.random() < 0.5:
                sink.write(data[pos:pos + n])
                pos += n
            else:
                room = sink.receive_into(n)
                assert 0 < len(room) <= min(n, BUF)
                got = rng.randint(1, len(room))  # a socket may return less than the room
                room[:got] = data[pos:pos + got]
                sink.received(got)
                pos += got
            if sink.behind:
                await asyncio.sleep(0.001)  # what pausing the socket does: let the lanes catch up
        digests = await sink.finish()
        return sink, was_direct, digests
    finally:
        writer.close()


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, BUF - 1, BUF, BUF + 1, 3 * BUF + 12_345, 11 * BUF])
@pytest.mark.parametrize("direct_io", [True, False], ids=["direct", "buffered"])
def test_blob_sink_writes_every_byte_in_order_at_any_size_and_split(run, tmp_path, size, direct_io):
    rng = random.Random(size * 2 + direct_io)
    data = rng.randbytes(size)

    async def main():
        sink, was_direct, (md5, sha) = await _sink_roundtrip(str(tmp_path), data, rng, direct_io)
        assert was_direct == (direct_io and _direct_ok(tmp_path))
        with open(sink.path, "rb") as f:
            assert f.read() == data
        assert sink.size == size
        assert md5 == b64(hashlib.md5(data).digest())
        assert sha == b64(hashlib.sha256(data).digest())
        assert not [n for n in os.listdir(databus.blob_dir(str(tmp_path))) if n.startswith(".tmp-")]

    run(main())


def test_o_direct_is_used_on_this_disk(tmp_path):
    """The data dir's file system here (ext4) takes O_DIRECT: the tests above ran that path."""
    if not _direct_ok(tmp_path):
        pytest.skip(f"{tmp_path} does not take O_DIRECT")
    writer = databus.BlobWriter(str(tmp_path), asyncio.new_event_loop())
    try:
        sink = writer.sink(lambda: None)
        assert sink.direct
        sink.abort()
    finally:
        writer.close()


def test_a_file_system_that_refuses_o_direct_gets_ordinary_writes(run, tmp_path, monkeypatch):
    """tmpfs before Linux 6.6 and some network file systems answer EINVAL to O_DIRECT: at the open
    (then the file is opened without it) or only at a write (then the file switches over)."""
    real_open, real_write = os.open, os.write
    refused = {"open": 0, "write": 0}

    def open_(path, flags, *args):
        if flags & os.O_DIRECT and "refuse-open" in str(path):
            refused["open"] += 1
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    def write_(fd, data):
        import fcntl
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT and refused["write"] == 0:
            refused["write"] += 1
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    real_writev = os.writev

    def writev_(fd, views):
        import fcntl
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT and refused["write"] == 0:
            refused["write"] += 1
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_writev(fd, views)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "write", write_)
    monkeypatch.setattr(os, "writev", writev_)
    rng = random.Random(5)
    data = rng.randbytes(2 * BUF + 777)

    async def main():
        for where in ("refuse-open", "refuse-write"):
            d = tmp_path / where
            d.mkdir()
            sink, was_direct, (md5, _sha) = await _sink_roundtrip(str(d), data, rng, True)
            assert was_direct == (where == "refuse-write" and _direct_ok(d))
            with open(sink.path, "rb") as f:
                assert f.read() == data
            assert md5 == b64(hashlib.md5(data).digest())
        assert refused["open"] == 1
        assert refused["write"] == (1 if _direct_ok(tmp_path) else 0)

    run(main())


def test_receive_buffers_are_reused_not_mapped_per_part(run, tmp_path):
    async def main():
        writer = databus.BlobWriter(str(tmp_path), asyncio.get_running_loop())
        try:
            seen: set[int] = set()
            for i in range(4):
                sink = writer.sink(lambda: None)
                data = random.Random(i).randbytes(4 * BUF)
                for off in range(0, len(data), BUF):
                    room = sink.receive_into(BUF)
                    seen.add(id(room.obj))
                    room[:] = data[off:off + BUF]
                    sink.received(BUF)
                await sink.finish()
                with open(sink.path, "rb") as f:
                    assert f.read() == data
            # four parts of four buffers each came from a handful of mappings, not sixteen
            assert len(seen) <= 8
            assert len(writer._free) <= databus.POOL_KEEP
        finally:
            writer.close()

    run(main())


# -- through the connection -------------------------------------------------------------------------

def _connection(gw):
    (state,) = gw.states
    (conn,) = state.connections
    return conn


def test_part_body_is_read_into_the_blob_buffers_then_the_connection_parses_again(run, gateway_factory):
    """While a large part's body arrives the connection's protocol is the part reader; the
    request pipelined right behind the body is parsed as usual, and both are answered in order."""

    async def main():
        async with gateway_factory() as gw:
            blob = os.urandom(6 << 20)
            msg_id = str(uuid.uuid4())
            req = part_request(msg_id, "big", blob)
            head = req[:-len(blob)]
            async with Client(*addr(gw)) as c:
                await c.send(head + blob[:1 << 20])
                for _ in range(200):
                    await asyncio.sleep(0.01)
                    if isinstance(_connection(gw).transport.get_protocol(), intake._PartBody):
                        break
                conn = _connection(gw)
                assert isinstance(conn.transport.get_protocol(), intake._PartBody)
                # the rest of the body, a submit and another submit in one write
                other = str(uuid.uuid4())
                await c.send(blob[1 << 20:] + submit_request(msg_id, ("big",)) + nsb_request(other))
                statuses = [(await c.response()).status for _ in range(3)]
                assert statuses == [200, 200, 200]
                assert conn.transport.get_protocol() is conn
            msgs = {}
            for _ in range(2):
                m = await asyncio.wait_for(gw.messages().get(), 5)
                msgs[m.id] = m
            assert msgs[msg_id].databus["NServiceBus.DataBus.big"].read() == blob
            assert other in msgs

    run(main())


def test_part_body_with_a_bad_hash_read_directly_is_412_and_nothing_is_kept(run, gateway_factory):
    async def main():
        async with gateway_factory() as gw:
            blob = os.urandom(3 << 20)
            req = part_request(str(uuid.uuid4()), "big", blob, md5="1B2M2Y8AsgTpgAmY7PhCfg%3D%3D")
            async with Client(*addr(gw)) as c:
                r = await c.request(req)
                assert r.status == 412
                assert r.reason == "MD5 hash received does not match hash calculated on server. Please resubmit."
                # the connection reads the next request as usual
                assert (await c.request(nsb_request())).status == 200
            assert blob_files(gw.settings.data_dir) == []

    run(main())


def test_client_gone_mid_body_leaves_no_file(run, gateway_factory):
    async def main():
        async with gateway_factory() as gw:
            blob = os.urandom(4 << 20)
            req = part_request(str(uuid.uuid4()), "big", blob)
            c = Client(*addr(gw))
            await c.__aenter__()
            await c.send(req[:-len(blob)] + blob[:2 << 20])
            for _ in range(200):
                await asyncio.sleep(0.01)
                state = gw.states[0]
                if state.connections and isinstance(_connection(gw).transport.get_protocol(), intake._PartBody):
                    break
            await c.__aexit__(None, None, None)
            for _ in range(300):
                await asyncio.sleep(0.01)
                if not blob_files(gw.settings.data_dir) and not gw.states[0].connections:
                    break
            assert blob_files(gw.settings.data_dir) == []
            assert not gw.states[0].connections

    run(main())


def test_a_stalled_part_body_times_out_with_408(run, gateway_factory):
    async def main():
        async with gateway_factory(http_request_timeout=0.6) as gw:
            blob = os.urandom(2 << 20)
            req = part_request(str(uuid.uuid4()), "big", blob)
            async with Client(*addr(gw)) as c:
                await c.send(req[:-len(blob)] + blob[:1 << 20])
                r = await asyncio.wait_for(c.response(), 10)
                assert r.status == 408
            for _ in range(300):
                await asyncio.sleep(0.01)
                if not blob_files(gw.settings.data_dir):
                    break
            assert blob_files(gw.settings.data_dir) == []

    run(main())


def test_submit_pipelined_behind_its_small_part_in_one_packet_waits_for_it(run, gateway_factory):
    """Part and submit in one write (the part framed whole by the parser): the submit is held until
    the part is recorded, instead of being answered 412 for a part that is right ahead of it."""

    async def main():
        async with gateway_factory() as gw:
            msg_id = str(uuid.uuid4())
            blob = b"small blob"
            async with Client(*addr(gw)) as c:
                await c.send(part_request(msg_id, "k", blob) + submit_request(msg_id, ("k",)))
                assert [(await c.response()).status for _ in range(2)] == [200, 200]
            m = await asyncio.wait_for(gw.messages().get(), 5)
            assert m.databus["NServiceBus.DataBus.k"].read() == blob

    run(main())


# -- Content-Digest (RFC 9530): the SHA-256 checked instead of the MD5 -----------------------------

def _with_header(req: bytes, line: str) -> bytes:
    return req.replace(b"\r\nContent-Length:", f"\r\n{line}\r\nContent-Length:".encode(), 1)


def _digest_wire(data: bytes) -> str:
    import urllib.parse
    return urllib.parse.quote(databus.content_digest(b64(hashlib.sha256(data).digest())), safe="")


@pytest.mark.parametrize("size", [1000, 3 << 20], ids=["small", "large"])
def test_content_digest_is_checked_instead_of_the_md5(run, gateway_factory, size):
    """With a sha-256 Content-Digest the part's SHA-256 is what is verified (412 with its own text
    on a mismatch) and its MD5 is not computed: a wrong Content-MD5 beside a right digest passes."""

    async def main():
        async with gateway_factory(max_body=64 << 10) as gw:
            blob = os.urandom(size)
            bad_md5 = "1B2M2Y8AsgTpgAmY7PhCfg%3D%3D"
            async with Client(*addr(gw)) as c:
                msg = str(uuid.uuid4())
                ok = _with_header(part_request(msg, "k", blob), f"Content-Digest: {_digest_wire(blob)}")
                assert (await c.request(ok)).status == 200
                wrong = _with_header(part_request(str(uuid.uuid4()), "k", blob),
                                     f"Content-Digest: {_digest_wire(blob + b'x')}")
                r = await c.request(wrong)
                assert (r.status, r.reason) == (412, intake._DIGEST_MISMATCH)
                skipped = _with_header(part_request(str(uuid.uuid4()), "k", blob, md5=bad_md5),
                                       f"Content-Digest: {_digest_wire(blob)}")
                r = await c.request(skipped)
                assert r.status == 200
                assert (await c.request(submit_request(msg, ("k",)))).status == 200
            m = await asyncio.wait_for(gw.messages().get(), 5)
            assert m.databus["NServiceBus.DataBus.k"].read() == blob

    run(main())


def test_content_digest_without_sha256_leaves_the_md5_check_and_a_malformed_one_is_400(run, gateway_factory):
    async def main():
        async with gateway_factory() as gw:
            blob = os.urandom(2 << 20)
            async with Client(*addr(gw)) as c:
                other_alg = _with_header(part_request(str(uuid.uuid4()), "k", blob, md5="1B2M2Y8AsgTpgAmY7PhCfg%3D%3D"),
                                         "Content-Digest: sha-512%3D%3AAAAA%3A")
                r = await c.request(other_alg)
                assert (r.status, r.reason) == (412, "MD5 hash received does not match hash calculated on server. Please resubmit.")
                bad = _with_header(part_request(str(uuid.uuid4()), "k", blob), "Content-Digest: sha-256%3Dnot-base64")
                r = await c.request(bad)
                assert r.status == 400 and "Content-Digest" in r.reason
                assert (await c.request(nsb_request())).status == 200
            assert blob_files(gw.settings.data_dir) == []

    run(main())


@pytest.mark.parametrize("value,expected", [
    ("sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:", "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="),
    ("sha-512=:AAAA:, SHA-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:", "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="),
    ("sha-512=:AAAA:", None),
    ("", None),
])
def test_digest_sha256_reads_rfc_9530_values(value, expected):
    assert databus.digest_sha256(value) == expected


@pytest.mark.parametrize("value", ["sha-256=47DEQpj8HBSa", "sha-256=:AAAA:", "sha-256=:!!!!:"])
def test_digest_sha256_refuses_a_malformed_sha256_member(value):
    with pytest.raises(ValueError):
        databus.digest_sha256(value)


def test_content_digest_of_a_part_framed_whole_is_checked_too(run, gateway_factory):
    """A part whose call type comes in the query string (the JSONP form) is framed with its body,
    not streamed: its Content-Digest is checked there, and a malformed one is the same 400."""

    async def main():
        async with gateway_factory(http_allow_get=True) as gw:
            blob = os.urandom(5000)

            def req(digest: str) -> bytes:
                r = part_request(str(uuid.uuid4()), "k", blob)
                r = r.replace(b"NServiceBus.CallType: SingleCallDatabusProperty\r\n", b"")
                r = r.replace(b"POST /RemoteSite/ ", b"POST /RemoteSite/?NServiceBus.CallType=SingleCallDatabusProperty ", 1)
                return _with_header(r, f"Content-Digest: {digest}")

            async with Client(*addr(gw)) as c:
                assert (await c.request(req(_digest_wire(blob)))).status == 200
                r = await c.request(req(_digest_wire(b"other")))
                assert (r.status, r.reason) == (412, intake._DIGEST_MISMATCH)
                r = await c.request(req("sha-256%3Dnot-base64"))
                assert (r.status, r.reason) == (400, "Bad Request: the sha-256 member of Content-Digest is not a "
                                                     "byte sequence (:base64:)")
            assert len(blob_files(gw.settings.data_dir)) == 1

    run(main())


def test_disk_full_while_a_part_streams_is_503_and_nothing_is_kept(run, gateway_factory, monkeypatch):
    """ENOSPC in the middle of a part: the rest of the body is read past, the part is answered
    503 with the reason, its file is removed, and the connection and the gateway go on."""
    real_write, real_writev = os.write, os.writev
    written = {"n": 0}

    def blob_fd(fd) -> bool:
        try:
            return "/.tmp-" in os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return False

    def check(fd, n):
        if blob_fd(fd):
            written["n"] += n
            if written["n"] > (2 << 20):
                raise OSError(errno.ENOSPC, "No space left on device")

    def write_(fd, data):
        check(fd, len(data))
        return real_write(fd, data)

    def writev_(fd, views):
        check(fd, sum(len(v) for v in views))
        return real_writev(fd, views)

    monkeypatch.setattr(os, "write", write_)
    monkeypatch.setattr(os, "writev", writev_)

    async def main():
        async with gateway_factory() as gw:
            blob = os.urandom(6 << 20)
            async with Client(*addr(gw)) as c:
                r = await c.request(part_request(str(uuid.uuid4()), "big", blob))
                assert r.status == 503
                assert r.reason == "Service Unavailable: cannot store the databus property (No space left on device)"
                assert (await c.request(nsb_request())).status == 200
            for _ in range(300):
                if not blob_files(gw.settings.data_dir):
                    break
                await asyncio.sleep(0.01)
            assert blob_files(gw.settings.data_dir) == []
            # space again: the same part goes through
            written["n"] = -(1 << 40)
            async with Client(*addr(gw)) as c:
                msg = str(uuid.uuid4())
                assert (await c.request(part_request(msg, "big", blob))).status == 200
                assert (await c.request(submit_request(msg, ("big",)))).status == 200
            got = {}
            for _ in range(2):  # the plain submit from before, and this one
                m = await asyncio.wait_for(gw.messages().get(), 5)
                got[m.id] = m
            assert got[msg].databus["NServiceBus.DataBus.big"].read() == blob

    run(main())
