"""The one place where an error becomes an HTTP response (a FHIR OperationOutcome).

Nothing else in the code base catches errors to turn them into responses. Unexpected errors are
logged with their type and the request path only (never the body: it may hold PHI) and answered
with a 500 OperationOutcome that reveals nothing.
"""

from __future__ import annotations

import logging

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from teleledger.core.errors import TeleledgerError, Unauthenticated
from teleledger.fhir.outcome import from_error, outcome

log = logging.getLogger("teleledger.web")
FHIR_JSON = "application/fhir+json"

_HTTP_CODES = {400: "invalid", 401: "login", 403: "forbidden", 404: "not-found", 405: "not-supported",
               406: "not-supported", 409: "conflict", 410: "deleted", 412: "conflict", 413: "too-costly",
               415: "not-supported", 422: "processing", 429: "throttled"}


def oo_response(status: int, body: dict, headers: dict | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type=FHIR_JSON, headers=headers)


def error_response(request: Request, exc: TeleledgerError) -> Response:
    """A ``TeleledgerError`` as its OperationOutcome: the exception handler below, and the
    instance interactions' dispatcher (``web.api.instance``), which runs outside FastAPI's routing."""
    headers = {"WWW-Authenticate": 'Bearer realm="teleledger"'} if isinstance(exc, Unauthenticated) else None
    if exc.status >= 500:
        log.error("server error %s on %s %s", type(exc).__name__, request.method, request.url.path)
    return oo_response(exc.status, from_error(exc), headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(TeleledgerError)
    async def _teleledger(request: Request, exc: TeleledgerError) -> Response:
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return oo_response(400, outcome("error", "invalid", f"invalid request: {where}: {first.get('msg', 'invalid')}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        code = _HTTP_CODES.get(exc.status_code, "exception")
        text = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and text == "Not Found":
            text = f"no such endpoint: {request.url.path}"
        if exc.status_code == 405:
            text = f"{request.method} is not allowed on {request.url.path}"
        return oo_response(exc.status_code, outcome("error", code, text), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.error("unexpected %s on %s %s", type(exc).__name__, request.method, request.url.path)
        return oo_response(500, outcome("fatal", "exception", "internal error; the administrator can find it in the log"))
