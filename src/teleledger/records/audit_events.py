"""Access events served as FHIR ``AuditEvent`` resources shaped after IHE BALP.

The events are written by ``records.audit`` (one per patient per request, allowed or denied)
and mirrored in the transparency log; here they are only read. Each AuditEvent carries the
base64 leaf hash of its log entry in an extension, so a reader can ask the log for an inclusion
proof (``GET /ledger/proof/inclusion?hash=...``). Who may read which events is decided by
``policy.decide.audit_filter``.

BALP: https://profiles.ihe.net/ITI/BALP/ ; AuditEvent: https://hl7.org/fhir/R4/auditevent.html
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from urllib.parse import urlencode

from sqlalchemy import Engine, and_, func, not_, or_, select

from teleledger.core.errors import Forbidden, InvalidInput, NotFound
from teleledger.fhir import query as fq
from teleledger.policy import decide as policy
from teleledger.policy.model import Principal
from teleledger.records.store import instant
from teleledger.storage import tables as t
from teleledger.storage.db import UnitOfWork

LEAF_HASH_URL = "https://teleledger.dev/fhir/StructureDefinition/log-leaf-hash"
A = t.access_events

_ACTION_CODE = {"create": "C", "import": "C", "read": "R", "vread": "R", "history": "R", "export": "R",
                "search": "E", "everything": "E", "update": "U", "delete": "D", "ui": "R"}
# AuditEvent.outcome (http://hl7.org/fhir/audit-event-outcome): 0 success, 4 minor failure
_OUTCOME = {"allowed": "0", "denied": "4"}
_OUTCOME_BACK = {"0": "allowed", "4": "denied"}
SUPPORTED = ("patient", "agent", "date", "outcome", "action", "subtype", "purpose", "_id")


def render(row, observer: str) -> dict:  # type: ignore[no-untyped-def]
    who = {"reference": row.fhir_user} if row.fhir_user else {
        "identifier": {"system": "urn:teleledger:account", "value": row.actor}}
    entities = []
    if row.patient_id:
        entities.append({
            "what": {"reference": f"Patient/{row.patient_id}"},
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "1"},
            "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1"},
        })
    for ref in filter(None, row.refs.split(" ")):
        entities.append({
            "what": {"reference": ref},
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2"},
        })
    event = {
        "resourceType": "AuditEvent",
        "id": str(row.id),
        "meta": {"versionId": "1", "lastUpdated": instant(row.recorded)},
        "extension": [{"url": LEAF_HASH_URL, "valueBase64Binary": base64.b64encode(row.leaf_hash).decode()}],
        "type": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110110", "display": "Patient Record"},
        "subtype": [{"system": "http://hl7.org/fhir/restful-interaction", "code": row.action}],
        "action": _ACTION_CODE.get(row.action, "E"),
        "recorded": instant(row.recorded),
        "outcome": _OUTCOME[row.outcome],
        "purposeOfEvent": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                                        "code": row.purpose}]}],
        "agent": [{"who": who, "requestor": True, "role": [{"text": row.role}]}],
        "source": {"observer": {"display": observer},
                   "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4"}]},
    }
    if row.reason:
        event["outcomeDesc"] = row.reason
    if entities:
        event["entity"] = entities
    return event


class AuditEventService:
    def __init__(self, engine: Engine, *, base_url: str, observer: str, default_count: int = 50,
                 max_count: int = 1000) -> None:
        self.engine = engine
        self.base_url = base_url
        self.observer = observer
        self.default_count = default_count
        self.max_count = max_count

    def _restriction(self, principal: Principal):  # type: ignore[no-untyped-def]
        f = policy.audit_filter(principal)
        name = type(f).__name__
        if name == "All":
            return None
        if name == "Compartments":
            return A.c.patient_id.in_(sorted(f.patient_ids))
        if name == "OwnActions":
            return A.c.actor == f.subject
        raise Forbidden("your account may not read audit events (scope or role)")

    def read(self, principal: Principal, event_id: str) -> dict:
        restriction = self._restriction(principal)
        if not event_id.isdigit() or len(event_id) > 18:
            raise NotFound(f"AuditEvent/{event_id[:40]} is not known")
        with UnitOfWork(self.engine) as uow:
            q = select(A).where(A.c.id == int(event_id))
            row = uow.c.execute(q).first()
            if row is None:
                raise NotFound(f"AuditEvent/{event_id} is not known")
            if restriction is not None and not uow.c.execute(q.where(restriction)).first():
                raise Forbidden(f"AuditEvent/{event_id} is not about you or your actions")
        return render(row, self.observer)

    def _conditions(self, ps: fq.ParsedSearch) -> list:
        where = []
        for cond in ps.conditions:
            ors = []
            for v in cond.values:
                if cond.name == "_id":
                    code = getattr(v, "code", None) or ""
                    ors.append(A.c.id == int(code) if code.isdigit() and len(code) < 18 else A.c.id == -1)
                elif cond.name == "patient":
                    ors.append(A.c.patient_id == v.id)
                elif cond.name == "agent":
                    ors.append(or_(A.c.fhir_user == f"{v.type}/{v.id}" if v.type else A.c.fhir_user.like(f"%/{v.id}"),
                                   A.c.actor == v.id))
                elif cond.name == "date":
                    c = A.c.recorded
                    ors.append({"eq": and_(c >= v.low, c <= v.high), "ne": or_(c < v.low, c > v.high),
                                "gt": c > v.high, "lt": c < v.low, "ge": c >= v.low, "le": c <= v.high,
                                "sa": c > v.high, "eb": c < v.low}[v.prefix])
                elif cond.name == "outcome":
                    ors.append(A.c.outcome == _OUTCOME_BACK.get(v.code or "", "?"))
                elif cond.name == "subtype":
                    ors.append(A.c.action == (v.code or ""))
                elif cond.name == "action":
                    ors.append(A.c.action.in_([a for a, code in _ACTION_CODE.items() if code == v.code]))
                elif cond.name == "purpose":
                    ors.append(A.c.purpose == (v.code or ""))
                else:
                    raise InvalidInput(f"AuditEvent search by {cond.name} is not supported; "
                                       f"use {', '.join(SUPPORTED)}")
            clause = or_(*ors)
            where.append(not_(clause) if cond.modifier == "not" else clause)
        return where

    def search(self, principal: Principal, items: Sequence[tuple[str, str]], *, strict: bool = False) -> dict:
        restriction = self._restriction(principal)
        ps = fq.parse_search("AuditEvent", items, strict=strict, max_count=self.max_count,
                             default_count=self.default_count)
        if ps.include or ps.revinclude:
            raise InvalidInput("_include and _revinclude are not supported on AuditEvent")
        where = self._conditions(ps)
        if restriction is not None:
            where.append(restriction)
        desc = not ps.sort or ps.sort[0][1]
        count = ps.count
        with UnitOfWork(self.engine) as uow:
            total = uow.c.execute(select(func.count()).select_from(A).where(*where)).scalar_one()
            rows = [] if ps.summary == "count" or count == 0 else uow.c.execute(
                select(A).where(*where).order_by(A.c.recorded.desc() if desc else A.c.recorded.asc(),
                                                 A.c.id.desc() if desc else A.c.id.asc())
                .limit(count).offset(ps.offset)).all()
        base = [(k, v) for k, v in items if k not in ("_offset", "_count")]

        def url(off: int) -> str:
            return f"{self.base_url}/fhir/AuditEvent?" + urlencode([*base, ("_count", str(max(count, 1))),
                                                                    ("_offset", str(off))])

        links = [{"relation": "self", "url": url(ps.offset)}]
        if ps.offset + count < total and count:
            links.append({"relation": "next", "url": url(ps.offset + count)})
        bundle: dict = {"resourceType": "Bundle", "type": "searchset", "total": total, "link": links}
        if rows:
            bundle["entry"] = [{"fullUrl": f"{self.base_url}/fhir/AuditEvent/{r.id}",
                                "resource": render(r, self.observer), "search": {"mode": "match"}} for r in rows]
        return bundle
