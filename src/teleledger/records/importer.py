"""Bulk import of FHIR data: a Bundle (JSON) or a folder of bulk-data NDJSON files.

Each file is imported in one unit of work: it is stored whole or not at all, and an error names
the file and line. Resources keep their ids, so importing the same data again changes nothing
(a resource whose content is unchanged gets no new version). Files are ordered so that the
targets of conditional references (``Practitioner?identifier=...``) are imported first; those
references are rewritten to ``Type/id`` on the way in, as the Synthea data needs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import orjson
from sqlalchemy import Connection

from teleledger.core.errors import InvalidInput, TeleledgerError
from teleledger.fhir.validation import validate
from teleledger.policy.model import Principal
from teleledger.records.audit import touched
from teleledger.records.bundles import BundleProcessor, rewrite_references
from teleledger.records.service import RecordsService
from teleledger.storage.db import UnitOfWork

# targets of references first; the rest in name order
FIRST = ("Organization", "Location", "Practitioner", "PractitionerRole", "Medication", "Patient", "RelatedPerson")
_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
CHUNK = 1000
OFFLOAD_BYTES = 512 * 1024
# a cheap test on the raw line: only lines with a conditional reference need the rewrite walk
_CONDITIONAL_REF = re.compile(rb'"reference"\s*:\s*"[^"]*\?')


class ImportError_(TeleledgerError):
    """An import file was rejected; nothing from it was stored."""

    status = 400
    issue_code = "invalid"


@dataclass
class FileResult:
    path: str
    resources: int = 0
    created: int = 0
    updated: int = 0
    unchanged: int = 0


@dataclass
class ImportReport:
    files: list[FileResult] = field(default_factory=list)

    @property
    def resources(self) -> int:
        return sum(f.resources for f in self.files)


def _file_type(path: Path) -> str:
    return path.name.split(".", 1)[0]


def ordered_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise ImportError_(f"{root} is neither a file nor a folder")
    files = sorted(p for p in root.iterdir() if p.suffix in (".ndjson", ".json") and p.is_file())
    if not files:
        raise ImportError_(f"{root} holds no .ndjson or .json files")
    rank = {t: i for i, t in enumerate(FIRST)}
    return sorted(files, key=lambda p: (rank.get(_file_type(p), len(FIRST)), p.name))


def count_lines(path: Path) -> int:
    if path.suffix != ".ndjson":
        return 1
    with path.open("rb") as fh:
        return sum(1 for line in fh if line.strip())


def validate_lines(lines: list[tuple[int, bytes]]) -> tuple[int, str] | None:
    """First (line, message) that fails FHIR validation, or None. Runs in the validator process."""
    for lineno, raw in lines:
        try:
            validate(orjson.loads(raw), raw=raw)
        except TeleledgerError as exc:
            return lineno, exc.message
    return None


class _Validator:
    """Validation (about half of an import's CPU time) runs in a second process while this one
    encrypts, indexes and writes; the file's transaction commits only after every answer is in.
    Where no second process can be started it validates inline."""

    def __init__(self) -> None:
        try:
            self._pool: ProcessPoolExecutor | None = ProcessPoolExecutor(1, mp_context=get_context("spawn"))
        except (OSError, NotImplementedError):
            self._pool = None

    def submit(self, lines: list[tuple[int, bytes]]) -> Future:
        if self._pool is not None:
            try:
                return self._pool.submit(validate_lines, lines)
            except (BrokenProcessPool, RuntimeError):
                self._pool = None
        done: Future = Future()
        done.set_result(validate_lines(lines))
        return done

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class Importer:
    def __init__(self, records: RecordsService, principal: Principal) -> None:
        self.records = records
        self.principal = principal
        self._resolved: dict[str, str] = {}
        self.__validator: _Validator | None = None

    def warm_up(self) -> None:
        """Start the validator process now, so its start-up overlaps the first (small) files."""
        self._validator.submit([])

    def run(self, root: Path, *, progress: Callable[[int], None] | None = None) -> ImportReport:
        report = ImportReport()
        self.warm_up()
        try:
            for path in ordered_files(root):
                report.files.append(self.import_file(path, progress=progress))
        finally:
            self.close()
        return report

    def import_file(self, path: Path, *, progress: Callable[[int], None] | None = None) -> FileResult:
        if path.suffix == ".json":
            return self._import_bundle(path)
        result = FileResult(str(path))
        # resolutions made inside a transaction that rolls back must not be remembered
        resolved_before = dict(self._resolved)
        # small files validate inline: shipping them to the validator process costs more than it saves
        offload = path.stat().st_size > OFFLOAD_BYTES
        try:
            with UnitOfWork(self.records.engine) as uow:
                batch: list[tuple[int, dict]] = []
                raws: list[tuple[int, bytes]] = []
                written: list = []
                checks = []
                for lineno, raw, resource in self._ndjson(path):
                    batch.append((lineno, self._prepare(uow.c, lineno, path, raw, resource, validated=not offload)))
                    if offload:
                        raws.append((lineno, raw))
                    if len(batch) >= CHUNK:
                        if raws:
                            checks.append((self._validator.submit(raws), raws))
                        written += self._flush(uow.c, path, batch, result, progress)
                        batch, raws = [], []
                if raws:
                    checks.append((self._validator.submit(raws), raws))
                written += self._flush(uow.c, path, batch, result, progress)
                # nothing commits before every line of the file has passed validation
                for check, lines in checks:
                    try:
                        failure = check.result()
                    except BrokenProcessPool:
                        # the validator process died (killed, out of memory): validate here instead
                        failure = validate_lines(lines)
                    if failure is not None:
                        raise ImportError_(f"{path.name} line {failure[0]}: {failure[1]}")
                if self.records.auditor is not None and written:
                    self.records.auditor.access(uow.c, self.principal, "import", touched(written))
                uow.commit()
        except BaseException:
            self._resolved = resolved_before
            raise
        return result

    @property
    def _validator(self) -> _Validator:
        if self.__validator is None:
            self.__validator = _Validator()
        return self.__validator

    def close(self) -> None:
        if self.__validator is not None:
            self.__validator.close()
            self.__validator = None

    def _prepare(self, conn: Connection, lineno: int, path: Path, raw: bytes | None, resource: object, *,
                 validated: bool = True) -> dict:
        try:
            if not isinstance(resource, dict):
                raise InvalidInput("each line must be a JSON object (a FHIR resource)")
            if not isinstance(resource.get("resourceType"), str):
                raise InvalidInput("the resource has no resourceType")
            # rewriting a reference replaces a string by a string: the raw text stays valid iff the result is
            if validated:
                validate(resource, raw=raw)
            if raw is None or _CONDITIONAL_REF.search(raw):
                resource = rewrite_references(resource, self._resolve(conn))
            assert isinstance(resource, dict)
            rid = resource.get("id")
            if not isinstance(rid, str) or not _ID.match(rid):
                resource = {**resource, "id": self.records.store.new_id()}
            self.records.check_write_in(conn, self.principal, "create", resource)
            return resource
        except TeleledgerError as exc:
            raise ImportError_(f"{path.name} line {lineno}: {exc.message}") from exc

    def _flush(self, conn: Connection, path: Path, batch: list[tuple[int, dict]], result: FileResult,
               progress: Callable[[int], None] | None) -> list:
        if not batch:
            return []
        try:
            written = self.records.store.put_many(conn, [r for _, r in batch])
        except TeleledgerError as exc:
            raise ImportError_(f"{path.name} lines {batch[0][0]}–{batch[-1][0]}: {exc.message}") from exc
        for _, status in written:
            result.resources += 1
            setattr(result, status, getattr(result, status) + 1)
        if progress:
            progress(len(batch))
        return [stored for stored, status in written if status != "unchanged"]

    def _ndjson(self, path: Path) -> Iterator[tuple[int, bytes, object]]:
        with path.open("rb") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    obj = orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    raise ImportError_(f"{path.name} line {lineno}: not valid JSON ({exc.msg}); "
                                       "the file may be cut off — nothing from it was stored") from None
                yield lineno, line, obj

    def _resolve(self, conn: Connection) -> Callable[[str], str | None]:
        def resolve(ref: str) -> str | None:
            if "?" not in ref:
                return None
            hit = self._resolved.get(ref)
            if hit is None:
                # thousands of lines repeat the same few practitioner/location references
                hit = self._resolved[ref] = self.records.resolve_conditional(conn, self.principal, ref)
            return hit

        return resolve

    def _import_bundle(self, path: Path) -> FileResult:
        try:
            bundle = orjson.loads(path.read_bytes())
        except orjson.JSONDecodeError as exc:
            raise ImportError_(f"{path.name} line {exc.lineno}: not valid JSON ({exc.msg}); nothing was stored") from None
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            raise ImportError_(f"{path.name}: a .json import file must hold a FHIR Bundle")
        result = FileResult(str(path))
        if bundle.get("type") in ("transaction", "batch"):
            if bundle.get("type") == "batch":
                bundle = {**bundle, "type": "transaction"}  # imports are all-or-nothing per file
            try:
                response = BundleProcessor(self.records).process(self.principal, bundle)
            except TeleledgerError as exc:
                raise ImportError_(f"{path.name}: {exc.message}") from exc
            result.resources = result.created = len(response["entry"])
            return result
        with UnitOfWork(self.records.engine) as uow:
            batch = [(i, self._prepare(uow.c, i, path, None, (e or {}).get("resource")))
                     for i, e in enumerate(bundle.get("entry") or [])]
            written = self._flush(uow.c, path, batch, result, None)
            # the same access events as an NDJSON file's: one per patient, every version written
            if self.records.auditor is not None and written:
                self.records.auditor.access(uow.c, self.principal, "import", touched(written))
            uow.commit()
        return result
