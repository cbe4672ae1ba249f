"""Public transparency-log endpoints at ``/ledger`` (RFC 6962 §4 shapes, RFC 9162 proofs).

No authentication: everything served here is PHI-free by construction (leaf hashes, keyed
hashes, pseudonymous ids) and meant for anyone to verify. Query strings are parsed here, not by
FastAPI, so a bad parameter is a 400 OperationOutcome saying which one and why; errors are
raised as ``TeleledgerError`` and rendered by ``teleledger.web.errors`` only.

    GET /ledger/checkpoint                          signed note + cosignatures, text/plain
    GET /ledger/public-key                          verifier key <name>+<hex id>+<base64>
    GET /ledger/entries?start=&end=                 {"entries": [{"index", "leaf_input"}]}
    GET /ledger/proof/inclusion?leaf_index=&tree_size=
    GET /ledger/proof/inclusion?hash=&tree_size=    {"leaf_index", "audit_path"}
    GET /ledger/proof/consistency?first=&second=    {"consistency"}

Binary values are standard base64 with padding (RFC 4648 §4), as in RFC 6962.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from teleledger.core.errors import InvalidInput
from teleledger.ledger.log.service import TransparencyLog

router = APIRouter(prefix="/ledger", tags=["ledger"])

_DECIMAL = re.compile(r"[0-9]{1,19}")
_MAX = 2**63 - 1
_TEXT = "text/plain; charset=utf-8"


def get_log(request: Request) -> TransparencyLog:
    """The node's log; the app puts it at ``app.state.node.log``."""
    return request.app.state.node.log


LogDep = Annotated[TransparencyLog, Depends(get_log)]


def _one(request: Request, name: str) -> str | None:
    values = request.query_params.getlist(name)
    if len(values) > 1:
        raise InvalidInput(f"query parameter {name!r} is given {len(values)} times; give it once")
    return values[0] if values else None


def _int_param(request: Request, name: str) -> int:
    raw = _one(request, name)
    if raw is None:
        raise InvalidInput(f"missing query parameter {name!r} (a non-negative integer)")
    if not _DECIMAL.fullmatch(raw) or int(raw) > _MAX:
        raise InvalidInput(f"query parameter {name!r} must be a non-negative integer below 2**63, "
                           f"got {raw[:40]!r}")
    return int(raw)


def _hash_param(request: Request, name: str) -> bytes:
    raw = _one(request, name) or ""
    # a '+' left unescaped in a query string arrives as a space; url-safe base64 is accepted too
    text = raw.strip().replace(" ", "+").replace("-", "+").replace("_", "/")
    try:
        value = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise InvalidInput(f"query parameter {name!r} is not base64: {raw[:60]!r}") from None
    if len(value) != 32:
        raise InvalidInput(f"query parameter {name!r} is {len(value)} bytes, expected a 32-byte "
                           "SHA-256 leaf hash")
    return value


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@router.get("/checkpoint", response_class=PlainTextResponse)
def checkpoint(log: LogDep) -> PlainTextResponse:
    """The latest signed checkpoint (c2sp.org/tlog-checkpoint) with its witness cosignatures."""
    return PlainTextResponse(log.latest_checkpoint(), media_type=_TEXT,
                             headers={"Cache-Control": "no-cache"})


@router.get("/public-key", response_class=PlainTextResponse)
def public_key(log: LogDep) -> PlainTextResponse:
    """The log's verifier key (c2sp.org/signed-note), to check checkpoints with."""
    return PlainTextResponse(log.public_key + "\n", media_type=_TEXT)


@router.get("/entries")
def entries(request: Request, log: LogDep) -> JSONResponse:
    """Leaves [start, end), at most 1,000 per call (RFC 6962 §4.6 get-entries, end exclusive)."""
    start = _int_param(request, "start")
    end = _int_param(request, "end")
    leaves = log.entries(start, end)
    return JSONResponse({"entries": [{"index": start + i, "leaf_input": _b64(leaf)}
                                     for i, leaf in enumerate(leaves)]})


@router.get("/proof/inclusion")
def inclusion_proof(request: Request, log: LogDep) -> JSONResponse:
    """Audit path by leaf index or by base64 leaf hash (RFC 6962 §4.5, RFC 9162 §2.1.3)."""
    has_hash = _one(request, "hash") is not None
    has_index = _one(request, "leaf_index") is not None
    if has_hash == has_index:
        raise InvalidInput("give exactly one of 'leaf_index' and 'hash', with 'tree_size'")
    tree_size = _int_param(request, "tree_size")
    if has_hash:
        proof = log.inclusion_proof_by_hash(_hash_param(request, "hash"), tree_size)
    else:
        proof = log.inclusion_proof(_int_param(request, "leaf_index"), tree_size)
    return JSONResponse({"leaf_index": proof.leaf_index,
                         "audit_path": [_b64(h) for h in proof.audit_path]})


@router.get("/proof/consistency")
def consistency_proof(request: Request, log: LogDep) -> JSONResponse:
    """Consistency proof between two tree sizes (RFC 6962 §4.4, RFC 9162 §2.1.4)."""
    first = _int_param(request, "first")
    second = _int_param(request, "second")
    proof = log.consistency_proof(first, second)
    return JSONResponse({"consistency": [_b64(h) for h in proof.path]})


_MAX_COSIGNATURE_BYTES = 1024  # a cosignature/v1 line is ~ 120 bytes plus the witness name


@router.post("/cosignature", response_class=PlainTextResponse)
async def add_cosignature(request: Request, log: LogDep) -> PlainTextResponse:
    """Store a witness's cosignature (c2sp.org/tlog-cosignature) of our checkpoint of ``size``:
    the body is one signature line, text/plain. 201 stored, 200 already stored; a witness that
    is not in ``TELELEDGER_WITNESS_KEYS`` is 403."""
    from starlette.concurrency import run_in_threadpool

    from teleledger.core.errors import Forbidden, PayloadTooLarge
    from teleledger.ledger.log.note import FutureCosignature, InvalidSignature, UnverifiedNote

    size = _int_param(request, "size")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_COSIGNATURE_BYTES:
            raise PayloadTooLarge(f"a cosignature line is at most {_MAX_COSIGNATURE_BYTES} bytes")
    try:
        line = bytes(body).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput("the body is not UTF-8; send one cosignature line as text/plain") from None
    line = line.removesuffix("\n").removesuffix("\r")
    if not line or "\n" in line:
        raise InvalidInput("the body must be exactly one cosignature line (— <name> <base64>)")
    try:
        stored = await run_in_threadpool(log.add_cosignature, size, line)
    except UnverifiedNote as exc:
        who = ", ".join(f"{s.name}+{s.key_id:08x}" for s in exc.signatures) or "unknown"
        raise Forbidden(f"witness {who} is not one this log accepts "
                        "(the operator lists them in TELELEDGER_WITNESS_KEYS)") from exc
    except (InvalidSignature, FutureCosignature) as exc:
        raise InvalidInput(f"cosignature of the checkpoint of size {size} refused: {exc.message}") from exc
    if stored:
        return PlainTextResponse("cosignature stored\n", status_code=201, media_type=_TEXT)
    return PlainTextResponse("cosignature already stored\n", media_type=_TEXT)
