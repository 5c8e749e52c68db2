# ruff: noqa: F811  (pytest fixtures imported from test_campaign_support)
"""ChipService: register/get/list/delete, the WAHA key never returned, pagination, deletion
refused while a RUNNING or PAUSED campaign uses the chip."""

from __future__ import annotations

import json

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import field_mask_pb2
from whago_client import WhagoClient
from whago_client.cli import main as cli_main

from campaign_service.secrets_box import SecretBox
from devstack.procs import ServiceProcess
from tests.conftest import SANDBOX_API_KEY, SECRETS_ENV
from tests.helpers import Api, phones
from tests.test_campaign_support import api, count, engine, fails, live, other_api, row, running  # noqa: F401
from whago.campaign.v1 import chip_service_pb2 as chs
from whago.campaign.v1 import resources_pb2 as res


def register(api: Api, phone: str = "+55 (11) 91234-5678", session: str = "default", **fields: object) -> res.Chip:
    return api.chips.RegisterChip(chs.RegisterChipRequest(chip=res.Chip(
        phone=phone, waha_base_url="http://127.0.0.1:3000/", waha_session=session, waha_api_key="secret-key",
        **fields)), metadata=api.md)  # type: ignore[arg-type]


def test_register_normalizes_and_never_returns_the_key(api: Api, engine: sa.Engine) -> None:
    chip = register(api, display_name="main", proxy_label="px1",
                    pacing=res.Pacing(interval_min_seconds=5, interval_max_seconds=9, max_per_day=100))
    assert chip.phone == "5511912345678" and chip.waha_base_url == "http://127.0.0.1:3000"
    assert chip.waha_api_key == "" and chip.state == res.CHIP_STATE_ACTIVE
    assert chip.pacing.interval_min_seconds == 5 and chip.pacing.max_per_day == 100
    got = api.chips.GetChip(chs.GetChipRequest(chip_id=chip.id), metadata=api.md)
    assert got == chip and got.waha_api_key == ""
    listed = api.chips.ListChips(chs.ListChipsRequest(), metadata=api.md).chips
    assert [c.waha_api_key for c in listed] == [""]
    stored = row(engine, "chips", chip.id)["waha_api_key"]  # type: ignore[index]
    assert stored.startswith("fernet:") and "secret-key" not in stored  # sealed at rest
    assert SecretBox(SECRETS_ENV["WHAGO_SECRET_KEYS"]).open(stored) == "secret-key"


def test_list_chips_paginates_newest_first(api: Api) -> None:
    made = [register(api, phone=f"+55 11 91234-567{i}", session=f"s{i}").id for i in range(5)]
    seen: list[str] = []
    token = ""
    while True:
        r = api.chips.ListChips(chs.ListChipsRequest(page_size=2, page_token=token), metadata=api.md)
        seen += [c.id for c in r.chips]
        token = r.next_page_token
        if not token:
            break
    assert seen == made[::-1]


def test_delete_chip_and_tenancy(api: Api, other_api: Api) -> None:
    chip = register(api)
    f = fails(other_api.chips.GetChip, chs.GetChipRequest(chip_id=chip.id), metadata=other_api.md)
    assert f.code == grpc.StatusCode.NOT_FOUND
    f = fails(other_api.chips.DeleteChip, chs.DeleteChipRequest(chip_id=chip.id), metadata=other_api.md)
    assert f.code == grpc.StatusCode.NOT_FOUND
    assert other_api.chips.ListChips(chs.ListChipsRequest(), metadata=other_api.md).chips == []
    api.chips.DeleteChip(chs.DeleteChipRequest(chip_id=chip.id), metadata=api.md)
    f = fails(api.chips.GetChip, chs.GetChipRequest(chip_id=chip.id), metadata=api.md)
    assert f.code == grpc.StatusCode.NOT_FOUND


def test_chip_of_running_campaign_cannot_be_deleted(api: Api, live: str, engine: sa.Engine) -> None:
    c = running(api, live, contacts=4, n_chips=1)
    chip_id = api.get(c.id).chip_ids[0]
    f = fails(api.chips.DeleteChip, chs.DeleteChipRequest(chip_id=chip_id), metadata=api.md)
    assert f.code == grpc.StatusCode.FAILED_PRECONDITION and f.reason == "CHIP_IN_USE"
    assert row(engine, "chips", chip_id) is not None
    api.cancel(c.id)
    api.chips.DeleteChip(chs.DeleteChipRequest(chip_id=chip_id), metadata=api.md)
    assert count(engine, "SELECT count(*) FROM chips WHERE id = :i", i=chip_id) == 0


def test_register_chip_request_id_replays(api: Api) -> None:
    req = chs.RegisterChipRequest(chip=res.Chip(phone="+5511912345678", waha_base_url="http://127.0.0.1:1",
                                                waha_session="s"), request_id="chip-once")
    a = api.chips.RegisterChip(req, metadata=api.md)
    b = api.chips.RegisterChip(req, metadata=api.md)
    assert a == b
    assert len(api.chips.ListChips(chs.ListChipsRequest(), metadata=api.md).chips) == 1


def test_one_whatsapp_number_is_one_chip(api: Api, other_api: Api) -> None:
    """Pacing is per chip: a second chip for the same number (same phone, or the same WAHA server
    and session) would let campaigns send through it at twice its pace. Refused, naming the chip."""
    first = register(api)
    f = fails(api.chips.RegisterChip, chs.RegisterChipRequest(chip=res.Chip(
        phone="5511912345678", waha_base_url="http://localhost:3000", waha_session="other")), metadata=api.md)
    assert f.code == grpc.StatusCode.ALREADY_EXISTS and f.reason == "CHIP_ALREADY_REGISTERED"
    assert first.id in f.message
    f = fails(api.chips.RegisterChip, chs.RegisterChipRequest(chip=res.Chip(
        phone="+55 11 99999-0000", waha_base_url="http://127.0.0.1:3000//", waha_session="default")), metadata=api.md)
    assert f.code == grpc.StatusCode.ALREADY_EXISTS and f.reason == "CHIP_ALREADY_REGISTERED"
    assert len(api.chips.ListChips(chs.ListChipsRequest(), metadata=api.md).chips) == 1
    register(api, phone="+55 11 99999-0000", session="second")  # another number on the same server: fine
    register(other_api)  # another account's chips are its own business
    api.chips.DeleteChip(chs.DeleteChipRequest(chip_id=first.id), metadata=api.md)
    register(api)  # deleted: the number can be registered again


def test_waha_api_key_with_a_line_break_is_invalid(api: Api) -> None:
    f = fails(api.chips.RegisterChip, chs.RegisterChipRequest(chip=res.Chip(
        phone="+5511912345678", waha_base_url="http://127.0.0.1:1", waha_session="s", waha_api_key="k\r\nX-Evil: 1")),
        metadata=api.md)
    assert f.code == grpc.StatusCode.INVALID_ARGUMENT and "chip.waha_api_key" in f.fields


# -- UpdateChip ------------------------------------------------------------------------------------

def update(api: Api, chip: res.Chip, *paths: str, request_id: str = "") -> res.Chip:
    return api.chips.UpdateChip(chs.UpdateChipRequest(chip=chip, update_mask=field_mask_pb2.FieldMask(
        paths=list(paths)), request_id=request_id), metadata=api.md)


def test_update_chip_writes_the_masked_fields_only_and_keeps_the_key_sealed(api: Api, engine: sa.Engine) -> None:
    chip = register(api, display_name="main", pacing=res.Pacing(interval_min_seconds=5, interval_max_seconds=9))
    out = update(api, res.Chip(id=chip.id, display_name="renamed", proxy_label="ignored", waha_api_key="new-key",
                               pacing=res.Pacing(interval_min_seconds=20, interval_max_seconds=30)),
                 "display_name", "waha_api_key", "pacing", request_id="upd-1")
    assert (out.display_name, out.proxy_label, out.waha_api_key) == ("renamed", "", "")
    assert (out.pacing.interval_min_seconds, out.pacing.interval_max_seconds) == (20, 30)
    assert out.phone == chip.phone and out.update_time.ToDatetime() >= chip.update_time.ToDatetime()
    assert api.chips.GetChip(chs.GetChipRequest(chip_id=chip.id), metadata=api.md) == out
    stored = row(engine, "chips", chip.id)["waha_api_key"]  # type: ignore[index]
    assert stored.startswith("fernet:") and SecretBox(SECRETS_ENV["WHAGO_SECRET_KEYS"]).open(stored) == "new-key"
    # replayed by request_id; an empty mask writes what is set (AIP-134)
    again = update(api, res.Chip(id=chip.id, display_name="other"), "display_name", request_id="upd-1")
    assert again.display_name == "renamed"
    assert api.chips.UpdateChip(chs.UpdateChipRequest(chip=res.Chip(id=chip.id, proxy_label="px2")),
                                metadata=api.md).proxy_label == "px2"
    # warm-up: off, then the default plan back; the audit log names the paths, never the key
    assert update(api, res.Chip(id=chip.id, warmup=res.WarmupPlan(enabled=False)), "warmup").warmup.enabled is False
    back = update(api, res.Chip(id=chip.id), "warmup").warmup
    assert back.enabled and back.start_daily_cap > 0
    logged = count(engine, "SELECT count(*) FROM audit_log WHERE entity_id = :i AND action = 'chip.update'"
                   " AND extra_data::text NOT LIKE '%new-key%'", i=chip.id)
    assert logged == 4


def test_update_chip_refuses_bad_input_and_leaves_the_chip_as_it_was(api: Api, other_api: Api) -> None:
    chip = register(api, display_name="main")
    register(api, phone="+55 11 99999-0000", session="taken")
    cases: list[tuple[res.Chip, list[str], grpc.StatusCode, str]] = [
        (res.Chip(id=chip.id, phone="5511900000000"), ["phone"], grpc.StatusCode.INVALID_ARGUMENT, "update_mask"),
        (res.Chip(id=chip.id, state=res.CHIP_STATE_RESTRICTED), ["state"], grpc.StatusCode.INVALID_ARGUMENT,
         "update_mask"),
        (res.Chip(id=chip.id), [], grpc.StatusCode.INVALID_ARGUMENT, "update_mask"),
        (res.Chip(id=chip.id, pacing=res.Pacing(interval_min_seconds=9, interval_max_seconds=1)), ["pacing"],
         grpc.StatusCode.INVALID_ARGUMENT, "chip.pacing.interval_min_seconds"),
        (res.Chip(id=chip.id, waha_base_url="http://169.254.169.254"), ["waha_base_url"],
         grpc.StatusCode.INVALID_ARGUMENT, "chip.waha_base_url"),
        (res.Chip(id=chip.id, waha_session="bad session!"), ["waha_session"], grpc.StatusCode.INVALID_ARGUMENT,
         "chip.waha_session"),
        (res.Chip(id="not-a-uuid", display_name="x"), ["display_name"], grpc.StatusCode.INVALID_ARGUMENT, "chip.id"),
        (res.Chip(id=chip.id, waha_session="taken"), ["waha_session"], grpc.StatusCode.ALREADY_EXISTS, ""),
    ]
    for patch, paths, code, field in cases:
        f = fails(api.chips.UpdateChip, chs.UpdateChipRequest(chip=patch, update_mask=field_mask_pb2.FieldMask(
            paths=paths)), metadata=api.md)
        assert f.code == code, (paths, f.code, f.message)
        if field:
            assert field in f.fields, (paths, f.fields)
    f = fails(other_api.chips.UpdateChip, chs.UpdateChipRequest(chip=res.Chip(id=chip.id, display_name="mine"),
                                                                update_mask=field_mask_pb2.FieldMask(
                                                                    paths=["display_name"])), metadata=other_api.md)
    assert f.code == grpc.StatusCode.NOT_FOUND
    assert api.chips.GetChip(chs.GetChipRequest(chip_id=chip.id), metadata=api.md) == chip


def test_pacing_of_a_running_chip_changes_between_pause_and_resume(api: Api, stack: dict[str, ServiceProcess],
                                                                    sandbox_url: str) -> None:
    """A lane was built from the chip at Start: its pacing changes only while no RUNNING campaign
    uses it, and Resume sends at the new pace."""
    chip = api.chip(sandbox_url, SANDBOX_API_KEY, interval=(3600.0, 3600.0))
    c = api.campaign([chip])
    api.import_phones(c.id, phones(3))
    api.start(c.id)
    api.wait(c.id, lambda x: x.sent_count == 1)  # then an hour's wait
    zero = res.Pacing(interval_min_seconds=0, interval_max_seconds=0)
    fast = res.Chip(id=chip.id, display_name="renamed while running", pacing=zero)
    f = fails(api.chips.UpdateChip, chs.UpdateChipRequest(chip=fast, update_mask=field_mask_pb2.FieldMask(
        paths=["pacing"])), metadata=api.md)
    assert f.code == grpc.StatusCode.FAILED_PRECONDITION and f.reason == "CHIP_IN_USE" and "pause" in f.message
    assert update(api, fast, "display_name").display_name == "renamed while running"  # any time
    api.pause(c.id)
    assert update(api, fast, "pacing").pacing == zero
    api.resume(c.id)
    done = api.wait_final(c.id, timeout=60)
    assert (done.state, done.sent_count) == (res.CAMPAIGN_STATE_COMPLETED, 3)


def test_sdk_and_cli_update_chip(api: Api, api_key: str, ports: dict[str, int],
                                 capsys: pytest.CaptureFixture[str]) -> None:
    chip = register(api, pacing=res.Pacing(interval_min_seconds=5, interval_max_seconds=9, max_per_day=100))
    target = f"127.0.0.1:{ports['campaign']}"
    with WhagoClient(target, api_key=api_key) as client:
        out = client.update_chip(chip.id, proxy_label="px-9", warmup=res.WarmupPlan(enabled=False))
        assert (out.proxy_label, out.warmup.enabled, out.display_name) == ("px-9", False, chip.display_name)
        with pytest.raises(ValueError):
            client.update_chip(chip.id)
    capsys.readouterr()
    assert cli_main(["--target", target, "--api-key", api_key, "--json", "chips", "update", chip.id,
                     "--name", "from the cli", "--interval-min", "7", "--interval-max", "12"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["display_name"] == "from the cli"
    # the pacing options given change; max_per_day stays
    assert got["pacing"] == {"interval_min_seconds": 7.0, "interval_max_seconds": 12.0, "max_per_day": 100}
