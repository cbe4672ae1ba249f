"""FHIR search over HTTP: parameter types, modifiers, paging, sorting, includes, on both databases."""

from __future__ import annotations

import pytest

from tests.integration.helpers import create, observation, patient, service_headers


@pytest.fixture
def world(client, node):  # type: ignore[no-untyped-def]
    h = service_headers(client, node)
    jane = create(client, h, patient(family="Müller", given="Jane", birth="1980-02-29",
                                     identifier=[{"system": "http://hospital.example/mrn", "value": "A-1"}],
                                     telecom=[{"system": "phone", "value": "555-0101"}]))
    john = create(client, h, patient(family="Smith", given="John", birth="1975-07-01",
                                     identifier=[{"system": "http://other.example/id", "value": "A-1"}]))
    prac = create(client, h, {"resourceType": "Practitioner", "name": [{"family": "House", "given": ["Greg"]}]})
    obs = [
        create(client, h, observation(jane["id"], value=60, when="2024-01-10T08:00:00Z")),
        create(client, h, observation(jane["id"], value=75.5, when="2024-02-10T08:00:00Z")),
        create(client, h, observation(jane["id"], code="29463-7", value=70, unit="kg", when="2024-03-10T08:00:00Z")),
        create(client, h, observation(john["id"], value=90, when="2023-12-31T23:30:00Z")),
    ]
    enc = create(client, h, {
        "resourceType": "Encounter", "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "VR"},
        "subject": {"reference": f"Patient/{jane['id']}"},
        "participant": [{"individual": {"reference": f"Practitioner/{prac['id']}"}}],
        "period": {"start": "2024-01-10T08:00:00Z", "end": "2024-01-10T08:30:00Z"},
    })
    return {"h": h, "jane": jane, "john": john, "prac": prac, "obs": obs, "enc": enc}


def ids(bundle: dict, mode: str = "match") -> set[str]:
    return {e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == mode}


def search(client, world, query: str) -> dict:  # type: ignore[no-untyped-def]
    r = client.get(f"/fhir/{query}", headers=world["h"])
    assert r.status_code == 200, r.text
    return r.json()


def test_token_search_distinguishes_system_and_code(client, world):
    assert ids(search(client, world, "Patient?identifier=A-1")) == {world["jane"]["id"], world["john"]["id"]}
    assert ids(search(client, world, "Patient?identifier=http://hospital.example/mrn|A-1")) == {world["jane"]["id"]}
    assert ids(search(client, world, "Patient?identifier=http://other.example/id|")) == {world["john"]["id"]}
    assert ids(search(client, world, "Patient?telecom=555-0101")) == {world["jane"]["id"]}
    assert ids(search(client, world, "Observation?code:not=29463-7&patient=" + world["jane"]["id"])) == {
        world["obs"][0]["id"], world["obs"][1]["id"]}


def test_string_search_is_prefix_accent_and_case_insensitive_with_exact_and_contains(client, world):
    jane = world["jane"]["id"]
    assert ids(search(client, world, "Patient?family=muller")) == {jane}
    assert ids(search(client, world, "Patient?name=MÜL")) == {jane}
    assert ids(search(client, world, "Patient?family:exact=Müller")) == {jane}
    assert ids(search(client, world, "Patient?family:exact=muller")) == set()
    assert ids(search(client, world, "Patient?family:contains=ll")) == {jane}
    assert ids(search(client, world, "Practitioner?name:contains=ous")) == {world["prac"]["id"]}
    assert ids(search(client, world, "Patient?given=jo,ja")) == {jane, world["john"]["id"]}


def test_date_search_honours_prefixes_and_partial_dates(client, world):
    jane, john = world["jane"]["id"], world["john"]["id"]
    assert ids(search(client, world, "Patient?birthdate=1980-02-29")) == {jane}
    assert ids(search(client, world, "Patient?birthdate=1980")) == {jane}
    assert ids(search(client, world, "Patient?birthdate=lt1980-02")) == {john}
    assert ids(search(client, world, "Patient?birthdate=ge1980-02-29")) == {jane}
    assert ids(search(client, world, "Patient?birthdate=ne1975-07-01")) == {jane}
    o = [x["id"] for x in world["obs"]]
    assert ids(search(client, world, "Observation?date=2024-02")) == {o[1]}
    assert ids(search(client, world, "Observation?date=gt2024-01-10T08:00:00Z")) == {o[1], o[2]}
    assert ids(search(client, world, "Observation?date=le2024-01-10")) == {o[0], o[3]}
    assert ids(search(client, world, "Observation?date=ge2024-01&date=lt2024-03")) == {o[0], o[1]}
    assert ids(search(client, world, "Encounter?date=2024-01-10")) == {world["enc"]["id"]}


def test_reference_search_accepts_typed_and_bare_ids(client, world):
    jane = world["jane"]["id"]
    expected = {x["id"] for x in world["obs"][:3]}
    assert ids(search(client, world, f"Observation?patient=Patient/{jane}")) == expected
    assert ids(search(client, world, f"Observation?subject={jane}")) == expected
    assert ids(search(client, world, f"Encounter?practitioner={world['prac']['id']}")) == {world["enc"]["id"]}


def test_quantity_search_on_observation_values(client, world):
    o = [x["id"] for x in world["obs"]]
    assert ids(search(client, world, "Observation?value-quantity=gt72")) == {o[1], o[3]}
    assert ids(search(client, world, "Observation?value-quantity=75.5")) == {o[1]}
    assert ids(search(client, world, "Observation?value-quantity=70|http://unitsofmeasure.org|kg")) == {o[2]}
    assert ids(search(client, world, "Observation?value-quantity=le70||/min")) == {o[0]}


def test_sort_count_and_paging_links_walk_every_result_once(client, world):
    first = search(client, world, "Observation?_sort=-date&_count=2")
    assert first["total"] == 4 and len(first["entry"]) == 2
    dates = [e["resource"]["effectiveDateTime"] for e in first["entry"]]
    assert dates == sorted(dates, reverse=True)
    seen = [e["resource"]["id"] for e in first["entry"]]
    nxt = next(link["url"] for link in first["link"] if link["relation"] == "next")
    second = client.get(nxt.replace("http://testserver", ""), headers=world["h"]).json()
    seen += [e["resource"]["id"] for e in second["entry"]]
    assert sorted(seen) == sorted(x["id"] for x in world["obs"])
    assert not any(link["relation"] == "next" for link in second["link"])


def test_summary_count_returns_only_the_total(client, world):
    b = search(client, world, "Observation?_summary=count")
    assert b["total"] == 4 and "entry" not in b


def test_include_and_revinclude_add_referenced_resources(client, world):
    b = search(client, world, f"Encounter?_id={world['enc']['id']}&_include=Encounter:practitioner&_include=Encounter:patient")
    assert ids(b, "include") == {world["prac"]["id"], world["jane"]["id"]}
    b = search(client, world, f"Patient?_id={world['jane']['id']}&_revinclude=Observation:patient")
    assert ids(b) == {world["jane"]["id"]}
    assert ids(b, "include") == {x["id"] for x in world["obs"][:3]}


def test_id_and_last_updated_are_searchable(client, world):
    jane = world["jane"]["id"]
    assert ids(search(client, world, f"Patient?_id={jane}")) == {jane}
    assert ids(search(client, world, "Patient?_lastUpdated=gt2000-01-01")) == {jane, world["john"]["id"]}
    assert ids(search(client, world, "Patient?_lastUpdated=lt2000-01-01")) == set()


def test_unknown_parameters_are_reported_or_refused_when_strict(client, world):
    b = search(client, world, "Patient?shoe-size=42")
    outcome = [e for e in b["entry"] if e["search"]["mode"] == "outcome"]
    assert outcome and "shoe-size" in outcome[0]["resource"]["issue"][0]["diagnostics"]
    assert b["total"] == 2
    r = client.get("/fhir/Patient?shoe-size=42", headers={**world["h"], "Prefer": "handling=strict"})
    assert r.status_code == 400 and "shoe-size" in r.json()["issue"][0]["diagnostics"]


def test_post_search_equals_get_search(client, world):
    r = client.post("/fhir/Observation/_search", data={"patient": world["jane"]["id"]},
                    headers={"Authorization": world["h"]["Authorization"]})
    assert r.status_code == 200
    assert ids(r.json()) == {x["id"] for x in world["obs"][:3]}
