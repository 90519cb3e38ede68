"""A planned handover on PostgreSQL (:meth:`Handover.step_down`, on SIGTERM or ``gwcore
handover``): the leader announces it on the endpoint's channel (the standbys hold their submits
until a leader is announced), holds new submits itself, lets the submits already taken commit,
unlocks the advisory lock and says so (a standby takes it at once), waits until the new leader
announces itself, then routes the held submits again: they are forwarded to the new leader
(:class:`gwcore.holding.Holding`, shared with the RabbitMQ form).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from ..holding import Holding
from . import db

if TYPE_CHECKING:
    from .mode import PgSelected

__all__ = ("Handover",)

log = logging.getLogger("gwcore.selected")

_HANDOVER_GRACE = 0.05  # between announcing a handover and holding submits (the standbys' notification lag)


class Handover(Holding):
    """Holding, forwarding and stepping down on PostgreSQL."""

    async def step_down(self, timeout: float) -> None:
        mode: "PgSelected" = self._mode
        election, sink = mode.election, mode.sink
        election.retiring = True
        if not election.leading:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            await election.notify("handover")
            await asyncio.sleep(_HANDOVER_GRACE)
        except db.DB_ERRORS as exc:
            log.warning("handover: announcing it failed (%s)", exc)
        self.start_holding(timeout)
        log.info("handover: holding new submits, committing %d taken", sink.pending)
        while sink.pending and loop.time() < deadline and election.leading:
            await asyncio.sleep(0.002)
        if not election.leading:
            self.release_held()
            return
        try:
            await election.resign()
            await self.released(deadline, lambda: election.connected)
        except db.DB_ERRORS as exc:
            log.warning("handover: releasing the leadership failed (%s); it ends with this connection", exc)
            election.connection_failed(exc)
        self.release_held()
