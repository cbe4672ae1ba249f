"""Parse a FHIR R4 search query into typed conditions, and define what each condition matches.

https://hl7.org/fhir/R4/search.html. ``parse_search`` takes the decoded ``(name, value)`` pairs
of a query and returns a ``ParsedSearch``: one ``Condition`` per parameter occurrence (repeated
parameters are AND-ed; the comma-separated values inside one are OR-ed, ``\\,`` escapes a
comma), plus the result parameters (``_count``, ``_offset``, ``_sort``, ``_include``,
``_revinclude``, ``_summary``, ``_elements``, ``_total``). Every value is parsed and checked
here, so the store never sees a malformed one; each error is an ``InvalidInput`` that names the
parameter and what was expected.

``matches(entry, value, modifier)`` is the reference semantics of one condition value against
one index entry of ``teleledger.fhir.searchparams``: the store's SQL must agree with it, and
exact post-filters use it directly. Decisions the spec leaves open:

* dates: ``ap`` is rejected (the spec's "10% of the gap to now" would make results depend on
  the clock); the other prefixes follow search.html#prefix exactly (see ``_DATE_TESTS``).
* numbers and quantities: the resource value is a point; ``eq``/``ne`` use the search value's
  implicit precision range (``5.4`` → [5.35, 5.45)), ``gt lt ge le`` compare with the value as
  written, ``sa``/``eb`` coincide with ``gt``/``lt`` for a point, ``ap`` is ±10 % of the value
  (or the precision range, if wider). No unit conversion: ``system``/``code`` must match (with
  no system, the code may match the unit).
* ``:not`` on a token means "no token of the resource matches": that is decided per resource
  (by the store); ``matches`` answers the positive question for one entry. ``:missing`` too
  is per resource; ``matches`` refuses it.
* parameters with an empty value are ignored, as are empty items of a comma list.

Not supported, with an explicit error: chained parameters (``subject.name``), ``_has``,
``_include=*``, the modifiers ``above below in not-in of-type text identifier``.

Pure core: standard library and ``teleledger.core``/``teleledger.fhir.searchparams`` only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation, localcontext
from typing import Any

from teleledger.core.errors import InvalidInput
from teleledger.fhir.searchparams import (
    DateEntry,
    IndexEntry,
    NumberEntry,
    QuantityEntry,
    ReferenceEntry,
    SearchParam,
    StringEntry,
    TokenEntry,
    UriEntry,
    date_range,
    normalize_string,
    params_for,
    parse_reference,
    supported_types,
)

__all__ = [
    "Condition",
    "TokenValue",
    "StringValue",
    "DateValue",
    "ReferenceValue",
    "QuantityValue",
    "NumberValue",
    "Include",
    "ParsedSearch",
    "parse_search",
    "matches",
    "date_range",
    "normalize_string",
]


# ---- typed values --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenValue:
    """``code`` (any system), ``|code`` (no system), ``sys|`` (any code of sys), ``sys|code``."""

    system: str | None
    code: str | None
    system_given: bool


@dataclass(frozen=True, slots=True)
class StringValue:
    """A string (and uri) search value, unescaped, not normalized."""

    raw: str


@dataclass(frozen=True, slots=True)
class DateValue:
    prefix: str
    low: int
    high: int


@dataclass(frozen=True, slots=True)
class ReferenceValue:
    type: str | None
    id: str


@dataclass(frozen=True, slots=True)
class QuantityValue:
    """``[prefix]number[|system|code]``; [low, high) is the number's implicit precision range."""

    prefix: str
    value: Decimal
    low: Decimal
    high: Decimal
    system: str | None
    code: str | None


@dataclass(frozen=True, slots=True)
class NumberValue:
    prefix: str
    value: Decimal
    low: Decimal
    high: Decimal


@dataclass(frozen=True)
class Condition:
    """One parameter occurrence: its values are OR-ed; the Conditions of a search are AND-ed.

    ``param`` is None for ``_id`` (values: ``TokenValue`` with the id as code) and
    ``_lastUpdated`` (values: ``DateValue``). With ``modifier == "missing"`` the only value
    is a bool (True: the resource has no value for the parameter).
    """

    param: SearchParam | None
    name: str
    modifier: str | None
    values: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Include:
    source_type: str
    param: str
    target_type: str | None
    iterate: bool = False


@dataclass(frozen=True)
class ParsedSearch:
    resource_type: str
    conditions: tuple[Condition, ...]
    count: int  # _count, else default_count; never above max_count
    offset: int
    sort: tuple[tuple[str, bool], ...]  # (param name | "_id" | "_lastUpdated", descending)
    include: tuple[Include, ...]
    revinclude: tuple[Include, ...]
    summary: str | None
    elements: tuple[str, ...]
    total: str | None
    unknown: tuple[str, ...]


# ---- value syntax --------------------------------------------------------------------------

_PREFIXES = frozenset({"eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap"})
_ESCAPED = re.compile(r"\\([\\,$|])")
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_TYPE_NAME = re.compile(r"[A-Z][A-Za-z]{0,63}")
_ELEMENT = re.compile(r"[a-z][A-Za-z0-9]*")
# '+' of a time zone arrives as ' ' when a client forgot to percent-encode it
_TZ_SPACE = re.compile(r"(T[0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]+)?)?) ([0-9]{2}:[0-9]{2})$")

_MODIFIERS: dict[str, frozenset[str]] = {
    "token": frozenset({"not", "missing"}),
    "string": frozenset({"exact", "contains", "missing"}),
    "date": frozenset({"missing"}),
    "reference": frozenset({"missing"}),  # plus a resource type: subject:Patient=123
    "quantity": frozenset({"missing"}),
    "number": frozenset({"missing"}),
    "uri": frozenset({"missing"}),
}
_UNSUPPORTED_MODIFIERS = frozenset({"above", "below", "in", "not-in", "of-type", "text", "identifier", "iterate"})
_SORTABLE = frozenset({"date", "string", "token", "reference", "quantity", "number"})
_SUMMARY = frozenset({"true", "text", "data", "count", "false"})
_TOTAL = frozenset({"none", "estimate", "accurate"})
_IGNORED = frozenset({"_format", "_pretty"})
_SINGLE = ("_count", "_offset", "_sort", "_summary", "_elements", "_total")


def _split(text: str, sep: str) -> list[str]:
    """Split on ``sep`` where it is not escaped by a backslash; escapes are kept for later."""
    if "\\" not in text:
        return text.split(sep)
    parts, start, i = [], 0, 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == sep:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    parts.append(text[start:])
    return parts


def _unescape(text: str) -> str:
    return _ESCAPED.sub(r"\1", text) if "\\" in text else text


def _prefix(text: str) -> tuple[str, str]:
    if len(text) > 2 and text[:2] in _PREFIXES:
        return text[:2], text[2:]
    return "eq", text


def _number(text: str, name: str) -> tuple[Decimal, Decimal, Decimal]:
    """The number and its implicit range [low, high): half a unit of its last digit either side."""
    if not _NUMBER.fullmatch(text):
        raise InvalidInput(f"search parameter '{name}': expected a number like 5.4 or 1e2, got {text[:64]!r}")
    try:
        d = Decimal(text)
        out_of_range = not -300 <= d.adjusted() <= 300
    except (InvalidOperation, ArithmeticError):  # exponents beyond what Decimal represents
        out_of_range = True
    if out_of_range:
        raise InvalidInput(f"search parameter '{name}': the number {text[:64]!r} is out of range (±1e300)")
    sign, digits, exponent = d.as_tuple()
    assert isinstance(exponent, int)
    with localcontext() as ctx:
        ctx.prec = len(digits) + 2  # d ± half a unit of its last digit, exactly
        half = Decimal(5).scaleb(exponent - 1)
        return d, d - half, d + half


def _token(text: str, name: str) -> TokenValue:
    parts = _split(text, "|")
    if len(parts) == 1:
        return TokenValue(None, _unescape(text), False)
    system = _unescape(parts[0]) or None
    code = _unescape("|".join(parts[1:])) or None
    if system is None and code is None:
        raise InvalidInput(f"search parameter '{name}': expected code, system|code, |code or system|, got '|'")
    return TokenValue(system, code, True)


def _date(text: str, name: str) -> DateValue:
    prefix, rest = _prefix(text)
    if prefix == "ap":
        raise InvalidInput(
            f"search parameter '{name}': the prefix 'ap' is not supported for dates; use ge and le to give a range"
        )
    rest = _TZ_SPACE.sub(r"\1+\2", rest)
    low, high = date_range(rest, param=name)
    return DateValue(prefix, low, high)


def _reference(text: str, name: str, param: SearchParam, type_modifier: str | None) -> ReferenceValue:
    if _ID.fullmatch(text):
        targets = param.targets
        rtype = type_modifier or (targets[0] if len(targets) == 1 else None)
        return ReferenceValue(rtype, text)
    try:
        parsed = parse_reference(text)
    except ValueError:
        parsed = None
    if parsed is None:
        raise InvalidInput(f"search parameter '{name}': expected an id or Type/id (e.g. Patient/123), got {text[:80]!r}")
    rtype, rid = parsed
    if type_modifier is not None and rtype != type_modifier:
        raise InvalidInput(f"search parameter '{name}:{type_modifier}': the value names a {rtype}, got {text[:80]!r}")
    if param.targets and rtype not in param.targets:
        raise InvalidInput(
            f"search parameter '{name}' refers to {', '.join(param.targets)}; got a reference to {rtype}"
        )
    return ReferenceValue(rtype, rid)


def _quantity(text: str, name: str) -> QuantityValue:
    parts = _split(text, "|")
    if len(parts) not in (1, 3):
        raise InvalidInput(
            f"search parameter '{name}': expected [prefix]number[|system|code] (e.g. gt5.4|http://unitsofmeasure.org|mg), "
            f"got {text[:80]!r}"
        )
    prefix, num = _prefix(parts[0])
    value, low, high = _number(num, name)
    system = _unescape(parts[1]) or None if len(parts) == 3 else None
    code = _unescape(parts[2]) or None if len(parts) == 3 else None
    return QuantityValue(prefix, value, low, high, system, code)


def _values(param: SearchParam, modifier: str | None, raw: str) -> tuple[Any, ...]:
    name = param.name
    items = [i for i in _split(raw, ",") if i]
    kind = param.type
    if kind == "token":
        return tuple(_token(i, name) for i in items)
    if kind in ("string", "uri"):
        return tuple(StringValue(_unescape(i)) for i in items)
    if kind == "date":
        return tuple(_date(_unescape(i), name) for i in items)
    if kind == "reference":
        return tuple(_reference(_unescape(i), name, param, modifier) for i in items)
    if kind == "quantity":
        return tuple(_quantity(i, name) for i in items)
    if kind == "number":
        out = []
        for i in items:
            prefix, num = _prefix(_unescape(i))
            out.append(NumberValue(prefix, *_number(num, name)))
        return tuple(out)
    raise AssertionError(kind)  # pragma: no cover - the table only has the types above


def _check_modifier(param: SearchParam, modifier: str | None) -> None:
    if modifier is None:
        return
    allowed = _MODIFIERS[param.type]
    if modifier in allowed:
        return
    if param.type == "reference" and _TYPE_NAME.fullmatch(modifier):
        if param.targets and modifier not in param.targets:
            raise InvalidInput(
                f"search parameter '{param.name}:{modifier}': {param.name} refers to {', '.join(param.targets)}, "
                f"not {modifier}"
            )
        return
    what = "is not supported" if modifier in _UNSUPPORTED_MODIFIERS else "is unknown"
    extra = " or a resource type (e.g. :Patient)" if param.type == "reference" else ""
    raise InvalidInput(
        f"search parameter '{param.name}': modifier ':{modifier}' {what} for a {param.type} parameter "
        f"(supported: {', '.join(':' + m for m in sorted(allowed))}{extra})"
    )


def _condition(param: SearchParam, modifier: str | None, raw: str) -> Condition | None:
    if modifier == "missing":
        if raw not in ("true", "false"):
            raise InvalidInput(f"search parameter '{param.name}:missing': expected true or false, got {raw[:20]!r}")
        return Condition(param, param.name, modifier, (raw == "true",))
    values = _values(param, modifier, raw)
    if not values:
        return None
    return Condition(param, param.name, modifier, values)


# ---- result parameters ---------------------------------------------------------------------


# paging deeper than this is refused (a client pages with the links we give, never this far)
MAX_OFFSET = 1_000_000_000


def _non_negative(name: str, raw: str) -> int:
    if not raw.isdigit() or not raw.isascii() or len(raw) > 10 or int(raw) > MAX_OFFSET:
        raise InvalidInput(f"{name}: expected a non-negative integer up to {MAX_OFFSET}, got {raw[:20]!r}")
    return int(raw)


def _sort(resource_type: str, raw: str) -> tuple[tuple[str, bool], ...]:
    params = params_for(resource_type)
    out: list[tuple[str, bool]] = []
    for key in raw.split(","):
        desc = key.startswith("-")
        name = key[1:] if desc else key
        if name not in ("_id", "_lastUpdated"):
            param = params.get(name)
            if param is None or param.type not in _SORTABLE:
                why = "is not a search parameter of" if param is None else f"is a {param.type} parameter of"
                raise InvalidInput(
                    f"_sort: {name!r} {why} {resource_type}; sort by _id, _lastUpdated or a date, string, token, "
                    "reference, quantity or number parameter"
                )
        if any(n == name for n, _ in out):
            raise InvalidInput(f"_sort: {name!r} is named twice")
        out.append((name, desc))
    return tuple(out)


def _include(resource_type: str, raw: str, modifier: str | None, *, reverse: bool) -> Include:
    what = "_revinclude" if reverse else "_include"
    if modifier not in (None, "iterate"):
        raise InvalidInput(f"{what}: modifier ':{modifier}' is unknown (supported: :iterate)")
    iterate = modifier == "iterate"
    if raw == "*" or raw.endswith(":*"):
        raise InvalidInput(f"{what}={raw}: wildcard includes are not supported; name the reference parameter")
    parts = raw.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise InvalidInput(f"{what}: expected SourceType:parameter[:TargetType], got {raw[:80]!r}")
    source, name = parts[0], parts[1]
    target = parts[2] if len(parts) == 3 else None
    if source not in supported_types():
        raise InvalidInput(f"{what}: {source!r} is not a supported resource type")
    if not reverse and not iterate and source != resource_type:
        raise InvalidInput(
            f"_include: the source type must be the searched type {resource_type}, got {source} "
            "(use _include:iterate to include from included resources)"
        )
    param = params_for(source).get(name)
    if param is None or param.type != "reference":
        raise InvalidInput(f"{what}: {source} has no reference search parameter {name!r}")
    if target is not None:
        if not _TYPE_NAME.fullmatch(target) or (param.targets and target not in param.targets):
            allowed = ", ".join(param.targets) or "any resource type"
            raise InvalidInput(f"{what}: {source}:{name} refers to {allowed}, not {target!r}")
        if reverse and not iterate and target != resource_type:
            raise InvalidInput(f"_revinclude: the target type must be the searched type {resource_type}, got {target}")
    if reverse and not iterate and param.targets and resource_type not in param.targets:
        raise InvalidInput(f"_revinclude: {source}:{name} never refers to {resource_type}")
    return Include(source, name, target, iterate)


def _elements(raw: str) -> tuple[str, ...]:
    out = []
    for e in raw.split(","):
        e = e.strip()
        if not _ELEMENT.fullmatch(e):
            raise InvalidInput(f"_elements: expected top-level element names like birthDate, got {e[:40]!r}")
        out.append(e)
    return tuple(dict.fromkeys(out))


# ---- the parser ----------------------------------------------------------------------------


def parse_search(
    resource_type: str,
    items: Sequence[tuple[str, str]],
    *,
    strict: bool = False,
    max_count: int = 1000,
    default_count: int = 50,
) -> ParsedSearch:
    """Parse the decoded query pairs of a search on ``resource_type`` (search.html#Introduction).

    Unknown parameters are collected in ``unknown`` and otherwise ignored, or, with ``strict``
    (``Prefer: handling=strict``), rejected. ``_count`` above ``max_count`` is lowered to it.
    """
    if resource_type not in supported_types():
        raise InvalidInput(f"searching {resource_type!r} is not supported")
    params = params_for(resource_type)
    conditions: list[Condition] = []
    unknown: dict[str, None] = {}
    includes: list[Include] = []
    revincludes: list[Include] = []
    single: dict[str, str] = {}

    for key, raw in items:
        name, sep, modifier_text = key.partition(":")
        modifier = modifier_text if sep else None
        if name in _IGNORED:
            continue
        if name == "_has":
            raise InvalidInput("_has (reverse chaining) is not supported")
        if "." in key and params.get(name.split(".", 1)[0]) is not None:
            raise InvalidInput(f"chained search parameters are not supported: {key[:80]!r}")
        if modifier == "":
            raise InvalidInput(f"search parameter {key!r}: empty modifier after ':'")
        if name in _SINGLE:
            if modifier is not None:
                raise InvalidInput(f"{name} takes no modifier, got ':{modifier}'")
            if name in single:
                raise InvalidInput(f"{name} is given more than once")
            single[name] = raw
            continue
        if name in ("_include", "_revinclude"):
            if raw:
                (revincludes if name == "_revinclude" else includes).append(
                    _include(resource_type, raw, modifier, reverse=name == "_revinclude")
                )
            continue
        if name == "_id":
            if modifier not in (None, "not"):
                raise InvalidInput(f"search parameter '_id': modifier ':{modifier}' is not supported (supported: :not)")
            ids = [_unescape(i) for i in _split(raw, ",") if i]
            for i in ids:
                if not _ID.fullmatch(i):
                    raise InvalidInput(f"search parameter '_id': expected an id of 1-64 [A-Za-z0-9-.], got {i[:80]!r}")
            if ids:
                conditions.append(Condition(None, "_id", modifier, tuple(TokenValue(None, i, False) for i in ids)))
            continue
        if name == "_lastUpdated":
            if modifier is not None:
                raise InvalidInput(f"search parameter '_lastUpdated': modifier ':{modifier}' is not supported")
            values = tuple(_date(_unescape(i), "_lastUpdated") for i in _split(raw, ",") if i)
            if values:
                conditions.append(Condition(None, "_lastUpdated", None, values))
            continue
        param = params.get(name)
        if param is None:
            unknown[name] = None
            continue
        _check_modifier(param, modifier)
        if raw == "":
            continue  # an empty parameter is ignored
        cond = _condition(param, modifier, raw)
        if cond is not None:
            conditions.append(cond)

    if strict and unknown:
        raise InvalidInput(
            f"unknown search parameters for {resource_type}: {', '.join(unknown)} "
            f"(supported: _id, _lastUpdated, {', '.join(sorted(params))})"
        )

    count = min(default_count, max_count)
    if single.get("_count"):
        count = min(_non_negative("_count", single["_count"]), max_count)
    offset = _non_negative("_offset", single["_offset"]) if single.get("_offset") else 0
    sort = _sort(resource_type, single["_sort"]) if single.get("_sort") else ()
    summary = single.get("_summary") or None
    if summary is not None and summary not in _SUMMARY:
        raise InvalidInput(f"_summary: expected one of {', '.join(sorted(_SUMMARY))}, got {summary[:20]!r}")
    total = single.get("_total") or None
    if total is not None and total not in _TOTAL:
        raise InvalidInput(f"_total: expected none, estimate or accurate, got {total[:20]!r}")
    elements = _elements(single["_elements"]) if single.get("_elements") else ()

    return ParsedSearch(
        resource_type=resource_type,
        conditions=tuple(conditions),
        count=count,
        offset=offset,
        sort=sort,
        include=tuple(includes),
        revinclude=tuple(revincludes),
        summary=summary,
        elements=elements,
        total=total,
        unknown=tuple(unknown),
    )


# ---- matching ------------------------------------------------------------------------------

#: search.html#prefix for ranges: t = the resource's range, s = the search value's range
_DATE_TESTS = {
    "eq": lambda tl, th, sl, sh: tl >= sl and th <= sh,
    "ne": lambda tl, th, sl, sh: not (tl >= sl and th <= sh),
    "gt": lambda tl, th, sl, sh: th > sh,
    "lt": lambda tl, th, sl, sh: tl < sl,
    "ge": lambda tl, th, sl, sh: th > sh or (tl >= sl and th <= sh),
    "le": lambda tl, th, sl, sh: tl < sl or (tl >= sl and th <= sh),
    "sa": lambda tl, th, sl, sh: tl > sh,
    "eb": lambda tl, th, sl, sh: th < sl,
}

_TEN_PERCENT = Decimal("0.1")


def _compare(x: Decimal, prefix: str, value: Decimal, low: Decimal, high: Decimal) -> bool:
    if prefix == "eq":
        return low <= x < high
    if prefix == "ne":
        return not low <= x < high
    if prefix in ("gt", "sa"):
        return x > value
    if prefix in ("lt", "eb"):
        return x < value
    if prefix == "ge":
        return x >= value
    if prefix == "le":
        return x <= value
    if prefix == "ap":
        margin = abs(value) * _TEN_PERCENT
        return value - margin <= x <= value + margin or low <= x < high
    raise ValueError(f"unknown prefix {prefix!r}")


def matches(entry: IndexEntry, value: Any, modifier: str | None = None) -> bool:
    """Does one index entry satisfy one search value (under the condition's modifier)?

    For ``:not`` this answers the positive question (the store keeps the resources for which
    no entry matches); ``:missing`` is a property of the resource, not of an entry: ValueError.
    """
    if modifier == "missing":
        raise ValueError(":missing is decided per resource (has it any entry for the parameter?), not per entry")
    if isinstance(entry, TokenEntry) and isinstance(value, TokenValue):
        if value.code is not None and entry.code != value.code:
            return False
        return not value.system_given or entry.system == value.system
    if isinstance(entry, StringEntry) and isinstance(value, StringValue):
        if modifier == "exact":
            return entry.value == value.raw
        if modifier == "contains":
            return normalize_string(value.raw) in normalize_string(entry.value)
        return normalize_string(entry.value).startswith(normalize_string(value.raw))
    if isinstance(entry, DateEntry) and isinstance(value, DateValue):
        return _DATE_TESTS[value.prefix](entry.low, entry.high, value.low, value.high)
    if isinstance(entry, ReferenceEntry) and isinstance(value, ReferenceValue):
        return entry.id == value.id and (value.type is None or entry.type == value.type)
    if isinstance(entry, QuantityEntry) and isinstance(value, QuantityValue):
        if not _compare(entry.value, value.prefix, value.value, value.low, value.high):
            return False
        if value.system is not None:
            return entry.system == value.system and (value.code is None or entry.code == value.code)
        return value.code is None or value.code in (entry.code, entry.unit)
    if isinstance(entry, NumberEntry) and isinstance(value, NumberValue):
        return _compare(entry.value, value.prefix, value.value, value.low, value.high)
    if isinstance(entry, UriEntry) and isinstance(value, StringValue):
        return entry.value == value.raw
    raise TypeError(f"cannot match {type(entry).__name__} against {type(value).__name__}")
