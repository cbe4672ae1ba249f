"""The ``teleledger`` command: serve, demo, import, users, clients.

Every error a user can cause ends in a one-line message and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from teleledger.cli_support import console, fail, load_settings
from teleledger.cli_chain import register as register_chain
from teleledger.cli_consent import register as register_consent
from teleledger.cli_research import register as register_research
from teleledger.cli_keys import register as register_keys
from teleledger.cli_verify import register as register_verify
from teleledger.cli_witness import register as register_witness
from teleledger.config import Settings
from teleledger.core.errors import TeleledgerError

app = typer.Typer(help="teleledger: telemedicine on FHIR R4 with a verifiable ledger", no_args_is_help=True,
                  pretty_exceptions_enable=False)
users_app = typer.Typer(help="manage people's accounts", no_args_is_help=True)
clients_app = typer.Typer(help="manage service clients (OAuth client credentials)", no_args_is_help=True)
app.add_typer(users_app, name="users")
app.add_typer(clients_app, name="clients")
register_witness(app)
register_verify(app)
register_chain(app)
register_keys(app)
register_consent(app)
register_research(app)
_fail, _settings = fail, load_settings


def _node(settings: Settings):  # type: ignore[no-untyped-def]
    from teleledger.bootstrap import build

    try:
        return build(settings)
    except TeleledgerError as exc:
        _fail(exc.message)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, transient=False)


def _import(node, path: Path, label: str) -> None:  # type: ignore[no-untyped-def]
    from teleledger.demo import system_principal
    from teleledger.records.importer import Importer, count_lines, ordered_files

    files = ordered_files(path)
    total = sum(count_lines(f) for f in files)
    importer = Importer(node.records, system_principal())
    importer.warm_up()
    started = time.perf_counter()
    with _progress() as progress:
        task = progress.add_task(label, total=total)
        results = []
        try:
            for f in files:
                progress.update(task, description=f"{label} {f.name}")
                results.append(importer.import_file(f, progress=lambda n: progress.advance(task, n)))
        finally:
            importer.close()
    node.log.flush()  # sequence the import's log entries and sign a checkpoint now
    elapsed = time.perf_counter() - started
    n = sum(r.resources for r in results)
    table = Table(title=f"imported {n} resources from {len(results)} files in {elapsed:.1f} s ({n / max(elapsed, 1e-9):.0f}/s)")
    for col in ("file", "resources", "created", "updated", "unchanged"):
        table.add_column(col, justify="left" if col == "file" else "right")
    for r in results:
        table.add_row(Path(r.path).name, str(r.resources), str(r.created), str(r.updated), str(r.unchanged))
    console.print(table)


@app.command("import")
def import_(path: Annotated[Path, typer.Argument(help="a FHIR Bundle (.json), an .ndjson file, or a folder of them")]) -> None:
    """Import FHIR data; each file is stored whole or not at all."""
    node = _node(_settings())
    try:
        _import(node, path, "importing")
    except TeleledgerError as exc:
        _fail(exc.message)


def _ensure_demo(node) -> None:  # type: ignore[no-untyped-def]
    from teleledger import demo

    if node.accounts.get_by_username("admin") is None:
        _import(node, demo.samples_dir(node), "demo data")
    accounts = demo.create_accounts(node)
    table = Table(title="demo accounts (development only)")
    for col in ("username", "password", "role", "linked to"):
        table.add_column(col)
    for a in accounts:
        table.add_row(a.username, a.password, a.role, a.link or "")
    console.print(table)


@app.command()
def demo() -> None:
    """Load the Synthea sample patients and create one demo account per role (idempotent)."""
    node = _node(_settings())
    try:
        _ensure_demo(node)
    except TeleledgerError as exc:
        _fail(exc.message)


@app.command()
def serve(
    host: Annotated[Optional[str], typer.Option(help="address to listen on")] = None,
    port: Annotated[Optional[int], typer.Option(help="port to listen on")] = None,
) -> None:
    """Serve the web app and the FHIR API (initialising TELELEDGER_HOME on first start)."""
    import uvicorn

    from teleledger.web.app import create_app

    settings = _settings(host=host, port=port)
    node = _node(settings)
    if settings.demo_data and settings.environment == "development":
        try:
            _ensure_demo(node)
        except TeleledgerError as exc:
            _fail(exc.message)
    console.print(f"teleledger serving on http://{settings.host}:{settings.port}  (FHIR base /fhir)"
                  + (f" with {settings.workers} worker processes" if settings.workers > 1 else ""))
    if settings.workers > 1:
        # each worker process builds its own node from the environment (teleledger.web.asgi)
        node.close()
        os.environ["TELELEDGER_HOST"], os.environ["TELELEDGER_PORT"] = settings.host, str(settings.port)
        uvicorn.run("teleledger.web.asgi:create", factory=True, workers=settings.workers, host=settings.host,
                    port=settings.port, log_level="warning", access_log=False)
        return
    uvicorn.run(create_app(node), host=settings.host, port=settings.port, log_level="warning", access_log=False)


@users_app.command("create")
def users_create(
    role: Annotated[str, typer.Option(help="patient, practitioner, pharmacist, payer, researcher or admin")],
    username: Annotated[str, typer.Option()],
    password: Annotated[str, typer.Option()],
    patient: Annotated[Optional[str], typer.Option(help="Patient/ID for a patient account")] = None,
    practitioner: Annotated[Optional[str], typer.Option(help="Practitioner/ID for a practitioner account")] = None,
    organization: Annotated[Optional[str], typer.Option(
        help="Organization/ID the account acts for (practitioner, pharmacist, payer, researcher, admin)")] = None,
    related_person: Annotated[Optional[str], typer.Option(
        help="RelatedPerson/ID a delegate (parent, guardian, caregiver) acts as; patient accounts only")] = None,
) -> None:
    """Create an account."""
    node = _node(_settings())
    try:
        for ref, rt in ((patient, "Patient"), (practitioner, "Practitioner"), (organization, "Organization"),
                        (related_person, "RelatedPerson")):
            if ref and not node.records.exists(rt, ref.split("/", 1)[-1]):
                _fail(f"{ref} does not exist on this node; import or create it first")
        account = node.accounts.create_user(username=username, password=password, role=role, patient=patient,
                                            practitioner=practitioner, organization=organization,
                                            related_person=related_person)
    except TeleledgerError as exc:
        _fail(exc.message)
    typer.echo(f"created {account.role} account {account.username} ({account.id})")


@clients_app.command("create")
def clients_create(
    client_id: Annotated[str, typer.Option("--client-id")],
    secret: Annotated[str, typer.Option()],
    scope: Annotated[str, typer.Option(help='SMART scopes, e.g. "system/*.cruds"')],
) -> None:
    """Register a backend service client (client_credentials grant)."""
    node = _node(_settings())
    try:
        client = node.accounts.create_client(client_id=client_id, secret=secret, scopes=scope)
    except TeleledgerError as exc:
        _fail(exc.message)
    typer.echo(f"created client {client.client_id} with scopes {client.scopes}")


def main() -> None:  # pragma: no cover
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    app()
