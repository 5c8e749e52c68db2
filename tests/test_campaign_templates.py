"""Templates through the API: validation at Create/Update/Start (naming template, position and
problem; nothing half-written), PreviewMessages, and the send rendering exactly what the preview
showed (deterministic per contact), with the variant recorded per message."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from google.rpc import error_details_pb2

from tests.conftest import SANDBOX_API_KEY
from tests.helpers import Ops, error_details, field_violations, phones
from waha_sandbox.control import SandboxControl
from whago.campaign.v1 import campaign_service_pb2 as cs
from whago.campaign.v1 import resources_pb2 as res

SPIN = "{Oi|Olá|E aí} {{first_name}}, {a oferta|o desconto} de {{city|sua cidade}} {chegou|está aqui}!"


def reason(err: grpc.RpcError) -> str:
    infos = error_details(err, error_details_pb2.ErrorInfo)
    return infos[0].reason if infos else ""


def import_people(api: Ops, campaign_id: str, rows: list[tuple[str, str, dict[str, str]]]) -> None:
    def reqs() -> Iterator[cs.ImportContactsRequest]:
        yield cs.ImportContactsRequest(campaign_id=campaign_id, contacts=[
            cs.ContactInput(phone=p, name=n, variables=v) for p, n, v in rows])
    api.campaigns.ImportContacts(reqs(), metadata=api.md)


def test_create_refuses_broken_templates_naming_index_and_position(api: Ops) -> None:
    with pytest.raises(grpc.RpcError) as e:
        api.campaign([], templates=("fine {{name}}", "Oi {amigo|", "{{city|}}"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(e.value) == [
        ("campaign.templates[1].text", "position 3: '{' without a closing '}' (write \\{ for the character)"),
        ("campaign.templates[2].text", "position 0: {{city|}}: empty default (drop the '|' or give a value)"),
    ]
    listed = api.campaigns.ListCampaigns(cs.ListCampaignsRequest(), metadata=api.md)
    assert list(listed.campaigns) == []  # nothing half-written


def test_variables_are_checked_against_imported_columns_at_update_and_start(api: Ops, sandbox_url: str) -> None:
    chip = api.chip(sandbox_url, SANDBOX_API_KEY)
    camp = api.campaign([chip], templates=("Oi {{name}} de {{city}}",))
    import_people(api, camp.id, [("+5511988880001", "Ana", {"city": "Recife"}),
                                 ("+5511988880002", "", {"city": "Olinda"})])
    with pytest.raises(grpc.RpcError) as e:  # {{cpf}}: not a column, no default
        api.campaigns.UpdateCampaign(cs.UpdateCampaignRequest(
            campaign=res.Campaign(id=camp.id, templates=[res.MessageTemplate(text="Oi {{cpf}}")]),
            update_mask={"paths": ["templates"]}), metadata=api.md)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(e.value)[0][0] == "campaign.templates[0].text"
    assert "unknown variable {{cpf}}" in field_violations(e.value)[0][1]
    with pytest.raises(grpc.RpcError) as e:  # the second contact has no name, and {{name}} no default
        api.start(camp.id)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and reason(e.value) == "MISSING_VARIABLE_VALUES"
    assert "1 contact(s) have no name" in (e.value.details() or "")
    after = api.get(camp.id)
    assert after.state == res.CAMPAIGN_STATE_DRAFT and after.pending_count == 0  # nothing half-written
    api.campaigns.UpdateCampaign(cs.UpdateCampaignRequest(
        campaign=res.Campaign(id=camp.id, templates=[res.MessageTemplate(text="Oi {{name|cliente}} de {{city}}")]),
        update_mask={"paths": ["templates"]}), metadata=api.md)
    api.start(camp.id)
    assert api.wait_final(camp.id).sent_count == 2


def test_preview_shows_the_variety_and_the_send_matches_it(api: Ops, sandbox_url: str,
                                                          control: SandboxControl) -> None:
    chip = api.chip(sandbox_url, SANDBOX_API_KEY)
    camp = api.campaign([chip], templates=(SPIN, "Promo {{name}}: {hoje|agora}"))
    api.campaigns.UpdateCampaign(cs.UpdateCampaignRequest(
        campaign=res.Campaign(id=camp.id, templates=[res.MessageTemplate(text=SPIN, weight=3),
                                                     res.MessageTemplate(text="Promo {{name}}: {hoje|agora}")]),
        update_mask={"paths": ["templates"]}), metadata=api.md)
    numbers = phones(30, start=900)
    import_people(api, camp.id, [(p, f"Pessoa {i} Silva", {"city": "Recife"} if i % 2 else {})
                                 for i, p in enumerate(numbers)])
    preview = api.campaigns.PreviewMessages(cs.PreviewMessagesRequest(campaign_id=camp.id, count=30),
                                            metadata=api.md)
    assert len(preview.previews) == 30
    assert preview.distinct_texts >= 10 and preview.variant_count == 3 * 2 * 2 + 2
    assert {p.template_index for p in preview.previews} == {0, 1}
    assert all("{" not in p.text and "}" not in p.text for p in preview.previews)
    by_phone = {p.phone: p for p in preview.previews}
    again = api.campaigns.PreviewMessages(cs.PreviewMessagesRequest(campaign_id=camp.id, count=30), metadata=api.md)
    assert [p.text for p in again.previews] == [p.text for p in preview.previews]  # deterministic

    api.start(camp.id)
    api.wait_final(camp.id)
    sent = {m["chatId"].split("@")[0]: m["text"] for m in control.messages(session=chip.waha_session)}
    assert {phone: p.text for phone, p in by_phone.items()} == sent  # the send is the preview
    for m in api.messages(camp.id):
        assert (m.template_index, m.variant) == (by_phone[m.phone].template_index, by_phone[m.phone].variant)

    adhoc = api.campaigns.PreviewMessages(cs.PreviewMessagesRequest(campaign_id=camp.id, contacts=[
        cs.ContactInput(phone="+55 11 97777-0000", name="Zé", variables={"city": "Natal"})]), metadata=api.md)
    assert adhoc.previews[0].phone == "5511977770000" and adhoc.previews[0].contact_id == ""
    with pytest.raises(grpc.RpcError) as e:
        api.campaigns.PreviewMessages(cs.PreviewMessagesRequest(campaign_id=camp.id, contacts=[
            cs.ContactInput(phone="abc")]), metadata=api.md)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field_violations(e.value)[0][0] == "contacts[0].phone"
    with pytest.raises(grpc.RpcError) as e:
        api.campaigns.PreviewMessages(cs.PreviewMessagesRequest(campaign_id=camp.id, count=101), metadata=api.md)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
