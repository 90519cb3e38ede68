"""Who is selected mode's gateway receiver: leadership is owning the exclusive queue
``E.gwcore.leader``.

A standby tries to declare it every ``GWCORE_ELECTION_INTERVAL`` (and at once when the stream
shows a leader released it); RESOURCE_LOCKED means another instance holds it. The broker deletes
it when its owner's connection dies, and the owner stops answering 200 in that connection's close
callback (fencing). A new leader appends a ``leader`` marker and reads the stream up to it before
it takes submits: every record of the leaders before it is in its replica then.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import aiormq

from ..amqp import broker_errors
from ..holding import STANDBY

if TYPE_CHECKING:
    from .mode import Selected

__all__ = ("Election", "STANDBY")

log = logging.getLogger("gwcore.selected")

class Election:
    """This instance's side of the election: whether it leads, and its tries for the leadership."""

    def __init__(self, mode: "Selected") -> None:
        self._mode = mode
        self.leading = False
        self.term = 0
        self.fenced_accepting = False  # ack=stored: a leader cut off from the broker keeps accepting
        self.retiring = False  # a stopping instance takes no leadership any more
        self.elections_won = 0
        self.elections_lost = 0  # tries of a standby that found the leader queue held
        self.fenced = 0
        self._wake = asyncio.Event()
        self._channel: Any = None  # the channel that declared the leader queue

    def wake(self) -> None:
        """Try for the leadership now rather than at the next interval."""
        self._wake.set()

    async def run(self, conn: Any) -> None:
        """Try for the leadership on this connection until this instance leads (or retires)."""
        try:
            await self._try(conn)
        except broker_errors as exc:
            log.info("election: the connection went (%s)", exc)
            self._mode.link.drop(f"the election failed ({exc})")  # a channel error: elect again on a new connection

    async def _try(self, conn: Any) -> None:
        mode = self._mode
        interval = mode.settings.election_interval
        leader = mode.topology.leader
        while not self.retiring:
            ch = await conn.channel()
            try:
                await ch.declare_queue(leader, exclusive=True, durable=False)
            except aiormq.exceptions.ChannelLockedResource:
                self.elections_lost += 1
                if self.fenced_accepting:
                    # another instance leads now: what this one took while cut off is dispatched
                    # (marked), and it stops taking more
                    self.fenced_accepting = False
                    log.warning("role: standby: another instance leads since the broker connection was lost")
                    mode.update_listeners()
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), interval)
                except asyncio.TimeoutError:
                    pass
                continue
            self._channel = ch
            break
        else:
            return
        won = time.monotonic()
        await mode.stream.sync("leader", mode.own_url())  # every record of earlier leaders is in the replica now
        if self.retiring:
            await ch.queue_delete(leader)
            return
        self.term += 1
        self.elections_won += 1
        self.leading = True
        self.fenced_accepting = False
        mode.elected()
        log.info("role: leader (term %d): the stream read to its end in %.0f ms", self.term,
                 (time.monotonic() - won) * 1000)

    async def resign(self) -> None:
        """End the leadership (a handover): a ``release`` record, and the leader queue goes."""
        mode = self._mode
        self.leading = False
        mode.dispatcher.term_ended()
        await mode.stream.append("release", b"")
        await self._channel.queue_delete(mode.topology.leader)

    def connection_lost(self, stopping: bool) -> None:
        """The broker connection is gone: so is the leader queue (fenced). With
        ``GWCORE_ACK=stored`` a leader keeps accepting into the outbox, unless it is stopping."""
        was_leading = self.leading
        self.leading = False
        self._channel = None
        if not was_leading:
            return
        self.fenced += 1
        if not self._mode.dispatched_ack and not stopping:
            self.fenced_accepting = True
            log.warning("role: leader -> cut off from the broker: accepting into the outbox (GWCORE_ACK=stored); "
                        "these messages are dispatched, marked gwcore.PossibleDuplicate, once it is back")
        else:
            log.warning("role: leader -> standby: the broker connection is gone (fenced)")
