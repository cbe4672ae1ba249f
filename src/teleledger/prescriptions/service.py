"""E-prescription use cases: issue, verify, dispense, cancel, the patient's view, sharing.

    issue(principal, MedicationRequest) -> (Stored, token)
        A practitioner's prescription. Validated, stored (status active, the token in the
        ``TOKEN_EXTENSION`` extension), and ``PrescriptionRegistry.issue`` recorded in the chain
        outbox in the SAME unit of work, sent from the prescriber's own key (``user:<username>``).
    verify(token) -> Verification
        Token + chain only, never this node's records: any pharmacy can run it. Token signature,
        signer == the chain's prescriber, the chain's quantities equal the signed ones, the
        prescriber's registration, the chain status, the dispense history (indexed Dispensed
        events: pharmacy organization and block time).
    dispense(principal, quantity, token=…|prescription=…) -> Stored MedicationDispense
        Pre-checks with chain ``call``s so the usual refusals (over-dispense, expired, cancelled,
        unknown, unregistered pharmacy) are clear errors before anything is written; then ONE
        unit of work records the MedicationDispense (in-progress) and the outbox row of
        ``dispense`` from the pharmacist's key, and the service waits for the chain's answer.
        Why the outbox rather than a direct ``transact``: the dispense and its chain write
        commit together, so a crash while waiting loses neither (the worker sends the row, the
        Dispensed projector completes the MedicationDispense); and the worker already owns the
        pharmacist's nonces. Success → completed. Refusal (a pharmacy that lost the race for the
        last fill) → the MedicationDispense stays as ``declined`` with the contract's reason (an
        honest trail of an attempt that was refused; nothing was handed out), and ``ChainRevert``
        (409) carries the reason to the caller.
    cancel(principal, rx_id)
        The prescriber; chain first (outbox + wait), then the MedicationRequest → cancelled.

The MedicationRequest follows the chain: the indexer's projectors for Dispensed and
PrescriptionCancelled move it to completed / cancelled (the dispense and cancel use cases also
do it directly, so the status is right when they return; both only write when it changes).

Chain membership: the prescriber (ROLE_PRACTITIONER) and pharmacist (ROLE_PHARMACIST) must be
members of their organization in the ParticipantRegistry. ``ensure_member`` asks for it (sent by
the node's authority as organization admin) the first time someone prescribes or dispenses,
idempotently; ``teleledger.demo`` calls it for the demo accounts.

Never on chain: the prescription content (only its salted hash), the patient (a keyed
pseudonym under a node secret), names. This module never logs tokens or content.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from eth_utils import keccak, to_checksum_address
from sqlalchemy import Connection, Engine, select
from sqlalchemy.exc import IntegrityError

from teleledger.core.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
    TeleledgerError,
)
from teleledger.fhir.validation import validate
from teleledger.ledger.chain import ROLE_PHARMACIST, ROLE_PRACTITIONER
from teleledger.ledger.chain.anchoring import org_id
from teleledger.ledger.chain.client import ChainRevert, ChainUnavailable, Event
from teleledger.ledger.chain.indexer import events as chain_events
from teleledger.ledger.chain.outbox import enqueue
from teleledger.policy import decide as policy
from teleledger.policy.model import Principal
from teleledger.prescriptions import token as rxtoken
from teleledger.prescriptions.tables import rx_members, rx_prescriptions, rx_shares
from teleledger.records.audit import touched
from teleledger.records.service import AccessDenied, RecordsService
from teleledger.records.store import Stored
from teleledger.storage import tables as t
from teleledger.storage.db import UnitOfWork

__all__ = ["TOKEN_EXTENSION", "TOKEN_HEADER", "ChainStatus", "DispenseRecord", "PatientPrescription",
           "PrescriptionService", "Verification"]

TOKEN_EXTENSION = "https://teleledger.org/fhir/StructureDefinition/prescription-token"
#: a pharmacist without access to the prescriber's store sends the token in this header (or extension)
TOKEN_HEADER = "X-Prescription-Token"
REGISTRY = "PrescriptionRegistry"
PARTICIPANTS = "ParticipantRegistry"
AUTHORITY = "node:authority"
_STATUS_FIELDS = ("exists", "prescriber", "prescriber_org", "patient_pseudonym", "quantity_per_fill", "refills",
                  "expiry", "issued_at", "fills_completed", "dispensed_in_fill", "refills_remaining",
                  "total_dispensed", "remaining", "cancelled", "expired", "completed")
_WAIT = 30.0


class PrescriptionRefused(Conflict):
    """The chain would refuse (or did refuse) this action; ``reason`` is the contract's words."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"the chain refuses: {reason}")


def _now_us() -> int:
    return time.time_ns() // 1000


def org_name(org: bytes) -> str:
    """A readable name for a bytes32 organization id (``org_id`` pads short names with zeros)."""
    raw = bytes(org).rstrip(b"\0")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "0x" + bytes(org).hex()
    return text if text.isprintable() and raw and len(raw) < 32 else "0x" + bytes(org).hex()


@dataclass(frozen=True)
class ChainStatus:
    exists: bool
    prescriber: str
    prescriber_org: bytes
    quantity_per_fill: int
    refills: int
    expiry: int
    fills_completed: int
    dispensed_in_fill: int
    refills_remaining: int
    total_dispensed: int
    remaining: int
    cancelled: bool
    expired: bool
    completed: bool

    @property
    def left_in_fill(self) -> int:
        return self.quantity_per_fill - self.dispensed_in_fill

    @property
    def state(self) -> str:
        if not self.exists:
            return "unknown"
        return ("cancelled" if self.cancelled else "completed" if self.completed
                else "expired" if self.expired else "active")


@dataclass(frozen=True)
class DispenseRecord:
    pharmacy: str
    quantity: int
    fill_number: int
    when: str  # ISO 8601 block time
    tx_hash: str


@dataclass(frozen=True)
class Verification:
    claims: rxtoken.TokenClaims
    chain: ChainStatus
    signer_is_prescriber: bool
    terms_match: bool
    prescriber_registered: bool
    dispenses: list[DispenseRecord] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        """Why this prescription cannot be dispensed now (empty: it can)."""
        out = []
        if not self.chain.exists:
            out.append("prescriptions: unknown prescription (the chain has no prescription with this token's "
                       "content: it was altered, or is not issued yet)")
            return out
        if not self.signer_is_prescriber:
            out.append("the token is not signed by the prescriber the chain knows")
        if not self.terms_match:
            out.append("the token's quantity, refills or expiry differ from the chain's")
        if self.chain.cancelled:
            out.append("prescriptions: prescription cancelled")
        elif self.chain.completed:
            out.append("prescriptions: prescription fully dispensed")
        elif self.chain.expired:
            out.append("prescriptions: prescription expired")
        return out

    @property
    def authentic(self) -> bool:
        return self.chain.exists and self.signer_is_prescriber and self.terms_match

    @property
    def dispensable(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class PatientPrescription:
    rx_id: str
    resource: dict
    token: str
    chain: ChainStatus | None
    dispenses: list[DispenseRecord]
    shared_with: list[str]


def _status_of(raw: Any) -> ChainStatus:
    values = dict(zip(_STATUS_FIELDS, raw))
    return ChainStatus(
        exists=bool(values["exists"]), prescriber=to_checksum_address(values["prescriber"]),
        prescriber_org=bytes(values["prescriber_org"]), quantity_per_fill=int(values["quantity_per_fill"]),
        refills=int(values["refills"]), expiry=int(values["expiry"]), fills_completed=int(values["fills_completed"]),
        dispensed_in_fill=int(values["dispensed_in_fill"]), refills_remaining=int(values["refills_remaining"]),
        total_dispensed=int(values["total_dispensed"]), remaining=int(values["remaining"]),
        cancelled=bool(values["cancelled"]), expired=bool(values["expired"]), completed=bool(values["completed"]))


def _system() -> Principal:
    from teleledger.identity.scopes import ScopeSet

    return Principal(subject="system:prescriptions", role="service", scopes=ScopeSet.parse("system/*.cruds"),
                     patient_id=None, practitioner_id=None, purpose="HOPERAT")


def _token_of(resource: dict) -> str | None:
    for ext in resource.get("extension") or []:
        if isinstance(ext, dict) and ext.get("url") == TOKEN_EXTENSION and isinstance(ext.get("valueString"), str):
            return ext["valueString"]
    return None


def _iso(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat().replace("+00:00", "Z")


class PrescriptionService:
    """See the module docstring. One per node (``for_node``): it registers indexer projectors."""

    def __init__(self, *, engine: Engine, records: RecordsService, keystore: Any, chain: Any, issuer: str,
                 org: str, pseudonym_key: bytes, now: Any = time.time) -> None:
        self.engine = engine
        self.records = records
        self.keystore = keystore
        self.chain = chain
        self.issuer = issuer
        self.org = org
        self._pseudonym_key = pseudonym_key
        self._now = now
        self._member_lock = threading.Lock()
        if chain is not None:  # also attached to the indexer of a standby that takes the chain over
            chain.on("Dispensed", self._on_dispensed)
            chain.on("PrescriptionCancelled", self._on_cancelled)

    @classmethod
    def for_node(cls, node: Any) -> PrescriptionService:
        """The node's service, made once (a second would register the projectors twice)."""
        existing = getattr(node, "_prescriptions", None)
        if existing is None:
            settings = node.settings
            existing = cls(engine=node.engine, records=node.records, keystore=node.keystore, chain=node.chain,
                           issuer=settings.public_url, org=settings.chain_org or settings.node_name,
                           pseudonym_key=node.master.derive("teleledger rx patient pseudonym v1"))
            node._prescriptions = existing
        return existing

    # ------------------------------------------------------------------ plumbing

    def _client(self) -> Any:
        if self.chain is None:
            raise Conflict("e-prescriptions need the chain: this node runs with TELELEDGER_CHAIN_ENABLED=false")
        if self.chain.client is None:
            raise ChainUnavailable("this process is on standby for the chain: e-prescriptions are served by the "
                                   "process holding the chain")
        return self.chain.client

    def _registry(self) -> str:
        return self.chain.addresses[REGISTRY]

    def _participants(self) -> str:
        return self.chain.addresses[PARTICIPANTS]

    def _username(self, conn: Connection, principal: Principal) -> str:
        name = conn.execute(select(t.users.c.username).where(t.users.c.id == principal.subject)).scalar()
        if name is None:
            raise Forbidden("e-prescriptions are issued and dispensed by people with an account on this node")
        return str(name)

    def pseudonym(self, patient_id: str) -> bytes:
        """The patient as the chain knows them: HMAC-SHA-256 of the id under a node secret."""
        return hmac.new(self._pseudonym_key, f"Patient/{patient_id}".encode(), hashlib.sha256).digest()

    def status(self, digest: bytes) -> ChainStatus:
        return _status_of(self._client().call(self._registry(), REGISTRY, "status", digest))

    def _wait(self, key: str) -> None:
        self.chain.wait(key, timeout=_WAIT)

    # ------------------------------------------------------------------ membership

    def pharmacy_of(self, username: str) -> str:
        """The organization a pharmacist dispenses for: their recorded one, else this node's."""
        with self.engine.connect() as conn:
            row = conn.execute(select(rx_members.c.org).where(rx_members.c.username == username,
                                                              rx_members.c.roles.op("&")(ROLE_PHARMACIST) != 0)
                               .order_by(rx_members.c.created)).first()
        return row[0] if row else self.org

    def ensure_member(self, username: str, role: int, *, org: str | None = None) -> None:
        """Make ``user:<username>`` a member with ``role`` of ``org`` (default: this node's) on
        chain, sent by the node's authority as that organization's admin; no-op when it is one."""
        client = self._client()
        org = org or self.org
        oid = org_id(org)
        address = self.keystore.address(f"user:{username}")
        with self._member_lock:
            current = int(client.call(self._participants(), PARTICIPANTS, "roles_of", oid, address))
            if current & role:
                self._remember_member(username, org, current)
                return
            roles = current | role
            key = f"rx-member:{oid.hex()}:{address}:{roles}"
            with UnitOfWork(self.engine) as uow:
                enqueue(uow.c, kind="membership", key=key, contract=PARTICIPANTS, fn="set_member_roles",
                        args=[oid, address, roles], sender=AUTHORITY)
                uow.commit()
            try:
                self._wait(key)
            except ChainRevert as exc:
                raise Forbidden(f"{username} cannot be registered with organization {org} on the chain: "
                                f"{exc.reason}") from exc
            self._remember_member(username, org, roles)

    def request_member(self, username: str, role: int) -> None:
        """Record (without waiting) the chain write that makes ``user:<username>`` a member with
        ``role`` of this node's organization: for set-up code that runs before the outbox worker
        (``teleledger demo``); the row is sent when the server starts. Idempotent."""
        if self.chain is None:
            return
        oid = org_id(self.org)
        address = self.keystore.address(f"user:{username}")
        if self.chain.client is not None and int(self.chain.client.call(
                self._participants(), PARTICIPANTS, "roles_of", oid, address)) & role:
            return
        with UnitOfWork(self.engine) as uow:
            enqueue(uow.c, kind="membership", key=f"rx-member:{oid.hex()}:{address}:{role}", contract=PARTICIPANTS,
                    fn="set_member_roles", args=[oid, address, role], sender=AUTHORITY)
            uow.commit()

    def _remember_member(self, username: str, org: str, roles: int) -> None:
        with UnitOfWork(self.engine) as uow:
            row = uow.c.execute(select(rx_members.c.roles).where(rx_members.c.username == username,
                                                                 rx_members.c.org == org)).first()
            if row is None:
                uow.c.execute(rx_members.insert().values(username=username, org=org, roles=roles, created=_now_us()))
            elif int(row[0]) != roles:
                uow.c.execute(rx_members.update().where(rx_members.c.username == username, rx_members.c.org == org)
                              .values(roles=roles))
            uow.commit()

    def assign_pharmacy(self, username: str, org: str) -> None:
        """Record that pharmacist ``username`` works for ``org`` (before they dispense)."""
        self._remember_member(username, org, ROLE_PHARMACIST)

    def register_organization(self, name: str) -> None:
        """Admit organization ``name`` with this node's authority as its admin. Only where the
        authority is a consortium admin (the embedded chain); elsewhere the consortium decides."""
        client = self._client()
        oid = org_id(name)
        if client.call(self._participants(), PARTICIPANTS, "is_organization", oid):
            return
        key = f"rx-org:{oid.hex()}"
        authority = self.keystore.address(AUTHORITY)  # outside the unit of work: the keystore has its own
        with UnitOfWork(self.engine) as uow:
            enqueue(uow.c, kind="membership", key=key, contract=PARTICIPANTS, fn="approve_organization",
                    args=[oid, authority], sender=AUTHORITY)
            uow.commit()
        self._wait(key)

    # ------------------------------------------------------------------ issue

    def _check_request(self, request: Any) -> dict:
        if not isinstance(request, dict) or request.get("resourceType") != "MedicationRequest":
            raise InvalidInput("expected a MedicationRequest")
        med = request.get("medicationCodeableConcept")
        if not isinstance(med, dict) or not (med.get("text") or any(
                isinstance(c, dict) and c.get("code") for c in med.get("coding") or [])):
            raise InvalidInput("a prescription names its medication: an RxNorm coding or free text",
                               expression="MedicationRequest.medicationCodeableConcept")
        dosage = request.get("dosageInstruction")
        if not isinstance(dosage, list) or not any(isinstance(d, dict) and str(d.get("text") or "").strip()
                                                   for d in dosage):
            raise InvalidInput("a prescription needs dosage instructions (dosageInstruction.text)",
                               expression="MedicationRequest.dosageInstruction")
        dispense = request.get("dispenseRequest")
        if not isinstance(dispense, dict):
            raise InvalidInput("a prescription needs a dispenseRequest (quantity, validity period)",
                               expression="MedicationRequest.dispenseRequest")
        value = (dispense.get("quantity") or {}).get("value")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0 or int(value) != value:
            raise InvalidInput("the quantity per fill must be a whole number above 0",
                               expression="MedicationRequest.dispenseRequest.quantity.value")
        refills = dispense.get("numberOfRepeatsAllowed", 0)
        if not isinstance(refills, int) or isinstance(refills, bool) or not 0 <= refills <= 99:
            raise InvalidInput("the number of refills must be a whole number from 0 to 99",
                               expression="MedicationRequest.dispenseRequest.numberOfRepeatsAllowed")
        end = (dispense.get("validityPeriod") or {}).get("end")
        if rxtoken.expiry_seconds(end) <= self._now():
            raise InvalidInput("the prescription's validity must end in the future",
                               expression="MedicationRequest.dispenseRequest.validityPeriod.end")
        substitution = request.get("substitution")
        if substitution is not None and not isinstance((substitution or {}).get("allowedBoolean"), bool):
            raise InvalidInput("substitution.allowedBoolean must be true or false",
                               expression="MedicationRequest.substitution")
        subject = (request.get("subject") or {}).get("reference", "")
        if not isinstance(subject, str) or not subject.startswith("Patient/") or "/" in subject[8:] or not subject[8:]:
            raise InvalidInput("a prescription's subject is a Patient/<id> reference",
                               expression="MedicationRequest.subject")
        return request

    def issue(self, principal: Principal, request: Any) -> tuple[Stored, str]:
        """Validate, store, sign and record on chain (outbox) a practitioner's prescription."""
        if principal.role != "practitioner" or principal.practitioner_id is None:
            raise Forbidden("only a practitioner linked to a Practitioner record issues prescriptions")
        request = dict(self._check_request(request))
        client = self._client()
        with self.engine.connect() as conn:
            username = self._username(conn, principal)
        self.ensure_member(username, ROLE_PRACTITIONER)
        rx_id = str(uuid.uuid4())
        now = datetime.fromtimestamp(self._now(), timezone.utc)
        request.update({
            "id": rx_id, "status": "active", "intent": request.get("intent") or "order",
            "requester": {"reference": f"Practitioner/{principal.practitioner_id}"},
            "authoredOn": request.get("authoredOn") or now.isoformat(timespec="seconds"),
            "extension": [e for e in request.get("extension") or [] if e.get("url") != TOKEN_EXTENSION],
        })
        request.setdefault("substitution", {"allowedBoolean": True})
        content = rxtoken.content_from_request(request)
        token, claims = rxtoken.make_token(content, self.keystore.key(f"user:{username}"), issuer=self.issuer,
                                           chain_id=client.chain_id(), registry=self._registry())
        request["extension"] = request["extension"] + [{"url": TOKEN_EXTENSION, "valueString": token}]
        if not request["extension"]:
            request.pop("extension")
        validate(request)
        patient_id = request["subject"]["reference"][len("Patient/"):]
        key = f"rx-issue:{claims.rx_hash.hex()}"
        with UnitOfWork(self.engine) as uow:
            stored, _ = self.records.create_in(uow.c, principal, request, res_id=rx_id, validated=True)
            uow.c.execute(rx_prescriptions.insert().values(
                rx_id=rx_id, rx_hash="0x" + claims.rx_hash.hex(), salt=claims.salt, token=token,
                patient_id=patient_id, prescriber=principal.subject, created=_now_us()))
            enqueue(uow.c, kind="prescription", key=key, contract=REGISTRY, fn="issue",
                    args=[claims.rx_hash, org_id(self.org), self.pseudonym(patient_id), claims.quantity,
                          claims.refills, claims.expiry], sender=f"user:{username}")
            uow.commit()
        try:
            self._wait(key)
        except ChainRevert as exc:
            # the chain refused the prescription after it was stored: it must not look valid
            self._set_request_status(rx_id, "entered-in-error")
            raise PrescriptionRefused(exc.reason) from exc
        except ChainUnavailable:
            pass  # recorded in the outbox: the chain gets it when it answers; verify says "unknown" until then
        return stored, token

    def issue_with_records(self, principal: Principal, request: Any) -> tuple[Stored, str]:
        """``issue`` with the AccessDenied trail of the records service (a denial is logged)."""
        try:
            return self.issue(principal, request)
        except AccessDenied as exc:
            self.records.record_denial(principal, exc)
            raise

    # ------------------------------------------------------------------ verify

    def verify(self, token: str) -> Verification:
        """Check ``token`` against the chain alone (see the module docstring)."""
        claims = rxtoken.verify_token(token)
        client = self._client()
        if claims.chain_id != client.chain_id() or claims.registry != to_checksum_address(self._registry()):
            raise rxtoken.InvalidToken("the token was issued on another chain or registry than this node's")
        chain = self.status(claims.rx_hash)
        signer_ok = chain.exists and claims.signer == chain.prescriber
        terms = chain.exists and (claims.quantity, claims.refills, claims.expiry) == (
            chain.quantity_per_fill, chain.refills, chain.expiry)
        registered = chain.exists and bool(client.call(self._participants(), PARTICIPANTS, "has_role",
                                                       chain.prescriber_org, chain.prescriber, ROLE_PRACTITIONER))
        return Verification(claims, chain, signer_ok, terms, registered, self.dispenses(claims.rx_hash))

    def dispenses(self, digest: bytes) -> list[DispenseRecord]:
        """The Dispensed events of ``digest`` the indexer has stored, oldest first."""
        indexer = self.chain.indexer if self.chain is not None else None
        if indexer is not None:
            try:
                indexer.poll()  # catch up now rather than show a history one poll old
            except (ChainUnavailable, TeleledgerError):
                pass
        with self.engine.connect() as conn:
            found = [e for e in chain_events(conn, "Dispensed", contract=REGISTRY)
                     if bytes(e.args.get("rx_hash", b"")) == digest]
        client = self._client()
        times: dict[int, str] = {}
        out = []
        for e in found:
            if e.block_number not in times:
                times[e.block_number] = _iso(client.get_block(e.block_number).timestamp)
            out.append(DispenseRecord(org_name(e.args["pharmacy_org"]), int(e.args["quantity"]),
                                      int(e.args["fill_number"]), times[e.block_number], e.tx_hash))
        return out

    # ------------------------------------------------------------------ dispense

    def _token_for(self, token: str | None, prescription: str | None) -> str:
        if token:
            return token
        if not prescription:
            raise InvalidInput("a dispense names its prescription: the token, or authorizingPrescription",
                               expression="MedicationDispense.authorizingPrescription")
        rx_id = prescription.rstrip("/").split("/")[-1]
        with self.engine.connect() as conn:
            stored = conn.execute(select(rx_prescriptions.c.token).where(rx_prescriptions.c.rx_id == rx_id)).scalar()
        if stored is None:
            raise InvalidInput(f"this node did not issue {prescription!r}: send the prescription token in the "
                               f"{TOKEN_HEADER} header or the {TOKEN_EXTENSION} extension")
        return str(stored)

    def dispense(self, principal: Principal, quantity: Any, *, token: str | None = None,
                 prescription: str | None = None, resource: dict | None = None) -> Stored:
        """Dispense ``quantity`` units of the prescription (token, or a MedicationRequest this
        node issued); ``resource``: the MedicationDispense the client sent (its extra fields kept)."""
        if principal.role != "pharmacist":
            raise AccessDenied("access to dispense a prescription denied: Only pharmacists dispense prescriptions. "
                               "(not-a-pharmacist)", action="create", reason="not-a-pharmacist",
                               patients=frozenset())
        if not isinstance(quantity, (int, float)) or isinstance(quantity, bool) or int(quantity) != quantity \
                or quantity <= 0:
            raise InvalidInput("the quantity to dispense must be a whole number above 0",
                               expression="MedicationDispense.quantity.value")
        quantity = int(quantity)
        v = self.verify(self._token_for(token, prescription))
        if v.chain.exists and not (v.signer_is_prescriber and v.terms_match):
            raise rxtoken.InvalidToken(v.problems[0])
        if v.problems:
            raise PrescriptionRefused(v.problems[0])
        if quantity > v.chain.left_in_fill:
            raise PrescriptionRefused(f"prescriptions: quantity exceeds what remains of the fill "
                                      f"({v.chain.left_in_fill} left in fill {v.chain.fills_completed + 1})")
        with self.engine.connect() as conn:
            username = self._username(conn, principal)
        pharmacy = self.pharmacy_of(username)
        client = self._client()
        oid = org_id(pharmacy)
        address = self.keystore.address(f"user:{username}")
        if not client.call(self._participants(), PARTICIPANTS, "is_organization", oid):
            raise Forbidden(f"the pharmacy organization {pharmacy} is not registered on the consortium chain")
        if pharmacy == self.org:
            self.ensure_member(username, ROLE_PHARMACIST)
        if not client.call(self._participants(), PARTICIPANTS, "has_role", oid, address, ROLE_PHARMACIST):
            raise Forbidden(f"{username} is not registered as a pharmacist of {pharmacy} on the consortium chain")
        decision = policy.dispense_prescription(principal, token_verified=v.authentic)
        if not decision.allowed:
            raise AccessDenied(f"access to dispense denied: {decision.detail} ({decision.reason})",
                               action="create", reason=decision.reason, patients=frozenset())
        md_id = str(uuid.uuid4())
        ref = keccak(text=f"{self.issuer}/fhir/MedicationDispense/{md_id}")
        body = self._dispense_resource(resource, v, quantity, pharmacy)
        key = f"rx-dispense:{md_id}"
        with UnitOfWork(self.engine) as uow:
            stored = self.records.store.create(uow.c, body, res_id=md_id)
            self._audit(uow.c, principal, "create", stored)
            enqueue(uow.c, kind="dispense", key=key, contract=REGISTRY, fn="dispense",
                    args=[v.claims.rx_hash, oid, quantity, ref], sender=f"user:{username}")
            uow.commit()
        try:
            self._wait(key)
        except ChainRevert as exc:
            self._finish_dispense(principal, md_id, "declined", reason=exc.reason)
            raise PrescriptionRefused(exc.reason) from exc
        done = self._finish_dispense(principal, md_id, "completed")
        after = self.status(v.claims.rx_hash)
        if after.completed:
            self._follow_chain(v.claims.rx_hash, "completed")
        return done

    def _dispense_resource(self, resource: dict | None, v: Verification, quantity: int, pharmacy: str) -> dict:
        content = v.claims.content
        body = {k: val for k, val in (resource or {}).items()
                if k not in ("id", "meta", "status", "quantity", "authorizingPrescription", "extension", "subject",
                             "medicationCodeableConcept", "medicationReference")}
        med = content.get("medication") or {}
        concept = ({"coding": [{k: med[k] for k in ("system", "code", "display") if med.get(k)}],
                    "text": med.get("display") or med.get("code")}
                   if med.get("code") else {"text": med.get("text") or "medication"})
        rx_ref = f"MedicationRequest/{content.get('id')}"
        if v.claims.issuer != self.issuer:
            rx_ref = f"{v.claims.issuer}/fhir/{rx_ref}"
        unit = (content.get("quantity") or {}).get("unit")
        body.update({
            "resourceType": "MedicationDispense", "status": "in-progress",
            "medicationCodeableConcept": concept,
            "authorizingPrescription": [{"reference": rx_ref}],
            "quantity": {"value": quantity, **({"unit": unit} if unit else {})},
            "whenHandedOver": datetime.fromtimestamp(self._now(), timezone.utc).isoformat(timespec="seconds"),
            "performer": [{"actor": {"display": pharmacy}}],
            "extension": [{"url": TOKEN_EXTENSION + "-hash", "valueString": "0x" + v.claims.rx_hash.hex()}],
        })
        if v.claims.issuer == self.issuer:
            # a prescription of this node: the dispense joins the patient's record (their portal)
            with self.engine.connect() as conn:
                patient = conn.execute(select(rx_prescriptions.c.patient_id)
                                       .where(rx_prescriptions.c.rx_id == content.get("id"))).scalar()
            if patient:
                body["subject"] = {"reference": f"Patient/{patient}"}
        validate(body)
        return body

    def _audit(self, conn: Connection, principal: Principal, action: str, stored: Stored) -> None:
        if self.records.auditor is not None:
            self.records.auditor.access(conn, principal, action, touched([stored]))

    def _finish_dispense(self, principal: Principal, md_id: str, status: str, *, reason: str | None = None) -> Stored:
        with UnitOfWork(self.engine) as uow:
            current = self.records.store.current(uow.c, "MedicationDispense", md_id, for_update=True)
            assert current is not None and current.body is not None
            if current.body.get("status") != "in-progress":
                uow.commit()
                return current
            body = dict(current.body)
            body["status"] = status
            if reason:
                body["statusReasonCodeableConcept"] = {"text": reason}
            stored, _ = self.records.store.update(uow.c, body, md_id, current=current)
            self._audit(uow.c, principal, "update", stored)
            uow.commit()
        return stored

    # ------------------------------------------------------------------ cancel

    def cancel(self, principal: Principal, rx_id: str) -> Stored:
        with self.engine.connect() as conn:
            row = conn.execute(select(rx_prescriptions).where(rx_prescriptions.c.rx_id == rx_id)).first()
        if row is None:
            raise NotFound(f"no prescription MedicationRequest/{rx_id} was issued at this node")
        decision = policy.cancel_prescription(principal, prescriber_account=row.prescriber)
        if not decision.allowed:
            raise AccessDenied(f"access to cancel denied: {decision.detail} ({decision.reason})", action="update",
                               reason=decision.reason, patients=frozenset({row.patient_id}))
        digest = bytes.fromhex(row.rx_hash[2:])
        chain = self.status(digest)
        if not chain.exists:
            raise PrescriptionRefused("prescriptions: unknown prescription")
        if chain.cancelled or chain.completed:
            raise PrescriptionRefused("prescriptions: prescription cancelled" if chain.cancelled
                                      else "prescriptions: prescription fully dispensed")
        with self.engine.connect() as conn:
            username = self._username(conn, principal)
        key = f"rx-cancel:{row.rx_hash}"
        with UnitOfWork(self.engine) as uow:
            enqueue(uow.c, kind="prescription", key=key, contract=REGISTRY, fn="cancel", args=[digest],
                    sender=f"user:{username}")
            uow.commit()
        try:
            self._wait(key)
        except ChainRevert as exc:
            raise PrescriptionRefused(exc.reason) from exc
        self._follow_chain(digest, "cancelled")
        return self.records.read(principal, "MedicationRequest", rx_id)

    # ------------------------------------------------------------------ the chain drives the status

    def _set_request_status(self, rx_id: str, status: str, conn: Connection | None = None) -> None:
        if conn is None:
            with UnitOfWork(self.engine) as uow:
                self._set_request_status(rx_id, status, uow.c)
                uow.commit()
            return
        current = self.records.store.current(conn, "MedicationRequest", rx_id, for_update=True)
        if current is None or current.body is None or current.body.get("status") == status:
            return
        body = dict(current.body)
        body["status"] = status
        stored, _ = self.records.store.update(conn, body, rx_id, current=current)
        self._audit(conn, _system(), "update", stored)

    def _follow_chain(self, digest: bytes, status: str, conn: Connection | None = None) -> None:
        def run(c: Connection) -> None:
            rx_id = c.execute(select(rx_prescriptions.c.rx_id)
                              .where(rx_prescriptions.c.rx_hash == "0x" + bytes(digest).hex())).scalar()
            if rx_id is not None:
                self._set_request_status(rx_id, status, c)

        if conn is not None:
            run(conn)
            return
        with UnitOfWork(self.engine) as uow:
            run(uow.c)
            uow.commit()

    def _on_dispensed(self, conn: Connection, event: Event) -> None:
        if int(event.args.get("remaining", 1)) == 0:
            self._follow_chain(event.args["rx_hash"], "completed", conn)

    def _on_cancelled(self, conn: Connection, event: Event) -> None:
        self._follow_chain(event.args["rx_hash"], "cancelled", conn)

    # ------------------------------------------------------------------ the patient

    def mine(self, principal: Principal) -> list[PatientPrescription]:
        """The patient's prescriptions issued at this node, newest first, with chain status."""
        if principal.role != "patient" or principal.patient_id is None:
            raise Forbidden("the prescriptions page is for patients")
        with self.engine.connect() as conn:
            rows = conn.execute(select(rx_prescriptions).where(rx_prescriptions.c.patient_id == principal.patient_id)
                                .order_by(rx_prescriptions.c.created.desc())).all()
            shares: dict[str, list[str]] = {}
            for s in conn.execute(select(rx_shares.c.rx_id, rx_shares.c.pharmacy)
                                  .where(rx_shares.c.patient_id == principal.patient_id)
                                  .order_by(rx_shares.c.id)).all():
                shares.setdefault(s.rx_id, []).append(s.pharmacy)
        out = []
        for row in rows:
            stored = self.records.read(principal, "MedicationRequest", row.rx_id)  # policy + audit
            digest = bytes.fromhex(row.rx_hash[2:])
            try:
                chain: ChainStatus | None = self.status(digest)
                dispenses = self.dispenses(digest)
            except (ChainUnavailable, Conflict):
                chain, dispenses = None, []
            out.append(PatientPrescription(row.rx_id, stored.body or {}, row.token, chain, dispenses,
                                           shares.get(row.rx_id, [])))
        return out

    def share(self, principal: Principal, rx_id: str, pharmacy: str) -> None:
        """The patient sends a prescription to ``pharmacy`` (a registered organization)."""
        pharmacy = (pharmacy or "").strip()
        if not pharmacy or len(pharmacy) > 128:
            raise InvalidInput("choose a pharmacy")
        with self.engine.connect() as conn:
            patient = conn.execute(select(rx_prescriptions.c.patient_id)
                                   .where(rx_prescriptions.c.rx_id == rx_id)).scalar()
        if patient is None:
            raise NotFound("no such prescription")
        decision = policy.share_prescription(principal, patient_id=patient)
        if not decision.allowed:
            raise Forbidden(f"{decision.detail} ({decision.reason})")
        if pharmacy not in self.pharmacies():
            raise InvalidInput(f"{pharmacy} is not a pharmacy known to this node")
        with UnitOfWork(self.engine) as uow:
            try:
                uow.c.execute(rx_shares.insert().values(rx_id=rx_id, pharmacy=pharmacy, patient_id=patient,
                                                        created=_now_us()))
            except IntegrityError as exc:  # pragma: no cover - no unique constraint today
                raise Conflict("already shared") from exc
            uow.commit()

    def pharmacies(self) -> list[str]:
        """Pharmacy organizations a patient may choose: the ones this node's pharmacists work for."""
        with self.engine.connect() as conn:
            names = {r[0] for r in conn.execute(select(rx_members.c.org)
                                                .where(rx_members.c.roles.op("&")(ROLE_PHARMACIST) != 0)).all()}
        return sorted(names | {self.org})

    def token_of(self, resource: dict) -> str | None:
        return _token_of(resource)
