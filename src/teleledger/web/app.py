"""``create_app(node)``: the FastAPI application. Nothing is created at import time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from teleledger import __version__
from teleledger.bootstrap import Node
from teleledger.ledger.log.service import Sequencer
from teleledger.web import errors
from teleledger.web.api import auth, fhir, ledger
from teleledger.web.api.instance import InstanceInteractions
from teleledger.web.api import signaling as visit_signaling
from teleledger.web.api import visits as visit_scheduling
from teleledger.web.ui import visits_pages
from teleledger.web.ui import visit_room
from teleledger.web.ui import explorer, pages
from teleledger.web.api import notes as notes_api
from teleledger.web.ui import notes_pages
from teleledger.prescriptions.service import PrescriptionService
from teleledger.web.ui import rx_pages
from teleledger.web.api import consent as consent_api
from teleledger.web.ui import consent_pages
from teleledger.web.ui import privacy_pages
from teleledger.web.api import research as research_api

log = logging.getLogger("teleledger.web")

async def _sequence_on_loop(seq: Sequencer) -> None:
    """The sequencer's guarded rounds as a task of the event loop (SQLite): see ``create_app``."""
    while True:
        await asyncio.sleep(seq.round())


def create_app(node: Node, *, sequencer: bool = True) -> FastAPI:
    """``sequencer``: run the log's sequencer (integrate queued entries, sign checkpoints) in the
    background while the app runs; tests that drive the log by hand turn it off.

    On SQLite the instance interactions run on the event loop (``deps.in_place``), and so do
    the sequencer's rounds: a sequencer thread holding the write lock had to win the GIL from
    the busy loop for each of its statements, so it held the lock for tens of milliseconds a
    round while every request waited (~0.6 ms of CPU per request went to that convoy). On
    PostgreSQL it is the ``Sequencer`` thread, as designed."""
    in_place = node.engine.dialect.name == "sqlite"

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        seq = node.log.sequencer() if sequencer else None
        task = None
        if seq is not None:
            if in_place:
                task = asyncio.create_task(_sequence_on_loop(seq), name="teleledger-sequencer")
            else:
                seq.start()
        if node.chain is not None:
            node.chain.start()  # outbox worker, indexer, anchorer: background threads
        try:
            yield
        finally:
            if node.chain is not None:
                node.chain.stop()
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            elif seq is not None:
                seq.stop()

    app = FastAPI(title="teleledger", version=__version__, docs_url="/api/docs", redoc_url=None,
                  openapi_url="/api/openapi.json", lifespan=lifespan)
    app.state.node = node
    app.state.db_threads = node.settings.record_threads
    app.state.db_in_place = in_place
    errors.install(app)
    # create/read/update/delete skip FastAPI's routing (see web.api.instance)
    app.add_middleware(InstanceInteractions)
    app.include_router(auth.router)
    app.include_router(fhir.router)
    app.include_router(ledger.router)
    app.include_router(pages.router)
    # the scheduling use cases (built by bootstrap, whose write guard keeps Appointments and
    # Slots in step with slot_bookings for every writer)
    app.state.scheduling = node.scheduling
    # before the signaling router: its /api/visits/{appointment_id} would match /api/visits/slots
    app.include_router(visit_scheduling.router)
    app.include_router(visits_pages.router)
    app.include_router(visit_signaling.router)
    app.include_router(visit_room.router)
    app.include_router(explorer.router)
    app.include_router(notes_api.router)
    app.include_router(notes_pages.router)
    # e-prescriptions: made here, before the lifespan starts the indexer, so its projectors
    # (MedicationRequest status follows Dispensed / PrescriptionCancelled) see every event
    app.state.prescriptions = PrescriptionService.for_node(node)
    app.include_router(rx_pages.router)
    app.include_router(consent_api.router)
    app.include_router(consent_pages.router)
    app.include_router(privacy_pages.router)
    research_api.include(app, node)
    return app
