"""The claim check (databus): durable ``SingleCallDatabusProperty`` parts, local blobs, expiry.

NServiceBus keeps the parts of a message in a per-process dictionary until its submit arrives, so
a restart, a second channel or a failover between the parts and the submit ends in 412 loops
(protocol.md §2.3). gwcore keeps them durably:

* a part's body streams to ``<blob dir>/.tmp-<name>`` as it arrives (never whole in memory), its
  MD5 computed on the way; at its end the file is fsync'd, renamed to ``<blob dir>/<name>`` and
  the directory fsync'd, and only then is the index record committed and the part answered 200;
* the submit looks every ``NServiceBus.DataBus.*`` header's part up in the writer transaction that
  records the message, and stores the header with the local blob key as its value (the name keeps
  the sender's key, protocol.md §2.3); a duplicate submit needs no parts;
* every blob has an expiry (the message's TimeToBeReceived, else ``GWCORE_DATABUS_TTL``); the
  writer removes expired blobs, and parts whose submit never came, in slices between batches.

The sending side keeps the blobs of outgoing messages the same way (their header values name
them), so a forwarder reads each part from disk as it sends it. In selected-instance mode every
instance also keeps the part records the leader appends to the dedup stream, so a new leader
after a failover needs no re-sent parts.

The modules, from the bottom up (this package re-exports their public names):

* :mod:`~gwcore.databus.layout`: blob names, the blob dir, the LMDB keys and values;
* :mod:`~gwcore.databus.digests`: base64 digests and the RFC 9530 ``Content-Digest`` header;
* :mod:`~gwcore.databus.records`: the writer jobs on the records (parts, blobs, the submit's
  lookup, expiry) and the start-up sweep;
* :mod:`~gwcore.databus.replica`: the part records of selected mode, followed from the stream;
* :mod:`~gwcore.databus.sink`: blob files written as a part arrives, off the loop;
* :mod:`~gwcore.databus.intake`: a connection's part requests, from head to answer (the base of
  ``gwcore.http.HTTPProtocol``; not imported here);
* :mod:`~gwcore.databus.sending`: the sender's copy of a property into the blob store;
* :mod:`~gwcore.databus.blob`: :class:`Blob`, a received message's property for its consumer.
"""

from .blob import Blob, message_blobs
from .digests import content_digest, digest_sha256
from .layout import BLOB_DIR, DATABUS_PREFIX, PREFIX_LEN, blob_dir, new_name, new_prefix
from .records import (
    BlobInfo,
    PartJob,
    blob_info,
    blobs,
    expire,
    missing_parts_reason,
    record_blob,
    record_part,
    resolve_submits,
    sweep,
    unlink,
)
from .replica import decode_part_record, forget_parts, replicate_parts
from .sending import Source, copy_in, databus_header
from .sink import ALIGN, BUF, HIGH_WATER, POOL_KEEP, BlobSink, BlobWriter

__all__ = ("BlobWriter", "BlobSink", "Blob", "BlobInfo", "DATABUS_PREFIX", "BLOB_DIR", "blob_dir",
           "resolve_submits", "record_part", "record_blob", "expire", "sweep", "copy_in", "blobs", "Source",
           "new_name", "new_prefix", "PREFIX_LEN", "PartJob", "decode_part_record", "replicate_parts",
           "forget_parts", "databus_header", "message_blobs", "unlink", "blob_info", "content_digest", "digest_sha256",
           "missing_parts_reason", "HIGH_WATER", "BUF", "ALIGN", "POOL_KEEP")
