"""The baseline of the CRUD load benchmark: the least a FHIR-shaped JSON store can do.

    python bench/baseline_server.py --port 8100 [--db /tmp/baseline.db]

FastAPI + SQLite storing each resource's raw JSON in one row, with POST /fhir/{type} and
GET/PUT/DELETE /fhir/{type}/{id}. No authentication, no validation, no history, no search
index, no encryption. It runs with the server settings teleledger runs with (uvicorn, as many
worker processes as teleledger — ``--workers`` —, uvloop/httptools when installed, no access log; SQLite in WAL mode with
``synchronous=NORMAL``, ``BEGIN IMMEDIATE`` for writes, blocking database calls in the thread
pool), so that ``bench/crud_load.py`` can report teleledger's throughput as a ratio of it.

It must never be used for anything but that comparison: it stores whatever it is sent.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import tempfile
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path

import orjson
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

FHIR_JSON = "application/fhir+json"

SCHEMA = """
CREATE TABLE IF NOT EXISTS resources (
    res_type TEXT NOT NULL,
    res_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (res_type, res_id)
) WITHOUT ROWID
"""


def _instant() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _outcome(status: int, code: str, text: str) -> Response:
    body = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": code, "diagnostics": text}]}
    return Response(orjson.dumps(body), status_code=status, media_type=FHIR_JSON)


class Db:
    """One SQLite connection per thread-pool thread (sqlite3 connections are not shared)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        with self.conn() as c:
            c.execute(SCHEMA)

    def conn(self) -> sqlite3.Connection:
        c = getattr(self._local, "conn", None)
        if c is None:
            c = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            c.execute("PRAGMA journal_mode=WAL")
            c.execute("PRAGMA synchronous=NORMAL")
            c.execute("PRAGMA busy_timeout=30000")
            self._local.conn = c
        return c

    def _write(self, sql: str, params: tuple) -> int:
        c = self.conn()
        c.execute("BEGIN IMMEDIATE")
        try:
            n = c.execute(sql, params).rowcount
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        return n

    def insert(self, res_type: str, res_id: str, body: bytes) -> None:
        self._write("INSERT INTO resources (res_type, res_id, version, body) VALUES (?, ?, 1, ?)",
                    (res_type, res_id, body))

    def read(self, res_type: str, res_id: str) -> tuple[int, bytes] | None:
        return self.conn().execute("SELECT version, body FROM resources WHERE res_type = ? AND res_id = ?",
                                   (res_type, res_id)).fetchone()

    def upsert(self, res_type: str, res_id: str, resource: dict) -> tuple[int, bytes, bool]:
        c = self.conn()
        c.execute("BEGIN IMMEDIATE")
        try:
            row = c.execute("SELECT version FROM resources WHERE res_type = ? AND res_id = ?",
                            (res_type, res_id)).fetchone()
            version = 1 if row is None else row[0] + 1
            resource["meta"] = {"versionId": str(version), "lastUpdated": _instant()}
            body = orjson.dumps(resource)
            c.execute("INSERT OR REPLACE INTO resources (res_type, res_id, version, body) VALUES (?, ?, ?, ?)",
                      (res_type, res_id, version, body))
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        return version, body, row is None

    def delete(self, res_type: str, res_id: str) -> int:
        return self._write("DELETE FROM resources WHERE res_type = ? AND res_id = ?", (res_type, res_id))


def create_app(db_path: Path) -> FastAPI:
    app = FastAPI(title="baseline", docs_url=None, redoc_url=None, openapi_url=None)
    db = Db(db_path)

    def resource_response(body: bytes, version: int, status: int, location: str | None = None) -> Response:
        headers = {"ETag": f'W/"{version}"'}
        if location:
            headers["Location"] = location
        return Response(body, status_code=status, media_type=FHIR_JSON, headers=headers)

    async def parse(request: Request) -> dict | Response:
        try:
            resource = orjson.loads(await request.body())
        except orjson.JSONDecodeError as exc:
            return _outcome(400, "invalid", f"malformed JSON: {exc.msg}")
        if not isinstance(resource, dict):
            return _outcome(400, "invalid", "the body must be a JSON object")
        return resource

    @app.post("/fhir/{res_type}")
    async def create(res_type: str, request: Request) -> Response:
        resource = await parse(request)
        if isinstance(resource, Response):
            return resource
        res_id = str(uuid.uuid4())
        resource["id"] = res_id
        resource["meta"] = {"versionId": "1", "lastUpdated": _instant()}
        body = orjson.dumps(resource)
        await run_in_threadpool(db.insert, res_type, res_id, body)
        return resource_response(body, 1, 201, f"/fhir/{res_type}/{res_id}/_history/1")

    @app.get("/fhir/{res_type}/{res_id}")
    async def read(res_type: str, res_id: str) -> Response:
        row = await run_in_threadpool(db.read, res_type, res_id)
        if row is None:
            return _outcome(404, "not-found", f"{res_type}/{res_id} is not known")
        return resource_response(row[1], row[0], 200)

    @app.put("/fhir/{res_type}/{res_id}")
    async def update(res_type: str, res_id: str, request: Request) -> Response:
        resource = await parse(request)
        if isinstance(resource, Response):
            return resource
        resource["id"] = res_id
        version, body, created = await run_in_threadpool(db.upsert, res_type, res_id, resource)
        return resource_response(body, version, 201 if created else 200)

    @app.delete("/fhir/{res_type}/{res_id}")
    async def delete(res_type: str, res_id: str) -> Response:
        await run_in_threadpool(db.delete, res_type, res_id)
        return Response(status_code=204)

    return app


def app_from_env() -> FastAPI:
    """The app of one worker process (``--workers`` > 1): the database path is in the environment."""
    return create_app(Path(os.environ["BASELINE_DB"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--db", type=Path, default=None, help="SQLite file (default: a fresh temporary one)")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (default 1)")
    args = parser.parse_args()
    db = args.db or Path(tempfile.mkdtemp(prefix="baseline-")) / "baseline.db"
    # the same uvicorn settings as `teleledger serve` (teleledger.cli.serve)
    if args.workers > 1:
        Db(db)  # create the schema once, before the workers race to
        os.environ["BASELINE_DB"] = str(db)
        uvicorn.run("baseline_server:app_from_env", factory=True, app_dir=str(Path(__file__).parent),
                    workers=args.workers, host=args.host, port=args.port, log_level="warning", access_log=False)
        return
    uvicorn.run(create_app(db), host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
