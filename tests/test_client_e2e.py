"""The Python SDK and the CLI against the real stack: campaign_service on PostgreSQL, the
dispatcher and its worker on Redis, the WAHA sandbox. No fake servicer anywhere: auth, typed
errors with their rich details, request_id idempotency, paging, streaming imports, waiting and
retries all go over real gRPC to the real server (or to a port where nothing listens yet)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from whago_client import RetryPolicy, WhagoClient, errors, read_contacts_csv

from devstack.procs import REPO, ServiceProcess, service_env
from tests.conftest import SANDBOX_API_KEY
from tests.helpers import phones
from whago.campaign.v1 import resources_pb2 as res


@pytest.fixture()
def target(stack: dict[str, ServiceProcess], ports: dict[str, int]) -> str:
    return f"127.0.0.1:{ports['campaign']}"


@pytest.fixture()
def client(target: str, api_key: str) -> Iterator[WhagoClient]:
    with WhagoClient(target, api_key=api_key, timeout=30) as c:
        yield c


def fast_chip(client: WhagoClient, sandbox_url: str) -> res.Chip:
    """A chip on the sandbox that sends without pause (like tests.helpers.Api.chip)."""
    return client.register_chip(
        phones(1)[0].replace(" ", ""), sandbox_url, f"s-{time.monotonic_ns()}", SANDBOX_API_KEY,
        display_name="sdk chip", pacing=res.Pacing(interval_min_seconds=0, interval_max_seconds=0),
    )


FAST = res.CampaignSettings(
    pacing=res.Pacing(interval_min_seconds=0, interval_max_seconds=0),
    camouflage=res.Camouflage(send_seen=False, typing=False),
)
SLOW = res.CampaignSettings(pacing=res.Pacing(interval_min_seconds=3600, interval_max_seconds=3600))


# --------------------------------------------------------------------------- auth and typed errors


def test_the_api_key_goes_in_the_authorization_header(target: str, client: WhagoClient) -> None:
    created = client.create_campaign("mine", templates=["hi"])
    assert client.get_campaign(created.id).name == "mine"  # the right key is accepted

    for key in ("wk_not-a-real-key", None):
        with WhagoClient(target, api_key=key, retry=RetryPolicy(max_attempts=1)) as bad:
            with pytest.raises(errors.Unauthenticated) as exc:
                bad.get_campaign(created.id)
            assert exc.value.reason == "UNAUTHENTICATED"
            with pytest.raises(errors.Unauthenticated):
                bad.list_campaigns().to_list()


def test_typed_errors_carry_the_servers_details(
        client: WhagoClient, target: str, create_user: Callable[..., str], sandbox_url: str) -> None:
    with pytest.raises(errors.InvalidArgument) as bad:
        client.create_campaign("", templates=["hi"])
    fields = [f for f, _ in bad.value.field_violations]
    assert fields == ["campaign.name"], bad.value
    assert all(why for _, why in bad.value.field_violations)
    assert isinstance(bad.value.__cause__, grpc.RpcError)
    assert bad.value.__cause__.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]

    with pytest.raises(errors.InvalidArgument) as bad:
        client.create_campaign("x", templates=["hi"], settings=res.CampaignSettings(
            pacing=res.Pacing(interval_min_seconds=90, interval_max_seconds=30)))
    assert [f for f, _ in bad.value.field_violations] == ["campaign.settings.pacing.interval_min_seconds"]

    with WhagoClient(target, api_key=create_user()) as other:
        theirs = other.create_campaign("theirs", templates=["hi"])
    with pytest.raises(errors.NotFound) as nf:
        client.get_campaign(theirs.id)
    assert type(nf.value) is errors.NotFound and nf.value.message
    with pytest.raises(errors.NotFound):
        client.start_campaign(theirs.id)

    empty = client.create_campaign("no contacts", templates=["hi"], chip_ids=[fast_chip(client, sandbox_url).id])
    with pytest.raises(errors.FailedPrecondition) as fp:
        client.start_campaign(empty.id)
    assert fp.value.reason == "NO_CONTACTS" and fp.value.message
    assert client.get_campaign(empty.id).state == res.CAMPAIGN_STATE_DRAFT


def test_request_id_makes_a_repeated_create_return_the_first_result(client: WhagoClient) -> None:
    a = client.create_campaign("once", templates=["hi"], request_id="sdk-create-1")
    b = client.create_campaign("once", templates=["hi"], request_id="sdk-create-1")
    assert a.id == b.id
    c = client.create_campaign("once", templates=["hi"])  # a fresh request_id per call otherwise
    d = client.create_campaign("once", templates=["hi"])
    assert len({a.id, c.id, d.id}) == 3
    assert sorted(x.id for x in client.list_campaigns()) == sorted({a.id, c.id, d.id})


def test_pager_walks_every_real_page_without_duplicates(client: WhagoClient) -> None:
    created = {client.create_campaign(f"c{i}", templates=["hi"]).id for i in range(25)}
    pager = client.list_campaigns(page_size=10)
    pages = list(pager.pages)
    assert [len(p) for p in pages] == [10, 10, 5]
    ids = [c.id for p in pages for c in p]
    assert len(ids) == 25 and set(ids) == created
    assert [c.id for c in pager] == ids  # iterating again starts over, same order
    assert client.list_campaigns(state="RUNNING", page_size=10).to_list() == []
    assert len(client.list_campaigns(state="DRAFT", page_size=7).to_list()) == 25


# --------------------------------------------------------------------------- import


def test_import_contacts_streams_a_10k_row_csv(client: WhagoClient, tmp_path: Path) -> None:
    camp = client.create_campaign("import", templates=["Oi {{name}} de {{city}}"])
    nums = phones(9900)
    path = tmp_path / "contacts.csv"
    rejected_rows: list[int] = []
    with path.open("w", encoding="utf-8", newline="") as f:
        f.write("phone;name;city\n")  # Excel pt-BR style
        row = 0
        for i, n in enumerate(nums):
            row += 1
            f.write(f"{n};Contact {i};São Paulo\n")
            if i % 198 == 0:  # 50 duplicates, typed in national format
                row += 1
                d8 = n[-8:]  # "+55 11 9XXXXXXXX" -> the same number as "(11) 9XXXX-XXXX"
                f.write(f"(11) 9{d8[:4]}-{d8[4:]};Again {i};Rio\n")
            if i % 198 == 1:  # 50 rejected
                row += 1
                rejected_rows.append(row)
                f.write(f"not a phone {i};Bad {i};x\n")
    assert row == 10_000

    resp = client.import_contacts(camp.id, read_contacts_csv(path), batch_size=1000)

    assert (resp.imported_count, resp.duplicate_count, resp.rejected_count, resp.total_contacts) == (
        9900, 50, 50, 9900)
    assert [r.row for r in resp.rejected] == rejected_rows
    assert all(r.reason and r.phone.startswith("not a phone") for r in resp.rejected)
    assert client.get_campaign(camp.id).total_contacts == 9900
    contacts = client.list_contacts(camp.id, page_size=1000)
    first = contacts.first()
    assert first is not None and first.name == "Contact 0" and dict(first.variables) == {"city": "São Paulo"}
    assert sum(1 for _ in contacts) == 9900


def test_import_source_error_cancels_the_upload_and_nothing_is_kept(client: WhagoClient) -> None:
    camp = client.create_campaign("broken upload", templates=["hi"])

    def rows() -> Iterator[str]:
        yield from (p.replace(" ", "") for p in phones(1500))
        raise ValueError("row 1501: bad encoding")

    with pytest.raises(ValueError, match="row 1501"):
        client.import_contacts(camp.id, rows(), batch_size=1000)
    # The server got no complete stream, so its single import transaction never commits.
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        assert client.get_campaign(camp.id).total_contacts == 0
        time.sleep(0.2)
    assert client.list_contacts(camp.id).to_list() == []


# --------------------------------------------------------------------------- wait_for_state


def test_wait_for_state_follows_a_real_campaign_to_completed(client: WhagoClient, sandbox_url: str) -> None:
    chip = fast_chip(client, sandbox_url)
    camp = client.create_campaign("wait", templates=["Oi {{name|cliente}}"], chip_ids=[chip.id], settings=FAST)
    assert client.import_contacts(camp.id, [{"phone": p, "name": f"N{i}"} for i, p in enumerate(phones(5))]
                                  ).imported_count == 5
    assert client.start_campaign(camp.id).state == res.CAMPAIGN_STATE_RUNNING
    seen: list[res.Campaign] = []

    done = client.wait_for_state(camp.id, "COMPLETED", timeout=60, poll=0.1, on_change=seen.append)

    assert done.state == res.CAMPAIGN_STATE_COMPLETED
    assert (done.sent_count, done.pending_count, done.failed_count) == (5, 0, 0)
    assert seen and seen[-1].state == res.CAMPAIGN_STATE_COMPLETED
    progress = [(c.state, c.pending_count, c.sent_count) for c in seen]
    assert all(a != b for a, b in itertools.pairwise(progress))  # only changes are reported
    sent = client.list_messages(camp.id, state="SENT").to_list()
    assert len(sent) == 5 and all(m.chip_id == chip.id for m in sent)


def test_wait_for_state_times_out_then_stops_at_another_final_state(
        client: WhagoClient, sandbox_url: str) -> None:
    chip = fast_chip(client, sandbox_url)
    camp = client.create_campaign("slow", templates=["hi"], chip_ids=[chip.id], settings=SLOW)
    client.import_contacts(camp.id, [p.replace(" ", "") for p in phones(3)])
    client.start_campaign(camp.id)

    with pytest.raises(errors.WaitTimeout) as exc:
        client.wait_for_state(camp.id, ["COMPLETED"], timeout=1.0, poll=0.1)
    assert exc.value.last is not None and exc.value.last.state == res.CAMPAIGN_STATE_RUNNING

    client.cancel_campaign(camp.id)
    with pytest.raises(errors.FailedPrecondition, match="ended CAMPAIGN_STATE_CANCELLED"):
        client.wait_for_state(camp.id, "COMPLETED", timeout=10, poll=0.1)


# --------------------------------------------------------------------------- retries


# Retries: tests/test_client_retries.py (gRPC's retry policy against a server that fails on purpose).


# --------------------------------------------------------------------------- CLI end to end


class Cli:
    """`python -m whago_client` as a subprocess, the way an operator runs it."""

    def __init__(self, target: str, api_key: str) -> None:
        self.env = service_env({"WHAGO_TARGET": target, "WHAGO_API_KEY": api_key})

    def __call__(self, *args: str, ok: bool = True, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([sys.executable, "-m", "whago_client", *args], env=self.env, cwd=REPO,
                           capture_output=True, text=True, timeout=timeout)
        assert "Traceback" not in r.stderr, r.stderr
        if ok:
            assert r.returncode == 0, f"{args}: exit {r.returncode}\n{r.stderr}"
        return r

    def json(self, *args: str) -> object:
        return json.loads(self("--json", *args).stdout)


@pytest.fixture()
def cli(target: str, api_key: str) -> Cli:
    return Cli(target, api_key)


def test_cli_register_create_import_start_watch_list(cli: Cli, sandbox_url: str, tmp_path: Path) -> None:
    chip = cli.json("chips", "register", "--phone", phones(1)[0].replace(" ", ""), "--waha-url", sandbox_url,
                    "--session", f"cli-{time.monotonic_ns()}", "--waha-key", SANDBOX_API_KEY,
                    "--interval-min", "0", "--interval-max", "0")
    assert isinstance(chip, dict) and chip["id"] and chip.get("waha_api_key", "") == ""  # write-only
    created = cli.json("campaigns", "create", "--name", "CLI campaign", "--text", "Oi", "--chip", chip["id"],
                       "--interval-min", "0", "--interval-max", "0")
    assert isinstance(created, dict) and created["state"] == "CAMPAIGN_STATE_DRAFT"
    cid = created["id"]

    nums = phones(4)
    csv_path = tmp_path / "contacts.csv"
    csv_path.write_text("phone,name\n" + "".join(f"{n},Contact {i}\n" for i, n in enumerate(nums))
                        + f"{nums[0]},dup\nnope,bad\n", encoding="utf-8")
    out = cli("campaigns", "import", cid, str(csv_path)).stdout
    assert out.splitlines()[0] == "imported=4 duplicates=1 rejected=1 total_contacts=4"
    assert "nope" in out

    out = cli("campaigns", "start", cid).stdout
    assert f"id:          {cid}" in out and "state:       RUNNING" in out

    watch = cli("campaigns", "watch", cid, "--max-wait", "60").stdout.splitlines()
    assert watch[-1] == f"campaign {cid} is COMPLETED"
    assert "COMPLETED" in watch[-2] and "sent=4" in watch[-2] and "(4/4 100%)" in watch[-2]

    listed = cli.json("campaigns", "list")
    assert isinstance(listed, list)
    mine = [c for c in listed if c["id"] == cid]
    assert len(mine) == 1 and mine[0]["state"] == "CAMPAIGN_STATE_COMPLETED" and mine[0]["sent_count"] == "4"

    table = cli("campaigns", "list").stdout.splitlines()
    assert table[0].split() == ["ID", "NAME", "STATE", "CONTACTS", "PENDING", "SENT", "FAILED", "CREATED"]
    row = next(line for line in table if line.startswith(cid))
    assert "COMPLETED" in row.split()

    messages = cli.json("campaigns", "messages", cid, "--state", "SENT")
    assert isinstance(messages, list) and len(messages) == 4


def test_cli_errors_are_one_line_with_field_lines_and_exit_1(cli: Cli, target: str, tmp_path: Path) -> None:
    r = cli("campaigns", "create", "--name", "", "--text", "hi", ok=False)
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.splitlines()
    assert lines[0].startswith("error: INVALID_ARGUMENT: ")
    assert [line.split(":")[0] for line in lines[1:]] == ["  campaign.name"]

    r = cli("campaigns", "get", "6f1b1c53-0000-4000-8000-000000000000", ok=False)
    assert r.returncode == 1 and r.stderr.startswith("error: NOT_FOUND: ") and len(r.stderr.splitlines()) == 1

    r = cli("--api-key", "wk_wrong", "campaigns", "list", ok=False)
    assert r.returncode == 1 and r.stderr.startswith("error: UNAUTHENTICATED: ")

    r = cli("campaigns", "import", "6f1b1c53-0000-4000-8000-000000000000", str(tmp_path / "nope.csv"), ok=False)
    assert r.returncode == 1 and r.stderr.startswith("error: ")

    ok_csv = tmp_path / "ok.csv"
    ok_csv.write_text("phone\n5511912345678\n", encoding="utf-8")
    r = cli("campaigns", "import", "6f1b1c53-0000-4000-8000-000000000000", str(ok_csv), ok=False)
    assert r.returncode == 1 and r.stderr.startswith("error: NOT_FOUND: ")  # a streamed call's error too

    r = cli("campaigns", "list", "--state", "BOGUS", ok=False)
    assert r.returncode == 2


def test_sdk_watch_webhooks_and_audit(client: WhagoClient, sandbox_url: str) -> None:
    """client.watch() streams a snapshot then every event to the end; client.webhooks manages an
    endpoint whose test event shows up in its deliveries; the audit pager lists what was done."""
    chip = fast_chip(client, sandbox_url)
    c = client.create_campaign("sdk watch", templates=["Oi {{name|cliente}}"], chip_ids=[chip.id], settings=FAST)
    client.import_contacts(c.id, phones(3, start=700))
    client.start_campaign(c.id)
    got = list(client.watch(c.id, timeout=60))
    assert got[0].WhichOneof("kind") == "snapshot"
    if len(got) == 1:  # it completed before the watch began: the snapshot says so, and the stream ends
        assert got[0].snapshot.campaign.state == res.CAMPAIGN_STATE_COMPLETED
    else:
        assert got[-1].event.type == "campaign.completed" and got[-1].event.data["sent_count"] == 3
        seqs = [m.event.seq for m in got[1:]]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    resumed = list(client.watch(c.id, after_seq=1, timeout=30))  # everything after "created"
    assert [m.event.type for m in resumed[1:]][-1] == "campaign.completed"
    with pytest.raises(errors.NotFound):
        list(client.watch("6f0c6bde-4a5c-4e0c-9d1e-1b2a3c4d5e6f", timeout=10))

    created = client.webhooks.create("http://127.0.0.1:9/hooks", event_types=["webhook.test"], description="sdk")
    assert created.secret.startswith("whsec_")
    eid = created.endpoint.endpoint_id
    assert [e.endpoint_id for e in client.webhooks.list()] == [eid]
    updated = client.webhooks.update(eid, description="renamed")
    assert updated.description == "renamed" and updated.event_types == ["webhook.test"] and updated.enabled
    client.webhooks.send_test(eid)
    assert [d.event.type for d in client.webhooks.list_deliveries(eid)] == ["webhook.test"]
    with pytest.raises(errors.InvalidArgument) as e:
        client.webhooks.create("http://10.0.0.1/hooks")
    assert [f for f, _ in e.value.field_violations] == ["endpoint.url"]
    client.webhooks.delete(eid)
    actions = [a.action for a in client.list_audit_events(entity_type="webhook", entity_id=eid)]
    assert actions == ["webhook.delete", "webhook.test", "webhook.update", "webhook.create"]
    assert [a.action for a in client.list_audit_events(entity_type="campaign", entity_id=c.id)][-1] == \
        "campaign.create"
