"""/metrics as Prometheus reads it: a real gateway, its scrape parsed by prometheus_client's own
parser. Remote senders control some of what ends up in labels (the reply address of
``NServiceBus.OriginatingSite``): hostile values must neither break the scrape nor add series
without bound."""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families

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
            async with Client(*addr(gw)) as c:
                for origin in hostile:
                    assert (await c.request(submit_from(origin))).status == 200
            for _ in hostile:
                msg = await asyncio.wait_for(gw.messages().get(), 5)
                await gw.reply(msg, b"{}")
                await msg.ack()
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
