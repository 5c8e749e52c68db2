# ruff: noqa: F811  (pytest fixtures imported from test_campaign_support)
"""ImportContacts: E.164 normalization, chat ids, duplicates merged, invalid rows reported with
their row numbers, valid rows kept; only into DRAFT/SCHEDULED campaigns."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import sqlalchemy as sa

from tests.helpers import Api, phones
from tests.test_campaign_support import api, count, draft, engine, fails, live, running  # noqa: F401
from whago.campaign.v1 import campaign_service_pb2 as cs
from whago.campaign.v1 import resources_pb2 as res


def stream(campaign_id: str, rows: list[tuple[str, str]], batch: int = 3, region: str = "",
           variables: dict[str, str] | None = None) -> Iterator[cs.ImportContactsRequest]:
    for i in range(0, len(rows), batch):
        yield cs.ImportContactsRequest(
            campaign_id=campaign_id if i == 0 else "", default_region=region if i == 0 else "",
            contacts=[cs.ContactInput(phone=p, name=n, variables=variables or {}) for p, n in rows[i:i + batch]])


def all_contacts(api: Api, campaign_id: str, page_size: int = 1000) -> list[res.Contact]:
    out: list[res.Contact] = []
    token = ""
    while True:
        r = api.campaigns.ListContacts(cs.ListContactsRequest(campaign_id=campaign_id, page_size=page_size,
                                                              page_token=token), metadata=api.md)
        out += r.contacts
        token = r.next_page_token
        if not token:
            return out


def test_normalizes_merges_duplicates_and_reports_rejects(api: Api) -> None:
    c = draft(api)
    rows = [
        ("+55 11 91234-5678", "Ana"),           # 1 E.164 with formatting
        ("(11) 91234-5678", "Ana again"),       # 2 same number, national format -> duplicate
        ("11 98765 4321", "Bia"),               # 3 national, default region BR
        ("not a phone", "Bad"),                 # 4 rejected
        ("+1 650-253-0000", "Carl"),            # 5 US number
        ("123", "Short"),                       # 6 rejected
        ("5511987654321", "Bia twice"),         # 7 digits with country code -> duplicate of 3
        ("", "Empty"),                          # 8 rejected
    ]
    r = api.campaigns.ImportContacts(stream(c.id, rows), metadata=api.md)
    assert (r.imported_count, r.duplicate_count, r.rejected_count, r.total_contacts) == (3, 2, 3, 3)
    assert [x.row for x in r.rejected] == [4, 6, 8]
    assert [x.phone for x in r.rejected] == ["not a phone", "123", ""]
    assert all(x.reason for x in r.rejected)
    got = {x.phone: x for x in all_contacts(api, c.id)}
    assert set(got) == {"5511912345678", "5511987654321", "16502530000"}
    assert got["5511912345678"].chat_id == "5511912345678@c.us"
    assert got["5511912345678"].name == "Ana"  # first row wins
    assert api.get(c.id).total_contacts == 3


def test_second_import_merges_with_existing_contacts(api: Api) -> None:
    c = draft(api)
    nums = phones(5)
    api.import_phones(c.id, nums[:3])
    r = api.import_phones(c.id, nums[1:])
    assert (r.imported_count, r.duplicate_count, r.total_contacts) == (2, 2, 5)
    assert len(all_contacts(api, c.id, page_size=2)) == 5


def test_default_region_and_variables(api: Api) -> None:
    c = draft(api)
    r = api.campaigns.ImportContacts(stream(c.id, [("020 7946 0958", "London"), ("07911 123456", "Mob")],
                                            region="GB", variables={"city": "tab\there", "q": 'x"y\\z'}),
                                     metadata=api.md)
    assert r.imported_count == 2 and r.rejected_count == 0
    contacts = all_contacts(api, c.id)
    assert {x.phone for x in contacts} == {"442079460958", "447911123456"}
    assert dict(contacts[0].variables) == {"city": "tab\there", "q": 'x"y\\z'}
    f = fails(api.campaigns.ImportContacts, stream(c.id, [("1", "x")], region="XX"), metadata=api.md)
    assert f.code == grpc.StatusCode.INVALID_ARGUMENT and f.fields == ["default_region"]


def test_names_with_special_characters_survive_copy(api: Api) -> None:
    c = draft(api)
    names = ["tab\tname", "new\nline", "back\\slash", "ção ñ 😀", "\\N", "nul\x00byte"]
    rows = [(p, n) for p, n in zip(phones(len(names)), names, strict=True)]
    api.campaigns.ImportContacts(stream(c.id, rows, variables={"k\x00": "v\x00\\u0000"}), metadata=api.md)
    got = all_contacts(api, c.id)
    assert sorted(x.name for x in got) == sorted(n.replace("\x00", "") for n in names)
    assert dict(got[0].variables) == {"k": "v\\u0000"}


def test_import_into_running_campaign_is_failed_precondition(api: Api, live: str, engine: sa.Engine) -> None:
    c = running(api, live, contacts=6)
    f = fails(api.import_phones, c.id, phones(2))
    assert f.code == grpc.StatusCode.FAILED_PRECONDITION and f.reason == "INVALID_STATE_TRANSITION"
    assert f.metadata["current_state"] == "CAMPAIGN_STATE_RUNNING"
    assert count(engine, "SELECT count(*) FROM campaign_contacts WHERE campaign_id = :c", c=c.id) == 6
    api.cancel(c.id)


def test_stream_must_name_one_campaign(api: Api) -> None:
    a, b = draft(api), draft(api)

    def mixed() -> Iterator[cs.ImportContactsRequest]:
        yield cs.ImportContactsRequest(campaign_id=a.id, contacts=[cs.ContactInput(phone=phones(1)[0])])
        yield cs.ImportContactsRequest(campaign_id=b.id, contacts=[cs.ContactInput(phone=phones(1)[0])])

    f = fails(api.campaigns.ImportContacts, mixed(), metadata=api.md)
    assert f.code == grpc.StatusCode.INVALID_ARGUMENT and f.fields == ["campaign_id"]
    assert api.get(a.id).total_contacts == 0  # one transaction: nothing kept
    f = fails(api.campaigns.ImportContacts, iter([cs.ImportContactsRequest()]), metadata=api.md)
    assert f.code == grpc.StatusCode.INVALID_ARGUMENT and f.fields == ["campaign_id"]


def test_import_10k_rows_in_batches(api: Api) -> None:
    c = draft(api)
    nums = phones(10_000)
    r = api.import_phones(c.id, nums + nums[:100], batch=2000)
    assert (r.imported_count, r.duplicate_count, r.total_contacts) == (10_000, 100, 10_000)
