"""campaign_service behind a real PgBouncer in transaction mode (WHAGO_DB_PREPARED_STATEMENTS=off):
each transaction may run on another server connection, so nothing may rely on session state."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
from sqlalchemy import exc

from campaign_service.db.engine import Database
from campaign_service.delivery import leases
from campaign_service.repository.campaigns import get_view
from devstack.servers import Postgres, free_port
from tests.test_delivery_fixtures import make_world, migrated_database

DB = "whago_pooler"


@pytest.fixture(scope="module")
def direct_db(postgres: Postgres) -> Iterator[Database]:
    yield from migrated_database(postgres, DB)


@pytest.fixture(scope="module")
def bouncer(postgres: Postgres, workdir: Path, direct_db: Database) -> Iterator[str]:
    """PgBouncer (Debian's package; .ci/run installs it) in transaction mode with two server
    connections in front of the session's PostgreSQL; the URL of DB through it."""
    exe = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    root = workdir / "pgbouncer"
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (root / "users.txt").write_text('"postgres" ""\n')
    (root / "pgbouncer.ini").write_text(f"""[databases]
{DB} = host=127.0.0.1 port={postgres.port} dbname={DB}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {root / "users.txt"}
pool_mode = transaction
default_pool_size = 2
max_client_conn = 50
logfile = {root / "pgbouncer.log"}
""")
    as_pg: list[str] = []
    if os.geteuid() == 0:  # PgBouncer refuses to run as root
        pg = pwd.getpwnam("postgres")
        for p in (root, *root.iterdir()):
            os.chown(p, pg.pw_uid, pg.pw_gid)
        as_pg = ["runuser", "-u", "postgres", "--"]
    proc = subprocess.Popen([*as_pg, exe, str(root / "pgbouncer.ini")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"postgresql://postgres@127.0.0.1:{port}/{DB}"
    deadline = time.monotonic() + 20
    while True:
        try:
            psycopg2.connect(url).close()
            break
        except psycopg2.OperationalError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pgbouncer did not start: {(root / 'pgbouncer.log').read_text()[-2000:]}") from None
            time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.mark.parametrize("prepared", [False, True], ids=["off", "on"])
def test_the_hot_paths_work_through_a_transaction_mode_pooler_only_with_prepared_statements_off(
        direct_db: Database, bouncer: str, prepared: bool) -> None:
    """A lease (its statements PREPAREd when on), then another while a second client holds the
    server connection the first ran on: the pooler hands the lane's next transaction the other
    one, which never saw the PREPARE. Off: both leases, WatchCampaign's prepared read and the
    event loop's asyncpg read all work through the pooler; on: the second lease fails."""
    w = make_world(direct_db, contacts=4, chips=1)
    db = Database(bouncer.replace("postgresql://", "postgresql+psycopg2://"), pool_size=1, prepared=prepared)
    blocker = psycopg2.connect(bouncer)
    try:
        first = leases.lease_messages(db, w.cid, w.chip(0), 1, 2, 60, "lane-a")
        assert len(first.messages) == 2
        blocker.cursor().execute("SELECT 1")  # BEGIN: holds the server connection just released
        if prepared:
            with pytest.raises(exc.DBAPIError, match="does not exist"):
                leases.lease_messages(db, w.cid, w.chip(0), 1, 2, 60, "lane-a")
            return
        second = leases.lease_messages(db, w.cid, w.chip(0), 1, 2, 60, "lane-a")
        assert len(second.messages) == 2 and second.remaining == 0
        view = get_view(db, w.user_id, w.campaign_id)
        assert view is not None and view.name == "t"

        async def loop_read() -> list[tuple[object, ...]]:
            await db.loop_reads.start()
            try:
                return [row for _ in range(3)
                        for row in await db.loop_reads.fetch_all("SELECT name FROM campaigns WHERE id = $1",
                                                                 w.campaign_id)]
            finally:
                await db.loop_reads.close()

        assert asyncio.run(loop_read()) == [("t",)] * 3
    finally:
        blocker.close()
        db.dispose()
