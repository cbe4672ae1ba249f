"""The authorization matrix through the real HTTP endpoints of a real node with the embedded chain
(issue 5, point 7), on SQLite and PostgreSQL: every role × every data endpoint × every patient
situation, each answer compared with the expected outcome, and zero leaks.

The world (``matrix_world``: one patient per situation, each with the same record; consents
really signed, sent, mined and indexed; break-glass claimed through the API) is built once per
backend. The expected outcome is ``TABLE`` below: for each role and situation, what of the
patient's record the role sees, a grid a reader checks cell by cell against the rules of
``teleledger.policy.decide``; ``sees`` reads a cell. From it:

* read, vread and instance history: 200 when the role sees the resource, else 403 (an
  OperationOutcome naming the rule, never the data);
* every search (plain, POST ``_search``, ``_summary=count``, ``_total``, ``_id``, paging by
  ``_count=1`` and the next links, ``_include``, ``_revinclude``): exactly the ids the role sees,
  with the matching ``total``, and 403 only where the role's SMART scopes forbid the type;
  chained parameters and ``_has`` are refused (400) for everyone alike;
* ``Patient/{id}/$everything``: the Patient, what the role sees of the compartment, and only the
  practitioners and organizations those visible resources name (no directory entry is reached
  through a hidden one);
* the type history, the pages of the portal and the console, the message attachments, the
  research export and the audit trail (``GET /fhir/AuditEvent``);
* every access, allowed or denied, left an access event naming exactly what was disclosed, and
  the transparency log grew with it.

Delegates (a patient-role account acting for someone else as a RelatedPerson, ``policy.delegates``):
the situation "delegate" (``matrix_world.DELEGATE_SITUATIONS``) is a patient who designated Dana
and Ron through the API and removed Ron again, all settled on chain, and who keeps PSY data from
Dana. The roles "delegate" (Dana) and "removed_delegate" (Ron) run through every test above
like any other role; they have no record of their own, so the pages of one's own record
(notes, access log) refuse them. On top: the delegate's consent pages and the delegations API
open the delegated patient to Dana alone, and Dana's ``POST /fhir/Consent`` is 201 for that
patient and 403 with nothing stored for every other (and always for Ron).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from teleledger.ledger.chain.storage import chain_outbox
from teleledger.policy.consent_tables import consent_grants
from teleledger.policy.delegate_tables import consent_delegates
from teleledger.policy.research import EXPORT_TYPES
from teleledger.storage import tables as t
from tests.conftest import BACKENDS, database_url, make_settings
from tests.integration.matrix_world import (
    OTHER,
    SITUATIONS,
    Call,
    Identity,
    Res,
    World,
    build_world,
    consent,
)

# ---- the expected outcome ------------------------------------------------------------------------

#: the role's account and the purpose of use it states (X-Purpose-Of-Use; None = TREAT)
ROLES: dict[str, tuple[str, str | None]] = {
    "self": ("pat_<situation>", None),  # the patient of the situation themself
    "other_patient": ("olga", None),  # a patient with a record of her own, nobody else's
    "care": ("care", None),  # practitioner who treats the treated and the exception patients
    "rita": ("rita", None),  # practitioner without care, consented to by the consenting patients
    "stranger": ("stranger", None),  # practitioner without care and without consent
    "erin_emergency": ("erin", "ETREAT"),  # break-glass: active on glass, expired on glass_expired
    "erin": ("erin", None),  # the same account for an ordinary purpose: her claims do not apply
    "pharmacist": ("pharmacist", None),  # member of the Corner Pharmacy, which consents name
    "other_pharmacist": ("other_pharmacist", None),  # member of another pharmacy
    "payer": ("payer", "HPAYMT"),  # member of the payer organization consents name, for payment
    "payer_treat": ("payer", "TREAT"),  # the same account asking for treatment: the consents do not apply
    "researcher": ("researcher", None),  # member of the study consents name (reached by export only)
    "admin": ("admin", None),
    "service": ("", None),  # a trusted backend with system/*.cruds
    "delegate": ("dana", None),  # the delegate patient's RelatedPerson Dana, whose delegation is in force
    "removed_delegate": ("ron", None),  # their RelatedPerson Ron, designated and then removed on chain
}
#: What each role sees of the record of the patient in each situation (``OTHER``: Olga's); a
#: situation a row does not name: nothing. A cell is "all", or the kinds of resource the role
#: reaches ("patient, encounter"), optionally followed by "but" and the kinds it does not. A kind
#: names one row of every record:
#:   patient · encounter:<attending> · composition:<attending> · provenance:<attending> ·
#:   communication:<attending> (the patient's thread with that practitioner) · observation ·
#:   observation_psy · condition · condition_psy · medication_request · consent:<grantee>
#: and of the delegate patient's only: related_person:<dana|ron> and consent:deny_psy
#: where a name also covers its variants ("encounter" is encounter:care and encounter:house,
#: "observation" includes observation_psy) and "psy" is the two PSY-labelled rows.
#: Attending: Dr Care for "treated" (with Dr House) and "exception"; Dr House everywhere else.
#: A patient sees their own record, all of it; "other_patient" is a patient looking at anyone else's.
COLUMNS = (*SITUATIONS, OTHER)
TABLE: dict[str, dict[str, str]] = {
    "other_patient": {},
    # the care relationship covers the whole record, but not a thread with another practitioner
    "care": {"treated": "all but communication:house", "exception": "all"},
    # the consent names her for everything; its exception keeps PSY data out
    "rita": {"consented": "all", "exception": "all but psy"},
    "stranger": {},
    # break-glass reaches the record over any consent, never a thread she is not part of
    "erin_emergency": {"glass": "all but communication"},
    # the same account without an emergency purpose: her claims do not apply
    "erin": {},
    # the pharmacy's consent: prescriptions only
    "pharmacist": {"consented": "medication_request", "exception": "medication_request"},
    "other_pharmacist": {},
    # the payer's consent, for payment (HPAYMT): the Patient and the Encounters
    "payer": {"consented": "patient, encounter", "exception": "patient, encounter"},
    # ... and nothing when it asks for treatment
    "payer_treat": {},
    # a consent to the study gives its researcher nothing outside an export (EXPORT below)
    "researcher": {},
    "admin": {},
    "service": {sit: "all" for sit in COLUMNS},
    # a delegation is everything, for any purpose, of the patient who designated her (messages and
    # the RelatedPersons included), under that patient's own denies: here the one of PSY data to her
    "delegate": {"delegate": "all but psy"},
    # a delegation removed on chain leaves nothing
    "removed_delegate": {},
}
#: what the study's research export carries (its consent: Patient, Observation, Condition, HRESCH)
EXPORT: dict[str, str] = {"consented": "patient, observation, condition",
                          "exception": "patient, observation, condition but psy"}
_ALIASES = {"psy": ("observation_psy", "condition_psy")}


def cell_covers(cell: str, kind: str) -> bool:
    """The small oracle: does a cell of ``TABLE`` cover a resource of this kind?"""
    reach, _, exclude = cell.partition(" but ")

    def named(names: str) -> bool:
        for name in (n.strip() for n in names.split(",")):
            for n in _ALIASES.get(name, (name,)):
                if kind == n or kind.startswith((n + ":", n + "_")):
                    return True
        return False

    return (reach == "all" or named(reach)) and not (exclude and named(exclude))


def sees(role: str, own: str | None, sit: str, kind: str) -> bool:
    """Does ``role`` (for a patient role: the patient whose own record is situation ``own``) see a
    resource ``kind`` of the record of situation ``sit``?"""
    if own is not None and sit == own:
        return True
    cell = TABLE["other_patient" if own is not None else role].get(sit)
    return cell is not None and cell_covers(cell, kind)


def study_sees(sit: str, kind: str) -> bool:
    cell = EXPORT.get(sit)
    return cell is not None and cell_covers(cell, kind)


def test_the_expected_outcome_table_names_every_role_and_only_known_situations_and_kinds():
    """Adding a role (the delegate) means saying what it sees; a typo in a cell is not silently 'none'."""
    assert set(TABLE) == set(ROLES) - {"self"}
    kinds = r"(patient|encounter|composition|provenance|communication|observation|observation_psy|condition" \
            r"|condition_psy|medication_request|consent|related_person)(:[a-z_]+)?"
    for role, row in [*TABLE.items(), ("export", EXPORT)]:
        assert set(row) <= set(COLUMNS), role
        for cell in row.values():
            reach, _, exclude = cell.partition(" but ")
            names = [n.strip() for part in (reach, exclude) if part not in ("", "all") for n in part.split(",")]
            assert names or reach == "all", cell
            assert all(n in _ALIASES or re.fullmatch(kinds, n) for n in names), cell
    assert cell_covers("all but psy", "observation") and not cell_covers("all but psy", "condition_psy")
    assert cell_covers("patient, encounter", "encounter:house")
    assert not cell_covers("patient, encounter", "consent:rita")
    assert cell_covers("patient, observation", "observation_psy") and not cell_covers("patient", "observation")


ALL_TYPES = None
#: the types each role's SMART scopes let it read and search (identity.scopes.ROLE_SCOPES)
SCOPE_TYPES: dict[str, frozenset[str] | None] = {
    "patient": ALL_TYPES, "practitioner": ALL_TYPES, "service": ALL_TYPES,
    "pharmacist": frozenset({"MedicationRequest", "MedicationDispense", "Medication", "Patient", "Practitioner",
                             "Organization"}),
    "payer": frozenset({"Claim", "ExplanationOfBenefit", "Coverage", "Patient", "Encounter", "Practitioner",
                        "Organization"}),
    "researcher": frozenset({"ResearchStudy", "ResearchSubject"}),
    "admin": frozenset({"Practitioner", "PractitionerRole", "Organization", "Location", "HealthcareService",
                        "Endpoint", "Schedule", "Slot", "AuditEvent"}),
}
ACCOUNT_ROLE = {"self": "patient", "other_patient": "patient", "care": "practitioner", "rita": "practitioner",
                "stranger": "practitioner", "erin_emergency": "practitioner", "erin": "practitioner",
                "pharmacist": "pharmacist", "other_pharmacist": "pharmacist", "payer": "payer",
                "payer_treat": "payer", "researcher": "researcher", "admin": "admin", "service": "service",
                "delegate": "patient", "removed_delegate": "patient"}
#: who a role is on the portal's pages, where nobody states a purpose: never an emergency (a payer's
#: pages show no clinical type its scopes allow, whatever its default purpose)
PAGE_ROLE = {"erin_emergency": "erin"}
#: the clinical types every case searches
TYPES = ("Patient", "Encounter", "Observation", "Condition", "MedicationRequest", "Composition", "Provenance",
         "Communication", "Consent", "RelatedPerson")
#: the types also counted with _summary=count: one per way a row is hidden (care team, label,
#: thread, consent class)
COUNTED = ("Patient", "Observation", "Condition", "Communication", "MedicationRequest")


def may_use(role: str, rtype: str) -> bool:
    types = SCOPE_TYPES[ACCOUNT_ROLE[role]]
    return types is None or rtype in types


def kind(res: Res) -> str:
    """``observation_psy:glass`` → ``observation_psy``; ``encounter:treated:care`` → ``encounter:care``."""
    head, _, rest = res.key.partition(":")
    return ":".join([head, *rest.split(":")[1:]])


def visible(role: str, own: str | None, res: Res) -> bool:
    if res.sit is None:  # the directory: whoever's scopes allow the type
        return may_use(role, res.type)
    return may_use(role, res.type) and sees(role, own, res.sit, kind(res))


# ---- the world, once per backend -----------------------------------------------------------------


@pytest.fixture(scope="module", params=BACKENDS)
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    from fastapi.testclient import TestClient

    from teleledger.bootstrap import build
    from teleledger.web.app import create_app

    tmp: Path = tmp_path_factory.mktemp(f"matrix-{request.param}")
    node = build(make_settings(tmp, database_url(request.param, tmp), chain_enabled=True, chain_poll_interval=0.05))
    try:
        with TestClient(create_app(node), raise_server_exceptions=False) as client:
            yield build_world(client, node)
    finally:
        node.close()


def identity(role: str, sit: str | None) -> tuple[Identity, str | None]:
    """The request identity of a role, and the situation whose record is its own (patients)."""
    username, purpose = ROLES[role]
    if role == "self":
        assert sit is not None
        return Identity(role, f"pat_{sit}", purpose), sit
    return Identity(role, username, purpose), OTHER if role == "other_patient" else None


MATRIX = [pytest.param(role, sit, id=f"{role}-{sit}") for role in ROLES for sit in SITUATIONS]
#: one identity each, for what is not about one patient (type searches, pages): every patient's own
WHO = [pytest.param("self", sit, id=f"self-{sit}") for sit in SITUATIONS] + [
    pytest.param(role, None, id=role) for role in ROLES if role != "self"]


# ---- checks --------------------------------------------------------------------------------------

MARKERS = re.compile(r"Matrix[a-z]+|note-[a-z_]+-[a-z]+|message-[a-z_]+-[a-z]+|topic-[a-z_]+-[a-z]+|Kin[a-z]+")


def versioned(resource: dict) -> str:
    return f"{resource['resourceType']}/{resource['id']}/_history/{resource['meta']['versionId']}"


def assert_traced(w: World, who: Identity, c: Call, disclosed: list[dict], *, about: Res | None = None) -> None:
    """The request left access events, all of them this caller's: for a refusal a denied one
    that names no resource (and names the patient of ``about``, the resource refused, so that
    the patient sees the attempt); for an answer exactly the patient data it disclosed, under the
    patients it belongs to (an answer made only of directory entries discloses no patient's data
    and is not an access event)."""
    patient_data = [r for r in disclosed if _patient_of(w, r) is not None]
    if c.status == 200 and disclosed and not patient_data:
        assert not c.events
        return
    assert c.events, f"no access event for a {c.status} answer"
    assert {e.actor for e in c.events} == {w.actor(who)}
    recorded = {ref for e in c.events for ref in e.refs.split()}
    if c.status == 403:
        assert any(e.outcome == "denied" for e in c.events) and not recorded
        if about is not None:
            assert {e.patient_id for e in c.events} == {w.ids[f"patient:{about.sit}"]}
        return
    assert c.status == 200 and {e.outcome for e in c.events} == {"allowed"}
    assert recorded == {versioned(r) for r in patient_data}
    assert {e.patient_id for e in c.events} == ({_patient_of(w, r) for r in patient_data} or {None})


def _patient_of(w: World, resource: dict) -> str | None:
    """The patient whose compartment holds a world resource; None for a directory entry."""
    ref = f"{resource['resourceType']}/{resource['id']}"
    res = w.by_ref.get(ref) or next(r for r in w.deleted if r.ref == ref)
    return None if res.sit is None else w.ids[f"patient:{res.sit}"]


def assert_refused(c: Call) -> None:
    assert c.status == 403, c.text
    assert c.body["resourceType"] == "OperationOutcome" and c.body["issue"][0]["code"] == "forbidden"
    assert not MARKERS.search(c.text), c.text  # the refusal names a rule, never the data


def entries(bundle: dict, mode: str = "match") -> list[dict]:
    return [e["resource"] for e in bundle.get("entry", []) if e.get("search", {}).get("mode") == mode]


def refs(resources: list[dict]) -> list[str]:
    return sorted(f"{r['resourceType']}/{r['id']}" for r in resources)


def expected_refs(res: list[Res]) -> list[str]:
    return sorted(r.ref for r in res)


def search(w: World, who: Identity, query: str, **kw: object) -> Call:
    return w.call(who, "GET", f"/fhir/{query}", **kw)


# ---- read, vread, history ------------------------------------------------------------------------


@pytest.mark.parametrize("role, sit", MATRIX)
def test_a_read_vread_and_history_answer_exactly_what_the_table_allows(world, role, sit):
    w = world
    who, own = identity(role, sit)
    for res in w.of(sit):
        allowed = visible(role, own, res)
        c = w.call(who, "GET", f"/fhir/{res.type}/{res.id}")
        if allowed:
            assert c.status == 200 and c.body["id"] == res.id, (res.key, c.text)
        else:
            assert_refused(c)
        assert_traced(w, who, c, [c.body] if allowed else [], about=res)
        if res.type not in ("Observation", "Communication"):
            continue  # versions and history: a care-team row, a labelled row and a message suffice
        for version in range(1, res.versions + 1):
            c = w.call(who, "GET", f"/fhir/{res.type}/{res.id}/_history/{version}")
            if allowed:
                assert c.status == 200 and c.body["meta"]["versionId"] == str(version), (res.key, c.text)
            else:
                assert_refused(c)
            assert_traced(w, who, c, [c.body] if allowed else [], about=res)
        c = w.call(who, "GET", f"/fhir/{res.type}/{res.id}/_history")
        if allowed:
            assert c.status == 200 and c.body["total"] == res.versions, (res.key, c.text)
            assert sorted(e["resource"]["meta"]["versionId"] for e in c.body["entry"]) == [
                str(v) for v in range(1, res.versions + 1)]
        else:
            assert_refused(c)
        assert_traced(w, who, c, [e["resource"] for e in c.body.get("entry", [])] if allowed else [], about=res)
        if res.type != "Observation" or res.labels:
            continue
        # how many versions a resource has is for its readers to learn
        c = w.call(who, "GET", f"/fhir/{res.type}/{res.id}/_history/99")
        if allowed:
            assert c.status == 404 and not c.events, c.text
        else:
            assert_refused(c)
            assert_traced(w, who, c, [], about=res)
    # that a resource was deleted, too (the withdrawn consents of "revoked")
    for res in [r for r in w.deleted if r.sit == sit]:
        allowed = visible(role, own, res)
        for path, gone in ((f"{res.id}", 410), (f"{res.id}/_history/2", 410), (f"{res.id}/_history/1", 200)):
            c = w.call(who, "GET", f"/fhir/{res.type}/{path}")
            if not allowed:
                assert_refused(c)
                assert_traced(w, who, c, [], about=res)
            elif gone == 410:
                assert c.status == 410 and not c.events, (path, c.text)
            else:
                assert c.status == 200, c.text
                assert_traced(w, who, c, [c.body])
    # an id nobody ever used is simply unknown, to everyone
    c = w.call(who, "GET", "/fhir/Observation/never-created-0")
    assert c.status == 404 and c.body["resourceType"] == "OperationOutcome" and not c.events


# ---- searches ------------------------------------------------------------------------------------


def patient_query(w: World, rtype: str, sit: str) -> str:
    pid = w.ids[f"patient:{sit}"]
    return f"_id={pid}" if rtype == "Patient" else f"patient={pid}"


@pytest.mark.parametrize("role, sit", MATRIX)
def test_searches_return_count_and_page_only_what_the_table_allows(world, role, sit):
    w = world
    who, own = identity(role, sit)
    for rtype in TYPES:
        query = f"{rtype}?{patient_query(w, rtype, sit)}"
        want = expected_refs([r for r in w.of(sit, rtype) if visible(role, own, r)])
        c = search(w, who, query)
        if not may_use(role, rtype):
            assert_refused(c)
            assert_traced(w, who, c, [])
            continue
        assert c.status == 200, (query, c.text)
        assert (c.body["total"], refs(entries(c.body))) == (len(want), want), query
        assert not entries(c.body, "include")
        assert_traced(w, who, c, entries(c.body))
        if rtype not in COUNTED:
            continue
        counted = search(w, who, f"{query}&_summary=count")
        assert counted.status == 200 and counted.body["total"] == len(want) and "entry" not in counted.body, query
        assert_traced(w, who, counted, [])

    if not may_use(role, "Observation"):
        return
    observations = w.of(sit, "Observation")
    want = expected_refs([r for r in observations if visible(role, own, r)])
    pid = w.ids[f"patient:{sit}"]
    # by id: asking for a hidden resource by name finds nothing
    c = search(w, who, f"Observation?_id={','.join(r.id for r in observations)}&_total=accurate")
    assert (c.body["total"], refs(entries(c.body))) == (len(want), want)
    assert_traced(w, who, c, entries(c.body))
    c = search(w, who, f"Observation?patient={pid}&_total=none")
    assert "total" not in c.body and refs(entries(c.body)) == want
    assert_traced(w, who, c, entries(c.body))
    # POST _search answers as GET does
    c = w.call(who, "POST", "/fhir/Observation/_search", data={"patient": pid})
    assert c.status == 200 and (c.body["total"], refs(entries(c.body))) == (len(want), want)
    assert_traced(w, who, c, entries(c.body))
    # one row a page, following the next links: every visible row once, nothing else
    seen: list[str] = []
    path = f"/fhir/Observation?patient={pid}&_count=1"
    while path:
        c = w.call(who, "GET", path)
        assert c.status == 200 and c.body["total"] == len(want), path
        assert_traced(w, who, c, entries(c.body))
        seen += refs(entries(c.body))
        nxt = [link["url"] for link in c.body["link"] if link["relation"] == "next"]
        path = nxt[0] if nxt else ""  # an absolute URL on the node's public base
        assert len(seen) <= len(want), "the next links go past the visible rows"
    assert sorted(seen) == want
    last = next(link["url"] for link in c.body["link"] if link["relation"] == "last")
    assert f"_offset={max(len(want) - 1, 0)}" in last


def _include_targets(w: World, matched: list[Res], params: list[tuple[str, str]]) -> set[str]:
    return {target for m in matched for source, param in params if m.type == source
            for target in m.links.get(param, ())}


def _revinclude_sources(w: World, matched: list[Res], params: list[tuple[str, str]]) -> set[str]:
    wanted = {m.ref for m in matched}
    return {r.ref for r in w.res.values() for source, param in params
            if r.type == source and wanted & r.links.get(param, frozenset())}


INCLUDES = [
    # (searched type, _include / _revinclude parameters)
    ("Observation", "_include", [("Observation", "subject"), ("Observation", "encounter"),
                                 ("Observation", "performer")]),
    ("MedicationRequest", "_include", [("MedicationRequest", "subject"), ("MedicationRequest", "encounter"),
                                       ("MedicationRequest", "requester")]),
    ("Patient", "_revinclude", [("Observation", "subject"), ("Condition", "subject"), ("Communication", "subject"),
                                ("MedicationRequest", "subject"), ("Consent", "patient"),
                                ("RelatedPerson", "patient")]),
    ("Encounter", "_revinclude", [("Composition", "encounter"), ("Observation", "encounter"),
                                  ("Condition", "encounter")]),
]


@pytest.mark.parametrize("role, sit", MATRIX)
def test_include_and_revinclude_add_only_resources_the_table_allows(world, role, sit):
    w = world
    who, own = identity(role, sit)
    for rtype, how, params in INCLUDES:
        query = f"{rtype}?{patient_query(w, rtype, sit)}&" + "&".join(f"{how}={s}:{p}" for s, p in params)
        c = search(w, who, query)
        if not may_use(role, rtype):
            assert_refused(c)
            assert_traced(w, who, c, [])
            continue
        matched = [r for r in w.of(sit, rtype) if visible(role, own, r)]
        reached = (_include_targets(w, matched, params) if how == "_include"
                   else _revinclude_sources(w, matched, params)) - {m.ref for m in matched}
        want = sorted(ref for ref in reached if visible(role, own, w.by_ref[ref]))
        assert c.status == 200, (query, c.text)
        assert refs(entries(c.body)) == expected_refs(matched), query
        assert refs(entries(c.body, "include")) == want, query
        assert c.body["total"] == len(matched)  # includes are never counted
        assert_traced(w, who, c, entries(c.body) + entries(c.body, "include"))


@pytest.mark.parametrize("role, sit", WHO)
def test_chained_parameters_and_has_are_refused_alike_for_everyone(world, role, sit):
    w = world
    who, _ = identity(role, sit)
    for query in ("Observation?subject:Patient.name=Matrixtreated", "Observation?patient.name=Matrixglass",
                  f"Patient?_has:Observation:patient:code=8867-4&_id={w.ids['patient:exception']}"):
        c = search(w, who, query)
        assert c.status == 400 and c.body["resourceType"] == "OperationOutcome", (query, c.text)
        assert c.body["issue"][0]["code"] == "invalid"
        assert not c.events  # nothing was searched, nothing disclosed


@pytest.mark.parametrize("role, sit", MATRIX)
def test_reads_and_searches_inside_a_batch_or_a_transaction_answer_as_they_do_alone(world, role, sit):
    w = world
    who, own = identity(role, sit)
    record = w.of(sit)
    pid = w.ids[f"patient:{sit}"]
    batch = {"resourceType": "Bundle", "type": "batch",
             "entry": [{"request": {"method": "GET", "url": r.ref}} for r in record]
             + [{"request": {"method": "GET", "url": f"Observation?patient={pid}"}}]}
    c = w.call(who, "POST", "/fhir", json=batch)
    assert c.status == 200 and c.body["type"] == "batch-response", c.text
    answers = c.body["entry"]
    disclosed = []
    for res, answer in zip(record, answers):
        if visible(role, own, res):
            assert answer["response"]["status"] == "200 OK" and answer["resource"]["id"] == res.id, res.key
            disclosed.append(answer["resource"])
        else:
            assert answer["response"]["status"] == "403" and "resource" not in answer, res.key
            assert not MARKERS.search(str(answer)), res.key
    found = answers[-1]
    if may_use(role, "Observation"):
        want = expected_refs([r for r in w.of(sit, "Observation") if visible(role, own, r)])
        assert (found["resource"]["total"], refs(entries(found["resource"]))) == (len(want), want)
        disclosed += entries(found["resource"])
    else:
        assert found["response"]["status"] == "403" and "resource" not in found
    recorded = {ref for e in c.events if e.outcome == "allowed" for ref in e.refs.split()}
    assert recorded == {versioned(r) for r in disclosed}
    denied = sum(1 for res in record if not visible(role, own, res)) + (not may_use(role, "Observation"))
    assert sum(1 for e in c.events if e.outcome == "denied") == denied
    # a transaction that reads one resource the caller may not see fails as a whole
    hidden = [r for r in record if not visible(role, own, r)]
    shown = [r for r in record if visible(role, own, r)]
    tx = {"resourceType": "Bundle", "type": "transaction",
          "entry": [{"request": {"method": "GET", "url": r.ref}} for r in (shown[:1] + hidden[:1])]}
    c = w.call(who, "POST", "/fhir", json=tx)
    if hidden:
        assert_refused(c)
        assert_traced(w, who, c, [])
    else:
        assert c.status == 200 and [e["resource"]["id"] for e in c.body["entry"]] == [shown[0].id]
        assert_traced(w, who, c, [e["resource"] for e in c.body["entry"]])


@pytest.mark.parametrize("role, sit", MATRIX)
def test_everything_carries_only_what_the_table_allows_and_the_directory_entries_it_names(world, role, sit):
    w = world
    who, own = identity(role, sit)
    patient = w.res[f"patient:{sit}"]
    c = w.call(who, "GET", f"/fhir/Patient/{patient.id}/$everything")
    if not visible(role, own, patient):
        assert_refused(c)
        assert_traced(w, who, c, [])
        return
    shown = [r for r in w.of(sit) if visible(role, own, r)]
    named = {ref for r in shown for ref in r.directory_refs}
    directory = [w.by_ref[ref] for ref in named if visible(role, own, w.by_ref[ref])]
    assert c.status == 200, c.text
    assert refs(entries(c.body)) == expected_refs(shown + directory)
    assert c.body["total"] == len(shown) + len(directory)
    assert_traced(w, who, c, entries(c.body))


# ---- across every patient: type searches and type history --------------------------------------


@pytest.mark.parametrize("role, sit", WHO)
def test_type_searches_and_type_history_across_every_patient_show_only_what_the_table_allows(world, role, sit):
    w = world
    who, own = identity(role, sit)
    for rtype in TYPES:
        c = search(w, who, f"{rtype}?_count=1000")
        if not may_use(role, rtype):
            assert_refused(c)
            assert_traced(w, who, c, [])
            continue
        want = expected_refs([r for r in w.of(rtype=rtype) if visible(role, own, r)])
        assert (c.body["total"], refs(entries(c.body))) == (len(want), want), rtype
        assert_traced(w, who, c, entries(c.body))
    for rtype in ("Observation", "Communication"):
        c = search(w, who, f"{rtype}/_history?_count=1000")
        if not may_use(role, rtype):
            assert_refused(c)
            assert_traced(w, who, c, [])
            continue
        shown = [r for r in w.of(rtype=rtype) if visible(role, own, r)]
        versions = sorted(f"{r.ref}/_history/{v}" for r in shown for v in range(1, r.versions + 1))
        got = sorted(f"{e['resource']['resourceType']}/{e['resource']['id']}/_history/"
                     f"{e['resource']['meta']['versionId']}" for e in c.body.get("entry", []))
        assert c.body["total"] == len(versions) and got == versions, rtype
        assert_traced(w, who, c, [e["resource"] for e in c.body.get("entry", [])])
    # searches matched after decryption (a patient's name, birth date): filtered and counted alike
    if may_use(role, "Patient"):
        want = expected_refs([r for r in w.of(rtype="Patient") if visible(role, own, r)])
        for query in ("Patient?name:contains=atrix&_count=1000", "Patient?birthdate=1980-02-29&_count=1000",
                      "Patient?name:contains=atrix&_summary=count"):
            c = search(w, who, query)
            assert c.status == 200 and c.body["total"] == len(want), (query, c.text)
            if "_summary" not in query:
                assert refs(entries(c.body)) == want, query
            assert_traced(w, who, c, entries(c.body))
    # a practitioner named only by PSY observations: revincluding them reaches only visible ones
    if may_use(role, "Practitioner"):
        c = search(w, who, f"Practitioner?_id={w.ids['psych']}&_revinclude=Observation:performer")
        want = expected_refs([r for r in w.of(rtype="Observation") if "PSY" in r.labels and visible(role, own, r)])
        assert refs(entries(c.body)) == [f"Practitioner/{w.ids['psych']}"]
        assert refs(entries(c.body, "include")) == want
        assert_traced(w, who, c, entries(c.body) + entries(c.body, "include"))


# ---- the audit trail ---------------------------------------------------------------------------------

AUDIT_READERS = {"patient": "own record", "practitioner": "own actions", "admin": "all", "service": "all"}


@pytest.mark.parametrize("role, sit", MATRIX)
def test_the_audit_trail_of_a_patient_shows_each_role_only_what_it_may_review(world, role, sit):
    w = world
    who, own = identity(role, sit)
    pid = w.ids[f"patient:{sit}"]
    c = search(w, who, f"AuditEvent?patient={pid}&_count=100")
    # a delegate without a record of their own reviews nobody's: not even the patient they act for
    kind_of_reader = AUDIT_READERS.get(ACCOUNT_ROLE[role]) if own_record(role, own) else None
    # one event about the patient by someone else (the service that built the record), read by id
    # and explained: the same rule as the search
    a = t.access_events
    with w.node.engine.connect() as conn:
        theirs = conn.execute(select(func.min(a.c.id)).where(a.c.patient_id == pid,
                                                             a.c.actor != w.actor(who))).scalar_one()
    may_review = kind_of_reader == "all" or (kind_of_reader == "own record" and own == sit)
    for path in (f"/fhir/AuditEvent/{theirs}", f"/api/consent/explain/{theirs}"):
        r = w.call(who, "GET", path)
        assert r.status == (200 if may_review else 403), (path, r.text)
        assert not r.events  # reading the audit trail is not itself an access to the record
    if kind_of_reader is None:  # pharmacists, payers, researchers (no AuditEvent scope), delegates
        assert c.status == 403 and c.body["resourceType"] == "OperationOutcome", c.text
        return
    where = [a.c.patient_id == pid]
    if kind_of_reader == "own record":
        where.append(a.c.patient_id == w.ids[f"patient:{own}"])
    elif kind_of_reader == "own actions":
        where.append(a.c.actor == w.actor(who))
    with w.node.engine.connect() as conn:
        total = conn.execute(select(func.count()).select_from(a).where(*where)).scalar_one()
        newest = conn.execute(select(a.c.id).where(*where).order_by(a.c.recorded.desc(), a.c.id.desc())
                              .limit(100)).scalars().all()
    assert c.status == 200 and c.body["total"] == total, c.text
    assert [e["resource"]["id"] for e in c.body.get("entry", [])] == [str(i) for i in newest]
    assert all({"reference": f"Patient/{pid}"} == ent["what"] for e in c.body.get("entry", [])
               for ent in e["resource"]["entity"] if ent["type"]["code"] == "1")


# ---- pages of the portal and the console -------------------------------------------------------------


def page_role(role: str) -> str:
    return PAGE_ROLE.get(role, role)


def own_record(role: str, own: str | None) -> bool:
    """Every account but a patient-role one without a Patient of its own (a delegate): the pages
    of one's own record (notes, access log, messages) are for those with one."""
    return ACCOUNT_ROLE[role] != "patient" or own is not None


def messages_area(role: str) -> str:
    return "/portal/messages" if ACCOUNT_ROLE[role] == "patient" else "/console/messages"


def thread_reader(role: str, own: str | None, res: Res) -> bool:
    """Takes part in the thread (the patient, the practitioner written to) and may read it."""
    practitioner = ROLES[role][0] if ACCOUNT_ROLE[role] == "practitioner" else None
    in_thread = (res.sit == own) if ACCOUNT_ROLE[role] == "patient" else practitioner in res.participants
    return in_thread and visible(page_role(role), own, res)


@pytest.mark.parametrize("role, sit", [p for p in MATRIX if p.values[0] != "service"])
def test_note_thread_and_attachment_pages_show_a_patients_data_only_to_whom_the_table_allows(world, role, sit):
    w = world
    who, own = identity(role, sit)
    for comp in w.of(sit, "Composition"):
        c = w.page(who.username, f"/portal/notes/{comp.id}")
        if visible(page_role(role), own, comp):
            assert c.status == 200, c.text
            assert f"note-{sit}-{kind(comp).split(':')[1]}" in c.text
            assert c.events and {e.outcome for e in c.events} == {"allowed"}
        else:
            assert c.status == 403 and not MARKERS.search(c.text), c.text
            assert any(e.outcome == "denied" for e in c.events)
    for comm in w.of(sit, "Communication"):
        c = w.page(who.username, f"{messages_area(role)}/{comm.extra['thread']}")
        if ACCOUNT_ROLE[role] not in ("patient", "practitioner"):
            assert c.status == 403 and "Secure messages are for patients and practitioners" in c.text
        elif not own_record(role, own):  # a delegate: refused as an account, whatever the thread
            assert c.status == 403 and "linked to a record" in c.text and not MARKERS.search(c.text), c.text
            assert not c.events
        elif thread_reader(role, own, comm):
            assert c.status == 200 and f"message-{sit}-" in c.text, c.text
            assert c.events and {e.outcome for e in c.events} == {"allowed"}
        else:
            assert c.status == 404 and not MARKERS.search(c.text), c.text  # not theirs to learn it exists
        c = w.page(who.username, f"/portal/messages/attachments/{comm.id}")
        if thread_reader(role, own, comm):
            assert c.status == 200 and c.content.startswith(b"%PDF"), c.text
            assert {e.outcome for e in c.events} == {"allowed"}
        else:
            assert c.status == 403 and not MARKERS.search(c.text), c.text
            assert any(e.outcome == "denied" for e in c.events), "a refused attachment left no trace"


@pytest.mark.parametrize("role, sit", [p for p in WHO if p.values[0] != "service"])
def test_the_portal_notes_and_message_lists_show_each_person_only_their_own(world, role, sit):
    w = world
    who, own = identity(role, sit)
    patient = ACCOUNT_ROLE[role] == "patient" and own_record(role, own)  # a delegate has no record
    c = w.page(who.username, "/portal")
    assert c.status == 200 and not MARKERS.search(c.text)

    c = w.page(who.username, "/portal/notes")
    if patient:
        assert c.status == 200
        listed = set(re.findall(r'data-composition="([^"]+)"', c.text))
        assert listed == {r.id for r in w.of(own, "Composition")}
        assert set(re.findall(r"note-[a-z_]+-[a-z]+", c.text)) == {
            f"note-{own}-{kind(r).split(':')[1]}" for r in w.of(own, "Composition")}
    else:
        assert c.status == 403 and not MARKERS.search(c.text)

    c = w.page(who.username, messages_area(role))
    if ACCOUNT_ROLE[role] not in ("patient", "practitioner") or not own_record(role, own):
        assert c.status == 403 and not MARKERS.search(c.text)
    else:
        assert c.status == 200, c.text
        topics = set(re.findall(r"topic-[a-z_]+-[a-z]+", c.text))
        assert topics == {f"topic-{r.sit}-{kind(r).split(':')[1]}" for r in w.of(rtype="Communication")
                          if thread_reader(role, own, r)}
        # names on the page (threads, contacts) only of patients whose record the person sees
        for name in set(re.findall(r"Matrix[a-z]+", c.text)):
            shown = next(r for r in w.of(rtype="Patient") if f"Matrix{r.sit.replace('_', '')}" == name)
            assert visible(page_role(role), own, shown), name

    c = w.page(who.username, "/portal/access-log")
    assert c.status == (200 if patient else 403)


# ---- the research export ---------------------------------------------------------------------------


@pytest.mark.parametrize("role, sit", WHO)
def test_the_research_export_carries_the_consenting_patients_and_only_to_the_studys_researcher(world, role, sit):
    w = world
    who, _ = identity(role, sit)
    c = w.call(who, "GET", f"/api/research/{w.ids['study']}/export")
    if role != "researcher":
        assert c.status == 403 and c.body["resourceType"] == "OperationOutcome", c.text
        return
    assert c.status == 200, c.text
    lines = [line for line in c.text.splitlines() if line]
    by_type: dict[str, int] = {}
    for line in lines:
        rtype = re.match(r'.*"resourceType":"([A-Za-z]+)"', line).group(1)  # type: ignore[union-attr]
        by_type[rtype] = by_type.get(rtype, 0) + 1
    want: dict[str, int] = {}
    for r in w.res.values():
        if r.sit is not None and r.type in EXPORT_TYPES and study_sees(r.sit, kind(r)):
            want[r.type] = want.get(r.type, 0) + 1
    assert by_type == want
    assert not MARKERS.search(c.text)  # de-identified: no name, no note or message text
    exported = {e.patient_id for e in c.events if e.action == "export"}
    assert exported == {w.ids[f"patient:{s}"] for s in EXPORT}
    assert {e.outcome for e in c.events} == {"allowed"}


# ---- the log grows with every access ---------------------------------------------------------------


def test_every_access_event_of_the_matrix_is_in_the_transparency_log(world):
    """The access events the matrix wrote are log entries too (sequenced or queued)."""
    w = world
    with w.node.engine.connect() as conn:
        events = conn.execute(select(func.count()).select_from(t.access_events)).scalar_one()
    assert w.log_entries() >= events > 0
    before = w.log_entries()
    who, _ = identity("stranger", None)
    c = w.call(who, "GET", f"/fhir/Observation/{w.res['observation:treated'].id}")
    assert c.status == 403 and len(c.events) == 1
    assert w.log_entries() == before + 1


# ---- delegates: their consent pages and the delegations API ------------------------------------------

#: whom each role acts for (the situation of the patient), and how that delegation stands
ACTS_FOR: dict[str, tuple[str, str]] = {"delegate": ("delegate", "active"), "removed_delegate": ("delegate", "removed")}


@pytest.mark.parametrize("role, sit", [p for p in WHO if p.values[0] != "service"])
def test_a_delegates_consent_pages_and_the_delegations_api_open_only_the_patient_they_act_for(world, role, sit):
    w = world
    who, own = identity(role, sit)
    acting = ACTS_FOR.get(role)
    active = acting[0] if acting and acting[1] == "active" else None
    # a patient's consent page as their delegate: only Dana's, of the patient she acts for
    for s in (*SITUATIONS, OTHER):
        pid = w.ids[f"patient:{s}"]
        c = w.page(who.username, f"/portal/consents/for/{pid}")
        if s == active:
            assert c.status == 200 and "Who can see Pat Matrixdelegate's record" in c.text, c.text
            assert set(re.findall(r"Matrix[a-z]+", c.text)) == {"Matrixdelegate"}
            assert c.events and {(e.outcome, e.patient_id) for e in c.events} == {("allowed", pid)}
        else:
            assert c.status == 403 and not MARKERS.search(c.text), (s, c.text)
    # the consent home: a delegate without a record lands on the patients they act for (the active ones)
    c = w.page(who.username, "/portal/consents")
    if ACCOUNT_ROLE[role] != "patient":
        assert c.status == 403 and not MARKERS.search(c.text), c.text
    elif not own_record(role, own):
        assert c.status == 200 and "People I act for" in c.text, c.text
        linked = set(re.findall(r'href="/portal/consents/for/([^"]+)"', c.text))
        assert linked == ({w.ids[f"patient:{active}"]} if active else set())
        assert set(re.findall(r"Matrix[a-z]+", c.text)) == ({"Matrixdelegate"} if active else set())
        # the pages of one's own prescriptions and visits are not the delegated patient's either
        for path in ("/portal/prescriptions", "/visits/mine", "/visits/book"):
            c = w.page(who.username, path)
            assert c.status == 403 and not MARKERS.search(c.text) and not c.events, (path, c.text)
    else:
        assert c.status == 200 and "Who can see my record" in c.text, c.text
        assert set(re.findall(r"Matrix[a-z]+", c.text)) <= {f"Matrix{own.replace('_', '')}"}
        assert not re.findall(r'href="/portal/consents/for/', c.text)
    # the delegations API: each side sees its own, with a name only while the delegation is active
    c = w.call(who, "GET", "/api/consent/delegates")
    if ACCOUNT_ROLE[role] != "patient":
        assert c.status == 403 and c.body["resourceType"] == "OperationOutcome", c.text
        return
    assert c.status == 200, c.text
    acting_for = [(d["patient"], d["status"], d["display"]) for d in c.body["actingFor"]]
    if acting:
        pid = w.ids[f"patient:{acting[0]}"]
        assert acting_for == [(f"Patient/{pid}", acting[1], "Pat Matrixdelegate" if acting[1] == "active" else "")]
    else:
        assert acting_for == []
    delegates = sorted((d["relatedPerson"], d["status"]) for d in c.body["delegates"])
    assert delegates == (sorted((f"RelatedPerson/{w.ids[u]}", ACTS_FOR[r][1])
                                for u, r in (("dana", "delegate"), ("ron", "removed_delegate")))
                         if own == "delegate" else [])


# ---- delegates: consents for the patient they act for ------------------------------------------------


def stored(w: World) -> tuple[int, ...]:
    """(Consent resources, outbox rows, consent grant rows, delegations): what a consent write changes."""
    with w.node.engine.connect() as conn:
        consents = conn.execute(select(func.count()).select_from(t.resources)
                                .where(t.resources.c.res_type == "Consent")).scalar_one()
        rows = [conn.execute(select(func.count()).select_from(table)).scalar_one()
                for table in (chain_outbox, consent_grants, consent_delegates)]
    return int(consents), *(int(n) for n in rows)


def test_a_delegate_grants_a_consent_for_the_patient_they_act_for_and_for_nobody_else(world):
    """Last in the module: it adds a Consent to the delegate patient's record (and to the world)."""
    w = world
    psych = f"Practitioner/{w.ids['psych']}"  # nobody signs in as Dr Psych: no other cell of the table changes
    before = stored(w)
    for role, sit in [(r, s) for r in ACTS_FOR for s in (*SITUATIONS, OTHER)]:
        if (role, sit) == ("delegate", "delegate"):
            continue
        who, _ = identity(role, None)
        pid = w.ids[f"patient:{sit}"]
        c = w.call(who, "POST", "/fhir/Consent", json=consent(pid, psych, "TREAT", frozenset({"Observation"})))
        assert_refused(c)
        page = w.page_client(who.username).post(f"/portal/consents/for/{pid}",
                                                data={"actor": psych, "class": ["Observation"]},
                                                follow_redirects=False)
        assert page.status_code == 403 and not MARKERS.search(page.text), (role, sit, page.text)
        w.new_events()
    # what the patient keeps from Dana stays theirs to change
    dana = identity("delegate", None)[0]
    deny = w.res["consent:delegate:deny_psy"]
    pid = w.ids["patient:delegate"]
    for method, body in (("DELETE", None), ("PUT", {**consent(pid, psych, "TREAT", None), "id": deny.id})):
        c = w.call(dana, method, f"/fhir/Consent/{deny.id}", json=body)
        assert_refused(c)
        assert "only the patient" in c.body["issue"][0]["diagnostics"], c.text
    assert stored(w) == before

    with w.node.engine.connect() as conn:
        last = conn.execute(select(func.max(chain_outbox.c.id))).scalar_one()
    c = w.call(dana, "POST", "/fhir/Consent", json=consent(pid, psych, "TREAT", frozenset({"Observation"})))
    assert c.status == 201 and c.body["resourceType"] == "Consent", c.text
    consents, _, _, delegations = before
    after = stored(w)
    assert (after[0], after[3]) == (consents + 1, delegations)
    w.settle()
    assert (c.body["id"], psych) in w.node.consents.in_force(pid)
    with w.node.engine.connect() as conn:
        sent = conn.execute(select(chain_outbox.c.fn, chain_outbox.c.status)
                            .where(chain_outbox.c.id > last)).all()
    assert [(fn, status) for fn, status in sent] == [("grant_by_sig", "done")]
    w.add("consent:delegate:by_dana", "Consent", c.body["id"], "delegate")
    for role in ("delegate", "removed_delegate"):
        who, _ = identity(role, None)
        r = w.call(who, "GET", f"/fhir/Consent/{c.body['id']}")
        assert r.status == (200 if role == "delegate" else 403), r.text
    r = w.call(Identity("self", "pat_delegate"), "GET", f"/fhir/Consent/{c.body['id']}")
    assert r.status == 200, r.text
