"""Bulk import of the Synthea sample, idempotence, all-or-nothing files, and encryption at rest."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import func, select

from teleledger.demo import system_principal
from teleledger.records.importer import ImportError_, Importer
from teleledger.storage import tables as t
from tests.conftest import SAMPLES, make_settings


def lines(name: str) -> list[dict]:
    return [json.loads(x) for x in (SAMPLES / f"{name}.000.ndjson").read_text().splitlines() if x.strip()]


def count(node, res_type: str) -> int:  # type: ignore[no-untyped-def]
    with node.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(t.resources)
                            .where(t.resources.c.res_type == res_type, t.resources.c.deleted.is_(False))).scalar_one()


@pytest.fixture
def imported(node):  # type: ignore[no-untyped-def]
    report = Importer(node.records, system_principal()).run(SAMPLES)
    return node, report


def test_the_synthea_sample_imports_with_zero_errors_and_is_searchable(imported):
    node, report = imported
    assert report.resources == 7160
    assert count(node, "Encounter") == 1215 and count(node, "Procedure") == 2056
    per_patient = Counter(e["subject"]["reference"].split("/")[1] for e in lines("Encounter"))
    pid, n = per_patient.most_common(1)[0]
    bundle = node.records.search(system_principal(), "Encounter", [("patient", pid), ("_summary", "count")])
    assert bundle["total"] == n
    # conditional references were rewritten to the imported practitioners
    enc = node.records.search(system_principal(), "Encounter", [("patient", pid), ("_count", "1")])["entry"][0]["resource"]
    ref = enc["participant"][0]["individual"]["reference"]
    assert ref.startswith("Practitioner/") and "?" not in ref
    assert node.records.read(system_principal(), "Practitioner", ref.split("/")[1]).body["resourceType"] == "Practitioner"


def test_reimporting_the_same_data_creates_no_new_versions(imported):
    node, _ = imported
    with node.engine.connect() as conn:
        before = conn.execute(select(func.count()).select_from(t.resource_versions)).scalar_one()
    again = Importer(node.records, system_principal()).run(SAMPLES)
    assert sum(f.unchanged for f in again.files) == 7160
    with node.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(t.resource_versions)).scalar_one() == before


def test_a_file_cut_off_halfway_stores_nothing_and_names_the_line(node, tmp_path):
    src = (SAMPLES / "Patient.000.ndjson").read_bytes()
    cut = src[: len(src) // 2]
    broken = tmp_path / "Patient.000.ndjson"
    broken.write_bytes(cut)
    expected_line = cut.count(b"\n") + 1
    with pytest.raises(ImportError_) as err:
        Importer(node.records, system_principal()).run(broken)
    assert f"line {expected_line}" in err.value.message
    assert count(node, "Patient") == 0


def test_an_invalid_resource_in_a_file_rejects_the_whole_file(node, tmp_path):
    good = (SAMPLES / "Organization.000.ndjson").read_text().splitlines()
    bad = json.loads(good[0])
    bad["id"] = "bad-org"
    bad["active"] = "maybe"
    path = tmp_path / "Organization.000.ndjson"
    path.write_text("\n".join(good[:5] + [json.dumps(bad)]) + "\n")
    with pytest.raises(ImportError_) as err:
        Importer(node.records, system_principal()).run(path)
    assert "line 6" in err.value.message
    assert count(node, "Organization") == 0


def test_references_across_files_resolve_when_files_are_in_one_folder(node, tmp_path):
    for name in ("Organization", "Location", "Practitioner", "Patient", "Encounter"):
        shutil.copy(SAMPLES / f"{name}.000.ndjson", tmp_path)
    Importer(node.records, system_principal()).run(tmp_path)
    assert count(node, "Encounter") == 1215


def test_the_raw_database_file_holds_no_patient_identifier_name_or_birth_date(tmp_path):
    from teleledger.bootstrap import build

    node = build(make_settings(tmp_path, f"sqlite:///{tmp_path / 'raw.db'}"))
    Importer(node.records, system_principal()).run(SAMPLES)
    node.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("raw.db*"))
    assert len(raw) > 1_000_000
    secrets: set[str] = set()
    for p in lines("Patient"):
        # Synthea reuses the resource id as the MRN value; resource ids are random UUIDs, stored in clear by design
        secrets.update(i["value"] for i in p.get("identifier", []) if i["value"] != p["id"])
        secrets.add(p["birthDate"])
        secrets.update(n["family"] for n in p["name"])
        secrets.update(g for n in p["name"] for g in n.get("given", []))
        secrets.update(tel["value"] for tel in p.get("telecom", []))
        secrets.update(line for a in p.get("address", []) for line in a.get("line", []))
    # directory data (practitioner, organization names) is stored in clear by design; a patient who
    # happens to share a practitioner's family name is not a leak of the patient's record
    directory = " ".join(json.dumps(r) for name in ("Practitioner", "PractitionerRole", "Organization", "Location")
                         for r in lines(name))
    secrets = {s for s in secrets if len(s) >= 6 and s not in directory}
    assert len(secrets) > 50
    found = sorted(s for s in secrets if s.encode() in raw)
    assert found == []


def test_a_sealed_row_moved_onto_another_resource_does_not_decrypt(node):
    from teleledger.core.crypto import DecryptionError
    from tests.integration.helpers import patient

    a, _ = node.records.create(system_principal(), patient(family="Alpha"))
    b, _ = node.records.create(system_principal(), patient(family="Beta"))
    with node.engine.begin() as conn:
        v = t.resource_versions
        body = conn.execute(select(v.c.body).where(v.c.res_id == a.res_id)).scalar_one()
        conn.execute(v.update().where(v.c.res_id == b.res_id).values(body=body))
    with pytest.raises(DecryptionError):
        node.records.read(system_principal(), "Patient", b.res_id)


def test_the_master_key_file_is_created_private(tmp_path):
    from teleledger.bootstrap import build

    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'k.db'}", master_key="")
    node = build(settings)
    node.close()
    key = Path(settings.home) / "master.key"
    assert key.stat().st_mode & 0o777 == 0o600
