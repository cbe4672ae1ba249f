"""``teleledger research``: the de-identified export of a research study.

    teleledger research export STUDY_ID --as USERNAME --out DIR

Writes one ``<ResourceType>.ndjson`` per type into DIR, exactly what
``GET /api/research/{study_id}/export`` returns to researcher USERNAME (who must be a member of
the study, ``policy.research``); every read is an audited access event (purpose HRESCH, action
export). Prints counts only, never PHI. Every error ends in a one-line message and exit status 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn

from teleledger.cli_support import console, fail, load_settings
from teleledger.core.errors import TeleledgerError

__all__ = ["register"]

research_app = typer.Typer(help="Research sharing: de-identified study exports.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add the ``research`` command group to ``app``."""
    app.add_typer(research_app, name="research")


_fail = fail


@research_app.command("export")
def export(study_id: Annotated[str, typer.Argument(help="the ResearchStudy id (or ResearchStudy/ID)")],
           out: Annotated[Path, typer.Option("--out", help="folder for the .ndjson files (created)")],
           as_: Annotated[str, typer.Option("--as", help="the researcher account the export is made for")]) -> None:
    """Export the study's consented data, de-identified, one NDJSON file per resource type."""
    from teleledger.bootstrap import build
    from teleledger.identity.scopes import ROLE_SCOPE_SETS, ScopeSet
    from teleledger.policy.model import Principal
    from teleledger.records.research_export import research_export

    settings = load_settings()
    node = None
    try:
        node = build(settings)
        account = node.accounts.get_by_username(as_)
        if account is None:
            _fail(f"no account {as_!r}")
        who = Principal(subject=account.id, role=account.role, scopes=ROLE_SCOPE_SETS.get(account.role, ScopeSet()),
                        patient_id=None, practitioner_id=None, purpose="HRESCH")
        lines = research_export(node).export(who, study_id)
        out.mkdir(parents=True, exist_ok=True)
        counts: dict[str, int] = {}
        handles: dict[str, object] = {}
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), console=console) as progress:
            task = progress.add_task("exporting", total=None)
            try:
                for rtype, line in lines:
                    if rtype not in handles:
                        handles[rtype] = (out / f"{rtype}.ndjson").open("w", encoding="utf-8")
                    handles[rtype].write(line + "\n")  # type: ignore[attr-defined]
                    counts[rtype] = counts.get(rtype, 0) + 1
                    progress.update(task, description=f"exporting {rtype}: {counts[rtype]}")
            finally:
                for h in handles.values():
                    h.close()  # type: ignore[attr-defined]
        total = sum(counts.values())
        summary = ", ".join(f"{rt} {n}" for rt, n in sorted(counts.items())) or "nothing"
        console.print(f"exported {total} resources to {escape(str(out))}: {escape(summary)}", highlight=False)
    except TeleledgerError as exc:
        _fail(exc.message)
    finally:
        if node is not None:
            node.close()
