"""``teleledger witness``: follow another node's log and countersign its checkpoints.

    teleledger witness --log URL --log-key VKEY [--name NAME] [--home DIR] [--once] [--interval S]
    teleledger witness key [--home DIR] [--name NAME]

The witness keeps its Ed25519 key (``witness.key``, base64 of the 32-byte seed, mode 0600,
created on first use) and what it verified per log (``state.json``) in ``--home``, by default
``$TELELEDGER_HOME/witness``. Its name defaults to ``TELELEDGER_NODE_NAME``. Exit codes: 0 ok,
1 error (bad option, key file, unreachable log), 3 the checkpoint was refused (with ``--once``).

Kept apart from ``cli.py`` so that the log's own commands never import the HTTP client.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from teleledger.cli_support import console, fail
from teleledger.config import Settings
from teleledger.core.crypto import secret_file
from teleledger.core.errors import ConfigurationError
from teleledger.core.errors import TeleledgerError
from teleledger.ledger.log.note import CosignatureVerifier, is_valid_key_name

__all__ = ["register"]

KEY_FILE = "witness.key"
STATE_FILE = "state.json"
EXIT_REFUSED = 3



_fail = fail


def _defaults(home: Path | None, name: str | None) -> tuple[Path, str]:
    if home is not None and name is not None:
        return home, name
    try:
        settings = Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        _fail(f"bad setting TELELEDGER_{'_'.join(str(p) for p in first['loc']).upper()}: {first['msg']}")
        raise  # unreachable
    return home or settings.home / "witness", name or settings.node_name


def load_or_create_key(home: Path) -> Ed25519PrivateKey:
    """Read ``home/witness.key``, creating it (0600, never overwritten) on first use."""
    path = home / KEY_FILE
    created = not path.exists()
    try:
        seed = secret_file(path, create=True, what="witness key")
    except (OSError, ConfigurationError) as exc:
        _fail(f"cannot use witness key {path}: {exc}")
        raise  # unreachable
    if created:
        console.print(f"created witness key {path}")
    return Ed25519PrivateKey.from_private_bytes(seed)


def _verifier_key(home: Path, name: str) -> str:
    if not is_valid_key_name(name):
        _fail(f"invalid witness name {name!r}: non-empty, no spaces, no '+'")
    key = load_or_create_key(home)
    return CosignatureVerifier(name, key.public_key()).vkey


HomeOpt = Annotated[Optional[Path], typer.Option(help="witness key and state folder (default: $TELELEDGER_HOME/witness)")]
NameOpt = Annotated[Optional[str], typer.Option(help="witness key name (default: $TELELEDGER_NODE_NAME)")]


def witness(
    ctx: typer.Context,
    log: Annotated[Optional[str], typer.Option("--log", help="base URL of the node to witness, e.g. http://127.0.0.1:8000")] = None,
    log_key: Annotated[Optional[str], typer.Option("--log-key", help="the log's verifier key (GET /ledger/public-key)")] = None,
    name: NameOpt = None,
    home: HomeOpt = None,
    once: Annotated[bool, typer.Option("--once", help="one round; exit 3 if the checkpoint is refused")] = False,
    interval: Annotated[float, typer.Option(help="seconds between rounds", min=0.1)] = 5.0,
) -> None:
    """Follow a node's checkpoints, check each is consistent with the last one seen, and cosign
    it (c2sp.org/tlog-cosignature). A forked or shrunk log is refused and reported."""
    if ctx.invoked_subcommand is not None:
        return
    if not log or not log_key:
        _fail("give --log URL and --log-key VKEY (the log's key from GET /ledger/public-key)")
    from teleledger.ledger.log.witness import Witness, WitnessRefusal
    from teleledger.ledger.log.witness_client import follow

    home, name = _defaults(home, name)
    if not is_valid_key_name(name):
        _fail(f"invalid witness name {name!r}: non-empty, no spaces, no '+'")
    try:
        w = Witness(name, load_or_create_key(home), log_key.strip(), home / STATE_FILE)
    except TeleledgerError as exc:
        _fail(f"--log-key: {exc.message}")
        raise  # unreachable
    console.print(f"witness {w.vkey}", highlight=False)
    try:
        if once:
            result = follow(log, w, once=True)
            assert result is not None
            typer.echo(f"cosigned {log.rstrip('/')} checkpoint of size {result.size} ({result.outcome})")
        else:
            console.print(f"following {log.rstrip('/')} every {interval:g} s (Ctrl-C to stop)", highlight=False)
            follow(log, w, interval=interval, report=lambda m: typer.echo(m))
    except WitnessRefusal as exc:
        _fail(f"refused: {exc.message}", EXIT_REFUSED)
    except TeleledgerError as exc:
        _fail(exc.message)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def key(name: NameOpt = None, home: HomeOpt = None) -> None:
    """Print this witness's cosignature verifier key, for the log operator's
    TELELEDGER_WITNESS_KEYS (creates the key on first use)."""
    home, name = _defaults(home, name)
    typer.echo(_verifier_key(home, name))


def register(app: typer.Typer) -> None:
    """Add the ``witness`` command (and ``witness key``) to the ``teleledger`` app."""
    group = typer.Typer(invoke_without_command=True, no_args_is_help=False)
    group.callback()(witness)
    group.command("key")(key)
    app.add_typer(group, name="witness")
