"""A real PostgreSQL for tests (127.0.0.1:5432, trust auth, database ``test``, user ``postgres``;
GWCORE_TEST_PG_DSN overrides): a schema of its own per test, dropped afterwards; reading tables;
and a throwaway server of a test's own (initdb/pg_ctl on a temporary data dir and a free port),
for the tests that stop the database: the machine's server is never touched."""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import subprocess
import tempfile
import uuid

import pytest

PG_DSN = os.environ.get("GWCORE_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


def require_pg(dsn: str = PG_DSN) -> None:
    """Skip without a reachable PostgreSQL, except in CI (CI=true), where that is a failure."""
    try:
        import asyncpg
    except ImportError as exc:
        pytest.skip(f"asyncpg is not installed ({exc}): pip install 'gwcore[postgresql]'")

    async def probe() -> None:
        conn = await asyncpg.connect(dsn, timeout=3)
        await conn.close()

    try:
        asyncio.run(probe())
    except Exception as exc:  # noqa: BLE001 - any failure to connect means: no server here
        pytest.skip(f"no PostgreSQL at {dsn}: {exc!r} (.ci/run starts it)")


async def _query(dsn: str, sql: str, *args):
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


def query(sql: str, *args, dsn: str = PG_DSN) -> list:
    return asyncio.run(_query(dsn, sql, *args))


def drop_schema(name: str, dsn: str = PG_DSN) -> None:
    query(f'DROP SCHEMA IF EXISTS "{name}" CASCADE', dsn=dsn)


@pytest.fixture
def pg_schema():
    """A fresh schema name on the tests' server (dropped with everything in it afterwards)."""
    require_pg()
    name = f"gwt_{uuid.uuid4().hex[:10]}"
    yield name
    drop_schema(name)


def queue_rows(schema: str, table: str, dsn: str = PG_DSN) -> list:
    """``(id, expires, headers, body, seq)`` of every row of a queue table, in its order."""
    return query(f'SELECT id, expires, headers, body, seq FROM "{schema}"."{table}" ORDER BY seq', dsn=dsn)


def pg_binary(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or ([shutil.which(name)] if shutil.which(name) else [])
    if not found:
        pytest.skip(f"{name} is not installed (apt-get install postgresql; .ci/run installs it)")
    return found[-1]


class PgServer:
    """A PostgreSQL server of a test's own: ``initdb`` on a new temporary directory (outside
    pytest's, which the postgres user may not enter when the tests run as root), listening on
    127.0.0.1:*port*; :meth:`remove` stops it and deletes the directory."""

    def __init__(self, port: int) -> None:
        self.dir = tempfile.mkdtemp(prefix="gwcore-pg-")
        self.data = os.path.join(self.dir, "data")
        self.port = port
        self.dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        # initdb and the server refuse to run as root: run them as the postgres user then
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _run(self, *args: str, timeout: float = 60) -> None:
        res = subprocess.run(self._as + list(args), capture_output=True, text=True, timeout=timeout)
        assert res.returncode == 0, f"{args[0]}: {res.stdout}{res.stderr}"

    def init(self) -> "PgServer":
        if self._as:
            shutil.chown(self.dir, "postgres")
        self._run(pg_binary("initdb"), "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-sync")
        return self

    def start(self) -> "PgServer":
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} -c fsync=on"
        self._run(pg_binary("pg_ctl"), "-D", self.data, "-l", os.path.join(self.dir, "server.log"), "-o", opts,
                  "-w", "-t", "60", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run(pg_binary("pg_ctl"), "-D", self.data, "-m", mode, "-w", "-t", "60", "stop")

    def running(self) -> bool:
        return os.path.exists(os.path.join(self.data, "postmaster.pid"))

    def log(self) -> str:
        path = os.path.join(self.dir, "server.log")
        return open(path, errors="replace").read()[-3000:] if os.path.exists(path) else ""

    def remove(self) -> None:
        if self.running():
            try:
                self.stop("immediate")
            except AssertionError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)
