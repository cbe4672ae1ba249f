"""Patient-controlled consent, end to end: a FHIR Consent → EIP-712 signatures by the patient →
ConsentRegistry (through the chain outbox) → the indexer → the in-memory ``ConsentIndex`` that
every access decision consults; and break-glass claims.

Use cases (each one unit of work, committed once):

* ``grant`` (POST /fhir/Consent): the patient the Consent is about, or an active delegate of
  theirs (``policy.delegates``), whose signatures below are then made with the delegate's own key;
  ``parse_consent`` with every actor checked against the store (unknown actor → 400); the
  Consent is stored; when it is ``active`` the outbox gets, in the SAME transaction, the
  patient's ``bind_patient`` (first time only, countersigned by this node's authority as an
  operator of its organization) and one ``grant_by_sig`` per grantee, each an EIP-712 signature
  by the patient's keystore key (``user:<username>``) relayed by ``node:authority``.
* ``update`` (PUT): the grants of the previous version are revoked (``revoke_by_sig``) and, if
  the new version is active, the new one granted — so narrowing or ending a consent is a PUT.
* ``withdraw`` (DELETE): revokes every grant and deletes the Consent.
* ``set_delegate``: the patient lets a RelatedPerson of theirs that an account signs in as (a
  parent, guardian or caregiver) act for them, or stops it: their EIP-712 SetDelegate signature
  (with the delegate account's address) goes to ``set_delegate_by_sig`` through the outbox, the
  row to ``consent_delegates``; the DelegateSet event, projected back, puts it in force as the
  consent ``Delegation/<id>`` of the ConsentIndex (``policy.delegates``: everything, under the
  patient's own denies). ``delegates_of`` / ``acting_for`` list delegations from either side.
* ``break_glass``: a practitioner's emergency claim (``policy.consent_index``), audited with
  purpose BTG, listed to the patient (``claims_for_patient``, ``break_glass_notices``) and to the
  privacy officer of the claimant's organization (``break_glass_review``, ``policy.
  review_break_glass``; each review is an access event per patient concerned). The claim row
  keeps the claimant's Organization and the written reason sealed under the patient's data key
  (AES-256-GCM, bound to the claim id), so erasing the patient erases the reason too.
* ``grantees`` / ``grant_purpose``: whom the portal offers as grantees (practitioners; pharmacies,
  payers and clinics by their ``Organization.type``; research studies) and the purpose a grant
  to each is for (TREAT; a payer HPAYMT; a study HRESCH).

What goes on chain: the patient pseudonym (HMAC of the patient id under a node secret), the
grantee as a keyed hash of its reference, the salted ``provision_hash`` and the period — never
PHI. The salt stays here (``consent_grants``).

Projection: the indexer's projectors on ConsentGranted / ConsentRevoked look the chain key up in
``consent_grants``, read that Consent version from the store and call ``apply_grant`` /
``apply_revoke``; at start ``rebuild`` replays every stored chain event, so processes on one
database agree once their indexer has caught up. Revocation latency: the outbox worker's send
and ``chain_confirmations`` blocks, plus one indexer poll (``chain_poll_interval``, 0.5 s by
default); on the embedded chain about a second. Every other process on the same database (a
standby without the chain, or more server processes) applies the same events from the stored
``chain_events`` through its ``EventFollower`` (one more ``chain_poll_interval``), and picks up
break-glass claims made elsewhere from ``break_glass_claims`` the same way.

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
from sqlalchemy import Connection, Engine, insert, or_, select, update

from teleledger.core.crypto import open_sealed, seal
from teleledger.core.errors import AccessDenied, Conflict, Forbidden, InvalidInput, NotFound, TeleledgerError
from teleledger.ledger.chain import eip712
from teleledger.ledger.chain.client import ChainUnavailable, Event
from teleledger.ledger.chain.indexer import events as chain_events
from teleledger.ledger.chain.outbox import enqueue
from teleledger.policy import decide as policy
from teleledger.policy.consent import ANYONE, ConsentRules, parse_consent, provision_hash
from teleledger.policy.consent_index import BreakGlassClaim, ConsentIndex, may_claim_break_glass
from teleledger.policy.consent_tables import break_glass_claims, consent_grants, consent_patients
from teleledger.policy.delegate_tables import consent_delegates
from teleledger.policy.delegates import (
    DELEGATION_PREFIX,
    delegation_ref,
    delegation_rules,
    delegation_status,
    may_change_consent,
    may_designate,
    may_manage_consents,
    related_person_of,
)
from teleledger.policy.model import DEFAULT_POLICY, Decision, DefaultPolicy, Principal
from teleledger.storage import tables as t
from teleledger.storage.db import UnitOfWork

__all__ = ["BreakGlassReview", "ConsentService", "DelegateRow", "GrantRow", "Grantee", "organization_kind"]

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


@dataclass(frozen=True)
class DelegateRow:
    """A delegation as the patient (their delegates) or the delegate (whom they act for) sees it."""

    delegation: str  # Delegation/<id>: the basis of the access decisions it gives
    patient: str  # Patient/<id>
    related_person: str  # RelatedPerson/<id>: the delegate
    status: str  # pending | active | removed (``policy.delegates.delegation_status``)
    enabled: bool  # what the patient last asked
    address: str  # the delegate account's chain address (lower-case hex)
    tx: str | None  # the newest DelegateSet transaction projected, and its block
    block: int | None
    display: str = ""  # the other side's name, when the caller may read it


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
#: the directory types a grant may name, with the purpose a grant to them is for (an
#: Organization's depends on its kind: ``organization_kind``, ``ORGANIZATION_KINDS``)
ACTOR_KINDS: dict[str, str] = {"Practitioner": "TREAT", "Organization": "TREAT", "ResearchStudy": "HRESCH"}
#: the purposes a portal grant to each directory type may be for
_KIND_PURPOSES: dict[str, frozenset[str]] = {"Practitioner": frozenset({"TREAT"}),
                                             "Organization": frozenset({"TREAT", "HPAYMT"}),
                                             "ResearchStudy": frozenset({"HRESCH"})}
#: kinds of organization a patient shares with: (label shown to the patient, purpose of a grant)
ORGANIZATION_KINDS: dict[str, tuple[str, str]] = {
    "pharmacy": ("Pharmacy", "TREAT"), "payer": ("Payer", "HPAYMT"),
    "clinic": ("Clinic or hospital", "TREAT"), "organization": ("Other organization", "TREAT"),
}
_ORGANIZATION_TYPE = "http://terminology.hl7.org/CodeSystem/organization-type"
_SNOMED = "http://snomed.info/sct"
_NUCC = "http://nucc.org/provider-taxonomy"
_SNOMED_PHARMACY = "264372000"  # Pharmacy (environment)
_NUCC_PHARMACIES = "3336"  # NUCC taxonomy 3336…X: community/retail, clinic, specialty, … pharmacies
_PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"


def organization_kind(resource: dict) -> str:
    """The kind of an Organization (a key of ``ORGANIZATION_KINDS``) from its ``type`` codings:
    a pharmacy (SNOMED CT 264372000, or a NUCC pharmacy taxonomy code 3336…), a payer
    (organization-type ``pay`` or ``ins``), a clinic (organization-type ``prov``, ``dept`` or
    ``team``: a care provider), else "organization". A pharmacy is often also typed ``prov``, so
    it is tested first. (HL7's organization-type has no pharmacy code.)"""
    codings = [(c.get("system"), str(c.get("code") or "")) for t in resource.get("type") or [] if isinstance(t, dict)
               for c in t.get("coding") or [] if isinstance(c, dict)]
    if any((s == _SNOMED and c == _SNOMED_PHARMACY) or (s == _NUCC and c.startswith(_NUCC_PHARMACIES))
           for s, c in codings):
        return "pharmacy"
    if any(s == _ORGANIZATION_TYPE and c in ("pay", "ins") for s, c in codings):
        return "payer"
    if any(s == _ORGANIZATION_TYPE and c in ("prov", "dept", "team") for s, c in codings):
        return "clinic"
    return "organization"


@dataclass(frozen=True)
class Grantee:
    """Someone a patient may share with, as the portal offers it."""

    ref: str  # Practitioner/…, Organization/…, ResearchStudy/…
    name: str
    kind: str  # practitioner | pharmacy | payer | clinic | organization | research study
    label: str  # the kind in words: "Pharmacy", "Payer (health insurance)", …
    purpose: str  # what a grant to it is for (v3 ActReason)


@dataclass(frozen=True)
class BreakGlassReview:
    """One break-glass claim as the claimant organization's privacy officer reviews it."""

    claim_id: str
    practitioner: str  # Practitioner/<id>
    practitioner_name: str
    patient: str  # Patient/<id>
    organization: str  # Organization/<id>
    started: float  # epoch seconds
    expires: float
    active: bool
    reason: str | None  # None when it cannot be opened (the patient was erased, or a claim from before it was kept)


def build_consent(patient_id: str, actor: str, classes: list[str], exclude_labels: list[str], start: str | None,
                  end: str | None, *, purpose: str | None = None) -> dict:
    """The FHIR Consent a portal grant form describes (validated later by ``parse_consent``):
    ``actor`` may see ``classes`` (all data when empty) except what carries ``exclude_labels``,
    for ``purpose`` (default: the one its kind implies; ``ConsentService.grant_purpose`` knows an
    Organization's), within [start, end]."""
    kind = actor.partition("/")[0]
    if kind not in ACTOR_KINDS:
        raise InvalidInput("choose a practitioner, an organization or a research study to share with")
    if purpose is None:
        purpose = ACTOR_KINDS[kind]
    elif purpose not in _KIND_PURPOSES[kind]:
        raise InvalidInput(f"a grant to a {kind} cannot be for purpose {purpose}")
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


def _grantee(r: dict) -> Grantee:
    kind = r["resourceType"]
    ref = f"{kind}/{r['id']}"
    if kind == "Organization":
        okind = organization_kind(r)
        label, purpose = ORGANIZATION_KINDS[okind]
        return Grantee(ref, _display(r), okind, label, purpose)
    if kind == "ResearchStudy":
        return Grantee(ref, _display(r), "research study", "Research study", ACTOR_KINDS[kind])
    return Grantee(ref, _display(r), "practitioner", "Practitioner", ACTOR_KINDS[kind])


def _related_person_id(ref: Any) -> str:
    """The id in ``RelatedPerson/<id>`` (InvalidInput for anything else)."""
    kind, _, ident = ref.partition("/") if isinstance(ref, str) else ("", "", "")
    if kind != "RelatedPerson" or not ident or len(ident) > 64 or not all(ch.isalnum() or ch in "-." for ch in ident):
        raise InvalidInput('"relatedPerson" must be a reference RelatedPerson/<id>')
    return ident


def _reference(value: Any) -> str | None:
    return value.get("reference") if isinstance(value, dict) else None


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
        #: break-glass claims this process's index holds (claimed here, rebuilt or followed)
        self._claims_seen: set[str] = set()
        if chain is not None:
            # the indexing process projects at once, in the indexer's transaction (the delegation
            # rows are written there, once) ...
            chain.on("ConsentGranted", self._on_granted)
            chain.on("ConsentRevoked", self._on_revoked)
            chain.on("DelegateSet", self._on_delegate_set)
            # ... and every process's in-memory index follows what any process indexed or claimed
            # (idempotent: the index orders updates by chain position)
            chain.follower.on("ConsentGranted", self._on_granted)
            chain.follower.on("ConsentRevoked", self._on_revoked)
            chain.follower.on("DelegateSet", lambda conn, e: self._project_delegate(conn, e, record=False))
            chain.follower.every_poll(self.follow_claims)

    # ------------------------------------------------------------------ hashes

    def pseudonym(self, patient_id: str) -> bytes:
        """The patient as ConsentRegistry knows them: HMAC-SHA-256 of the id under a node secret."""
        return hmac.new(self._pseudonym_key, f"Patient/{patient_id}".encode(), hashlib.sha256).digest()

    def grantee_hash(self, ref: str) -> bytes:
        """The grantee as ConsentRegistry knows it: a keyed hash of its reference (or ``*``)."""
        return hmac.new(self._grantee_key, ref.encode(), hashlib.sha256).digest()

    # ------------------------------------------------------------------ policy

    def _check_manager(self, principal: Principal, patient_id: str, conn: Connection, *, action: str,
                       changing: ConsentRules | None = None) -> None:
        """The patient, or an active delegate of theirs, grants and revokes the patient's consents
        (``policy.delegates.may_manage_consents``; for the current version of a consent being
        changed or withdrawn, ``may_change_consent``); active is what the chain last said, read
        in the use case's own transaction."""
        active = self._delegation_active(conn, principal, patient_id)
        decision = (may_manage_consents(principal, patient_id, active_delegate=active) if changing is None
                    else may_change_consent(principal, changing, active_delegate=active))
        if not decision.allowed:
            # recorded as a denied access to the patient's record by ``_audited`` (their access log
            # shows the attempt); the reason names a rule, never data
            raise AccessDenied(f"{decision.detail} ({decision.reason})", action=action, reason=decision.reason,
                               patients=frozenset({patient_id}))

    def _audited(self, principal: Principal, use_case: Callable[[], Any]) -> Any:
        """Run a consent use case; a denial is recorded in the log after its transaction rolled back."""
        try:
            return use_case()
        except AccessDenied as exc:
            self.records.record_denial(principal, exc)
            raise

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

    def _signer(self, principal: Principal, action: str = "create") -> tuple[keys.PrivateKey, str]:
        """The patient's keystore key. Before the use case's unit of work: creating a key commits
        on its own, which would wait for the write lock that unit of work holds on SQLite."""
        if principal.role != "patient":
            raise AccessDenied("only the patient a Consent is about (or their delegate) may grant, change or "
                               "revoke it", action=action, reason="not-patient-or-delegate", patients=frozenset())
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
        return self._audited(principal, lambda: self._grant(principal, resource))

    def update(self, principal: Principal, consent_id: str, resource: Any) -> tuple[Any, list[str]]:
        """PUT /fhir/Consent/<id>: revoke what the previous version granted, grant the new one."""
        return self._audited(principal, lambda: self._update(principal, consent_id, resource))

    def withdraw(self, principal: Principal, consent_id: str) -> tuple[Any, list[str]]:
        """DELETE /fhir/Consent/<id>: revoke every grant, then delete the Consent."""
        return self._audited(principal, lambda: self._withdraw(principal, consent_id))

    def _grant(self, principal: Principal, resource: Any) -> tuple[Any, list[str]]:
        signer = self._signer(principal)
        with UnitOfWork(self.engine) as uow:
            c = uow.c
            rules = self._parse(c, resource)
            self._check_manager(principal, rules.patient_id, c, action="create")
            if rules.status == "active":
                self._chain()  # refuse before storing anything when the chain cannot record it
            stored, _ = self.records.create_in(c, principal, resource)
            keys_ = (self._enqueue_grants(c, signer, stored.res_id, stored.version, rules)
                     if rules.status == "active" else [])
            uow.commit()
        self._kick()
        return stored, keys_

    def _update(self, principal: Principal, consent_id: str, resource: Any) -> tuple[Any, list[str]]:
        signer = self._signer(principal, "update")
        with UnitOfWork(self.engine) as uow:
            c = uow.c
            rules = self._parse(c, resource)
            self._check_manager(principal, rules.patient_id, c, action="update")
            current = self.records.store.current(c, "Consent", consent_id, for_update=True)
            if current is not None and current.body is not None:
                old = parse_consent(current.body)
                self._check_manager(principal, old.patient_id, c, action="update", changing=old)
            self._chain()
            stored, _ = self.records.update_in(c, principal, "Consent", consent_id, resource)
            keys_ = self._enqueue_revokes(c, signer, consent_id)
            if rules.status == "active":
                keys_ += self._enqueue_grants(c, signer, consent_id, stored.version, rules)
            uow.commit()
        self._kick()
        return stored, keys_

    def _withdraw(self, principal: Principal, consent_id: str) -> tuple[Any, list[str]]:
        signer = self._signer(principal, "delete")
        with UnitOfWork(self.engine) as uow:
            c = uow.c
            current = self.records.store.current(c, "Consent", consent_id, for_update=True)
            if current is None or current.body is None:
                raise NotFound(f"Consent/{consent_id} is not known")
            old = parse_consent(current.body)
            self._check_manager(principal, old.patient_id, c, action="delete", changing=old)
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
                elif e.name == "DelegateSet":
                    self._project_delegate(uow.c, e, record=False)
        self.follow_claims()

    def follow_claims(self) -> None:
        """Put the unexpired break-glass claims this process has not seen (made by another
        process on this database) into the index; at start, and after every follower poll."""
        now = self._now()
        with self.engine.connect() as conn:
            rows = conn.execute(select(break_glass_claims).where(break_glass_claims.c.expires > int(now * 1e6))
                                .order_by(break_glass_claims.c.started)).all()
        for row in rows:
            if row.claim_id in self._claims_seen:
                continue
            newer = [c for c in self.index.break_glass_claims(row.practitioner_id)
                     if c.patient_id == row.patient_id and c.started_at >= row.started / 1e6]
            if newer:  # a later claim for the pair replaced this one already
                self._claims_seen.add(row.claim_id)
                continue
            # the written reason stays sealed in the table: the index needs only that there is one
            self.index.claim_break_glass(row.practitioner_id, row.patient_id, "(reason recorded at claim time)",
                                         row.started / 1e6, (row.expires - row.started) / 1e6,
                                         claim_id=row.claim_id)
            self._claims_seen.add(row.claim_id)

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
        return [(g.ref, g.name) for g in self.grantees(principal)]

    def grantees(self, principal: Principal) -> list[Grantee]:
        """The practitioners, organizations (each with its kind: pharmacy, payer, clinic…) and
        research studies a grant may name, with the purpose a grant to each is for; read through
        the records service as ``principal``."""
        out: list[Grantee] = []
        for kind in ACTOR_KINDS:
            bundle = self.records.search(principal, kind, [("_count", "200")])
            for e in bundle.get("entry", []):
                r = e.get("resource") or {}
                if r.get("resourceType") != kind:
                    continue
                out.append(_grantee(r))
        return out

    def grant_purpose(self, principal: Principal, actor: str) -> str:
        """The purpose a portal grant to ``actor`` is for: TREAT for a practitioner, a pharmacy or
        a clinic, HPAYMT for a payer, HRESCH for a research study (``organization_kind``)."""
        kind, _, ident = actor.partition("/")
        if kind != "Organization":
            if kind not in ACTOR_KINDS:
                raise InvalidInput("choose a practitioner, an organization or a research study to share with")
            return ACTOR_KINDS[kind]
        try:
            stored = self.records.read(principal, "Organization", ident)
        except NotFound:
            raise InvalidInput(f"{actor} is not a known organization") from None
        return _grantee(stored.body).purpose

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
                 "started": int(r.started), "expires": int(r.expires),
                 "seen": r.seen_by_patient is not None} for r in rows]

    # ------------------------------------------------------------------ delegates

    def _delegation_active(self, conn: Connection, principal: Principal, patient_id: str) -> bool:
        """Whether this principal's delegation for the patient is in force: the chain's last
        DelegateSet enabled it and the patient has not asked for its removal since."""
        rp = related_person_of(principal)
        if principal.role != "patient" or rp is None:
            return False
        row = conn.execute(select(consent_delegates.c.requested, consent_delegates.c.on_chain).where(
            consent_delegates.c.patient_id == patient_id, consent_delegates.c.related_person_id == rp,
            consent_delegates.c.account_id == principal.subject)).first()
        return row is not None and delegation_status(row.requested, row.on_chain) == "active"

    def may_act_for(self, principal: Principal, patient_id: str) -> Decision:
        """May this principal manage Patient ``patient_id``'s consents (their own, or as an active
        delegate)? For the portal, which opens a patient's consent page only then."""
        with self.engine.connect() as conn:
            active = self._delegation_active(conn, principal, patient_id)
        return may_manage_consents(principal, patient_id, active_delegate=active)

    def _delegate_account(self, conn: Connection, principal: Principal, patient_id: str, rp_id: str) -> Any:
        """The one account that signs in as RelatedPerson ``rp_id``, checked to be a person related
        to the patient and not the patient themself."""
        rp = self.records.store.current(conn, "RelatedPerson", rp_id)
        linked = _reference(rp.body.get("patient")) if rp is not None and rp.body is not None else None
        # one answer for unknown, deleted and someone else's, so the form is no oracle of ids
        if linked != f"Patient/{patient_id}":
            raise InvalidInput(f"RelatedPerson/{rp_id} is not a person related to you: name a RelatedPerson whose "
                               f"patient is Patient/{patient_id}")
        accounts = conn.execute(select(t.users.c.id, t.users.c.username, t.users.c.patient_id).where(
            t.users.c.related_person_id == rp_id, t.users.c.role == "patient", t.users.c.active.is_(True))).all()
        if not accounts:
            raise InvalidInput(f"nobody signs in as RelatedPerson/{rp_id} yet: their account is created first "
                               f"(teleledger users create --role patient --related-person RelatedPerson/{rp_id})")
        if len(accounts) > 1:
            raise Conflict(f"{len(accounts)} accounts sign in as RelatedPerson/{rp_id}: a delegate is one person")
        account = accounts[0]
        if account.id == principal.subject or account.patient_id == patient_id:
            raise InvalidInput("you cannot be your own delegate: name the person who is to act for you")
        return account

    def set_delegate(self, principal: Principal, related_person_ref: Any, enabled: Any) -> DelegateRow:
        """POST /api/consent/delegates: the patient lets the person who signs in as
        ``related_person_ref`` (a RelatedPerson of theirs) act for them, or (``enabled`` False)
        stops it. One unit of work: the patient's EIP-712 SetDelegate signature with the delegate
        account's address → outbox ``set_delegate_by_sig`` (after ``bind_patient`` the first
        time), and the ``consent_delegates`` row; in force once the indexer has projected the
        DelegateSet event. Asking again for what is already asked changes nothing."""
        decision = may_designate(principal)
        if not decision.allowed:
            raise Forbidden(f"{decision.detail} ({decision.reason})")
        if not isinstance(enabled, bool):
            raise InvalidInput('"enabled" must be true (may act for me) or false (may no longer act for me)')
        rp_id = _related_person_id(related_person_ref)
        patient_id = principal.patient_id
        assert patient_id is not None
        chain_id, contract = self._chain()
        account, delegate_address = None, None
        if enabled:
            with self.engine.connect() as conn:
                account = self._delegate_account(conn, principal, patient_id, rp_id)
            # outside the unit of work: a missing key would be created and committed on its own
            delegate_address = self.keystore.address(f"user:{account.username}").lower()
        key, patient_address = self._signer(principal)
        with UnitOfWork(self.engine) as uow:
            c = uow.c
            # first: it locks the patient's nonce row, which serializes their delegation changes
            # too (on SQLite the unit of work holds the write lock); a refusal below rolls it back
            pseudonym, nonce = self._next_nonce(c, patient_id, key, patient_address, chain_id, contract)
            row = c.execute(select(consent_delegates).where(consent_delegates.c.patient_id == patient_id,
                                                            consent_delegates.c.related_person_id == rp_id)).first()
            if account is not None:
                if row is not None and row.requested:
                    if row.account_id != account.id:
                        raise Conflict(f"RelatedPerson/{rp_id} acts for you under an earlier account: remove it first")
                    return self._delegate_row(row)  # already asked: nothing to sign
                if row is not None and row.account_id != account.id and row.on_chain:
                    raise Conflict(f"the removal of RelatedPerson/{rp_id}'s earlier account is not yet on the chain: "
                                   "try again in a moment")
                address = delegate_address
            else:
                if row is None or not row.requested:
                    raise NotFound(f"RelatedPerson/{rp_id} does not act for you")
                address = row.address  # the address the chain knows, whatever the account is now
            assert address is not None
            deadline = int(self._now()) + SIGNATURE_LIFETIME
            msg = eip712.SetDelegate(pseudonym=pseudonym, delegate=address, enabled=enabled, nonce=nonce,
                                     deadline=deadline)
            v, r, s = _vrs(key, eip712.digest(msg, chain_id=chain_id, verifying_contract=contract))
            okey = f"consent-delegate:{pseudonym.hex()[:32]}:{nonce}"
            enqueue(c, kind="consent", key=okey, contract=REGISTRY, fn="set_delegate_by_sig",
                    args=[pseudonym, address, enabled, deadline, v, r, s], sender=RELAYER)
            self._use_nonce(c, patient_id, nonce)
            now = _now_us()
            if row is None:
                assert account is not None
                delegation_id = os.urandom(12).hex()
                c.execute(insert(consent_delegates).values(
                    delegation_id=delegation_id, patient_id=patient_id, related_person_id=rp_id, account_id=account.id,
                    address=address, pseudonym=_hex(pseudonym), requested=enabled, outbox_key=okey, created=now,
                    updated=now))
            else:
                delegation_id = row.delegation_id
                values: dict[str, Any] = {"requested": enabled, "outbox_key": okey, "updated": now}
                if account is not None:
                    values.update(account_id=account.id, address=address)
                c.execute(update(consent_delegates).where(consent_delegates.c.delegation_id == delegation_id)
                          .values(**values))
            saved = c.execute(select(consent_delegates).where(consent_delegates.c.delegation_id == delegation_id)).one()
            uow.commit()
        self._kick()
        return self._delegate_row(saved)

    @staticmethod
    def _delegate_row(row: Any) -> DelegateRow:
        return DelegateRow(
            delegation=delegation_ref(row.delegation_id), patient=f"Patient/{row.patient_id}",
            related_person=f"RelatedPerson/{row.related_person_id}", status=delegation_status(row.requested, row.on_chain),
            enabled=bool(row.requested), address=row.address, tx=row.tx_hash,
            block=None if row.block_number is None else int(row.block_number))

    def _names(self, principal: Principal, kind: str, ids: set[str]) -> dict[str, str]:
        """Display names of these resources as ``principal`` may read them (one audited search)."""
        if not ids:
            return {}
        try:
            bundle = self.records.search(principal, kind, [("_id", ",".join(sorted(ids))), ("_count", str(len(ids)))])
        except TeleledgerError:
            return {}  # names are a courtesy: the references stand on their own
        return {e["resource"]["id"]: _display(e["resource"]) for e in bundle.get("entry", [])
                if (e.get("resource") or {}).get("resourceType") == kind}

    def delegates_of(self, principal: Principal) -> list[DelegateRow]:
        """The patient's delegates, newest first, each with its status and the delegate's name."""
        decision = may_designate(principal)
        if not decision.allowed:
            raise Forbidden(f"{decision.detail} ({decision.reason})")
        with self.engine.connect() as conn:
            rows = conn.execute(select(consent_delegates).where(consent_delegates.c.patient_id == principal.patient_id)
                                .order_by(consent_delegates.c.created.desc())).all()
        names = self._names(principal, "RelatedPerson", {r.related_person_id for r in rows})
        return [replace(self._delegate_row(r), display=names.get(r.related_person_id, "")) for r in rows]

    def acting_for(self, principal: Principal) -> list[DelegateRow]:
        """The patients this account was designated to act for, newest first, with their status
        (and names, for the patients it may read: those whose delegation is active)."""
        rp = related_person_of(principal)
        if principal.role != "patient" or rp is None:
            return []
        with self.engine.connect() as conn:
            rows = conn.execute(select(consent_delegates).where(
                consent_delegates.c.account_id == principal.subject, consent_delegates.c.related_person_id == rp)
                .order_by(consent_delegates.c.created.desc())).all()
        active = {r.patient_id for r in rows if delegation_status(r.requested, r.on_chain) == "active"}
        names = self._names(principal, "Patient", active)
        return [replace(self._delegate_row(r), display=names.get(r.patient_id, "")) for r in rows]

    def delegations(self, principal: Principal) -> tuple[list[DelegateRow], list[DelegateRow]]:
        """GET /api/consent/delegates: (the patient's own delegates, the patients this account acts
        for); either may be empty, but only patient-role accounts have any."""
        if principal.role != "patient" or (principal.patient_id is None and related_person_of(principal) is None):
            raise Forbidden("delegates are chosen by patients and act for patients: this account is neither")
        mine = self.delegates_of(principal) if may_designate(principal).allowed else []
        return mine, self.acting_for(principal)

    def delegate_choices(self, principal: Principal) -> list[tuple[str, str]]:
        """(``RelatedPerson/<id>``, name) of the patient's RelatedPersons whom an account signs in
        as and who do not already act for them: whom the portal offers to add."""
        decision = may_designate(principal)
        if not decision.allowed:
            raise Forbidden(f"{decision.detail} ({decision.reason})")
        bundle = self.records.search(principal, "RelatedPerson", [("patient", f"Patient/{principal.patient_id}"),
                                                                  ("_count", "200")])
        people = {e["resource"]["id"]: _display(e["resource"]) for e in bundle.get("entry", [])
                  if e.get("search", {}).get("mode") == "match"}
        if not people:
            return []
        with self.engine.connect() as conn:
            linked = set(conn.execute(select(t.users.c.related_person_id).where(
                t.users.c.related_person_id.in_(sorted(people)), t.users.c.role == "patient",
                t.users.c.active.is_(True), t.users.c.id != principal.subject,
                # the patient's own second account is not somebody else
                or_(t.users.c.patient_id.is_(None), t.users.c.patient_id != principal.patient_id))).scalars())
            current = set(conn.execute(select(consent_delegates.c.related_person_id).where(
                consent_delegates.c.patient_id == principal.patient_id, consent_delegates.c.requested.is_(True)))
                .scalars())
        return sorted(((f"RelatedPerson/{i}", name) for i, name in people.items() if i in linked and i not in current),
                      key=lambda kv: kv[1].lower())

    def consents_for(self, principal: Principal, patient_id: str) -> list[dict]:
        """Patient ``patient_id``'s Consent resources, newest first, for the patient or an active
        delegate (the delegate's consent page), read through the records service as ``principal``."""
        decision = self.may_act_for(principal, patient_id)
        if not decision.allowed:
            raise Forbidden(f"{decision.detail} ({decision.reason})")
        bundle = self.records.search(principal, "Consent", [("patient", f"Patient/{patient_id}"),
                                                            ("_count", "200"), ("_sort", "-_lastUpdated")])
        return [e["resource"] for e in bundle.get("entry", []) if e.get("search", {}).get("mode") == "match"]

    def _on_delegate_set(self, conn: Connection, event: Event) -> None:
        self._project_delegate(conn, event, record=True)

    def _project_delegate(self, conn: Connection, event: Any, *, record: bool) -> None:
        """A DelegateSet event → the ``consent_delegates`` row (``record``: the indexer's first
        sight of it, in its transaction) and the ConsentIndex (``Delegation/<id>``)."""
        args = event.args
        row = conn.execute(select(consent_delegates).where(
            consent_delegates.c.pseudonym == _hex(args["pseudonym"]),
            consent_delegates.c.address == _hex(args["delegate"]))).first()
        if row is None:
            return  # set directly, or by another node: nothing this node designated
        enabled = bool(args["enabled"])
        ref = (int(event.block_number), int(event.log_index))
        if record and (row.block_number is None or (int(row.block_number), int(row.log_index)) < ref):
            conn.execute(update(consent_delegates).where(consent_delegates.c.delegation_id == row.delegation_id)
                         .values(on_chain=enabled, block_number=ref[0], log_index=ref[1], tx_hash=event.tx_hash,
                                 updated=_now_us()))
        delegation = delegation_ref(row.delegation_id)
        rp = f"RelatedPerson/{row.related_person_id}"
        try:
            if enabled:
                self.index.apply_grant(delegation, row.patient_id, [rp],
                                       delegation_rules(row.delegation_id, row.patient_id, row.related_person_id),
                                       None, None, ref)
            else:
                self.index.apply_revoke(delegation, row.patient_id, [rp], ref)
        except TeleledgerError as exc:
            log.warning("delegation event at block %s not applied: %s", ref[0], exc.__class__.__name__)

    def _explain_delegation(self, out: dict[str, Any], basis: str) -> dict[str, Any]:
        """``explain`` for an access a delegation allowed: the delegate, and every DelegateSet
        event (transaction, block) of that delegation in ConsentRegistry."""
        out["basis"] = basis
        with self.engine.connect() as conn:
            row = conn.execute(select(consent_delegates).where(
                consent_delegates.c.delegation_id == basis.removeprefix(DELEGATION_PREFIX))).first()
            chain: list[dict] = []
            if row is not None:
                out["delegate"] = f"RelatedPerson/{row.related_person_id}"
                for e in chain_events(conn, "DelegateSet", contract=REGISTRY):
                    if _hex(e.args["pseudonym"]) == row.pseudonym and _hex(e.args["delegate"]) == row.address:
                        chain.append({"event": "DelegateSet", "enabled": bool(e.args["enabled"]),
                                      "pseudonym": row.pseudonym, "delegate": row.address, "tx": e.tx_hash,
                                      "block": e.block_number})
        out["chain"] = chain
        out["contract"] = self.chain.addresses.get(REGISTRY) if self.chain is not None else None
        out["explanation"] = ("the patient let this person (a parent, guardian or caregiver) act for them: a "
                              "delegation signed by the patient and recorded in ConsentRegistry (DelegateSet) allowed it")
        return out

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
        if ref.removeprefix("Consent/").startswith(DELEGATION_PREFIX):
            return self._explain_delegation(out, ref.removeprefix("Consent/"))
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
        out["explanation"] = ("a consent signed by the patient (or by their delegate) and recorded in "
                              "ConsentRegistry allowed it")
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
        # the claimant's organization, whose privacy officer reviews the claim (accounts name one)
        organization = min((ref.removeprefix("Organization/") for ref in principal.actor_refs
                            if ref.startswith("Organization/")), default=None)
        with UnitOfWork(self.engine) as uow:
            if not self.records.store.exists(uow.c, "Patient", patient_id):
                raise NotFound(f"Patient/{patient_id} is not known")
            claim = self.index.claim_break_glass(principal.practitioner_id, patient_id, reason, self._now(),
                                                 ttl or self.default.break_glass_ttl)
            self._claims_seen.add(claim.claim_id)
            sealed = seal(self._reason_key(uow.c, patient_id, write=True), claim.reason.encode(),
                          _reason_aad(claim.claim_id))
            uow.c.execute(insert(break_glass_claims).values(
                claim_id=claim.claim_id, practitioner_id=claim.practitioner_id, patient_id=patient_id,
                started=int(claim.started_at * 1e6), expires=int(claim.expires_at * 1e6),
                organization_id=organization, reason_sealed=sealed))
            if self.auditor is not None:
                self.auditor.access(uow.c, replace(principal, purpose="BTG"), "read", [],
                                    reason=f"break-glass-claim:break-glass/{claim.claim_id}", patients=[patient_id])
            uow.commit()
        return claim

    def _reason_key(self, conn: Connection, patient_id: str, *, write: bool) -> Any:
        """The patient's data key (AES-GCM), as the FHIR store seals their resources with it.
        The key id is ``records.keys.key_id_for({patient_id})``, spelled out here because policy
        must not import records (records imports policy)."""
        keyring = self.records.store.keys
        key_id = f"p.{patient_id}"
        return keyring.for_write(conn, key_id) if write else keyring.for_read(conn, key_id)

    def _open_reason(self, conn: Connection, row: Any) -> str | None:
        if row.reason_sealed is None:
            return None  # a claim made before reasons were kept
        try:
            return open_sealed(self._reason_key(conn, row.patient_id, write=False), bytes(row.reason_sealed),
                               _reason_aad(row.claim_id), what=f"break-glass/{row.claim_id}").decode()
        except (TeleledgerError, UnicodeDecodeError) as exc:
            # KeyShredded: the patient was erased and the reason with them; DecryptionError: the
            # row was tampered with or copied from another claim (named, never the reason)
            log.warning("break-glass reason of claim %s not readable: %s", row.claim_id, type(exc).__name__)
            return None

    def break_glass_review(self, principal: Principal, *, limit: int = 200) -> list[BreakGlassReview]:
        """The break-glass claims made by members of the privacy officer's organization, newest
        first, with their written reasons (``policy.review_break_glass`` decides who reviews which
        organization's claims). Reading the list is recorded as an access event for each patient
        concerned (purpose: the principal's, HOPERAT by default for admins)."""
        organizations = sorted(ref.removeprefix("Organization/") for ref in principal.actor_refs
                               if ref.startswith("Organization/"))
        decisions = [(org, policy.review_break_glass(principal, organization_id=org)) for org in organizations]
        mine = [org for org, d in decisions if d.allowed]
        if not mine:
            refused = decisions[0][1] if decisions else policy.review_break_glass(principal, organization_id=None)
            raise Forbidden(f"{refused.detail} ({refused.reason})")
        allowed = next(d for _, d in decisions if d.allowed)
        now = self._now()
        with UnitOfWork(self.engine) as uow:
            rows = uow.c.execute(select(break_glass_claims)
                                 .where(break_glass_claims.c.organization_id.in_(mine))
                                 .order_by(break_glass_claims.c.started.desc(), break_glass_claims.c.claim_id)
                                 .limit(max(1, min(limit, 1000)))).all()
            reasons = {r.claim_id: self._open_reason(uow.c, r) for r in rows}
            patients = sorted({r.patient_id for r in rows})
            if patients and self.auditor is not None:
                self.auditor.access(uow.c, principal, "read", [], reason=allowed.reason, patients=patients)
            uow.commit()
        names = self._practitioner_names(principal, {r.practitioner_id for r in rows})
        return [BreakGlassReview(
            claim_id=r.claim_id, practitioner=f"Practitioner/{r.practitioner_id}",
            practitioner_name=names.get(r.practitioner_id, f"Practitioner/{r.practitioner_id}"),
            patient=f"Patient/{r.patient_id}", organization=f"Organization/{r.organization_id}",
            started=r.started / 1e6, expires=r.expires / 1e6, active=r.started / 1e6 <= now < r.expires / 1e6,
            reason=reasons[r.claim_id]) for r in rows]

    def _practitioner_names(self, principal: Principal, ids: set[str]) -> dict[str, str]:
        """Display names of these Practitioners (directory data, read as ``principal``)."""
        if not ids:
            return {}
        try:
            bundle = self.records.search(principal, "Practitioner", [("_id", ",".join(sorted(ids))),
                                                                     ("_count", str(len(ids)))])
        except TeleledgerError:
            return {}  # names are a courtesy: the references stand on their own
        return {e["resource"]["id"]: _display(e["resource"]) for e in bundle.get("entry", [])
                if (e.get("resource") or {}).get("resourceType") == "Practitioner"}

    def break_glass_notices(self, principal: Principal) -> list[dict]:
        """The break-glass claims on the signed-in patient they have not dismissed yet, newest
        first, each with the practitioner's name (``practitioner_name``): the portal's
        notification. Only the patient's own."""
        if principal.role != "patient" or principal.patient_id is None:
            raise Forbidden("break-glass notices are shown to the patient they concern")
        notices = [n for n in self.claims_for_patient(principal.patient_id) if not n["seen"]]
        names = self._practitioner_names(principal, {n["practitioner"].removeprefix("Practitioner/")
                                                     for n in notices})
        return [{**n, "practitioner_name": names.get(n["practitioner"].removeprefix("Practitioner/"),
                                                     n["practitioner"])} for n in notices]

    def dismiss_break_glass_notices(self, principal: Principal, *, upto_us: int) -> int:
        """The patient dismisses the notices of the claims on them that started at or before
        ``upto_us`` (the newest one the page showed, so a claim made meanwhile stays shown)."""
        if principal.role != "patient" or principal.patient_id is None:
            raise Forbidden("break-glass notices are shown to the patient they concern")
        with UnitOfWork(self.engine) as uow:
            done = uow.c.execute(update(break_glass_claims).where(
                break_glass_claims.c.patient_id == principal.patient_id, break_glass_claims.c.started <= upto_us,
                break_glass_claims.c.seen_by_patient.is_(None)).values(seen_by_patient=_now_us())).rowcount
            uow.commit()
        return int(done or 0)


def _reason_aad(claim_id: str) -> bytes:
    """Binds a sealed reason to its claim: a reason copied onto another claim row does not open."""
    return f"break-glass/{claim_id}/reason".encode()
