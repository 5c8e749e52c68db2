"""The deployment files, without a Docker engine: docker-compose.yml against the Compose
Specification schema (vendored: deploy/compose-spec.json, source in deploy/README.md) and checked
against the repository (pinned images, commands that exist, env vars the programs read, health
checks, depends_on conditions, scalable workers); the Dockerfiles parsed with `dockerfile-parse`
(multi-stage, COPY sources exist, non-root USER, HEALTHCHECK, proto generation in the build stage).
Then the parts that can run here: the images' health-check script against the live stack, and the
README runbook's `buf curl` block, verbatim, against it."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from devstack.procs import ServiceProcess
from tests.conftest import SANDBOX_API_KEY, SERVICE_TOKEN
from tests.helpers import Ops, wait_for
from whago.campaign.v1 import resources_pb2 as res
from whago.campaign.v1 import webhook_service_pb2 as wh

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"
SCHEMA_FILE = REPO / "deploy" / "compose-spec.json"
HEALTHCHECK = REPO / "deploy" / "docker" / "healthcheck.py"
# Our services: the package whose code each one runs (its env vars must be read there).
OURS = {"migrate": "campaign_service", "campaign": "campaign_service", "dispatcher": "dispatcher_service",
        "worker": "dispatcher_service", "waha-sandbox": "waha_sandbox"}
ONE_SHOT = {"migrate"}
# Set by the Dockerfiles for Python itself, not read by our code.
PYTHON_ENV = {"PATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PIP_NO_CACHE_DIR",
              "PIP_DISABLE_PIP_VERSION_CHECK"}
# The schema says "$schema": "https://json-schema.org/draft-07/schema" (a spelling jsonschema does not map).
validator_cls = jsonschema.Draft7Validator
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def interpolate(value: Any) -> Any:
    """Compose's `${VAR:-default}` interpolation with an empty environment (the defaults)."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: m.group(2) or "", value)
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(doc, dict)
    return doc


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: interpolate(svc) for name, svc in compose["services"].items()}


def env_of(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}


def dockerfile_of(svc: dict[str, Any]) -> Path:
    build = svc["build"]
    return REPO / build.get("context", ".") / build.get("dockerfile", "Dockerfile")


def parse_dockerfile(path: Path) -> DockerfileParser:
    return DockerfileParser(path=str(path))  # reads it; writes only when content is assigned


def stages(df: DockerfileParser) -> list[list[dict[str, Any]]]:
    """Instructions split per stage (each starting with its FROM)."""
    out: list[list[dict[str, Any]]] = []
    for ins in df.structure:
        if ins["instruction"] == "FROM":
            out.append([])
        if out:
            out[-1].append(ins)
    return out


def exec_form(value: str) -> list[str]:
    """A Dockerfile instruction's JSON (exec) form, or its shell form split."""
    value = value.strip()
    if value.startswith("["):
        parsed = json.loads(value)
        assert isinstance(parsed, list)
        return [str(x) for x in parsed]
    return shlex.split(value)


def read_env_names(package: str) -> set[str]:
    """Every env var name the package's code reads (os.environ.get / getenv / config helpers)."""
    pat = re.compile(r"(?:environ\.get|getenv|environ\[|_env|_float|_int)\(?\s*[\"']([A-Z][A-Z0-9_]*)[\"']")
    names: set[str] = set()
    for f in (REPO / package).rglob("*.py"):
        names |= set(pat.findall(f.read_text()))
    return names


def python_module(cmd: list[str]) -> str | None:
    if len(cmd) >= 3 and cmd[0] in ("python", "python3") and cmd[1] == "-m":
        return cmd[2]
    return None


# -- the compose file ----------------------------------------------------------------------------


def test_compose_file_is_valid_against_the_compose_spec_schema(compose: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA_FILE.read_text())
    validator_cls.check_schema(schema)
    errors = sorted(validator_cls(schema).iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_the_schema_catches_a_broken_file(compose: dict[str, Any]) -> None:
    """The validator is not vacuous: a misspelt key and a bad depends_on condition are refused."""
    schema = json.loads(SCHEMA_FILE.read_text())
    validator = validator_cls(schema)
    broken = json.loads(json.dumps(compose))
    broken["services"]["worker"]["helthcheck"] = broken["services"]["worker"].pop("healthcheck")
    assert not validator.is_valid(broken)
    broken = json.loads(json.dumps(compose))
    broken["services"]["campaign"]["depends_on"]["postgres"]["condition"] = "service_ready"
    assert not validator.is_valid(broken)


def test_the_stack_has_every_part(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == {"postgres", "redis", "migrate", "campaign", "dispatcher", "worker", "waha",
                             "waha-sandbox"}
    assert services["waha"]["image"].startswith("devlikeapro/waha:")
    assert "profiles" not in services["waha"], "the real WAHA is the default backend"
    assert services["waha-sandbox"]["profiles"] == ["sandbox"]
    # Every other service runs without a profile.
    assert [n for n, s in services.items() if s.get("profiles")] == ["waha-sandbox"]


def test_images_are_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        image = svc.get("image")
        assert image, f"{name}: no image (built services are tagged too)"
        repo, _, tag = image.rpartition(":")
        assert repo and "/" not in tag and tag, f"{name}: image {image!r} has no tag"
        assert tag != "latest" and not tag.startswith("latest"), f"{name}: {image!r} is not pinned"
        if "build" not in svc:
            assert re.search(r"\d", tag), f"{name}: third-party image {image!r} should pin a version"


def test_every_command_runs_a_module_of_the_repo(services: dict[str, dict[str, Any]]) -> None:
    for name, package in OURS.items():
        svc = services[name]
        cmd = svc.get("command") or svc.get("entrypoint")
        assert isinstance(cmd, list), f"{name}: command in exec form"
        module = python_module(cmd)
        assert module and module.split(".")[0] == package, f"{name}: {cmd} does not run {package}"
        assert importlib.util.find_spec(module) is not None, f"{name}: module {module} does not exist"
        # and the image has that package: its Dockerfile copies it
        df = parse_dockerfile(dockerfile_of(svc))
        copied = [exec_form(i["value"])[0].rstrip("/") for i in df.structure if i["instruction"] == "COPY"
                  and not i["value"].startswith("--from")]
        assert package in copied, f"{name}: {dockerfile_of(svc).name} does not COPY {package}/"


def test_env_vars_are_ones_the_programs_read(services: dict[str, dict[str, Any]]) -> None:
    for name, package in OURS.items():
        read = read_env_names(package)
        unknown = set(env_of(services[name])) - read
        assert not unknown, f"{name}: {sorted(unknown)} are not read by {package}"
    # And the Dockerfiles' ENV too.
    for svc_name in ("campaign", "dispatcher", "waha-sandbox"):
        df = parse_dockerfile(dockerfile_of(services[svc_name]))
        unknown = set(df.envs) - PYTHON_ENV - read_env_names(OURS[svc_name])
        assert not unknown, f"{svc_name}'s Dockerfile sets {sorted(unknown)}, not read by {OURS[svc_name]}"


def test_services_point_at_each_other_consistently(services: dict[str, dict[str, Any]]) -> None:
    campaign, dispatcher, worker, waha = (services[n] for n in ("campaign", "dispatcher", "worker", "waha"))
    listen_port = env_of(campaign)["CAMPAIGN_LISTEN"].rsplit(":", 1)[1]
    for svc in (dispatcher, worker):
        target = env_of(svc)["CAMPAIGN_TARGET"]
        assert target == f"dns:///campaign:{listen_port}", target  # every replica, round_robin
        assert env_of(svc)["WHAGO_SERVICE_TOKEN"] == env_of(campaign)["WHAGO_SERVICE_TOKEN"]
    assert env_of(campaign)["DISPATCHER_TARGET"] == "dispatcher:" + env_of(dispatcher)["DISPATCHER_LISTEN"].rsplit(
        ":", 1)[1]
    hook_port = env_of(dispatcher)["DISPATCHER_WEBHOOK_LISTEN"].rsplit(":", 1)[1]
    for backend in (waha, services["waha-sandbox"]):
        assert env_of(backend)["WHATSAPP_HOOK_URL"] == f"http://dispatcher:{hook_port}/waha/webhook"
        assert env_of(backend)["WHATSAPP_HOOK_HMAC_KEY"] == env_of(dispatcher)["WAHA_WEBHOOK_HMAC_KEY"]
    assert env_of(waha)["WHATSAPP_HOOK_EVENTS"] == "message.ack,message"
    db = env_of(campaign)["DATABASE_URL"]
    assert db == env_of(services["migrate"])["DATABASE_URL"] and "@postgres:5432/" in db


def test_health_checks_everywhere(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        if name in ONE_SHOT:
            continue
        hc = svc.get("healthcheck")
        if hc is not None:
            assert not hc.get("disable"), f"{name}: health check disabled"
            assert hc.get("test"), f"{name}: empty health check"
            continue
        assert "build" in svc, f"{name}: no health check"
        df = parse_dockerfile(dockerfile_of(svc))
        assert stages(df)[-1] and any(i["instruction"] == "HEALTHCHECK" for i in stages(df)[-1]), \
            f"{name}: neither compose nor its image has a health check"
    # The worker's check is its own (the image's default is the dispatcher API's gRPC check).
    assert services["worker"]["healthcheck"]["test"][-1] == "arq"


def test_depends_on_with_conditions(services: dict[str, dict[str, Any]]) -> None:
    def healthy(name: str) -> bool:
        svc = services[name]
        return bool(svc.get("healthcheck") and not svc["healthcheck"].get("disable")) or (
            "build" in svc and name not in ONE_SHOT)

    for name in OURS:
        if name == "waha-sandbox":
            continue
        deps = services[name].get("depends_on")
        assert isinstance(deps, dict) and deps, f"{name}: depends_on must be the long form with conditions"
        for dep, spec in deps.items():
            assert dep in services, f"{name} depends on unknown {dep}"
            cond = spec.get("condition")
            assert cond in ("service_healthy", "service_completed_successfully"), f"{name} -> {dep}: {cond}"
            if cond == "service_healthy":
                assert healthy(dep), f"{name} waits for {dep} to be healthy, but it has no health check"
            else:
                assert dep in ONE_SHOT and services[dep].get("restart") == "no"
    assert services["campaign"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    for name in ("campaign", "migrate"):
        assert "postgres" in services[name]["depends_on"]


def test_workers_scale_with_scale_flag(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    for key in ("container_name", "ports", "hostname"):
        assert key not in worker, f"worker has {key}: `--scale worker=N` would clash"
    # campaign_service's published port is a variable so replicas can take a range.
    assert services["campaign"]["ports"] == ["127.0.0.1:50051:50051"]
    raw = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["campaign"]["ports"][0]
    assert "${CAMPAIGN_PORT" in raw


# -- the Dockerfiles -----------------------------------------------------------------------------


def dockerfiles() -> list[Path]:
    files = sorted((REPO / "deploy" / "docker").glob("*.Dockerfile"))
    assert {f.name for f in files} == {"campaign_service.Dockerfile", "dispatcher_service.Dockerfile",
                                       "waha_sandbox.Dockerfile"}
    return files


def test_every_built_service_uses_one_of_the_dockerfiles(services: dict[str, dict[str, Any]]) -> None:
    used = {dockerfile_of(s) for s in services.values() if "build" in s}
    assert used == set(dockerfiles())
    for s in services.values():
        if "build" in s:
            assert s["build"].get("context", ".") == "."


@pytest.mark.parametrize("path", dockerfiles(), ids=lambda p: p.name)
def test_dockerfile(path: Path) -> None:
    df = parse_dockerfile(path)
    st = stages(df)
    assert len(st) >= 2, "multi-stage: build, then runtime"
    froms = [s[0]["value"].split()[0] for s in st]
    for image in froms:
        assert ":" in image and not image.endswith(":latest"), f"base image {image} not pinned"
    build, runtime = st[0], st[-1]
    build_runs = " ".join(i["value"] for i in build if i["instruction"] == "RUN")
    assert "pip install -r requirements.lock" in build_runs
    if path.name != "waha_sandbox.Dockerfile":  # the sandbox speaks HTTP only, no protobuf code
        assert "grpc_tools.protoc" in build_runs and "-Iprotos" in build_runs
        assert any(i["instruction"] == "COPY" and "--from=build /src/whago/" in i["value"] for i in runtime)
    # The runtime installs nothing and runs as a non-root user.
    runtime_runs = " ".join(i["value"] for i in runtime if i["instruction"] == "RUN")
    assert "pip install" not in runtime_runs
    users = [i["value"].split(":")[0] for i in runtime if i["instruction"] == "USER"]
    assert users and users[-1] not in ("root", "0"), "runtime must end on a non-root USER"
    last_user = max(k for k, i in enumerate(runtime) if i["instruction"] == "USER")
    assert runtime[-1]["instruction"] == "CMD" and last_user < len(runtime) - 1
    hc = [i for i in runtime if i["instruction"] == "HEALTHCHECK"]
    assert len(hc) == 1 and "CMD" in hc[0]["value"]
    hc_cmd = exec_form(hc[0]["value"].split("CMD", 1)[1])
    assert hc_cmd[:2] == ["python", "/app/healthcheck.py"]
    cmd = exec_form(runtime[-1]["value"])
    module = python_module(cmd)
    assert module and importlib.util.find_spec(module) is not None, f"CMD {cmd}: no such module"
    # Every COPY source (not from another stage) exists in the build context, the repo root.
    for ins in df.structure:
        if ins["instruction"] in ("COPY", "ADD") and not ins["value"].startswith("--from"):
            *sources, _dest = exec_form(ins["value"])
            for src in sources:
                assert (REPO / src).exists(), f"{path.name}: COPY source {src} does not exist"
    # .dockerignore keeps the copied sources in the context.
    ignored = (REPO / ".dockerignore").read_text().split()
    for ins in df.structure:
        if ins["instruction"] == "COPY" and not ins["value"].startswith("--from"):
            for src in exec_form(ins["value"])[:-1]:
                assert src.rstrip("/") not in ignored


# -- what runs here: the health-check script and the runbook --------------------------------------


def healthcheck(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(HEALTHCHECK), *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=30)


def test_the_images_health_check_script_against_the_live_stack(
        stack: dict[str, ServiceProcess], stack_env: dict[str, str], ports: dict[str, int]) -> None:
    for var in ("CAMPAIGN_LISTEN", "DISPATCHER_LISTEN"):
        r = healthcheck(stack_env, "grpc", var, "1")
        assert r.returncode == 0, r.stderr
    r = healthcheck(stack_env, "http", f"http://127.0.0.1:{ports['sandbox']}/_sandbox/config")
    assert r.returncode == 0, r.stderr
    # arq writes its health key when the worker's loop starts
    wait_for(lambda: healthcheck(stack_env, "arq").returncode == 0, 40, "worker health key")
    # and it says "unhealthy" when it should
    free = {"CAMPAIGN_LISTEN": "127.0.0.1:1"}
    assert healthcheck(free, "grpc", "CAMPAIGN_LISTEN", "1").returncode == 1
    assert healthcheck({**stack_env, "DISPATCH_QUEUE": "no-such-queue"}, "arq").returncode == 1
    assert healthcheck({}, "bogus").returncode == 2


def runbook_commands() -> tuple[str, list[str]]:
    """The README's runbook block: (prelude of assignments, each command with its continuations)."""
    text = (REPO / "README.md").read_text()
    section = text.split("### Runbook", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    joined = re.sub(r"\\\n\s*", " ", block)
    lines = [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    prelude = [ln for ln in lines if re.match(r"^[A-Z]+=", ln)]
    return "\n".join(prelude), [ln for ln in lines if ln not in prelude]


@pytest.fixture()
def running(api: Ops, sandbox_url: str) -> Iterator[res.Campaign]:
    """A campaign that stays RUNNING (one message per 30 s) until the runbook cancels it."""
    chip = api.chip(sandbox_url, SANDBOX_API_KEY, interval=(30.0, 30.0))
    camp = api.campaign([chip], name="runbook campaign", interval=(30.0, 30.0))
    api.start_sending(camp.id, 5)
    yield api.get(camp.id)
    if api.get(camp.id).state not in (res.CAMPAIGN_STATE_CANCELLED, res.CAMPAIGN_STATE_COMPLETED):
        api.cancel(camp.id)


def test_readme_runbook_runs_verbatim_against_the_stack(
        api: Ops, api_key: str, running: res.Campaign, ports: dict[str, int]) -> None:
    ep = api.webhooks.CreateWebhookEndpoint(wh.CreateWebhookEndpointRequest(endpoint=wh.WebhookEndpoint(
        url="http://127.0.0.1:9/runbook", event_types=["campaign.cancelled"])), metadata=tuple(api.md)).endpoint
    prelude, commands = runbook_commands()
    assert len(commands) == 7, commands
    env = {**os.environ, "KEY": api_key, "WHAGO_SERVICE_TOKEN": SERVICE_TOKEN, "CAMPAIGN_ID": running.id,
           "ENDPOINT_ID": ep.endpoint_id, "WHAGO_CAMPAIGN_URL": f"http://127.0.0.1:{ports['campaign']}",
           "WHAGO_DISPATCHER_URL": f"http://127.0.0.1:{ports['dispatcher']}"}
    outs: dict[str, Any] = {}
    for cmd in commands:
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", f"{prelude}\n{cmd}"], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"{cmd}\n{r.stderr}"
        outs[cmd.rsplit("/", 1)[1] + (":D" if "$D/" in cmd else "")] = json.loads(r.stdout or "{}")
    assert outs["Check"]["status"] == "SERVING" and outs["Check:D"]["status"] == "SERVING"
    assert [c["id"] for c in outs["ListCampaigns"]["campaigns"]] == [running.id]
    assert outs["GetDispatch:D"]["campaignId"] == running.id
    assert outs["CancelCampaign"]["state"] == "CAMPAIGN_STATE_CANCELLED"
    assert [e["endpointId"] for e in outs["ListWebhookEndpoints"]["endpoints"]] == [ep.endpoint_id]
    assert isinstance(outs["ListWebhookDeliveries"].get("deliveries", []), list)
    assert api.get(running.id).state == res.CAMPAIGN_STATE_CANCELLED


def test_round_robin_channel_reaches_every_listed_address() -> None:
    """DeliveryClient's service config asks for round_robin (so `ipv4:a,b` or a DNS name with several
    replicas spreads over all of them); grpc accepts it."""
    from dispatcher_service.delivery import CHANNEL_OPTIONS, SERVICE_CONFIG

    assert json.loads(SERVICE_CONFIG)["loadBalancingConfig"] == [{"round_robin": {}}]
    ch = grpc.insecure_channel("ipv4:127.0.0.1:1,127.0.0.1:2", options=CHANNEL_OPTIONS)
    ch.close()
