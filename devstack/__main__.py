"""`make run`: the whole stack on local defaults, a demo campaign, then stay up until Ctrl-C.

PostgreSQL and Redis are private servers under .run/ unless DATABASE_URL / REDIS_URL point at
real ones. Services listen on campaign 127.0.0.1:50051, dispatcher 127.0.0.1:50052 (its WAHA
webhook receiver on 127.0.0.1:50053) and the WAHA sandbox 127.0.0.1:3000 (WAHA's own default port),
which posts WhatsApp receipts to that receiver."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc

from devstack.procs import REPO, ServiceProcess, service_env
from devstack.servers import Postgres, Redis, free_port, port_in_use

RUN = REPO / ".run"
PG_PORT, REDIS_PORT = 55432, 56379  # defaults; WHAGO_PG_PORT / WHAGO_REDIS_PORT choose others
SANDBOX_KEY = os.environ.get("WAHA_SANDBOX_KEY", "sandbox-key")
DEMO_CONTACTS = int(os.environ.get("WHAGO_DEMO_CONTACTS", "50"))


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
    if _bindable(default) or port_in_use(default):
        return default  # free, or a server listens there: starting refuses that with its own message
    port = free_port()
    say(f"port {default} for {name} is in use; using {port} (set {env_var} to choose)")
    return port


def main() -> int:
    from whago.campaign.v1 import (
        campaign_service_pb2 as cs,
    )
    from whago.campaign.v1 import (
        campaign_service_pb2_grpc as cs_grpc,
    )
    from whago.campaign.v1 import (
        chip_service_pb2 as chs,
    )
    from whago.campaign.v1 import (
        chip_service_pb2_grpc as chs_grpc,
    )
    from whago.campaign.v1 import (
        resources_pb2 as res,
    )

    infra: list[Postgres | Redis] = []
    procs: list[ServiceProcess] = []
    stopping = False

    def shutdown(*_: object) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        say("stopping (SIGTERM to each service, graceful drain)…")
        for p in reversed(procs):
            p.stop()
        for s in reversed(infra):
            s.stop()
        say("stopped.")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        database_url = os.environ.get("DATABASE_URL")
        if not database_url:
            pg_port = private_port("PostgreSQL", "WHAGO_PG_PORT", PG_PORT)
            pg = Postgres(RUN / "pg", pg_port)
            say(f"starting private PostgreSQL on 127.0.0.1:{pg_port} (data in {pg.root})")
            pg.start()
            infra.append(pg)
            pg.create_database("whago")
            database_url = pg.url("whago")
        redis_url = os.environ.get("REDIS_URL")
        if not redis_url:
            redis_port = private_port("redis-server", "WHAGO_REDIS_PORT", REDIS_PORT)
            rd = Redis(RUN / "redis", redis_port)
            say(f"starting private redis-server on 127.0.0.1:{redis_port}")
            rd.start()
            infra.append(rd)
            redis_url = rd.url
        env = {
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "WHAGO_SERVICE_TOKEN": os.environ.get("WHAGO_SERVICE_TOKEN", "dev-service-token"),
            "CAMPAIGN_LISTEN": os.environ.get("CAMPAIGN_LISTEN", "127.0.0.1:50051"),
            "DISPATCHER_LISTEN": os.environ.get("DISPATCHER_LISTEN", "127.0.0.1:50052"),
            "CAMPAIGN_TARGET": os.environ.get("CAMPAIGN_TARGET", "127.0.0.1:50051"),
            "DISPATCHER_TARGET": os.environ.get("DISPATCHER_TARGET", "127.0.0.1:50052"),
            "WHAGO_MEDIA_DIR": os.environ.get("WHAGO_MEDIA_DIR", str(RUN / "media")),
            # WhatsApp receipts: the sandbox posts message.ack webhooks to the dispatcher's receiver.
            "DISPATCHER_WEBHOOK_LISTEN": os.environ.get("DISPATCHER_WEBHOOK_LISTEN", "127.0.0.1:50053"),
            "WAHA_WEBHOOK_HMAC_KEY": os.environ.get("WAHA_WEBHOOK_HMAC_KEY", "dev-webhook-key"),
        }
        say("applying migrations (alembic upgrade head)")
        subprocess.run([sys.executable, "-m", "campaign_service.admin", "migrate"],
                       env=service_env(env), cwd=REPO, check=True)
        logs = RUN / "logs"
        campaign_port = int(env["CAMPAIGN_LISTEN"].rsplit(":", 1)[1])
        dispatcher_port = int(env["DISPATCHER_LISTEN"].rsplit(":", 1)[1])
        for p in (
            ServiceProcess("waha-sandbox", "waha_sandbox",
                           ["--host", "127.0.0.1", "--port", "3000", "--api-key", SANDBOX_KEY,
                            "--webhook-url", f"http://{env['DISPATCHER_WEBHOOK_LISTEN']}/waha/webhook",
                            "--webhook-hmac-key", env["WAHA_WEBHOOK_HMAC_KEY"]], env, logs, port=3000),
            ServiceProcess("campaign-service", "campaign_service.server", [], env, logs, port=campaign_port),
            ServiceProcess("dispatcher-service", "dispatcher_service.server", [], env, logs, port=dispatcher_port),
            ServiceProcess("worker", "dispatcher_service.worker", [], env, logs),
        ):
            say(f"starting {p.name} (log: {p.log_path.relative_to(REPO)})")
            p.start()
            procs.append(p)

        out = subprocess.run([sys.executable, "-m", "campaign_service.admin", "create-user", "--name", "demo",
                              "--credits", "100000"], env=service_env(env), cwd=REPO, check=True,
                             capture_output=True, text=True)
        key = out.stdout.strip().splitlines()[-1]
        md: tuple[tuple[str, str | bytes], ...] = (("authorization", f"Bearer {key}"),)
        channel = grpc.insecure_channel(env["CAMPAIGN_LISTEN"])
        grpc.channel_ready_future(channel).result(timeout=30)
        campaigns = cs_grpc.CampaignServiceStub(channel)
        chips = chs_grpc.ChipServiceStub(channel)

        chip_ids = []
        for i in range(1, 4):
            chip = chips.RegisterChip(chs.RegisterChipRequest(chip=res.Chip(
                display_name=f"demo chip {i}", phone=f"55119000000{i:02d}", waha_base_url="http://127.0.0.1:3000",
                waha_session=f"chip-{i}", waha_api_key=SANDBOX_KEY,
                # Demo pace: fast enough to watch finish. Real chips keep WAHA's 30-60 s default.
                pacing=res.Pacing(interval_min_seconds=0.2, interval_max_seconds=0.6))), metadata=md)
            chip_ids.append(chip.id)
        say(f"registered 3 chips on the WAHA sandbox: {', '.join(chip_ids)}")
        settings = res.CampaignSettings(
            pacing=res.Pacing(interval_min_seconds=0.2, interval_max_seconds=0.6),
            camouflage=res.Camouflage(send_seen=True, typing=True, typing_chars_per_second=200,
                                      typing_max_seconds=0.3))
        camp = campaigns.CreateCampaign(cs.CreateCampaignRequest(campaign=res.Campaign(
            name="demo campaign", description="made by make run",
            templates=[res.MessageTemplate(text="Olá {{name}}, esta é uma demonstração do WHAGO."),
                       res.MessageTemplate(text="Oi {{name}}! Mensagem de teste do WHAGO.")],
            settings=settings, chip_ids=chip_ids)), metadata=md)

        def rows() -> Iterator[cs.ImportContactsRequest]:
            yield cs.ImportContactsRequest(campaign_id=camp.id, contacts=[
                cs.ContactInput(phone=f"+55 11 9{8000_0000 + i:08d}", name=f"Contato {i}")
                for i in range(DEMO_CONTACTS)])

        imported = campaigns.ImportContacts(rows(), metadata=md)
        say(f"campaign {camp.id}: imported {imported.imported_count} contacts")
        campaigns.StartCampaign(cs.StartCampaignRequest(campaign_id=camp.id), metadata=md)
        say("started; progress (pending / sent / delivered / read / failed):")
        deadline = time.monotonic() + 600
        receipts_until = None  # once the campaign is final, a few seconds more for WhatsApp's receipts
        state_name = res.CampaignState.Name
        while time.monotonic() < deadline:
            c = campaigns.GetCampaign(cs.GetCampaignRequest(campaign_id=camp.id), metadata=md)
            say(f"  {state_name(c.state):26} {c.pending_count:4} / {c.sent_count:4} / {c.delivered_count:4} / "
                f"{c.read_count:4} / {c.failed_count:4}")
            if c.state in (res.CAMPAIGN_STATE_COMPLETED, res.CAMPAIGN_STATE_CANCELLED, res.CAMPAIGN_STATE_PAUSED):
                receipts_until = receipts_until or time.monotonic() + 5
                if c.delivered_count >= c.sent_count or time.monotonic() > receipts_until:
                    break
            time.sleep(1)
        channel.close()
        target = env["CAMPAIGN_LISTEN"]
        print(f"""
The stack is up. Demo API key: {key}

  buf curl --protocol grpc --http2-prior-knowledge -H 'authorization: Bearer {key}' \\
      -d '{{"page_size": 5}}' http://{target}/whago.campaign.v1.CampaignService/ListCampaigns
  (buf is in node_modules/.bin/buf)
  python -m whago_client --api-key {key} campaigns list     (PYTHONPATH=clients)

Logs: .run/logs/. Ctrl-C stops everything.""", flush=True)
        while True:
            for p in procs:
                if not p.alive():
                    say(f"{p.name} exited; last lines of its log:\n{p.tail()}")
                    return 1
            time.sleep(1)
    except KeyboardInterrupt:
        return 0
    except RuntimeError as e:  # a server that could not start: say why, no traceback
        say(str(e))
        return 1
    finally:
        shutdown()


if __name__ == "__main__":
    sys.exit(main())
