"""``teleledger verify``: check the node's database end to end (``records.verify``) from the shell.

Exit status: 0 nothing tampered; 1 findings (a table names each one: what, which table, which
row); 2 nothing could be verified (not a teleledger database, a newer schema, no master key…),
always as a one-line message, never a traceback. Read-only: it never migrates, never creates a
key, and never integrates queued log entries unless ``--flush`` asks it to.

With a chain configured (``TELELEDGER_CHAIN_ENABLED``, the default), the anchors of this log's
origin are read from the AnchorRegistry contract first (read-only: the chain is opened without
deploying or registering anything) and checked against the log (``records.verify`` step 7); a
chain that cannot be read is exit status 2 (``TELELEDGER_CHAIN_ENABLED=false`` skips the check).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from teleledger.config import Settings
from teleledger.core.errors import TeleledgerError

if TYPE_CHECKING:
    from teleledger.bootstrap import Node
    from teleledger.records.verify import Report

#: exit status when findings were made / when the database could not be verified at all
FOUND = 1
CANNOT_VERIFY = 2


def register(app: typer.Typer) -> None:
    """Add the ``verify`` command to ``app``."""
    app.command("verify")(verify)


def verify(
    flush: Annotated[bool, typer.Option(
        "--flush", help="integrate queued log entries (and sign a checkpoint) before verifying; "
                        "without it nothing is written")] = False,
    max_rows: Annotated[int, typer.Option(
        "--max-rows", min=1, help="findings listed one by one (all are counted)")] = 200,
) -> None:
    """Recompute the log from its stored entries, check every checkpoint, resource version and
    access record against it, and name every row that was tampered with."""
    err = Console(stderr=True)
    out = Console()
    node, settings = _open_node(err)
    try:
        anchors, why_not = _anchors(err, settings, node)
        if flush:
            try:
                node.log.flush()
            except TeleledgerError as exc:
                _fail(err, f"cannot integrate the queued entries: {exc.message} "
                           "(run verify without --flush to locate the damage)")
        report = _run(node, err, anchors)
    except SQLAlchemyError as exc:
        # the driver's own message only: SQLAlchemy's text would carry statement parameters
        _fail(err, "the database could not be read: "
                   f"{getattr(exc, 'orig', None) or type(exc).__name__}")
    finally:
        node.log.close()
        node.close()
    _summary(out, report, max_rows)
    if why_not:
        out.print(f"note: {why_not}", highlight=False, soft_wrap=True)
    if report.findings:
        raise typer.Exit(FOUND)


def _fail(err: Console, message: str) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(CANNOT_VERIFY)


def _open_node(err: Console) -> tuple[Node, Settings]:
    """Build the node on an existing teleledger database without touching it (the chain is not
    opened here: ``_anchors`` reads it without writing)."""
    from teleledger.bootstrap import build
    from teleledger.core.crypto import DecryptionError
    from teleledger.storage.db import get_meta, make_engine, schema_state

    try:
        settings = Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        _fail(err, f"bad setting TELELEDGER_{'_'.join(str(p) for p in first['loc']).upper()}: "
                   f"{first['msg']}")
    url = settings.sqlalchemy_url
    if url.startswith("sqlite"):
        database = make_url(url).database or ""
        if database and database != ":memory:" and not Path(database).is_file():
            _fail(err, f"there is no database at {database} (set TELELEDGER_HOME or "
                       "TELELEDGER_DATABASE_URL)")
    if not settings.master_key and not (settings.home / "master.key").is_file():
        # build() would create a fresh key in development: nothing would decrypt
        _fail(err, f"no master key: set TELELEDGER_MASTER_KEY or provide {settings.home / 'master.key'}")
    try:
        settings.check()
        engine = make_engine(url)
        try:
            if schema_state(engine) == "empty":
                _fail(err, "this database is empty: it is not a teleledger database")
            with engine.connect() as conn:
                if get_meta(conn, "log-signing-key") is None:
                    _fail(err, "this database holds no log signing key: it is not a teleledger "
                               "database, or its node_meta table was emptied")
        finally:
            engine.dispose()
        return build(settings.model_copy(update={"chain_enabled": False}), migrate_schema=False), settings
    except DecryptionError:
        _fail(err, "the master key does not open this database's node secrets "
                   "(wrong TELELEDGER_MASTER_KEY or master.key?)")
    except TeleledgerError as exc:
        _fail(err, exc.message)
    except SQLAlchemyError as exc:
        _fail(err, f"cannot open the database: {getattr(exc, 'orig', None) or type(exc).__name__}")


def _anchors(err: Console, settings: Settings, node: Node) -> tuple[list | None, str | None]:
    """The chain's anchors of the log's origin, read before the database snapshot (see
    ``verify_node``); exit 2 when a configured chain cannot be read."""
    from teleledger.core.crypto import DecryptionError
    from teleledger.ledger.chain.runtime import read_anchors

    try:
        return read_anchors(settings, node.keystore, node.log.origin)
    except DecryptionError:
        _fail(err, "the master key does not open the chain authority key (wrong TELELEDGER_MASTER_KEY?)")
    except TeleledgerError as exc:
        _fail(err, f"{exc.message} (TELELEDGER_CHAIN_ENABLED=false verifies without the chain)")


def _run(node: Node, err: Console, anchors: list | None = None) -> Report:
    from teleledger.records.verify import verify_node

    tasks: dict[str, TaskID] = {}
    with Progress(TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=err) as bars:
        def progress(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bars.add_task(phase, total=total)
            bars.update(tasks[phase], completed=done, total=total)

        return verify_node(node, progress=progress, clock=time.perf_counter, anchors=anchors)


def _summary(out: Console, report: Report, max_rows: int) -> None:
    out.print(
        f"checked {report.entries:,} log entries ({report.queued:,} queued), {report.nodes:,} tree "
        f"nodes, {report.checkpoints:,} checkpoints, {report.versions:,} resource versions, "
        f"{report.resources:,} resources, {report.access_events:,} access events, "
        f"{report.anchors:,} chain anchors in "
        f"{report.elapsed:.1f} s", highlight=False, soft_wrap=True)
    out.print(f"tree size {report.tree_size:,}, root {report.root_hash.hex()}", highlight=False,
              soft_wrap=True)
    for note in report.info:
        out.print(f"note: {note.table} {note.key}: {note.detail}", highlight=False, soft_wrap=True)
    if not report.findings:
        out.print("[bold green]OK[/]: nothing was tampered with", soft_wrap=True)
        return
    kinds = ", ".join(f"{n} {kind}" for kind, n in report.kinds().most_common())
    out.print(f"[bold red]TAMPERED[/]: {len(report.findings)} findings ({kinds})", highlight=False,
              soft_wrap=True)
    table = Table("kind", "table", "row", "detail", show_lines=False)
    for f in report.findings[:max_rows]:
        table.add_row(f.kind, f.table, f.key, f.detail)
    out.print(table)
    if len(report.findings) > max_rows:
        out.print(f"… and {len(report.findings) - max_rows} more (--max-rows)", highlight=False,
                  soft_wrap=True)
