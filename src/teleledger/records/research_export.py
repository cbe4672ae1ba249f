"""The de-identified research export of a ResearchStudy (issue 5, point 6); who may export
(membership, and the guard installed here on ResearchStudy writes) is ``policy.research``.

Export: for one study, the principal is the member researcher with ``actor_refs =
{ResearchStudy/<id>}`` and purpose HRESCH (for the export only: the account's ordinary
principal never acts as the study). The patients are those whose consents in force now
(``ConsentIndex.search_view``) permit that principal; their data is read through
``RecordsService`` with that principal, so ``decide`` filters every row and each read is an
audited access event (action ``export``, purpose HRESCH) — revoking the consent (opting out)
removes the patient from the next export. Each resource is de-identified with the study's key
(``records.deidentify``: master key → ``teleledger research v1`` → ``StudyKeys.for_study``).

This module never logs PHI, does no HTTP, and never returns a resource that is not de-identified.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from teleledger.core.errors import NotFound
from teleledger.fhir import compartment
from teleledger.fhir import query as fq
from teleledger.policy.model import Principal
from teleledger.policy.research import EXPORT_TYPES, membership_guard, study_id_of, study_principal
from teleledger.records.deidentify import Deidentifier, StudyKeys
from teleledger.storage.db import UnitOfWork

__all__ = ["RESEARCH_KEY_PURPOSE", "ResearchExport", "research_export"]

#: the master-key derivation label of the research key (changing it changes every pseudonym)
RESEARCH_KEY_PURPOSE = "teleledger research v1"
_PAGE = 500


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
        so a refusal comes before the first line."""
        study = self.study_principal(principal, study_id)
        deid = Deidentifier(self._keys.for_study(study_id_of(study_id)))
        return self._lines(study, deid)

    def _lines(self, study: Principal, deid: Deidentifier) -> Iterator[tuple[str, str]]:
        consenting = frozenset(self.patients(study))
        if not consenting:
            return
        for rtype in EXPORT_TYPES:
            for resource in self._read(study, rtype, consenting):
                owners = sorted(compartment.patient_ids(resource) & consenting)
                if not owners:
                    continue
                # one date shift per patient: a resource of several patients takes the first's
                out = deid.resource(owners[0], resource)
                yield rtype, json.dumps(out, separators=(",", ":"), sort_keys=True)

    def _read(self, study: Principal, rtype: str, consenting: frozenset[str]) -> Iterator[dict]:
        """Every ``rtype`` resource the study principal may see, page by page, each page one unit
        of work whose rows the policy filtered and the auditor recorded (action ``export``)."""
        records = self.records
        offset = 0
        while True:
            ps = fq.parse_search(rtype, [], strict=True, max_count=_PAGE, default_count=_PAGE)
            with UnitOfWork(self.node.engine) as uow:
                # RecordsService has no public "search for export"; its search core applies
                # decide + the consent view and its audit hook records the rows, as search does
                _, page, _ = records._run_search(uow.c, study, ps, limit=_PAGE, offset=offset)
                if page:
                    records._accessed(uow.c, study, "export", page)
                uow.commit()
            for s in page:
                if s.body is not None and compartment.patient_ids(s.body) & consenting:
                    yield s.body
            if len(page) < _PAGE:
                return
            offset += _PAGE
