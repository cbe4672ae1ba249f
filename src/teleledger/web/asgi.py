"""``teleledger.web.asgi:create``: the ASGI application built from the environment.

For servers that import the application in each worker process themselves (``teleledger serve``
with ``TELELEDGER_WORKERS`` > 1, or ``uvicorn --factory teleledger.web.asgi:create``): each
process reads ``Settings`` from the ``TELELEDGER_*`` variables and opens its own node. Nothing
happens at import time.

Several processes may share one database: on SQLite the write lock serializes their units of
work and every process runs a log sequencer, which that lock also serializes (``log_state``
refuses a sequencer that raced); on PostgreSQL the sequencers take an advisory lock.
"""

from __future__ import annotations

from fastapi import FastAPI


def create() -> FastAPI:
    from teleledger.bootstrap import build
    from teleledger.config import Settings
    from teleledger.web.app import create_app

    return create_app(build(Settings()))
