"""The de-identified research export of a ResearchStudy (issue 5, point 6); who may export
(membership, and the guard installed here on ResearchStudy writes) is ``policy.research``.

Export: for one study, the principal is the member researcher with ``actor_refs =
{ResearchStudy/<id>}`` and purpose HRESCH (for the export only: the account's ordinary
principal never acts as the study). The patients are those whose consents in force now
(``ConsentIndex.search_view``) permit that principal; their data is read through
``RecordsService`` with that principal, so ``decide`` filters every row — revoking the consent
(opting out) removes the patient from the next export. Each resource is de-identified with the
study's key (``records.deidentify``: master key → ``teleledger research v1`` →
``StudyKeys.for_study``).

Audit (issue 3: every export appends access events, in the log and as AuditEvents): each page
of exported resources is recorded in the unit of work that read it, before any of its lines is
handed out — one event per patient whose data it holds, naming exactly the resource versions
exported (action ``export``, purpose HRESCH, outcome allowed, reason ``study:<id>``); an export
that finds nothing is recorded once without a patient; a refused export (not a member, not a
researcher, no such study) is recorded as denied (reason ``not-study-member``) before the 403.

This module never logs PHI, does no HTTP, and never returns a resource that is not de-identified.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from teleledger.core.errors import Forbidden, NotFound
from teleledger.fhir import compartment
from teleledger.fhir import query as fq
from teleledger.policy.model import Principal
from teleledger.policy.research import EXPORT_TYPES, membership_guard, study_id_of, study_principal
from teleledger.records.audit import touched
from teleledger.records.deidentify import Deidentifier, StudyKeys
from teleledger.records.service import AccessDenied
from teleledger.storage.db import UnitOfWork

__all__ = ["RESEARCH_KEY_PURPOSE", "ResearchExport", "research_export"]

#: the master-key derivation label of the research key (changing it changes every pseudonym)
RESEARCH_KEY_PURPOSE = "teleledger research v1"
_PAGE = 500
#: what a refused export's access event gives as its reason (``policy.research.study_principal``)
DENIED_REASON = "not-study-member"
_PURPOSE = "HRESCH"


def research_export(node: Any) -> "ResearchExport":
    """The node's export service, built once (installing the membership write guard)."""
    svc = getattr(node, "_research_export", None)
    if svc is None:
        svc = ResearchExport(node)
        node._research_export = svc
    return svc


class ResearchExport:
    """See the module docstring. ``node`` needs ``engine``, ``master``, ``records``, ``consents``."""

    def __init__(self, node: Any) -> None:
        self.node = node
        self.records = node.records
        self._keys = StudyKeys(node.master.derive(RESEARCH_KEY_PURPOSE))
        self.records.add_write_guard("research-membership", ["ResearchStudy"], membership_guard)

    def study_principal(self, principal: Principal, study_id: str) -> Principal:
        """The researcher acting as the study (``policy.research.study_principal``), or Forbidden."""
        ident = study_id_of(study_id)
        with UnitOfWork(self.node.engine) as uow:
            try:
                study = self.records.store.read(uow.c, "ResearchStudy", ident).body
            except NotFound:
                study = None
        return study_principal(principal, ident, study)

    def patients(self, study: Principal) -> list[str]:
        """Patients whose consents in force now permit the study (for HRESCH)."""
        index = self.node.consents
        if index is None:
            return []
        view = index.search_view(study)
        return sorted({p for patients, _ in view.permits for p in patients})

    def export(self, principal: Principal, study_id: str) -> Iterator[tuple[str, str]]:
        """``(resource type, NDJSON line)`` in resource-type order; membership is checked first,
        so a refusal (recorded as a denied export) comes before the first line."""
        ident = study_id_of(study_id)  # a malformed id is bad input (400), not an access attempt
        try:
            study = self.study_principal(principal, ident)
        except Forbidden as exc:
            # the attempt is on record although no patient's data was touched
            self.records.record_denial(replace(principal, purpose=_PURPOSE), AccessDenied(
                exc.message, action="export", reason=DENIED_REASON, patients=frozenset()))
            raise
        deid = Deidentifier(self._keys.for_study(ident))
        return self._lines(study, deid, reason=f"study:{ident}"[:64])  # the width of access_events.reason

    def _lines(self, study: Principal, deid: Deidentifier, *, reason: str) -> Iterator[tuple[str, str]]:
        consenting = frozenset(self.patients(study))
        exported = 0
        for rtype in EXPORT_TYPES if consenting else ():
            for resource in self._read(study, rtype, consenting, reason=reason):
                owners = sorted(compartment.patient_ids(resource) & consenting)
                # one date shift per patient: a resource of several patients takes the first's
                out = deid.resource(owners[0], resource)
                exported += 1
                yield rtype, json.dumps(out, separators=(",", ":"), sort_keys=True)
        if not exported:
            # an export that found nothing still happened: recorded once, naming no patient
            self._record(study, [], reason=reason)

    def _read(self, study: Principal, rtype: str, consenting: frozenset[str], *, reason: str) -> Iterator[dict]:
        """Every ``rtype`` resource the study principal may see that belongs to a consenting
        patient, page by page; each page one unit of work whose rows the policy filtered and
        whose exported rows are recorded (action ``export``) before the first is handed out."""
        records = self.records
        offset = 0
        while True:
            ps = fq.parse_search(rtype, [], strict=True, max_count=_PAGE, default_count=_PAGE)
            with UnitOfWork(self.node.engine) as uow:
                # RecordsService has no public "search for export"; its search core applies
                # decide + the consent view, as search does
                _, page, _ = records._run_search(uow.c, study, ps, limit=_PAGE, offset=offset)
                # what is recorded is exactly what is exported
                out = [s for s in page if s.body is not None and compartment.patient_ids(s.body) & consenting]
                if out:
                    self._record(study, out, reason=reason, conn=uow.c)
                uow.commit()
            for s in out:
                yield s.body
            if len(page) < _PAGE:
                return
            offset += _PAGE

    def _record(self, study: Principal, stored: list, *, reason: str, conn: Any = None) -> None:
        """The access events of exported resource versions (``records.audit``: one per patient),
        in ``conn``'s unit of work, or in one of their own."""
        auditor = self.records.auditor
        if auditor is None:
            return
        if conn is not None:
            auditor.access(conn, study, "export", touched(stored), reason=reason)
            return
        with UnitOfWork(self.node.engine) as uow:
            auditor.access(uow.c, study, "export", touched(stored), reason=reason)
            uow.commit()
