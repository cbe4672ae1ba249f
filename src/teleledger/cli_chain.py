"""``teleledger chain``: deploy the consortium contracts and show the chain's status.

    teleledger chain deploy [--admin ADDRESS ...] [--quorum N]
    teleledger chain status

Mode: ``TELELEDGER_CHAIN_URL`` set = an external JSON-RPC node; unset = the embedded chain in
``$TELELEDGER_HOME/chain``. Contract addresses are recorded in ``$TELELEDGER_HOME/chain/contracts.json``.
``status`` prints JSON ``{chain_id, block_number, mode, contracts}`` on stdout and exits 1 (with
what to do, on stderr) when the recorded contracts are not on that chain.

Settings come from ``teleledger.config.Settings``; the authority key is a 0600 file for now and
moves into the encrypted keystore later.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from pydantic import ValidationError
from rich.markup import escape

from teleledger.config import Settings
from teleledger.core.crypto import secret_file
from teleledger.core.errors import TeleledgerError

__all__ = ["authority_key", "open_chain", "register"]

console = Console(stderr=True, soft_wrap=True)
AUTHORITY_KEY_FILE = "authority.key"


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        _fail(f"bad setting TELELEDGER_{'_'.join(str(p) for p in first['loc']).upper()}: {first['msg']}")
        raise  # unreachable


def authority_key(home: Path) -> Any:
    """The node's secp256k1 authority/operator key: 32 bytes, base64, in ``<home>/chain/authority.key``.

    Created with mode 0600 on first use. Temporary: it moves into the encrypted keystore
    (``identity/keystore``) — do not build on this file's format.
    """
    from eth_keys import keys

    return keys.PrivateKey(secret_file(home / "chain" / AUTHORITY_KEY_FILE, create=True, what="chain authority key"))


def open_chain(home: Path, url: str | None = None, *, expected_chain_id: int | None = None) -> Any:
    """The configured ``ChainClient``: external when ``url`` is given, embedded in ``<home>/chain`` otherwise."""
    if url:
        from teleledger.ledger.chain.rpc import JsonRpcChain

        return JsonRpcChain(url, expected_chain_id)
    from teleledger.ledger.chain.embedded import DEFAULT_CHAIN_ID, EmbeddedChain

    return EmbeddedChain(home / "chain", authority_key(home), chain_id=expected_chain_id or DEFAULT_CHAIN_ID)


def _fail(message: str, code: int = 1) -> None:
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def _status(client: Any, contracts: dict[str, str]) -> dict[str, Any]:
    return {"chain_id": client.chain_id(), "block_number": client.block_number(), "mode": client.mode,
            "contracts": contracts}


def register(app: typer.Typer) -> None:
    chain_app = typer.Typer(help="the consortium chain: deploy contracts, show status", no_args_is_help=True)
    app.add_typer(chain_app, name="chain")

    @chain_app.command("deploy")
    def deploy(
        admin: Annotated[Optional[list[str]], typer.Option(help="consortium admin address (repeatable); default: this node's authority")] = None,
        quorum: Annotated[int, typer.Option(help="admin approvals needed for governance changes")] = 1,
    ) -> None:
        """Deploy the contracts (signed by the node's authority key) and record their addresses."""
        from teleledger.ledger.chain.deploy import addresses_path, deploy_all, save_addresses

        settings = _settings()
        home = settings.home
        client = None
        try:
            client = open_chain(home, settings.chain_url or None)
            key = authority_key(home)
            admins = admin or [key.public_key.to_checksum_address()]
            addresses = deploy_all(client, key, admins, quorum)
            save_addresses(addresses_path(home), client.chain_id(), addresses)
            print(json.dumps(_status(client, addresses), indent=2, sort_keys=True))
        except TeleledgerError as exc:
            _fail(exc.message)
        except TypeError as exc:  # a bad --admin address
            _fail(f"bad option: {exc}")
        finally:
            if client is not None:
                client.close()

    @chain_app.command("status")
    def status() -> None:
        """Print the chain's id, head block, mode and recorded contracts as JSON."""
        from teleledger.ledger.chain.deploy import addresses_path, check_deployment, load_addresses

        settings = _settings()
        home = settings.home
        recorded_chain_id, contracts = load_addresses(addresses_path(home))
        client = None
        try:
            client = open_chain(home, settings.chain_url or None)
            print(json.dumps(_status(client, contracts), indent=2, sort_keys=True))
            if contracts:
                check_deployment(client, contracts, chain_id=recorded_chain_id)
        except TeleledgerError as exc:
            _fail(exc.message)
        finally:
            if client is not None:
                client.close()
