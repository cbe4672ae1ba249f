"""Patient-controlled consent, end to end: a FHIR Consent → EIP-712 signatures by the patient →
ConsentRegistry (through the chain outbox) → the indexer → the in-memory ``ConsentIndex`` that
every access decision consults; and break-glass claims.

Use cases (each one unit of work, committed once):

* ``grant`` (POST /fhir/Consent): only the patient the Consent is about (delegates: not yet);
  ``parse_consent`` with every actor checked against the store (unknown actor → 400); the
  Consent is stored; when it is ``active`` the outbox gets, in the SAME transaction, the
  patient's ``bind_patient`` (first time only, countersigned by this node's authority as an
  operator of its organization) and one ``grant_by_sig`` per grantee, each an EIP-712 signature
  by the patient's keystore key (``user:<username>``) relayed by ``node:authority``.
* ``update`` (PUT): the grants of the previous version are revoked (``revoke_by_sig``) and, if
  the new version is active, the new one granted — so narrowing or ending a consent is a PUT.
* ``withdraw`` (DELETE): revokes every grant and deletes the Consent.
* ``break_glass``: a practitioner's emergency claim (``policy.consent_index``), audited with
  purpose BTG and listed to the patient (``claims_for_patient``).

What goes on chain: the patient pseudonym (HMAC of the patient id under a node secret), the
grantee as a keyed hash of its reference, the salted ``provision_hash`` and the period — never
PHI. The salt stays here (``consent_grants``).

Projection: the indexer's projectors on ConsentGranted / ConsentRevoked look the chain key up in
``consent_grants``, read that Consent version from the store and call ``apply_grant`` /
``apply_revoke``; at start ``rebuild`` replays every stored chain event, so processes on one
database agree once their indexer has caught up. Revocation latency: the outbox worker's send
and ``chain_confirmations`` blocks, plus one indexer poll (``chain_poll_interval``, 0.5 s by
default); on the embedded chain about a second. A process without the chain (standby) sees new
events only after a restart (known limitation).

EIP-712 nonces: the contract's per-pseudonym nonce is predicted here (``consent_patients.
next_nonce``, taken under a row lock) because the signature is made when the row is enqueued,
not when it is sent; every signed action of a patient goes through this node's outbox in order.
A reverted row desynchronizes the prediction (known limitation: re-sync from
``ConsentRegistry.nonces``).

This module never logs PHI (no Consent content, no break-glass reason) and does no HTTP.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

from eth_keys import keys
from sqlalchemy import Connection, Engine, insert, select, update

from teleledger.core.errors import Conflict, Forbidden, InvalidInput, NotFound, TeleledgerError
from teleledger.ledger.chain import eip712
from teleledger.ledger.chain.client import ChainUnavailable, Event
from teleledger.ledger.chain.indexer import events as chain_events
from teleledger.ledger.chain.outbox import enqueue
from teleledger.policy.consent import ANYONE, ConsentRules, parse_consent, provision_hash
from teleledger.policy.consent_index import BreakGlassClaim, ConsentIndex, may_claim_break_glass
from teleledger.policy.consent_tables import break_glass_claims, consent_grants, consent_patients
from teleledger.policy.model import DEFAULT_POLICY, DefaultPolicy, Principal
from teleledger.storage import tables as t
from teleledger.storage.db import UnitOfWork

__all__ = ["ConsentService", "GrantRow"]

log = logging.getLogger("teleledger.consent")

REGISTRY = "ConsentRegistry"
RELAYER = "node:authority"
#: a signature stays usable this long: the outbox may hold a row through a chain outage
SIGNATURE_LIFETIME = 30 * 24 * 3600


def _now_us() -> int:
    return time.time_ns() // 1000


def _hex(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return "0x" + bytes(value).hex()
    s = str(value).lower()
    return s if s.startswith("0x") else "0x" + s


def _uint64(ts: float) -> int:
    """A period bound as the contract stores it: seconds, 0 = unbounded."""
    return 0 if math.isinf(ts) else max(0, math.ceil(ts))


def _vrs(key: keys.PrivateKey, digest: bytes) -> tuple[int, bytes, bytes]:
    sig = key.sign_msg_hash(digest)
    return sig.v + 27, sig.r.to_bytes(32, "big"), sig.s.to_bytes(32, "big")


@dataclass(frozen=True)
class GrantRow:
    """A grant as the portal shows it: who may see what until when, and whether it is in force."""

    consent_id: str
    grantee_ref: str
    valid_from: int
    valid_until: int
    status: str  # granted | revoked (as sent to the chain)
    in_force: bool  # the index (chain-projected) holds it


#: what the portal offers to share, by resource type (FHIR class codes)
DATA_CLASSES: tuple[tuple[str, str], ...] = (
    ("Observation", "Results and vital signs"), ("Condition", "Conditions and diagnoses"),
    ("MedicationRequest", "Prescriptions"), ("AllergyIntolerance", "Allergies"),
    ("Immunization", "Immunizations"), ("Procedure", "Procedures"), ("DiagnosticReport", "Reports"),
    ("Encounter", "Visits"), ("Composition", "Clinical notes"), ("DocumentReference", "Documents"),
)
#: sensitivity labels a patient may keep out of a grant (v3 ActCode, ``policy.sensitivity``)
LABELS: tuple[tuple[str, str], ...] = (
    ("PSY", "Mental health"), ("HIV", "HIV"), ("ETH", "Substance use"), ("GDIS", "Genetics"),
    ("SEX", "Sexual and reproductive health"),
)
#: the directory types a grant may name, with the purpose a grant to them is for
ACTOR_KINDS: dict[str, str] = {"Practitioner": "TREAT", "Organization": "TREAT", "ResearchStudy": "HRESCH"}
_PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"


def build_consent(patient_id: str, actor: str, classes: list[str], exclude_labels: list[str], start: str | None,
                  end: str | None) -> dict:
    """The FHIR Consent a portal grant form describes (validated later by ``parse_consent``):
    ``actor`` may see ``classes`` (all data when empty) except what carries ``exclude_labels``,
    for the purpose its kind implies, within [start, end]."""
    kind = actor.partition("/")[0]
    purpose = ACTOR_KINDS.get(kind)
    if purpose is None:
        raise InvalidInput("choose a practitioner, an organization or a research study to share with")
    known_classes, known_labels = {c for c, _ in DATA_CLASSES}, {code for code, _ in LABELS}
    if set(classes) - known_classes or set(exclude_labels) - known_labels:
        raise InvalidInput("unknown data class or sensitivity label")
    provision: dict[str, Any] = {
        "type": "permit",
        "actor": [{"reference": {"reference": actor},
                   "role": {"coding": [{"system": _PARTICIPATION, "code": "PRCP"}]}}],
        "action": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentaction", "code": "access"}]}],
        "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": purpose}],
    }
    if classes:
        provision["class"] = [{"system": "http://hl7.org/fhir/resource-types", "code": c} for c in sorted(classes)]
    period = {k: v for k, v in (("start", start), ("end", end)) if v}
    if period:
        provision["period"] = period
    if exclude_labels:
        provision["provision"] = [{"type": "deny", "securityLabel": [
            {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": code} for code in sorted(exclude_labels)]}]
    scope = "research" if purpose == "HRESCH" else "patient-privacy"
    return {
        "resourceType": "Consent", "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": scope}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{patient_id}"},
        "dateTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "provision": provision,
    }


def _display(r: dict) -> str:
    names = r.get("name")
    if isinstance(names, str):
        return names
    if isinstance(names, list) and names and isinstance(names[0], dict):
        n = names[0]
        return " ".join([*(n.get("given") or []), n.get("family") or ""]).strip() or n.get("text") or r["id"]
    return r.get("title") or r["id"]


class ConsentService:
    """See the module docstring."""

    def __init__(self, *, engine: Engine, records: Any, keystore: Any, chain: Any, index: ConsentIndex,
                 auditor: Any, pseudonym_key: bytes, grantee_key: bytes,
                 default: DefaultPolicy = DEFAULT_POLICY, now: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.records = records
        self.keystore = keystore
        self.chain = chain
        self.index = index
        self.auditor = auditor
        self._pseudonym_key = pseudonym_key
        self._grantee_key = grantee_key
        self.default = default
        self._now = now
        if chain is not None and chain.indexer is not None:
            chain.indexer.on("ConsentGranted", self._on_granted)
            chain.indexer.on("ConsentRevoked", self._on_revoked)

    # ------------------------------------------------------------------ hashes

    def pseudonym(self, patient_id: str) -> bytes:
        """The patient as ConsentRegistry knows them: HMAC-SHA-256 of the id under a node secret."""
        return hmac.new(self._pseudonym_key, f"Patient/{patient_id}".encode(), hashlib.sha256).digest()

    def grantee_hash(self, ref: str) -> bytes:
        """The grantee as ConsentRegistry knows it: a keyed hash of its reference (or ``*``)."""
        return hmac.new(self._grantee_key, ref.encode(), hashlib.sha256).digest()

    # ------------------------------------------------------------------ policy

    @staticmethod
    def _check_manager(principal: Principal, patient_id: str) -> None:
        """Only the patient grants and revokes their consents (delegates: not in this version)."""
        if principal.role != "patient" or principal.patient_id != patient_id:
            raise Forbidden("only the patient a Consent is about may grant, change or revoke it")

    def _actor_exists(self, conn: Connection) -> Callable[[str], bool]:
        def exists(ref: str) -> bool:
            kind, _, ident = ref.partition("/")
            return self.records.store.exists(conn, kind, ident)

        return exists

    def _parse(self, conn: Connection, resource: Any) -> ConsentRules:
        if not isinstance(resource, dict):
            raise InvalidInput("expected a Consent object")
        return parse_consent(resource, actor_exists=self._actor_exists(conn))

    # ------------------------------------------------------------------ chain plumbing

    def _chain(self) -> tuple[int, str]:
        if self.chain is None:
            raise Conflict("consents are recorded on the chain: this node runs with TELELEDGER_CHAIN_ENABLED=false")
        if self.chain.client is None:
            raise ChainUnavailable("this process is on standby for the chain: consents are granted by the process "
                                   "holding the chain")
        return self.chain.client.chain_id(), self.chain.addresses[REGISTRY]

    def _signer(self, principal: Principal) -> tuple[keys.PrivateKey, str]:
        """The patient's keystore key. Before the use case's unit of work: creating a key commits
        on its own, which would wait for the write lock that unit of work holds on SQLite."""
        if principal.role != "patient":
            raise Forbidden("only the patient a Consent is about may grant, change or revoke it")
        with self.engine.connect() as conn:
            name = conn.execute(select(t.users.c.username).where(t.users.c.id == principal.subject)).scalar()
        if name is None:
            raise Forbidden("consents are signed by a patient with an account on this node")
        key_id = f"user:{name}"
        return self.keystore.key(key_id), self.keystore.address(key_id)

    def _next_nonce(self, conn: Connection, patient_id: str, key: keys.PrivateKey, address: str,
                    chain_id: int, contract: str) -> tuple[bytes, int]:
        """The patient's pseudonym and the nonce for their next signed action; binds them first."""
        pseudonym = self.pseudonym(patient_id)
        q = select(consent_patients.c.next_nonce).where(consent_patients.c.patient_id == patient_id)
        if conn.dialect.name == "postgresql":
            q = q.with_for_update()
        nonce = conn.execute(q).scalar()
        if nonce is not None:
            return pseudonym, int(nonce)
        deadline = int(self._now()) + SIGNATURE_LIFETIME
        bind = eip712.BindPatient(pseudonym=pseudonym, signer=address, nonce=0, deadline=deadline)
        v, r, s = _vrs(key, eip712.digest(bind, chain_id=chain_id, verifying_contract=contract))
        enqueue(conn, kind="consent", key=f"consent-bind:{pseudonym.hex()}", contract=REGISTRY, fn="bind_patient",
                args=[self.chain.org, pseudonym, address, deadline, v, r, s], sender=RELAYER)
        conn.execute(insert(consent_patients).values(patient_id=patient_id, pseudonym=_hex(pseudonym), next_nonce=1,
                                                     created=_now_us()))
        return pseudonym, 1

    def _use_nonce(self, conn: Connection, patient_id: str, nonce: int) -> None:
        conn.execute(update(consent_patients).where(consent_patients.c.patient_id == patient_id)
                     .values(next_nonce=nonce + 1))

    def _enqueue_grants(self, conn: Connection, signer: tuple[keys.PrivateKey, str], consent_id: str, version: int,
                        rules: ConsentRules) -> list[str]:
        chain_id, contract = self._chain()
        key, address = signer
        salt = os.urandom(32)
        phash = provision_hash(rules, salt)
        vf, vu = _uint64(rules.period.start_ts), _uint64(rules.period.end_ts)
        deadline = int(self._now()) + SIGNATURE_LIFETIME
        keys_: list[str] = []
        for ref in sorted(rules.grantees):
            pseudonym, nonce = self._next_nonce(conn, rules.patient_id, key, address, chain_id, contract)
            grantee = self.grantee_hash(ref)
            msg = eip712.GrantConsent(pseudonym=pseudonym, grantee=grantee, provision_hash=phash, valid_from=vf,
                                      valid_until=vu, nonce=nonce, deadline=deadline)
            v, r, s = _vrs(key, eip712.digest(msg, chain_id=chain_id, verifying_contract=contract))
            okey = f"consent-grant:{consent_id}:{version}:{grantee.hex()[:32]}"
            enqueue(conn, kind="consent", key=okey, contract=REGISTRY, fn="grant_by_sig",
                    args=[pseudonym, grantee, phash, vf, vu, deadline, v, r, s], sender=RELAYER)
            self._use_nonce(conn, rules.patient_id, nonce)
            conn.execute(insert(consent_grants).values(
                consent_id=consent_id, consent_version=version, grantee_ref=ref, patient_id=rules.patient_id,
                pseudonym=_hex(pseudonym), grantee_h=_hex(grantee), provision_hash=_hex(phash), salt=salt,
                valid_from=vf, valid_until=vu, status="granted", created=_now_us()))
            keys_.append(okey)
        return keys_

    def _enqueue_revokes(self, conn: Connection, signer: tuple[keys.PrivateKey, str], consent_id: str) -> list[str]:
        rows = conn.execute(select(consent_grants).where(consent_grants.c.consent_id == consent_id,
                                                         consent_grants.c.status == "granted")
                            .order_by(consent_grants.c.consent_version, consent_grants.c.grantee_ref)).all()
        if not rows:
            return []
        chain_id, contract = self._chain()
        key, address = signer
        deadline = int(self._now()) + SIGNATURE_LIFETIME
        keys_: list[str] = []
        for row in rows:
            pseudonym, nonce = self._next_nonce(conn, row.patient_id, key, address, chain_id, contract)
            grantee, phash = bytes.fromhex(row.grantee_h[2:]), bytes.fromhex(row.provision_hash[2:])
            msg = eip712.RevokeConsent(pseudonym=pseudonym, grantee=grantee, provision_hash=phash, nonce=nonce,
                                       deadline=deadline)
            v, r, s = _vrs(key, eip712.digest(msg, chain_id=chain_id, verifying_contract=contract))
            okey = f"consent-revoke:{consent_id}:{row.consent_version}:{grantee.hex()[:32]}"
            enqueue(conn, kind="consent", key=okey, contract=REGISTRY, fn="revoke_by_sig",
                    args=[pseudonym, grantee, phash, deadline, v, r, s], sender=RELAYER)
            self._use_nonce(conn, row.patient_id, nonce)
            conn.execute(update(consent_grants).where(
                consent_grants.c.consent_id == consent_id, consent_grants.c.consent_version == row.consent_version,
                consent_grants.c.grantee_ref == row.grantee_ref).values(status="revoked"))
            keys_.append(okey)
        return keys_

    def _kick(self) -> None:
        if self.chain is not None and self.chain.worker is not None:
            self.chain.worker.kick()

    # ------------------------------------------------------------------ use cases

    def grant(self, principal: Principal, resource: Any) -> tuple[Any, list[str]]:
        """POST /fhir/Consent → (the stored Consent, the outbox keys of its chain writes)."""
        signer = self._signer(principal)
        with UnitOfWork(self.engine) as uow:
            c = uow.c
            rules = self._parse(c, resource)
            self._check_manager(principal, rules.patient_id)
            if rules.status == "active":
                self._chain()  # refuse before storing anything when the chain cannot record it
            stored, _ = self.records.create_in(c, principal, resource)
            keys_ = (self._enqueue_grants(c, signer, stored.res_id, stored.version, rules)
                     if rules.status == "active" else [])
            uow.commit()
        self._kick()
        return stored, keys_

    def update(self, principal: Principal, consent_id: str, resource: Any) -> tuple[Any, list[str]]:
        """PUT /fhir/Consent/<id>: revoke what the previous version granted, grant the new one."""
        signer = self._signer(principal)
        with UnitOfWork(self.engine) as uow:
            c = uow.c
            rules = self._parse(c, resource)
            self._check_manager(principal, rules.patient_id)
            current = self.records.store.current(c, "Consent", consent_id, for_update=True)
            if current is not None and current.body is not None:
                old = parse_consent(current.body)
                self._check_manager(principal, old.patient_id)
            self._chain()
            stored, _ = self.records.update_in(c, principal, "Consent", consent_id, resource)
            keys_ = self._enqueue_revokes(c, signer, consent_id)
            if rules.status == "active":
                keys_ += self._enqueue_grants(c, signer, consent_id, stored.version, rules)
            uow.commit()
        self._kick()
        return stored, keys_

    def withdraw(self, principal: Principal, consent_id: str) -> tuple[Any, list[str]]:
        """DELETE /fhir/Consent/<id>: revoke every grant, then delete the Consent."""
        signer = self._signer(principal)
        with UnitOfWork(self.engine) as uow:
            c = uow.c
            current = self.records.store.current(c, "Consent", consent_id, for_update=True)
            if current is None or current.body is None:
                raise NotFound(f"Consent/{consent_id} is not known")
            old = parse_consent(current.body)
            self._check_manager(principal, old.patient_id)
            keys_ = self._enqueue_revokes(c, signer, consent_id)
            stored = self.records.delete_in(c, principal, "Consent", consent_id)
            uow.commit()
        self._kick()
        return stored, keys_

    # ------------------------------------------------------------------ projection

    def _lookup(self, conn: Connection, event: Any) -> Any:
        args = event.args
        return conn.execute(select(consent_grants).where(
            consent_grants.c.pseudonym == _hex(args["pseudonym"]), consent_grants.c.grantee_h == _hex(args["grantee"]),
            consent_grants.c.provision_hash == _hex(args["provision_hash"]))
            .order_by(consent_grants.c.consent_version.desc())).first()

    def _project(self, conn: Connection, event: Any, *, granted: bool) -> None:
        row = self._lookup(conn, event)
        if row is None:
            return  # another organization's consent: this node has nothing to enforce for it
        ref = (int(event.block_number), int(event.log_index))
        try:
            if not granted:
                self.index.apply_revoke(row.consent_id, row.patient_id, [row.grantee_ref], ref)
                return
            body = self.records.store.vread(conn, "Consent", row.consent_id, row.consent_version).body
            rules = parse_consent(body)
            args = event.args
            self.index.apply_grant(row.consent_id, row.patient_id, [row.grantee_ref], rules,
                                   int(args["valid_from"]) or None, int(args["valid_until"]) or None, ref)
        except TeleledgerError as exc:
            # an event the node cannot apply must not stop the indexer; no PHI in the message
            log.warning("consent event at block %s not applied: %s", ref[0], exc.__class__.__name__)

    def _on_granted(self, conn: Connection, event: Event) -> None:
        self._project(conn, event, granted=True)

    def _on_revoked(self, conn: Connection, event: Event) -> None:
        self._project(conn, event, granted=False)

    def rebuild(self) -> None:
        """Project every stored ConsentRegistry event and every unexpired break-glass claim (start-up)."""
        with UnitOfWork(self.engine) as uow:
            for e in chain_events(uow.c, contract=REGISTRY):
                if e.name in ("ConsentGranted", "ConsentRevoked"):
                    self._project(uow.c, e, granted=e.name == "ConsentGranted")
            now = self._now()
            for row in uow.c.execute(select(break_glass_claims).where(break_glass_claims.c.expires > int(now * 1e6))):
                self.index.claim_break_glass(row.practitioner_id, row.patient_id, "(reason recorded at claim time)",
                                             row.started / 1e6, (row.expires - row.started) / 1e6,
                                             claim_id=row.claim_id)

    # ------------------------------------------------------------------ reading

    def grants_of(self, patient_id: str) -> list[GrantRow]:
        """The patient's grants, newest first, each marked with whether the index holds it."""
        in_force = set(self.index.in_force(patient_id))
        with self.engine.connect() as conn:
            rows = conn.execute(select(consent_grants).where(consent_grants.c.patient_id == patient_id)
                                .order_by(consent_grants.c.created.desc())).all()
        return [GrantRow(r.consent_id, r.grantee_ref, int(r.valid_from), int(r.valid_until), r.status,
                         (r.consent_id, r.grantee_ref) in in_force or (r.consent_id, ANYONE) in in_force)
                for r in rows]

    def directory(self, principal: Principal) -> list[tuple[str, str]]:
        """(reference, display name) of the practitioners, organizations and research studies a
        grant may name, read through the records service (so as ``principal``, audited)."""
        out: list[tuple[str, str]] = []
        for kind in ACTOR_KINDS:
            bundle = self.records.search(principal, kind, [("_count", "200")])
            for e in bundle.get("entry", []):
                r = e.get("resource") or {}
                if r.get("resourceType") != kind:
                    continue
                out.append((f"{kind}/{r['id']}", _display(r)))
        return out

    def consents_of(self, principal: Principal) -> list[dict]:
        """The patient's own Consent resources (their portal page), newest first."""
        if principal.role != "patient" or principal.patient_id is None:
            raise Forbidden("this list is the patient's own")
        bundle = self.records.search(principal, "Consent", [("patient", f"Patient/{principal.patient_id}"),
                                                            ("_count", "200"), ("_sort", "-_lastUpdated")])
        return [e["resource"] for e in bundle.get("entry", []) if e.get("search", {}).get("mode") == "match"]

    def claims_for_patient(self, patient_id: str) -> list[dict]:
        """Break-glass claims on this patient (their notifications), newest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(break_glass_claims).where(break_glass_claims.c.patient_id == patient_id)
                                .order_by(break_glass_claims.c.started.desc())).all()
        return [{"claim_id": r.claim_id, "practitioner": f"Practitioner/{r.practitioner_id}",
                 "started": int(r.started), "expires": int(r.expires)} for r in rows]

    # ------------------------------------------------------------------ explain

    def explain(self, audit_event: dict) -> dict:
        """What allowed the access an AuditEvent records: the consent (with the ConsentRegistry
        key and the chain transaction and block that granted it), a break-glass claim, or a fixed
        rule. ``audit_event`` is the AuditEvent as the caller may read it (``AuditEventService.read``
        decided that). The answer holds only ids, hashes and chain positions: anyone with chain
        access checks ``ConsentRegistry.consent_of(pseudonym, grantee, provisionHash)`` or the event."""
        basis = str(audit_event.get("outcomeDesc") or "")
        out: dict[str, Any] = {"auditEvent": f"AuditEvent/{audit_event.get('id')}",
                               "outcome": "allowed" if audit_event.get("outcome") == "0" else "denied",
                               "recorded": audit_event.get("recorded")}
        reason, _, ref = basis.partition(":")
        if out["outcome"] == "denied":
            out.update(rule=basis or "denied", explanation="the access was denied by this rule")
            return out
        if not ref:
            out.update(rule="default-policy", explanation="a fixed rule of the default policy allowed it (the "
                                                           "patient's own record, or a care relationship)")
            return out
        out["rule"] = reason
        if ref.startswith("break-glass/"):
            out.update(basis=ref, explanation="an emergency break-glass claim (BTG), time-limited and audited")
            return out
        consent_id = ref.removeprefix("Consent/")
        out["basis"] = f"Consent/{consent_id}"
        with self.engine.connect() as conn:
            rows = conn.execute(select(consent_grants).where(consent_grants.c.consent_id == consent_id)
                                .order_by(consent_grants.c.consent_version)).all()
            keys_ = {(r.pseudonym, r.grantee_h, r.provision_hash): r for r in rows}
            chain: list[dict] = []
            for e in chain_events(conn, contract=REGISTRY):
                if e.name not in ("ConsentGranted", "ConsentRevoked"):
                    continue
                k = (_hex(e.args["pseudonym"]), _hex(e.args["grantee"]), _hex(e.args["provision_hash"]))
                row = keys_.get(k)
                if row is not None:
                    chain.append({"event": e.name, "grantee": row.grantee_ref, "pseudonym": k[0], "granteeHash": k[1],
                                  "provisionHash": k[2], "tx": e.tx_hash, "block": e.block_number,
                                  "validFrom": int(e.args.get("valid_from", 0) or 0),
                                  "validUntil": int(e.args.get("valid_until", 0) or 0)})
        out["chain"] = chain
        out["contract"] = self.chain.addresses.get(REGISTRY) if self.chain is not None else None
        out["explanation"] = "a consent signed by the patient and recorded in ConsentRegistry allowed it"
        return out

    # ------------------------------------------------------------------ break-glass

    def break_glass(self, principal: Principal, patient_id: Any, reason: Any, *,
                    ttl: timedelta | None = None) -> BreakGlassClaim:
        """A practitioner claims emergency access to a patient (time-limited, audited as BTG)."""
        decision = may_claim_break_glass(principal, self.default)
        if not decision.allowed:
            raise Forbidden(f"break-glass refused: {decision.detail} ({decision.reason})")
        if not isinstance(patient_id, str) or not patient_id:
            raise InvalidInput("break-glass needs the patient's id")
        patient_id = patient_id.removeprefix("Patient/")
        assert principal.practitioner_id is not None
        with UnitOfWork(self.engine) as uow:
            if not self.records.store.exists(uow.c, "Patient", patient_id):
                raise NotFound(f"Patient/{patient_id} is not known")
            claim = self.index.claim_break_glass(principal.practitioner_id, patient_id, reason, self._now(),
                                                 ttl or self.default.break_glass_ttl)
            uow.c.execute(insert(break_glass_claims).values(
                claim_id=claim.claim_id, practitioner_id=claim.practitioner_id, patient_id=patient_id,
                started=int(claim.started_at * 1e6), expires=int(claim.expires_at * 1e6)))
            if self.auditor is not None:
                self.auditor.access(uow.c, replace(principal, purpose="BTG"), "read", [],
                                    reason=f"break-glass-claim:break-glass/{claim.claim_id}", patients=[patient_id])
            uow.commit()
        return claim
