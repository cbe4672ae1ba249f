"""Batch and transaction Bundles (https://hl7.org/fhir/R4/http.html#transaction).

A transaction runs in one unit of work: every entry succeeds or nothing is stored. Entries are
processed in the order the spec prescribes (DELETE, POST, PUT, GET); ``urn:uuid:`` full URLs of
created resources are given server ids first and every reference to them is rewritten;
conditional references (``Practitioner?identifier=system|value``) are resolved by searching
and must match exactly one resource. A batch runs each entry on its own and reports each
entry's outcome.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import parse_qsl, urlsplit

from sqlalchemy import Connection

from teleledger.core.errors import InvalidInput, NotFound, PreconditionFailed, TeleledgerError
from teleledger.fhir.outcome import from_error
from teleledger.fhir.validation import ID_PATTERN, is_resource_type
from teleledger.policy.model import Principal
from teleledger.records.service import AccessDenied, RecordsService
from teleledger.records.store import Stored, instant
from teleledger.storage.db import UnitOfWork

_ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}


def rewrite_references(node: object, resolve: Callable[[str], str | None]) -> object:
    """Return ``node`` with every ``Reference.reference`` (and ``urn:uuid`` URIs) replaced."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "reference" and isinstance(v, str):
                new = resolve(v)
                out[k] = new if new is not None else v
            else:
                out[k] = rewrite_references(v, resolve)
        return out
    if isinstance(node, list):
        return [rewrite_references(v, resolve) for v in node]
    return node


def _split_url(url: str) -> tuple[str, str | None, str | None]:
    """'Patient/1' → ('Patient','1',None); 'Patient?x=1' → ('Patient',None,'x=1'); 'Patient' → ('Patient',None,None)."""
    parts = urlsplit(url)
    path = parts.path.strip("/")
    if path.startswith("fhir/"):
        path = path[5:]
    segs = path.split("/") if path else []
    if not segs or not is_resource_type(segs[0]):
        raise InvalidInput(f"request.url {url[:80]!r} does not start with a resource type")
    if len(segs) > 1 and not ID_PATTERN.fullmatch(segs[1]):
        raise InvalidInput(f"request.url {url[:80]!r} does not name a valid resource id")
    return segs[0], (segs[1] if len(segs) > 1 else None), (parts.query or None)


class BundleProcessor:
    def __init__(self, records: RecordsService) -> None:
        self.records = records

    def process(self, principal: Principal, bundle: object) -> dict:
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            raise InvalidInput("POST to the base URL takes a Bundle of type batch or transaction")
        kind = bundle.get("type")
        entries = bundle.get("entry") or []
        if kind not in ("batch", "transaction"):
            raise InvalidInput(f"Bundle.type must be batch or transaction, found {kind!r}")
        if not isinstance(entries, list):
            raise InvalidInput("Bundle.entry must be a list")
        for i, e in enumerate(entries):
            req = e.get("request") if isinstance(e, dict) else None
            if not isinstance(req, dict) or req.get("method") not in _ORDER or not isinstance(req.get("url"), str):
                raise InvalidInput(f"Bundle.entry[{i}].request needs a method (GET, POST, PUT, DELETE) and a url",
                                   expression=f"Bundle.entry[{i}].request")
        if kind == "transaction":
            try:
                return self._transaction(principal, entries)
            except AccessDenied as exc:
                self.records.record_denial(principal, exc)
                raise
        return self._batch(principal, entries)

    # ---- transaction ------------------------------------------------------------------------

    def _transaction(self, principal: Principal, entries: list[dict]) -> dict:
        order = sorted(range(len(entries)), key=lambda i: _ORDER[entries[i]["request"]["method"]])
        responses: list[dict | None] = [None] * len(entries)
        with UnitOfWork(self.records.engine) as uow:
            c = uow.c
            # server ids for POSTed resources first, so references to them can be rewritten
            assigned: dict[str, str] = {}
            new_ids: dict[int, str] = {}
            for i, e in enumerate(entries):
                if e["request"]["method"] == "POST" and isinstance(e.get("resource"), dict):
                    rt = e["resource"].get("resourceType", "")
                    new_ids[i] = self.records.store.new_id()
                    full = e.get("fullUrl")
                    if isinstance(full, str) and full:
                        assigned[full] = f"{rt}/{new_ids[i]}"
            cache: dict[str, str] = {}

            def resolve(ref: str) -> str | None:
                if ref in assigned:
                    return assigned[ref]
                if ref.startswith("urn:uuid:"):
                    raise InvalidInput(f"reference {ref} names no entry of this transaction")
                if "?" in ref:
                    if ref not in cache:
                        cache[ref] = self.records.resolve_conditional(c, principal, ref)
                    return cache[ref]
                return None

            for i in order:
                e = entries[i]
                try:
                    responses[i] = self._one(c, principal, e, resolve, new_ids.get(i))
                except TeleledgerError as exc:
                    exc.message = f"transaction failed at Bundle.entry[{i}] ({e['request']['method']} " \
                                  f"{e['request']['url']}): {exc.message}"
                    exc.args = (exc.message,)
                    raise
            uow.commit()
        return {"resourceType": "Bundle", "type": "transaction-response", "entry": responses}

    def _one(self, c: Connection, principal: Principal, e: dict, resolve, new_id: str | None) -> dict:  # type: ignore[no-untyped-def]
        req = e["request"]
        method, url = req["method"], req["url"]
        rt, rid, query = _split_url(url)
        resource = e.get("resource")
        if resource is not None:
            resource = rewrite_references(resource, resolve)
        if method == "POST":
            stored, created = self.records.create_in(c, principal, resource, if_none_exist=req.get("ifNoneExist"),
                                                     res_id=new_id)
            return self._response(stored, "201 Created" if created else "200 OK")
        if method in ("PUT", "PATCH"):
            if method == "PATCH":
                raise InvalidInput("PATCH is not supported (see the CapabilityStatement)")
            if rid is None and query:
                matches = self.records._conditional_matches(c, principal, rt, query)
                if len(matches) > 1:
                    raise PreconditionFailed(f"conditional update {url} matched {len(matches)} resources")
                rid = matches[0].res_id if matches else self.records.store.new_id()
                if isinstance(resource, dict):
                    resource = {**resource, "id": rid}
            if rid is None:
                raise InvalidInput(f"PUT {url} needs a resource id")
            if_match = _parse_etag(req.get("ifMatch"))
            stored, created = self.records.update_in(c, principal, rt, rid, resource, if_match=if_match)
            return self._response(stored, "201 Created" if created else "200 OK")
        if method == "DELETE":
            if rid is None:
                raise InvalidInput("conditional delete is not supported; DELETE needs Type/id")
            self.records.delete_in(c, principal, rt, rid)
            return {"response": {"status": "204 No Content"}}
        # GET / HEAD: a read inside a transaction
        if rid is None:
            raise InvalidInput("searches inside a transaction are not supported; use a batch")
        stored = self.records.read_in(c, principal, rt, rid)
        return {"resource": stored.body, "response": {"status": "200 OK", "etag": stored.etag}}

    def _response(self, stored: Stored, status: str) -> dict:
        return {
            "fullUrl": f"{self.records.settings.base_url}/fhir/{stored.res_type}/{stored.res_id}",
            "resource": stored.body,
            "response": {
                "status": status,
                "location": f"{stored.res_type}/{stored.res_id}/_history/{stored.version}",
                "etag": stored.etag,
                "lastModified": instant(stored.last_updated),
            },
        }

    # ---- batch ------------------------------------------------------------------------------

    def _batch(self, principal: Principal, entries: list[dict]) -> dict:
        out = []
        for i, e in enumerate(entries):
            try:
                method = e["request"]["method"]
                if method == "GET":
                    rt, rid, query = _split_url(e["request"]["url"])
                    if rid is None:
                        try:
                            bundle = self.records.search(principal, rt, parse_qsl(query or "", keep_blank_values=True))
                        except TeleledgerError as exc:  # the search recorded its own denial
                            out.append({"response": {"status": f"{exc.status}", "outcome": from_error(exc)}})
                            continue
                        out.append({"resource": bundle, "response": {"status": "200 OK"}})
                        continue
                with UnitOfWork(self.records.engine) as uow:

                    def resolve(ref: str, _c=uow.c) -> str | None:  # type: ignore[no-untyped-def]
                        return self.records.resolve_conditional(_c, principal, ref) if "?" in ref else None

                    out.append(self._one(uow.c, principal, e, resolve, None))
                    uow.commit()
            except TeleledgerError as exc:
                if isinstance(exc, AccessDenied):
                    self.records.record_denial(principal, exc)
                out.append({"response": {"status": f"{exc.status}", "outcome": from_error(exc)}})
        return {"resourceType": "Bundle", "type": "batch-response", "entry": out}


def _parse_etag(value: object) -> int | None:
    if value is None:
        return None
    text = str(value).strip()
    if text.startswith("W/"):
        text = text[2:]
    text = text.strip('"')
    try:
        return int(text)
    except ValueError:
        raise InvalidInput(f"If-Match {value!r} is not a version ETag like W/\"3\"") from None


parse_etag = _parse_etag
__all__ = ["BundleProcessor", "parse_etag", "rewrite_references", "NotFound"]
