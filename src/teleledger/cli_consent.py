"""``teleledger consent``: trace an access to what allowed it.

    teleledger consent explain AUDIT_EVENT_ID

Prints (JSON) the rule, the consent and the ConsentRegistry transaction and block that allowed
the access an AuditEvent records — see ``policy.service.ConsentService.explain``. The operator
of the node reads every AuditEvent (a service principal); the answer holds ids, hashes and chain
positions only. Every error ends in a one-line message and exit status 1.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from teleledger.cli_support import fail, load_settings
from teleledger.core.errors import TeleledgerError

__all__ = ["register"]

consent_app = typer.Typer(help="Patient consent: explain an access.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add the ``consent`` command group to ``app``."""
    app.add_typer(consent_app, name="consent")


_fail = fail


@consent_app.command("explain")
def explain(audit_event_id: Annotated[str, typer.Argument(help="the AuditEvent id (GET /fhir/AuditEvent)")]) -> None:
    """Show the consent or rule that allowed an access, with the chain transaction and block."""
    from teleledger.bootstrap import build
    from teleledger.demo import system_principal

    settings = load_settings()
    node = None
    try:
        node = build(settings)
        event = node.audit_events.read(system_principal(), audit_event_id)
        assert node.consent_service is not None
        typer.echo(json.dumps(node.consent_service.explain(event), indent=2))
    except TeleledgerError as exc:
        _fail(exc.message)
    finally:
        if node is not None:
            node.close()
