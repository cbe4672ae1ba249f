"""Request-scoped dependencies: the node, and the authenticated principal (``Ctx``); and where
a route runs its blocking use case: ``in_thread`` (a worker thread) or ``in_place`` (on the
event loop when that is cheaper and safe: SQLite instance interactions)."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import anyio.to_thread
from fastapi import Depends, Request

from teleledger.bootstrap import Node
from teleledger.core.errors import Unauthenticated
from teleledger.policy.model import Principal
from teleledger.storage.db import WriteLockBusy, fail_fast

PURPOSES = {"TREAT", "ETREAT", "HPAYMT", "HRESCH", "HOPERAT", "PATRQT", "BTG"}


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
    purpose = request.headers.get("x-purpose-of-use", "TREAT").upper()
    return Principal.from_claims(claims, purpose=purpose if purpose in PURPOSES else "TREAT")


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
    loop, trying again every millisecond; after ``LOCK_POLL_SECONDS`` it takes a thread and
    waits in SQLite's busy handler as before. Only the first unit of work may be retried
    (``storage.db.fail_fast``): it fails before anything was read or written.

    Searches, histories and bundles may run long and always take a thread; on PostgreSQL
    everything does (each statement is a network round trip).
    """
    if request.app.state.db_in_place:
        give_up = None
        while True:
            try:
                with fail_fast():
                    return fn(*args, **kwargs)
            except WriteLockBusy:
                now = time.monotonic()
                if give_up is None:
                    give_up = now + LOCK_POLL_SECONDS
                elif now > give_up:
                    break
            await asyncio.sleep(0.001)
    return await in_thread(request, fn, *args, **kwargs)
