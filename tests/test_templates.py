"""Templates (campaign_service.templates), the one place a message's text is made: variables with
defaults, nested spintax, escapes, determinism, weights, and every validation error."""

from __future__ import annotations

import uuid
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from campaign_service.templates import (
    MAX_CAPTION,
    MAX_TEXT,
    TemplateError,
    contact_values,
    parse,
    pick_template,
    render,
    render_message,
    required_variables,
    template_parts,
    text_renderer,
    validate,
    variant_count,
    weight_pattern,
)

ANA = contact_values("Ana Maria", "5511999990000", {"city": "Recife", "empty": ""})


def test_variables_builtins_and_defaults() -> None:
    out = render("Olá {{name}} ({{ phone }}), {{first_name}} de {{city}}; {{state|PE}} {{empty|-}}", ANA, 1)
    assert out.text == "Olá Ana Maria (5511999990000), Ana de Recife; PE -"
    assert out.variant == ""


def test_name_falls_back_to_a_name_column() -> None:
    assert render("[{{name}}]", contact_values("", "55", {"name": "from vars"}), 1).text == "[from vars]"


def test_spintax_nested_and_escaped() -> None:
    text = r"{Oi|Olá {amigo|amiga}} \{literal\} a\|b \\ {{name|x}}"
    seen = {render(text, ANA, seed).text for seed in range(200)}
    assert seen == {r"Oi {literal} a|b \ Ana Maria", r"Olá amigo {literal} a|b \ Ana Maria",
                    r"Olá amiga {literal} a|b \ Ana Maria"}
    assert variant_count(parse(text)) == 3
    assert render(text, ANA, 7).variant in {"0", "1.0", "1.1"}


def test_rendering_is_deterministic_per_seed() -> None:
    text = "{a|b|c}{d|e}{f|g|h|i}"
    assert all(render(text, ANA, s) == render(text, ANA, s) for s in range(50))
    assert len({render(text, ANA, s).text for s in range(200)}) == 24  # every combination shows up


def test_top_level_bar_is_literal() -> None:
    assert render("a|b", ANA, 1).text == "a|b"


@pytest.mark.parametrize(("text", "position", "problem"), [
    ("Oi {a|b", 3, "'{' without a closing '}'"),
    ("Oi a}", 4, "'}' without a matching '{'"),
    ("{a||b}", 3, "empty alternative"),
    ("{|b}", 1, "empty alternative"),
    ("{}", 1, "empty alternative"),
    ("Oi {{name", 3, "'{{' without a closing '}}'"),
    ("{{9lives}}", 0, "is not a variable name"),
    ("{{}}", 0, "is not a variable name"),
    ("{{city|}}", 0, "empty default"),
    ("{a|{b|c}", 0, "'{' without a closing '}'"),
])
def test_syntax_errors_name_position_and_problem(text: str, position: int, problem: str) -> None:
    with pytest.raises(TemplateError) as e:
        parse(text)
    assert e.value.position == position and problem in e.value.problem


def test_validate_names_template_index_position_and_problem() -> None:
    problems = validate([("ok {{name}}", False), ("bad {a|", False), ("   ", False), ("", True),
                         ("x" * (MAX_CAPTION + 1), True), ("{" + "y" * (MAX_TEXT + 1) + "|z}", False)])
    assert problems == [
        ("campaign.templates[1].text", "position 4: '{' without a closing '}' (write \\{ for the character)"),
        ("campaign.templates[2].text", "required (a message needs text unless it carries media)"),
        ("campaign.templates[4].text", f"can render more than {MAX_CAPTION} characters, WhatsApp's limit for a "
                                       "caption"),
        ("campaign.templates[5].text", f"can render more than {MAX_TEXT} characters, WhatsApp's limit for a "
                                       "text message"),
    ]


def test_unknown_variables_are_checked_against_the_imported_columns() -> None:
    texts = [("Oi {{name}} de {{city}}, {{bairro|vizinho}} {{cpf}}", False)]
    assert validate(texts) == []  # no contacts yet: nothing to check against
    problems = validate(texts, columns={"city"})
    assert [f for f, _ in problems] == ["campaign.templates[0].text"]
    assert "position 44: unknown variable {{cpf}} with no default" in problems[0][1]
    assert required_variables([t for t, _ in texts]) == {"name", "city", "cpf"}


def test_weights_choose_templates_in_proportion() -> None:
    pattern = weight_pattern([3, 1, 0])
    assert pattern == [0, 0, 0, 1, 2]
    counts = Counter(pick_template(pattern, cid) for cid in range(1, 20_001))
    assert abs(counts[0] / 20_000 - 0.6) < 0.02 and abs(counts[1] / 20_000 - 0.2) < 0.02


def test_render_message_and_template_parts_read_stored_json() -> None:
    media = uuid.uuid4()
    stored = [{"text": "{Oi|Olá} {{name}}"}, {"text": "b", "mediaId": str(media), "weight": 2}]
    assert template_parts(stored, 3) == ("b", media)
    assert template_parts([{"text": "a", "media_id": "not-a-uuid"}], 0) == ("a", None)
    assert template_parts(None, 0) == ("", None)
    r = render_message(stored, 0, 42, "Ana", "55", None)
    assert r == render_message(stored, 0, 42, "Ana", "55", {}) and r.text.endswith(" Ana")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="{}|\\ab{{}}", max_size=40))
def test_any_text_parses_or_fails_cleanly(text: str) -> None:
    """Whatever a user types, parsing ends in a template or a TemplateError (never another
    exception), and a parsed template always renders."""
    try:
        nodes = parse(text)
    except TemplateError as e:
        assert 0 <= e.position <= len(text)
        return
    assert variant_count(nodes) >= 1
    render(text, ANA, 3)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["Oi ", "{{name}}", "{{first_name|amigo}}", "{{phone}}", "{{city|?}}", "{{empty|-}}",
                                 "{{x}}", "{a|b}", "{c|{d|e}}", r"\{", " "]), max_size=8),
       st.sampled_from(["", "Ana Maria", "Bo"]), st.sampled_from(["5511999990000", ""]),
       st.dictionaries(st.sampled_from(["city", "empty", "name", "first_name", "phone", "x"]),
                       st.one_of(st.none(), st.just(""), st.just("v"), st.integers(0, 9)), max_size=4),
       st.integers(0, 1000))
def test_compiled_renderer_gives_the_text_render_gives(parts: list[str], name: str, phone: str,
                                                        variables: dict[str, object], seed: int) -> None:
    """The lease's compiled renderer (text_renderer) and render(contact_values(...)) are one rule."""
    text = "".join(parts)
    assert text_renderer(text)(name, phone, variables, seed) == render(text, contact_values(name, phone, variables),
                                                                       seed).text
