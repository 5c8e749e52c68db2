"""The stack under benchmark: private PostgreSQL (realistic settings, fsync on), Redis, the WAHA
sandbox, campaign_service, dispatcher_service and an arq worker, all subprocesses on free
127.0.0.1 ports. Same approach as tests/conftest.py; services start lazily so a baseline that only
needs PostgreSQL still runs when a service is broken."""

from __future__ import annotations

import importlib.util
import os
import secrets
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import grpc
import psycopg2
import psycopg2.extensions
from cryptography.fernet import Fernet

from devstack.procs import REPO, ServiceProcess, service_env
from devstack.servers import Postgres, Redis, free_port
from waha_sandbox.control import SandboxControl

SANDBOX_API_KEY = "bench-sandbox-key"


def read_status_kb(pid: int, field: str) -> int:
    """A `VmRSS`/`VmHWM`-style field of /proc/<pid>/status, in kB (psutil is not a dependency)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/<pid>/stat), 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(ppid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == ppid:
                        out.append(int(d))
            except (OSError, ValueError, IndexError):
                continue
    return out


def reset_hwm(pid: int) -> bool:
    """Reset the peak RSS (VmHWM) of a process (Linux: write 5 to clear_refs). False if refused."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Stack:
    """Owns every server process of one benchmark run."""

    def __init__(self, workdir: Path | None = None) -> None:
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="whago-bench-"))
        self.logs = self.workdir / "logs"
        self.token = "bench-service-token-" + secrets.token_hex(8)
        self.secret_key = Fernet.generate_key().decode()  # seals the run's chip API keys
        self.ports = {"campaign": free_port(), "dispatcher": free_port(), "sandbox": free_port()}
        self.pg = Postgres(self.workdir / "pg", free_port())
        self.redis = Redis(self.workdir / "redis", free_port())
        self.procs: dict[str, ServiceProcess] = {}
        self.database_url = ""
        self._channel: grpc.Channel | None = None
        self._migrated = False
        self._service_error: str | None = None
        self.worker_env: dict[str, str] = {}

    # -- infrastructure --------------------------------------------------------------------------

    def start_infra(self) -> None:
        self.pg.start(fast_unsafe=False)  # realistic: fsync and synchronous_commit on
        self.pg.create_database("whago")
        self.database_url = self.pg.url("whago")
        self.redis.start()
        self.procs["sandbox"] = ServiceProcess(
            "waha-sandbox", "waha_sandbox",
            ["--host", "127.0.0.1", "--port", str(self.ports["sandbox"]), "--api-key", SANDBOX_API_KEY],
            {}, self.logs, port=self.ports["sandbox"]).start()

    @property
    def dsn(self) -> str:
        """libpq form of DATABASE_URL, for psycopg2 directly."""
        return self.database_url.replace("postgresql+psycopg2://", "postgresql://")

    @property
    def sandbox_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['sandbox']}"

    @property
    def sandbox(self) -> SandboxControl:
        return SandboxControl(self.sandbox_url, timeout=120.0)

    @property
    def env(self) -> dict[str, str]:
        return {
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis.url,
            "WHAGO_SERVICE_TOKEN": self.token,
            "CAMPAIGN_LISTEN": f"127.0.0.1:{self.ports['campaign']}",
            "CAMPAIGN_TARGET": f"127.0.0.1:{self.ports['campaign']}",
            "DISPATCHER_LISTEN": f"127.0.0.1:{self.ports['dispatcher']}",
            "DISPATCHER_TARGET": f"127.0.0.1:{self.ports['dispatcher']}",
            "WHAGO_MEDIA_DIR": str(self.workdir / "media"),
            "WHAGO_LOG_LEVEL": "WARNING",
            "WHAGO_WARMUP_DEFAULT": "off",  # warm-up would cap bench chips at 20 sends a day
            "WHAGO_WEBHOOK_ALLOW_CIDRS": "127.0.0.0/8",  # the figures' receivers are local
            "WHAGO_WAHA_HOSTS": "127.0.0.1",  # the sandbox, on whatever port it got
            "WHAGO_SECRET_KEYS": self.secret_key,
        }

    def migrate(self) -> None:
        if self._migrated:
            return
        r = subprocess.run([sys.executable, "-m", "campaign_service.admin", "migrate"],
                           env=service_env({"DATABASE_URL": self.database_url}), cwd=REPO,
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            # The admin CLI may not exist yet: run the same Alembic upgrade directly.
            from campaign_service.db.migrate import upgrade
            upgrade(self.database_url)
        self._migrated = True

    @contextmanager
    def db(self, autocommit: bool = False) -> Iterator[psycopg2.extensions.connection]:
        """A direct psycopg2 connection (baselines and fixtures); committed on success."""
        conn = psycopg2.connect(self.dsn)
        conn.autocommit = autocommit
        try:
            yield conn
            if not autocommit:
                conn.commit()
        except BaseException:
            if not autocommit:
                conn.rollback()
            raise
        finally:
            conn.close()

    def sql(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        with self.db() as conn, conn.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchall() if cur.description else []

    # -- our services ----------------------------------------------------------------------------

    def ensure_services(self) -> None:
        """campaign_service, dispatcher_service and one worker (started on first need, restarted
        if one died). A service that cannot start fails every later figure fast, same error."""
        if self._service_error is not None:
            raise RuntimeError(self._service_error)
        try:
            self.migrate()
            for name, module in (("campaign", "campaign_service.server"), ("dispatcher", "dispatcher_service.server"),
                                 ("worker", "dispatcher_service.worker")):
                if importlib.util.find_spec(module) is None:
                    raise RuntimeError(f"module {module} does not exist (yet)")
                if name in self.procs and self.procs[name].alive():
                    continue
                if name == "worker":
                    self.start_worker(**self.worker_env)
                else:
                    self.procs[name] = ServiceProcess(
                        f"{name}-service", module, [], self.env, self.logs, port=self.ports[name]).start(timeout=60)
        except Exception as e:
            self._service_error = f"{type(e).__name__}: {e}"[:2000]
            raise

    def start_worker(self, **extra_env: str) -> ServiceProcess:
        """(Re)start the one arq worker with extra environment (stops the previous one)."""
        old = self.procs.pop("worker", None)
        if old is not None:
            old.stop()
        self.worker_env = dict(extra_env)
        p = ServiceProcess(f"worker-{int(time.time())}", "dispatcher_service.worker", [],
                           {**self.env, **extra_env}, self.logs).start()
        time.sleep(1.0)
        if not p.alive():
            raise RuntimeError(f"worker exited at start:\n{p.tail()}")
        self.procs["worker"] = p
        return p

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of every process of the stack (PostgreSQL: postmaster + backends,
        which come and go, so compare two snapshots only over a short span)."""
        names = ("campaign", "dispatcher", "worker", "sandbox")
        out: dict[str, float] = {name: cpu_seconds(self.pid(name)) for name in names
               if name in self.procs}
        pg = 0.0
        if self.pg.proc is not None:
            todo = [self.pg.proc.pid]
            while todo:  # runuser -> postgres -> backends
                pid = todo.pop()
                pg += cpu_seconds(pid)
                todo += _children(pid)
        out["postgres"] = pg
        if self.redis.proc is not None:
            out["redis"] = cpu_seconds(self.redis.proc.pid)
        return out

    def pid(self, name: str) -> int:
        p = self.procs[name].proc
        if p is None:
            raise RuntimeError(f"{name} is not running")
        return p.pid

    @property
    def channel(self) -> grpc.Channel:
        if self._channel is None:
            ch = grpc.insecure_channel(f"127.0.0.1:{self.ports['campaign']}", options=[
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ("grpc.max_send_message_length", 64 * 1024 * 1024)])
            grpc.channel_ready_future(ch).result(timeout=30)
            self._channel = ch
        return self._channel

    def create_user(self, credits: int = 10**10) -> str:
        """A new user through the admin CLI; returns its API key (last stdout line)."""
        out = subprocess.run(
            [sys.executable, "-m", "campaign_service.admin", "create-user",
             "--name", f"bench-{secrets.token_hex(4)}", "--credits", str(credits)],
            env=service_env({"DATABASE_URL": self.database_url}), cwd=REPO, check=True,
            capture_output=True, text=True, timeout=120)
        return out.stdout.strip().splitlines()[-1]

    def set_limits(self, api_key: str, **limits: int) -> None:
        """Raise a user's quotas through the admin CLI (`set-limits`), e.g. chips=2000."""
        flags = [x for k, v in limits.items() for x in (f"--{k.replace('_', '-')}", str(v))]
        subprocess.run([sys.executable, "-m", "campaign_service.admin", "set-limits",
                        "--user-id", str(self.user_id_of(api_key)), *flags],
                       env=service_env({"DATABASE_URL": self.database_url}), cwd=REPO, check=True,
                       capture_output=True, text=True, timeout=120)

    def user_id_of(self, api_key: str) -> uuid.UUID:
        import hashlib
        rows = self.sql("SELECT id FROM users WHERE api_key_hash = %s",
                        (hashlib.sha256(api_key.encode()).hexdigest(),))
        if not rows:
            raise RuntimeError("user of the API key not found (is the key hash sha256 hex?)")
        return uuid.UUID(str(rows[0][0]))

    def sql_user(self) -> uuid.UUID:
        """A user row inserted directly (for baselines that never call our API)."""
        uid = uuid.uuid4()
        self.sql("INSERT INTO users (id, name, api_key_hash, credits) VALUES (%s, %s, %s, %s) RETURNING id",
                 (str(uid), "bench-baseline", secrets.token_hex(32), 10**10))
        return uid

    def stop(self) -> None:
        if self._channel is not None:
            self._channel.close()
        for name in ("worker", "dispatcher", "campaign", "sandbox"):
            p = self.procs.pop(name, None)
            if p is not None:
                with suppress(Exception):
                    p.stop()
        for s in (self.redis, self.pg):
            with suppress(Exception):
                s.stop()


def log_tail(stack: Stack, name: str, lines: int = 20) -> str:
    p = stack.procs.get(name)
    return p.tail(lines) if p is not None else ""

