"""campaign_service behind a real PgBouncer in transaction mode (WHAGO_DB_PREPARED_STATEMENTS=off):
each transaction may run on another server connection, so nothing may rely on session state; the
event relay's LISTEN and leader lock take WHAGO_DB_SESSION_URL, a session of their own."""

from __future__ import annotations

import asyncio
import collections
import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg2
import pytest
from sqlalchemy import exc

from campaign_service.db.engine import Database
from campaign_service.delivery import leases
from campaign_service.repository.campaigns import get_view
from devstack.servers import Postgres, free_port
from tests.conftest import SANDBOX_API_KEY, IsolatedStack
from tests.helpers import Api, phones
from tests.test_delivery_fixtures import make_world, migrated_database
from waha_sandbox.control import SandboxControl
from whago.campaign.v1 import resources_pb2 as res

DB = "whago_pooler"


@pytest.fixture(scope="module")
def direct_db(postgres: Postgres) -> Iterator[Database]:
    yield from migrated_database(postgres, DB)


@pytest.fixture(scope="module")
def bouncer(postgres: Postgres, workdir: Path, direct_db: Database) -> Iterator[str]:
    """PgBouncer (Debian's package; .ci/run installs it) in transaction mode in front of the
    session's PostgreSQL, two server connections for DB and four for the session's `whago`; the URL
    of DB through it (`whago` and the admin console `pgbouncer` are on the same port)."""
    exe = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    root = workdir / "pgbouncer"
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (root / "users.txt").write_text('"postgres" ""\n')
    (root / "pgbouncer.ini").write_text(f"""[databases]
{DB} = host=127.0.0.1 port={postgres.port} dbname={DB}
whago = host=127.0.0.1 port={postgres.port} dbname=whago pool_size=4
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {root / "users.txt"}
pool_mode = transaction
default_pool_size = 2
max_client_conn = 200
admin_users = postgres
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


def _pooler_clients(bouncer: str) -> list[tuple[str, str]]:
    """(database, application_name) of every client PgBouncer serves (its admin console)."""
    admin = psycopg2.connect(bouncer.rsplit("/", 1)[0] + "/pgbouncer")
    admin.autocommit = True  # the console takes no transactions
    try:
        cur = admin.cursor()
        cur.execute("SHOW CLIENTS")
        cols = [d[0] for d in cur.description]
        return [(row[cols.index("database")], row[cols.index("application_name")]) for row in cur.fetchall()]
    finally:
        admin.close()


def test_a_campaign_runs_end_to_end_with_campaign_service_behind_the_pooler(
        bouncer: str, postgres: Postgres, isolated_stack: Callable[..., IsolatedStack], api_key: str,
        sandbox_url: str) -> None:
    """A whole stack whose campaign_service reaches PostgreSQL through the pooler (prepared
    statements off) runs a campaign to COMPLETED, each contact once; only the event relay's
    listener (LISTEN, leader lock) keeps a session of its own, on WHAGO_DB_SESSION_URL."""
    through = bouncer.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg2://") + "/whago"
    with isolated_stack("pooler", DATABASE_URL=through, WHAGO_DB_PREPARED_STATEMENTS="off",
                        WHAGO_DB_SESSION_URL=postgres.url("whago")) as st:
        api = Api(st.campaign_channel, api_key)
        chip = api.chip(sandbox_url, SANDBOX_API_KEY, interval=(0.0, 0.0))
        camp = api.campaign([chip])
        api.import_phones(camp.id, phones(20, start=7_000))
        api.start(camp.id)
        done = api.wait(camp.id, lambda c: c.state == res.CAMPAIGN_STATE_COMPLETED, timeout=60)
        assert done.sent_count == 20 and done.failed_count == 0
        per_chat = collections.Counter(s["chat_id"] for s in SandboxControl(sandbox_url).sends(
            session=chip.waha_session))
        assert len(per_chat) == 20 and max(per_chat.values()) == 1
        clients = _pooler_clients(bouncer)
        assert any(db == "whago" for db, _ in clients), clients  # campaign_service's pools go through it
        assert not any(app == "whago-outbox-listener" for _, app in clients), clients
