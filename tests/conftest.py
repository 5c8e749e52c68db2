"""Fixtures that start the real thing: PostgreSQL, Redis, the WAHA sandbox, both gRPC services
and the arq worker, all on 127.0.0.1. Servers are session-scoped; tests isolate by creating
their own user (tenancy keeps users apart)."""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import grpc
import pytest

from campaign_service import admin
from devstack.procs import REPO, ServiceProcess, service_env, stop_all
from devstack.servers import Postgres, Redis, free_port
from tests.helpers import Ops
from waha_sandbox.control import SandboxControl


def _worker_index() -> int:
    name = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(name[2:]) if name.startswith("gw") and name[2:].isdigit() else 0


# Ports of the servers under test come from a span of their own per xdist worker, below Linux's
# ephemeral range (32768-60999, which the kernel hands to outgoing connections): a port picked by the
# kernel and bound a moment later by a server was now and then taken meanwhile ("already in use").
_PORT_BASE, _PORT_SPAN = 20_000, 2_000
_low = _PORT_BASE + (_worker_index() % 6) * _PORT_SPAN
os.environ["WHAGO_PORT_RANGE"] = f"{_low}-{_low + _PORT_SPAN - 1}"

SERVICE_TOKEN = "test-service-token-" + secrets.token_hex(8)
WEBHOOK_HMAC_KEY = "test-webhook-hmac-key"
#: Every campaign_service of a test database may lead the relay: all get the same webhook settings.
#: Receivers listen on loopback; retries are quick, so dead letters and disabling come in seconds.
#: Chip API keys are sealed with it; WAHA servers may be anywhere on loopback (the sandbox's port varies).
SECRETS_ENV = {
    "WHAGO_SECRET_KEYS": "dGVzdC1rZXktdGVzdC1rZXktdGVzdC1rZXktdGVzdCE=",
    "WHAGO_WAHA_HOSTS": "127.0.0.1,localhost",
}
WEBHOOK_ENV = {
    "WHAGO_WEBHOOK_ALLOW_CIDRS": "127.0.0.0/8",
    "WHAGO_WEBHOOK_SCHEDULE": "0,0.2,0.4,0.8",
    "WHAGO_WEBHOOK_TIMEOUT_SECONDS": "2",
    "WHAGO_WEBHOOK_DISABLE_AFTER_SECONDS": "3",
}
SANDBOX_API_KEY = "sandbox-key"


@pytest.fixture(scope="session")
def workdir(request: pytest.FixtureRequest) -> Iterator[Path]:
    """The session's servers' data and logs (its servers stop before this ends). Removed at the end:
    ~0.5 GB a session, left behind by every run it filled a developer's disk. After a failure the
    logs stay (the databases go); WHAGO_TEST_KEEP=1 keeps everything."""
    path = Path(tempfile.mkdtemp(prefix="whago-test-"))
    yield path
    if os.environ.get("WHAGO_TEST_KEEP") == "1":
        return
    if request.session.testsfailed:
        for data in path.glob("pg*"):
            shutil.rmtree(data, ignore_errors=True)
        print(f"\nlogs of the failed session's servers: {path}", file=sys.stderr)
        return
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres(workdir: Path) -> Iterator[Postgres]:
    pg = Postgres(workdir / "pg", free_port())
    pg.start(fast_unsafe=True)
    yield pg
    pg.stop_fast()  # the session's data is thrown away: no need to wait for every pooled client


@pytest.fixture(scope="session")
def redis_server(workdir: Path) -> Iterator[Redis]:
    r = Redis(workdir / "redis", free_port())
    r.start()
    yield r
    r.stop()


@pytest.fixture(scope="session")
def database_url(postgres: Postgres) -> str:
    postgres.create_database("whago")
    url = postgres.url("whago")
    subprocess.run(
        [sys.executable, "-m", "campaign_service.admin", "migrate"],
        env=service_env({"DATABASE_URL": url}), cwd=REPO, check=True,
    )
    return url


@pytest.fixture(scope="session")
def ports() -> dict[str, int]:
    return {"campaign": free_port(), "dispatcher": free_port(), "sandbox": free_port(), "webhooks": free_port()}


@pytest.fixture(scope="session")
def stack_env(database_url: str, redis_server: Redis, ports: dict[str, int], workdir: Path) -> dict[str, str]:
    """The environment every service of the stack under test shares."""
    return {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_server.url,
        "WHAGO_SERVICE_TOKEN": SERVICE_TOKEN,
        "CAMPAIGN_LISTEN": f"127.0.0.1:{ports['campaign']}",
        "CAMPAIGN_TARGET": f"127.0.0.1:{ports['campaign']}",
        "DISPATCHER_LISTEN": f"127.0.0.1:{ports['dispatcher']}",
        "DISPATCHER_TARGET": f"127.0.0.1:{ports['dispatcher']}",
        "WHAGO_MEDIA_DIR": str(workdir / "media"),
        "WHAGO_LOG_LEVEL": "INFO",
        "WHAGO_WARMUP_DEFAULT": "off",  # warm-up: tests send far more than 20 a day per chip (test_warmup turns it on)
        **WEBHOOK_ENV, **SECRETS_ENV,
    }


@pytest.fixture(scope="session")
def sandbox(ports: dict[str, int], workdir: Path) -> Iterator[ServiceProcess]:
    """The WAHA sandbox (HTTP, follows WAHA's OpenAPI spec). Control it with SandboxControl."""
    p = ServiceProcess("waha-sandbox", "waha_sandbox",
                       ["--host", "127.0.0.1", "--port", str(ports["sandbox"]), "--api-key", SANDBOX_API_KEY],
                       {}, workdir / "logs", port=ports["sandbox"]).start()
    yield p
    p.stop()


@pytest.fixture(scope="session")
def sandbox_url(sandbox: ServiceProcess, ports: dict[str, int]) -> str:
    return f"http://127.0.0.1:{ports['sandbox']}"


@pytest.fixture()
def control(sandbox_url: str) -> SandboxControl:
    """Inspect and steer the WAHA sandbox (request log, fault injection)."""
    return SandboxControl(sandbox_url)


@pytest.fixture(scope="session")
def campaign_server(stack_env: dict[str, str], ports: dict[str, int], workdir: Path) -> Iterator[ServiceProcess]:
    p = ServiceProcess("campaign-service", "campaign_service.server", [], stack_env, workdir / "logs",
                       port=ports["campaign"]).start()
    yield p
    p.stop()


@pytest.fixture(scope="session")
def dispatcher_server(stack_env: dict[str, str], ports: dict[str, int], workdir: Path) -> Iterator[ServiceProcess]:
    """The dispatcher server, with its WAHA webhook receiver on ports["webhooks"] (HMAC-checked)."""
    env = {**stack_env, "DISPATCHER_WEBHOOK_LISTEN": f"127.0.0.1:{ports['webhooks']}",
           "WAHA_WEBHOOK_HMAC_KEY": WEBHOOK_HMAC_KEY}
    p = ServiceProcess("dispatcher-service", "dispatcher_service.server", [], env, workdir / "logs",
                       port=ports["dispatcher"]).start()
    yield p
    p.stop()


@dataclass
class WorkerStarter:
    """`start_worker(name, **env)`: another arq worker on the session's stack (tests may SIGKILL it);
    `started` keeps them all, for the stack to stop with its services."""

    env: dict[str, str]
    log_dir: Path
    started: list[ServiceProcess] = field(default_factory=list)

    def __call__(self, name: str | None = None, **extra_env: str) -> ServiceProcess:
        p = ServiceProcess(name or f"worker-{len(self.started)}", "dispatcher_service.worker", [],
                           {**self.env, **extra_env}, self.log_dir).start()
        self.started.append(p)
        return p


@pytest.fixture(scope="session")
def start_worker(stack_env: dict[str, str], workdir: Path) -> Iterator[WorkerStarter]:
    """Factory: start another arq worker process. All are stopped at the end."""
    starter = WorkerStarter(stack_env, workdir / "logs")
    yield starter
    stop_all(starter.started)


@pytest.fixture(scope="session")
def worker(start_worker: Callable[..., ServiceProcess]) -> ServiceProcess:
    """The session's default worker. A test that kills it must start a replacement."""
    return start_worker("worker-main")


@pytest.fixture(scope="session")
def stack(campaign_server: ServiceProcess, dispatcher_server: ServiceProcess, sandbox: ServiceProcess,
          worker: ServiceProcess, start_worker: WorkerStarter) -> Iterator[dict[str, ServiceProcess]]:
    """The whole stack up: both services, the sandbox and one worker. At the end they are stopped
    side by side with every worker a test started (each fixture's own stop then finds nothing left
    to do): a worker stopped after campaign_service waited for it with its last reports until killed."""
    procs = {"campaign": campaign_server, "dispatcher": dispatcher_server, "sandbox": sandbox, "worker": worker}
    yield procs
    stop_all([*start_worker.started, *procs.values()])


def ready_channel(port: int) -> grpc.Channel:
    """A channel to a server of the stack on 127.0.0.1, once it accepts connections."""
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(ch).result(timeout=15)
    return ch


@pytest.fixture(scope="session")
def campaign_channel(campaign_server: ServiceProcess, ports: dict[str, int]) -> Iterator[grpc.Channel]:
    with ready_channel(ports["campaign"]) as ch:
        yield ch


@pytest.fixture(scope="session")
def dispatcher_channel(dispatcher_server: ServiceProcess, ports: dict[str, int]) -> Iterator[grpc.Channel]:
    with ready_channel(ports["dispatcher"]) as ch:
        yield ch


@pytest.fixture(scope="session")
def create_user(database_url: str) -> Callable[..., str]:
    """Factory: a new user with credits; returns its API key (printed by the admin CLI).

    The session's first user comes from the real `python -m campaign_service.admin create-user`
    process; the others from the same CLI entry point (admin.main) run in this process: a Python
    start per user (~0.7 s of CPU) was a large share of the suite's time, spent once per test."""
    spawned = False

    def create(name: str | None = None, credits: int = 1_000_000) -> str:
        nonlocal spawned
        argv = ["create-user", "--name", name or f"user-{secrets.token_hex(4)}", "--credits", str(credits)]
        if not spawned:
            spawned = True
            out = subprocess.run([sys.executable, "-m", "campaign_service.admin", *argv],
                                 env=service_env({"DATABASE_URL": database_url}), cwd=REPO, check=True,
                                 capture_output=True, text=True)
            return out.stdout.strip().splitlines()[-1]
        buf = io.StringIO()
        with mock.patch.dict(os.environ, {"DATABASE_URL": database_url}), contextlib.redirect_stdout(buf):
            rc = admin.main(argv)
        assert rc == 0, f"create-user exited {rc}: {buf.getvalue()}"
        return buf.getvalue().strip().splitlines()[-1]

    return create


@pytest.fixture()
def api_key(create_user: Callable[..., str]) -> str:
    """A fresh user's API key, so each test sees only its own campaigns and chips."""
    return create_user()


@pytest.fixture()
def api(stack: dict[str, ServiceProcess], campaign_channel: grpc.Channel, api_key: str) -> Ops:
    """A fresh user's stubs (and reads) on the session's whole stack: services, sandbox, worker.
    Modules that need less (test_campaign_support's `api`) define their own."""
    return Ops(campaign_channel, api_key)


def auth(key: str) -> list[tuple[str, str]]:
    """gRPC metadata for a bearer key."""
    return [("authorization", f"Bearer {key}")]


@pytest.fixture(scope="session")
def run_buf() -> Callable[..., str]:
    """Run the pinned buf CLI (npm @bufbuild/buf) and return its stdout; fails the test on error."""
    buf = REPO / "node_modules" / ".bin" / "buf"
    assert buf.exists(), "buf is missing: `make test` installs it with npm ci"

    def run(*args: str) -> str:
        r = subprocess.run([str(buf), *args], capture_output=True, text=True, timeout=60, cwd=REPO)
        assert r.returncode == 0, f"buf {' '.join(args)} failed: {r.stderr}"
        return r.stdout

    return run


@dataclass
class IsolatedStack:
    """A private Redis, campaign server, dispatcher server and arq workers, on free ports, sharing
    the session's PostgreSQL database and WAHA sandbox. For destructive tests (SIGKILL a worker,
    restart Redis) that must not disturb the session's shared stack."""

    name: str
    redis: Redis
    env: dict[str, str]
    log_dir: Path
    campaign: ServiceProcess
    dispatcher: ServiceProcess
    campaign_channel: grpc.Channel
    dispatcher_channel: grpc.Channel
    workers: list[ServiceProcess] = field(default_factory=list)
    _count: int = 0

    def start_worker(self, name: str | None = None, **extra_env: str) -> ServiceProcess:
        """Start one more arq worker on this stack's Redis; returns it once it logged "started"."""
        p = self.launch_worker(name, **extra_env)
        p.wait_logged(" started: ", timeout=30)
        return p

    def launch_worker(self, name: str | None = None, **extra_env: str) -> ServiceProcess:
        """Start one more arq worker without waiting for it (several then start side by side)."""
        self._count += 1
        p = ServiceProcess(name or f"{self.name}-worker-{self._count}", "dispatcher_service.worker", [],
                           {**self.env, **extra_env}, self.log_dir).launch()
        self.workers.append(p)
        return p

    def kill_workers(self) -> None:
        """SIGKILL every worker of this stack: a crash, no drain, no cleanup."""
        for w in self.workers:
            w.kill()
        self.workers.clear()

    def stop(self) -> None:
        """Stop every process of the stack, side by side (idempotent)."""
        stop_all([*self.workers, self.dispatcher, self.campaign])
        self.workers.clear()
        self.campaign_channel.close()
        self.dispatcher_channel.close()
        self.redis.stop()

    def __enter__(self) -> IsolatedStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="session")
def isolated_stack(database_url: str, sandbox: ServiceProcess, workdir: Path
                   ) -> Iterator[Callable[..., IsolatedStack]]:
    """Factory: `isolated_stack(name, workers=1, **env)` starts a dedicated stack (see IsolatedStack)
    with short dispatcher slices (DISPATCH_SLICE_SECONDS=4 < DISPATCH_JOB_TIMEOUT=10, so arq re-runs
    a crashed worker's lane within ~20 s) and WAHA_TIMEOUT_SECONDS=2; `env` overrides those."""
    started: list[IsolatedStack] = []

    def start(name: str, workers: int = 1, **extra_env: str) -> IsolatedStack:
        root = workdir / f"isolated-{name}"
        redis = Redis(root / "redis", free_port())
        redis.start()
        cport, dport = free_port(), free_port()
        env = {
            "DATABASE_URL": database_url, "REDIS_URL": redis.url, "WHAGO_SERVICE_TOKEN": SERVICE_TOKEN,
            "CAMPAIGN_LISTEN": f"127.0.0.1:{cport}", "CAMPAIGN_TARGET": f"127.0.0.1:{cport}",
            "DISPATCHER_LISTEN": f"127.0.0.1:{dport}", "DISPATCHER_TARGET": f"127.0.0.1:{dport}",
            "WHAGO_MEDIA_DIR": str(workdir / "media"), "WHAGO_LOG_LEVEL": "INFO",
            "WHAGO_WARMUP_DEFAULT": "off",  # warm-up (test_warmup turns it on)
            "DISPATCH_JOB_TIMEOUT": "10", "DISPATCH_SLICE_SECONDS": "4", "WAHA_TIMEOUT_SECONDS": "2",
            **WEBHOOK_ENV, **SECRETS_ENV, **extra_env,
        }
        log_dir = root / "logs"
        camp = ServiceProcess(f"{name}-campaign", "campaign_service.server", [], env, log_dir, port=cport).launch()
        disp = ServiceProcess(f"{name}-dispatcher", "dispatcher_service.server", [], env, log_dir,
                              port=dport).launch()
        camp.wait_listening()
        disp.wait_listening()
        cch, dch = ready_channel(cport), ready_channel(dport)
        st = IsolatedStack(name, redis, env, log_dir, camp, disp, cch, dch)
        started.append(st)
        for w in [st.launch_worker() for _ in range(workers)]:
            w.wait_logged(" started: ", timeout=30)
        return st

    yield start
    for st in started:
        st.stop()
