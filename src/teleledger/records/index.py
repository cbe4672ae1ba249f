"""Turn a resource's search-parameter values into index rows, hashing what identifies a patient.

The extraction (which values a parameter has) is the pure ``teleledger.fhir.searchparams``;
this module decides how each value is *stored*: keyed hash, coarsened, or clear (see
``storage.tables`` for the why of each).
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timezone

from teleledger.core.crypto import KeyedHash
from teleledger.fhir import searchparams as sp
from teleledger.fhir.query import normalize_string
from teleledger.policy.sensitivity import classify

#: the reserved ``idx_token`` parameter holding a version's sensitivity labels
#: (``policy.sensitivity.classify``), so a search can apply a consent's label rules in SQL; the
#: label is stored as a keyed hash like every token (a row saying "HIV" is itself sensitive)
LABEL_PARAM = "_sensitivity"
LABEL_SYSTEM = "urn:teleledger:sensitivity"

# prefixes longer than this are not indexed: a prefix search longer than it is matched on the
# exact term or after decryption
MAX_PREFIX = 32
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def year_range(low_us: int, high_us: int) -> tuple[int, int]:
    """Coarsen a date range to whole UTC years (for birth dates: the index must not hold the day)."""
    lo = _EPOCH.timestamp()
    y1 = datetime.fromtimestamp(lo + low_us / 1e6, tz=timezone.utc).year if low_us > -62135596800_000_000 else 1
    y2 = datetime.fromtimestamp(lo + high_us / 1e6, tz=timezone.utc).year if high_us < 253402300799_000_000 else 9999
    start = int((datetime(y1, 1, 1, tzinfo=timezone.utc) - _EPOCH).total_seconds() * 1_000_000)
    end = (
        int((datetime(y2 + 1, 1, 1, tzinfo=timezone.utc) - _EPOCH).total_seconds() * 1_000_000) - 1
        if y2 < 9999
        else high_us
    )
    return start, end


def token_hashes(h: KeyedHash, system: str | None, code: str) -> tuple[str, str, str]:
    return h.digest("c", code), h.digest("s", system or ""), h.digest("sc", system or "", code)


def label_hashes(h: KeyedHash, label: str) -> tuple[str, str, str]:
    """The ``idx_token`` hashes of one sensitivity label row (``LABEL_PARAM``)."""
    return token_hashes(h, LABEL_SYSTEM, label)


def string_terms(h: KeyedHash, value: str) -> set[str]:
    norm = normalize_string(value)
    terms = {h.digest("e", value)}
    for i in range(1, min(len(norm), MAX_PREFIX) + 1):
        terms.add(h.digest("p", norm[:i]))
    return terms


def build_rows(resource: dict, res_type: str, res_id: str, h: KeyedHash) -> dict[str, list[tuple]]:
    """Index rows per table name for one resource version, each a tuple in the table's column
    order (``storage.tables``: res_type, res_id, param, then the table's own columns)."""
    params = sp.params_for(res_type)
    rows: dict[str, list[tuple]] = defaultdict(list)
    seen: set = set()
    for entry in sp.extract(resource):
        if entry in seen:
            continue
        seen.add(entry)
        param = params.get(entry.param)
        if param is None:
            continue
        name = entry.param
        if isinstance(entry, sp.TokenEntry):
            c, s, sc = token_hashes(h, entry.system, entry.code)
            rows["idx_token"].append((res_type, res_id, name, c, s, sc))
        elif isinstance(entry, sp.StringEntry):
            if param.phi:
                hashed = rows["idx_string_hash"]
                for term in string_terms(h, entry.value):
                    hashed.append((res_type, res_id, name, term))
            else:
                rows["idx_string"].append((res_type, res_id, name, normalize_string(entry.value)[:255], entry.value))
        elif isinstance(entry, sp.DateEntry):
            low, high = (year_range(entry.low, entry.high)) if param.phi else (entry.low, entry.high)
            rows["idx_date"].append((res_type, res_id, name, low, high))
        elif isinstance(entry, sp.ReferenceEntry):
            rows["idx_reference"].append((res_type, res_id, name, entry.type or "", entry.id))
        elif isinstance(entry, sp.QuantityEntry):
            rows["idx_quantity"].append(
                (res_type, res_id, name, float(entry.value), entry.system or "", entry.code or entry.unit or "")
            )
    for label in sorted(classify(resource)):
        rows["idx_token"].append((res_type, res_id, LABEL_PARAM, *label_hashes(h, label)))
    # blind-index terms repeat across name parts: store each once
    if "idx_string_hash" in rows:
        rows["idx_string_hash"] = list({(r[2], r[3]): r for r in rows["idx_string_hash"]}.values())
    return rows
