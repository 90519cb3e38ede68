"""What signing costs per worker call (docs/security.md, "Workers"): the worker's three headers,
and the distributor's check (HMAC, date window, nonce window) of a call it has not seen.

    pytest bench/bench_worker_auth.py --benchmark-only
"""

from __future__ import annotations

import pytest

from gwcore import auth

SECRET = b"a-worker-secret-of-some-length"
TARGET = "/.gwcore/worker/take/0123456789abcdef01234567/10000/101,102,103,104"


@pytest.mark.benchmark(group="worker-auth")
def bench_sign_a_call(benchmark):
    nonces = auth.NonceSource()
    headers = benchmark(lambda: auth.call_headers(SECRET, "pickers", "POST", TARGET, nonces.next()))
    assert [k for k, _v in headers] == [b"gwcore-Date", b"gwcore-Nonce", b"gwcore-Signature"]


@pytest.mark.benchmark(group="worker-auth")
def bench_check_a_call(benchmark):
    verifier = auth.CallVerifier([("pickers", SECRET)], 300.0)
    nonces = auth.NonceSource()
    calls = [{k.lower(): v for k, v in auth.call_headers(SECRET, "pickers", "POST", TARGET, nonces.next())}
             for _ in range(25_000)]
    it = iter(calls)
    # each round checks a call not seen before (a replay would be refused, and cheaper)
    assert benchmark.pedantic(lambda: verifier.check("POST", TARGET, next(it)), rounds=20_000, iterations=1) == "pickers"
