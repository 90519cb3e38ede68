"""/metrics as Prometheus reads it: a real gateway, its scrape parsed by prometheus_client's own
parser. Remote senders control some of what ends up in labels (the reply address of
``NServiceBus.OriginatingSite``): hostile values must neither break the scrape nor add series
without bound."""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families

from gwcore.config import WorkerListen
from httpclient import Client, get, nsb_request

_ORIGIN = b"NServiceBus.Header.NServiceBus.OriginatingSite: http%2Chttp%3A%2F%2Flocalhost%3A25899%2FHeadquarters%2F"


def addr(gw):
    return gw.addresses[0]


def parse(text: str) -> dict:
    """name -> family, or the parser's exception (a scrape Prometheus would drop whole)."""
    return {f.name: f for f in text_string_to_metric_families(text)}


def submit_from(origin: str) -> bytes:
    """A submit whose reply address (``NServiceBus.OriginatingSite``) is *origin*, URL-encoded
    as a sender puts it on the wire."""
    encoded = "".join(c if c.isalnum() or c in "-._~" else "".join(f"%{b:02X}" for b in c.encode()) for c in origin)
    return nsb_request().replace(_ORIGIN, b"NServiceBus.Header.NServiceBus.OriginatingSite: " + encoded.encode())


async def reply_to_each(gw, origins: list[str]) -> None:
    """A submit naming each reply address in turn, each consumed and replied to."""
    async with Client(*addr(gw)) as c:
        for origin in origins:
            assert (await c.request(submit_from(origin))).status == 200
    for _ in origins:
        msg = await asyncio.wait_for(gw.messages().get(), 5)
        await gw.reply(msg, b"{}")
        await msg.ack()


async def scrape(gw) -> str:
    r = await get(*addr(gw), "/metrics")
    assert r.status == 200
    return r.body.decode()


def test_hostile_reply_addresses_neither_break_the_scrape_nor_add_series(run, gateway_factory):
    """A `"`, a backslash and a newline in the reply address, then 40 distinct reply addresses:
    the scrape parses, and the per-destination series stay one for all that are not sites."""
    hostile = ['http,http://127.0.0.1:9/a"b/', "http,http://127.0.0.1:9/c\\d/", "http,http://127.0.0.1:9/e\nf/"]
    hostile += [f"http,http://127.0.0.1:9/many{i}/" for i in range(40)]

    async def main():
        async with gateway_factory(retry_delays=(3600.0,), sites="Headquarters=http://127.0.0.1:9/Headquarters/") as gw:
            await reply_to_each(gw, hostile)
            await gw.send_to_sites(["Headquarters"], b"{}")
            await asyncio.sleep(0.2)  # each destination tried once (connection refused)
            families = parse(await scrape(gw))
            for name in ("gwcore_outgoing_in_flight", "gwcore_outgoing_site_sent"):
                sites = sorted(s.labels["site"] for s in families[name].samples)
                assert sites == ["Headquarters", "other"], (name, sites)

    run(main())


def test_histogram_sums_are_exact(run, gateway_factory):
    """A sum past a million is written with every digit (``:g`` made 1234567 into 1.23457e+06)."""
    async def main():
        async with gateway_factory() as gw:
            gw.writer.stats.batch_size.sum = 1234567
            families = parse(await scrape(gw))
            sums = [s.value for s in families["gwcore_commit_batch_size"].samples if s.name.endswith("_sum")]
            assert sums == [1234567.0]

    run(main())


def sample(families: dict, family: str, name: str | None = None, **labels) -> float:
    """The value of the one sample *name* (default: the family's own name) with *labels*."""
    f = families[family]
    name = name or (family + "_total" if f.type == "counter" else family)
    found = [s.value for s in f.samples
             if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (family, name, labels, found)
    return found[0]


def test_what_operators_look_for(run, gateway_factory, tmp_path):
    """Request times by call type and status (the compiled path's 200s and Python's other
    answers alike), bytes in and out, the oldest message's age, per-site send failures and
    retries and request times, handler time, build info, process metrics."""
    handled = asyncio.Event()

    async def handler(msg):
        handled.set()

    async def main():
        async with gateway_factory(sites="Headquarters=http://127.0.0.1:9/Headquarters/",
                                   retry_delays=(3600.0,)) as gw:
            async with Client(*addr(gw)) as c:
                for _ in range(3):
                    assert (await c.request(nsb_request())).status == 200
                assert (await c.request(nsb_request(call_type="Nonsense"))).status == 400
            await gw.send_to_sites(["Headquarters"], b"{}")
            await asyncio.sleep(1.1)
            families = parse(await scrape(gw))
            count = "gwcore_http_request_seconds_count"
            assert sample(families, "gwcore_http_request_seconds", count, call_type="submit", status="200") == 3
            assert sample(families, "gwcore_http_request_seconds", count, call_type="submit", status="400") == 1
            assert sample(families, "gwcore_http_request_seconds", "gwcore_http_request_seconds_bucket",
                          call_type="submit", status="200", le="+Inf") == 3
            assert sample(families, "gwcore_http_received_bytes") > 4 * 500
            assert sample(families, "gwcore_http_sent_bytes") > 4 * 50
            assert sample(families, "gwcore_queue_oldest_age_seconds", queue="local") >= 1.0
            assert sample(families, "gwcore_queue_oldest_age_seconds", queue="outgoing") >= 1.0
            assert sample(families, "gwcore_outgoing_site_failures", site="Headquarters") == 1
            assert sample(families, "gwcore_outgoing_site_retries", site="Headquarters") == 1
            assert sample(families, "gwcore_outgoing_request_seconds", "gwcore_outgoing_request_seconds_count",
                          site="Headquarters") == 1
            assert sample(families, "gwcore_store_fsync_seconds", "gwcore_store_fsync_seconds_count") >= 1
            assert sample(families, "gwcore_build_info", mode="standalone") == 1
            assert sample(families, "process_cpu_seconds") > 0
        async with gateway_factory(handler=handler, data_dir=str(tmp_path / "handled")) as gw:
            async with Client(*addr(gw)) as c:
                assert (await c.request(nsb_request())).status == 200
            await asyncio.wait_for(handled.wait(), 5)
            await asyncio.sleep(0.05)
            families = parse(await scrape(gw))
            assert sample(families, "gwcore_handler_seconds", "gwcore_handler_seconds_count") == 1
            assert sample(families, "gwcore_queue_oldest_age_seconds", queue="local") == 0

    run(main())


# -- where /metrics is served (docs/security.md, "Metrics") ------------------------------------

KEYS = (("Headquarters", b"a shared secret of 32 bytes....."),)


def test_with_an_admin_listener_metrics_are_served_there_only(run, gateway_factory):
    async def main():
        async with gateway_factory(admin_listen=WorkerListen("127.0.0.1", 0)) as gw:
            public, admin = addr(gw), gw.admin_address
            assert admin is not None and admin not in gw.addresses
            assert (await get(*public, "/metrics")).status == 404
            r = await get(*admin, "/metrics")
            assert r.status == 200 and "gwcore_http_requests" in parse(r.body.decode())
            for where in (public, admin):  # where load balancers look, and beside the metrics
                assert (await get(*where, "/healthz")).status == 200
                assert (await get(*where, "/readyz")).status == 200
            async with Client(*admin) as c:  # no gateway traffic on the admin listener
                assert (await c.request(nsb_request())).status == 404

    run(main())


def test_the_admin_listener_cuts_off_a_slow_client(run, gateway_factory):
    """The admin listener is bounded in time like the receive channels: a head that never
    completes is 408 and closed after GWCORE_HTTP_REQUEST_TIMEOUT, and others are served meanwhile."""
    async def main():
        async with gateway_factory(admin_listen=WorkerListen("127.0.0.1", 0), http_request_timeout=0.5) as gw:
            reader, writer = await asyncio.open_connection(*gw.admin_address)
            try:
                writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")     # and nothing more
                await writer.drain()
                assert (await get(*gw.admin_address, "/healthz")).status == 200
                answer = await asyncio.wait_for(reader.read(), 10)       # up to the close
                assert answer.startswith(b"HTTP/1.1 408 ") and b"Connection: close" in answer
            finally:
                writer.close()

    run(main())


def test_metrics_public_puts_them_back_on_the_receive_channels(run, gateway_factory):
    async def main():
        async with gateway_factory(admin_listen=WorkerListen("127.0.0.1", 0), metrics_public="on",
                                   receive_keys=KEYS) as gw:
            assert (await get(*addr(gw), "/metrics")).status == 200
            assert (await get(*gw.admin_address, "/metrics")).status == 200

    run(main())


def test_a_channel_that_requires_signatures_does_not_serve_metrics_by_default(run, gateway_factory):
    """An unsigned submit is refused 401 there: an unsigned GET /metrics must not see the
    gateway's counters either."""
    async def main():
        async with gateway_factory(receive_keys=KEYS) as gw:
            assert (await get(*addr(gw), "/metrics")).status == 404
            assert (await get(*addr(gw), "/readyz")).status == 200
        async with gateway_factory(receive_keys=KEYS, allow_unsigned=True) as gw:  # open anyway
            assert (await get(*addr(gw), "/metrics")).status == 200

    run(main())


def test_admin_listen_and_metrics_public_settings():
    import pytest

    from gwcore import Settings
    from gwcore.errors import ConfigurationError

    base = {"GWCORE_RECEIVE_CHANNELS": "http://127.0.0.1:25900/RemoteSite/"}
    s = Settings.from_env({**base, "GWCORE_ADMIN_LISTEN": "127.0.0.1:9464"})
    assert (s.admin_listen.host, s.admin_listen.port, s.metrics_public) == ("127.0.0.1", 9464, "auto")
    assert not s.metrics_public_on()
    assert Settings.from_env(base).admin_listen is None and Settings.from_env(base).metrics_public_on()
    assert Settings.from_env({**base, "GWCORE_METRICS_PUBLIC": "1"}).metrics_public == "on"
    assert not Settings.from_env({**base, "GWCORE_METRICS_PUBLIC": "0"}).metrics_public_on()
    for bad in ({"GWCORE_ADMIN_LISTEN": "https://127.0.0.1:9464"}, {"GWCORE_ADMIN_LISTEN": "127.0.0.1:25900"},
                {"GWCORE_METRICS_PUBLIC": "sometimes"}):
        with pytest.raises(ConfigurationError, match=next(iter(bad))):
            Settings.from_env({**base, **bad})


# -- the Grafana dashboard (docs/grafana/gwcore.json) -----------------------------------------

def dashboard_metric_names() -> set[str]:
    """Every metric name the dashboard's queries (and its instance variable) read."""
    import json
    import pathlib
    import re

    dash = json.loads((pathlib.Path(__file__).parent.parent / "docs" / "grafana" / "gwcore.json").read_text())
    queries = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    queries += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    return {m for q in queries for m in re.findall(r"\b(?:gwcore|process)_[a-z0-9_]+\b", q)}


def test_every_metric_the_dashboard_uses_is_scraped(run, gateway_factory):
    names = dashboard_metric_names()
    assert len(names) > 30

    async def main():
        async with gateway_factory(handler=lambda msg: None, sites="Headquarters=http://127.0.0.1:9/Headquarters/",
                                   retry_delays=(3600.0,)) as gw:
            async with Client(*addr(gw)) as c:
                assert (await c.request(nsb_request())).status == 200
            await gw.send_to_sites(["Headquarters"], b"{}")
            await asyncio.sleep(0.3)
            scraped = {s.name for f in parse(await scrape(gw)).values() for s in f.samples}
            assert sorted(names - scraped) == []

    run(main())


def test_reply_destinations_a_sender_names_are_bounded(run, gateway_factory, monkeypatch):
    """40 messages, each naming its own reply address (a listener that never answers): at most
    GWCORE_REPLY_DESTINATIONS_MAX (5) destinations with their workers and connections are open at
    once, the others' replies wait in the outgoing queue meanwhile, and in the end every reply was
    tried once, nothing lost, and what closed destinations counted stays in the "other" row."""
    from gwcore import egress
    monkeypatch.setattr(egress, "_REPLY_WAIT_MS", 100)
    monkeypatch.setattr(egress, "_REPLY_IDLE", 0.4)

    async def main():
        async def silent(reader, writer):
            await reader.read(1 << 20)      # takes the request, never answers
            await asyncio.sleep(30)

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        origins = [f"http,http://127.0.0.1:{port}/many{i}/" for i in range(40)]
        try:
            async with gateway_factory(retry_delays=(3600.0,), reply_destinations_max=5, send_timeout=0.3) as gw:
                await reply_to_each(gw, origins)
                most = 0
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 30
                while True:
                    most = max(most, gw.forwarder._replies_open())
                    families = parse(await scrape(gw))
                    tried = sample(families, "gwcore_outgoing_site_failures", site="other")
                    if tried >= 40 or loop.time() > deadline:
                        break
                    await asyncio.sleep(0.02)
                assert tried == 40                   # each reply tried once (and set to retry in an hour)
                assert most == 5 and gw.forwarder.replies_deferred > 0
                assert sample(families, "gwcore_outgoing_replies_deferred") == gw.forwarder.replies_deferred
                assert gw.store.counts()["outgoing"] == 40 and gw.store.counts()["outgoing_errors"] == 0
                while gw.forwarder._replies_open():      # idle ones close by themselves
                    assert loop.time() < deadline
                    await asyncio.sleep(0.05)
                assert sample(parse(await scrape(gw)), "gwcore_outgoing_site_failures", site="other") == 40
        finally:
            server.close()

    run(main())
