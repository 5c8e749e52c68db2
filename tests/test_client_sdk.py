"""Client SDK and CLI pieces that need no server: Pager over a plain function, typed errors built
from a google.rpc.Status, the lazy ImportContacts request stream, CSV reading, CLI parsing and
error printing. Everything that talks gRPC runs against the real campaign_service in
test_client_e2e.py (no fake servicers).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2, empty_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from whago_client import Pager, WhagoClient, errors
from whago_client.cli import build_parser, parse_args, print_error
from whago_client.inputs import (
    campaign_state,
    import_requests,
    message_state,
    read_contacts_csv,
    to_contact_input,
)

from whago.campaign.v1 import campaign_service_pb2 as cs
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


# --------------------------------------------------------------------------- errors from a google.rpc.Status


def _pack(msg: Message) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def test_build_error_decodes_bad_request_error_info_and_retry_info() -> None:
    """The decoding of every detail kind, from a Status built like the server builds it (the same
    decoding on a real server's error is in test_client_e2e)."""
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
    status = status_pb2.Status(
        code=code_pb2.INVALID_ARGUMENT, message="campaign is invalid",
        details=[_pack(bad), _pack(info), _pack(retry), _pack(empty_pb2.Empty())],
    )
    # What travels on the wire: the code plus the serialized Status in the trailers.
    wire = rpc_status.to_status(status)
    (key, value), = wire.trailing_metadata
    assert key == "grpc-status-details-bin"
    decoded = status_pb2.Status.FromString(value)

    err = errors.build_error(wire.code, decoded.message, decoded.details)
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
    assert str(err).startswith("INVALID_ARGUMENT: campaign is invalid [INVALID_CAMPAIGN]\n  campaign.name:")


def test_build_error_without_details_and_with_a_corrupt_detail() -> None:
    err = errors.build_error(grpc.StatusCode.NOT_FOUND, "campaign c-9 not found")
    assert type(err) is errors.NotFound
    assert (err.message, err.details, err.reason, err.metadata, err.retry_delay) == (
        "campaign c-9 not found", [], "", {}, None)
    corrupt = any_pb2.Any(type_url="type.googleapis.com/google.rpc.ErrorInfo", value=b"\xff\xff")
    err = errors.build_error(grpc.StatusCode.FAILED_PRECONDITION, "x", [corrupt])
    assert type(err) is errors.FailedPrecondition
    assert err.reason == "" and err.details == [corrupt]  # kept packed, not a crash


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


# --------------------------------------------------------------------------- client-side checks (no RPC made)


def test_naive_schedule_time_is_refused_before_any_rpc() -> None:
    # Nothing listens on port 1: the ValueError proves no call was attempted.
    with WhagoClient("127.0.0.1:1", api_key="k") as client, pytest.raises(ValueError, match="timezone-aware"):
        client.create_campaign("x", schedule_time=datetime(2030, 1, 1))


def test_print_error_is_code_message_then_one_line_per_field() -> None:
    out = io.StringIO()
    print_error(errors.InvalidArgument("invalid campaign", field_violations=[
        ("campaign.name", "required"), ("campaign.templates[0].text", "must not be blank")]), out)
    assert out.getvalue() == (
        "error: INVALID_ARGUMENT: invalid campaign\n  campaign.name: required\n"
        "  campaign.templates[0].text: must not be blank\n"
    )
