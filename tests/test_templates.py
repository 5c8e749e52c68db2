"""Template rendering (campaign_service.templates), the one place a message's text is made."""

from __future__ import annotations

import uuid

from campaign_service.templates import render, template_parts


def test_render_fills_name_phone_and_variables() -> None:
    out = render("Olá {{name}} ({{ phone }}), {{city}}!", "Ana", "5511999990000", {"city": "Recife"})
    assert out == "Olá Ana (5511999990000), Recife!"


def test_render_without_placeholders_is_the_template() -> None:
    assert render("sem variáveis", "Ana", "55", None) == "sem variáveis"


def test_render_unknown_and_empty_name() -> None:
    # today's rule: unknown placeholders become empty; {{name}} falls back to a variable "name"
    assert render("[{{x}}][{{name}}]", "", "55", {"name": "from vars"}) == "[][from vars]"


def test_template_parts_reads_both_json_spellings() -> None:
    media = uuid.uuid4()
    assert template_parts([{"text": "a"}, {"text": "b", "mediaId": str(media)}], 3) == ("b", media)
    assert template_parts([{"text": "a", "media_id": "not-a-uuid"}], 0) == ("a", None)
    assert template_parts(None, 0) == ("", None)
