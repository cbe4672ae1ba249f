"""Who may act as a ResearchStudy (research sharing, issue 5 point 6): the membership rule,
the guard that keeps it unforgeable, and the principal an export runs as.

Rule: a **researcher** account is a member of ``ResearchStudy/<id>`` when the study's current
version carries the extension ``MEMBER_EXTENSION`` with ``valueString`` = the account id.
Researchers may edit ResearchStudy entries (the directory rule of ``policy.decide``), so the
list would be theirs to forge; ``membership_guard`` (a records write guard) lets only an admin
or a trusted service add or remove members — any other writer must leave the list as it was.

A member exporting acts as the study: ``study_principal`` gives a principal with ``actor_refs =
{ResearchStudy/<id>}``, purpose HRESCH and read/search scopes on the exportable types only. The
account's ordinary principal never carries the study ref, so outside an export a consent to the
study gives the researcher nothing. This module is pure: no I/O, never PHI.
"""

from __future__ import annotations

from teleledger.core.errors import Forbidden, InvalidInput
from teleledger.identity.scopes import ScopeSet
from teleledger.policy.model import Principal
from teleledger.policy.service import DATA_CLASSES

__all__ = ["EXPORT_TYPES", "MEMBER_EXTENSION", "members", "membership_guard", "study_id_of", "study_principal"]

MEMBER_EXTENSION = "https://teleledger.dev/fhir/StructureDefinition/research-team-member"
#: what an export may carry: the portal's data classes and the patient's own (de-identified) entry
EXPORT_TYPES: tuple[str, ...] = tuple(sorted({"Patient", *(c for c, _ in DATA_CLASSES)}))
#: the study principal's scopes: read and search of the exportable types, nothing else
_SCOPES = " ".join(f"user/{rt}.rs" for rt in EXPORT_TYPES)
_DENIED = "only a researcher on the study may export its data"


def members(study: dict | None) -> frozenset[str]:
    """Account ids the ResearchStudy names as members (``MEMBER_EXTENSION``)."""
    if not study:
        return frozenset()
    return frozenset(e["valueString"] for e in study.get("extension") or []
                     if isinstance(e, dict) and e.get("url") == MEMBER_EXTENSION
                     and isinstance(e.get("valueString"), str))


def membership_guard(conn: object, principal: Principal, res_type: str, res_id: str | None,
                     before: dict | None, after: dict | None) -> None:
    """A records write guard on ResearchStudy: only an admin or a service changes its members."""
    if principal.role in ("admin", "service"):
        return
    if members(before) != members(after):
        raise Forbidden("only an administrator may change the members of a research study")


def study_id_of(value: str) -> str:
    """``<id>`` or ``ResearchStudy/<id>`` → ``<id>``; anything else is InvalidInput."""
    kind, sep, ident = value.partition("/") if isinstance(value, str) else ("", "", "")
    if sep and kind != "ResearchStudy":
        raise InvalidInput(f"expected ResearchStudy/ID, found {value!r}")
    ident = ident if sep else value
    if not isinstance(ident, str) or not 0 < len(ident) <= 64 or \
            not all((ch.isascii() and ch.isalnum()) or ch in "-." for ch in ident):
        raise InvalidInput("expected a ResearchStudy id (1–64 letters, digits, '-' or '.')")
    return ident


def study_principal(principal: Principal, study_id: str, study: dict | None) -> Principal:
    """``principal`` acting as ``ResearchStudy/<study_id>`` (whose current content is ``study``,
    None when unknown) for an export, or Forbidden — the same answer for an unknown study, so
    the directory cannot be probed."""
    if principal.role != "researcher" or principal.subject not in members(study):
        raise Forbidden(_DENIED)
    return Principal(subject=principal.subject, role="researcher", scopes=ScopeSet.parse(_SCOPES),
                     patient_id=None, practitioner_id=None, purpose="HRESCH",
                     actor_refs=frozenset({f"ResearchStudy/{study_id}"}))
