"""teleledger with its transparency log switched off: the "log off" server of ``bench/crud_load.py``.

    .venv/bin/python bench/teleledger_nolog_server.py --host 127.0.0.1 --port 8200 [--workers 1]

Exists only so the CRUD benchmark can measure what the log costs (issue 3: throughput with the
log on / off ≥ 0.85×). It reads ``Settings`` from the ``TELELEDGER_*`` variables exactly as
``teleledger serve`` does, builds the normal node with ``bootstrap.build`` and serves
``web.app.create_app(node)`` on the same uvicorn settings; then it takes the log out at the one
place every log write goes through, the node's ``records.audit.Auditor``:

* **change entries** — ``Auditor.changes`` (the store's change hook, behind the records
  service's care-relationship upkeep, which stays) gets an empty entry per stored version and
  a log that keeps nothing: no keyed hash of the stored version, no entry encoded, no
  ``log_queue`` row;
* **access entries** — ``Auditor.log`` is a log that keeps nothing: no ``log_queue`` row. The
  access entry is still encoded, because the ``access_events`` row (the AuditEvent, kept) stores
  the hash of it in its non-null ``leaf_hash`` column;
* **the sequencer** — ``create_app(node, sequencer=False)``: no integration into ``log_leaves``
  and ``log_nodes``, no signed checkpoints, and so nothing for the chain's anchorer to anchor.

Everything else (validation, policy, encryption, search index, versions, ``access_events`` rows,
the chain runtime) is the production code, untouched. There is deliberately no setting that
switches the log off in production: a node whose log can be turned off proves nothing. This
module must never be used to serve real data.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI
from sqlalchemy import Connection

if TYPE_CHECKING:
    from teleledger.bootstrap import Node


class _DiscardedLog:
    """Stands in for ``TransparencyLog`` as the auditor's log: appends keep nothing."""

    def append_own(self, conn: Connection, entries: Sequence[bytes]) -> None:
        pass


def without_log(node: Node) -> Node:
    """``node`` with the log's writes removed (see the module docstring); returns it."""
    # not ``store.on_change = None``: the records service chains its care-relationship upkeep
    # in front of the auditor's change hook (bound before we get here), and that upkeep is not
    # the log's. The hook stays; what it does for the log goes: no keyed hash, no entry
    node.auditor.change_entry = _no_change_entry
    node.auditor.log = _DiscardedLog()
    return node


def _no_change_entry(stored: object) -> bytes:
    return b""


def create() -> FastAPI:
    """The ASGI application (``uvicorn --factory``; every worker process builds its own node)."""
    from teleledger.bootstrap import build
    from teleledger.config import Settings
    from teleledger.web.app import create_app

    return create_app(without_log(build(Settings())), sequencer=False)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    if args.workers > 1:
        uvicorn.run("teleledger_nolog_server:create", factory=True, app_dir=str(Path(__file__).resolve().parent),
                    workers=args.workers, host=args.host, port=args.port, log_level="warning", access_log=False)
    else:
        uvicorn.run(create(), host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
