"""Whether the tests run in CI: the one place that reads ``CI``.

In CI (``CI`` set to 1, true or yes, as .ci/run exports it) a skipped test is a failure
(tests/conftest.py turns it into one), so a green run cannot hide a missing broker, nginx,
openssl or anything else a test needs. Outside CI a test may skip with its reason.
"""

from __future__ import annotations

import os

#: Skips that are right in CI too, by test node id (prefix) -> why. Empty: nothing is excused.
ALLOWED_SKIPS: dict[str, str] = {}


#: Tests that run alone, after the rest (``make test`` runs the rest on two workers), by node id
#: prefix -> why. They stop the machine's broker under everyone else's feet, start clusters or
#: database servers of their own, or time failovers of several real processes, which a busy
#: neighbour would skew.
SERIAL: dict[str, str] = {
    "tests/test_selected_ha.py": "stops the shared RabbitMQ (broker restart); three instances and nginx under load",
    "tests/test_selected_cluster.py": "a three-node RabbitMQ cluster of its own: three Erlang VMs",
    "tests/test_ha.py::test_takeover_under_load_through_nginx": "two nodes, two workers and nginx under load, SIGKILLs",
    "tests/test_pg_selected.py": "three instances, nginx and a PostgreSQL server of its own under load, SIGKILLs",
    "tests/test_integration.py::test_sigkill_at_random_moments_loses_no_acknowledged_message": "SIGKILLs under load",
}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
