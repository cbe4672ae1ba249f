"""Request-scoped dependencies: the node, and the authenticated principal (``Ctx``) with its
purpose of use (``request_purpose``: the one place that says what a request is for when it does
not say); and where a route runs its blocking use case: ``in_thread`` (a worker thread) or
``in_place`` (on the event loop when that is cheaper and safe: SQLite instance interactions)."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Annotated, Any, Final, TypeVar

import anyio.to_thread
from fastapi import Depends, Request

from teleledger.bootstrap import Node
from teleledger.core.errors import InvalidInput, Unauthenticated
from teleledger.policy.consent import PURPOSES
from teleledger.policy.model import Principal
from teleledger.storage.db import WriteLockBusy, on_this_loop, write_lock_released

#: What a request is for (HL7 v3 ActReason) when it does not say (``X-Purpose-Of-Use``): what the
#: role's work is. Consents name purposes, so a pharmacy's grant (TREAT) reaches its pharmacists,
#: a payer's (HPAYMT) its claims staff and a study's (HRESCH) its researchers without every client
#: sending the header; an explicit, known purpose still wins (a payer asking for COVERAGE).
DEFAULT_PURPOSE: Final[Mapping[str, str]] = MappingProxyType({
    "patient": "TREAT",
    "practitioner": "TREAT",
    "pharmacist": "TREAT",
    "payer": "HPAYMT",
    "researcher": "HRESCH",
    "admin": "HOPERAT",
    "service": "TREAT",
})
#: In the portal a patient looks at their own record: the patient's own request.
PORTAL_PURPOSE: Final[Mapping[str, str]] = MappingProxyType({**DEFAULT_PURPOSE, "patient": "PATRQT"})


def request_purpose(role: str, asked: str | None = None, *, portal: bool = False) -> str:
    """The purpose of use of a request by ``role``: ``asked`` (the ``X-Purpose-Of-Use`` header)
    when given, else the role's default (``PORTAL_PURPOSE`` for pages). A purpose the policy does
    not know is refused (400) rather than silently replaced, so a client never acts under a
    purpose it did not choose."""
    if asked is not None and asked.strip():
        code = asked.strip().upper()
        if code not in PURPOSES:
            raise InvalidInput(f"X-Purpose-Of-Use: {asked.strip()[:32]!r} is not a purpose of use this server knows "
                               f"(HL7 v3 ActReason, e.g. TREAT, ETREAT, HPAYMT, HRESCH, HOPERAT)")
        return code
    return (PORTAL_PURPOSE if portal else DEFAULT_PURPOSE).get(role, "TREAT")


async def get_node(request: Request) -> Node:
    # async: FastAPI runs a plain function dependency in the thread pool
    return request.app.state.node


async def principal(request: Request) -> Principal:
    """Authenticate the bearer token; every FHIR route depends on this (deny by default).

    On the event loop, not in the thread pool: a token seen before is answered from the
    verifier's cache (a clock check), and a hop to a thread and back costs more than that."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("a Bearer access token is required (POST /auth/token)")
    node: Node = request.app.state.node
    claims = node.verifier.verify(token.strip())
    purpose = request_purpose(claims.role, request.headers.get("x-purpose-of-use"))
    return Principal.from_claims(claims, purpose=purpose)


NodeDep = Annotated[Node, Depends(get_node)]
Ctx = Annotated[Principal, Depends(principal)]


T = TypeVar("T")

#: how long an instance interaction polls for SQLite's write lock on the event loop
LOCK_POLL_SECONDS = 0.1


def _limiter(request: Request) -> anyio.CapacityLimiter:
    # one limiter per event loop (a test client may run the app on several in turn)
    state = request.app.state
    loop = asyncio.get_running_loop()
    mine = getattr(state, "db_limiter", None)
    if mine is None or mine[0] is not loop:
        mine = (loop, anyio.CapacityLimiter(state.db_threads))
        state.db_limiter = mine
    return mine[1]


async def in_thread(request: Request, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a worker thread, at most ``Settings.db_threads`` at a time.

    The records use cases get threads of their own so that slow work elsewhere (password
    hashing at login) never waits for them, nor they for it. On SQLite every unit of work
    takes the database's one write lock (even a read, which records its access), so further
    threads would only queue for that lock while fighting over the GIL: that cost ~0.6 ms of
    CPU per request at 32 concurrent requests.
    """
    return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs), limiter=_limiter(request))


async def in_place(request: Request, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """An instance interaction (one resource, a few short statements): on SQLite, run it
    right here on the event loop when the write lock is free, else in a thread (``in_thread``).

    A hop to a worker thread costs little by itself, but then every SQLite call releases the
    GIL to the event loop and waits to get it back: ~0.4 ms of CPU per request under load, more
    than the interaction's own SQL. While the lock is held elsewhere (the log sequencer's
    short transactions, another process) the interaction waits here without blocking the
    loop, trying again when this process's lock is released or after a millisecond; after ``LOCK_POLL_SECONDS`` it takes a thread and
    waits in SQLite's busy handler as before. Only the first unit of work may be retried
    (``storage.db.fail_fast``): it fails before anything was read or written. The requests the
    loop serves in one turn share one commit (``storage.db.on_this_loop``, group commit): each
    is answered once that commit has made its work durable.

    Searches, histories and bundles may run long and always take a thread; on PostgreSQL
    everything does (each statement is a network round trip).
    """
    if request.app.state.db_in_place:
        give_up = None
        while True:
            try:
                return await on_this_loop(fn, *args, **kwargs)
            except WriteLockBusy:
                now = time.monotonic()
                if give_up is None:
                    give_up = now + LOCK_POLL_SECONDS
                elif now > give_up:
                    break
            await write_lock_released(request.app.state.node.engine, 0.001)
    return await in_thread(request, fn, *args, **kwargs)
