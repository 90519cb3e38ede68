"""`gwcore backup DIR`: an online copy of the store taken under load, restored by starting a fresh
gateway on it (docs/operations.md, "Backup and restore")."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid

from httpclient import nsb_request
from procs import ROOT, ServerProcess, free_port, gwcore_cli, queued_ids


class Load:
    """Submits on keep-alive connections until stopped, recording when each id was answered 200."""

    def __init__(self, port: int, connections: int = 4) -> None:
        self.port = port
        self.acked: list[tuple[float, str]] = []
        self.sent: set[str] = set()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(connections)]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:
                buf = b""
                while not self._stop.is_set():
                    msg_id = str(uuid.uuid4())
                    self.sent.add(msg_id)
                    s.sendall(nsb_request(msg_id))
                    while b"\r\n\r\n" not in buf:
                        chunk = s.recv(65536)
                        if not chunk:
                            raise ConnectionError("the gateway closed the connection")
                        buf += chunk
                    head, _, buf = buf.partition(b"\r\n\r\n")
                    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length:"))
                    while len(buf) < length:
                        buf += s.recv(65536)
                    buf = buf[length:]
                    if not head.startswith(b"HTTP/1.1 200 "):
                        raise AssertionError(head.split(b"\r\n")[0])
                    self.acked.append((time.monotonic(), msg_id))
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(repr(exc))

    def wait_for(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(self.acked) < n:
            assert not self.errors and time.monotonic() < deadline, (len(self.acked), self.errors)
            time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)
        assert self.errors == []


def test_backup_under_load_then_restore(tmp_path):
    server = ServerProcess(str(tmp_path / "store"), free_port()).start()
    backup = str(tmp_path / "backup")
    try:
        load = Load(server.port)
        try:
            load.wait_for(300)
            before = time.monotonic()
            acked_before = {msg_id for t, msg_id in list(load.acked) if t < before}
            res = subprocess.run([sys.executable, "-m", "gwcore", "backup", backup, "--data-dir", server.data_dir],
                                 cwd=ROOT, env={**server.env}, capture_output=True, text=True, timeout=120)
            done = time.monotonic()
            after = len(load.acked)
            load.wait_for(after + 100)  # the gateway kept taking submits
            # and took them while the backup ran (submits answered between its start and end)
            assert any(before < t < done for t, _ in load.acked), "no submit answered during the backup"
        finally:
            load.stop()
        assert res.returncode == 0, res.stderr
        assert "gwcore: backed up" in res.stderr
    finally:
        assert server.terminate() == 0
    # restore: the backup dir becomes a fresh gateway's data dir
    restored = str(tmp_path / "restored")
    shutil.copytree(backup, restored)
    assert not os.path.exists(os.path.join(restored, "gwcore.lock"))
    fresh = ServerProcess(restored, free_port()).start()
    try:
        ids = queued_ids(restored)
        assert acked_before - set(ids) == set()  # every id acknowledged before the backup began
        assert set(ids) <= load.sent and len(ids) == len(set(ids))  # nothing else, nothing twice
        # the dedup records came along: an id acknowledged before is a duplicate, not stored again
        again = sorted(acked_before)[0]
        with socket.create_connection(("127.0.0.1", fresh.port), timeout=10) as s:
            s.sendall(nsb_request(again, close=True))
            assert s.recv(100).startswith(b"HTTP/1.1 200 ")
        assert queued_ids(restored).count(again) == 1
        assert len(queued_ids(restored)) == len(ids)
    finally:
        assert fresh.terminate() == 0
    # the copy is compacted and stands on its own
    assert sorted(os.listdir(backup)) == ["blobs", "data.mdb"]


def test_backup_refuses_a_non_empty_directory(tmp_path):
    server = ServerProcess(str(tmp_path / "store"), free_port()).start()
    assert server.terminate() == 0
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    res = subprocess.run([sys.executable, "-m", "gwcore", "backup", str(tmp_path / "full"),
                          "--data-dir", server.data_dir], cwd=ROOT, env=server.env, capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.splitlines() == [f"gwcore: error: the backup directory '{tmp_path / 'full'}' exists and is not "
                                       "an empty directory"]


def test_a_backup_carries_the_databus_blobs_and_skips_one_that_expired_meanwhile(run, gateway_factory, tmp_path,
                                                                                 monkeypatch):
    """Two messages with a databus property each: the backup holds both blob files, byte for byte,
    and a gateway started on it hands out the messages with their blobs readable. A blob that went
    between the snapshot and its copy is left out and named in ``gone``."""
    import asyncio

    from httpclient import Client
    from test_databus import part_request, submit_request

    from gwcore import Gateway, databus

    blobs = {f"k{i}": os.urandom(70_000 + i) for i in range(2)}

    async def fill():
        async with gateway_factory() as gw:
            async with Client(*gw.addresses[0]) as c:
                for i, (key, blob) in enumerate(blobs.items()):
                    msg_id = f"m{i}-{uuid.uuid4()}"
                    assert (await c.request(part_request(msg_id, key, blob))).status == 200
                    assert (await c.request(submit_request(msg_id, (key,)))).status == 200
            store = gw.store
            backup = tmp_path / "backup"
            backup.mkdir()
            summary = store.backup(str(backup))
            assert summary["gone"] == [] and summary["counts"]["queue"] == 2
            assert sorted(os.listdir(databus.blob_dir(str(backup)))) == sorted(os.listdir(store.blob_dir))
            for name in os.listdir(store.blob_dir):
                with open(os.path.join(store.blob_dir, name), "rb") as a, \
                        open(os.path.join(databus.blob_dir(str(backup)), name), "rb") as b:
                    assert a.read() == b.read()
            # a blob removed after the snapshot was taken (it expired meanwhile): left out, said so
            victim = sorted(os.listdir(store.blob_dir))[0]
            real_copy = shutil.copyfile

            def copy_after_expiry(src, dst, *a, **kw):
                if os.path.basename(src) == victim and os.path.exists(src):
                    os.remove(src)
                return real_copy(src, dst, *a, **kw)

            monkeypatch.setattr(shutil, "copyfile", copy_after_expiry)
            second = tmp_path / "second"
            second.mkdir()
            assert store.backup(str(second))["gone"] == [victim]
            assert victim not in os.listdir(databus.blob_dir(str(second)))
            monkeypatch.undo()
            return gw.settings, str(backup)

    settings, backup = run(fill())

    async def restore():
        import dataclasses
        restored = dataclasses.replace(settings, data_dir=backup)
        async with Gateway(restored) as gw:
            got = {}
            for _ in blobs:
                msg = await asyncio.wait_for(gw.messages().get(), 5)
                (blob,) = msg.databus.values()
                with blob.open() as f:
                    got[f.read()] = True
                await msg.ack()
            assert sorted(got) == sorted(blobs.values())

    run(restore())
