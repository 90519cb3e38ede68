"""Distributor-hosted mode (``GWCORE_MODE=distributor``): the local queue is worked off by
``gwcore worker`` processes that enlisted over HTTP with a capacity.

The gateway stores accepted messages in the local queue exactly as in standalone mode; instead of
an in-process handler, a :class:`Distributor` hands each queued message to a worker session with a
free slot, the least recently freed slot first (the NServiceBus distributor's ready model). A
worker acknowledges a message after its handler returned, which deletes it (through the writer,
durably) and frees the slot; a failure report (nack) goes through the local queue's retry and
poison logic (gwcore/consumer.py). A session that is not heard from within its lease lapses: what
it took and did not acknowledge goes back to the queue, marked as a redelivery.

The wire protocol (docs/deployment.md) lives under ``/.gwcore/worker/``: on the worker listener
(``GWCORE_WORKER_LISTEN``, loopback by default) and, only when worker keys are configured, on the
gateway's receive channels too. With worker keys every call is signed (gwcore/auth.py, "worker
calls") and checked before anything is handed out, taken back or deleted; a session belongs to
the key that enlisted it.

The modules (this package re-exports the names the rest of gwcore uses):

* :mod:`~gwcore.distributor.scheduler`: :class:`Distributor`, the sessions, their free slots,
  take, ack, nack, drain and leave, the handed-out mark, the metrics;
* :mod:`~gwcore.distributor.protocol`: :class:`WorkerProtocol`, the worker calls over HTTP (their
  signatures, the operations, a message on the wire, a blob's answer), attached to the listeners
  as their ``worker_api``;
* :mod:`~gwcore.distributor.listener`: ``WorkerCalls``, a base class of
  ``gwcore.http.HTTPProtocol`` that runs a worker call and writes its answer, and ``FileAnswer``,
  a blob streamed from its file.
"""

from ..errors import UnknownSessionError, WorkerHandlerError
from .protocol import WORKER_PREFIX, WorkerProtocol, check_channels
from .scheduler import Distributor

__all__ = ("Distributor", "WorkerProtocol", "WORKER_PREFIX", "check_channels", "UnknownSessionError",
           "WorkerHandlerError")
