"""Selected mode's glue: :class:`Selected` holds the broker connection and the parts of the mode
(the stream, the election, the dispatcher, the handover, the broker queue), starts and stops them
with the gateway, passes the connection's ups and downs to each, and tells the gateway whether
its listeners take traffic.
"""

from __future__ import annotations

import asyncio
import logging
import operator
from typing import TYPE_CHECKING, Any

from ..amqp import Link, Topology
from ..errors import BrokerUnavailableError
from ..metrics import Families, counter, gauge, histogram
from ..selectedbase import SelectedBase
from .dispatcher import Dispatcher
from .election import STANDBY, Election
from .handover import Handover
from .queue import BrokerQueue
from .stream import Stream

if TYPE_CHECKING:
    from ..gateway import Gateway

__all__ = ("Selected",)

log = logging.getLogger("gwcore.selected")

_BROKER_DOWN = "Service Unavailable: broker unavailable"


def _kept_by(part: str, name: str) -> Any:
    """A read-only attribute of :class:`Selected` that one of its parts keeps."""
    return property(operator.attrgetter(f"{part}.{name}"), doc=f"``{part}.{name}``")


class Selected(SelectedBase):
    """The selected-instance mode of one gateway (created by :class:`gwcore.gateway.Gateway`)."""

    def __init__(self, gateway: "Gateway") -> None:
        super().__init__(gateway)
        s = self.settings
        self.topology = Topology(s.endpoint, self.instance, s.dedup_ttl)
        self.reply_queue = self.topology.instance
        self.dispatched_ack = s.ack == "dispatched"
        self.link = Link(s.amqp_url, f"gwcore {s.endpoint} {self.instance}", self._up, self._down)
        self.messages = BrokerQueue(self.store, self.writer, s.handler_max_attempts)
        self.stream = Stream(self)
        self.election = Election(self)
        #: the listeners' ingest sink in this mode
        self.sink = self.dispatcher = Dispatcher(self)
        self.handover = Handover(self)
        self._ready_link = asyncio.Event()  # connected, topology declared, consumers up
        self._conn_tasks: list[asyncio.Task] = []

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        expired = await loop.run_in_executor(None, self._load)
        if expired:
            await self.stream.drop(expired)
        self.dispatcher.start()
        self.update_listeners()
        self.link.start()
        log.info("selected mode: instance %s, broker %s, ack=%s; %d dedup records replicated (stream offset %d), "
                 "%d messages left in the outbox", self.instance, self.link.describe(),
                 self.settings.ack, len(self.stream.replica), self.stream.offset, len(self.dispatcher.undone))

    def _load(self) -> list[int]:
        """Replica and outbox from the store (executor); returns the seqs of the expired replica log records."""
        expired = self.stream.load()
        self.dispatcher.load()
        return expired

    async def stop(self) -> None:
        self.stopping = True
        self.handover.release_held()
        await self.link.stop()
        await self.dispatcher.stop()
        self.messages.close()
        await self.stream.flush()
        self.stream.release_part_waiters()

    async def step_down(self, timeout: float) -> None:
        """Planned handover (:meth:`gwcore.selected.handover.Handover.step_down`)."""
        await self.handover.step_down(timeout)

    # -- states seen by the gateway ------------------------------------------------------------------

    @property
    def accepting(self) -> bool:
        election = self.election
        return (election.leading or election.fenced_accepting) and not self.handover.holding and not self.stopping

    @property
    def role(self) -> str:
        if self.election.leading:
            return "leader"
        return "leader (broker unreachable)" if self.election.fenced_accepting else "standby"

    def update_listeners(self) -> None:
        """Tell the gateway whether its listeners take traffic now (and why not)."""
        accepting = self.accepting
        self.gateway.set_accepting(accepting, STANDBY if self.link.connected else _BROKER_DOWN)
        if accepting and self.handover.has_held:
            self.handover.release_held()

    def elected(self) -> None:
        """The election's news: this instance leads now."""
        if self.handover.holding:
            self.handover.release_held()  # the submits held for the handover are ours now
        self.update_listeners()
        self.dispatcher.kick()

    # -- what the parts keep, read here too (the tests, the control socket) -----------------------

    leading = _kept_by("election", "leading")
    elections_won = _kept_by("election", "elections_won")
    elections_lost = _kept_by("election", "elections_lost")
    replica = _kept_by("stream", "replica")
    parts_followed = _kept_by("stream", "parts_followed")
    undone = _kept_by("dispatcher", "undone")
    dispatched = _kept_by("dispatcher", "dispatched")
    parts_published = _kept_by("dispatcher", "parts_published")

    # -- the connection ------------------------------------------------------------------------------

    async def wait_connected(self, timeout: float) -> None:
        """Until the broker link is up and this instance's reply queue is declared.

        :raises BrokerUnavailableError: not within *timeout* seconds.
        """
        try:
            await asyncio.wait_for(self._ready_link.wait(), timeout)
        except asyncio.TimeoutError:
            raise BrokerUnavailableError(f"broker unavailable ({self.link.last_error})") from None

    async def _up(self, conn: Any) -> None:
        pub = await conn.channel(publisher_confirms=True)
        await self.topology.declare(pub)
        # aiormq's channels under aio-pika's: a third of aio-pika's cost per publish. The stream's
        # appends and the dispatcher's publishes each have a confirm channel: an append waits for
        # no batch of publishes ahead of it on the broker's side.
        self.stream.connection_up(pub, await pub.get_underlay_channel())
        dispatch = await conn.channel(publisher_confirms=True)
        self.dispatcher.connection_up(dispatch, await dispatch.get_underlay_channel())
        follow = await conn.channel()
        await follow.set_qos(prefetch_count=2000)
        self._conn_tasks = [asyncio.ensure_future(self.stream.follow(follow))]
        if self.consume:
            await self._consume(conn)
        rq = await self.topology.declare_instance(conn)
        await rq.consume(self.messages.deliver)
        self._ready_link.set()
        self.update_listeners()
        # Only now, set up: an instance that leads can take its replies, and a standby that
        # loses an election says "standby", not "broker unavailable" (a slow setup let it lose
        # elections before its listeners were told the broker is back).
        self._conn_tasks.append(asyncio.ensure_future(self.election.run(conn)))

    async def _consume(self, conn: Any) -> None:
        ch = await conn.channel()
        await ch.set_qos(prefetch_count=self.settings.amqp_prefetch)
        inq = await ch.declare_queue(self.topology.input, durable=True, arguments=self.topology.input_args())
        await inq.consume(self.messages.deliver)

    def start_consuming(self) -> None:
        """Take deliveries from the endpoint's queue from now on (a handler, or ``messages()``)."""
        if self.consume:
            return
        self.consume = True
        if self._ready_link.is_set() and self.link.connection is not None:
            self._conn_tasks.append(asyncio.ensure_future(self._consume(self.link.connection)))

    def _down(self, exc: BaseException | None) -> None:
        self._ready_link.clear()
        self.stream.connection_lost()
        self.dispatcher.connection_lost()
        for task in self._conn_tasks:
            task.cancel()
        self._conn_tasks = []
        self.election.connection_lost(self.stopping)
        self.dispatcher.fail_waiters(BrokerUnavailableError(f"broker unavailable ({self.link.last_error})"))
        self.update_listeners()

    # -- metrics -------------------------------------------------------------------------------------

    def metrics(self) -> Families:
        election, stream, dispatcher = self.election, self.stream, self.dispatcher
        return [
            gauge("gwcore_selected_leader", "1 while this instance is the elected gateway receiver.",
                  int(election.leading)),
            gauge("gwcore_selected_term", "Leadership terms this instance won.", election.elections_won),
            counter("gwcore_selected_fenced_total", "Times the leadership ended with the broker connection.",
                    election.fenced),
            gauge("gwcore_broker_connected", "1 while the broker connection is up.", int(self.link.connected)),
            counter("gwcore_broker_connects_total", "Broker connections opened.", self.link.connects),
            counter("gwcore_dispatched_total", "Messages published to the broker and confirmed.",
                    dispatcher.dispatched),
            counter("gwcore_possible_duplicates_total",
                    "Messages dispatched with gwcore.PossibleDuplicate: true (in flight at a crash or outage).",
                    dispatcher.possible_duplicates),
            counter("gwcore_handover_forwarded_total", "Submits held during a handover and forwarded to the new leader.",
                    self.handover.forwarded),
            counter("gwcore_dispatch_skipped_total", "Outbox entries another leader had dispatched already.",
                    dispatcher.skipped),
            gauge("gwcore_outbox_undispatched", "Accepted messages not yet confirmed by the broker.",
                  len(dispatcher.undone)),
            gauge("gwcore_outbox_max", "GWCORE_OUTBOX_MAX: beyond it new submits are answered 503.",
                  self.settings.outbox_max),
            gauge("gwcore_outbox_memory_bytes",
                  "Bytes of messages in the leader's memory outbox (GWCORE_ACK=dispatched).", dispatcher.mem_bytes),
            gauge("gwcore_outbox_max_bytes", "GWCORE_OUTBOX_MAX_BYTES: beyond it new submits are answered 503.",
                  self.settings.outbox_max_bytes),
            counter("gwcore_outbox_refused_full_total", "Submits refused 503 because the outbox was full.",
                    dispatcher.refused_full),
            counter("gwcore_submits_refused_amqp_total",
                    "Submits refused 400: a header name longer than the broker's header table carries.",
                    dispatcher.refused_amqp),
            counter("gwcore_dispatch_returned_total",
                    "Publishes the broker returned because no queue took them (the endpoint's queue or "
                    "stream deleted while gwcore ran): declared again, dispatched again, marked.",
                    dispatcher.returned),
            gauge("gwcore_dedup_replica_records", "Dedup records followed from the stream.", len(stream.replica)),
            counter("gwcore_databus_parts_published_total",
                    "Databus parts this instance took as the leader and appended to the stream.",
                    dispatcher.parts_published),
            counter("gwcore_databus_parts_followed_total", "Databus part records read from the stream.",
                    stream.parts_followed),
            counter("gwcore_databus_parts_unreplicated_total",
                    "Parts accepted (GWCORE_ACK=stored) while the stream was out of reach: kept on this instance only.",
                    dispatcher.parts_unreplicated),
            gauge("gwcore_dedup_stream_offset", "Last stream offset read.", stream.offset),
            histogram("gwcore_dispatch_append_seconds",
                      "Each dispatched batch's stream record (the batch before it done, this one intended): "
                      "its append until the broker confirmed it.", dispatcher.append_seconds),
            histogram("gwcore_dispatch_confirm_seconds",
                      "A dispatched batch's publish until the broker confirmed its last message.",
                      dispatcher.confirm_seconds),
            histogram("gwcore_dispatch_batch_messages", "Messages per published batch.", dispatcher.batch_messages),
        ]
