"""Selected-instance mode (``GWCORE_MODE=selected``): N instances on RabbitMQ, one gateway receiver.

Every instance has its own data dir and one broker connection (:class:`gwcore.amqp.Link`):

- **Election** (:mod:`~gwcore.selected.election`). Leadership is owning the exclusive queue
  ``E.gwcore.leader``. Standbys try to declare it every ``GWCORE_ELECTION_INTERVAL`` (and at once
  when a leader announces a handover); RESOURCE_LOCKED means someone holds it. The broker deletes
  it when its owner's connection dies, and the owner stops answering 200 in the connection's
  close callback (fencing).
- **Ingest (leader)** (:mod:`~gwcore.selected.dispatcher`). The listeners hand submits to the
  :class:`~gwcore.selected.dispatcher.Dispatcher`, an ingest sink (:class:`gwcore.ingest.IngestSink`)
  over the writer: dedup record and envelope in one fsync'd transaction as in standalone mode;
  the ``queue`` database is the outbox. The dispatcher takes committed outbox entries in batches:
  (1) an *intent* record with the batch's dedup keys is appended to the stream ``E.gwcore.dedup``
  and confirmed, (2) the messages are published to the input queue and confirmed, (3) a *done*
  record is appended and confirmed, (4) the entries leave the outbox. ``GWCORE_ACK=dispatched``
  answers 200 after (3), ``stored`` after the commit.
- **Dedup continuity** (:mod:`~gwcore.selected.stream`). Every instance follows the stream into a
  ``replica`` database of its own LMDB (key -> intent/done), resuming at the stored offset. A
  submit whose key the stream shows *done* is a duplicate; one that shows only *intent* was in
  flight when a leader died: it is accepted again and published with ``gwcore.PossibleDuplicate:
  true``. So is anything dispatched outside the leadership term that accepted it (entries left in
  an outbox by a crash, or accepted while the broker was unreachable). A new leader appends a
  marker and reads the stream up to it before it reports ready.
- **Databus parts.** The leader appends a *part* record (part key, blob name, size, hashes,
  expiry) for each part it takes before answering it; every instance keeps them
  (``databus_replica``), and a submit whose part is not in the local index takes the blob from
  there when its file is in the (shared) blob dir (gwcore/databus/, docs/databus.md). The
  records of a message go once the stream shows it *done*.
- **Handover** (:mod:`~gwcore.selected.handover`, on SIGTERM or ``gwcore handover``): hold new
  submits, let the outbox drain, append a *release* record and give up the leader queue, wait
  until another instance announces its leadership, then answer the held submits 503 (the load
  balancer retries them at the new leader). It announces the handover in the stream first:
  standbys that read that record hold their submits too until the election is decided, so a
  submit that reaches them in that window is not refused before there is a leader to retry it at.
- **Consuming** (:mod:`~gwcore.selected.queue`): every instance consumes the endpoint's input
  queue (and its own reply queue) through a :class:`BrokerQueue`, the local queue's interface
  and decisions (gwcore/delivery.py) on broker acknowledgements.

:class:`Selected` (:mod:`~gwcore.selected.mode`) holds the connection and these parts together.
"""

from ..errors import BrokerUnavailableError

# .mode first: through gwcore.amqp it imports the RabbitMQ client, aio_pika before aiormq and
# pamqp, so a gateway without the rabbitmq extra names aio_pika as the missing module
from .mode import Selected  # isort: skip
from .election import STANDBY  # isort: skip
from .queue import BrokerMessage, BrokerQueue

__all__ = ("Selected", "BrokerUnavailableError", "BrokerMessage", "BrokerQueue", "STANDBY")
