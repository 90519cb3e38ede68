"""The ingest sink: what an HTTP listener hands the submits it accepted to.

Two implement it: the local :class:`gwcore.store.Writer` (standalone and distributor mode: a
submit is answered once it is committed to the store) and selected mode's
:class:`gwcore.selected.dispatcher.Dispatcher` (the same commit, into the outbox, checked against
the dedup stream first; answered once the broker confirmed it with ``GWCORE_ACK=dispatched``).

Who calls what: the listener (gwcore/http.py, a batch in gwcore/batch.py, the compiled path's
``ListenerCore.writer``) ``pending`` and ``ingest_then``; the databus part intake
(gwcore/databus/intake.py) ``call``, ``store``, ``blob_expiry_ms`` and ``doom``. The compiled
path also takes plain submits straight into the writer's ``inbox`` when the sink has one (the
local writer; ``HTTPState.attach``), which is not part of the protocol.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Awaitable, Callable, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .store import Store

__all__ = ("IngestSink", "Done")

#: The answer to one submit, called on the event loop: ``done(True, True)`` new and stored,
#: ``done(True, False)`` a duplicate, ``done(True, rejection)`` refused (a ``core.Rejection``:
#: databus parts missing), ``done(False, exc)`` not taken (the exception says why).
Done = Callable[[bool, Any], None]


@runtime_checkable
class IngestSink(Protocol):
    """Takes accepted submits; every method is called on the event loop."""

    #: The store the submits are committed to (its blob dir, its databases for writer jobs).
    store: Store

    @property
    def pending(self) -> int:
        """Submits and jobs handed over and not answered yet (beyond ``GWCORE_COMMIT_MAX_PENDING``
        the listener answers 503)."""
        ...

    def ingest_then(self, envelope: Any, done: Done) -> None:
        """Take one envelope (``core.Envelope``); *done* is called once it is decided."""
        ...

    def call(self, fn: Callable[[Any], Any]) -> Awaitable[Any]:
        """Run ``fn(txn)`` inside the writer's next write transaction; resolves with its value
        once that transaction has committed."""
        ...

    def blob_expiry_ms(self, expiry_ms: int, accepted_ms: int) -> int:
        """When a databus blob of a message with this TimeToBeReceived expires."""
        ...

    def doom(self, name: str) -> None:
        """Inside a writer job: unlink this blob once the transaction commits."""
        ...
