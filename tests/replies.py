"""Callbacks on scaled-out instances, for both forms of selected mode: a site whose handler
replies, and every instance asking it at once and getting its own reply."""

from __future__ import annotations

import asyncio

from procs import free_port

from gwcore import Gateway, Settings


async def replying_site(directory: str, name: str = "SiteB") -> tuple[Gateway, str]:
    """A standalone gateway *name* whose handler replies ``re:`` + the body; it and its URL."""
    holder: list[Gateway] = []

    async def respond(message):
        await holder[0].reply(message, b"re:" + message.body)

    port = free_port()
    url = f"http://127.0.0.1:{port}/{name}/"
    gw = await Gateway(Settings.from_env({}, data_dir=directory, endpoint=name, receive_channels=url,
                                         retry_delays=(0.1,)), handler=respond).start()
    holder.append(gw)
    return gw, url


async def each_gets_its_reply(instances: list[Gateway], replier: Gateway, site: str = "SiteB") -> None:
    """Once one of *instances* leads, every instance's request() at once: each gets the reply to
    its own question, addressed (``RouteTo``) to its own reply queue. Stops them all."""
    try:
        deadline = asyncio.get_running_loop().time() + 10
        while sum(g.ready for g in instances) != 1:
            assert asyncio.get_running_loop().time() < deadline, "no leader"
            await asyncio.sleep(0.02)
        await _ask(instances, site)
    finally:
        for g in instances:
            await g.stop()
        await replier.stop()


async def _ask(instances: list[Gateway], site: str) -> None:
    replies = await asyncio.gather(*(g.request(site, f"q{i}".encode(), timeout=20) for i, g in enumerate(instances)))
    assert [r.body for r in replies] == [f"re:q{i}".encode() for i in range(len(instances))]
    for g, r in zip(instances, replies):
        assert r.headers["RouteTo"] == g.selected.reply_queue
