"""FHIR R4 search parameters: which ones teleledger supports, and the values a resource has for them.

The definitions follow the R4 SearchParameter registry (https://hl7.org/fhir/R4/searchparameter-registry.html);
where the registry's FHIRPath is richer than the tiny path language below, the definition says
how it was narrowed. The common parameters ``_id`` and ``_lastUpdated`` are answered by the store
from its own columns and are not defined here.

``extract(resource)`` turns one resource (a plain JSON dict) into ``IndexEntry`` values, typed by
the parameter type (https://hl7.org/fhir/R4/search.html#ptypes):

* token     → ``TokenEntry(system, code)``: Coding, each coding of a CodeableConcept (its text is
              not indexed), Identifier (system|value), ContactPoint (value, no system), and
              code/string/id primitives; booleans become "true"/"false".
* string    → ``StringEntry(value)``: the raw string; a HumanName gives one entry per part (text,
              family, given, prefix, suffix) and, for a ``name`` parameter, the full "given family"
              form; an Address one per line, city, district, state, postalCode, country and text.
* date      → ``DateEntry(low, high)``: the inclusive range the value covers, in microseconds
              since the Unix epoch, UTC (see ``date_range``); a Period from its start to its end.
* reference → ``ReferenceEntry(type, id)`` from ``Reference.reference``; references that name no
              resource of this server (``#contained``, ``urn:uuid:``, conditional ``Type?…``) give none.
* quantity  → ``QuantityEntry(value, system, code, unit)``; number → ``NumberEntry``; uri → ``UriEntry``.

Path language (deliberately tiny, not FHIRPath): ``Type.a.b`` walks elements, flattening arrays
at every step; ``a[x]`` is any choice type of ``a`` (``effective[x]`` → effectiveDateTime,
effectivePeriod, …); ``a.as(Quantity)`` is one choice type; ``.where(system='email')`` keeps the
items whose child equals the literal; a final ``.exists()`` yields one boolean, true when there
is a value and none of them is ``false`` (the registry's ``deceased.exists() and deceased != false``).
``.where(resolve() is Patient)`` restrictions are expressed by ``SearchParam.targets``: a reference
whose type is not among the targets is not indexed. `` | `` separates alternatives (one per item
of ``SearchParam.paths``).

This module is a pure core: standard library and ``teleledger.core`` only, no I/O. ``extract`` runs
on every write, so it works on the dicts as they are and allocates little.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from types import MappingProxyType
from typing import Any, Literal, Union

from teleledger.core.errors import InvalidInput

__all__ = [
    "ParamType",
    "SearchParam",
    "TokenEntry",
    "StringEntry",
    "DateEntry",
    "ReferenceEntry",
    "QuantityEntry",
    "NumberEntry",
    "UriEntry",
    "IndexEntry",
    "MIN_US",
    "MAX_US",
    "params_for",
    "supported_types",
    "extract",
    "extract_param",
    "evaluate",
    "date_range",
    "normalize_string",
    "parse_reference",
]

ParamType = Literal["token", "string", "date", "reference", "quantity", "number", "uri"]


@dataclass(frozen=True, slots=True)
class SearchParam:
    resource_type: str
    name: str
    type: ParamType
    paths: tuple[str, ...]
    #: reference target types; for a reference parameter also a filter: other types are not indexed
    targets: tuple[str, ...] = ()
    #: the indexed values identify a patient (the store keeps them as keyed hashes / coarsened)
    phi: bool = False


# ---- index entries -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenEntry:
    param: str
    system: str | None
    code: str


@dataclass(frozen=True, slots=True)
class StringEntry:
    param: str
    value: str


@dataclass(frozen=True, slots=True)
class DateEntry:
    """An inclusive range [low, high] in microseconds since 1970-01-01T00:00:00Z."""

    param: str
    low: int
    high: int


@dataclass(frozen=True, slots=True)
class ReferenceEntry:
    param: str
    type: str | None
    id: str


@dataclass(frozen=True, slots=True)
class QuantityEntry:
    param: str
    value: Decimal
    system: str | None
    code: str | None
    unit: str | None


@dataclass(frozen=True, slots=True)
class NumberEntry:
    param: str
    value: Decimal


@dataclass(frozen=True, slots=True)
class UriEntry:
    param: str
    value: str


IndexEntry = Union[TokenEntry, StringEntry, DateEntry, ReferenceEntry, QuantityEntry, NumberEntry, UriEntry]


# ---- dates ---------------------------------------------------------------------------------

_US_PER_DAY = 86_400_000_000


def _days_from_civil(y: int, m: int, d: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).

    Integer arithmetic instead of ``datetime``: no overflow when a time zone pushes a value
    outside years 1..9999, and several times faster on the write path.
    """
    y -= m <= 2
    era = (y if y >= 0 else y - 399) // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_ONE_US = timedelta(microseconds=1)
_MAX_OFFSET = timedelta(hours=14)

#: 0001-01-01T00:00:00Z and 9999-12-31T23:59:59.999999Z: the open ends of a range
MIN_US = _days_from_civil(1, 1, 1) * _US_PER_DAY
MAX_US = _days_from_civil(10000, 1, 1) * _US_PER_DAY - 1

_DATE_RE = re.compile(
    r"(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d+))?)?(Z|[+-]\d{2}:\d{2})?)?)?)?",
    re.ASCII,  # \d must not match other scripts' digits (int("１９８９") == 1989)
)
_DIM = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)

_DATE_FORMS = "YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDThh:mm[:ss[.fff]][Z|(+|-)hh:mm]"


def date_range(text: str, *, param: str | None = None) -> tuple[int, int]:
    """The inclusive range ``(low, high)`` a FHIR date/dateTime/instant covers, in µs since the epoch, UTC.

    The range follows the precision given (https://hl7.org/fhir/R4/search.html#date): ``1927`` is the
    whole year, ``1927-05`` the month, ``1927-05-21`` the day, ``…T10:00`` the minute, ``…T10:00:05``
    the second, ``…T10:00:05.12`` that hundredth of a second. A dateTime with a time zone is
    converted to UTC. A date, or a dateTime without a time zone, is interpreted as UTC: the spec
    lets the server pick its own zone, and a fixed one keeps the index independent of where the
    server runs. A leap second (``:60``) is the last microsecond of second 59.

    Raises ``InvalidInput`` naming ``param`` (when given) and the accepted forms.
    """
    if type(text) is str and (
        (len(text) == 25 and text[19] in "+-" and text[22] == ":") or (len(text) == 20 and text[19] == "Z")
    ) and text[4] == text[7] == "-" and text[10] == "T" and text[13] == text[16] == ":" and text.isascii():
        # fast path for the form most systems write (seconds and a zone): the C parser validates
        # it; anything it refuses (e.g. a leap second) takes the general path below
        try:
            dt = datetime.fromisoformat(text)
        except ValueError:
            pass
        else:
            offset = dt.utcoffset()
            if offset is not None and -_MAX_OFFSET <= offset <= _MAX_OFFSET:
                low = (dt - _EPOCH) // _ONE_US
                return _clamp(low, low + 999_999)
    m = _DATE_RE.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise _bad_date(text, param, "")
    ys, mos, ds, hs, mis, ss, frac, tz = m.groups()
    y = int(ys)
    if y == 0:
        raise _bad_date(text, param, "year 0000 does not exist")
    if mos is None:
        return _clamp(_days_from_civil(y, 1, 1) * _US_PER_DAY, _days_from_civil(y + 1, 1, 1) * _US_PER_DAY - 1)
    mo = int(mos)
    if not 1 <= mo <= 12:
        raise _bad_date(text, param, "month must be 01-12")
    if ds is None:
        nxt = _days_from_civil(y + 1, 1, 1) if mo == 12 else _days_from_civil(y, mo + 1, 1)
        return _days_from_civil(y, mo, 1) * _US_PER_DAY, nxt * _US_PER_DAY - 1
    d = int(ds)
    leap = y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)
    if not 1 <= d <= (29 if mo == 2 and leap else _DIM[mo - 1]):
        raise _bad_date(text, param, f"day {ds} does not exist in {ys}-{mos}")
    day = _days_from_civil(y, mo, d) * _US_PER_DAY
    if hs is None:
        return day, day + _US_PER_DAY - 1
    h, mi = int(hs), int(mis)
    if h > 23 or mi > 59:
        raise _bad_date(text, param, "time must be 00:00-23:59")
    low = day + (h * 3600 + mi * 60) * 1_000_000
    if ss is None:
        width = 60_000_000
    else:
        s = int(ss)
        if s > 60:
            raise _bad_date(text, param, "seconds must be 00-60")
        if s == 60:  # leap second: no POSIX time for it, pin it to the end of second 59
            low += 59_999_999
            width = 1
        elif frac is None:
            low += s * 1_000_000
            width = 1_000_000
        else:
            low += s * 1_000_000 + int(frac[:6].ljust(6, "0"))
            width = 10 ** (6 - len(frac)) if len(frac) < 6 else 1
    if tz is not None and tz != "Z":
        th, tm = int(tz[1:3]), int(tz[4:6])
        if tm > 59 or th * 60 + tm > 14 * 60:
            raise _bad_date(text, param, "time zone offset must be within ±14:00")
        offset = (th * 3600 + tm * 60) * 1_000_000
        low = low - offset if tz[0] == "+" else low + offset
    return _clamp(low, low + width - 1)


def _clamp(low: int, high: int) -> tuple[int, int]:
    """Keep a range inside [MIN_US, MAX_US] (a zone offset can push year 1 or 9999 out of it)."""
    return min(max(low, MIN_US), MAX_US), max(min(high, MAX_US), MIN_US)


def _bad_date(text: Any, param: str | None, why: str) -> InvalidInput:
    where = f"search parameter '{param}': " if param else ""
    detail = f" ({why})" if why else ""
    return InvalidInput(f"{where}expected a FHIR date ({_DATE_FORMS}), got {str(text)[:64]!r}{detail}")


# ---- strings -------------------------------------------------------------------------------


def normalize_string(s: str) -> str:
    """Case- and accent-insensitive form of a string (https://hl7.org/fhir/R4/search.html#string).

    NFKD (``ﬁ`` → ``fi``, ``é`` → ``e`` + accent), combining marks dropped, then case folded
    (``ß`` → ``ss``; folding last also lowers the capitals a decomposition produces, ``㎒`` →
    ``MHz`` → ``mhz``). Idempotent on every code point (tested), which the store relies on: it
    applies this to both the indexed value and the searched one.
    """
    if s.isascii():
        return s.lower()
    return "".join(c for c in unicodedata.normalize("NFKD", s) if not unicodedata.combining(c)).casefold()


# ---- references ----------------------------------------------------------------------------

_ID = r"[A-Za-z0-9\-.]{1,64}"
_TYPE = r"[A-Z][A-Za-z]{0,63}"
_RELATIVE_REF = re.compile(rf"({_TYPE})/({_ID})(?:/_history/{_ID})?")
_ABSOLUTE_REF = re.compile(rf"[A-Za-z][A-Za-z0-9+.\-]*://.*/({_TYPE})/({_ID})(?:/_history/{_ID})?")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")


@lru_cache(maxsize=4096)  # the same patient/practitioner references recur on every write
def parse_reference(ref: str) -> tuple[str, str] | None:
    """``(type, id)`` of a literal reference, ``None`` when it names no resource of this server.

    ``Patient/1``, ``Patient/1/_history/2`` and ``https://host/fhir/Patient/1`` give
    ``("Patient", "1")`` (the version is dropped: the index is version-independent). Contained
    (``#p1``), ``urn:uuid:``/``urn:oid:`` (resolved by the Bundle logic before storing),
    conditional (``Patient?identifier=…``) references and absolute URLs that do not end in
    ``Type/id`` give ``None``. Anything else is malformed: ``ValueError``.
    """
    m = _RELATIVE_REF.fullmatch(ref)
    if m is not None:
        return m.group(1), m.group(2)
    if not ref or ref[0] == "#" or "?" in ref:
        return None
    if _SCHEME.match(ref):
        m = _ABSOLUTE_REF.fullmatch(ref)
        return (m.group(1), m.group(2)) if m is not None else None
    raise ValueError(f"expected a reference 'Type/id' (or an absolute URL, '#id', 'urn:uuid:…'), got {ref[:80]!r}")


# ---- the path evaluator --------------------------------------------------------------------

_FIELD, _CHOICE, _ANY_CHOICE, _WHERE, _EXISTS = range(5)

#: type suffixes of R4 choice elements (``value[x]`` → ``valueQuantity`` …)
_CHOICE_SUFFIXES = frozenset(
    "Base64Binary Boolean Canonical Code Date DateTime Decimal Id Instant Integer Markdown Oid PositiveInt "
    "String Time UnsignedInt Uri Url Uuid Address Age Annotation Attachment CodeableConcept Coding "
    "ContactPoint Count Distance Duration HumanName Identifier Money Period Quantity Range Ratio Reference "
    "SampledData Signature Timing ContactDetail Contributor DataRequirement Expression ParameterDefinition "
    "RelatedArtifact TriggerDefinition UsageContext Dosage Meta".split()
)

_STEP = re.compile(
    r"""\.(?:
        where\(\s*(?P<wf>[A-Za-z]\w*)\s*=\s*'(?P<wv>[^']*)'\s*\)
      | as\(\s*(?P<as>[A-Za-z]\w*)\s*\)
      | (?P<exists>exists\(\))
      | (?P<field>[A-Za-z]\w*)(?P<choice>\[x\])?
    )""",
    re.X,
)
_HEAD = re.compile(r"[A-Z][A-Za-z]*")

Step = tuple[int, Any, Any]


@lru_cache(maxsize=512)
def _compile(path: str) -> tuple[Step, ...]:
    """``Type.a.b[x].where(system='x')`` → steps. Malformed paths are programming errors: ``ValueError``."""
    head = _HEAD.match(path)
    if head is None:
        raise ValueError(f"path must start with a resource type: {path!r}")
    pos, steps = head.end(), []
    while pos < len(path):
        m = _STEP.match(path, pos)
        if m is None:
            raise ValueError(f"cannot parse path {path!r} at {path[pos:]!r}")
        pos = m.end()
        if steps and steps[-1][0] == _EXISTS:
            raise ValueError(f"exists() must end the path: {path!r}")
        if m.group("field"):
            steps.append((_ANY_CHOICE if m.group("choice") else _FIELD, m.group("field"), None))
        elif m.group("as"):
            if not steps or steps[-1][0] != _FIELD:
                raise ValueError(f"as() must follow an element name: {path!r}")
            t = m.group("as")
            steps[-1] = (_CHOICE, steps[-1][1] + t[0].upper() + t[1:], None)
        elif m.group("exists"):
            steps.append((_EXISTS, None, None))
        else:
            steps.append((_WHERE, m.group("wf"), m.group("wv")))
    return tuple(steps)


def _run(root: dict, steps: tuple[Step, ...]) -> list[Any]:
    current: list[Any] = [root]
    for kind, a, b in steps:
        if kind == _EXISTS:
            return [bool(current) and all(x is not False for x in current)]
        if kind == _WHERE:
            current = [x for x in current if isinstance(x, dict) and x.get(a) == b]
            continue
        nxt: list[Any] = []
        if kind == _ANY_CHOICE:
            n = len(a)
            for item in current:
                if isinstance(item, dict):
                    for k, v in item.items():
                        if k.startswith(a) and k[n:] in _CHOICE_SUFFIXES:
                            if isinstance(v, list):
                                nxt.extend(v)
                            else:
                                nxt.append(v)
        else:  # _FIELD, _CHOICE: one key
            for item in current:
                if isinstance(item, dict):
                    v = item.get(a)
                    if isinstance(v, list):
                        nxt.extend(v)
                    elif v is not None:
                        nxt.append(v)
        current = nxt
    return current


def evaluate(resource: dict, path: str) -> list[Any]:
    """The values ``path`` selects in ``resource`` (arrays flattened; JSON ``null``s kept)."""
    return _run(resource, _compile(path))


# ---- values → entries ----------------------------------------------------------------------

#: HumanName and Address parts that a string search matches (search.html#string)
_STRING_PARTS = ("text", "family", "given", "prefix", "suffix", "line", "city", "district", "state", "postalCode", "country")


@dataclass(frozen=True, slots=True)
class _Plan:
    param: SearchParam
    steps: tuple[tuple[Step, ...], ...]
    convert: Callable[[_Plan, list[Any], list[IndexEntry]], None]
    #: token: the element is a ContactPoint (its value is the code, its system is not a URI)
    contact: bool = False


def _tokens(plan: _Plan, values: list[Any], out: list[IndexEntry]) -> None:
    name = plan.param.name
    for v in values:
        if isinstance(v, str):
            if v:
                out.append(TokenEntry(name, None, v))
        elif isinstance(v, bool):
            out.append(TokenEntry(name, None, "true" if v else "false"))
        elif isinstance(v, dict):
            codings = v.get("coding")
            if codings is not None:  # CodeableConcept: its text is not a token
                for c in codings:
                    code = c.get("code") if isinstance(c, dict) else None
                    if code:
                        out.append(TokenEntry(name, c.get("system"), code))
                continue
            val = v.get("value")
            if isinstance(val, str):  # Identifier or ContactPoint
                if val:
                    out.append(TokenEntry(name, None if plan.contact else v.get("system"), val))
                continue
            code = v.get("code")
            if isinstance(code, str) and code:  # Coding
                out.append(TokenEntry(name, v.get("system"), code))


def _strings(plan: _Plan, values: list[Any], out: list[IndexEntry]) -> None:
    name = plan.param.name
    full_name = name == "name"
    for v in values:
        if isinstance(v, str):
            if v:
                out.append(StringEntry(name, v))
        elif isinstance(v, dict):  # HumanName or Address
            for key in _STRING_PARTS:
                part = v.get(key)
                if part is None:
                    continue
                if isinstance(part, str):
                    if part:
                        out.append(StringEntry(name, part))
                else:
                    out.extend(StringEntry(name, p) for p in part if isinstance(p, str) and p)
            if full_name:
                given = v.get("given") or ()
                family = v.get("family")
                words = [g for g in given if isinstance(g, str) and g]
                if isinstance(family, str) and family:
                    words.append(family)
                if len(words) > 1:
                    out.append(StringEntry(name, " ".join(words)))


def _dates(plan: _Plan, values: list[Any], out: list[IndexEntry]) -> None:
    name = plan.param.name
    try:
        for v in values:
            if isinstance(v, str):
                low, high = date_range(v, param=name)
                out.append(DateEntry(name, low, high))
            elif isinstance(v, dict):
                start, end = v.get("start"), v.get("end")
                if start is not None or end is not None:  # Period: an open end is unbounded
                    low = date_range(start, param=name)[0] if start is not None else MIN_US
                    high = date_range(end, param=name)[1] if end is not None else MAX_US
                    out.append(DateEntry(name, low, high))
                else:  # Timing: its events
                    for e in v.get("event") or ():
                        low, high = date_range(e, param=name)
                        out.append(DateEntry(name, low, high))
    except InvalidInput as exc:
        raise InvalidInput(f"{plan.param.resource_type}: {exc.message}", expression=plan.param.paths[0]) from None


def _references(plan: _Plan, values: list[Any], out: list[IndexEntry]) -> None:
    name, targets = plan.param.name, plan.param.targets
    for v in values:
        if not isinstance(v, dict):
            continue
        ref = v.get("reference")
        if not isinstance(ref, str):
            continue  # identifier-only or display-only reference: nothing to index
        try:
            parsed = parse_reference(ref)
        except ValueError as exc:
            raise InvalidInput(
                f"{plan.param.resource_type}: search parameter '{name}': {exc}", expression=plan.param.paths[0]
            ) from None
        if parsed is None or (targets and parsed[0] not in targets):
            continue
        out.append(ReferenceEntry(name, parsed[0], parsed[1]))


def _decimal(v: Any) -> Decimal | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, Decimal):
        return v
    if isinstance(v, int):
        return Decimal(v)
    try:
        # repr of a float is its shortest round-trip form: 1.0 stays "1.0", not 1.000000000000000055…
        d = Decimal(repr(v)) if isinstance(v, float) else Decimal(v)
    except (InvalidOperation, TypeError, ValueError):
        return None
    return d if d.is_finite() else None


def _quantities(plan: _Plan, values: list[Any], out: list[IndexEntry]) -> None:
    name = plan.param.name
    for v in values:
        if isinstance(v, dict):
            d = _decimal(v.get("value"))
            if d is not None:
                out.append(QuantityEntry(name, d, v.get("system"), v.get("code"), v.get("unit")))


def _numbers(plan: _Plan, values: list[Any], out: list[IndexEntry]) -> None:
    name = plan.param.name
    for v in values:
        d = _decimal(v)
        if d is not None:
            out.append(NumberEntry(name, d))


def _uris(plan: _Plan, values: list[Any], out: list[IndexEntry]) -> None:
    name = plan.param.name
    out.extend(UriEntry(name, v) for v in values if isinstance(v, str) and v)


_CONVERTERS: dict[str, Callable[[_Plan, list[Any], list[IndexEntry]], None]] = {
    "token": _tokens,
    "string": _strings,
    "date": _dates,
    "reference": _references,
    "quantity": _quantities,
    "number": _numbers,
    "uri": _uris,
}


def _plan(param: SearchParam) -> _Plan:
    steps = tuple(_compile(p) for p in param.paths)
    fields = [s[1] for path in steps for s in path if s[0] == _FIELD]
    return _Plan(param, steps, _CONVERTERS[param.type], contact=bool(fields) and fields[-1] == "telecom")


# ---- the definitions -----------------------------------------------------------------------

# Target lists used more than once (from the R4 registry)
_WHO = ("Practitioner", "PractitionerRole", "Organization", "Patient", "RelatedPerson", "Device")
_PERSON = ("Practitioner", "PractitionerRole", "Patient", "RelatedPerson")
_PRACT = ("Practitioner", "PractitionerRole", "Organization")
_OBS_PERFORMER = ("Practitioner", "PractitionerRole", "Organization", "CareTeam", "Patient", "RelatedPerson")
_ACTOR = ("Patient", "Practitioner", "PractitionerRole", "RelatedPerson", "Device", "HealthcareService", "Location")
_PARTY = ("Practitioner", "PractitionerRole", "Organization", "Patient", "RelatedPerson")
_P = ("Patient",)

# (resource type, name, type, path[s] separated by " | ", targets, phi)
_TABLE: tuple[tuple[str, str, ParamType, str, tuple[str, ...], bool], ...] = (
    # Patient — https://hl7.org/fhir/R4/patient.html#search
    ("Patient", "identifier", "token", "Patient.identifier", (), True),
    ("Patient", "name", "string", "Patient.name", (), True),
    ("Patient", "family", "string", "Patient.name.family", (), True),
    ("Patient", "given", "string", "Patient.name.given", (), True),
    ("Patient", "birthdate", "date", "Patient.birthDate", (), True),
    ("Patient", "gender", "token", "Patient.gender", (), False),
    ("Patient", "telecom", "token", "Patient.telecom", (), True),
    ("Patient", "phone", "token", "Patient.telecom.where(system='phone')", (), True),
    ("Patient", "email", "token", "Patient.telecom.where(system='email')", (), True),
    ("Patient", "address", "string", "Patient.address", (), True),
    ("Patient", "address-city", "string", "Patient.address.city", (), True),
    ("Patient", "active", "token", "Patient.active", (), False),
    ("Patient", "general-practitioner", "reference", "Patient.generalPractitioner", _PRACT, False),
    ("Patient", "organization", "reference", "Patient.managingOrganization", ("Organization",), False),
    # registry: Patient.deceased.exists() and Patient.deceased != false
    ("Patient", "deceased", "token", "Patient.deceased[x].exists()", (), False),
    # the patient compartment's inclusion parameter for Patient
    ("Patient", "link", "reference", "Patient.link.other", ("Patient", "RelatedPerson"), False),
    # Practitioner, PractitionerRole, Organization, Location (directory data: not PHI)
    ("Practitioner", "identifier", "token", "Practitioner.identifier", (), False),
    ("Practitioner", "name", "string", "Practitioner.name", (), False),
    ("Practitioner", "family", "string", "Practitioner.name.family", (), False),
    ("Practitioner", "given", "string", "Practitioner.name.given", (), False),
    ("Practitioner", "active", "token", "Practitioner.active", (), False),
    ("Practitioner", "telecom", "token", "Practitioner.telecom", (), False),
    ("PractitionerRole", "practitioner", "reference", "PractitionerRole.practitioner", ("Practitioner",), False),
    ("PractitionerRole", "organization", "reference", "PractitionerRole.organization", ("Organization",), False),
    ("PractitionerRole", "role", "token", "PractitionerRole.code", (), False),
    ("PractitionerRole", "specialty", "token", "PractitionerRole.specialty", (), False),
    ("PractitionerRole", "location", "reference", "PractitionerRole.location", ("Location",), False),
    ("PractitionerRole", "active", "token", "PractitionerRole.active", (), False),
    ("PractitionerRole", "identifier", "token", "PractitionerRole.identifier", (), False),
    ("Organization", "identifier", "token", "Organization.identifier", (), False),
    ("Organization", "name", "string", "Organization.name | Organization.alias", (), False),
    ("Organization", "type", "token", "Organization.type", (), False),
    ("Organization", "active", "token", "Organization.active", (), False),
    ("Organization", "partof", "reference", "Organization.partOf", ("Organization",), False),
    ("Location", "identifier", "token", "Location.identifier", (), False),
    ("Location", "name", "string", "Location.name | Location.alias", (), False),
    ("Location", "address", "string", "Location.address", (), False),
    ("Location", "address-city", "string", "Location.address.city", (), False),
    ("Location", "status", "token", "Location.status", (), False),
    ("Location", "organization", "reference", "Location.managingOrganization", ("Organization",), False),
    ("Location", "type", "token", "Location.type", (), False),
    # Encounter
    ("Encounter", "patient", "reference", "Encounter.subject", _P, False),
    ("Encounter", "subject", "reference", "Encounter.subject", ("Patient", "Group"), False),
    ("Encounter", "date", "date", "Encounter.period", (), False),
    ("Encounter", "status", "token", "Encounter.status", (), False),
    ("Encounter", "class", "token", "Encounter.class", (), False),
    ("Encounter", "type", "token", "Encounter.type", (), False),
    ("Encounter", "practitioner", "reference", "Encounter.participant.individual", ("Practitioner",), False),
    ("Encounter", "participant", "reference", "Encounter.participant.individual", ("Practitioner", "PractitionerRole", "RelatedPerson"), False),
    ("Encounter", "service-provider", "reference", "Encounter.serviceProvider", ("Organization",), False),
    ("Encounter", "location", "reference", "Encounter.location.location", ("Location",), False),
    ("Encounter", "identifier", "token", "Encounter.identifier", (), False),
    ("Encounter", "reason-code", "token", "Encounter.reasonCode", (), False),
    # Observation
    ("Observation", "patient", "reference", "Observation.subject", _P, False),
    ("Observation", "subject", "reference", "Observation.subject", ("Patient", "Group", "Device", "Location"), False),
    ("Observation", "code", "token", "Observation.code", (), False),
    ("Observation", "category", "token", "Observation.category", (), False),
    ("Observation", "date", "date", "Observation.effective[x]", (), False),
    # registry: (Observation.value as Quantity) | (Observation.value as SampledData); SampledData has no single value
    ("Observation", "value-quantity", "quantity", "Observation.value.as(Quantity)", (), False),
    ("Observation", "status", "token", "Observation.status", (), False),
    ("Observation", "encounter", "reference", "Observation.encounter", ("Encounter",), False),
    ("Observation", "identifier", "token", "Observation.identifier", (), False),
    ("Observation", "performer", "reference", "Observation.performer", _OBS_PERFORMER, False),
    # Condition
    ("Condition", "patient", "reference", "Condition.subject", _P, False),
    ("Condition", "subject", "reference", "Condition.subject", ("Patient", "Group"), False),
    ("Condition", "code", "token", "Condition.code", (), False),
    ("Condition", "clinical-status", "token", "Condition.clinicalStatus", (), False),
    ("Condition", "verification-status", "token", "Condition.verificationStatus", (), False),
    ("Condition", "category", "token", "Condition.category", (), False),
    ("Condition", "onset-date", "date", "Condition.onset.as(dateTime) | Condition.onset.as(Period)", (), False),
    ("Condition", "recorded-date", "date", "Condition.recordedDate", (), False),
    ("Condition", "encounter", "reference", "Condition.encounter", ("Encounter",), False),
    ("Condition", "asserter", "reference", "Condition.asserter", _PERSON, False),
    # AllergyIntolerance
    ("AllergyIntolerance", "patient", "reference", "AllergyIntolerance.patient", _P, False),
    ("AllergyIntolerance", "code", "token", "AllergyIntolerance.code | AllergyIntolerance.reaction.substance", (), False),
    ("AllergyIntolerance", "clinical-status", "token", "AllergyIntolerance.clinicalStatus", (), False),
    ("AllergyIntolerance", "criticality", "token", "AllergyIntolerance.criticality", (), False),
    ("AllergyIntolerance", "date", "date", "AllergyIntolerance.recordedDate", (), False),
    ("AllergyIntolerance", "category", "token", "AllergyIntolerance.category", (), False),
    ("AllergyIntolerance", "recorder", "reference", "AllergyIntolerance.recorder", _PERSON, False),
    ("AllergyIntolerance", "asserter", "reference", "AllergyIntolerance.asserter", _PERSON, False),
    # Immunization (registry: Immunization.occurrence; occurrenceString is free text, not a date)
    ("Immunization", "patient", "reference", "Immunization.patient", _P, False),
    ("Immunization", "vaccine-code", "token", "Immunization.vaccineCode", (), False),
    ("Immunization", "date", "date", "Immunization.occurrence.as(dateTime)", (), False),
    ("Immunization", "status", "token", "Immunization.status", (), False),
    # Procedure (registry: Procedure.performed; performedString/Age/Range are not dates)
    ("Procedure", "patient", "reference", "Procedure.subject", _P, False),
    ("Procedure", "subject", "reference", "Procedure.subject", ("Patient", "Group"), False),
    ("Procedure", "code", "token", "Procedure.code", (), False),
    ("Procedure", "date", "date", "Procedure.performed.as(dateTime) | Procedure.performed.as(Period)", (), False),
    ("Procedure", "status", "token", "Procedure.status", (), False),
    ("Procedure", "encounter", "reference", "Procedure.encounter", ("Encounter",), False),
    ("Procedure", "performer", "reference", "Procedure.performer.actor", _WHO, False),
    # MedicationRequest
    ("MedicationRequest", "patient", "reference", "MedicationRequest.subject", _P, False),
    ("MedicationRequest", "subject", "reference", "MedicationRequest.subject", ("Patient", "Group"), False),
    ("MedicationRequest", "status", "token", "MedicationRequest.status", (), False),
    ("MedicationRequest", "intent", "token", "MedicationRequest.intent", (), False),
    ("MedicationRequest", "authoredon", "date", "MedicationRequest.authoredOn", (), False),
    ("MedicationRequest", "requester", "reference", "MedicationRequest.requester", _WHO, False),
    ("MedicationRequest", "code", "token", "MedicationRequest.medication.as(CodeableConcept)", (), False),
    ("MedicationRequest", "encounter", "reference", "MedicationRequest.encounter", ("Encounter",), False),
    ("MedicationRequest", "medication", "reference", "MedicationRequest.medication.as(Reference)", ("Medication",), False),
    # MedicationDispense
    ("MedicationDispense", "patient", "reference", "MedicationDispense.subject", _P, False),
    ("MedicationDispense", "subject", "reference", "MedicationDispense.subject", ("Patient", "Group"), False),
    ("MedicationDispense", "prescription", "reference", "MedicationDispense.authorizingPrescription", ("MedicationRequest",), False),
    ("MedicationDispense", "status", "token", "MedicationDispense.status", (), False),
    ("MedicationDispense", "whenhandedover", "date", "MedicationDispense.whenHandedOver", (), False),
    ("MedicationDispense", "performer", "reference", "MedicationDispense.performer.actor", _WHO, False),
    ("MedicationDispense", "receiver", "reference", "MedicationDispense.receiver", ("Patient", "Practitioner"), False),
    ("MedicationDispense", "code", "token", "MedicationDispense.medication.as(CodeableConcept)", (), False),
    ("MedicationDispense", "medication", "reference", "MedicationDispense.medication.as(Reference)", ("Medication",), False),
    ("Medication", "code", "token", "Medication.code", (), False),
    # DocumentReference
    ("DocumentReference", "patient", "reference", "DocumentReference.subject", _P, False),
    ("DocumentReference", "subject", "reference", "DocumentReference.subject", ("Patient", "Practitioner", "Group", "Device"), False),
    ("DocumentReference", "type", "token", "DocumentReference.type", (), False),
    ("DocumentReference", "category", "token", "DocumentReference.category", (), False),
    ("DocumentReference", "date", "date", "DocumentReference.date", (), False),
    ("DocumentReference", "status", "token", "DocumentReference.status", (), False),
    ("DocumentReference", "author", "reference", "DocumentReference.author", _WHO, False),
    ("DocumentReference", "encounter", "reference", "DocumentReference.context.encounter", ("Encounter", "EpisodeOfCare"), False),
    # Appointment, Schedule, Slot
    ("Appointment", "patient", "reference", "Appointment.participant.actor", _P, False),
    ("Appointment", "practitioner", "reference", "Appointment.participant.actor", ("Practitioner",), False),
    ("Appointment", "actor", "reference", "Appointment.participant.actor", _ACTOR, False),
    ("Appointment", "date", "date", "Appointment.start", (), False),
    ("Appointment", "status", "token", "Appointment.status", (), False),
    ("Appointment", "slot", "reference", "Appointment.slot", ("Slot",), False),
    ("Schedule", "actor", "reference", "Schedule.actor", _ACTOR, False),
    ("Schedule", "active", "token", "Schedule.active", (), False),
    ("Schedule", "date", "date", "Schedule.planningHorizon", (), False),
    ("Schedule", "specialty", "token", "Schedule.specialty", (), False),
    ("Schedule", "service-type", "token", "Schedule.serviceType", (), False),
    ("Slot", "schedule", "reference", "Slot.schedule", ("Schedule",), False),
    ("Slot", "status", "token", "Slot.status", (), False),
    ("Slot", "start", "date", "Slot.start", (), False),
    ("Slot", "service-type", "token", "Slot.serviceType", (), False),
    ("Slot", "specialty", "token", "Slot.specialty", (), False),
    # Communication
    ("Communication", "patient", "reference", "Communication.subject", _P, False),
    ("Communication", "subject", "reference", "Communication.subject", ("Patient", "Group"), False),
    ("Communication", "sender", "reference", "Communication.sender", (*_WHO, "HealthcareService"), False),
    ("Communication", "recipient", "reference", "Communication.recipient", (*_WHO, "Group", "CareTeam", "HealthcareService"), False),
    ("Communication", "sent", "date", "Communication.sent", (), False),
    ("Communication", "received", "date", "Communication.received", (), False),
    ("Communication", "encounter", "reference", "Communication.encounter", ("Encounter",), False),
    ("Communication", "status", "token", "Communication.status", (), False),
    ("Communication", "category", "token", "Communication.category", (), False),
    ("Communication", "part-of", "reference", "Communication.partOf", (), False),
    # Composition (signed clinical notes, visits.notes)
    ("Composition", "patient", "reference", "Composition.subject", _P, False),
    ("Composition", "subject", "reference", "Composition.subject", (), False),
    ("Composition", "encounter", "reference", "Composition.encounter", ("Encounter",), False),
    ("Composition", "author", "reference", "Composition.author", ("Practitioner", "PractitionerRole", "Device", "Patient", "RelatedPerson", "Organization"), False),
    ("Composition", "attester", "reference", "Composition.attester.party", _PARTY, False),
    ("Composition", "type", "token", "Composition.type", (), False),
    ("Composition", "category", "token", "Composition.category", (), False),
    ("Composition", "status", "token", "Composition.status", (), False),
    ("Composition", "date", "date", "Composition.date", (), False),
    ("Composition", "identifier", "token", "Composition.identifier", (), False),
    ("Composition", "section", "token", "Composition.section.code", (), False),
    # CareTeam
    ("CareTeam", "patient", "reference", "CareTeam.subject", _P, False),
    ("CareTeam", "participant", "reference", "CareTeam.participant.member", (*_PARTY, "CareTeam"), False),
    ("CareTeam", "status", "token", "CareTeam.status", (), False),
    ("CareTeam", "category", "token", "CareTeam.category", (), False),
    # Consent
    ("Consent", "patient", "reference", "Consent.patient", _P, False),
    ("Consent", "status", "token", "Consent.status", (), False),
    ("Consent", "scope", "token", "Consent.scope", (), False),
    ("Consent", "category", "token", "Consent.category", (), False),
    ("Consent", "actor", "reference", "Consent.provision.actor.reference", (*_PARTY, "Device", "Group", "CareTeam"), False),
    ("Consent", "date", "date", "Consent.dateTime", (), False),
    ("Consent", "purpose", "token", "Consent.provision.purpose", (), False),
    ("Consent", "period", "date", "Consent.provision.period", (), False),
    # AuditEvent (IHE BALP: the patient is the entity whose what is a Patient; the registry also
    # takes agent.who when it is a Patient, which would file a patient's access to someone else's
    # data in the accessor's compartment: not done)
    ("AuditEvent", "agent", "reference", "AuditEvent.agent.who", _WHO, False),
    ("AuditEvent", "patient", "reference", "AuditEvent.entity.what", _P, False),
    ("AuditEvent", "entity", "reference", "AuditEvent.entity.what", (), False),
    ("AuditEvent", "date", "date", "AuditEvent.recorded", (), False),
    ("AuditEvent", "outcome", "token", "AuditEvent.outcome", (), False),
    ("AuditEvent", "type", "token", "AuditEvent.type", (), False),
    ("AuditEvent", "subtype", "token", "AuditEvent.subtype", (), False),
    ("AuditEvent", "action", "token", "AuditEvent.action", (), False),
    ("AuditEvent", "source", "reference", "AuditEvent.source.observer", _WHO, False),
    # not in the R4 registry (R5 has it): purpose of use, which BALP records in both places
    ("AuditEvent", "purpose", "token", "AuditEvent.purposeOfEvent | AuditEvent.agent.purposeOfUse", (), False),
    ("AuditEvent", "policy", "uri", "AuditEvent.agent.policy", (), False),
    # Claim, ExplanationOfBenefit, Coverage
    ("Claim", "patient", "reference", "Claim.patient", _P, False),
    ("Claim", "status", "token", "Claim.status", (), False),
    ("Claim", "use", "token", "Claim.use", (), False),
    ("Claim", "created", "date", "Claim.created", (), False),
    ("Claim", "provider", "reference", "Claim.provider", _PRACT, False),
    ("Claim", "insurer", "reference", "Claim.insurer", ("Organization",), False),
    ("Claim", "encounter", "reference", "Claim.item.encounter", ("Encounter",), False),
    ("Claim", "payee", "reference", "Claim.payee.party", _PARTY, False),
    ("ExplanationOfBenefit", "patient", "reference", "ExplanationOfBenefit.patient", _P, False),
    ("ExplanationOfBenefit", "status", "token", "ExplanationOfBenefit.status", (), False),
    ("ExplanationOfBenefit", "claim", "reference", "ExplanationOfBenefit.claim", ("Claim",), False),
    ("ExplanationOfBenefit", "created", "date", "ExplanationOfBenefit.created", (), False),
    ("ExplanationOfBenefit", "provider", "reference", "ExplanationOfBenefit.provider", _PRACT, False),
    ("ExplanationOfBenefit", "payee", "reference", "ExplanationOfBenefit.payee.party", _PARTY, False),
    ("Coverage", "beneficiary", "reference", "Coverage.beneficiary", _P, False),
    ("Coverage", "patient", "reference", "Coverage.beneficiary", _P, False),
    ("Coverage", "payor", "reference", "Coverage.payor", ("Organization", "Patient", "RelatedPerson"), False),
    ("Coverage", "status", "token", "Coverage.status", (), False),
    ("Coverage", "policy-holder", "reference", "Coverage.policyHolder", ("Organization", "Patient", "RelatedPerson"), False),
    ("Coverage", "subscriber", "reference", "Coverage.subscriber", ("Patient", "RelatedPerson"), False),
    # ResearchStudy, ResearchSubject
    ("ResearchStudy", "identifier", "token", "ResearchStudy.identifier", (), False),
    ("ResearchStudy", "title", "string", "ResearchStudy.title", (), False),
    ("ResearchStudy", "status", "token", "ResearchStudy.status", (), False),
    ("ResearchStudy", "category", "token", "ResearchStudy.category", (), False),
    ("ResearchStudy", "date", "date", "ResearchStudy.period", (), False),
    ("ResearchStudy", "sponsor", "reference", "ResearchStudy.sponsor", ("Organization",), False),
    ("ResearchSubject", "patient", "reference", "ResearchSubject.individual", _P, False),
    ("ResearchSubject", "individual", "reference", "ResearchSubject.individual", _P, False),
    ("ResearchSubject", "study", "reference", "ResearchSubject.study", ("ResearchStudy",), False),
    ("ResearchSubject", "status", "token", "ResearchSubject.status", (), False),
    ("ResearchSubject", "date", "date", "ResearchSubject.period", (), False),
    # RelatedPerson: a patient's relative is identified by the same kind of data as the patient
    ("RelatedPerson", "patient", "reference", "RelatedPerson.patient", _P, False),
    ("RelatedPerson", "identifier", "token", "RelatedPerson.identifier", (), True),
    ("RelatedPerson", "name", "string", "RelatedPerson.name", (), True),
    ("RelatedPerson", "relationship", "token", "RelatedPerson.relationship", (), False),
    # Device, DiagnosticReport, Provenance
    ("Device", "patient", "reference", "Device.patient", _P, False),
    ("Device", "type", "token", "Device.type", (), False),
    ("DiagnosticReport", "patient", "reference", "DiagnosticReport.subject", _P, False),
    ("DiagnosticReport", "subject", "reference", "DiagnosticReport.subject", ("Patient", "Group", "Device", "Location"), False),
    ("DiagnosticReport", "code", "token", "DiagnosticReport.code", (), False),
    ("DiagnosticReport", "date", "date", "DiagnosticReport.effective[x]", (), False),
    ("DiagnosticReport", "status", "token", "DiagnosticReport.status", (), False),
    ("DiagnosticReport", "category", "token", "DiagnosticReport.category", (), False),
    ("Provenance", "target", "reference", "Provenance.target", (), False),
    # R4's Provenance is in a compartment only when it targets the Patient itself; R5 added
    # Provenance.patient, carried in R4 by its cross-version extension, so that the Provenance
    # of a patient's signed note is that patient's data (visits.notes)
    ("Provenance", "patient", "reference", "Provenance.target | Provenance.extension.where(url='http://hl7.org/fhir/5.0/StructureDefinition/extension-Provenance.patient').valueReference", _P, False),
    ("Provenance", "agent", "reference", "Provenance.agent.who", _WHO, False),
    ("Provenance", "recorded", "date", "Provenance.recorded", (), False),
)


def _build() -> tuple[dict[str, Mapping[str, SearchParam]], dict[str, tuple[_Plan, ...]]]:
    by_type: dict[str, dict[str, SearchParam]] = {}
    for rt, name, ptype, paths, targets, phi in _TABLE:
        param = SearchParam(rt, name, ptype, tuple(p.strip() for p in paths.split(" | ")), targets, phi)
        if any(not p.startswith(rt + ".") for p in param.paths):
            raise ValueError(f"path of {rt}.{name} does not start at {rt}: {param.paths}")
        if name in by_type.setdefault(rt, {}):
            raise ValueError(f"{rt}.{name} is defined twice")
        by_type[rt][name] = param
    params = {rt: MappingProxyType(ps) for rt, ps in by_type.items()}
    plans = {rt: tuple(_plan(p) for p in ps.values()) for rt, ps in by_type.items()}
    return params, plans


_PARAMS, _PLANS = _build()
_EMPTY: Mapping[str, SearchParam] = MappingProxyType({})
_SUPPORTED = tuple(sorted(_PARAMS))


def params_for(resource_type: str) -> Mapping[str, SearchParam]:
    """The search parameters of ``resource_type`` by name (empty for an unsupported type)."""
    return _PARAMS.get(resource_type, _EMPTY)


def supported_types() -> tuple[str, ...]:
    """Resource types that have search parameters here, sorted."""
    return _SUPPORTED


def extract(resource: dict) -> list[IndexEntry]:
    """All index entries of one resource, without duplicates, in definition order.

    Raises ``InvalidInput`` when a date or a relative reference in the resource is malformed:
    indexing it wrongly (or not at all) would hide it from searches and from its patient's
    compartment, so the write must fail instead.
    """
    plans = _PLANS.get(resource.get("resourceType"))  # type: ignore[arg-type]
    if plans is None:
        return []
    out: list[IndexEntry] = []
    for plan in plans:
        steps = plan.steps
        values = _run(resource, steps[0]) if len(steps) == 1 else [v for s in steps for v in _run(resource, s)]
        if values:
            plan.convert(plan, values, out)
    return list(dict.fromkeys(out))


@lru_cache(maxsize=512)
def _plan_of(param: SearchParam) -> _Plan:
    return _plan(param)


def extract_param(resource: dict, param: SearchParam) -> list[IndexEntry]:
    """The index entries of one parameter (also for parameters not in the table, e.g. in tests)."""
    plan = _plan_of(param)
    values = [v for s in plan.steps for v in _run(resource, s)]
    out: list[IndexEntry] = []
    if values:
        plan.convert(plan, values, out)
    return list(dict.fromkeys(out))
