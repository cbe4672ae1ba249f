"""``care_relationships`` (records.care_tables) stays equal to a from-scratch computation over
every write path: create, update, delete, transaction Bundles (also rolled back), imports, and
migration 0012's backfill; on SQLite and PostgreSQL."""

from __future__ import annotations

import random
from pathlib import Path

import orjson
import pytest
from alembic import command
from alembic.config import Config

from teleledger.core.errors import TeleledgerError
from teleledger.demo import system_principal
from teleledger.records.care_tables import SqlCareRelationships, recompute_all, stored_pairs
from teleledger.records.importer import Importer
from teleledger.storage.db import MIGRATIONS, UnitOfWork

PATIENTS = [f"cp-{i}" for i in range(4)]
DOCTORS = [f"cd-{i}" for i in range(4)]
SYSTEM = system_principal()


def care_resource(rt: str, rid: str, patient: str, doctors: list[str], *, role_ref: bool = False) -> dict:
    """An Encounter, Appointment or CareTeam about ``patient`` naming ``doctors``; ``role_ref`` adds
    a PractitionerRole participant, which establishes nothing."""
    refs = [{"reference": f"Practitioner/{d}"} for d in doctors]
    if role_ref:
        refs.append({"reference": "PractitionerRole/some-role"})
    if rt == "Encounter":
        return {"resourceType": rt, "id": rid, "status": "finished",
                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "VR"},
                "subject": {"reference": f"Patient/{patient}"},
                "participant": [{"individual": r} for r in refs]}
    if rt == "Appointment":
        return {"resourceType": rt, "id": rid, "status": "booked",
                "participant": [{"actor": {"reference": f"Patient/{patient}"}, "status": "accepted"},
                                *({"actor": r, "status": "accepted"} for r in refs)]}
    return {"resourceType": rt, "id": rid, "status": "active", "subject": {"reference": f"Patient/{patient}"},
            "participant": [{"member": r} for r in refs]}


def observation(rid: str, patient: str, doctor: str) -> dict:
    """Names a practitioner too, as performer: not a care-establishing type."""
    return {"resourceType": "Observation", "id": rid, "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
            "subject": {"reference": f"Patient/{patient}"}, "performer": [{"reference": f"Practitioner/{doctor}"}]}


def expected_pairs(current: dict[tuple[str, str], dict]) -> set[tuple[str, str]]:
    """The oracle: pairs from the test's own model of the current resources, not from the index."""
    out = set()
    for (rt, _), body in current.items():
        if rt not in ("Encounter", "Appointment", "CareTeam"):
            continue
        if rt == "Encounter":
            refs = [p["individual"]["reference"] for p in body.get("participant", [])]
            patients = {body["subject"]["reference"]}
        elif rt == "Appointment":
            refs = [p["actor"]["reference"] for p in body["participant"]]
            patients = {r for r in refs if r.startswith("Patient/")}
        else:
            refs = [p["member"]["reference"] for p in body.get("participant", [])]
            patients = {body["subject"]["reference"]}
        out |= {(r.removeprefix("Practitioner/"), p.removeprefix("Patient/"))
                for r in refs if r.startswith("Practitioner/") for p in patients}
    return out


def assert_in_step(node, current: dict[tuple[str, str], dict]) -> None:  # type: ignore[no-untyped-def]
    with UnitOfWork(node.engine) as uow:
        stored, scratch = stored_pairs(uow.c), recompute_all(uow.c)
        care = SqlCareRelationships(uow.c)
        answers = {(d, p) for d in DOCTORS for p in PATIENTS if care.has_care_relationship(d, p)}
    assert stored == scratch == expected_pairs(current)
    assert answers == {(d, p) for d, p in stored if d in DOCTORS and p in PATIENTS}


def random_body(rnd: random.Random, rt: str, rid: str) -> dict:
    if rt == "Observation":
        return observation(rid, rnd.choice(PATIENTS), rnd.choice(DOCTORS))
    return care_resource(rt, rid, rnd.choice(PATIENTS), rnd.sample(DOCTORS, rnd.randint(0, 2)),
                         role_ref=rnd.random() < 0.2)


def transaction(writes: list[tuple[str, str, dict | None]]) -> dict:
    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "DELETE", "url": f"{rt}/{rid}"}} if body is None else
        {"resource": body, "request": {"method": "PUT", "url": f"{rt}/{rid}"}}
        for rt, rid, body in writes]}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_care_table_equals_a_from_scratch_computation_through_a_random_history_of_writes(
        node, tmp_path: Path, seed: int) -> None:  # type: ignore[no-untyped-def]
    rnd = random.Random(seed)
    keys = [(rt, f"{rt.lower()}-{i}") for rt in ("Encounter", "Appointment", "CareTeam", "Observation")
            for i in range(3)]
    current: dict[tuple[str, str], dict] = {}
    for step in range(30):
        op = rnd.choice(("put", "put", "put", "delete", "transaction", "failed transaction", "import"))
        if op == "put":
            rt, rid = rnd.choice(keys)
            body = random_body(rnd, rt, rid)
            node.records.update(SYSTEM, rt, rid, body)
            current[(rt, rid)] = body
        elif op == "delete":
            rt, rid = rnd.choice(keys)
            node.records.delete(SYSTEM, rt, rid)
            current.pop((rt, rid), None)
        elif op in ("transaction", "failed transaction"):
            picked = rnd.sample(keys, 3)
            writes = [(rt, rid, None if rnd.random() < 0.3 else random_body(rnd, rt, rid)) for rt, rid in picked]
            if op == "failed transaction":
                # the last entry fails (its id does not match its URL): nothing of the Bundle stays
                rt, rid, _ = writes[-1]
                writes[-1] = (rt, rid, {**random_body(rnd, rt, rid), "id": "not-the-url-id"})
                with pytest.raises(TeleledgerError):
                    node.bundles.process(SYSTEM, transaction(writes))
            else:
                node.bundles.process(SYSTEM, transaction(writes))
                for rt, rid, body in writes:
                    if body is None:
                        current.pop((rt, rid), None)
                    else:
                        current[(rt, rid)] = body
        else:
            rt = rnd.choice(("Encounter", "Appointment", "CareTeam"))
            bodies = [random_body(rnd, rt, rid) for r, rid in keys if r == rt and rnd.random() < 0.7]
            folder = tmp_path / f"import-{step}"
            folder.mkdir()
            (folder / f"{rt}.000.ndjson").write_bytes(b"\n".join(orjson.dumps(b) for b in bodies) + b"\n")
            Importer(node.records, SYSTEM).run(folder)
            current.update({(rt, b["id"]): b for b in bodies})
        assert_in_step(node, current)


def test_removing_one_of_two_encounters_keeps_the_care_relationship_and_removing_both_ends_it(node) -> None:  # type: ignore[no-untyped-def]
    a = care_resource("Encounter", "enc-a", "cp-0", ["cd-0"])
    b = care_resource("Encounter", "enc-b", "cp-0", ["cd-0", "cd-1"])
    node.records.update(SYSTEM, "Encounter", "enc-a", a)
    node.records.update(SYSTEM, "Encounter", "enc-b", b)
    assert_in_step(node, {("Encounter", "enc-a"): a, ("Encounter", "enc-b"): b})
    # the update drops cd-0 from enc-b: enc-a still sources (cd-0, cp-0), nothing sources cd-1
    b2 = care_resource("Encounter", "enc-b", "cp-0", [])
    node.records.update(SYSTEM, "Encounter", "enc-b", b2)
    with UnitOfWork(node.engine) as uow:
        assert stored_pairs(uow.c) == {("cd-0", "cp-0")}
    node.records.delete(SYSTEM, "Encounter", "enc-a")
    with UnitOfWork(node.engine) as uow:
        assert stored_pairs(uow.c) == set()
    # a resource moved to another patient takes the relationship with it
    node.records.update(SYSTEM, "Encounter", "enc-b", care_resource("Encounter", "enc-b", "cp-1", ["cd-2"]))
    with UnitOfWork(node.engine) as uow:
        assert stored_pairs(uow.c) == {("cd-2", "cp-1")}


def test_a_care_relationship_created_inside_a_transaction_is_seen_by_its_later_decisions(node) -> None:  # type: ignore[no-untyped-def]
    with UnitOfWork(node.engine) as uow:
        care = node.records._care_for(uow.c)
        assert not care.has_care_relationship("cd-3", "cp-3")  # cached as False for this transaction
        node.records.update_in(uow.c, SYSTEM, "Encounter", "enc-t",
                               care_resource("Encounter", "enc-t", "cp-3", ["cd-3"]))
        assert node.records._care_for(uow.c).has_care_relationship("cd-3", "cp-3")


def test_migration_0012_backfills_the_care_table_from_existing_data(node) -> None:  # type: ignore[no-untyped-def]
    rnd = random.Random(7)
    current = {}
    for rt in ("Encounter", "Appointment", "CareTeam", "Observation"):
        for i in range(4):
            body = random_body(rnd, rt, f"m-{rt.lower()}-{i}")
            node.records.update(SYSTEM, rt, body["id"], body)
            current[(rt, body["id"])] = body
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with node.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0011")
        command.upgrade(cfg, "0012")
    assert expected_pairs(current)  # the data does name care relationships
    assert_in_step(node, current)


def test_a_relationship_added_while_another_transaction_removes_its_last_source_survives_both(node) -> None:  # type: ignore[no-untyped-def]
    """PostgreSQL runs both transactions at once (READ COMMITTED): the removal must wait for
    the addition and then see it; SQLite runs them one after the other."""
    import threading
    import time

    node.records.update(SYSTEM, "Encounter", "enc-b", care_resource("Encounter", "enc-b", "cp-0", ["cd-0"]))
    adding = UnitOfWork(node.engine).__enter__()
    errors: list[BaseException] = []

    def remove() -> None:
        try:
            with UnitOfWork(node.engine) as uow:
                node.records.delete_in(uow.c, SYSTEM, "Encounter", "enc-b")
                uow.commit()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    try:
        node.records.update_in(adding.c, SYSTEM, "Encounter", "enc-c",
                               care_resource("Encounter", "enc-c", "cp-0", ["cd-0"]))
        remover = threading.Thread(target=remove)
        remover.start()
        time.sleep(0.5)  # the removal reaches the pair (PostgreSQL) or the write lock (SQLite)
        adding.commit()
    finally:
        adding.__exit__(None, None, None)
    remover.join(timeout=30)
    assert not remover.is_alive() and not errors
    with UnitOfWork(node.engine) as uow:
        assert stored_pairs(uow.c) == recompute_all(uow.c) == {("cd-0", "cp-0")}
