"""The FHIR instance interactions (create, read, update, delete) dispatched without FastAPI's
routing and dependency solving: an ASGI middleware in front of the router.

These four are nearly all of a FHIR server's traffic, and walking FastAPI's route table and
solving each route's dependencies cost ~0.15 ms of CPU per request, about a sixth of a whole
write. The dispatcher recognises exactly the requests that the routes in ``web.api.fhir`` would
give to ``create``, ``read``, ``update`` and ``delete``, authenticates them with the same
``deps.principal`` and calls those same route functions, so headers, bodies and limits are
theirs; a ``TeleledgerError`` becomes its OperationOutcome through ``errors.error_response``
(the function behind the app's exception handler). Anything else, including every path it does
not recognise, goes on to the FastAPI application unchanged, which still documents these routes.

It must never answer a request that the router would route elsewhere (``GET /fhir/X/_history``
is the type history, not a read of id ``_history``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from teleledger.core.errors import TeleledgerError
from teleledger.web import errors
from teleledger.web.api import fhir
from teleledger.web.deps import principal

PREFIX = "/fhir/"


class InstanceInteractions:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            # the path as the router sees it: without the root path of a proxy's mount point
            path, root = scope["path"], scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root):]
            route = _route(scope["method"], path[len(PREFIX):].split("/")) if path.startswith(PREFIX) else None
            if route is not None:
                endpoint, args = route
                request = Request(scope, receive)
                try:
                    response = await endpoint(*args, request, request.app.state.node, await principal(request))
                except TeleledgerError as exc:
                    response = errors.error_response(request, exc)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _route(method: str, parts: list[str]) -> tuple[Callable[..., Awaitable[Response]], tuple[str, ...]] | None:
    """The route function of ``web.api.fhir`` for ``method`` on ``/fhir/`` + ``"/".join(parts)``
    and its path arguments; ``None`` when the router should decide."""
    if len(parts) == 1:
        return (fhir.create, (parts[0],)) if method == "POST" and parts[0] else None
    if len(parts) != 2 or not parts[0] or not parts[1]:
        return None
    if method == "GET":
        # GET /fhir/X/_history is history-type, routed before read
        return (fhir.read, (parts[0], parts[1])) if parts[1] != "_history" else None
    if method == "PUT":
        return fhir.update, (parts[0], parts[1])
    if method == "DELETE":
        return fhir.delete, (parts[0], parts[1])
    return None
