"""Number verification: before a contact's first send the lane asks WAHA's check-exists through the
same chip; a number not on WhatsApp is SKIPPED (NOT_ON_WHATSAPP) and costs no credit, the chat id WAHA
answers is the one messaged (the ninth digit), and answers are cached per user for the next campaign."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.conftest import SANDBOX_API_KEY
from tests.helpers import Ops
from waha_sandbox.control import SandboxControl
from whago.campaign.v1 import campaign_service_pb2 as cs
from whago.campaign.v1 import credit_service_pb2 as crs
from whago.campaign.v1 import credit_service_pb2_grpc as crs_grpc
from whago.campaign.v1 import resources_pb2 as res

ABSENT = ["5511960000001", "5511960000002"]
NINTH = "5511960000003"  # its account is under the old 8-digit number
OLD = "551160000003"
PRESENT = ["5511960000004", "5511960000005", "5511960000006"]


@pytest.fixture()
def numbers(control: SandboxControl) -> Iterator[None]:
    before = control.config()
    control.configure(nonexistent_numbers=[*before["nonexistent_numbers"], *ABSENT],
                      whatsapp_ids={**before.get("whatsapp_ids", {}), NINTH: OLD})
    yield
    control.configure(nonexistent_numbers=before["nonexistent_numbers"], whatsapp_ids=before.get("whatsapp_ids", {}))


def run(api: Ops, chip: res.Chip, phones: list[str], **settings: object) -> res.Campaign:
    camp = api.campaign([chip], templates=("Oi {{name|cliente}}",), **settings)

    def reqs() -> Iterator[cs.ImportContactsRequest]:
        yield cs.ImportContactsRequest(campaign_id=camp.id, contacts=[cs.ContactInput(phone=p) for p in phones])
    api.campaigns.ImportContacts(reqs(), metadata=api.md)
    api.start(camp.id)
    return api.wait_final(camp.id)


def test_verification_is_on_by_default_for_new_campaigns(api: Ops) -> None:
    created = api.campaigns.CreateCampaign(cs.CreateCampaignRequest(campaign=res.Campaign(
        name="defaults", templates=[res.MessageTemplate(text="oi")])), metadata=api.md)
    assert created.settings.HasField("verify_numbers") and created.settings.verify_numbers
    off = api.campaign([], verify_numbers=False)
    assert off.settings.HasField("verify_numbers") and not off.settings.verify_numbers


def test_absent_numbers_are_skipped_uncharged_and_answers_are_cached(
        api: Ops, sandbox_url: str, control: SandboxControl, campaign_channel: object, numbers: None) -> None:
    credits = crs_grpc.CreditServiceStub(campaign_channel)  # type: ignore[arg-type]
    before = credits.GetCreditBalance(crs.GetCreditBalanceRequest(), metadata=api.md).available
    chip = api.chip(sandbox_url, SANDBOX_API_KEY)
    t0 = time.time()
    phones = [*ABSENT, NINTH, *PRESENT]
    done = run(api, chip, phones, verify_numbers=True)
    assert (done.sent_count, done.skipped_count, done.failed_count) == (4, 2, 0)
    by_phone = {m.phone: m for m in api.messages(done.id)}
    assert {p for p, m in by_phone.items() if m.state == res.MESSAGE_STATE_SKIPPED} == set(ABSENT)
    assert all(by_phone[p].failure_reason == "NOT_ON_WHATSAPP" for p in ABSENT)
    assert by_phone[NINTH].chat_id == f"{NINTH}@c.us"  # the contact as imported...
    sent_to = {m["chatId"] for m in control.messages(session=chip.waha_session)}
    assert sent_to == {f"{OLD}@c.us", *(f"{p}@c.us" for p in PRESENT)}  # ...messaged where WAHA said
    checks = control.requests(since=t0, session=chip.waha_session, path="check-exists")
    assert sorted(r["query"]["phone"] for r in checks) == sorted(phones)  # one check each, through this chip
    after = credits.GetCreditBalance(crs.GetCreditBalanceRequest(), metadata=api.md)
    assert before - after.available == 4 and after.reserved == 0  # the skipped cost nothing

    t1 = time.time()
    again = run(api, chip, phones, verify_numbers=True)  # same user: the answers are cached
    assert (again.sent_count, again.skipped_count) == (4, 2)
    assert control.requests(since=t1, session=chip.waha_session, path="check-exists") == []
    sent_again = [m["chatId"] for m in control.messages(session=chip.waha_session, since=t1)]
    assert sorted(sent_again) == sorted([f"{OLD}@c.us", *(f"{p}@c.us" for p in PRESENT)])


def test_without_verification_nothing_is_checked(api: Ops, sandbox_url: str, control: SandboxControl,
                                                 numbers: None) -> None:
    chip = api.chip(sandbox_url, SANDBOX_API_KEY)
    t0 = time.time()
    done = run(api, chip, [*ABSENT, *PRESENT], verify_numbers=False)
    assert done.sent_count == 5  # the sandbox delivers to anyone; WhatsApp would not
    assert control.requests(since=t0, session=chip.waha_session, path="check-exists") == []
