"""Shared fixtures: settings on a temporary store, an in-process gateway on both loops, a raw client."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from gwcore import Gateway, Settings  # noqa: E402

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

LOOPS = ["asyncio"] + (["uvloop"] if uvloop is not None else [])


@pytest.fixture(params=LOOPS)
def loop_name(request):
    return request.param


@pytest.fixture
def run(loop_name):
    """Run a coroutine to completion on the parametrized loop (asyncio and uvloop)."""
    factory = uvloop.new_event_loop if loop_name == "uvloop" else asyncio.new_event_loop

    def runner(coro, timeout: float = 60.0):
        with asyncio.Runner(loop_factory=factory) as r:
            return r.run(asyncio.wait_for(coro, timeout))

    return runner


@pytest.fixture
def make_settings(tmp_path):
    """Settings on a fresh data dir, listening on an ephemeral loopback port."""

    def make(**overrides):
        overrides.setdefault("data_dir", str(tmp_path / "store"))
        overrides.setdefault("endpoint", "RemoteSite")
        overrides.setdefault("receive_channels", "http://127.0.0.1:0/RemoteSite/")
        return Settings.from_env({}, **overrides)

    return make


@pytest.fixture
def gateway_factory(make_settings):
    """``async with gateway_factory(**settings) as gw`` starts a real gateway on a real socket."""

    def factory(handler=None, **overrides):
        return Gateway(make_settings(**overrides), handler=handler)

    return factory
