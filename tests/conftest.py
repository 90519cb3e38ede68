"""Shared fixtures: settings on a temporary store, an in-process gateway on both loops, a raw client."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import ci  # noqa: E402
from gwcore import Gateway, Settings  # noqa: E402
from gwcore.config import WorkerListen  # noqa: E402

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI every skip is a failure (tests/ci.py): whatever the test needs, CI must provide."""
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail") or not ci.in_ci():
        return
    if any(item.nodeid.startswith(prefix) for prefix in ci.ALLOWED_SKIPS):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"skipped in CI (CI is set), which counts as a failure here: {reason}"


def pytest_collection_modifyitems(config, items):
    """Mark the tests that must run alone (tests/ci.py SERIAL): ``make test`` runs ``-m "not
    serial"`` on two workers, then ``-m serial``."""
    for item in items:
        if any(item.nodeid.startswith(prefix) for prefix in ci.SERIAL):
            item.add_marker(pytest.mark.serial)


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
        # distributor mode's worker listener on an ephemeral port too (the default is 25901)
        overrides.setdefault("worker_listen", WorkerListen("127.0.0.1", 0))
        return Settings.from_env({}, **overrides)

    return make


@pytest.fixture
def gateway_factory(make_settings):
    """``async with gateway_factory(**settings) as gw`` starts a real gateway on a real socket."""

    def factory(handler=None, **overrides):
        return Gateway(make_settings(**overrides), handler=handler)

    return factory


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    """A throw-away CA, a server certificate for 127.0.0.1/localhost and a client certificate
    (CN=Headquarters) signed by it, made with the openssl CLI: ca.pem, server.pem/.key,
    client.pem/.key. Without openssl the TLS tests are skipped, except in CI (CI=true), where
    that is a failure: a CI run must not pass without having tested TLS."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    d = tmp_path_factory.mktemp("pki")

    def sh(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    sh("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=gwcore test CA",
       "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    (d / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    sh("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    sh("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
       "-out", "server.pem", "-days", "2", "-extfile", "server.ext")
    (d / "client.ext").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    sh("req", *ec, "-keyout", "client.key", "-out", "client.csr", "-subj", "/CN=Headquarters")
    sh("x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
       "-out", "client.pem", "-days", "2", "-extfile", "client.ext")
    return d
