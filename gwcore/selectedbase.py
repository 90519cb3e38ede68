"""What both forms of selected mode (RabbitMQ: gwcore/selected/, PostgreSQL: gwcore/pgsql/) share
besides the holding of submits (gwcore/holding.py): :class:`SelectedBase` (the gateway's store and
writer, the instance's name, the URL the other instances reach it at) and stopping a part's task."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Settings
    from .gateway import Gateway
    from .store import Store, Writer

__all__ = ("SelectedBase", "instance_name", "own_url", "cancel_and_wait")


class SelectedBase:
    """What a selected mode's glue starts from (made by the gateway once its store is open)."""

    def __init__(self, gateway: "Gateway") -> None:
        self.settings = gateway.settings
        self.gateway = gateway
        if gateway.store is None or gateway.writer is None:
            raise RuntimeError("selected mode starts after the store")
        self.store: "Store" = gateway.store
        self.writer: "Writer" = gateway.writer
        self.instance = instance_name(self.settings)
        self.consume = False  # set by the gateway when a handler (or messages()) takes the input queue
        self.stopping = False

    def own_url(self) -> str:
        """Where the other instances reach this one's receive channel (forwarded submits)."""
        return own_url(self.gateway)


def instance_name(settings: "Settings") -> str:
    """``GWCORE_INSTANCE``, else one unique to this process (host, pid, random)."""
    return settings.instance or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def own_url(gateway: "Gateway") -> str:
    """Where the other instances reach this one's receive channel (forwarded submits)."""
    ch = gateway.settings.receive_channels[0]
    port = gateway.addresses[0][1] if gateway.addresses else ch.port
    host = socket.gethostname() if ch.host in ("0.0.0.0", "::") else ch.host
    return f"http://{host}:{port}{ch.path}"


async def cancel_and_wait(task: asyncio.Future | None) -> None:
    """Cancel *task* and wait until it has ended, whatever it ended with."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except BaseException:  # its cancellation, or the error it had ended with already
        pass
