"""Databus blobs for distributor workers: the worker protocol's blob call (streamed, in request
order, 400/404/405/503), `message.databus` in a `gwcore worker` process that shares nothing with
the distributor but its URL, digest checks, a local blob dir, and memory while a 256 MiB blob
streams. Real sockets throughout; real processes where a worker elsewhere is the point."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import socket
import time
import urllib.parse
import uuid

import pytest
from httpclient import Client
from procs import ServerProcess, free_port, vm_hwm_kib
from test_databus import _post, part_request, submit_request
from test_distributor import WorkerProcess, base_url, dist_settings, until
from test_sites import counts, wait_for

from gwcore import BlobIntegrityError, Gateway, Worker, databus

HEADER = "NServiceBus.DataBus.Report"


def call(method: str, path: str) -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode()


def sha_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def with_content_digest(request: bytes, sha256: bytes) -> bytes:
    """*request* (a part without Content-MD5) with a Content-Digest header, URL-encoded as every
    header value on the channel."""
    value = urllib.parse.quote(databus.content_digest(base64.b64encode(sha256).decode()), safe="")
    return request.replace(b"\r\n\r\n", f"\r\nContent-Digest: {value}\r\n\r\n".encode(), 1)


async def send_with_blob(gw: Gateway, msg_id: str, blob: bytes, *, digest: bool = False) -> None:
    part = part_request(msg_id, "Report", blob, md5=None if digest else "auto")
    if digest:
        part = with_content_digest(part, hashlib.sha256(blob).digest())
    async with Client(*gw.addresses[0]) as c:
        assert (await c.request(part)).status == 200
        assert (await c.request(submit_request(msg_id, ("Report",)))).status == 200


def blob_key(gw: Gateway) -> str:
    (info,) = list(databus.blobs(gw.store))
    return info.name


# -- the blob call ---------------------------------------------------------------------------------

def test_blob_call_streams_the_blob_in_request_order_and_refuses_what_it_must(run, make_settings, tmp_path):
    blob = os.urandom(3 << 20)

    async def main():
        async with Gateway(dist_settings(make_settings, worker_lease=30.0)) as gw:
            await send_with_blob(gw, "m1", blob, digest=True)
            key = blob_key(gw)
            async with Client(*gw.worker_address) as c:
                sid = json.loads((await c.request(call("POST", "/.gwcore/worker/enlist/w/1"))).body)["session"]
                blob_path = f"/.gwcore/worker/blob/{sid}/{key}"
                # a session that holds no message naming the blob cannot read it
                r = await c.request(call("GET", blob_path))
                assert (r.status, r.body) == (404, f"Not Found: blob {key} is named by no message worker "
                                                   f"session {sid} holds".encode())
                r = await c.request(call("POST", f"/.gwcore/worker/take/{sid}/5000/"))
                (wire,) = json.loads(r.body)["messages"]
                assert wire["headers"][HEADER] == key
                assert wire["databus"] == {HEADER: {"key": key, "size": len(blob), "md5": "",
                                                    "sha256": base64.b64encode(hashlib.sha256(blob).digest()).decode()}}
                # pipelined behind a take that waits 300 ms (the session's one slot is taken): the
                # blob is ready first but streams after the take's answer, and the heartbeat after it
                await c.send(call("POST", f"/.gwcore/worker/take/{sid}/300/{wire['seq']}") + call("GET", blob_path)
                             + call("POST", f"/.gwcore/worker/heartbeat/{sid}"))
                first, streamed, last = [await c.response() for _ in range(3)]
                assert (first.status, json.loads(first.body)) == (200, {"messages": [], "stop": False})
                assert (last.status, json.loads(last.body)) == (200, {"lease": 30.0})
                (conn,) = gw.states[-1].connections  # the worker listener's
                assert "_flush" not in vars(conn) and not conn.files_waiting  # the detour is gone
                assert streamed.status == 200 and streamed.body == blob
                assert streamed.headers["content-type"] == "application/octet-stream"
                assert streamed.headers["content-length"] == str(len(blob))
                assert streamed.headers["content-digest"] == databus.content_digest(
                    base64.b64encode(hashlib.sha256(blob).digest()).decode())
                # HEAD: the same head, no body (the connection stays usable)
                await c.send(call("HEAD", blob_path))
                head = await c.reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200 OK\r\n") and f"Content-Length: {len(blob)}\r\n".encode() in head
                # malformed keys: 400, whatever is in them
                for bad in ("../x", "..%2F..%2Fstore%2Fdata.mdb", key.upper(), key[:-1], key + "0", f"{key}/x",
                            "%2Fetc%2Fpasswd", ""):
                    r = await c.request(call("GET", f"/.gwcore/worker/blob/{sid}/{bad}"))
                    assert (r.status, r.body) == (400, b"Bad Request: a blob key is 32 lowercase hex digits"), bad
                # unknown key, unknown session, wrong method
                r = await c.request(call("GET", f"/.gwcore/worker/blob/{sid}/{uuid.uuid4().hex}"))
                assert r.status == 404 and b"is named by no message" in r.body
                r = await c.request(call("GET", f"/.gwcore/worker/blob/nosuchsession/{key}"))
                assert r.status == 404 and b"no worker session 'nosuchsession'" in r.body
                assert (await c.request(call("POST", blob_path))).status == 405
                # the blob expires while the worker still holds its message (the writer's expiry
                # walk, run as if its time had come)
                later = int(time.time() * 1000) + 30 * 86400 * 1000
                expire = lambda txn: databus.expire(txn, gw.store, later, 10, gw.writer._doomed)  # noqa: E731
                assert await gw.writer.call(expire) == 1
                await until(lambda: not os.path.exists(os.path.join(gw.store.blob_dir, key)), 5, "the file removed")
                r = await c.request(call("GET", blob_path))
                assert r.status == 404 and f"blob {key} has expired".encode() in r.body
                # once acknowledged, the message's blobs are not the worker's to read
                assert (await c.request(call("POST", f"/.gwcore/worker/ack/{sid}/{wire['seq']}"))).status == 200
                assert (await c.request(call("GET", blob_path))).status == 404

    run(main())


def test_a_passive_node_answers_the_blob_call_503(run, make_settings):
    async def main():
        settings = dist_settings(make_settings, ha="on")
        async with Gateway(settings) as active:
            passive = await Gateway(settings).start()
            try:
                assert passive.role == "passive"
                async with Client(*passive.worker_address) as c:
                    r = await c.request(call("GET", f"/.gwcore/worker/blob/s/{uuid.uuid4().hex}"))
                    assert (r.status, r.reason) == (503, "Service Unavailable: passive")
                async with Client(*active.worker_address) as c:
                    r = await c.request(call("GET", f"/.gwcore/worker/blob/s/{uuid.uuid4().hex}"))
                    assert r.status == 404  # the active node answers it
            finally:
                await passive.stop()

    run(main())


def test_a_reader_that_stalls_is_cut_off_and_the_file_closed(run, make_settings):
    blob = os.urandom(16 << 20)  # more than the socket buffers hold

    async def main():
        async with Gateway(dist_settings(make_settings, worker_lease=30.0, http_request_timeout=0.5)) as gw:
            await send_with_blob(gw, "stall", blob)
            key = blob_key(gw)
            d = gw.distributor
            s = d.enlist("w", 1)
            await d.take(s.id, 5.0)
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 10)
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            await loop.sock_connect(sock, gw.worker_address)
            await loop.sock_sendall(sock, call("GET", f"/.gwcore/worker/blob/{s.id}/{key}"))
            fd_dir = f"/proc/{os.getpid()}/fd"
            path = os.path.join(gw.store.blob_dir, key)

            def open_on_blob() -> int:
                n = 0
                for fd in os.listdir(fd_dir):
                    try:
                        n += os.readlink(os.path.join(fd_dir, fd)) == path
                    except OSError:
                        pass
                return n

            await until(lambda: open_on_blob() == 1, 5, "the blob file open for the stream")
            await asyncio.sleep(1.5)   # nothing read: the stream stalls past the timeout
            await until(lambda: open_on_blob() == 0, 5, "the stalled stream's file closed")
            got = 0
            try:
                while chunk := await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 5):
                    got += len(chunk)
            except ConnectionResetError:
                pass
            sock.close()
            assert got < len(blob), "the whole blob arrived although the reader stalled"

    run(main())


# -- the worker side -----------------------------------------------------------------------------

@pytest.mark.parametrize("integrity", ["md5", "sha-256"])
def test_a_damaged_blob_raises_an_integrity_error_in_the_handler(run, make_settings, tmp_path, integrity):
    blob = os.urandom(1 << 20)
    seen: list[tuple[str, object]] = []

    async def handle(message):
        b = message.databus[HEADER]
        seen.append(("size", b.size))
        try:
            await asyncio.to_thread(b.read)
        except BlobIntegrityError as exc:
            seen.append(("error", str(exc)))

    async def main():
        # the blob dir set apart (GWCORE_BLOB_DIR): the distributor serves from there
        async with Gateway(dist_settings(make_settings, worker_lease=30.0, blob_dir=str(tmp_path / "blobs"))) as gw:
            await send_with_blob(gw, "damaged", blob, digest=integrity == "sha-256")
            key = blob_key(gw)
            assert os.path.exists(tmp_path / "blobs" / key)
            with open(os.path.join(gw.store.blob_dir, key), "r+b") as f:
                f.seek(12345)
                f.write(b"\0" * 16)   # same size, other bytes
            async with Worker(base_url(gw), 1, handle, name="w"):
                await until(lambda: len(seen) == 2, 20, "the handler")
        assert seen[0] == ("size", len(blob))
        kind, text = seen[1]
        assert kind == "error" and f"blob {key} ({HEADER})" in text
        assert f"the {'SHA-256' if integrity == 'sha-256' else 'MD5'} of the {len(blob)} bytes received" in text

    run(main())


def test_a_worker_given_the_blob_dir_reads_the_file_itself(run, make_settings):
    blob = os.urandom(200_000)
    seen = []

    def handle(message):
        b = message.databus[HEADER]
        seen.append((b.local, b.path, b.size, b.read(), repr(b)))

    async def main():
        async with Gateway(dist_settings(make_settings, worker_lease=30.0)) as gw:
            await send_with_blob(gw, "local", blob)
            key = blob_key(gw)
            async with Worker(base_url(gw), 1, handle, name="w", blob_dir=gw.store.blob_dir):
                await until(lambda: seen, 20, "the handler")
        assert seen == [(True, os.path.join(gw.store.blob_dir, key), len(blob), blob,
                         f"<WorkerBlob {HEADER!r} key={key!r} local>")]

    run(main())


def read_rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_a_worker_process_elsewhere_reads_the_blob_through_message_databus(tmp_path):
    blob = os.urandom(8 << 20)
    log = str(tmp_path / "handled.log")
    port = free_port()
    server = ServerProcess(str(tmp_path / "dist" / "store"), port, GWCORE_MODE="distributor").start()
    worker = None
    try:
        msg_id = str(uuid.uuid4())
        assert _post(port, part_request(msg_id, "Report", blob)) == (200, "OK")
        assert _post(port, submit_request(msg_id, ("Report",))) == (200, "OK")
        # the worker's own directory (cwd, temp dir) shares nothing with the distributor's data dir
        os.makedirs(tmp_path / "worker-tmp")
        worker = WorkerProcess(f"http://127.0.0.1:{server.worker_port}", "elsewhere", log, capacity=1,
                               handler="handlers:blob_digests",
                               env={"HANDLER_READS": "open,read,path", "TMPDIR": str(tmp_path / "worker-tmp")})
        wait_for(lambda: read_rows(log), 60, "the worker's handler")
        wait_for(lambda: counts(server.data_dir)["queue"] == 0, 20, "the acknowledgement")
        (row,) = read_rows(log)
        worker.proc.terminate()
        assert worker.proc.wait(30) == 0
    finally:
        if worker is not None:
            worker.stop()
        assert server.terminate() == 0
    assert row["id"] == msg_id
    b = row["blobs"][HEADER]
    assert "error" not in b, b["error"]
    assert (b["size"], b["local"]) == (len(blob), False)
    want = [sha_hex(blob), len(blob)]
    assert b["open"] == want and b["read"] == want and b["path"][:2] == want
    # .path downloaded into a directory of the worker's own under its temp dir; gone afterwards
    assert b["path"][2].startswith(str(tmp_path / "worker-tmp" / "gwcore-worker-"))
    assert not os.path.exists(b["path"][2]) and os.listdir(tmp_path / "worker-tmp") == []


def test_a_256_mib_blob_streams_to_a_worker_process_in_bounded_memory(tmp_path):
    size = 256 << 20
    st = os.statvfs(str(tmp_path))
    if st.f_bavail * st.f_frsize < size + (256 << 20):
        pytest.skip("needs 512 MiB of free disk")
    log = str(tmp_path / "handled.log")
    port = free_port()
    server = ServerProcess(str(tmp_path / "dist" / "store"), port, GWCORE_MODE="distributor").start()
    worker = None
    try:
        # the body is generated piece by piece; its SHA-256 computed beforehand the same way
        piece = os.urandom(1 << 20)
        sha = hashlib.sha256()
        for _ in range(size // len(piece)):
            sha.update(piece)
        msg_id = str(uuid.uuid4())
        head = part_request(msg_id, "Report", b"", md5=None).replace(b"Content-Length: 0", b"Content-Length: %d" % size)
        head = with_content_digest(head, sha.digest())
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            s.sendall(head)
            for _ in range(size // len(piece)):
                s.sendall(piece)
            assert s.recv(4096).startswith(b"HTTP/1.1 200 OK\r\n")
        assert _post(port, submit_request(msg_id, ("Report",))) == (200, "OK")
        worker = WorkerProcess(f"http://127.0.0.1:{server.worker_port}", "big", log, capacity=1, handler="handlers:blob_digests",
                               env={"HANDLER_READS": "open"})
        wait_for(lambda: read_rows(log), 120, "the worker's handler")
        (row,) = read_rows(log)
        server_hwm = vm_hwm_kib(server.proc.pid)
    finally:
        if worker is not None:
            worker.stop()
        assert server.terminate() == 0
    b = row["blobs"][HEADER]
    assert "error" not in b, b["error"]
    assert b["open"] == [sha.hexdigest(), size]
    print(f"VmHWM: worker {row['vm_hwm_kib']} KiB, distributor {server_hwm} KiB")
    assert 0 < row["vm_hwm_kib"] < 100 * 1024, f"worker VmHWM {row['vm_hwm_kib']} KiB"
    assert server_hwm < 100 * 1024, f"distributor VmHWM {server_hwm} KiB"
