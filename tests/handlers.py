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


def fail_on_poison(message) -> None:
    """Fails every attempt at a message whose body says ``poison``; logs the others' ids."""
    if b"poison" in message.body:
        raise ValueError(f"cannot handle {message.id}")
    append_to_file(message)


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


def _vm_hwm_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return -1


def blob_digests(message) -> None:
    """For `gwcore worker` processes: reads each databus property of the message in the ways
    $HANDLER_READS lists (comma-separated: open = streamed in 1 MiB pieces, read, path) and writes
    one JSON line to $HANDLER_LOG: per header its key, size, local flag, the SHA-256 (hex) and
    length each way got, the .path used, any error; and this process's peak RSS (VmHWM, KiB)."""
    import hashlib
    import json

    ways = os.environ.get("HANDLER_READS", "open").split(",")
    out = {}
    for name, blob in message.databus.items():
        row = {"key": blob.key, "size": blob.size, "local": blob.local}
        try:
            for way in ways:
                if way == "open":
                    h, n = hashlib.sha256(), 0
                    with blob.open() as f:
                        while piece := f.read(1 << 20):
                            h.update(piece)
                            n += len(piece)
                    row["open"] = [h.hexdigest(), n]
                elif way == "read":
                    data = blob.read()
                    row["read"] = [hashlib.sha256(data).hexdigest(), len(data)]
                    del data
                elif way == "path":
                    path = blob.path
                    with open(path, "rb") as f:
                        row["path"] = [hashlib.file_digest(f, "sha256").hexdigest(), os.path.getsize(path), path]
        except Exception as exc:  # the test looks at it
            row["error"] = f"{type(exc).__name__}: {exc}"
        out[name] = row
    _log_line(json.dumps({"id": message.id, "blobs": out, "vm_hwm_kib": _vm_hwm_kib()}))


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
