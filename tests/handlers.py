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


def _log_line(line: str) -> None:
    """One line in $HANDLER_LOG, written and flushed at once (several processes append to it)."""
    with open(os.environ["HANDLER_LOG"], "a") as f:
        f.write(line + "\n")


def log_slowly(message) -> None:
    """For `gwcore worker` processes: a 'start' line (id, delivery count, redelivered, pid) in
    $HANDLER_LOG, a pause of $HANDLER_SLEEP seconds, then a 'done' line."""
    import time

    marks = f"{message.id} {message.delivery_count} {int(message.redelivered)} {os.getpid()}"
    _log_line(f"start {marks}")
    time.sleep(float(os.environ.get("HANDLER_SLEEP", "0.2")))
    _log_line(f"done {marks}")


def log_handled(message) -> None:
    """For `gwcore worker` processes: one line per handled message in $HANDLER_LOG: id,
    redelivered (0/1), delivery count, worker name ($WORKER_NAME)."""
    _log_line(f"{message.id} {int(message.redelivered)} {message.delivery_count} {os.environ['WORKER_NAME']}")


def log_databus(message) -> None:
    """For selected-mode server processes: one line per databus property of a handled message
    in $HANDLER_LOG: id, header, SHA-256 of the blob's bytes (read through ``message.databus``),
    size, the handling instance ($INSTANCE_NAME)."""
    import hashlib

    for header, blob in sorted(message.databus.items()):
        digest = hashlib.sha256()
        with blob.open() as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        _log_line(f"{message.id} {header} {digest.hexdigest()} {blob.size} {os.environ['INSTANCE_NAME']}")
