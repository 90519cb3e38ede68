"""Two real gwcore processes talking: 10,000 messages from SiteA to SiteB while one of them is
SIGKILLed and restarted. Every message must arrive at SiteB exactly once and none may end in
SiteA's error queue."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import time

import pytest
from procs import ServerProcess, free_port, gwcore_cli, queued_ids

from gwcore import Gateway, Settings
from gwcore.store import Store

N = 10_000


def counts(data_dir: str) -> dict[str, int]:
    store = Store(data_dir, readonly=True)
    try:
        return store.counts()
    finally:
        store.close()


def enqueue(data_dir: str, port: int, sites: str, n: int) -> list[str]:
    """Queue n messages in SiteA's store before SiteA runs (no listener, no forwarding)."""
    settings = Settings.from_env({}, data_dir=data_dir, endpoint="SiteA", sites=sites,
                                 receive_channels=f"http://127.0.0.1:{port}/SiteA/")

    async def main() -> list[str]:
        gw = Gateway(settings)
        await gw.start(listen=False, forward=False)
        try:
            ids: list[str] = []
            for start in range(0, n, 500):
                ids += await asyncio.gather(*(
                    gw.send_to_sites(["SiteB"], f'{{"n":{i}}}'.encode()) for i in range(start, min(n, start + 500))))
            return ids
        finally:
            await gw.stop()

    return asyncio.run(main())


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.parametrize("victim", ["receiver", "sender"])
def test_ten_thousand_messages_cross_through_kills(tmp_path, victim):
    rng = random.Random(victim)
    a_dir, b_dir = str(tmp_path / "a" / "store"), str(tmp_path / "b" / "store")
    a_port, b_port = free_port(), free_port()
    b_url = f"http://127.0.0.1:{b_port}/SiteB/"
    # batches of at most 8 (the sender batches to gwcore): killed mid-batch, and the transfer
    # lasts long enough for two kills mid-stream
    b = ServerProcess(b_dir, b_port, GWCORE_ENDPOINT="SiteB", GWCORE_MAX_BATCH_MESSAGES="8").start()
    ids = enqueue(a_dir, a_port, f"SiteB={b_url}", N)
    a = ServerProcess(a_dir, a_port, GWCORE_ENDPOINT="SiteA", GWCORE_SITES=f"SiteB={b_url}",
                      GWCORE_RETRIES="10000", GWCORE_RETRY_DELAYS="0.1s", GWCORE_SEND_CONCURRENCY="16").start()
    try:
        for kill in range(2):
            # kill once SiteB holds a growing share of the messages, i.e. mid-stream
            floor = (kill + 1) * N // 4 + rng.randrange(N // 10)
            wait_for(lambda: counts(b_dir)["queue"] >= floor, 60, f"{floor} messages at SiteB")
            victim_proc = b if victim == "receiver" else a
            victim_proc.kill()
            in_flight = counts(a_dir)["outgoing"]
            assert in_flight > 0, "the kill came after the transfer ended: it tests nothing"
            time.sleep(rng.uniform(0.1, 0.6))
            victim_proc.start()
        wait_for(lambda: counts(a_dir)["outgoing"] == 0, 120, "SiteA's outgoing queue to drain")
    finally:
        for proc in (a, b):
            if proc.proc is not None and proc.proc.poll() is None:
                assert proc.terminate() == 0
    received = queued_ids(b_dir)
    assert len(received) == N, f"{len(received) - len(set(received))} duplicates, {len(set(ids) - set(received))} missing"
    assert set(received) == set(ids)
    assert counts(a_dir)["outgoing_errors"] == 0
    assert gwcore_cli("inspect", "errors", data_dir=a_dir) == ""


def test_cli_send_inspect_and_retry_through_the_control_socket(tmp_path):
    a_dir, b_dir = str(tmp_path / "a" / "store"), str(tmp_path / "b" / "store")
    a_port, b_port = free_port(), free_port()
    b_url = f"http://127.0.0.1:{b_port}/SiteB/"
    a_env = dict(GWCORE_ENDPOINT="SiteA", GWCORE_SITES=f"SiteB={b_url}", GWCORE_RETRIES="0")
    cli_env = {k: v for k, v in a_env.items()}
    a = ServerProcess(a_dir, a_port, **a_env).start()
    try:
        # SiteB is down and retries are off: the send fails at once into the error queue
        first = gwcore_cli("send", "--to", "SiteB", "--body", "hello", "--header", "Kind=price",
                           data_dir=a_dir, **cli_env).strip()
        wait_for(lambda: counts(a_dir)["outgoing_errors"] == 1, 30, "the failed send")
        errors = gwcore_cli("inspect", "errors", data_dir=a_dir)
        assert first in errors and "to SiteB after 1 attempt(s)" in errors
        # an unconfigured site is refused with every missing name, nothing queued
        out = subprocess.run([sys.executable, "-m", "gwcore", "send", "--to", "Nowhere", "--to", "Gone",
                              "--body", "x"], env=dict(a.env), capture_output=True, text=True, timeout=60)
        assert out.returncode == 2
        assert "The following sites have not been configured: Nowhere, Gone" in out.stderr
        b = ServerProcess(b_dir, b_port, GWCORE_ENDPOINT="SiteB").start()
        try:
            assert gwcore_cli("retry", "--all", data_dir=a_dir, **cli_env).split() == [first]
            second = gwcore_cli("send", "--to", "SiteB", "--body", "again", data_dir=a_dir, **cli_env).strip()
            wait_for(lambda: counts(b_dir)["queue"] == 2, 30, "both messages at SiteB")
            assert gwcore_cli("retry", "no-such-id", data_dir=a_dir, check=False, **cli_env) == ""
        finally:
            assert b.terminate() == 0
    finally:
        assert a.terminate() == 0
    assert sorted(queued_ids(b_dir)) == sorted([first, second])
    assert counts(a_dir)["outgoing_errors"] == 0
    # with no gateway running, `gwcore send` records the message; the gateway sends it when it starts
    third = gwcore_cli("send", "--to", "SiteB", "--body", "later", data_dir=a_dir, **cli_env).strip()
    assert counts(a_dir)["outgoing"] == 1
    b = ServerProcess(b_dir, b_port, GWCORE_ENDPOINT="SiteB").start()
    a = ServerProcess(a_dir, a_port, **a_env).start()
    try:
        wait_for(lambda: counts(b_dir)["queue"] == 3, 30, "the message recorded offline")
    finally:
        assert a.terminate() == 0 and b.terminate() == 0
    assert third in queued_ids(b_dir)
