"""``create_app(node)``: the FastAPI application. Nothing is created at import time."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from teleledger import __version__
from teleledger.bootstrap import Node
from teleledger.web import errors
from teleledger.web.api import auth, fhir, ledger
from teleledger.web.ui import pages


def create_app(node: Node, *, sequencer: bool = True) -> FastAPI:
    """``sequencer``: run the log's sequencer (integrate queued entries, sign checkpoints) in the
    background while the app runs; tests that drive the log by hand turn it off."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        seq = node.log.sequencer() if sequencer else None
        if seq is not None:
            seq.start()
        try:
            yield
        finally:
            if seq is not None:
                seq.stop()

    app = FastAPI(title="teleledger", version=__version__, docs_url="/api/docs", redoc_url=None,
                  openapi_url="/api/openapi.json", lifespan=lifespan)
    app.state.node = node
    errors.install(app)
    app.include_router(auth.router)
    app.include_router(fhir.router)
    app.include_router(ledger.router)
    app.include_router(pages.router)
    return app
