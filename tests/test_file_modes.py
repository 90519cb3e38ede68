"""The modes of what gwcore keeps on disk do not depend on the umask (docs/security.md, "Files on
disk"): the data dir and the blob dir 0700, the store's files and blob files 0600 by default;
0750 and 0640 with GWCORE_FILE_MODE=group; an existing store's looser modes are tightened."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import subprocess
import sys
import uuid

import pytest
from httpclient import Client, nsb_request
from procs import ROOT, free_port, wait_listening
from test_databus import addr, blob_files, part_request

from gwcore import Settings, databus
from gwcore.errors import ConfigurationError
from gwcore.store import Store


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def store_modes(data_dir: str) -> dict[str, int]:
    out = {name: mode(os.path.join(data_dir, name)) for name in ("data.mdb", "lock.mdb", "gwcore.lock")}
    out["."] = mode(data_dir)
    out["blobs"] = mode(databus.blob_dir(data_dir))
    return out


PRIVATE = {".": 0o700, "blobs": 0o700, "data.mdb": 0o600, "lock.mdb": 0o600, "gwcore.lock": 0o600}
GROUP = {".": 0o750, "blobs": 0o750, "data.mdb": 0o640, "lock.mdb": 0o640, "gwcore.lock": 0o640}


def test_a_gateway_under_umask_022_keeps_its_store_and_blobs_private(run, gateway_factory):
    async def main():
        async with gateway_factory() as gw:
            data_dir = gw.settings.data_dir
            assert store_modes(data_dir) == PRIVATE
            msg_id = str(uuid.uuid4())
            async with Client(*addr(gw)) as c:
                assert (await c.request(part_request(msg_id, "k", os.urandom(200_000)))).status == 200
                assert (await c.request(part_request(str(uuid.uuid4()), "j", b"small"))).status == 200
            (blob_a, blob_b) = blob_files(data_dir)
            for name in (blob_a, blob_b):
                assert mode(os.path.join(databus.blob_dir(data_dir), name)) == 0o600
            name, *_ = databus.copy_in(gw.store.blob_dir, b"outgoing property", modes=gw.store.modes)
            assert mode(os.path.join(gw.store.blob_dir, name)) == 0o600

    with umask(0o022):
        run(main())


def test_group_mode_gives_the_group_read_access_even_under_umask_077(run, gateway_factory):
    async def main():
        async with gateway_factory(file_mode="group") as gw:
            data_dir = gw.settings.data_dir
            assert store_modes(data_dir) == GROUP
            async with Client(*addr(gw)) as c:
                assert (await c.request(part_request(str(uuid.uuid4()), "k", os.urandom(100_000)))).status == 200
            (blob,) = blob_files(data_dir)
            assert mode(os.path.join(databus.blob_dir(data_dir), blob)) == 0o640

    with umask(0o077):
        run(main())


def test_an_existing_store_with_loose_modes_is_tightened_when_opened(tmp_path):
    data_dir = str(tmp_path / "store")
    with umask(0o000):
        os.makedirs(data_dir, mode=0o777)
        Store(data_dir).close()
        for name in ("data.mdb", "lock.mdb", "gwcore.lock"):
            os.chmod(os.path.join(data_dir, name), 0o666)
        os.chmod(data_dir, 0o777)
        os.chmod(databus.blob_dir(data_dir), 0o777)
        # read only (gwcore inspect) leaves them as they are
        Store(data_dir, readonly=True).close()
        assert mode(data_dir) == 0o777
        Store(data_dir).close()
    assert store_modes(data_dir) == PRIVATE


def test_a_gateway_process_started_under_umask_022_makes_a_private_store(tmp_path):
    data_dir = str(tmp_path / "store")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GWCORE_")}
    env.update(PYTHONPATH=ROOT, GWCORE_DATA_DIR=data_dir, GWCORE_ENDPOINT="RemoteSite",
               GWCORE_RECEIVE_CHANNELS=f"http://127.0.0.1:{port}/RemoteSite/")
    proc = subprocess.Popen([sys.executable, "-m", "gwcore", "serve"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=lambda: os.umask(0o022))
    try:
        wait_listening(proc, port, 20, "gwcore", lambda: "")

        async def submit():
            async with Client("127.0.0.1", port) as c:
                assert (await c.request(nsb_request())).status == 200

        asyncio.run(submit())
        assert store_modes(data_dir) == PRIVATE
    finally:
        proc.kill()
        proc.wait()


def test_an_unknown_file_mode_is_refused_with_the_choices():
    with pytest.raises(ConfigurationError, match="GWCORE_FILE_MODE.*private.*group"):
        Settings.from_env({"GWCORE_FILE_MODE": "world"})
