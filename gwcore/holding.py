"""Submits held while the leadership of selected mode changes hands, whichever transport elects
the leader (RabbitMQ: gwcore/selected/, PostgreSQL: gwcore/pgsql/).

While a handover decides the next leader, a submit that reaches an instance which does not take
traffic is held instead of refused, then routed again there (taken, or answered 503 for the load
balancer to retry at the new leader) or, when a leader is known and this instance will not lead,
posted to that leader over HTTP and answered with its answer. A transport's handover subclasses
:class:`Holding` and adds the stepping down; its mode has ``stopping``, ``instance``,
``accepting``, ``role``, ``update_listeners()`` and an ``election`` with ``leading`` and
``retiring``.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from typing import Any, Callable

from . import auth, batch
from ._core import core

__all__ = ("Holding", "HOLD_LIMIT", "STANDBY")

log = logging.getLogger("gwcore.selected")

#: The 503 reason of an instance that is not the gateway receiver.
STANDBY = "Service Unavailable: standby"
HOLD_LIMIT = 5.0  # longest a standby holds submits after a handover announcement


class Holding:
    """Holding submits, and forwarding them to the new leader."""

    def __init__(self, mode: Any) -> None:
        self._mode = mode
        self.holding = False
        self._held: list[tuple[Any, Any, Any]] = []
        self._hold_timer: asyncio.TimerHandle | None = None
        self._forwards: set[asyncio.Task] = set()
        self.forwarded = 0
        self.leader_seen = ""  # the instance that announced leadership last (from the stream)
        self.leader_url = ""  # and where it receives (the handover forwards held submits there)

    # -- what the stream announces -------------------------------------------------------------------

    def leader_announced(self, sender: str, url: str) -> None:
        mode = self._mode
        self.leader_seen = sender
        self.leader_url = url
        if sender != mode.instance and self.holding and not mode.election.leading:
            self.release_held()

    def announced_by(self, sender: str | None) -> None:
        """Another instance starts a handover: hold submits until the election is decided."""
        election = self._mode.election
        if election.leading or election.retiring:
            return
        log.info("handover announced by %s: holding submits until the election is decided", sender)
        self.start_holding(HOLD_LIMIT)

    # -- holding submits -----------------------------------------------------------------------------

    def hold(self, proto: Any, slot: Any, result: Any) -> bool:
        """http.py's hook for a submit this instance does not accept now: held (True) while a
        handover is deciding the next leader, then routed again here or forwarded to the new
        leader; a leader that handed over forwards what still reaches it while it stops."""
        mode = self._mode
        if mode.stopping:
            return False
        if self.holding:
            self._held.append((proto, slot, result))
            return True
        if (mode.election.retiring and self.leader_url and self.leader_seen != mode.instance
                and isinstance(result, (core.Envelope, core.Batch))):
            self._forward(proto, slot, result)
            return True
        return False

    def start_holding(self, limit: float) -> None:
        self.holding = True
        self._mode.update_listeners()
        if self._hold_timer is not None:
            self._hold_timer.cancel()
        self._hold_timer = asyncio.get_running_loop().call_later(limit, self.release_held)

    def release_held(self) -> None:
        mode = self._mode
        if self.holding or self._held:
            log.info("holding ends: %d submits held (%s)", len(self._held), mode.role)
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        self.holding = False
        held, self._held = self._held, []
        mode.update_listeners()
        forward = not mode.accepting and bool(self.leader_url) and self.leader_seen != mode.instance
        for proto, slot, result in held:
            if forward and isinstance(result, (core.Envelope, core.Batch)):
                self._forward(proto, slot, result)
            else:
                proto._route(slot, result)

    async def released(self, deadline: float, connected: Callable[[], bool]) -> None:
        """The leadership was just given up: while submits are held, wait (until *deadline*, at
        most HOLD_LIMIT, and while *connected*) for another instance to announce it leads; the
        held submits are then routed again or forwarded there (the caller releases them)."""
        mode = self._mode
        loop = asyncio.get_running_loop()
        log.info("handover: leadership released")
        self.leader_seen = mode.instance
        # Submits held meanwhile are answered 503 once another instance leads (the load
        # balancer then finds it); with none held there is nobody to wait for.
        until = loop.time() + min(HOLD_LIMIT, max(0.1, deadline - loop.time()))
        while self._held and self.leader_seen == mode.instance and loop.time() < until and connected():
            await asyncio.sleep(0.005)
        if self.leader_seen != mode.instance:
            log.info("handover: %s is the leader now", self.leader_seen)

    @property
    def has_held(self) -> bool:
        return bool(self._held)

    # -- forwarding ----------------------------------------------------------------------------------

    def _forward(self, proto: Any, slot: Any, result: Any) -> None:
        """Send a held submit to the new leader over HTTP and answer with its answer: the load
        balancer may have tried the new leader before it led, and has no instance left to try."""
        verifier = proto.state.verifier
        is_batch = isinstance(result, core.Batch)
        if verifier is not None:
            # checked here, since the leader gets it signed again by this instance (_post)
            refused = batch.check_signature(verifier, result) if is_batch else verifier.check(result)
            if refused is not None:
                proto._answer_check(slot, refused, result.callback)
                return
        self.forwarded += 1
        task = asyncio.ensure_future(self._post(result, verifier))
        self._forwards.add(task)

        def answer(done: asyncio.Future) -> None:
            self._forwards.discard(task)
            status, reason, body = ((503, STANDBY, None) if done.cancelled() or done.exception()
                                    else done.result())
            if is_batch and status == 200 and body is not None:
                proto._answer(slot, status, reason, body=body)  # the leader's outcome per message
            else:
                proto._answer(slot, status, reason, callback=result.callback)

        task.add_done_callback(answer)

    async def _post(self, envelope: Any, verifier: Any = None) -> tuple[int, str, bytes | None]:
        parts = urllib.parse.urlsplit(self.leader_url)
        if isinstance(envelope, core.Batch):
            # a batch goes on as it came (its body is what its signature's digest covers)
            body, block = envelope.body, f"{batch.HEADER}: {envelope.version}\r\n".encode("latin-1")
        else:
            _id, body, _expiry, block = core.encode_submit(envelope.framed)
        target = (envelope.target or parts.path or "/").encode()
        if envelope.auth_signature is not None and verifier is not None:
            # Verified here (_forward). The leader gets the message framed again from its stored
            # form, which does not keep the headers as they were sent (a v2 signature covers
            # those), so this instance signs it anew with the key that signed it: it has the
            # receive keys the leader has.
            key_id = envelope.auth_signature.strip().split(".")[1]
            block += auth.signature_lines(verifier.secrets[key_id], key_id, "POST", target.decode("ascii"), block,
                                          auth.body_digest(body))
        request = b"POST %s HTTP/1.1\r\nHost: %s\r\n%sContent-Length: %d\r\nConnection: close\r\n\r\n" % (
            target, parts.netloc.encode(), block, len(body)) + body
        reader, writer = await asyncio.wait_for(asyncio.open_connection(parts.hostname, parts.port), 2.0)
        try:
            writer.write(request)
            line = await asyncio.wait_for(reader.readline(), 10.0)
            _version, status, reason = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
            length = 0
            while True:
                header = await asyncio.wait_for(reader.readline(), 10.0)
                if header in (b"\r\n", b""):
                    break
                name, _, value = header.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            answer = await asyncio.wait_for(reader.readexactly(length), 10.0) if length else b""
            return int(status), reason, answer
        finally:
            writer.close()
