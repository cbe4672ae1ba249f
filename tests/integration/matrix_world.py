"""The world of the HTTP authorization matrix (tests/integration/test_access_matrix.py): one node
with the embedded chain, built once per database backend, in which every patient is in exactly one
*situation* and every role has a real account and token.

Situations (one patient each; ``SITUATIONS``):

=================  ===============================================================================
treated            Dr Care treats them (Encounters with Dr Care and Dr House); no consent
consented          consents in force to Dr Rita, the Corner Pharmacy, the payer and the study
expired            the same four consents, granted on chain, whose period ended in 2020
revoked            the same four consents, granted on chain and then withdrawn (revoked on chain)
exception          the same four consents, each with a nested deny of mental-health (PSY) data;
                   Dr Care treats them too
unrelated          nobody treats them, no consent
glass              Dr Erin holds an active break-glass claim on them
glass_expired      Dr Erin's break-glass claim on them has expired
delegate           their RelatedPerson Dana acts for them (a delegation designated through the API
                   and in force on chain) and Ron did until the patient removed him (enabled, then
                   removed on chain); a Consent of theirs keeps mental-health (PSY) data from Dana
=================  ===============================================================================

plus ``OTHER``: the record of Olga, the "another patient" role (nobody treats her, no consent).

Every patient has the same record, so that a search can reach every kind of row: per attending
practitioner (``ATTENDING``) an Encounter, a note that practitioner signed (Composition and its
Provenance) and a secure-message thread the patient started with a PDF attached (Communication);
an Observation updated once (two versions), an Observation labelled PSY through ``meta.security``
whose performer is Dr Psych (referenced by nothing else, so that a practitioner entry can only
leak through it), a Condition, a Condition labelled PSY by its ICD-10 code (F32.1), and a
MedicationRequest; and in the consenting situations the patient's four Consents (withdrawn, so
deleted, in "revoked": ``World.deleted``). Every resource is recorded as a ``Res`` (its situation,
labels, message participants and the references it makes), and ``check_world`` holds the world
to what the store says about each (compartment, sensitivity labels, indexed references) and to
the consent state the indexer projected from the chain.

The consents are FHIR Consents POSTed by the patient's own token, so they are really signed
(EIP-712), sent through the outbox, mined and projected by the indexer. Break-glass claims go
through ``POST /api/break-glass``; the expired one is then moved two hours into the past, in the
claims table and the consent index alike (both answer from the real clock, so nothing sleeps).

``World.call`` makes one request as one identity and returns the response with the access events
the request wrote, so a test can assert that every access, allowed or denied, left its trace.

Delegates (an account of role patient that signs in as a RelatedPerson, ``policy.delegates``)
join through ``DELEGATE_SITUATIONS``, each built by the builder ``add_delegate_situation``
registered, once the base world stands. "delegate" is built like a user would: the RelatedPersons
(``DELEGATES``, in the patient's compartment, so part of the record) are created, their accounts
linked to them, the patient designates both through ``POST /api/consent/delegates`` (EIP-712
SetDelegate → outbox → ConsentRegistry → indexer), then removes Ron the same way, and POSTs the
Consent that keeps PSY data from Dana; ``check_world`` holds the result to the DelegateSet events
on chain, the delegations API and the consent state the indexer projected.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select, update

from teleledger.fhir import compartment
from teleledger.ledger.chain.indexer import events as chain_events
from teleledger.ledger.chain.storage import chain_outbox
from teleledger.ledger.log.storage import log_leaves, log_queue
from teleledger.policy.consent_tables import break_glass_claims
from teleledger.policy.delegate_tables import consent_delegates
from teleledger.policy.delegates import delegation_ref
from teleledger.policy.research import MEMBER_EXTENSION
from teleledger.policy.sensitivity import classify
from teleledger.storage import tables as t
from tests.integration.helpers import SERVICE_SECRET

PASSWORD = "correct horse 1"
PDF = b"%PDF-1.7\n1 0 obj\n<<>>\nendobj\n%%EOF\n"

BASE_SITUATIONS: tuple[str, ...] = ("treated", "consented", "expired", "revoked", "exception", "unrelated",
                                    "glass", "glass_expired")
#: Situations of delegates (a patient account acting as a RelatedPerson for someone else): each
#: named here has its builder registered with ``add_delegate_situation``, and its column in the
#: oracle of test_access_matrix.py.
DELEGATE_SITUATIONS: tuple[str, ...] = ("delegate",)
#: the RelatedPersons of the "delegate" patient who have accounts (role patient, linked to them by
#: ``related_person``, no Patient of their own) → whether they still act for the patient at the
#: end: Dana does, Ron was designated and then removed
DELEGATES: dict[str, bool] = {"dana": True, "ron": False}
SITUATIONS: tuple[str, ...] = BASE_SITUATIONS + DELEGATE_SITUATIONS
OTHER = "other"  # Olga's own record: the "another patient" role

#: who attends each patient (an Encounter, a signed note and a message thread each); the first
#: is also the performer of the plain Observation and the requester of the MedicationRequest
ATTENDING: dict[str, tuple[str, ...]] = {"treated": ("care", "house"), "exception": ("care",)}
DEFAULT_ATTENDING = ("house",)
#: situations whose patient granted the four consents, and how each ended
CONSENTING = ("consented", "expired", "revoked", "exception")
#: the consents each consenting patient grants: grantee → (purpose, resource types, None = all)
GRANTS: dict[str, tuple[str, frozenset[str] | None]] = {
    "rita": ("TREAT", None),
    "pharmacy": ("TREAT", frozenset({"MedicationRequest"})),
    "payer_org": ("HPAYMT", frozenset({"Encounter", "Patient"})),
    "study": ("HRESCH", frozenset({"Observation", "Condition", "Patient"})),
}
GRANTEE_TYPES = {"rita": "Practitioner", "pharmacy": "Organization", "payer_org": "Organization",
                 "study": "ResearchStudy"}

ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
CONSENT_ACTION = "http://terminology.hl7.org/CodeSystem/consentaction"
CONSENT_SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"
RESOURCE_TYPES = "http://hl7.org/fhir/resource-types"
DIRECTORY = ("Practitioner", "Organization", "Location")


@dataclass(frozen=True)
class Identity:
    """Who makes a request: an account (or the service client) and the purpose of use it states."""

    name: str  # the role's name in the matrix, e.g. "pharmacist" or "self"
    username: str  # the account's username, or "" for the service client
    purpose: str | None = None  # X-Purpose-Of-Use, None for the default (TREAT)


@dataclass
class Res:
    """A resource of the world and what the oracle needs to know about it."""

    key: str
    type: str
    id: str
    sit: str | None  # the situation of the patient whose compartment holds it; None: directory
    labels: frozenset[str] = frozenset()
    participants: frozenset[str] = frozenset()  # a message's practitioners (keys), sender/recipient
    directory_refs: frozenset[str] = frozenset()  # "Practitioner/<id>" ... it references (search params)
    links: dict[str, frozenset[str]] = field(default_factory=dict)  # reference search parameter → targets
    versions: int = 1
    extra: dict[str, str] = field(default_factory=dict)  # thread id, composition id ...

    @property
    def ref(self) -> str:
        return f"{self.type}/{self.id}"


@dataclass
class Call:
    """A response and the access events its request wrote."""

    status: int
    body: Any
    text: str
    events: list[Any]
    content: bytes = b""


class World:
    def __init__(self, client: Any, node: Any) -> None:
        self.client, self.node = client, node
        self.ids: dict[str, str] = {}
        self.res: dict[str, Res] = {}
        self.by_ref: dict[str, Res] = {}
        #: deleted resources (the withdrawn consents of "revoked"): not in ``res``, never found
        self.deleted: list[Res] = []
        self.accounts: dict[str, str] = {}  # username → account id
        self._tokens: dict[str, str] = {}
        self._last_event = 0
        self._pages: dict[str, Any] = {}

    # ---- identities ----------------------------------------------------------------------

    def token(self, username: str) -> str:
        if username not in self._tokens:
            if username == "":
                data = {"grant_type": "client_credentials", "client_id": "matrix-svc", "client_secret": SERVICE_SECRET,
                        "scope": "system/*.cruds"}
            else:
                data = {"grant_type": "password", "username": username, "password": PASSWORD}
            r = self.client.post("/auth/token", data=data)
            assert r.status_code == 200, r.text
            self._tokens[username] = r.json()["access_token"]
        return self._tokens[username]

    def headers(self, who: Identity) -> dict[str, str]:
        # no Content-Type: a JSON body sets its own, a form (POST _search) its own
        h = {"Authorization": f"Bearer {self.token(who.username)}"}
        if who.purpose:
            h["X-Purpose-Of-Use"] = who.purpose
        return h

    def actor(self, who: Identity) -> str:
        return "client:matrix-svc" if who.username == "" else self.accounts[who.username]

    def page_client(self, username: str) -> Any:
        """A browser of its own (cookie jar) signed in as ``username``."""
        from fastapi.testclient import TestClient

        if username not in self._pages:
            page = TestClient(self.client.app, raise_server_exceptions=False)
            r = page.post("/login", data={"username": username, "password": PASSWORD}, follow_redirects=False)
            assert r.status_code == 303, r.text
            self._pages[username] = page
        return self._pages[username]

    # ---- requests with their access events -----------------------------------------------

    def mark(self) -> None:
        """From now on, ``call`` reports only events written after this point."""
        with self.node.engine.connect() as conn:
            self._last_event = int(conn.execute(select(func.coalesce(func.max(t.access_events.c.id), 0))).scalar_one())

    def new_events(self) -> list[Any]:
        with self.node.engine.connect() as conn:
            rows = conn.execute(select(t.access_events).where(t.access_events.c.id > self._last_event)
                                .order_by(t.access_events.c.id)).all()
        if rows:
            self._last_event = int(rows[-1].id)
        return list(rows)

    def call(self, who: Identity, method: str, path: str, **kw: Any) -> Call:
        r = self.client.request(method, path, headers=self.headers(who), **kw)
        return self._done(r)

    def page(self, username: str, path: str) -> Call:
        r = self.page_client(username).get(path, follow_redirects=False)
        return self._done(r)

    def _done(self, r: Any) -> Call:
        ctype = r.headers.get("content-type", "").split(";")[0]
        body = r.json() if ctype in ("application/json", "application/fhir+json") and r.content else None
        text = r.text if ctype.startswith("text/") or "json" in ctype else ""
        return Call(r.status_code, body, text, self.new_events(), r.content)

    def log_entries(self) -> int:
        """Entries of the transparency log, sequenced or still queued."""
        with self.node.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(log_leaves)).scalar_one()
                       + conn.execute(select(func.count()).select_from(log_queue)).scalar_one())

    # ---- the chain -------------------------------------------------------------------------

    def settle(self) -> None:
        """Until every chain write is confirmed and the indexer has projected it."""
        with self.node.engine.connect() as conn:
            keys = conn.execute(select(chain_outbox.c.idempotency_key)).scalars().all()
        for key in keys:
            self.node.chain.wait(key, timeout=60)
        self.node.chain.indexer.poll_until_caught_up()

    # ---- the world's facts -----------------------------------------------------------------

    def of(self, sit: str | None = None, rtype: str | None = None) -> list[Res]:
        return [r for r in self.res.values() if (sit is None or r.sit == sit) and (rtype is None or r.type == rtype)]

    def add(self, key: str, rtype: str, rid: str, sit: str | None, **kw: Any) -> Res:
        res = Res(key, rtype, rid, sit, **kw)
        self.res[key] = res
        self.by_ref[res.ref] = res
        return res


# ---- resources ------------------------------------------------------------------------------


def _patient(sit: str) -> dict:
    # the family name is the situation's marker on the pages ("Matrixtreated" ...)
    return {"resourceType": "Patient", "name": [{"family": f"Matrix{sit.replace('_', '')}", "given": ["Pat"]}],
            "gender": "female", "birthDate": "1980-02-29"}


def _practitioner(family: str) -> dict:
    return {"resourceType": "Practitioner", "name": [{"family": family, "given": ["Dr"], "prefix": ["Dr"]}]}


def _encounter(patient_id: str, practitioner_id: str) -> dict:
    return {"resourceType": "Encounter", "status": "in-progress",
            "class": {"system": ACT_CODE, "code": "VR", "display": "virtual"},
            "subject": {"reference": f"Patient/{patient_id}"},
            "participant": [{"individual": {"reference": f"Practitioner/{practitioner_id}"}}],
            "period": {"start": "2024-06-01T10:00:00Z"}}


def _observation(patient_id: str, encounter_id: str, performer_id: str, *, value: float = 72,
                 psy: bool = False) -> dict:
    obs = {"resourceType": "Observation", "status": "final",
           "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                     "code": "vital-signs"}]}],
           "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
           "subject": {"reference": f"Patient/{patient_id}"},
           "encounter": {"reference": f"Encounter/{encounter_id}"},
           "performer": [{"reference": f"Practitioner/{performer_id}"}],
           "effectiveDateTime": "2024-06-01T10:05:00Z",
           "valueQuantity": {"value": value, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"}}
    if psy:
        obs["meta"] = {"security": [{"system": ACT_CODE, "code": "PSY"}]}
    return obs


def _condition(patient_id: str, encounter_id: str, *, psy: bool = False) -> dict:
    code = ({"coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": "F32.1"}], "text": "depression"} if psy
            else {"text": "hypertension"})
    return {"resourceType": "Condition", "subject": {"reference": f"Patient/{patient_id}"},
            "encounter": {"reference": f"Encounter/{encounter_id}"}, "code": code}


def _medication_request(patient_id: str, encounter_id: str, requester_id: str) -> dict:
    return {"resourceType": "MedicationRequest", "status": "active", "intent": "order",
            "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                                                      "code": "197361"}], "text": "amlodipine 5 mg"},
            "subject": {"reference": f"Patient/{patient_id}"}, "encounter": {"reference": f"Encounter/{encounter_id}"},
            "requester": {"reference": f"Practitioner/{requester_id}"}, "authoredOn": "2024-06-01"}


def _related_person(patient_id: str, name: str) -> dict:
    # the family name is the person's marker on the pages ("Kindana" ...)
    return {"resourceType": "RelatedPerson", "patient": {"reference": f"Patient/{patient_id}"},
            "relationship": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode",
                                          "code": "FAMMEMB"}]}],
            "name": [{"family": f"Kin{name}", "given": [name.capitalize()]}]}


def _actor(ref: str) -> dict:
    return {"reference": {"reference": ref}, "role": {"coding": [{"system": PARTICIPATION, "code": "PRCP"}]}}


def consent(patient_id: str, grantee_ref: str, purpose: str, classes: frozenset[str] | None, *,
            period: dict | None = None, deny_psy: bool = False) -> dict:
    provision: dict[str, Any] = {"type": "permit", "actor": [_actor(grantee_ref)],
                                 "action": [{"coding": [{"system": CONSENT_ACTION, "code": "access"}]}],
                                 "purpose": [{"system": ACT_REASON, "code": purpose}]}
    if classes is not None:
        provision["class"] = [{"system": RESOURCE_TYPES, "code": c} for c in sorted(classes)]
    if period is not None:
        provision["period"] = period
    if deny_psy:
        provision["provision"] = [{"type": "deny", "securityLabel": [{"system": ACT_CODE, "code": "PSY"}]}]
    scope = "research" if purpose == "HRESCH" else "patient-privacy"
    return {"resourceType": "Consent", "status": "active",
            "scope": {"coding": [{"system": CONSENT_SCOPE, "code": scope}]},
            "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
            "patient": {"reference": f"Patient/{patient_id}"}, "provision": provision}


# ---- building the world -----------------------------------------------------------------------

DelegateBuilder = Callable[[World], None]
_DELEGATE_BUILDERS: dict[str, DelegateBuilder] = {}


def add_delegate_situation(name: str, builder: DelegateBuilder) -> None:
    """Register how a delegate situation is built (called once the base world stands)."""
    _DELEGATE_BUILDERS[name] = builder


def _post(w: World, who: Identity, path: str, body: Any, expect: int = 201) -> Any:
    r = w.client.post(path, json=body, headers=w.headers(who))
    assert r.status_code == expect, (path, r.status_code, r.text)
    return r.json() if r.content else None


SERVICE = Identity("service", "")


def _create(w: World, resource: dict) -> dict:
    return _post(w, SERVICE, f"/fhir/{resource['resourceType']}", resource)


def build_world(client: Any, node: Any) -> World:
    w = World(client, node)
    ids = w.ids
    node.accounts.create_client(client_id="matrix-svc", secret=SERVICE_SECRET, scopes="system/*.cruds")

    # the directory: practitioners, organizations, the study
    for key, family in (("care", "Carey"), ("house", "House"), ("psych", "Psych"), ("rita", "Rita"),
                        ("stranger", "Stranger"), ("erin", "Erin")):
        ids[key] = _create(w, _practitioner(family))["id"]
        w.add(key, "Practitioner", ids[key], None)
    for key, name in (("pharmacy", "Corner Pharmacy"), ("other_pharmacy", "Far Pharmacy"), ("payer_org", "Payer")):
        ids[key] = _create(w, {"resourceType": "Organization", "name": name})["id"]
        w.add(key, "Organization", ids[key], None)
    accounts = node.accounts
    for username, role, link in (("care", "practitioner", {"practitioner": f"Practitioner/{ids['care']}"}),
                                 ("house", "practitioner", {"practitioner": f"Practitioner/{ids['house']}"}),
                                 ("rita", "practitioner", {"practitioner": f"Practitioner/{ids['rita']}"}),
                                 ("stranger", "practitioner", {"practitioner": f"Practitioner/{ids['stranger']}"}),
                                 ("erin", "practitioner", {"practitioner": f"Practitioner/{ids['erin']}"}),
                                 ("pharmacist", "pharmacist", {"organization": f"Organization/{ids['pharmacy']}"}),
                                 ("other_pharmacist", "pharmacist",
                                  {"organization": f"Organization/{ids['other_pharmacy']}"}),
                                 ("payer", "payer", {"organization": f"Organization/{ids['payer_org']}"}),
                                 ("researcher", "researcher", {}), ("admin", "admin", {})):
        w.accounts[username] = accounts.create_user(username=username, password=PASSWORD, role=role, **link).id
    study = {"resourceType": "ResearchStudy", "status": "active", "title": "Matrix study",
             "extension": [{"url": MEMBER_EXTENSION, "valueString": w.accounts["researcher"]}]}
    ids["study"] = _create(w, study)["id"]
    w.add("study", "ResearchStudy", ids["study"], None)

    # the patients and their records
    for sit in (*BASE_SITUATIONS, OTHER):
        _record(w, sit)

    # the consents, signed by each patient and recorded on chain
    consents: dict[str, list[str]] = {}
    for sit in CONSENTING:
        me = Identity("self", f"pat_{sit}")
        for grantee, (purpose, classes) in GRANTS.items():
            body = consent(ids[f"patient:{sit}"], f"{GRANTEE_TYPES[grantee]}/{ids[grantee]}", purpose, classes,
                           period={"start": "2020-01-01", "end": "2020-12-31"} if sit == "expired" else None,
                           deny_psy=sit == "exception")
            consents.setdefault(sit, []).append(_post(w, me, "/fhir/Consent", body)["id"])
    w.settle()
    for consent_id in consents["revoked"]:
        r = client.delete(f"/fhir/Consent/{consent_id}", headers=w.headers(Identity("self", "pat_revoked")))
        assert r.status_code == 204, r.text
    w.settle()
    for sit, ids_ in consents.items():
        for grantee, consent_id in zip(GRANTS, ids_):
            if sit == "revoked":  # withdrawn consents are deleted (version 2 is the deletion)
                w.deleted.append(Res(f"consent:{sit}:{grantee}", "Consent", consent_id, sit, versions=2))
            else:
                w.add(f"consent:{sit}:{grantee}", "Consent", consent_id, sit)

    # break-glass: an active claim, and one that ran out an hour ago
    erin = Identity("erin", "erin")
    claims = {}
    for sit in ("glass", "glass_expired"):
        claims[sit] = _post(w, erin, "/api/break-glass", {"patient": f"Patient/{ids[f'patient:{sit}']}",
                                                          "reason": "unconscious in the emergency room"})["claim_id"]
    # the claim as if made two hours ago for one hour: in the table (which other processes, and
    # this one's claim follower, read) and in the index
    started = time.time() - 7200
    with node.engine.begin() as conn:
        conn.execute(update(break_glass_claims).where(break_glass_claims.c.claim_id == claims["glass_expired"])
                     .values(started=int(started * 1e6), expires=int((started + 3600) * 1e6)))
    node.consents.claim_break_glass(ids["erin"], ids["patient:glass_expired"], "unconscious in the emergency room",
                                    started, 3600, claim_id=claims["glass_expired"])

    for name in DELEGATE_SITUATIONS:
        _DELEGATE_BUILDERS[name](w)
    check_world(w)
    w.mark()
    return w


def _delegate_situation(w: World) -> None:
    """The "delegate" patient: the usual record, two RelatedPersons with accounts, both designated
    as delegates through the API and Ron removed again (each step settled on chain), and a deny of
    PSY data to Dana's RelatedPerson (the patient's, so her delegation cannot override it)."""
    sit = "delegate"
    _record(w, sit)
    pid = w.ids[f"patient:{sit}"]
    me = Identity("self", f"pat_{sit}")
    for username in DELEGATES:
        rp = _create(w, _related_person(pid, username))["id"]
        w.ids[username] = rp
        w.add(f"related_person:{sit}:{username}", "RelatedPerson", rp, sit)
        w.accounts[username] = w.node.accounts.create_user(username=username, password=PASSWORD, role="patient",
                                                           related_person=f"RelatedPerson/{rp}").id

    def designate(username: str, enabled: bool) -> None:
        row = _post(w, me, "/api/consent/delegates", {"relatedPerson": f"RelatedPerson/{w.ids[username]}",
                                                      "enabled": enabled}, expect=200)
        assert (row["status"], row["enabled"]) == ("pending", enabled), row

    for username in DELEGATES:
        designate(username, True)
    w.settle()
    for username, stays in DELEGATES.items():
        if not stays:
            designate(username, False)
    deny = {"resourceType": "Consent", "status": "active",
            "scope": {"coding": [{"system": CONSENT_SCOPE, "code": "patient-privacy"}]},
            "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
            "patient": {"reference": f"Patient/{pid}"},
            "provision": {"type": "deny", "actor": [_actor(f"RelatedPerson/{w.ids['dana']}")],
                          "securityLabel": [{"system": ACT_CODE, "code": "PSY"}]}}
    w.add(f"consent:{sit}:deny_psy", "Consent", _post(w, me, "/fhir/Consent", deny)["id"], sit)
    w.settle()


add_delegate_situation("delegate", _delegate_situation)


def _record(w: World, sit: str) -> None:
    ids = w.ids
    pid = _create(w, _patient(sit))["id"]
    ids[f"patient:{sit}"] = pid
    w.add(f"patient:{sit}", "Patient", pid, sit)
    username = "olga" if sit == OTHER else f"pat_{sit}"
    w.accounts[username] = w.node.accounts.create_user(username=username, password=PASSWORD, role="patient",
                                                       patient=f"Patient/{pid}").id
    me = Identity("self", username)
    attending = ATTENDING.get(sit, DEFAULT_ATTENDING)
    for a in attending:
        enc = _create(w, _encounter(pid, ids[a]))["id"]
        w.add(f"encounter:{sit}:{a}", "Encounter", enc, sit)
        doctor = Identity(a, a)
        note = {"subjective": f"note-{sit}-{a}", "objective": "Alert on video.", "assessment": "Well.",
                "plan": "Review in a month."}
        _post(w, doctor, f"/api/encounters/{enc}/note", note, expect=200)
        signed = _post(w, doctor, f"/api/encounters/{enc}/note/sign", None)
        comp, prov = signed["composition"], signed["provenance"]
        w.add(f"composition:{sit}:{a}", "Composition", comp["id"], sit)
        w.add(f"provenance:{sit}:{a}", "Provenance", prov["id"], sit)
        msg = _post(w, me, "/api/messages", {
            "subject": f"topic-{sit}-{a}", "text": f"message-{sit}-{a}", "practitioners": [ids[a]],
            "attachment": {"contentType": "application/pdf", "data": base64.b64encode(PDF).decode(),
                           "title": "results.pdf"}})
        w.add(f"communication:{sit}:{a}", "Communication", msg["id"], sit, participants=frozenset({a}),
              extra={"thread": msg["thread"]})
    first = attending[0]
    enc = w.res[f"encounter:{sit}:{first}"].id
    obs = _create(w, _observation(pid, enc, ids[first]))
    updated = {**obs, "valueQuantity": {**obs["valueQuantity"], "value": 75}}
    r = w.client.put(f"/fhir/Observation/{obs['id']}", json=updated, headers=w.headers(SERVICE))
    assert r.status_code == 200, r.text
    w.add(f"observation:{sit}", "Observation", obs["id"], sit, versions=2)
    w.add(f"observation_psy:{sit}", "Observation",
          _create(w, _observation(pid, enc, ids["psych"], value=12, psy=True))["id"], sit, labels=frozenset({"PSY"}))
    w.add(f"condition:{sit}", "Condition", _create(w, _condition(pid, enc))["id"], sit)
    w.add(f"condition_psy:{sit}", "Condition", _create(w, _condition(pid, enc, psy=True))["id"], sit,
          labels=frozenset({"PSY"}))
    w.add(f"medication_request:{sit}", "MedicationRequest",
          _create(w, _medication_request(pid, enc, ids[first]))["id"], sit)


def check_world(w: World) -> None:
    """The world is what the store says it is: each resource's compartment, labels and message
    participants are the ones recorded for it; its directory references are read from the index
    (what ``$everything`` follows)."""
    patient_of = {w.ids[f"patient:{s}"]: s for s in (*SITUATIONS, OTHER)}
    practitioner_key = {w.ids[k]: k for k in ("care", "house", "psych", "rita", "stranger", "erin")}
    _check_delegations(w)
    ref = t.idx_reference
    with w.node.engine.connect() as conn:
        loaded = w.node.records.store.load_current(conn, [(r.type, r.id) for r in w.res.values()])
        links: dict[tuple[str, str], dict[str, set[str]]] = {}
        for res_type, res_id, param, tt, ti in conn.execute(select(ref.c.res_type, ref.c.res_id, ref.c.param,
                                                                   ref.c.target_type, ref.c.target_id)):
            links.setdefault((res_type, res_id), {}).setdefault(param, set()).add(f"{tt}/{ti}")
    for r in w.res.values():
        stored = loaded[(r.type, r.id)]
        assert stored.body is not None and stored.version == r.versions, r.key
        sits = {patient_of[p] for p in compartment.patient_ids(stored.body)}
        assert sits == ({r.sit} if r.sit else set()), (r.key, sits)
        assert classify(stored.body) == r.labels, (r.key, classify(stored.body))
        if r.type == "Communication":
            named = {x["reference"] for x in [stored.body["sender"], *stored.body["recipient"]]}
            assert {practitioner_key[n.split("/")[1]] for n in named if n.startswith("Practitioner/")} \
                == set(r.participants), r.key
        mine = links.get((r.type, r.id), {})
        r.links = {param: frozenset(refs) for param, refs in mine.items()}
        r.directory_refs = frozenset(x for refs in mine.values() for x in refs if x.split("/")[0] in DIRECTORY)
    # the chain's state as the indexer projected it: four grants of each consenting patient (the
    # expired ones too: their period, not the chain, ends them), none left for "revoked"
    for sit in CONSENTING:
        granted = {ref for _, ref in w.node.consents.in_force(w.ids[f"patient:{sit}"])}
        assert len(granted) == (0 if sit == "revoked" else len(GRANTS)), (sit, granted)
    now = time.time()
    claims = {c.patient_id: c for c in w.node.consents.break_glass_claims(w.ids["erin"])}
    assert claims[w.ids["patient:glass"]].expires_at > now > claims[w.ids["patient:glass_expired"]].expires_at


def _check_delegations(w: World) -> None:
    """The delegations are what the chain, the delegations API and the consent state say: on chain
    each delegate was enabled once, and Ron removed after; each side of the API lists them with
    that status (a removed delegate no longer learns the patient's name); the consent state holds
    Dana's delegation (and the deny naming her) and nothing for Ron."""
    pid = w.ids["patient:delegate"]
    address = {w.node.keystore.address(f"user:{u}").lower(): u for u in DELEGATES}
    with w.node.engine.connect() as conn:
        set_events = [(address[str(e.args["delegate"]).lower()], bool(e.args["enabled"]))
                      for e in chain_events(conn, "DelegateSet")]
    for username, stays in DELEGATES.items():
        assert [on for u, on in set_events if u == username] == ([True] if stays else [True, False]), set_events

    def listed(username: str, side: str) -> list[tuple[str, str, str, str]]:
        r = w.client.get("/api/consent/delegates", headers=w.headers(Identity("x", username)))
        assert r.status_code == 200, r.text
        return sorted((d["patient"], d["relatedPerson"], d["status"], d["display"]) for d in r.json()[side])

    status = {True: "active", False: "removed"}
    assert listed("pat_delegate", "delegates") == sorted(
        (f"Patient/{pid}", f"RelatedPerson/{w.ids[u]}", status[stays], f"{u.capitalize()} Kin{u}")
        for u, stays in DELEGATES.items())
    for username, stays in DELEGATES.items():
        assert listed(username, "delegates") == []
        assert listed(username, "actingFor") == [(f"Patient/{pid}", f"RelatedPerson/{w.ids[username]}",
                                                   status[stays], "Pat Matrixdelegate" if stays else "")]
    in_force = w.node.consents.in_force(pid)
    dana = f"RelatedPerson/{w.ids['dana']}"
    [delegation] = [d for d, requested in _delegation_ids(w).items() if requested]
    assert set(in_force) == {(delegation, dana), (w.res["consent:delegate:deny_psy"].id, dana)}, in_force


def _delegation_ids(w: World) -> dict[str, bool]:
    """``Delegation/<id>`` of each delegation of the "delegate" patient → still requested."""
    with w.node.engine.connect() as conn:
        rows = conn.execute(select(consent_delegates.c.delegation_id, consent_delegates.c.requested)
                            .where(consent_delegates.c.patient_id == w.ids["patient:delegate"])).all()
    assert len(rows) == len(DELEGATES)
    return {delegation_ref(r.delegation_id): bool(r.requested) for r in rows}
