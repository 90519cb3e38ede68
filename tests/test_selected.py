"""Selected-instance mode in process (docs/deployment.md): real RabbitMQ, real sockets. The
broker link goes through a TCP relay the tests can cut, which is what a broker outage or a
partition looks like to the instance (RabbitMQ itself keeps running for the other tests)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import struct
import subprocess

import aio_pika
import pytest
from broker import AMQP_URL, delete_queues, drain, endpoint, rabbitmqctl, require_broker, unique_endpoint  # noqa: F401
from httpclient import Client, get, nsb_request
from nginx import Nginx
from procs import free_port
from replies import each_gets_its_reply, replying_site

from gwcore import Gateway, Settings
from gwcore.amqp import Link


class Relay:
    """A TCP relay to RabbitMQ: :meth:`cut` drops every connection and refuses new ones until
    :meth:`restore`."""

    def __init__(self) -> None:
        self.port = free_port()
        self.server: asyncio.AbstractServer | None = None
        self.pipes: set[asyncio.StreamWriter] = set()

    async def start(self) -> "Relay":
        self.server = await asyncio.start_server(self._client, "127.0.0.1", self.port, reuse_address=True)
        return self

    async def _client(self, reader, writer) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", 5672)
        except OSError:
            writer.close()
            return
        self.pipes.update((writer, up_w))

        async def pump(src, dst):
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_w), pump(up_r, writer))

    async def cut(self) -> None:
        self.server.close()
        await self.server.wait_closed()
        for w in self.pipes:
            w.transport.abort()
        self.pipes.clear()

    async def restore(self) -> None:
        await self.start()

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"


def selected_settings(tmp_path, endpoint: str, name: str, **kw) -> Settings:
    kw.setdefault("amqp_url", AMQP_URL)
    return Settings.from_env({}, data_dir=str(tmp_path / name), endpoint=endpoint, mode="selected",
                             receive_channels=f"http://127.0.0.1:{kw.pop('port', 0)}/{endpoint}/",
                             election_interval=0.05, instance=name, shutdown_timeout=5.0, **kw)


async def until(predicate, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def only_instance(settings: Settings):
    """A selected-mode gateway that is the only instance, once it is elected; stopped at the end."""
    gw = await Gateway(settings).start()
    try:
        await until(lambda: gw.ready, 10, "the only instance to be elected")
        yield gw
    finally:
        await gw.stop()


async def submit(port: int, endpoint: str, msg_id: str, extra=None, body: bytes | None = None) -> tuple[int, str]:
    async with Client("127.0.0.1", port) as c:
        kw = {} if body is None else {"body": body}
        r = await c.request(nsb_request(msg_id, path=f"/{endpoint}/", extra=extra, **kw))
        return r.status, r.reason


def port_of(gw: Gateway) -> int:
    return gw.addresses[0][1]


async def append_record(endpoint: str, kind: str, ids: list[str], ttl: str = "604800s") -> None:
    """A dedup record as a leader appends it (what a leader that crashed left behind)."""
    body = b"".join(struct.pack(">I", len(k)) + k for k in (f"{endpoint}\0{i}".encode() for i in ids))
    conn = await aio_pika.connect(AMQP_URL)
    try:
        ch = await conn.channel(publisher_confirms=True)
        await ch.declare_queue(f"{endpoint}.gwcore.dedup", durable=True,
                               arguments={"x-queue-type": "stream", "x-max-age": ttl})
        await ch.default_exchange.publish(
            aio_pika.Message(body, headers={"gwcore.kind": kind, "gwcore.instance": "crashed"}),
            routing_key=f"{endpoint}.gwcore.dedup")
    finally:
        await conn.close()


def test_messages_reach_a_quorum_queue_as_a_plain_consumer_reads_them(tmp_path, endpoint, run):
    async def main():
        async with only_instance(selected_settings(tmp_path, endpoint, "i1")) as gw:
            extra = [("NServiceBus.Header.Custom.Thing", "caf%C3%A9")]
            assert await submit(port_of(gw), endpoint, "m1", extra) == (200, "OK")
            assert await submit(port_of(gw), endpoint, "m1", extra) == (200, "OK")  # duplicate
            assert await submit(port_of(gw), endpoint, "m2") == (200, "OK")
            assert gw.selected.dispatched == 2 and not gw.selected.undone

    run(main())
    got = drain(endpoint)
    assert [m[0] for m in got] == ["m1", "m2"]
    headers = got[0][1]
    assert headers["Custom.Thing"] == "café" and headers["NServiceBus.MessageId"] == "m1"
    assert "gwcore.PossibleDuplicate" not in headers
    assert got[0][2] == b'{"Hello":"World"}'
    listed = {row["name"]: row for row in json.loads(rabbitmqctl("list_queues", "name", "type", "--formatter", "json", "-q"))
              if row["name"].startswith(endpoint)}
    assert listed[endpoint]["type"] == "quorum" and listed[f"{endpoint}.gwcore.dedup"]["type"] == "stream"
    # the reply queue too: a cluster's nodes replicate it, so that it is there while one is down
    assert listed[f"{endpoint}.gwcore.instance.i1"]["type"] == "quorum"


def test_a_classic_reply_queue_an_earlier_gwcore_declared_is_used_as_it_is(tmp_path, endpoint, run):
    async def declare_classic():
        conn = await aio_pika.connect(AMQP_URL)
        try:
            ch = await conn.channel()
            await ch.declare_queue(f"{endpoint}.gwcore.instance.i1", durable=True, arguments={"x-expires": 600_000})
        finally:
            await conn.close()

    async def main():
        await declare_classic()
        async with only_instance(selected_settings(tmp_path, endpoint, "i1")) as gw:
            assert gw.selected.link.connects == 1  # set up at the first try, on the classic queue
            assert await submit(port_of(gw), endpoint, "m1") == (200, "OK")

    run(main())
    listed = {row["name"]: row["type"] for row in json.loads(rabbitmqctl("list_queues", "name", "type", "--formatter",
                                                                         "json", "-q"))}
    assert listed[f"{endpoint}.gwcore.instance.i1"] == "classic"
    assert [m[0] for m in drain(endpoint)] == ["m1"]


def test_link_passes_over_an_unreachable_node_and_reconnects_to_the_next(run):
    """Several broker URLs (a cluster's nodes, here relays to the one broker): a node that does
    not answer is passed over, and a lost connection is opened again on the next node in the list
    even when the one that dropped it answers again at once."""
    async def main():
        a, b = await Relay().start(), await Relay().start()
        dead = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
        ups: list[str] = []
        downs: list[str] = []

        async def on_up(conn):
            ups.append(link.url)

        link = Link([dead, a.url, b.url], "gwcore link test", on_up, lambda exc: downs.append(link.url), first=0)
        link.start()
        try:
            await until(lambda: ups == [a.url], 10, "a connection past the unreachable node")
            assert link.connected and link.node == f"amqp://guest@127.0.0.1:{a.port}/"
            await a.cut()
            await a.restore()
            await until(lambda: len(ups) == 2, 10, "the connection again")
            assert (ups[1], downs) == (b.url, [a.url])
            await b.cut()
            await until(lambda: len(ups) == 3, 10, "the connection again")
            assert (ups[2], downs) == (a.url, [a.url, b.url])  # past the unreachable one again
            assert link.connects == 3 and f"127.0.0.1:{b.port}" in link.last_error
        finally:
            await link.stop()
            for relay in (a, b):
                if relay.server.is_serving():
                    await relay.cut()

    run(main())


def test_link_starts_on_a_node_picked_at_random():
    urls = [f"amqp://guest:guest@127.0.0.1:{5672 + i}/" for i in range(3)]
    links = [Link(urls, "gwcore link test", None, None) for _ in range(200)]
    assert {link.url for link in links} == set(urls)
    assert Link(urls[0], "gwcore link test", None, None).urls == (urls[0],)
    assert Link(",".join(urls), "gwcore link test", None, None).urls == tuple(urls)  # Settings.amqp_url as it is
    described = Link(urls, "gwcore link test", None, None).describe()
    assert described == ", ".join(f"127.0.0.1:{5672 + i}/" for i in range(3))


def test_an_instance_tries_for_the_leadership_only_once_set_up(tmp_path, endpoint, run, monkeypatch):
    """An instance's connection setup (its reply queue declared and consumed, its listeners told
    the broker is there) ends before it tries for the leadership. Before, the election started
    first: with a slow setup a standby lost elections while /readyz still said "broker
    unavailable" (CI saw it), and an instance could lead before it could take its replies."""
    from gwcore.amqp import Topology

    declare_instance = Topology.declare_instance

    async def slow_declare_instance(self, connection):
        await asyncio.sleep(0.5)
        return await declare_instance(self, connection)

    monkeypatch.setattr(Topology, "declare_instance", slow_declare_instance)

    async def main():
        gws = [await Gateway(selected_settings(tmp_path, endpoint, f"i{i}")).start() for i in range(2)]
        try:
            await until(lambda: any(g.selected.election.elections_lost for g in gws)
                        and any(g.ready for g in gws), 10, "a leader and a lost election")
            for g in gws:
                assert g.selected._ready_link.is_set()  # set up before it tried
                r = await get("127.0.0.1", port_of(g), "/readyz")
                assert (r.status, r.reason) == ((200, "OK") if g.ready else (503, "Service Unavailable: standby"))
        finally:
            for g in gws:
                await g.stop()

    run(main())


def test_one_leader_the_others_answer_503_standby(tmp_path, endpoint, run):
    async def main():
        gws = [await Gateway(selected_settings(tmp_path, endpoint, f"i{i}")).start() for i in range(3)]
        try:
            await until(lambda: sum(g.ready for g in gws) == 1, 10, "a leader")
            leader = next(g for g in gws if g.ready)
            # the standbys keep trying (three more tries each): still the one leader
            lost = {g: g.selected.elections_lost for g in gws if g is not leader}
            await until(lambda: all(g.selected.elections_lost >= n + 3 for g, n in lost.items()), 10,
                        "the standbys to try again")
            assert [g for g in gws if g.ready] == [leader] and leader.selected.elections_won == 1
            for g in gws:
                r = await get("127.0.0.1", port_of(g), "/readyz")
                assert (r.status, r.reason) == ((200, "OK") if g is leader else (503, "Service Unavailable: standby"))
                if g is not leader:
                    assert await submit(port_of(g), endpoint, "x") == (503, "Service Unavailable: standby")
            assert await submit(port_of(leader), endpoint, "a") == (200, "OK")
            metrics = (await get("127.0.0.1", port_of(leader), "/metrics")).body.decode()
            assert 'gwcore_selected_role{role="leader"} 1' in metrics and "gwcore_dispatched_total 1" in metrics
            # where its time went: one batch of one message published and confirmed, two stream
            # records (its intent, then its batch done) before the 200
            assert "gwcore_dispatch_batch_messages_count 1.0" in metrics
            assert 'gwcore_dispatch_batch_messages_bucket{le="1.0"} 1.0' in metrics
            assert "gwcore_dispatch_confirm_seconds_count 1.0" in metrics
            assert "gwcore_dispatch_append_seconds_count 2.0" in metrics, \
                [line for line in metrics.splitlines() if "append_seconds_count" in line]
            # the standbys follow the dedup stream into their own store
            for g in gws:
                await until(lambda g=g: g.selected.replica.get(f"{endpoint}\0a".encode()) == 2, 5, "the record")
        finally:
            for g in gws:
                await g.stop()

    run(main())
    assert [m[0] for m in drain(endpoint)] == ["a"]


def test_ack_dispatched_answers_503_while_the_broker_is_away(tmp_path, endpoint, run):
    async def main():
        relay = await Relay().start()
        gw = await Gateway(selected_settings(tmp_path, endpoint, "i1", amqp_url=relay.url)).start()
        try:
            await until(lambda: gw.ready, 10, "the election")
            assert await submit(port_of(gw), endpoint, "before") == (200, "OK")
            await relay.cut()
            await until(lambda: not gw.selected.link.connected, 5, "the instance to notice")
            assert not gw.ready  # fenced: the leadership went with the connection
            assert await submit(port_of(gw), endpoint, "during") == (503, "Service Unavailable: broker unavailable")
            r = await get("127.0.0.1", port_of(gw), "/readyz")
            assert r.status == 503
            await relay.restore()
            await until(lambda: gw.ready, 10, "the instance to be elected again")
            assert await submit(port_of(gw), endpoint, "during") == (200, "OK")
            assert await submit(port_of(gw), endpoint, "after") == (200, "OK")
        finally:
            await gw.stop()
            await relay.cut()

    run(main())
    assert [m[0] for m in drain(endpoint)] == ["before", "during", "after"]


def test_a_retry_right_after_the_200_is_a_duplicate_with_the_outbox_in_memory(tmp_path, endpoint, run):
    """With ack=dispatched nothing is committed on a submit's way (the outbox is in memory), so
    the store's dedup record no longer catches a retry sent the moment the 200 arrives, before
    the follower has read the done record back: the leader puts its own done keys into its
    replica before answering. Each id sent twice, back to back: one copy each, unmarked."""
    ids = [f"r{i}" for i in range(30)]

    async def main():
        async with only_instance(selected_settings(tmp_path, endpoint, "i1")) as gw:
            for msg_id in ids:
                assert await submit(port_of(gw), endpoint, msg_id) == (200, "OK")
                assert await submit(port_of(gw), endpoint, msg_id) == (200, "OK")
            assert gw.writer.stats.accepted == 0  # no submit was committed to the store
            assert gw.selected.dispatched == len(ids)

    run(main())
    got = drain(endpoint)
    assert sorted(m[0] for m in got) == sorted(ids)
    assert not any(m[1].get("gwcore.PossibleDuplicate") for m in got)


def test_a_publish_no_queue_takes_is_not_answered_200(tmp_path, endpoint, run):
    """The endpoint's queue deleted while the leader runs: the broker acknowledges a publish
    that no queue takes and drops the message, so before publishes were mandatory the next
    submit was answered 200 and lost. Now it comes back (basic.return): its submitter hears 503,
    the queue is declared again, and the sender's retry is in it, marked (it was in doubt). (A
    stream record is published mandatory too; a deleted stream is docs/deployment.md's.)"""
    async def main():
        async with only_instance(selected_settings(tmp_path, endpoint, "i1")) as gw:
            assert await submit(port_of(gw), endpoint, "before") == (200, "OK")
            await asyncio.get_running_loop().run_in_executor(None, rabbitmqctl, "delete_queue", endpoint)
            answers = []
            for _attempt in range(50):
                answers.append(await submit(port_of(gw), endpoint, "after"))
                if answers[-1] == (200, "OK"):
                    break
                await asyncio.sleep(0.1)
            status, reason = answers[0]
            assert (status, reason.partition(" (")[0]) == (503, "Service Unavailable: broker unavailable"), answers
            assert answers[-1] == (200, "OK"), answers
            assert gw.selected.dispatcher.returned >= 1

    run(main())
    got = drain(endpoint)
    assert [m[0] for m in got] == ["after"]  # "before" went with the deleted queue
    assert got[0][1].get("gwcore.PossibleDuplicate") == "true"


def test_a_refused_publish_is_dispatched_again_on_a_new_channel(tmp_path, endpoint, run):
    """The broker nacks every publish to the endpoint's queue (a policy on this test's queue
    alone: reject-publish at length 0); the dispatcher goes on on a new channel each time (what
    gets it past a quorum queue's dead leader on a cluster: docs/deployment.md), and the message
    goes through, marked, once the broker takes it."""
    policy = f"{endpoint}-refuse"

    async def main():
        async with only_instance(selected_settings(tmp_path, endpoint, "i1")) as gw:
            assert await submit(port_of(gw), endpoint, "before") == (200, "OK")
            ctl = functools.partial(asyncio.get_running_loop().run_in_executor, None, rabbitmqctl)
            await ctl("set_policy", policy, f"^{endpoint}$", '{"max-length": 0, "overflow": "reject-publish"}',
                      "--apply-to", "queues")
            first = gw.selected.stream.channel
            dispatcher = gw.selected.dispatcher
            first_pub = dispatcher._frames.channel
            status, reason = await submit(port_of(gw), endpoint, "refused")
            assert (status, reason.partition(" (")[0]) == (503, "Service Unavailable: broker unavailable"), reason
            assert "Nack" in reason
            await until(lambda: gw.selected.stream.channel is not first, 5, "a new channel")
            # both renewed, and still apart: the publishes' channel is not the appends'
            await until(lambda: dispatcher._frames.channel is not first_pub, 5, "a new publish channel")
            assert dispatcher._frames.channel.number != gw.selected.stream._raw.number
            await ctl("clear_policy", policy)
            assert await submit(port_of(gw), endpoint, "refused") == (200, "OK")  # the sender's retry
            assert gw.ready and gw.selected.link.connects == 1  # the connection stayed up throughout

    try:
        run(main())
    finally:
        subprocess.run(["rabbitmqctl", "clear_policy", policy], capture_output=True)
    got = drain(endpoint)
    assert [m[0] for m in got] == ["before", "refused"]
    assert got[1][1].get("gwcore.PossibleDuplicate") == "true"  # refused once: in doubt, as any nack


def test_ack_stored_keeps_accepting_while_the_broker_is_away(tmp_path, endpoint, run):
    async def main():
        relay = await Relay().start()
        gw = await Gateway(selected_settings(tmp_path, endpoint, "i1", amqp_url=relay.url, ack="stored")).start()
        try:
            await until(lambda: gw.ready, 10, "the election")
            assert await submit(port_of(gw), endpoint, "before") == (200, "OK")
            await until(lambda: not gw.selected.undone, 5, "the dispatch")
            await relay.cut()
            await until(lambda: not gw.selected.link.connected, 5, "the instance to notice")
            for i in range(5):
                assert await submit(port_of(gw), endpoint, f"during{i}") == (200, "OK")
            assert len(gw.selected.undone) == 5
            await relay.restore()
            await until(lambda: gw.selected.leading and not gw.selected.undone, 10, "the outbox to drain")
        finally:
            await gw.stop()
            await relay.cut()

    run(main())
    got = drain(endpoint)
    assert [m[0] for m in got] == ["before"] + [f"during{i}" for i in range(5)]
    # accepted outside a leadership term: another leader could have taken a retry of them
    assert [m[1].get("gwcore.PossibleDuplicate") for m in got] == [None] + ["true"] * 5


def test_the_stream_decides_duplicates_and_in_flight_ids_at_a_new_leader(tmp_path, endpoint, run):
    """A record 'done' = acknowledged by the old leader: a duplicate. 'intent' without 'done' =
    in flight when it died: dispatched again, marked, and counted."""

    async def main():
        await append_record(endpoint, "intent", ["inflight", "acked"])
        await append_record(endpoint, "done", ["acked"])
        gw = await Gateway(selected_settings(tmp_path, endpoint, "i1")).start()
        try:
            await until(lambda: gw.ready, 10, "the election")
            assert await submit(port_of(gw), endpoint, "acked") == (200, "OK")
            assert await submit(port_of(gw), endpoint, "inflight") == (200, "OK")
            assert await submit(port_of(gw), endpoint, "new") == (200, "OK")
            metrics = (await get("127.0.0.1", port_of(gw), "/metrics")).body.decode()
            assert "gwcore_possible_duplicates_total 1" in metrics
        finally:
            await gw.stop()
        # the records are in the instance's own store: after a restart it knows them at once
        gw = await Gateway(selected_settings(tmp_path, endpoint, "i1")).start()
        try:
            assert gw.selected.replica[f"{endpoint}\0acked".encode()] == 2
            await until(lambda: gw.ready, 10, "the election")
            assert await submit(port_of(gw), endpoint, "new") == (200, "OK")
        finally:
            await gw.stop()

    run(main())
    got = drain(endpoint)
    assert [(m[0], m[1].get("gwcore.PossibleDuplicate")) for m in got] == [("inflight", "true"), ("new", None)]


def test_a_callback_is_answered_on_the_instance_that_asked(tmp_path, endpoint, run):
    """SiteA: three selected instances behind nginx; SiteB: a standalone gateway whose handler
    replies. Each SiteA instance's request() gets its own reply, whoever is the leader."""
    require_broker()
    site_b = unique_endpoint("gwtest-b")
    a_ports = [free_port() for _ in range(3)]
    proxy = Nginx(str(tmp_path / "nginx"), free_port(), a_ports, tries=0, repeat=2).start()
    a_url = f"http://127.0.0.1:{proxy.port}/{endpoint}/"

    async def main():
        b, b_url = await replying_site(str(tmp_path / "b"), site_b)
        a = [await Gateway(selected_settings(tmp_path, endpoint, f"a{i}", port=a_ports[i], sites=f"SiteB={b_url}",
                                             reply_to_uri=a_url, retry_delays=(0.1,), retries=50)).start()
             for i in range(3)]
        await each_gets_its_reply(a, b)

    try:
        run(main())
    finally:
        proxy.stop()
        delete_queues(endpoint, [f"{endpoint}.gwcore.instance.a{i}" for i in range(3)])
    assert drain(endpoint) == []  # every reply went to its instance's queue, none to the shared one


def test_every_instance_consumes_the_endpoint_queue(tmp_path, endpoint, run):
    """Competing consumers: a handler on each instance, the standby's included."""
    handled: list[tuple[str, str, bool]] = []

    def handler_for(name):
        async def handle(message):
            await asyncio.sleep(0.01)
            handled.append((name, message.id, message.redelivered))
        return handle

    async def main():
        gws = [await Gateway(selected_settings(tmp_path, endpoint, f"i{i}", amqp_prefetch=1),
                             handler=handler_for(f"i{i}")).start() for i in range(2)]
        try:
            await until(lambda: sum(g.ready for g in gws) == 1, 10, "a leader")
            leader = next(g for g in gws if g.ready)
            await asyncio.gather(*(submit(port_of(leader), endpoint, f"m{i}") for i in range(40)))
            await until(lambda: len(handled) >= 40, 20, "every message handled")
        finally:
            for g in gws:
                await g.stop()

    run(main())
    assert sorted(m for _n, m, _r in handled) == sorted(f"m{i}" for i in range(40))
    assert {n for n, _m, _r in handled} == {"i0", "i1"}  # both instances took work
    assert drain(endpoint) == []  # every delivery was acknowledged


def test_replicated_records_expire_with_the_dedup_ttl(tmp_path, endpoint, run):
    async def main():
        await append_record(endpoint, "done", ["old"], ttl="1s")
        gw = await Gateway(selected_settings(tmp_path, endpoint, "i1", dedup_ttl=1.0)).start()
        try:
            key = f"{endpoint}\0old".encode()
            await until(lambda: gw.selected.replica.get(key) == 2, 5, "the record")
            await asyncio.sleep(1.1)
            await append_record(endpoint, "done", ["later"], ttl="1s")  # the next flush expires
            await until(lambda: key not in gw.selected.replica, 5, "the record to expire")
            await until(lambda: gw.ready, 10, "the election")
            assert await submit(port_of(gw), endpoint, "old") == (200, "OK")
        finally:
            await gw.stop()

    run(main())
    assert [m[0] for m in drain(endpoint)] == ["old"]  # forgotten after the TTL: accepted as new


async def append_records(endpoint: str, kind: str, ids: list[str]) -> None:
    """One record per id, as many leaders' batches would leave them, in one connection."""
    conn = await aio_pika.connect(AMQP_URL)
    try:
        ch = await conn.channel(publisher_confirms=True)
        name = f"{endpoint}.gwcore.dedup"
        await ch.declare_queue(name, durable=True, arguments={"x-queue-type": "stream", "x-max-age": "604800s"})
        for start in range(0, len(ids), 500):
            await asyncio.gather(*(ch.default_exchange.publish(
                aio_pika.Message(struct.pack(">I", len(k)) + k,
                                 headers={"gwcore.kind": kind, "gwcore.instance": "earlier"}), routing_key=name)
                for k in (f"{endpoint}\0{i}".encode() for i in ids[start:start + 500])))
    finally:
        await conn.close()


def test_a_new_instance_reads_a_stream_far_longer_than_its_prefetch(tmp_path, endpoint, run):
    """The follower acknowledges records in bulk: with fewer acknowledgements than records the
    broker must still deliver past the channel's prefetch (2,000), to the marker at the end."""
    ids = [f"m{i}" for i in range(5200)]

    async def main():
        await append_records(endpoint, "done", ids)
        gw = await Gateway(selected_settings(tmp_path, endpoint, "i1")).start()
        try:
            await until(lambda: gw.ready, 30, "the instance to read the stream and be elected")
            replica = gw.selected.replica
            assert all(replica.get(f"{endpoint}\0{i}".encode()) == 2 for i in ids)
            assert await submit(port_of(gw), endpoint, "m5199") == (200, "OK")  # a duplicate: not published
            assert await submit(port_of(gw), endpoint, "new") == (200, "OK")
        finally:
            await gw.stop()

    run(main())
    assert [m[0] for m in drain(endpoint)] == ["new"]


def test_the_follower_reconnects_when_the_broker_cancels_it(tmp_path, endpoint, run):
    """The broker cancels the stream follower's consumer (here: the stream deleted under a running
    instance): the follower ends and the instance connects again, instead of following nothing on
    a connection that is still up. (Before, the follower waited on the cancelled consumer for ever.)"""
    async def main():
        gw = await Gateway(selected_settings(tmp_path, endpoint, "i1")).start()
        try:
            await until(lambda: gw.ready, 10, "the election")
            link = gw.selected.link
            connects = link.connects
            conn = await aio_pika.connect(AMQP_URL)
            try:
                ch = await conn.channel()
                await ch.queue_delete(f"{endpoint}.gwcore.dedup")
            finally:
                await conn.close()
            await until(lambda: link.connects > connects and link.connected, 10, "a new connection after the cancel")
        finally:
            await gw.stop()

    run(main())
