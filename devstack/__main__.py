"""`make run`: the whole stack on local defaults, a demo campaign, then stay up until Ctrl-C.

PostgreSQL and Redis are private servers under .run/ unless DATABASE_URL / REDIS_URL point at
real ones. Services listen on campaign 127.0.0.1:50051, dispatcher 127.0.0.1:50052 (its WAHA
webhook receiver on 127.0.0.1:50053) and the WAHA sandbox 127.0.0.1:3000 (WAHA's own default port),
which posts WhatsApp receipts to that receiver. Prometheus metrics: campaign 127.0.0.1:9101, dispatcher
127.0.0.1:9102, worker 127.0.0.1:9103 (`/metrics`)."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from cryptography.fernet import Fernet

from devstack import demo
from devstack.procs import REPO, ServiceProcess, service_env
from devstack.servers import Postgres, Redis, free_port, port_in_use

RUN = REPO / ".run"
#: What a second terminal sources (`. .run/env`) to reach the stack this run started.
ENV_FILE = RUN / "env"
PG_PORT, REDIS_PORT = 55432, 56379  # defaults; WHAGO_PG_PORT / WHAGO_REDIS_PORT choose others
SANDBOX_KEY = os.environ.get("WAHA_SANDBOX_KEY", "sandbox-key")
SANDBOX_PORT = 3000  # WAHA's own default port


def say(msg: str) -> None:
    print(f"[make run] {msg}", flush=True)


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def private_port(name: str, env_var: str, default: int) -> int:
    """The port of a private server: `env_var` if set (used as is), else `default`, or a free one
    when a socket that is not a server holds it (a client connection that got it as its ephemeral
    source port made `make run` fail right after a test run)."""
    if os.environ.get(env_var):
        return int(os.environ[env_var])
    return _default_or_free(name, env_var, default)


def listen_address(name: str, env_var: str, default: int) -> str:
    """A program's listen address: `env_var` if set (used as is), else 127.0.0.1:`default`, or a
    free port as for private_port (50052 held by a client socket's ephemeral port stopped `make run`
    with a bind error right after a test run)."""
    if os.environ.get(env_var):
        return os.environ[env_var]
    return f"127.0.0.1:{_default_or_free(name, env_var, default)}"


def _default_or_free(name: str, env_var: str, default: int) -> int:
    if _bindable(default) or port_in_use(default):
        return default  # free, or a server listens there: starting refuses that with its own message
    port = free_port()
    say(f"port {default} for {name} is in use; using {port} (set {env_var} to choose)")
    return port


def start_infra(infra: list[Postgres | Redis]) -> tuple[str, str]:
    """PostgreSQL and Redis: DATABASE_URL / REDIS_URL when set, else private servers under .run/."""
    database_url = os.environ.get("DATABASE_URL")
    if not database_url:
        pg = Postgres(RUN / "pg", private_port("PostgreSQL", "WHAGO_PG_PORT", PG_PORT))
        start_private(infra, pg, "PostgreSQL")
        pg.create_database("whago")
        database_url = pg.url("whago")
    redis_url = os.environ.get("REDIS_URL")
    if not redis_url:
        rd = Redis(RUN / "redis", private_port("redis-server", "WHAGO_REDIS_PORT", REDIS_PORT))
        start_private(infra, rd, "redis-server")
        redis_url = rd.url
    return database_url, redis_url


def start_private(infra: list[Postgres | Redis], server: Postgres | Redis, what: str) -> None:
    say(f"starting private {what} on 127.0.0.1:{server.port} (data in {server.root})")
    server.start()
    infra.append(server)


def secret_key() -> str:
    """The Fernet key of `make run`'s database, made on the first run (readable by its owner only)."""
    path = RUN / "secret.key"
    if not path.exists():
        RUN.mkdir(parents=True, exist_ok=True)
        path.write_text(Fernet.generate_key().decode())
        path.chmod(0o600)
    return path.read_text().strip()


def stack_env(database_url: str, redis_url: str) -> dict[str, str]:
    """The environment every program of the stack shares (each setting overridable)."""
    campaign = listen_address("campaign_service", "CAMPAIGN_LISTEN", 50051)
    dispatcher = listen_address("dispatcher_service", "DISPATCHER_LISTEN", 50052)
    return {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "WHAGO_SERVICE_TOKEN": os.environ.get("WHAGO_SERVICE_TOKEN", "dev-service-token"),
        "CAMPAIGN_LISTEN": campaign,
        "DISPATCHER_LISTEN": dispatcher,
        "CAMPAIGN_TARGET": os.environ.get("CAMPAIGN_TARGET", client_target(campaign)),
        "DISPATCHER_TARGET": os.environ.get("DISPATCHER_TARGET", client_target(dispatcher)),
        "WHAGO_MEDIA_DIR": os.environ.get("WHAGO_MEDIA_DIR", str(RUN / "media")),
        # WhatsApp receipts: the sandbox posts message.ack webhooks to the dispatcher's receiver.
        "DISPATCHER_WEBHOOK_LISTEN": listen_address("the webhook receiver", "DISPATCHER_WEBHOOK_LISTEN", 50053),
        "WAHA_WEBHOOK_HMAC_KEY": os.environ.get("WAHA_WEBHOOK_HMAC_KEY", "dev-webhook-key"),
        # The user's webhook endpoints may be on this machine (the SSRF guard refuses loopback otherwise).
        "WHAGO_WEBHOOK_ALLOW_CIDRS": os.environ.get("WHAGO_WEBHOOK_ALLOW_CIDRS", "127.0.0.0/8,::1/128"),
        # Seals the chips' WAHA API keys at rest; kept in .run/secret.key across runs.
        "WHAGO_SECRET_KEYS": os.environ.get("WHAGO_SECRET_KEYS") or secret_key(),
        # Prometheus /metrics of each program (README "Metrics"); the one worker of `make run` has its own.
        "CAMPAIGN_METRICS_LISTEN": listen_address("campaign_service metrics", "CAMPAIGN_METRICS_LISTEN", 9101),
        "DISPATCHER_METRICS_LISTEN": listen_address("dispatcher metrics", "DISPATCHER_METRICS_LISTEN", 9102),
        "WORKER_METRICS_LISTEN": listen_address("worker metrics", "WORKER_METRICS_LISTEN", 9103),
    }


def client_target(listen: str) -> str:
    """The address a client dials for a server listening on `listen` (a wildcard host is not dialable)."""
    host, _, port = listen.rpartition(":")
    return f"127.0.0.1:{port}" if host in ("", "0.0.0.0", "[::]", "::") else listen


def env_file_text(env: dict[str, str]) -> str:
    """`export` lines for the addresses this run chose: private ports may differ from the defaults
    (a held port, WHAGO_PG_PORT), so the README's commands read them instead of assuming 5432."""
    exported = {
        "DATABASE_URL": env["DATABASE_URL"],
        "REDIS_URL": env["REDIS_URL"],
        "WHAGO_TARGET": client_target(env["CAMPAIGN_LISTEN"]),
    }
    lines = [f"export {k}={shlex.quote(v)}" for k, v in exported.items()]
    return "# written by `make run` (devstack) while the stack is up; `. .run/env` in another shell\n" + \
        "\n".join(lines) + "\n"


def write_env_file(env: dict[str, str], path: Path = ENV_FILE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(env_file_text(env), encoding="utf-8")
    tmp.replace(path)  # a reader never sources half a file
    say(f"addresses in {path.relative_to(REPO) if path.is_relative_to(REPO) else path} (`. .run/env`)")


def migrate(env: dict[str, str]) -> None:
    say("applying migrations (alembic upgrade head)")
    subprocess.run([sys.executable, "-m", "campaign_service.admin", "migrate"],
                   env=service_env(env), cwd=REPO, check=True)


def programs(env: dict[str, str]) -> list[ServiceProcess]:
    """The four programs: the WAHA sandbox, campaign_service, the dispatcher server, one worker."""
    logs = RUN / "logs"
    campaign_port = int(env["CAMPAIGN_LISTEN"].rsplit(":", 1)[1])
    dispatcher_port = int(env["DISPATCHER_LISTEN"].rsplit(":", 1)[1])
    return [
        ServiceProcess("waha-sandbox", "waha_sandbox",
                       ["--host", "127.0.0.1", "--port", str(SANDBOX_PORT), "--api-key", SANDBOX_KEY,
                        "--webhook-url", f"http://{env['DISPATCHER_WEBHOOK_LISTEN']}/waha/webhook",
                        "--webhook-hmac-key", env["WAHA_WEBHOOK_HMAC_KEY"]], env, logs, port=SANDBOX_PORT),
        ServiceProcess("campaign-service", "campaign_service.server", [], env, logs, port=campaign_port),
        ServiceProcess("dispatcher-service", "dispatcher_service.server", [], env, logs, port=dispatcher_port),
        ServiceProcess("worker", "dispatcher_service.worker", [], env, logs),
    ]


def print_usage(key: str, target: str) -> None:
    print(f"""
The stack is up. Demo API key: {key}

  . .run/env       # DATABASE_URL, REDIS_URL, WHAGO_TARGET of this run (for the admin CLI, the SDK)
  node_modules/.bin/buf curl --protocol grpc --http2-prior-knowledge -H 'authorization: Bearer {key}' \\
      -d '{{"page_size": 5}}' http://{target}/whago.campaign.v1.CampaignService/ListCampaigns
  PYTHONPATH=clients .venv/bin/python -m whago_client --api-key {key} campaigns list

Logs: .run/logs/. Ctrl-C stops everything.""", flush=True)


def supervise(procs: list[ServiceProcess]) -> int:
    """Until Ctrl-C: a program that exits ends the run with its log's last lines."""
    while True:
        for p in procs:
            if not p.alive():
                say(f"{p.name} exited; last lines of its log:\n{p.tail()}")
                return 1
        time.sleep(1)


def main() -> int:
    infra: list[Postgres | Redis] = []
    procs: list[ServiceProcess] = []
    wrote_env = False  # a run that failed to start must not remove the file of one still running
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        env = stack_env(*start_infra(infra))
        migrate(env)
        for p in programs(env):
            say(f"starting {p.name} (log: {p.log_path.relative_to(REPO)})")
            p.start()
            procs.append(p)
        write_env_file(env)  # once every server is ours: a run that failed keeps a running one's file
        wrote_env = True
        key = demo.run(env, f"http://127.0.0.1:{SANDBOX_PORT}", SANDBOX_KEY, say)
        print_usage(key, client_target(env["CAMPAIGN_LISTEN"]))
        return supervise(procs)
    except KeyboardInterrupt:
        return 0
    except RuntimeError as e:  # a server that could not start: say why, no traceback
        say(str(e))
        return 1
    finally:
        say("stopping (SIGTERM to each service, graceful drain)…")
        if wrote_env:
            ENV_FILE.unlink(missing_ok=True)  # its ports mean nothing once the servers are gone
        for p in reversed(procs):
            p.stop()
        for s in reversed(infra):
            s.stop()
        say("stopped.")


if __name__ == "__main__":
    sys.exit(main())
