"""Databus (claim-check) parts on PostgreSQL: a part's blob is a file in the blob dir (shared by the
instances: ``GWCORE_BLOB_DIR``), its record a row of ``gwcore_databus_parts`` committed before the
part is answered 200; the submit that names the parts finds them there, in its group commit's
transaction, whichever instance took them.

A submit whose parts are all recorded gets its databus headers rewritten to the blob names (as
protocol.md §2.3 says) and its part rows deleted with its queue row's insert; one with a part
missing gets NServiceBus's 412 and nothing is stored; a duplicate needs no parts. The blob file is
also indexed in the receiving instance's own store (so its start-up sweep keeps it, and it goes at
its expiry, as in the RabbitMQ form's shared blob dir).
"""

from __future__ import annotations

import datetime
from typing import Any

from .._core import core
from ..databus import PartJob, missing_parts_reason
from ..records import part_key
from .schema import Names

__all__ = ("record_part", "resolve")


async def record_part(conn: Any, names: Names, job: PartJob) -> None:
    """The part's row (a part sent again replaces the earlier record)."""
    expires = datetime.datetime.fromtimestamp(job.expiry_ms / 1000, datetime.timezone.utc)
    await conn.execute(
        f"INSERT INTO {names.parts} (endpoint, part_key, blob, size, md5, sha256, expires_at) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (endpoint, part_key) DO UPDATE SET blob = EXCLUDED.blob, "
        "size = EXCLUDED.size, md5 = EXCLUDED.md5, sha256 = EXCLUDED.sha256, expires_at = EXCLUDED.expires_at",
        names.endpoint, job.part_key, job.name, job.size, job.md5, job.sha, expires)


async def resolve(conn: Any, names: Names, envelopes: list[Any], indexes: list[int]) -> dict[int, Any]:
    """Inside the commit's transaction: the databus submits at *indexes* of *envelopes* get their
    headers rewritten in place (``envelopes[i]`` replaced); returns ``{index: 412 Rejection}`` of
    those with a part missing."""
    keys = {i: [part_key(envelopes[i].key, wire) for wire, _stored in envelopes[i].databus] for i in indexes}
    found = {bytes(r[0]): r[1] for r in await conn.fetch(
        f"SELECT part_key, blob FROM {names.parts} WHERE endpoint = $1 AND part_key = ANY($2::bytea[])",
        names.endpoint, [k for ks in keys.values() for k in ks])}
    known = {r[0] for r in await conn.fetch(
        f"SELECT id FROM {names.dedup} WHERE endpoint = $1 AND id = ANY($2::text[])",
        names.endpoint, [envelopes[i].id for i in indexes])}
    rejected: dict[int, Any] = {}
    used: list[bytes] = []
    for i in indexes:
        env = envelopes[i]
        if env.id in known:
            continue  # a duplicate: answered as one, its parts are not needed
        missing = [wire for (wire, _stored), k in zip(env.databus, keys[i]) if k not in found]
        if missing:
            rejected[i] = core.Rejection(412, missing_parts_reason(missing, len(env.databus)), env.callback)
            continue
        msg_id, headers, body, expiry_ms, accepted_ms = core.decode_envelope(env.framed)
        for (_wire, stored), k in zip(env.databus, keys[i]):
            if stored is not None and stored in headers:
                headers[stored] = found[k]
        envelopes[i] = env.with_framed(core.encode_envelope(msg_id, headers, body, expiry_ms, accepted_ms))
        used += keys[i]
    if used:
        await conn.execute(f"DELETE FROM {names.parts} WHERE endpoint = $1 AND part_key = ANY($2::bytea[])",
                           names.endpoint, used)
    return rejected
