"""A small clinic for the notes and messaging tests (tests/integration/test_notes.py,
test_messaging.py): built with a trusted service token, then every test speaks as one person.

* Dr Doc (``doc``) sees Alice (``alice``) in encounter ``visit`` (in progress, class VR);
* Dr Colleague (``colleague``) has a care relationship with Alice too (encounter ``followup``)
  but is not a practitioner of ``visit``;
* Dr Stranger (``stranger``) has treated nobody;
* Bob (``bob``) is another patient of Dr Doc (encounter ``bobs``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select

from teleledger.storage import tables as t
from teleledger.visits.notes_tables import message_reads, note_drafts
from tests.integration.helpers import FHIR, create, patient, service_headers

PASSWORD = "correct horse 1"


def encounter(patient_id: str, practitioner_id: str, *, status: str = "in-progress") -> dict:
    return {
        "resourceType": "Encounter", "status": status,
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "VR", "display": "virtual"},
        "subject": {"reference": f"Patient/{patient_id}"},
        "participant": [{"individual": {"reference": f"Practitioner/{practitioner_id}"}}],
        "period": {"start": "2024-06-01T10:00:00Z"},
    }


@dataclass
class Clinic:
    client: Any
    node: Any
    service: dict
    ids: dict[str, str] = field(default_factory=dict)
    _tokens: dict[str, dict] = field(default_factory=dict)

    def auth(self, username: str) -> dict:
        if username not in self._tokens:
            r = self.client.post("/auth/token", data={"grant_type": "password", "username": username,
                                                     "password": PASSWORD})
            assert r.status_code == 200, r.text
            self._tokens[username] = {"Authorization": f"Bearer {r.json()['access_token']}"}
        return self._tokens[username]

    def get(self, username: str, path: str, **kw: Any):  # type: ignore[no-untyped-def]
        return self.client.get(path, headers=self.auth(username), **kw)

    def post(self, username: str, path: str, body: Any = None, **kw: Any):  # type: ignore[no-untyped-def]
        return self.client.post(path, json=body, headers=self.auth(username), **kw)

    def count(self, res_type: str) -> int:
        """Live resources of a type, whoever may see them."""
        with self.node.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(t.resources)
                                .where(t.resources.c.res_type == res_type,
                                       t.resources.c.deleted.is_(False))).scalar_one()

    def rows(self, table: Any) -> list:
        with self.node.engine.connect() as conn:
            return list(conn.execute(select(table)).all())

    def drafts(self) -> list:
        return self.rows(note_drafts)

    def reads(self) -> list:
        return self.rows(message_reads)

    def denials(self, reason: str) -> int:
        with self.node.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(t.access_events)
                                .where(t.access_events.c.outcome == "denied",
                                       t.access_events.c.reason == reason)).scalar_one()

    def address_of(self, username: str) -> str:
        return self.node.keystore.key(f"user:{username}", create=False).public_key.to_checksum_address()


def build_clinic(client: Any, node: Any) -> Clinic:
    svc = service_headers(client, node)
    c = Clinic(client, node, svc)
    ids = c.ids
    ids["alice"] = create(client, svc, patient("Liddell", "Alice"))["id"]
    ids["bob"] = create(client, svc, patient("Builder", "Bob", birth="1985-01-02"))["id"]
    for key, family, given in (("doc", "Doc", "Dana"), ("colleague", "Colleague", "Cole"),
                               ("stranger", "Stranger", "Sam")):
        ids[key] = create(client, svc, {"resourceType": "Practitioner", "name": [{"family": family, "given": [given],
                                                                                   "prefix": ["Dr"]}]})["id"]
    ids["visit"] = create(client, svc, encounter(ids["alice"], ids["doc"]))["id"]
    ids["followup"] = create(client, svc, encounter(ids["alice"], ids["colleague"], status="finished"))["id"]
    ids["bobs"] = create(client, svc, encounter(ids["bob"], ids["doc"]))["id"]
    for username, role, link in (("alice", "patient", f"Patient/{ids['alice']}"),
                                 ("bob", "patient", f"Patient/{ids['bob']}"),
                                 ("doc", "practitioner", f"Practitioner/{ids['doc']}"),
                                 ("colleague", "practitioner", f"Practitioner/{ids['colleague']}"),
                                 ("stranger", "practitioner", f"Practitioner/{ids['stranger']}")):
        node.accounts.create_user(username=username, password=PASSWORD, role=role,
                                  patient=link if role == "patient" else None,
                                  practitioner=link if role == "practitioner" else None)
    return c


__all__ = ["FHIR", "PASSWORD", "Clinic", "build_clinic", "encounter"]
