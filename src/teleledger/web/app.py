"""``create_app(node)``: the FastAPI application. Nothing is created at import time."""

from __future__ import annotations

from fastapi import FastAPI

from teleledger import __version__
from teleledger.bootstrap import Node
from teleledger.web import errors
from teleledger.web.api import auth, fhir
from teleledger.web.ui import pages


def create_app(node: Node) -> FastAPI:
    app = FastAPI(title="teleledger", version=__version__, docs_url="/api/docs", redoc_url=None,
                  openapi_url="/api/openapi.json")
    app.state.node = node
    errors.install(app)
    app.include_router(auth.router)
    app.include_router(fhir.router)
    app.include_router(pages.router)
    return app
