"""`gwcore serve` tunes glibc malloc (gwcore.server.tune_malloc): a batch's receive buffer, grown
to megabytes and shrunk again, is not faulted in afresh by the next batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

# Feeds batch-sized requests to the real request parser in 64 KiB reads, as a socket would hand
# them over, and counts the page faults of the requests after the first few.
_SCRIPT = textwrap.dedent("""
    import json, os, resource, sys
    from gwcore.server import tune_malloc
    applied = tune_malloc() if sys.argv[1] == "tune" else False
    from gwcore._core import core

    body = core.encode_batch([(b"NServiceBus.Id: %d\\r\\n" % i, b"x" * 2048) for i in range(1100)])
    request = (b"POST /remotesite/ HTTP/1.1\\r\\nHost: x\\r\\ngwcore-Batch: 1\\r\\n"
               b"Content-Length: %d\\r\\n\\r\\n" % len(body) + body)
    parser = core.RequestParser(core.Framer("RemoteSite"), [b"/remotesite/"], max_headers=100,
                                max_header_bytes=65536, max_body=8 << 20, allow_get=False)
    reads = [request[i:i + 65536] for i in range(0, len(request), 65536)]

    def one():
        events = []
        for chunk in reads:
            events += parser.feed(chunk, 0)
        assert len(events) == 1 and type(events[0][2]) is core.Batch, events

    for _ in range(5):
        one()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(40):
        one()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 40
    print(json.dumps({"applied": applied, "faults": faults, "pages": len(request) // 4096}))
""")


def _run(mode: str, env: dict[str, str] | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True,
                         timeout=120, env=env, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_batch_buffer_is_reused_not_faulted_in_again():
    plain, tuned = _run("plain"), _run("tune")
    assert tuned["applied"] is True
    # without the tuning each request faults in most of its buffer's pages again ...
    assert plain["faults"] > plain["pages"] / 2, plain
    # ... with it, next to none
    assert tuned["faults"] < plain["pages"] / 20, tuned


def test_the_operators_malloc_tunables_win():
    env = dict(os.environ, GLIBC_TUNABLES="glibc.malloc.trim_threshold=1048576")
    assert _run("tune", env)["applied"] is False
