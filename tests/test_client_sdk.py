"""Client SDK and CLI pieces that need no campaign service: Pager, rich error parsing over a
real gRPC call, the lazy ImportContacts request stream, CSV reading, CLI parsing and output.

Where a server is needed, the test runs a tiny real gRPC server on 127.0.0.1 with a fake
servicer, so the real channel, metadata, deadlines and status details are exercised.
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from concurrent import futures
from datetime import datetime
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2, empty_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from whago_client import Pager, RetryPolicy, WhagoClient, errors
from whago_client.cli import build_parser, main, parse_args
from whago_client.client import (
    campaign_state,
    import_requests,
    message_state,
    read_contacts_csv,
    to_contact_input,
)

from whago.campaign.v1 import campaign_service_pb2 as cs
from whago.campaign.v1 import campaign_service_pb2_grpc as cs_grpc
from whago.campaign.v1 import chip_service_pb2 as chs
from whago.campaign.v1 import chip_service_pb2_grpc as chs_grpc
from whago.campaign.v1 import resources_pb2 as res

# --------------------------------------------------------------------------- Pager


class FakePages:
    """A page function over a list, recording every token it is asked for."""

    def __init__(self, items: list[int], size: int) -> None:
        self.items, self.size = items, size
        self.calls: list[str] = []

    def __call__(self, token: str) -> tuple[list[int], str]:
        self.calls.append(token)
        start = int(token or 0)
        end = start + self.size
        return self.items[start:end], (str(end) if end < len(self.items) else "")


def test_pager_iterates_all_pages_lazily() -> None:
    fetch = FakePages(list(range(25)), size=10)
    pager = Pager(fetch)
    assert fetch.calls == []  # nothing fetched before iteration
    it = iter(pager)
    assert [next(it) for _ in range(10)] == list(range(10))
    assert fetch.calls == [""]  # second page not requested until the first is used up
    assert next(it) == 10
    assert fetch.calls == ["", "10"]
    assert list(it) == list(range(11, 25))
    assert fetch.calls == ["", "10", "20"]


def test_pager_pages_first_and_restart() -> None:
    fetch = FakePages(list(range(25)), size=10)
    pager = Pager(fetch)
    assert [len(p) for p in pager.pages] == [10, 10, 5]
    assert pager.first() == 0
    assert pager.to_list() == list(range(25))  # each iteration starts from the first page


def test_pager_empty_and_exact_multiple() -> None:
    assert list(Pager(FakePages([], size=10))) == []
    fetch = FakePages(list(range(20)), size=10)
    assert len(list(Pager(fetch))) == 20
    assert fetch.calls == ["", "10"]
    assert Pager(FakePages([], size=3)).first() is None


def test_pager_refuses_a_repeated_token() -> None:
    pager: Pager[int] = Pager(lambda token: ([1], "same"))
    with pytest.raises(RuntimeError, match="repeated page token"):
        list(pager)


# --------------------------------------------------------------------------- errors over real gRPC


def _pack(msg: object) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)  # type: ignore[arg-type]
    return a


@pytest.fixture(scope="module")
def failing_server() -> Iterator[str]:
    """A real gRPC server whose methods abort with rich statuses."""

    def invalid(request: bytes, context: grpc.ServicerContext) -> bytes:
        bad = error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field="campaign.name", description="must not be empty"),
            error_details_pb2.BadRequest.FieldViolation(
                field="campaign.settings.pacing.interval_min_seconds", description="must be <= interval_max_seconds"
            ),
        ])
        info = error_details_pb2.ErrorInfo(
            reason="INVALID_CAMPAIGN", domain="whago.campaign.v1", metadata={"campaign_id": "c-1"}
        )
        retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=2))
        foreign = _pack(empty_pb2.Empty())
        status = status_pb2.Status(
            code=code_pb2.INVALID_ARGUMENT, message="campaign is invalid",
            details=[_pack(bad), _pack(info), _pack(retry), foreign],
        )
        context.abort_with_status(rpc_status.to_status(status))
        raise AssertionError("unreachable")

    def precondition(request: bytes, context: grpc.ServicerContext) -> bytes:
        info = error_details_pb2.ErrorInfo(reason="CAMPAIGN_RUNNING", domain="whago.campaign.v1")
        status = status_pb2.Status(
            code=code_pb2.FAILED_PRECONDITION, message="cancel the campaign before deleting it",
            details=[_pack(info)],
        )
        context.abort_with_status(rpc_status.to_status(status))
        raise AssertionError("unreachable")

    def plain(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.NOT_FOUND, "campaign c-9 not found")
        raise AssertionError("unreachable")

    def ident(b: bytes) -> bytes:
        return b

    handler = grpc.method_handlers_generic_handler("test.Failing", {
        name: grpc.unary_unary_rpc_method_handler(fn, request_deserializer=ident, response_serializer=ident)
        for name, fn in (("Invalid", invalid), ("Precondition", precondition), ("Plain", plain))
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


def _rpc_error(target: str, method: str) -> grpc.RpcError:
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(
            f"/test.Failing/{method}", request_serializer=bytes, response_deserializer=bytes
        )
        try:
            call(b"", timeout=10)
        except grpc.RpcError as e:
            return e
    raise AssertionError("the call did not fail")


def test_from_rpc_error_decodes_bad_request_and_error_info(failing_server: str) -> None:
    err = errors.from_rpc_error(_rpc_error(failing_server, "Invalid"))
    assert isinstance(err, errors.InvalidArgument)
    assert isinstance(err, errors.WhagoError)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.message == "campaign is invalid"
    assert err.field_violations == [
        ("campaign.name", "must not be empty"),
        ("campaign.settings.pacing.interval_min_seconds", "must be <= interval_max_seconds"),
    ]
    assert (err.reason, err.domain, err.metadata) == ("INVALID_CAMPAIGN", "whago.campaign.v1", {"campaign_id": "c-1"})
    assert err.retry_delay == 2.0
    kinds = [type(d).__name__ for d in err.details]
    assert kinds == ["BadRequest", "ErrorInfo", "RetryInfo", "Any"]  # a foreign detail stays packed
    assert isinstance(err.__cause__, grpc.RpcError)
    assert str(err).startswith("INVALID_ARGUMENT: campaign is invalid [INVALID_CAMPAIGN]\n  campaign.name:")


def test_from_rpc_error_failed_precondition_and_plain_status(failing_server: str) -> None:
    err = errors.from_rpc_error(_rpc_error(failing_server, "Precondition"))
    assert isinstance(err, errors.FailedPrecondition)
    assert err.reason == "CAMPAIGN_RUNNING"
    assert err.message == "cancel the campaign before deleting it"
    assert err.field_violations == []

    err = errors.from_rpc_error(_rpc_error(failing_server, "Plain"))
    assert type(err) is errors.NotFound
    assert (err.message, err.details, err.reason, err.metadata) == ("campaign c-9 not found", [], "", {})


def test_one_class_per_status_code() -> None:
    classes = {errors.error_class_for(code) for code in grpc.StatusCode if code != grpc.StatusCode.OK}
    assert len(classes) == 16
    for cls in classes:
        assert issubclass(cls, errors.WhagoError)
        assert errors.error_class_for(cls.code) is cls
    assert errors.error_class_for(grpc.StatusCode.UNAVAILABLE) is errors.Unavailable
    assert errors.error_class_for(grpc.StatusCode.ABORTED) is errors.Aborted
    assert issubclass(errors.WaitTimeout, errors.DeadlineExceeded)


def test_from_rpc_error_without_call_interface() -> None:
    err = errors.from_rpc_error(grpc.RpcError("weird"))
    assert type(err) is errors.Unknown


# --------------------------------------------------------------------------- import stream and CSV


def _write_csv(path: Path, rows: int, *, sep: str = ",", bom: bool = False) -> Path:
    with path.open("w", encoding="utf-8-sig" if bom else "utf-8", newline="") as f:
        f.write(sep.join(["phone", "name", "city"]) + "\n")
        for i in range(rows):
            f.write(sep.join([f"+55 11 9{i:08d}", f"Contact {i}", "São Paulo"]) + "\n")
    return path


class Counting:
    """An iterator that counts how many rows were pulled from it."""

    def __init__(self, inner: Iterator[cs.ContactInput]) -> None:
        self.inner, self.pulled = inner, 0

    def __iter__(self) -> Counting:
        return self

    def __next__(self) -> cs.ContactInput:
        row = next(self.inner)
        self.pulled += 1
        return row


def test_import_requests_chunks_a_10k_csv_lazily(tmp_path: Path) -> None:
    rows = Counting(read_contacts_csv(_write_csv(tmp_path / "c.csv", 10_000)))
    stream = import_requests("camp-1", rows, batch_size=1000, default_region="BR")
    assert rows.pulled == 0  # a generator: nothing read yet
    first = next(stream)
    assert rows.pulled == 1000  # exactly one chunk read, not the file
    assert len(first.contacts) == 1000
    assert (first.campaign_id, first.default_region) == ("camp-1", "BR")
    c = first.contacts[0]
    assert (c.phone, c.name, dict(c.variables)) == ("+55 11 900000000", "Contact 0", {"city": "São Paulo"})
    rest = list(stream)
    assert [len(r.contacts) for r in [first, *rest]] == [1000] * 10
    assert rows.pulled == 10_000
    assert all(r.campaign_id == "camp-1" for r in rest)
    assert rest[-1].contacts[-1].name == "Contact 9999"


def test_import_requests_partial_and_empty() -> None:
    reqs = list(import_requests("c", (f"55119{i:08d}" for i in range(2500)), batch_size=1000))
    assert [len(r.contacts) for r in reqs] == [1000, 1000, 500]
    empty = list(import_requests("c", [], batch_size=1000))
    assert len(empty) == 1 and empty[0].campaign_id == "c" and not empty[0].contacts
    with pytest.raises(ValueError):
        next(import_requests("c", [], batch_size=0))


def test_to_contact_input_accepts_dicts_strings_and_messages() -> None:
    c = to_contact_input({"Phone": " 5511999999999 ", "name": "Ana", "plan": "gold", "skip": None,
                          "variables": {"x": 1}})
    assert (c.phone, c.name, dict(c.variables)) == ("5511999999999", "Ana", {"plan": "gold", "x": "1"})
    assert to_contact_input(" 5511 ").phone == "5511"
    msg = cs.ContactInput(phone="1")
    assert to_contact_input(msg) is msg
    with pytest.raises(TypeError):
        to_contact_input(42)  # type: ignore[arg-type]


def test_read_contacts_csv_semicolons_bom_blank_lines(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "semi.csv", 3, sep=";", bom=True)
    with path.open("a", encoding="utf-8") as f:
        f.write("\n;;\n")
    contacts = list(read_contacts_csv(path))
    assert [c.name for c in contacts] == ["Contact 0", "Contact 1", "Contact 2"]
    assert dict(contacts[0].variables) == {"city": "São Paulo"}

    only_phone = list(read_contacts_csv(io.StringIO("Phone\n5511999999999\n")))
    assert [(c.phone, c.name) for c in only_phone] == [("5511999999999", "")]


def test_read_contacts_csv_checks_header_before_reading_rows(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("name,city\nAna,Rio\n")
    with pytest.raises(ValueError, match="no 'phone' column"):
        read_contacts_csv(path)  # raised at the call, not at first iteration
    with pytest.raises(FileNotFoundError):
        read_contacts_csv(tmp_path / "missing.csv")


def test_state_names() -> None:
    assert campaign_state("running") == res.CAMPAIGN_STATE_RUNNING
    assert campaign_state("CAMPAIGN_STATE_PAUSED") == res.CAMPAIGN_STATE_PAUSED
    assert campaign_state(res.CAMPAIGN_STATE_DRAFT) == res.CAMPAIGN_STATE_DRAFT
    assert message_state("FAILED") == res.MESSAGE_STATE_FAILED
    for bad in ("UNSPECIFIED", "nope", 99):
        with pytest.raises(ValueError, match="expected one of"):
            campaign_state(bad)


# --------------------------------------------------------------------------- CLI parsing


def test_cli_global_options_before_or_after_subcommand(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WHAGO_TARGET", raising=False)
    monkeypatch.setenv("WHAGO_API_KEY", "env-key")
    args = parse_args(["campaigns", "list", "--state", "RUNNING"])
    assert (args.target, args.api_key, args.json, args.state) == ("127.0.0.1:50051", "env-key", False, "RUNNING")
    args = parse_args(["--json", "--target", "h:1", "campaigns", "get", "abc"])
    assert (args.target, args.json, args.id) == ("h:1", True, "abc")
    args = parse_args(["campaigns", "get", "abc", "--json", "--api-key", "k", "--target", "h:2"])
    assert (args.target, args.api_key, args.json) == ("h:2", "k", True)
    monkeypatch.setenv("WHAGO_TARGET", "env:3")
    assert parse_args(["chips", "list"]).target == "env:3"


def test_cli_requires_an_api_key(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("WHAGO_API_KEY", raising=False)
    with pytest.raises(SystemExit) as exc:
        parse_args(["campaigns", "list"])
    assert exc.value.code == 2
    assert "WHAGO_API_KEY" in capsys.readouterr().err


def test_cli_create_and_other_subcommands_parse() -> None:
    p = build_parser()
    args = p.parse_args([
        "campaigns", "create", "--name", "Promo", "--text", "Hi {{name}}", "--text", "Hello {{name}}",
        "--chip", "a", "--chip", "b", "--interval-min", "30", "--interval-max", "60",
    ])
    assert (args.name, args.text, args.chip) == ("Promo", ["Hi {{name}}", "Hello {{name}}"], ["a", "b"])
    assert (args.interval_min, args.interval_max, args.max_failures) == (30.0, 60.0, 0)
    for verb in ("start", "pause", "resume", "cancel", "delete", "get", "watch", "messages"):
        assert p.parse_args(["campaigns", verb, "id-1"]).id == "id-1"
    args = p.parse_args(["campaigns", "import", "id-1", "c.csv"])
    assert (args.id, args.file, args.batch_size) == ("id-1", "c.csv", 1000)
    assert p.parse_args(["campaigns", "messages", "x", "--state", "failed"]).state == "failed"
    args = p.parse_args(["chips", "register", "--phone", "5511", "--waha-url", "http://w", "--session", "s",
                         "--waha-key", "k"])
    assert (args.phone, args.waha_url, args.session, args.waha_key) == ("5511", "http://w", "s", "k")
    for bad in (["campaigns", "list", "--state", "BOGUS"], ["campaigns", "create", "--name", "x"], ["campaigns"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)


# --------------------------------------------------------------------------- client over a fake server


class FakeCampaigns(cs_grpc.CampaignServiceServicer):
    """Just enough CampaignService to watch what the client sends."""

    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []
        self.create_ids: list[str] = []
        self.unavailable_left = 0
        self.imported: list[int] = []
        self.import_completed = threading.Event()
        self.states: list[res.CampaignState.ValueType] = []
        self.campaigns = [res.Campaign(id=f"c{i}", name=f"n{i}", state=res.CAMPAIGN_STATE_DRAFT) for i in range(7)]

    def _seen(self, context: grpc.ServicerContext) -> None:
        self.metadata.append({k: str(v) for k, v in context.invocation_metadata()})

    def CreateCampaign(self, request: cs.CreateCampaignRequest, context: grpc.ServicerContext) -> res.Campaign:
        self._seen(context)
        self.create_ids.append(request.request_id)
        if self.unavailable_left > 0:
            self.unavailable_left -= 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "database is down")
        if not request.campaign.name:
            status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message="invalid campaign", details=[
                _pack(error_details_pb2.BadRequest(field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field="campaign.name", description="required"),
                ])),
            ])
            context.abort_with_status(rpc_status.to_status(status))
        c = res.Campaign()
        c.CopyFrom(request.campaign)
        c.id, c.state = "new", res.CAMPAIGN_STATE_DRAFT
        return c

    def GetCampaign(self, request: cs.GetCampaignRequest, context: grpc.ServicerContext) -> res.Campaign:
        self._seen(context)
        if request.campaign_id == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "campaign missing not found")
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        return res.Campaign(id=request.campaign_id, state=state, total_contacts=10,
                            pending_count=0 if state == res.CAMPAIGN_STATE_COMPLETED else 5)

    def ListCampaigns(
        self, request: cs.ListCampaignsRequest, context: grpc.ServicerContext
    ) -> cs.ListCampaignsResponse:
        self._seen(context)
        start = int(request.page_token or 0)
        end = start + request.page_size
        return cs.ListCampaignsResponse(
            campaigns=self.campaigns[start:end], next_page_token=str(end) if end < len(self.campaigns) else ""
        )

    def ImportContacts(
        self, request_iterator: Iterator[cs.ImportContactsRequest], context: grpc.ServicerContext
    ) -> cs.ImportContactsResponse:
        self._seen(context)
        total = 0
        for req in request_iterator:
            assert req.campaign_id == "c1"
            self.imported.append(len(req.contacts))
            total += len(req.contacts)
        self.import_completed.set()
        return cs.ImportContactsResponse(imported_count=total, total_contacts=total)


class FakeChips(chs_grpc.ChipServiceServicer):
    def __init__(self) -> None:
        self.deletes = 0

    def DeleteChip(self, request: chs.DeleteChipRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        self.deletes += 1
        context.abort(grpc.StatusCode.UNAVAILABLE, "down")
        raise AssertionError("unreachable")


@pytest.fixture
def fake() -> Iterator[tuple[str, FakeCampaigns, FakeChips]]:
    # The fakes implement only what the tests call; the rest stay UNIMPLEMENTED.
    campaigns, chips = FakeCampaigns(), FakeChips()  # type: ignore[abstract]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    cs_grpc.add_CampaignServiceServicer_to_server(campaigns, server)
    chs_grpc.add_ChipServiceServicer_to_server(chips, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", campaigns, chips
    server.stop(None)


FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=0.05)


def test_client_sends_key_and_retries_unavailable_with_one_request_id(
    fake: tuple[str, FakeCampaigns, FakeChips],
) -> None:
    target, campaigns, _ = fake
    campaigns.unavailable_left = 2
    with WhagoClient(target, api_key="secret", retry=FAST_RETRY) as client:
        c = client.create_campaign("Promo", templates=["Hi {{name}}", res.MessageTemplate(media_id="m1")])
    assert (c.id, c.name, [t.text for t in c.templates]) == ("new", "Promo", ["Hi {{name}}", ""])
    assert len(campaigns.create_ids) == 3 and len(set(campaigns.create_ids)) == 1  # retries reuse the id
    assert all(m["authorization"] == "Bearer secret" for m in campaigns.metadata)


def test_client_gives_up_after_max_attempts_and_never_retries_delete_chip(
    fake: tuple[str, FakeCampaigns, FakeChips],
) -> None:
    target, campaigns, chips = fake
    campaigns.unavailable_left = 10
    with WhagoClient(target, api_key="k", retry=FAST_RETRY) as client:
        with pytest.raises(errors.Unavailable, match="database is down"):
            client.create_campaign("x")
        assert len(campaigns.create_ids) == 4
        with pytest.raises(errors.Unavailable):
            client.delete_chip("chip-1")
    assert chips.deletes == 1


def test_client_typed_errors_and_pager(fake: tuple[str, FakeCampaigns, FakeChips]) -> None:
    target, _, _ = fake
    with WhagoClient(target, api_key="k") as client:
        with pytest.raises(errors.InvalidArgument) as exc:
            client.create_campaign("")
        assert exc.value.field_violations == [("campaign.name", "required")]
        with pytest.raises(errors.NotFound):
            client.get_campaign("missing")
        pager = client.list_campaigns(state="DRAFT", page_size=3)
        assert [c.id for c in pager] == [f"c{i}" for i in range(7)]
        assert [len(p) for p in pager.pages] == [3, 3, 1]
        with pytest.raises(ValueError, match="timezone-aware"):
            client.create_campaign("x", schedule_time=datetime(2030, 1, 1))


def test_import_contacts_streams_through_grpc(tmp_path: Path, fake: tuple[str, FakeCampaigns, FakeChips]) -> None:
    target, campaigns, _ = fake
    path = _write_csv(tmp_path / "c.csv", 10_000)
    with WhagoClient(target, api_key="k") as client:
        resp = client.import_contacts("c1", read_contacts_csv(path), batch_size=1000)
    assert resp.imported_count == 10_000
    assert campaigns.imported == [1000] * 10


def test_import_contacts_source_error_cancels_the_call(fake: tuple[str, FakeCampaigns, FakeChips]) -> None:
    target, campaigns, _ = fake

    def rows() -> Iterator[str]:
        for i in range(1500):
            yield f"5511{i:09d}"
        raise ValueError("row 1501: bad encoding")

    with WhagoClient(target, api_key="k") as client, pytest.raises(ValueError, match="row 1501"):
        client.import_contacts("c1", rows(), batch_size=1000)
    # The server never sees a complete stream (it may not even have started the handler).
    assert not campaigns.import_completed.wait(1.0)


def test_wait_for_state_reports_changes(fake: tuple[str, FakeCampaigns, FakeChips]) -> None:
    target, campaigns, _ = fake
    campaigns.states = [res.CAMPAIGN_STATE_RUNNING] * 3 + [res.CAMPAIGN_STATE_COMPLETED]
    seen: list[int] = []
    with WhagoClient(target, api_key="k") as client:
        final = client.wait_for_state(
            "c1", "COMPLETED", timeout=10, poll=0.01, on_change=lambda c: seen.append(c.state)
        )
        assert final.state == res.CAMPAIGN_STATE_COMPLETED
        assert seen == [res.CAMPAIGN_STATE_RUNNING, res.CAMPAIGN_STATE_COMPLETED]
        campaigns.states = [res.CAMPAIGN_STATE_RUNNING]
        with pytest.raises(errors.WaitTimeout) as exc:
            client.wait_for_state("c1", ["COMPLETED"], timeout=0.05, poll=0.01)
        assert exc.value.last is not None and exc.value.last.state == res.CAMPAIGN_STATE_RUNNING
        campaigns.states = [res.CAMPAIGN_STATE_CANCELLED]
        with pytest.raises(errors.FailedPrecondition, match="ended CAMPAIGN_STATE_CANCELLED"):
            client.wait_for_state("c1", "COMPLETED", timeout=5, poll=0.01)


# --------------------------------------------------------------------------- CLI end to end on the fake


def test_cli_list_table_and_json(
    fake: tuple[str, FakeCampaigns, FakeChips], capsys: pytest.CaptureFixture[str]
) -> None:
    target, _, _ = fake
    assert main(["--target", target, "--api-key", "k", "campaigns", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "NAME", "STATE", "CONTACTS", "PENDING", "SENT", "FAILED", "CREATED"]
    assert len(lines) == 8 and lines[1].split()[:3] == ["c0", "n0", "DRAFT"]

    assert main(["--target", target, "--api-key", "k", "campaigns", "list", "--json", "--limit", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["id"] for d in data] == ["c0", "c1"]
    assert data[0]["state"] == "CAMPAIGN_STATE_DRAFT" and data[0]["sent_count"] == "0"


def test_cli_errors_are_one_line_with_field_violations(
    fake: tuple[str, FakeCampaigns, FakeChips], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    target, _, _ = fake
    base = ["--target", target, "--api-key", "k"]
    assert main([*base, "campaigns", "create", "--name", "", "--text", "hi"]) == 1
    err = capsys.readouterr().err
    assert err == "error: INVALID_ARGUMENT: invalid campaign\n  campaign.name: required\n"

    assert main([*base, "campaigns", "get", "missing"]) == 1
    assert capsys.readouterr().err == "error: NOT_FOUND: campaign missing not found\n"

    assert main([*base, "campaigns", "import", "c1", str(tmp_path / "nope.csv")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


def test_cli_watch_prints_progress_until_final(
    fake: tuple[str, FakeCampaigns, FakeChips], capsys: pytest.CaptureFixture[str]
) -> None:
    target, campaigns, _ = fake
    campaigns.states = [res.CAMPAIGN_STATE_RUNNING] * 2 + [res.CAMPAIGN_STATE_COMPLETED]
    assert main(["--target", target, "--api-key", "k", "campaigns", "watch", "c1", "--interval", "0.01"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "RUNNING" in lines[0] and "pending=5" in lines[0] and "(5/10 50%)" in lines[0]
    assert "COMPLETED" in lines[1] and "pending=0" in lines[1]
    assert lines[-1] == "campaign c1 is COMPLETED"
