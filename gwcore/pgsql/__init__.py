"""Selected-instance mode on PostgreSQL (``GWCORE_MODE=selected``, ``GWCORE_TRANSPORT=postgresql``):
N instances on one database, one gateway receiver; the database is the broker.

- **Tables** (:mod:`~gwcore.pgsql.schema`): the endpoint's queue table in the NServiceBus
  PostgreSQL transport's layout, its ``error`` table, a reply table per instance, the dedup table;
  created on first start, versioned, under an advisory lock.
- **Election** (:mod:`~gwcore.pgsql.election`): a session-level advisory lock on the instance's own
  connection; the leader checks that connection every ``GWCORE_ELECTION_INTERVAL`` and commits its
  submits on it, so a leader that lost it writes nothing more (fenced).
- **Ingest** (:mod:`~gwcore.pgsql.sink`): the leader's ingest sink (:class:`gwcore.ingest.IngestSink`):
  group commit of queue rows and dedup rows in one transaction; 200 after COMMIT.
- **Consuming** (:mod:`~gwcore.pgsql.queue`): every instance takes rows with ``FOR UPDATE SKIP
  LOCKED`` in a transaction held until the handler settles the message (gwcore/delivery.py's
  decisions); replies to a ``request()`` come to the requesting instance's own table.
- **Handover** (:mod:`~gwcore.pgsql.handover`): announce, hold, commit, unlock, forward the held
  submits to the new leader (:class:`gwcore.holding.Holding`).

:class:`PgSelected` (:mod:`~gwcore.pgsql.mode`) holds these parts together. Only this package
imports asyncpg (the ``postgresql`` extra).
"""

# .db first: it imports asyncpg, so a gateway without the postgresql extra names it as missing
from . import db  # noqa: F401  # isort: skip
from .mode import PgSelected
from .queue import PgMessage, PgQueue

__all__ = ("PgSelected", "PgMessage", "PgQueue")
