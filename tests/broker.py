"""A real RabbitMQ for tests (127.0.0.1:5672, guest/guest; GWCORE_TEST_AMQP_URL overrides): a
unique endpoint name per test, its queues deleted afterwards, and reading what reached a queue."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import uuid

import pytest

AMQP_URL = os.environ.get("GWCORE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def require_broker() -> None:
    """Skip without a reachable RabbitMQ, except in CI (CI=true), where that is a failure."""
    import aio_pika

    async def probe() -> None:
        conn = await aio_pika.connect(AMQP_URL, timeout=3)
        await conn.close()

    try:
        asyncio.run(probe())
    except Exception as exc:  # noqa: BLE001 - any failure to connect means: no broker here
        pytest.skip(f"no RabbitMQ at {AMQP_URL}: {exc!r} (.ci/run starts it)")


def unique_endpoint(prefix: str = "gwtest") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def queue_names(endpoint: str) -> list[str]:
    """The endpoint's queues, with the reply queues of instances named i0-i3, a0-a3 (the tests' names)."""
    return [endpoint, f"{endpoint}.gwcore.dedup", f"{endpoint}.gwcore.leader"] + [
        f"{endpoint}.gwcore.instance.{p}{i}" for p in "ia" for i in range(4)]


async def _delete(endpoint: str, extra: list[str]) -> None:
    import aio_pika

    conn = await aio_pika.connect(AMQP_URL)
    try:
        for name in queue_names(endpoint) + extra:
            ch = await conn.channel()
            try:
                await ch.queue_delete(name)
            except Exception:  # noqa: BLE001 - absent or exclusive to a live process
                pass
    finally:
        await conn.close()


def delete_queues(endpoint: str, extra: list[str] = ()) -> None:
    asyncio.run(_delete(endpoint, list(extra)))


async def _drain(queue: str, idle: float, url: str) -> list[tuple[str, dict, bytes]]:
    """Every message in *queue*, consumed and acknowledged: ``(message_id, headers, body)``;
    *url* may list several nodes (comma-separated): the first that answers is read from."""
    import aio_pika

    *others, last = url.split(",")
    for node in others:
        try:
            conn = await aio_pika.connect(node, timeout=5)
            break
        except (OSError, aio_pika.exceptions.AMQPException, asyncio.TimeoutError):
            continue
    else:
        conn = await aio_pika.connect(last)
    out = []
    try:
        ch = await conn.channel()
        await ch.set_qos(prefetch_count=1000)
        q = await ch.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})
        async with q.iterator() as it:
            while True:
                try:
                    msg = await asyncio.wait_for(it.__anext__(), idle)
                except asyncio.TimeoutError:
                    break
                out.append((msg.message_id, dict(msg.headers or {}), msg.body))
                await msg.ack()
    finally:
        await conn.close()
    return out


def drain(queue: str, idle: float = 1.0, url: str = AMQP_URL) -> list[tuple[str, dict, bytes]]:
    """*url*: another broker than the tests' one (the nodes of tests/rabbit_cluster.py's cluster)."""
    return asyncio.run(_drain(queue, idle, url))


@pytest.fixture
def endpoint():
    """A fresh endpoint name on a reachable broker (its queues are deleted afterwards)."""
    require_broker()
    name = unique_endpoint()
    yield name
    delete_queues(name)


def rabbitmqctl(*args: str, timeout: float = 60) -> str:
    exe = shutil.which("rabbitmqctl")
    if exe is None:
        pytest.skip("rabbitmqctl is not installed")
    res = subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr
    return res.stdout
