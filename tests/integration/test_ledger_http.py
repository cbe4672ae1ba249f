"""``/ledger/*`` over HTTP: RFC 6962-shaped JSON, proofs a client can verify, and a 400/404
OperationOutcome for every bad question — on a SQLite file and on PostgreSQL (when
``TELELEDGER_TEST_POSTGRES_URL`` is set; visible skip otherwise)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from teleledger.ledger.log import merkle
from teleledger.ledger.log.entry import encode_change
from teleledger.ledger.log.merkle import leaf_hash
from teleledger.ledger.log.note import Ed25519Signer, Ed25519Verifier, open_checkpoint
from teleledger.ledger.log.service import TransparencyLog
from teleledger.storage.db import UnitOfWork, make_engine
from teleledger.storage.tables import metadata
from teleledger.web import errors
from teleledger.web.api.ledger import router
from tests.conftest import database_url

ORIGIN = "teleledger.test/http"
SIGNER = Ed25519Signer.from_seed(ORIGIN, b"\x2a" * 32)
SIZE = 21
ENTRIES = [
    encode_change(timestamp_us=1_750_000_000_000_000 + i, method="create", resource_type="Encounter",
                  resource_id=f"e-{i}", version=1, content_hmac=bytes([i]) * 32)
    for i in range(SIZE)
]
HASHES = [leaf_hash(e) for e in ENTRIES]


@pytest.fixture
def engine(backend: str, tmp_path: Path) -> Iterator[Engine]:  # ``backend``: tests/conftest.py
    eng = make_engine(database_url(backend, tmp_path))
    metadata.create_all(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def log(engine: Engine) -> Iterator[TransparencyLog]:
    tlog = TransparencyLog(engine, SIGNER)
    yield tlog
    tlog.close()


def app_for(log: TransparencyLog) -> FastAPI:
    app = FastAPI()
    app.state.node = SimpleNamespace(log=log)
    errors.install(app)
    app.include_router(router)
    return app


@pytest.fixture
def empty_client(log: TransparencyLog) -> Iterator[TestClient]:
    with TestClient(app_for(log), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture
def client(engine: Engine, log: TransparencyLog, empty_client: TestClient) -> TestClient:
    with UnitOfWork(engine) as uow:
        log.append_many(uow.c, ENTRIES)
        uow.commit()
    log.flush()
    return empty_client


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def signed_root(client: TestClient) -> bytes:
    verifier = Ed25519Verifier.from_vkey(client.get("/ledger/public-key").text.strip())
    checkpoint, _ = open_checkpoint(client.get("/ledger/checkpoint").text, [verifier], origin=ORIGIN)
    assert checkpoint.size == SIZE
    return checkpoint.root_hash


# --------------------------------------------------------------------------- good answers


def test_the_checkpoint_is_served_as_text_and_verifies_with_the_public_key(client: TestClient) -> None:
    response = client.get("/ledger/checkpoint")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.text.startswith(f"{ORIGIN}\n{SIZE}\n")
    key = client.get("/ledger/public-key")
    assert key.status_code == 200 and key.headers["content-type"] == "text/plain; charset=utf-8"
    assert key.text == SIGNER.verifier().vkey + "\n"
    assert signed_root(client) == merkle.root_from_leaves(HASHES)


def test_there_is_no_checkpoint_before_the_first_entry(empty_client: TestClient) -> None:
    response = empty_client.get("/ledger/checkpoint")
    assert response.status_code == 404
    assert response.json() == {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "not-found", "diagnostics": "the log has no checkpoint yet"}]}


def test_entries_come_back_with_their_indexes_and_base64_leaf_input(client: TestClient) -> None:
    response = client.get("/ledger/entries", params={"start": 3, "end": 6})
    assert response.status_code == 200
    assert response.json() == {"entries": [{"index": i, "leaf_input": b64(ENTRIES[i])} for i in range(3, 6)]}
    tail = client.get("/ledger/entries?start=19&end=1000").json()["entries"]
    assert [e["index"] for e in tail] == [19, 20]


def test_an_inclusion_proof_by_index_verifies_against_the_checkpoint(client: TestClient) -> None:
    root = signed_root(client)
    for index in (0, 7, 20):
        response = client.get(f"/ledger/proof/inclusion?leaf_index={index}&tree_size={SIZE}")
        assert response.status_code == 200
        body = response.json()
        assert set(body) == {"leaf_index", "audit_path"} and body["leaf_index"] == index
        path = [base64.b64decode(h) for h in body["audit_path"]]
        merkle.verify_inclusion(HASHES[index], index, SIZE, path, root)


def test_an_inclusion_proof_by_hash_finds_the_leaf_and_verifies(client: TestClient) -> None:
    root = signed_root(client)
    index = next(i for i, h in enumerate(HASHES) if "+" in b64(h))  # exercises the '+' handling
    for spelled in (quote(b64(HASHES[index]), safe=""),  # properly escaped
                    b64(HASHES[index]),  # '+' left raw: arrives as a space
                    base64.urlsafe_b64encode(HASHES[index]).decode()):
        response = client.get(f"/ledger/proof/inclusion?hash={spelled}&tree_size={SIZE}")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["leaf_index"] == index
        merkle.verify_inclusion(HASHES[index], index, SIZE, [base64.b64decode(h) for h in body["audit_path"]], root)


def test_a_consistency_proof_verifies_between_two_signed_heads(client: TestClient) -> None:
    old_root = merkle.root_from_leaves(HASHES[:6])
    response = client.get("/ledger/proof/consistency?first=6&second=21")
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"consistency"}
    merkle.verify_consistency(6, SIZE, old_root, signed_root(client),
                              [base64.b64decode(h) for h in body["consistency"]])
    assert client.get("/ledger/proof/consistency?first=21&second=21").json() == {"consistency": []}


# --------------------------------------------------------------------------- bad questions

UNKNOWN = b64(leaf_hash(b"never logged"))


@pytest.mark.parametrize(
    ("query", "status", "diagnostics"),
    [
        # entries
        ("/ledger/entries", 400, "missing query parameter 'start'"),
        ("/ledger/entries?start=0", 400, "missing query parameter 'end'"),
        ("/ledger/entries?start=abc&end=2", 400, "'start' must be a non-negative integer"),
        ("/ledger/entries?start=-1&end=2", 400, "'start' must be a non-negative integer"),
        ("/ledger/entries?start=1.5&end=2", 400, "'start' must be a non-negative integer"),
        ("/ledger/entries?start=0&end=1e3", 400, "'end' must be a non-negative integer"),
        ("/ledger/entries?start=0&end=", 400, "'end' must be a non-negative integer"),
        ("/ledger/entries?start=5&end=2", 400, "must be smaller than end"),
        ("/ledger/entries?start=21&end=30", 400, "beyond the log's size 21"),
        ("/ledger/entries?start=0&end=99999999999999999999", 400, "'end' must be a non-negative integer"),
        ("/ledger/entries?start=0&start=1&end=2", 400, "'start' is given 2 times"),
        # inclusion by index
        ("/ledger/proof/inclusion?leaf_index=x&tree_size=3", 400, "'leaf_index' must be a non-negative integer"),
        ("/ledger/proof/inclusion?leaf_index=1&tree_size=three", 400, "'tree_size' must be a non-negative integer"),
        ("/ledger/proof/inclusion?leaf_index=1", 400, "missing query parameter 'tree_size'"),
        ("/ledger/proof/inclusion?leaf_index=5&tree_size=5", 400, "leaf index 5 is out of range for a tree of size 5"),
        ("/ledger/proof/inclusion?leaf_index=0&tree_size=0", 400, "out of range for a tree of size 0"),
        ("/ledger/proof/inclusion?leaf_index=0&tree_size=22", 400, "tree size 22 is larger than the log's size 21"),
        ("/ledger/proof/inclusion?tree_size=3", 400, "exactly one of 'leaf_index' and 'hash'"),
        (f"/ledger/proof/inclusion?leaf_index=0&hash={quote(UNKNOWN)}&tree_size=3", 400, "exactly one of"),
        # inclusion by hash
        ("/ledger/proof/inclusion?hash=not*base64&tree_size=3", 400, "'hash' is not base64"),
        (f"/ledger/proof/inclusion?hash={quote(b64(bytes(31)))}&tree_size=3", 400, "is 31 bytes, expected a 32-byte"),
        (f"/ledger/proof/inclusion?hash={quote(UNKNOWN)}&tree_size=21", 404, "no leaf with hash"),
        (f"/ledger/proof/inclusion?hash={quote(b64(HASHES[9]))}&tree_size=9", 404, "in the tree of size 9"),
        (f"/ledger/proof/inclusion?hash={quote(b64(HASHES[0]))}&tree_size=50", 400, "larger than the log's size"),
        # consistency
        ("/ledger/proof/consistency?first=6&second=3", 400, "first tree size 6 is larger than second tree size 3"),
        ("/ledger/proof/consistency?first=3&second=22", 400, "tree size 22 is larger than the log's size 21"),
        ("/ledger/proof/consistency?first=abc&second=3", 400, "'first' must be a non-negative integer"),
        ("/ledger/proof/consistency?first=-3&second=3", 400, "'first' must be a non-negative integer"),
        ("/ledger/proof/consistency?first=3", 400, "missing query parameter 'second'"),
    ],
)
def test_every_bad_question_is_an_operation_outcome(
    client: TestClient, query: str, status: int, diagnostics: str
) -> None:
    response = client.get(query)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    (issue,) = body["issue"]
    assert issue["severity"] == "error"
    assert issue["code"] == ("invalid" if status == 400 else "not-found")
    assert diagnostics in issue["diagnostics"]
