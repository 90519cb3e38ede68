"""Selected-instance mode on a three-node RabbitMQ cluster (tests/rabbit_cluster.py, beside the
machine's own broker): three gwcore instances given every node's URL, a gwcore sender pushing
unique messages through nginx, and the node that leads the endpoint's quorum queue SIGKILLed
mid-stream and started again (docs/deployment.md, "A RabbitMQ cluster")."""

from __future__ import annotations

import asyncio
import collections
import datetime
import json
import re
import time

import aio_pika
import aiormq
import pytest
from broker import unique_endpoint
from rabbit_cluster import rabbit_cluster  # noqa: F401 (a fixture)
from test_selected_ha import check_queue, report, run_under_load

from gwcore.amqp import Link

pytestmark = pytest.mark.slow

N = 3000


def connections_by_node(cluster, endpoint: str) -> dict[str, list[str]]:
    """node -> the gwcore instances of *endpoint* connected to it (their connection names)."""
    rows = json.loads(cluster.nodes[0].ctl("list_connections", "port", "client_properties", "-q",
                                           "--formatter", "json"))
    at_port = {n.port: n.name for n in cluster.nodes}
    out = collections.defaultdict(list)
    for row in rows:
        props = row["client_properties"]
        items = props.items() if isinstance(props, dict) else ((p[0], p[-1]) for p in props)
        name = dict(items).get("connection_name", "")
        if name.startswith(f"gwcore {endpoint} "):
            out[at_port[row["port"]]].append(name.rsplit(" ", 1)[-1])  # the node's port it connected to
    return out


async def declare_probe_queue(node, queue: str) -> None:
    """A quorum queue led by *node* (the leader is the declaring connection's node)."""
    conn = await aio_pika.connect(node.url)
    try:
        ch = await conn.channel()
        await ch.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})
    finally:
        await conn.close()


async def kill_and_publish(victim, survivor, queue: str) -> tuple[float, int, float]:
    """SIGKILL *victim*, the leader of *queue*, and publish to *queue* at once through *survivor*
    on a channel that has not published to it yet, renewing the channel (Link.renew_channel, as
    the gwcore leader's dispatcher does) while the broker refuses. Returns (the time of the kill,
    refusals, seconds to the first confirm)."""
    up = asyncio.Event()

    async def on_up(_conn):
        up.set()

    link = Link(survivor.url, "gwcore cluster probe", on_up, lambda _exc: None)
    link.start()
    try:
        await asyncio.wait_for(up.wait(), 10)
        channel = await link.connection.channel(publisher_confirms=True)
        killed_at = time.time()
        victim.kill()
        started = time.monotonic()
        refused = 0
        while True:
            assert time.monotonic() - started < 10, f"no publish confirmed in 10 s ({refused} refused)"
            raw = await channel.get_underlay_channel()
            try:
                await asyncio.wait_for(raw.basic_publish(b"probe", routing_key=queue), 10)
                return killed_at, refused, time.monotonic() - started
            except aiormq.exceptions.DeliveryError:
                refused += 1
                channel = await link.renew_channel(channel, publisher_confirms=True)
                assert channel is not None, "the connection to a surviving node went"
    finally:
        await link.stop()


def test_node_leading_the_queue_killed_under_load(tmp_path, rabbit_cluster):  # noqa: F811
    cluster = rabbit_cluster
    endpoint = unique_endpoint()
    everyone = sorted(n.name for n in cluster.nodes)
    seen: dict = {}

    def ready(nodes):
        # What the instances declared is replicated over the three nodes: the endpoint's quorum
        # queue, the dedup stream and each instance's reply queue (quorum). The queue's leader is
        # the node of the instance that declared it first, so at least that instance fails over.
        replicated = [endpoint, f"{endpoint}.gwcore.dedup", f"{endpoint}.gwcore.instance.i0"]
        queues = cluster.wait_online(replicated, timeout=15)
        for name in replicated:
            assert sorted(queues[name]["members"]) == everyone, (name, queues[name])
        assert (queues[endpoint]["type"], queues[f"{endpoint}.gwcore.dedup"]["type"]) == ("quorum", "stream")
        seen["victim"] = victim = cluster.node(queues[endpoint]["leader"])
        seen["before"] = connections_by_node(cluster, endpoint)
        assert seen["before"][victim.name], f"no instance on the queue's leader: {seen['before']}"
        asyncio.run(declare_probe_queue(victim, f"{endpoint}.probe"))

    def kill_queue_leader(nodes, i):
        # Killed while a channel of the test publishes to another queue the node leads, for the
        # first time: what the instance that wins the election right after (on a channel that
        # has not dispatched yet) goes through. RabbitMQ may refuse on that channel until the
        # dead node is back; on a new one the publish goes through.
        victim = seen["victim"]
        survivor = next(n for n in cluster.nodes if n is not victim)
        seen["killed_at"], *seen["probe"] = asyncio.run(kill_and_publish(victim, survivor, f"{endpoint}.probe"))
        time.sleep(max(0.0, 1.0 - (time.time() - seen["killed_at"])))  # the load goes on over the other two nodes
        victim.start()
        victim.await_startup()  # the load goes on meanwhile
        seen["back_at"] = time.time()

    started = time.monotonic()
    urls = ",".join(cluster.urls)
    ids, got, answers, flagged = run_under_load(tmp_path, endpoint, kill_queue_leader, n=N, times=1, ready=ready,
                                               broker_url=urls, GWCORE_AMQP_URL=urls)
    duplicates, marked = check_queue(ids, got)
    took = time.monotonic() - started
    victim = seen["victim"]
    # the restarted node runs its replicas again; the leadership moved to another node
    queues = cluster.wait_online([endpoint, f"{endpoint}.gwcore.dedup", f"{endpoint}.gwcore.instance.i0"])
    assert queues[endpoint]["leader"] != victim.name
    report("cluster: queue leader killed", answers)
    by_status = collections.Counter(status for _t, status, _n in answers)
    down = [status for t, status, _n in answers if seen["killed_at"] <= t < seen["back_at"]]
    after = [status for t, status, _n in answers if t >= seen["back_at"]]
    moved = []
    for name in seen["before"][victim.name]:
        log = open(tmp_path / f"{name}.log").read()
        # the instance that was on the killed node says so, and where it went
        lost = log.find(f"connection to amqp://guest@127.0.0.1:{victim.port}/ lost")
        assert lost >= 0, f"{name} does not log the lost connection"
        again = re.search(r"\n(\S+ \S+) INFO gwcore.amqp: broker: connected to amqp://guest@127\.0\.0\.1:(\d+)/ "
                          r"\(node (\d) of 3\)", log[lost:])
        assert again and int(again[2]) != victim.port, f"{name} did not reconnect to another node"
        at = datetime.datetime.strptime(again[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        moved.append(f"{name} -> node {again[3]} {at - seen['killed_at']:.2f} s after the kill")
    print(f"cluster: {victim.name} (the queue's leader; instances on it: {', '.join(moved)}) killed under load; "
          f"{N} ids, nginx answers {dict(sorted(by_status.items()))} ({len(down)} while it was down for "
          f"{seen['back_at'] - seen['killed_at']:.1f} s, {len(after)} after it was back); "
          f"{len(got)} messages in the queue, {duplicates} duplicates, {marked} marked ({flagged} counted); "
          f"new leader {queues[endpoint]['leader']}; a first publish right after the kill: {seen['probe'][0]} "
          f"refused, confirmed after {seen['probe'][1]:.2f} s; transfer and checks {took:.1f} s")
    # an instance counts a marked dispatch once confirmed; a marked publish the broker refused but
    # enqueued all the same is in the queue uncounted
    assert marked >= flagged
