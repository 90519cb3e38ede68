"""glibc malloc for a batch receiver (gwcore/malloc.py): a batch's receive buffer, grown to
megabytes and shrunk again, is not faulted in afresh by the next batch; applied only by
`gwcore serve`, at the first batch, unless the operator set malloc options."""

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
    from gwcore import malloc
    applied = malloc.tune() if sys.argv[1] == "tune" else False
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


_ONCE = textwrap.dedent("""
    import json
    from gwcore import malloc
    seen = [malloc.batch_seen()]          # not allowed: an embedding application's process
    malloc.allow(set_by_operator=True)
    seen.append(malloc.batch_seen())      # the operator's GLIBC_TUNABLES win
    malloc.allow(set_by_operator=False)
    seen += [malloc.batch_seen(), malloc.batch_seen()]   # applied once, at the first batch
    print(json.dumps(seen))
""")


def test_applied_once_at_the_first_batch_and_only_where_allowed():
    out = subprocess.run([sys.executable, "-c", _ONCE], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(out.stdout) == [False, False, True, False]


def test_the_operators_malloc_tunables_win():
    from gwcore.config import malloc_set_by_operator

    assert malloc_set_by_operator({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1048576"}) is True
    assert malloc_set_by_operator({"GLIBC_TUNABLES": "glibc.rtld.nns=2"}) is False
    assert malloc_set_by_operator({}) is False
