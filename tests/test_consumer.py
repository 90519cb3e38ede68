"""Consuming through the Gateway: GWCORE_HANDLER (sync and async) and the async iterator."""

from __future__ import annotations

import asyncio
import uuid

import handlers
import pytest
from httpclient import Client, nsb_request

from gwcore import ConfigurationError, Gateway


@pytest.mark.parametrize("spec", ["handlers:record", "handlers:record_async"])
def test_handler_from_settings_gets_each_message_once_then_it_is_removed(run, make_settings, spec):
    handlers.seen.clear()
    ids = [str(uuid.uuid4()) for _ in range(20)]

    async def main():
        async with Gateway(make_settings(handler=spec)) as gw:
            async with Client(*gw.addresses[0]) as c:
                for i in ids + ids[:5]:  # the duplicates are not handled again
                    assert (await c.request(nsb_request(i))).status == 200
            deadline = asyncio.get_running_loop().time() + 5
            while gw.store.counts()["queue"] and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.01)
            assert gw.store.counts()["queue"] == 0

    run(main())
    assert handlers.seen == ids


def test_async_iterator_in_an_embedding_application(run, make_settings):
    async def main():
        async with Gateway(make_settings()) as gw:
            async with Client(*gw.addresses[0]) as c:
                for n in range(3):
                    await c.request(nsb_request(f"id-{n}", body=b"%d" % n))
            got = []
            async for message in gw.messages():
                got.append((message.id, message.body))
                await message.ack()
                if len(got) == 3:
                    break
            assert got == [("id-0", b"0"), ("id-1", b"1"), ("id-2", b"2")]
            assert gw.store.counts()["queue"] == 0

    run(main())


def test_bad_handler_spec_stops_startup(make_settings):
    with pytest.raises(ConfigurationError, match="GWCORE_HANDLER"):
        Gateway(make_settings(handler="handlers:nope"))
    with pytest.raises(ConfigurationError, match="GWCORE_HANDLER"):
        Gateway(make_settings(handler="no_such_module_xyz:f"))
