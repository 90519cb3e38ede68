"""Whether the tests run in CI: the one place that reads ``CI``.

In CI (``CI`` set to 1, true or yes, as .ci/run exports it) a skipped test is a failure
(tests/conftest.py turns it into one), so a green run cannot hide a missing broker, nginx,
openssl or anything else a test needs. Outside CI a test may skip with its reason.
"""

from __future__ import annotations

import os

#: Skips that are right in CI too, by test node id (prefix) -> why. Empty: nothing is excused.
ALLOWED_SKIPS: dict[str, str] = {}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
