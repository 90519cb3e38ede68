"""A planned handover in selected mode (:meth:`Handover.step_down`, on SIGTERM or ``gwcore
handover``), and the submits held meanwhile.

The leader announces the handover in the stream, holds new submits, lets the outbox drain,
appends a *release* record and gives up the leader queue, waits until another instance announces
its leadership, then answers the held submits 503 (the load balancer retries them at the new
leader). Standbys that read the announcement hold their submits too until the election is
decided, so a submit that reaches them in that window is not refused before there is a leader to
retry it at. Holding and forwarding the held submits is :class:`gwcore.holding.Holding`'s, which
the PostgreSQL form (gwcore/pgsql/) shares.
"""

from __future__ import annotations

import asyncio
import logging

from ..amqp import broker_errors
from ..holding import HOLD_LIMIT, Holding

__all__ = ("Handover", "HOLD_LIMIT")

log = logging.getLogger("gwcore.selected")

_HANDOVER_GRACE = 0.05  # between announcing a handover and holding submits (the standbys' read lag)


class Handover(Holding):
    """Selected mode's planned handover on RabbitMQ: the holding of :class:`gwcore.holding.Holding`,
    announced in the stream, and the stepping down."""

    # -- stepping down -------------------------------------------------------------------------------

    async def step_down(self, timeout: float) -> None:
        """Planned handover: drain, flush, pass the leadership (see the module docstring)."""
        mode = self._mode
        election, dispatcher, stream = mode.election, mode.dispatcher, mode.stream
        election.retiring = True  # a stopping instance takes no leadership any more
        if not election.leading:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            # The standbys hold their submits from this record on (a submit the load balancer
            # tries at a standby first then waits there for the election instead of running out
            # of instances to try); give them a moment to read it before this one holds too.
            await stream.append("handover", b"")
            await asyncio.wait_for(stream.sync("marker"), max(0.1, deadline - loop.time()))
            await asyncio.sleep(_HANDOVER_GRACE)
        except broker_errors as exc:  # asyncio.TimeoutError among them
            log.warning("handover: announcing it failed (%s)", exc)
        self.start_holding(timeout)
        log.info("handover: holding new submits, draining %d outbox entries", len(dispatcher.undone))
        # drained = nothing waiting for the writer (a submit taken just before the hold) and
        # nothing accepted that the broker has not confirmed
        while (dispatcher.pending or dispatcher.undone) and loop.time() < deadline and mode.link.connected:
            await asyncio.sleep(0.002)
        if dispatcher.pending or dispatcher.undone:
            log.warning("handover: %d messages still in the outbox; they are dispatched when this instance "
                        "runs again", len(dispatcher.undone))
        if not election.leading:
            self.release_held()
            return
        try:
            await election.resign()
            await self.released(deadline, lambda: mode.link.connected)
        except broker_errors as exc:
            log.warning("handover: releasing the leadership failed (%s); it ends with this connection", exc)
        self.release_held()
