"""``teleledger verify`` on real databases: a clean node verifies, and every byte changed at random
in a resource row, a log entry, a subtree hash or a checkpoint is found and named."""

from __future__ import annotations

import base64
import hashlib
import random
import shutil
import sqlite3
from pathlib import Path

import orjson
import pytest
import typer
from sqlalchemy import select, text
from typer.testing import CliRunner

from teleledger import cli_verify
from teleledger.bootstrap import build
from teleledger.core.crypto import seal
from teleledger.demo import system_principal
from teleledger.ledger.log.storage import log_leaves, log_nodes, log_queue
from teleledger.records.importer import Importer, ordered_files
from teleledger.records.verify import Report, verify_node
from teleledger.storage import tables as t
from tests.conftest import SAMPLES, make_settings

SUBSET = ("Organization", "Location", "Practitioner", "PractitionerRole", "Patient",
          "AllergyIntolerance", "Immunization", "Device", "Condition")
MASTER_KEY = base64.b64encode(b"k" * 32).decode()  # what make_settings uses


def ids(node, res_type: str) -> list[str]:  # type: ignore[no-untyped-def]
    with node.engine.connect() as conn:
        return list(conn.execute(select(t.resources.c.res_id).where(t.resources.c.res_type == res_type)
                                 .order_by(t.resources.c.res_id)).scalars())


def populate(node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Part of the Synthea sample, one checkpoint per file, reads (access entries), an update, a
    delete, and finally an update that stays queued (not yet in the tree)."""
    folder = tmp_path / "subset"
    folder.mkdir()
    for name in SUBSET:
        shutil.copy(SAMPLES / f"{name}.000.ndjson", folder)
    principal = system_principal()
    importer = Importer(node.records, principal)
    try:
        for path in ordered_files(folder):
            importer.import_file(path)
            node.log.flush()
    finally:
        importer.close()
    patients = ids(node, "Patient")
    for pid in patients[:6]:
        node.records.read(principal, "Patient", pid)
    first = node.records.read(principal, "Patient", patients[0]).body
    node.records.update(principal, "Patient", patients[0], {**first, "active": True})
    node.records.delete(principal, "AllergyIntolerance", ids(node, "AllergyIntolerance")[0])
    node.log.flush()
    second = node.records.read(principal, "Patient", patients[1]).body
    node.records.update(principal, "Patient", patients[1], {**second, "active": False})


def keys(report: Report) -> set[tuple[str, str]]:
    return {(f.table, f.key) for f in report.findings}


# --------------------------------------------------------------------------- both backends


def test_a_clean_database_verifies_without_findings(node, tmp_path):
    populate(node, tmp_path)
    report = verify_node(node)
    assert report.findings == [], report.findings
    assert report.entries == report.tree_size == node.log.tree_size() > 900
    assert report.queued >= 2  # the last update and its access entry wait in log_queue
    assert report.checkpoints == len(SUBSET) + 1
    assert report.versions > 900 and report.access_events > 0 and report.nodes > 900
    assert report.info == []


def test_a_flipped_byte_in_a_version_and_in_a_subtree_hash_is_located(node, tmp_path):
    populate(node, tmp_path)
    v, n = t.resource_versions, log_nodes
    with node.engine.begin() as conn:
        row = conn.execute(select(v.c.res_type, v.c.res_id, v.c.version, v.c.body)
                           .where(v.c.res_type == "Condition").order_by(v.c.res_id).limit(1)).one()
        body = bytearray(row.body)
        body[40] ^= 0x01
        conn.execute(v.update().where(v.c.res_type == row.res_type, v.c.res_id == row.res_id,
                                      v.c.version == row.version).values(body=bytes(body)))
        digest = bytearray(conn.execute(select(n.c.hash).where(n.c.level == 3, n.c.idx == 5)).scalar_one())
        digest[0] ^= 0x80
        conn.execute(n.update().where(n.c.level == 3, n.c.idx == 5).values(hash=bytes(digest)))
    report = verify_node(node)
    assert keys(report) == {("resource_versions", f"Condition/{row.res_id}/_history/{row.version}"),
                            ("log_nodes", "level=3 idx=5")}
    assert {f.kind for f in report.findings} == {"version-undecryptable", "node-mismatch"}


# --------------------------------------------------------------------------- SQLite file


@pytest.fixture(scope="module")
def golden(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    """A populated database file, closed and self-contained (no -wal file beside it)."""
    tmp = tmp_path_factory.mktemp("golden")
    live = tmp / "live.db"
    node = build(make_settings(tmp, f"sqlite:///{live}"))
    try:
        populate(node, tmp)
    finally:
        node.log.close()
        node.close()
    path = tmp / "golden.db"
    src, dst = sqlite3.connect(live), sqlite3.connect(path)
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()
    assert not Path(f"{path}-wal").exists()
    return path


def copy_of(golden: Path, tmp_path: Path, name: str = "copy.db") -> Path:
    path = tmp_path / name
    shutil.copyfile(golden, path)
    return path


def verify_file(path: Path, tmp_path: Path) -> Report:
    node = build(make_settings(tmp_path, f"sqlite:///{path}"), migrate_schema=False)
    try:
        return verify_node(node)
    finally:
        node.log.close()
        node.close()


def flip(value: bytes, rng: random.Random) -> bytes:
    out = bytearray(value)
    out[rng.randrange(len(out))] ^= rng.randrange(1, 256)
    return bytes(out)


def mutate(path: Path, target: str, rng: random.Random) -> tuple[str, str]:
    """Change one byte of one random row of ``target`` (table.column); return the (table, row
    key) a finding must name."""
    db = sqlite3.connect(path)
    try:
        if target == "resource_versions.body":
            rows = db.execute("SELECT res_type, res_id, version FROM resource_versions "
                              "WHERE body IS NOT NULL ORDER BY 1, 2, 3").fetchall()
            res_type, res_id, version = rng.choice(rows)
            where = "res_type = ? AND res_id = ? AND version = ?"
            (body,) = db.execute(f"SELECT body FROM resource_versions WHERE {where}",
                                 (res_type, res_id, version)).fetchone()
            db.execute(f"UPDATE resource_versions SET body = ? WHERE {where}",
                       (flip(body, rng), res_type, res_id, version))
            found = ("resource_versions", f"{res_type}/{res_id}/_history/{version}")
        elif target in ("log_leaves.leaf", "log_leaves.leaf_hash"):
            column = target.split(".")[1]
            (size,) = db.execute("SELECT count(*) FROM log_leaves").fetchone()
            idx = rng.randrange(size)
            (value,) = db.execute(f"SELECT {column} FROM log_leaves WHERE idx = ?", (idx,)).fetchone()
            db.execute(f"UPDATE log_leaves SET {column} = ? WHERE idx = ?", (flip(value, rng), idx))
            found = ("log_leaves", f"idx={idx}")
        elif target == "log_nodes.hash":
            level, idx, value = rng.choice(db.execute(
                "SELECT level, idx, hash FROM log_nodes ORDER BY level, idx").fetchall())
            db.execute("UPDATE log_nodes SET hash = ? WHERE level = ? AND idx = ?",
                       (flip(value, rng), level, idx))
            found = ("log_nodes", f"level={level} idx={idx}")
        elif target in ("log_checkpoints.root_hash", "log_checkpoints.note"):
            column = target.split(".")[1]
            # the note is TEXT: read and write its raw bytes, valid UTF-8 or not
            size, value = rng.choice(db.execute(
                f"SELECT size, CAST({column} AS BLOB) FROM log_checkpoints ORDER BY size").fetchall())
            new = "CAST(? AS TEXT)" if column == "note" else "?"
            db.execute(f"UPDATE log_checkpoints SET {column} = {new} WHERE size = ?",
                       (flip(value, rng), size))
            found = ("log_checkpoints", f"size={size}")
        elif target == "resources.version":
            res_type, res_id, version = rng.choice(db.execute(
                "SELECT res_type, res_id, version FROM resources ORDER BY 1, 2").fetchall())
            changed = version ^ (rng.randrange(1, 256) << (8 * rng.randrange(4)))
            db.execute("UPDATE resources SET version = ? WHERE res_type = ? AND res_id = ?",
                       (changed, res_type, res_id))
            found = ("resources", f"{res_type}/{res_id}")
        else:  # pragma: no cover
            raise AssertionError(target)
        db.commit()
    finally:
        db.close()
    return found


TARGETS = ("resource_versions.body", "log_leaves.leaf", "log_leaves.leaf_hash", "log_nodes.hash",
           "log_checkpoints.root_hash", "log_checkpoints.note", "resources.version")


def test_every_random_single_byte_change_is_detected_and_located(golden, tmp_path):
    rng = random.Random(9162)
    failures = []
    for i in range(8 * len(TARGETS)):  # 56 mutations, 8 per kind of row
        target = TARGETS[i % len(TARGETS)]
        path = copy_of(golden, tmp_path, f"m{i}.db")
        table, key = mutate(path, target, rng)
        report = verify_file(path, tmp_path)
        if (table, key) not in keys(report):
            failures.append(f"#{i} {target} {key}: not located; findings {report.findings}")
        elif keys(report) != {(table, key)}:  # …and nothing else is blamed
            failures.append(f"#{i} {target} {key}: also blamed {keys(report) - {(table, key)}}")
        path.unlink()
    assert not failures, "\n".join(failures)


def test_a_golden_copy_is_clean(golden, tmp_path):
    report = verify_file(copy_of(golden, tmp_path), tmp_path)
    assert report.ok, report.findings


def test_a_body_resealed_under_the_right_key_with_other_content_is_a_hash_mismatch(golden, tmp_path):
    path = copy_of(golden, tmp_path)
    node = build(make_settings(tmp_path, f"sqlite:///{path}"), migrate_schema=False)
    v = t.resource_versions
    try:
        with node.engine.begin() as conn:
            row = conn.execute(select(v).where(v.c.res_type == "Patient").order_by(v.c.res_id).limit(1)).one()
            resource = node.records.store._decode(conn, row).body
            resource["gender"] = "other" if resource.get("gender") != "other" else "unknown"
            aead = node.records.store.keys.for_read(conn, row.key_id)
            ref = f"Patient/{row.res_id}/_history/{row.version}"
            body = seal(aead, orjson.dumps(resource), ref.encode())
            conn.execute(v.update().where(v.c.res_type == "Patient", v.c.res_id == row.res_id,
                                          v.c.version == row.version).values(body=body))
        report = verify_node(node)
    finally:
        node.log.close()
        node.close()
    assert [(f.kind, f.table, f.key) for f in report.findings] == [("version-hash", "resource_versions", ref)]


def test_removed_rows_are_named_by_what_the_log_still_holds(golden, tmp_path):
    path = copy_of(golden, tmp_path)
    db = sqlite3.connect(path)
    # the first version of the patient updated later (not its current version), and one access record
    res_id, version = db.execute("SELECT res_id, min(version) FROM resource_versions WHERE res_type = "
                                 "'Patient' GROUP BY res_id HAVING count(*) > 1").fetchone()
    db.execute("DELETE FROM resource_versions WHERE res_type = 'Patient' AND res_id = ? AND version = ?",
               (res_id, version))
    access_id, leaf_hash = db.execute("SELECT id, leaf_hash FROM access_events "
                                      "ORDER BY id LIMIT 1").fetchone()
    db.execute("DELETE FROM access_events WHERE id = ?", (access_id,))
    (idx,) = db.execute("SELECT idx FROM log_leaves WHERE leaf_hash = ?", (leaf_hash,)).fetchone()
    altered = db.execute("SELECT max(id) FROM access_events").fetchone()[0]
    db.execute("UPDATE access_events SET actor = 'someone-else' WHERE id = ?", (altered,))
    db.commit()
    db.close()
    report = verify_file(path, tmp_path)
    assert sorted((f.kind, f.table, f.key) for f in report.findings) == sorted([
        ("logged-version-missing", "resource_versions", f"Patient/{res_id}/_history/{version}"),
        ("access-event-missing", "access_events", f"leaf idx={idx}"),
        ("access-event-altered", "access_events", f"id={altered}"),
    ])


def test_a_note_whose_signature_only_changed_in_base64_padding_bits_is_still_caught(golden, tmp_path):
    # base64 decoding ignores the spare low bits of the last character before "=": the signature
    # still verifies, but the note is no longer the bytes the log signed
    path = copy_of(golden, tmp_path)
    db = sqlite3.connect(path)
    size, note = db.execute("SELECT size, note FROM log_checkpoints ORDER BY size LIMIT 1").fetchone()
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    at = note.rindex("=\n") - 1
    changed = note[:at] + alphabet[alphabet.index(note[at]) ^ 1] + note[at + 1:]
    assert base64.b64decode(changed.rsplit(" ", 1)[1]) == base64.b64decode(note.rsplit(" ", 1)[1])
    db.execute("UPDATE log_checkpoints SET note = ? WHERE size = ?", (changed, size))
    db.commit()
    db.close()
    report = verify_file(path, tmp_path)
    assert [(f.kind, f.table, f.key) for f in report.findings] == [
        ("checkpoint-signature", "log_checkpoints", f"size={size}")]


def test_a_version_whose_timestamp_was_changed_differs_from_its_change_entry(golden, tmp_path):
    path = copy_of(golden, tmp_path)
    db = sqlite3.connect(path)
    # an earlier version (the resources row points at the latest one, which stays untouched)
    res_id, version = db.execute("SELECT res_id, min(version) FROM resource_versions WHERE res_type = "
                                 "'Patient' GROUP BY res_id HAVING count(*) > 1").fetchone()
    db.execute("UPDATE resource_versions SET last_updated = last_updated - 1000000 "
               "WHERE res_type = 'Patient' AND res_id = ? AND version = ?", (res_id, version))
    db.commit()
    db.close()
    report = verify_file(path, tmp_path)
    assert [(f.kind, f.table, f.key) for f in report.findings] == [
        ("version-metadata", "resource_versions", f"Patient/{res_id}/_history/{version}")]


def test_entries_that_do_not_decode_are_named_in_the_tree_and_in_the_queue(node, tmp_path):
    # the log hashes whatever it is given: a writer that bypassed the entry format is found
    populate(node, tmp_path)
    with node.engine.begin() as conn:
        conn.execute(log_queue.insert().values(leaf=b"\x01\x09not an entry", queued=0))
    node.log.flush()
    with node.engine.begin() as conn:
        (idx,) = conn.execute(select(log_leaves.c.idx).where(
            log_leaves.c.leaf == b"\x01\x09not an entry")).one()
        queue_id = conn.execute(log_queue.insert().values(leaf=b"\x07", queued=0)).inserted_primary_key[0]
    report = verify_node(node)
    assert [(f.kind, f.table, f.key) for f in report.findings] == [
        ("entry-malformed", "log_leaves", f"idx={idx}"), ("entry-malformed", "log_queue", f"id={queue_id}")]


def test_a_shredded_patient_is_information_not_tampering(golden, tmp_path):
    path = copy_of(golden, tmp_path)
    db = sqlite3.connect(path)
    (key_id,) = db.execute("SELECT key_id FROM data_keys WHERE key_id LIKE 'p.%' "
                           "ORDER BY key_id LIMIT 1").fetchone()
    db.execute("DELETE FROM data_keys WHERE key_id = ?", (key_id,))
    db.commit()
    db.close()
    report = verify_file(path, tmp_path)
    assert report.ok, report.findings
    assert [(f.kind, f.key) for f in report.info] == [("shredded", f"key_id={key_id}")]


def test_leaves_cut_from_the_end_are_caught_by_the_signed_checkpoint(golden, tmp_path):
    path = copy_of(golden, tmp_path)
    db = sqlite3.connect(path)
    (size,) = db.execute("SELECT max(size) FROM log_checkpoints").fetchone()
    keep = size - 3
    db.execute("DELETE FROM log_leaves WHERE idx >= ?", (keep,))
    db.execute("DELETE FROM log_nodes WHERE ((idx + 1) << level) > ?", (keep,))
    db.execute("UPDATE log_state SET size = ?", (keep,))
    db.commit()
    db.close()
    report = verify_file(path, tmp_path)
    assert ("checkpoint-inconsistent", "log_checkpoints", f"size={size}") in {
        (f.kind, f.table, f.key) for f in report.findings}


# --------------------------------------------------------------------------- the command


def cli() -> typer.Typer:
    app = typer.Typer()
    app.callback()(lambda: None)  # keep "verify" a subcommand, as in teleledger's own app
    cli_verify.register(app)
    return app


def env(tmp_path: Path, path: Path) -> dict[str, str]:
    return {"TELELEDGER_HOME": str(tmp_path / "home"), "TELELEDGER_DATABASE_URL": f"sqlite:///{path}",
            "TELELEDGER_MASTER_KEY": MASTER_KEY, "TELELEDGER_ENVIRONMENT": "test",
            "TELELEDGER_DEMO_DATA": "false", "COLUMNS": "250"}


def invoke(tmp_path: Path, path: Path, *args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli(), ["verify", *args], env=env(tmp_path, path))


def test_the_command_on_a_clean_database_exits_0_prints_a_summary_and_writes_nothing(golden, tmp_path):
    path = copy_of(golden, tmp_path)
    before = hashlib.sha256(path.read_bytes()).digest()
    result = invoke(tmp_path, path)
    assert result.exit_code == 0, result.output
    assert "checked" in result.stdout and "checkpoints" in result.stdout and "OK" in result.stdout
    assert "Traceback" not in result.output
    assert hashlib.sha256(path.read_bytes()).digest() == before
    assert not Path(f"{path}-wal").exists() or Path(f"{path}-wal").stat().st_size == 0


def test_the_command_names_the_tampered_row_and_exits_1(golden, tmp_path):
    path = copy_of(golden, tmp_path)
    table, key = mutate(path, "log_leaves.leaf", random.Random(7))
    result = invoke(tmp_path, path)
    assert result.exit_code == 1, result.output
    assert "TAMPERED" in result.stdout and "leaf-hash-mismatch" in result.stdout
    assert table in result.stdout and key in result.stdout


def test_the_command_with_flush_integrates_the_queue_first(golden, tmp_path):
    path = copy_of(golden, tmp_path)
    result = invoke(tmp_path, path, "--flush")
    assert result.exit_code == 0, result.output
    assert "(0 queued)" in result.stdout


def test_the_command_refuses_a_database_that_is_not_teleledgers(tmp_path):
    path = tmp_path / "other.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
    db.commit()
    db.close()
    result = invoke(tmp_path, path)
    assert result.exit_code == 2
    assert "not a teleledger database" in result.output and "Traceback" not in result.output


def test_the_command_refuses_a_newer_schema_a_missing_file_and_random_bytes(golden, tmp_path):
    newer = copy_of(golden, tmp_path, "newer.db")
    db = sqlite3.connect(newer)
    db.execute("UPDATE alembic_version SET version_num = '0099'")
    db.commit()
    db.close()
    result = invoke(tmp_path, newer)
    assert result.exit_code == 2 and "newer than this teleledger" in result.output

    result = invoke(tmp_path, tmp_path / "nothing.db")
    assert result.exit_code == 2 and "no database" in result.output
    assert not (tmp_path / "nothing.db").exists()

    junk = tmp_path / "junk.db"
    junk.write_bytes(random.Random(1).randbytes(8192))
    result = invoke(tmp_path, junk)
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_the_command_with_the_wrong_master_key_says_so(golden, tmp_path):
    path = copy_of(golden, tmp_path)
    result = CliRunner().invoke(cli(), ["verify"], env={
        **env(tmp_path, path), "TELELEDGER_MASTER_KEY": base64.b64encode(b"x" * 32).decode()})
    assert result.exit_code == 2 and "master key" in result.output


def test_verify_reads_one_snapshot_and_never_blocks_a_writer(golden, tmp_path):
    # verify holds one read transaction: a writer committing meanwhile is not blocked
    path = copy_of(golden, tmp_path)
    node = build(make_settings(tmp_path, f"sqlite:///{path}"), migrate_schema=False)
    calls = []

    def progress(phase: str, done: int, total: int) -> None:
        if phase == "leaves" and not calls:
            with node.engine.begin() as conn:  # BEGIN IMMEDIATE: would time out if verify held the lock
                conn.execute(text("DELETE FROM access_events WHERE id = (SELECT max(id) FROM access_events)"))
        calls.append(phase)

    try:
        report = verify_node(node, progress=progress)
    finally:
        node.log.close()
        node.close()
    assert report.ok, report.findings  # the deletion happened after the snapshot was taken
    assert {"leaves", "versions", "access events"} <= set(calls)
