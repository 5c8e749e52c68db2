"""Message templates: the one place that parses, validates, picks and renders them.

Syntax (what a user writes in MessageTemplate.text):
- spintax `{Olá|Oi|E aí}`: one alternative per message, groups nest (`{Oi {amigo|amiga}|Olá}`);
- variables `{{name}}`, `{{first_name}}`, `{{phone}}` and any imported column (`{{city}}`), with a
  default after a bar (`{{city|amigo}}`) used when the contact has no value;
- `\\{`, `\\}`, `\\|` and `\\\\` stand for the character itself.

Everything is deterministic per contact: which template (by weight) and which alternatives a message
gets follow from the contact's id, so a preview, a retry and the send all render the same text.
Nothing renders to a silent empty string: a variable without default must have a value for every
contact (checked at Start), and a rendered text is never empty."""

from __future__ import annotations

import functools
import random
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

#: WhatsApp's limits: a text message, and a media caption.
MAX_TEXT = 4096
MAX_CAPTION = 1024
MAX_WEIGHT = 100
BUILTIN = ("name", "first_name", "phone")
_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,63}\Z")
_ESCAPABLE = "{}|\\"


@dataclass(frozen=True)
class Var:
    name: str
    default: str | None
    position: int


@dataclass(frozen=True)
class Choice:
    alternatives: tuple[tuple[Node, ...], ...]


Node = Union[str, Var, Choice]  # noqa: UP007 (a runtime alias of a forward-referenced union)


class TemplateError(ValueError):
    """A template that cannot be used; `position` is a 0-based character offset in the text."""

    def __init__(self, position: int, problem: str) -> None:
        super().__init__(f"position {position}: {problem}")
        self.position = position
        self.problem = problem


@functools.lru_cache(maxsize=1024)
def parse(text: str) -> tuple[Node, ...]:
    """The template as literal strings, variables and choices; TemplateError when malformed."""
    nodes, end = _parse_seq(text, 0, depth=0)
    if end < len(text):  # only a stray '}' stops the top level early
        raise TemplateError(end, "'}' without a matching '{' (write \\} for the character)")
    return nodes


def _parse_seq(text: str, i: int, depth: int) -> tuple[tuple[Node, ...], int]:
    """Nodes until the end, or (inside a group) until the '|' or '}' that ends this alternative."""
    out: list[Node] = []
    buf: list[str] = []

    def flush() -> None:
        if buf:
            out.append("".join(buf))
            buf.clear()

    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\" and i + 1 < n and text[i + 1] in _ESCAPABLE:
            buf.append(text[i + 1])
            i += 2
        elif text.startswith("{{", i):
            flush()
            var, i = _parse_var(text, i)
            out.append(var)
        elif c == "{":
            flush()
            choice, i = _parse_choice(text, i, depth + 1)
            out.append(choice)
        elif c == "}" or (c == "|" and depth > 0):
            break
        else:
            buf.append(c)
            i += 1
    flush()
    return tuple(out), i


def _parse_var(text: str, start: int) -> tuple[Var, int]:
    close = text.find("}}", start + 2)
    if close < 0:
        raise TemplateError(start, "'{{' without a closing '}}'")
    body = text[start + 2:close]
    name, bar, default = body.partition("|")
    name = name.strip()
    if "{" in body:
        raise TemplateError(start, "a variable cannot contain '{'")
    if not _VAR_NAME.match(name):
        raise TemplateError(start, f"{{{{{body}}}}} is not a variable name (letters, digits, _ . -)")
    if bar and not default:
        raise TemplateError(start, f"{{{{{name}|}}}}: empty default (drop the '|' or give a value)")
    return Var(name, default if bar else None, start), close + 2


def _parse_choice(text: str, start: int, depth: int) -> tuple[Choice, int]:
    alternatives: list[tuple[Node, ...]] = []
    i = start + 1
    while True:
        alt_start = i
        nodes, i = _parse_seq(text, i, depth)
        if i >= len(text):
            raise TemplateError(start, "'{' without a closing '}' (write \\{ for the character)")
        if not nodes:
            raise TemplateError(alt_start, "empty alternative in '{...|...}'")
        alternatives.append(nodes)
        if text[i] == "}":
            return Choice(tuple(alternatives)), i + 1
        i += 1  # '|'


def variables(nodes: Sequence[Node]) -> list[Var]:
    out: list[Var] = []
    for node in nodes:
        if isinstance(node, Var):
            out.append(node)
        elif isinstance(node, Choice):
            for alt in node.alternatives:
                out.extend(variables(alt))
    return out


def variant_count(nodes: Sequence[Node]) -> int:
    """How many different alternative combinations the template has (variables aside)."""
    total = 1
    for node in nodes:
        if isinstance(node, Choice):
            total *= sum(variant_count(alt) for alt in node.alternatives)
    return total


def longest_static(nodes: Sequence[Node]) -> int:
    """Length of the longest text the template can render, counting variables as their default."""
    size = 0
    for node in nodes:
        if isinstance(node, str):
            size += len(node)
        elif isinstance(node, Var):
            size += len(node.default or "")
        else:
            size += max(longest_static(alt) for alt in node.alternatives)
    return size


# -- validation ------------------------------------------------------------------------------------

def validate(texts: Sequence[tuple[str, bool]], prefix: str = "campaign.templates",
             columns: set[str] | None = None) -> list[tuple[str, str]]:
    """Problems of (text, has_media) templates as (field, description) pairs, naming the template
    index and position. With `columns` (the imported ones), variables must be built-in, imported
    or defaulted."""
    problems: list[tuple[str, str]] = []
    for k, (text, has_media) in enumerate(texts):
        field = f"{prefix}[{k}].text"
        try:
            nodes = parse(text)
        except TemplateError as e:
            problems.append((field, f"position {e.position}: {e.problem}"))
            continue
        limit = MAX_CAPTION if has_media else MAX_TEXT
        if longest_static(nodes) > limit:
            problems.append((field, f"can render more than {limit} characters, WhatsApp's limit for a "
                                    f"{'caption' if has_media else 'text message'}"))
        if not has_media and not text.strip():
            problems.append((field, "required (a message needs text unless it carries media)"))
        if columns is not None:
            for v in variables(nodes):
                if v.default is None and v.name not in BUILTIN and v.name not in columns:
                    known = ", ".join(sorted({*BUILTIN, *columns}))
                    problems.append((field, f"position {v.position}: unknown variable {{{{{v.name}}}}} "
                                            f"with no default (known: {known}; or write {{{{{v.name}|default}}}})"))
    return problems


def required_variables(texts: Sequence[str]) -> set[str]:
    """Variables used somewhere without a default: every contact needs a value for them."""
    out: set[str] = set()
    for text in texts:
        out.update(v.name for v in variables(parse(text)) if v.default is None)
    return out


# -- choosing and rendering ------------------------------------------------------------------------

def weight_pattern(weights: Sequence[int]) -> list[int]:
    """Template indexes repeated by weight (0 counts as 1): the table a contact's hash indexes."""
    return [k for k, w in enumerate(weights) for _ in range(max(1, min(int(w), MAX_WEIGHT)))]


def contact_hash(contact_id: int) -> int:
    """A cheap deterministic spread of contact ids (MINSTD); `messages_repo` computes the same in SQL."""
    return (contact_id % 2147483647) * 48271 % 2147483647


def pick_template(pattern: Sequence[int], contact_id: int) -> int:
    return pattern[contact_hash(contact_id) % len(pattern)] if pattern else 0


@dataclass(frozen=True)
class Rendered:
    text: str
    variant: str  # the alternatives taken, e.g. "1.0.2" ("" without spintax)


def contact_values(name: str, phone: str, variables_: Mapping[str, Any] | None) -> dict[str, str]:
    """Every variable a contact has a value for (an empty value counts as none): its imported
    columns and the built-ins, each as `_value` (the one rule) gives it."""
    keys = [*(variables_ or {}), "name", "first_name", "phone"]
    return {k: v for k in keys if (v := _value(k, name, phone, variables_))}


def render(text: str, values: Mapping[str, str], seed: int) -> Rendered:
    """The text a contact receives: alternatives drawn from a generator seeded by `seed` (the
    contact's id), variables from `values` (see contact_values) or their defaults. The generator is
    made at the first alternative only: seeding one per message was ~8% of a lease's CPU for
    templates without spintax (same draws either way: same seed, same order)."""
    taken: list[str] = []
    out = "".join(_render(parse(text), values, _LazyRandom(seed), taken))
    return Rendered(out, ".".join(taken))


def render_text(text: str, values: Mapping[str, str], seed: int) -> str:
    """render(...).text alone (the lease's per-message path: no record of the alternatives taken)."""
    return "".join(_render(parse(text), values, _LazyRandom(seed), []))


# A lease renders every message it hands out: (contact name, phone, variables, seed) -> text.
TextRenderer = Callable[[str, str, "Mapping[str, Any] | None", int], str]


@functools.lru_cache(maxsize=1024)
def text_renderer(text: str) -> TextRenderer:
    """render_text(text, contact_values(...), seed), compiled once per template. A template without
    spintax (the seed draws nothing) looks up only the variables it names, without building the
    contact's whole value dict per message (that and the node walk were ~40% of a 400-message
    lease's Python time, in-process profile): same text, same defaults, same precedence."""
    nodes = parse(text)
    if any(isinstance(n, Choice) for n in nodes):
        def general(name: str, phone: str, variables_: Mapping[str, Any] | None, seed: int) -> str:
            return render_text(text, contact_values(name, phone, variables_), seed)
        return general
    parts = [n if isinstance(n, str) else (n.name, n.default or "") for n in nodes if not isinstance(n, Choice)]

    def plain(name: str, phone: str, variables_: Mapping[str, Any] | None, seed: int) -> str:
        out: list[str] = []
        for p in parts:
            if isinstance(p, str):
                out.append(p)
                continue
            var, default = p
            out.append(_value(var, name, phone, variables_) or default)
        return "".join(out)
    return plain


def _value(var: str, name: str, phone: str, variables_: Mapping[str, Any] | None) -> str:
    """A contact's value of `var` ("": none): the built-ins phone, and name / first_name when the
    contact has a name, before its imported columns. text_renderer asks it per variable a template
    names, without building contact_values' dict."""
    if var == "phone":
        return phone
    if name and var in ("name", "first_name"):
        return name if var == "name" else name.split()[0]
    v = variables_.get(var) if variables_ else None
    return "" if v is None else str(v)


class _LazyRandom:
    """random.Random(seed), created on the first draw."""

    __slots__ = ("rng", "seed")

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.rng: random.Random | None = None

    def randrange(self, n: int) -> int:
        if self.rng is None:
            self.rng = random.Random(self.seed)
        return self.rng.randrange(n)


def _render(nodes: Sequence[Node], values: Mapping[str, str], rng: _LazyRandom, taken: list[str]) -> list[str]:
    parts: list[str] = []
    for node in nodes:
        if isinstance(node, str):
            parts.append(node)
        elif isinstance(node, Var):
            v = values.get(node.name)
            parts.append(v if v else (node.default or ""))
        else:
            k = rng.randrange(len(node.alternatives))
            taken.append(str(k))
            parts.extend(_render(node.alternatives[k], values, rng, taken))
    return parts


def render_message(templates: list[dict[str, Any]] | None, template_index: int, contact_id: int, name: str,
                   phone: str, variables_: Mapping[str, Any] | None) -> Rendered:
    """A campaign message's text: what the lease sends, ListCampaignMessages reports and
    PreviewMessages shows (stored templates as proto JSON)."""
    text, _ = template_parts(templates, template_index)
    return render(text, contact_values(name, phone, variables_), contact_id)


def template_parts(templates: list[dict[str, Any]] | None, index: int) -> tuple[str, uuid.UUID | None]:
    """(text, media id) of templates[index] as stored (proto JSON; camelCase or field names)."""
    if not templates:
        return "", None
    t = templates[index % len(templates)] or {}
    media = t.get("mediaId") or t.get("media_id") or ""
    try:
        media_id = uuid.UUID(str(media)) if media else None
    except ValueError:
        media_id = None
    return str(t.get("text") or ""), media_id


def weights(templates: list[dict[str, Any]] | None) -> list[int]:
    return [int((t or {}).get("weight") or 1) for t in (templates or [])]
