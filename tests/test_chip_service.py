# ruff: noqa: F811  (pytest fixtures imported from test_campaign_support)
"""ChipService: register/get/list/delete, the WAHA key never returned, pagination, deletion
refused while a RUNNING or PAUSED campaign uses the chip."""

from __future__ import annotations

import grpc
import sqlalchemy as sa

from campaign_service.secrets_box import SecretBox
from tests.conftest import SECRETS_ENV
from tests.helpers import Api
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
