"""Handlers named by GWCORE_HANDLER in the tests (module:function)."""

from __future__ import annotations

import asyncio
import os

seen: list[str] = []


def record(message) -> None:
    """A sync handler: runs in a worker thread."""
    seen.append(message.id)


async def record_async(message) -> None:
    await asyncio.sleep(0)
    seen.append(message.id)


def append_to_file(message) -> None:
    """For server processes: one line per handled message in $HANDLER_LOG (set by the test)."""
    with open(os.environ["HANDLER_LOG"], "a") as f:
        f.write(message.id + "\n")


def append_slowly(message) -> None:
    import time

    time.sleep(0.01)
    append_to_file(message)


def log_slowly(message) -> None:
    """For `gwcore worker` processes: a 'start' line (id, delivery count, redelivered, pid) in
    $HANDLER_LOG, a pause of $HANDLER_SLEEP seconds, then a 'done' line."""
    import time

    pid = os.getpid()
    with open(os.environ["HANDLER_LOG"], "a") as f:
        f.write(f"start {message.id} {message.delivery_count} {int(message.redelivered)} {pid}\n")
    time.sleep(float(os.environ.get("HANDLER_SLEEP", "0.2")))
    with open(os.environ["HANDLER_LOG"], "a") as f:
        f.write(f"done {message.id} {message.delivery_count} {int(message.redelivered)} {pid}\n")
