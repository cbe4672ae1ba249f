"""The FHIR resource repository: versions, encryption at rest, index maintenance.

It works inside a caller's transaction (a ``Connection`` from the unit of work) and knows
nothing of HTTP or of who is asking: authorization happens in ``records.service`` through the
policy decision point, before and after calling here.

The single-resource paths (read, create, update, delete) run fixed SQL texts through
``storage.db.run``: one instance interaction is a dozen short statements, and building and
compiling them with SQLAlchemy cost more than executing them. Queries whose shape depends on
the request (bulk loads, history) stay SQLAlchemy Core.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from types import EllipsisType

import orjson
from sqlalchemy import Connection, and_, bindparam, func, select, tuple_, update

from teleledger.core.crypto import KeyedHash, open_sealed, seal
from teleledger.core.errors import Conflict, Gone, NotFound, PreconditionFailed
from teleledger.fhir import compartment
from teleledger.records.index import build_rows
from teleledger.records.keys import KeyRing, key_id_for
from teleledger.storage import tables as t
from teleledger.storage.db import run, run_many

Clock = Callable[[], int]  # µs since epoch, UTC


def system_clock() -> int:
    return time.time_ns() // 1000


def instant(us: int) -> str:
    """FHIR ``instant`` text for a µs timestamp (UTC, millisecond precision)."""
    dt = datetime.fromtimestamp(us / 1_000_000, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


@dataclass(slots=True)
class Stored:
    res_type: str
    res_id: str
    version: int
    last_updated: int
    method: str
    body: dict | None  # None for a delete marker

    @property
    def etag(self) -> str:
        return f'W/"{self.version}"'

    @property
    def deleted(self) -> bool:
        return self.body is None


def same_content(a: dict, b: dict) -> bool:
    """Equal apart from the server-managed meta.versionId / meta.lastUpdated."""

    def strip(res: dict) -> dict:
        meta = {k: v for k, v in (res.get("meta") or {}).items() if k not in ("versionId", "lastUpdated")}
        return {**{k: v for k, v in res.items() if k != "meta"}, "meta": meta}

    return strip(a) == strip(b)


def _aad(res_type: str, res_id: str, version: int) -> bytes:
    return f"{res_type}/{res_id}/_history/{version}".encode()


def _insert_sql(table) -> str:  # type: ignore[no-untyped-def]
    names = [c.name for c in table.columns]
    return f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ({', '.join('?' for _ in names)})"


# the columns of each index table, in table order (``records.index.build_rows`` rows follow them)
INDEX_COLUMNS = {table.name: tuple(c.name for c in table.columns) for table in t.INDEX_TABLES}
_INSERT_INDEX = {table.name: _insert_sql(table) for table in t.INDEX_TABLES}
_DROP_INDEX = tuple(f"DELETE FROM {table.name} WHERE res_type = ? AND res_id = ?"
                    for table in (*t.INDEX_TABLES, t.resource_compartments))
_INSERT_COMPARTMENT = "INSERT INTO resource_compartments (res_type, res_id, patient_id) VALUES (?, ?, ?)"
_INSERT_VERSION = ("INSERT INTO resource_versions (res_type, res_id, version, last_updated, method, key_id, body) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?)")
_INSERT_CURRENT = "INSERT INTO resources (res_type, res_id, version, last_updated, deleted) VALUES (?, ?, ?, ?, ?)"
_UPDATE_CURRENT = "UPDATE resources SET version = ?, last_updated = ?, deleted = ? WHERE res_type = ? AND res_id = ?"
_SELECT_CURRENT = "SELECT version, last_updated, deleted FROM resources WHERE res_type = ? AND res_id = ?"
# the current version with its row of resource_versions (every resources row has one: a delete
# writes a marker version), in one statement
_SELECT_CURRENT_VERSION = (
    "SELECT r.version, r.last_updated, v.method, v.key_id, v.body FROM resources r "
    "JOIN resource_versions v ON v.res_type = r.res_type AND v.res_id = r.res_id AND v.version = r.version "
    "WHERE r.res_type = ? AND r.res_id = ?"
)
_SELECT_VERSION = ("SELECT last_updated, method, key_id, body FROM resource_versions "
                   "WHERE res_type = ? AND res_id = ? AND version = ?")


class ResourceStore:
    def __init__(self, keyring: KeyRing, index_hash: KeyedHash, *, clock: Clock = system_clock,
                 on_change: Callable[[Connection, list[Stored]], None] | None = None) -> None:
        self.keys = keyring
        self.h = index_hash
        self.clock = clock
        # every version written is handed to on_change in the same transaction (the change
        # entries of the transparency log): no write path can skip it
        self.on_change = on_change

    def _changed(self, conn: Connection, stored: list[Stored]) -> None:
        if self.on_change is not None and stored:
            self.on_change(conn, stored)

    # ---- writes -----------------------------------------------------------------------------

    def new_id(self) -> str:
        return str(uuid.uuid4())

    def create(self, conn: Connection, resource: dict, *, res_id: str | None = None) -> Stored:
        res_type = resource["resourceType"]
        # a fresh random UUID cannot exist yet (the primary key would refuse it anyway): only an
        # id chosen by the caller is looked up
        if res_id is not None and run(conn, _SELECT_CURRENT, (res_type, res_id)).fetchone() is not None:
            raise Conflict(f"{res_type}/{res_id} already exists")
        res_id = res_id or self.new_id()
        return self._write(conn, resource, res_type, res_id, version=1, method="create", previous=None)

    def update(self, conn: Connection, resource: dict, res_id: str, *, if_match: int | None = None,
               current: Stored | None | EllipsisType = ...) -> tuple[Stored, bool]:
        """Update (or create with a client id when absent). Returns (stored, created).

        ``current``: what ``current(conn, ..., for_update=True)`` returned for this resource in
        this transaction, when the caller already read it (saves reading it again).
        """
        res_type = resource["resourceType"]
        cur = self.current(conn, res_type, res_id, for_update=True) if current is ... else current
        if if_match is not None:
            if cur is None or cur.version != if_match:
                found = "absent" if cur is None else f"version {cur.version}"
                raise PreconditionFailed(f"If-Match expected version {if_match} of {res_type}/{res_id}, found {found}")
        if cur is None:
            return self._write(conn, resource, res_type, res_id, version=1, method="create", previous=None), True
        return self._write(conn, resource, res_type, res_id, version=cur.version + 1, method="update", previous=cur), False

    def delete(self, conn: Connection, res_type: str, res_id: str, *,
               current: Stored | None | EllipsisType = ...) -> Stored | None:
        """Mark deleted (a new version without body). None when there was nothing to delete.

        ``current``: as for ``update``.
        """
        cur = self.current(conn, res_type, res_id, for_update=True) if current is ... else current
        if cur is None or cur.deleted:
            return None
        version, now = cur.version + 1, self._tick(cur.last_updated)
        run(conn, _INSERT_VERSION, (res_type, res_id, version, now, "delete", "", None))
        self._set_current(conn, res_type, res_id, version, now, deleted=True, existed=True)
        self._drop_index(conn, res_type, res_id)
        stored = Stored(res_type, res_id, version, now, "delete", None)
        self._changed(conn, [stored])
        return stored

    def _tick(self, previous: int | None) -> int:
        now = self.clock()
        # versions of one resource must be strictly ordered in time even if the clock steps back
        return max(now, previous + 1) if previous is not None else now

    def _write(self, conn, resource, res_type, res_id, *, version, method, previous) -> Stored:  # type: ignore[no-untyped-def]
        now = self._tick(previous.last_updated if previous else None)
        resource["id"] = res_id
        meta = dict(resource.get("meta") or {})
        meta["versionId"] = str(version)
        meta["lastUpdated"] = instant(now)
        resource["meta"] = meta
        patients = compartment.patient_ids(resource)
        key_id = key_id_for(patients)
        aead = self.keys.for_write(conn, key_id)
        body = seal(aead, orjson.dumps(resource), _aad(res_type, res_id, version))
        run(conn, _INSERT_VERSION, (res_type, res_id, version, now, method, key_id, body))
        self._set_current(conn, res_type, res_id, version, now, deleted=False, existed=previous is not None)
        if previous is not None:
            self._drop_index(conn, res_type, res_id)
        self._index(conn, resource, res_type, res_id, patients)
        stored = Stored(res_type, res_id, version, now, method, resource)
        self._changed(conn, [stored])
        return stored

    def put_many(self, conn: Connection, resources: Sequence[dict]) -> list[tuple[Stored, str]]:
        """Write many already-validated resources with their own ids in bulk (import path).

        Returns (stored, status) with status ``created``, ``updated`` or ``unchanged``: a resource
        whose content equals the current version gets no new version, so re-import is idempotent.
        """
        keys = [(r["resourceType"], r["id"]) for r in resources]
        r, v = t.resources, t.resource_versions
        current: dict[tuple[str, str], Stored] = {}
        existing: dict[tuple[str, str], tuple[int, int, bool]] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            for row in conn.execute(select(r.c.res_type, r.c.res_id, r.c.version, r.c.last_updated, r.c.deleted)
                                    .where(tuple_(r.c.res_type, r.c.res_id).in_(chunk))):
                existing[(row.res_type, row.res_id)] = (row.version, row.last_updated, bool(row.deleted))
        live = [k for k, (_, _, deleted) in existing.items() if not deleted]
        current = self.load_current(conn, live)
        out: list[tuple[Stored, str]] = []
        versions, inserts, updates, drops = [], [], [], []
        index_rows: dict[str, list[tuple]] = {}
        comp_rows: list[tuple[str, str, str]] = []
        seen: set[tuple[str, str]] = set()
        for res in resources:
            key = (res["resourceType"], res["id"])
            if key in seen:
                raise Conflict(f"{key[0]}/{key[1]} appears twice in one import file")
            seen.add(key)
            cur = current.get(key)
            if cur is not None and cur.body is not None and same_content(cur.body, res):
                out.append((cur, "unchanged"))
                continue
            prev = existing.get(key)
            version = prev[0] + 1 if prev else 1
            now = self._tick(prev[1] if prev else None)
            res_type, res_id = key
            res = dict(res)
            meta = dict(res.get("meta") or {})
            meta["versionId"] = str(version)
            meta["lastUpdated"] = instant(now)
            res["meta"] = meta
            patients = compartment.patient_ids(res)
            key_id = key_id_for(patients)
            body = seal(self.keys.for_write(conn, key_id), orjson.dumps(res), _aad(res_type, res_id, version))
            method = "update" if prev else "create"
            versions.append({"res_type": res_type, "res_id": res_id, "version": version, "last_updated": now,
                             "method": method, "key_id": key_id, "body": body})
            if prev:
                updates.append({"b_type": res_type, "b_id": res_id, "b_version": version, "b_now": now})
                drops.append(key)
            else:
                inserts.append({"res_type": res_type, "res_id": res_id, "version": version, "last_updated": now,
                                "deleted": False})
            for table, rows in build_rows(res, res_type, res_id, self.h).items():
                index_rows.setdefault(table, []).extend(rows)
            comp_rows += [(res_type, res_id, p) for p in patients]
            out.append((Stored(res_type, res_id, version, now, method, res), "updated" if prev else "created"))
        for res_type, res_id in drops:
            self._drop_index(conn, res_type, res_id)
        if versions:
            conn.execute(v.insert(), versions)
        if inserts:
            conn.execute(r.insert(), inserts)
        if updates:
            conn.execute(
                update(r)
                .where(r.c.res_type == bindparam("b_type"), r.c.res_id == bindparam("b_id"))
                .values(version=bindparam("b_version"), last_updated=bindparam("b_now"), deleted=False),
                updates,
            )
        for name, sql in _INSERT_INDEX.items():
            rows = index_rows.get(name)
            if rows:
                run_many(conn, sql, rows)
        run_many(conn, _INSERT_COMPARTMENT, comp_rows)
        self._changed(conn, [st for st, status in out if status != "unchanged"])
        return out

    def _set_current(self, conn, res_type, res_id, version, now, *, deleted, existed) -> None:  # type: ignore[no-untyped-def]
        if existed:
            run(conn, _UPDATE_CURRENT, (version, now, deleted, res_type, res_id))
        else:
            run(conn, _INSERT_CURRENT, (res_type, res_id, version, now, deleted))

    def _index(self, conn: Connection, resource: dict, res_type: str, res_id: str, patients: Iterable[str]) -> None:
        rows = build_rows(resource, res_type, res_id, self.h)
        for name, sql in _INSERT_INDEX.items():
            batch = rows.get(name)
            if batch:
                run_many(conn, sql, batch)
        run_many(conn, _INSERT_COMPARTMENT, [(res_type, res_id, p) for p in patients])

    def _drop_index(self, conn: Connection, res_type: str, res_id: str) -> None:
        # every table, not only those the old version has rows in: rows written by an older
        # definition of the search parameters must not outlive the version they indexed (an
        # empty table costs one index probe)
        for sql in _DROP_INDEX:
            run(conn, sql, (res_type, res_id))

    # ---- reads ------------------------------------------------------------------------------

    @dataclass(slots=True)
    class _Cur:
        version: int
        last_updated: int
        deleted: bool

    def _current(self, conn: Connection, res_type: str, res_id: str, *, for_update: bool = False) -> _Cur | None:
        sql = _SELECT_CURRENT + (" FOR UPDATE" if for_update and conn.dialect.name == "postgresql" else "")
        row = run(conn, sql, (res_type, res_id)).fetchone()
        return None if row is None else self._Cur(row[0], row[1], bool(row[2]))

    def current(self, conn: Connection, res_type: str, res_id: str, *, for_update: bool = False) -> Stored | None:
        """The current version (a delete marker, ``body`` None, when the resource was deleted);
        None when the resource never existed. ``for_update`` locks the resource's row until the
        transaction ends (PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` already holds the write lock)."""
        sql = _SELECT_CURRENT_VERSION
        if for_update and conn.dialect.name == "postgresql":
            sql += " FOR UPDATE OF r"
        row = run(conn, sql, (res_type, res_id)).fetchone()
        if row is None:
            return None
        version, last_updated, method, key_id, sealed = row
        if sealed is None:
            return Stored(res_type, res_id, version, last_updated, method, None)
        return Stored(res_type, res_id, version, last_updated, method,
                      self._open(conn, res_type, res_id, version, key_id, sealed))

    def exists(self, conn: Connection, res_type: str, res_id: str) -> bool:
        cur = self._current(conn, res_type, res_id)
        return cur is not None and not cur.deleted

    def _open(self, conn: Connection, res_type: str, res_id: str, version: int, key_id: str, sealed: bytes) -> dict:
        aead = self.keys.for_read(conn, key_id)
        plain = open_sealed(aead, bytes(sealed), _aad(res_type, res_id, version), what=f"{res_type}/{res_id}")
        return orjson.loads(plain)

    def _decode(self, conn: Connection, row) -> Stored:  # type: ignore[no-untyped-def]
        if row.body is None:
            return Stored(row.res_type, row.res_id, row.version, row.last_updated, row.method, None)
        body = self._open(conn, row.res_type, row.res_id, row.version, row.key_id, row.body)
        return Stored(row.res_type, row.res_id, row.version, row.last_updated, row.method, body)

    _COLS = (
        t.resource_versions.c.res_type,
        t.resource_versions.c.res_id,
        t.resource_versions.c.version,
        t.resource_versions.c.last_updated,
        t.resource_versions.c.method,
        t.resource_versions.c.key_id,
        t.resource_versions.c.body,
    )

    def read(self, conn: Connection, res_type: str, res_id: str) -> Stored:
        cur = self.current(conn, res_type, res_id)
        if cur is None:
            raise NotFound(f"{res_type}/{res_id} is not known")
        if cur.deleted:
            raise Gone(f"{res_type}/{res_id} was deleted")
        return cur

    def vread(self, conn: Connection, res_type: str, res_id: str, version: int) -> Stored:
        row = run(conn, _SELECT_VERSION, (res_type, res_id, version)).fetchone()
        if row is None:
            raise NotFound(f"{res_type}/{res_id} has no version {version}")
        last_updated, method, key_id, sealed = row
        if sealed is None:
            raise Gone(f"version {version} of {res_type}/{res_id} is a deletion")
        return Stored(res_type, res_id, version, last_updated, method,
                      self._open(conn, res_type, res_id, version, key_id, sealed))

    def load_current(self, conn: Connection, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], Stored]:
        """Current, non-deleted versions of many resources in one query."""
        if not keys:
            return {}
        r, v = t.resources, t.resource_versions
        out: dict[tuple[str, str], Stored] = {}
        for chunk_start in range(0, len(keys), 500):
            chunk = list(keys[chunk_start : chunk_start + 500])
            q = (
                select(*self._COLS)
                .select_from(
                    r.join(v, and_(v.c.res_type == r.c.res_type, v.c.res_id == r.c.res_id, v.c.version == r.c.version))
                )
                .where(tuple_(r.c.res_type, r.c.res_id).in_(chunk), r.c.deleted.is_(False))
            )
            for row in conn.execute(q):
                out[(row.res_type, row.res_id)] = self._decode(conn, row)
        return out

    def history(
        self,
        conn: Connection,
        res_type: str | None,
        res_id: str | None,
        *,
        since: int | None,
        count: int,
        offset: int,
        restrict=None,  # type: ignore[no-untyped-def]
    ) -> tuple[int, list[Stored]]:
        v = t.resource_versions
        conds = []
        if res_type:
            conds.append(v.c.res_type == res_type)
        if res_id:
            conds.append(v.c.res_id == res_id)
        if since is not None:
            conds.append(v.c.last_updated >= since)
        if restrict is not None:
            conds.append(restrict(v.c.res_type, v.c.res_id))
        total = conn.execute(select(func.count()).select_from(v).where(*conds)).scalar_one()
        rows = conn.execute(
            select(*self._COLS).where(*conds).order_by(v.c.last_updated.desc(), v.c.version.desc()).limit(count).offset(offset)
        ).all()
        return total, [self._decode(conn, row) for row in rows]
