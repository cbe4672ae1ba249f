"""``teleledger chain``: deploy the consortium contracts and show the chain's status.

    teleledger chain deploy [--admin ADDRESS ...] [--quorum N]
    teleledger chain status

Mode: ``TELELEDGER_CHAIN_URL`` set = an external JSON-RPC node; unset = the embedded chain in
``$TELELEDGER_HOME/chain``. Contract addresses are recorded in ``$TELELEDGER_HOME/chain/contracts.json``.
``status`` prints JSON ``{chain_id, block_number, mode, contracts}`` on stdout and exits 1 (with
what to do, on stderr) when the recorded contracts are not on that chain. While a server holds the
embedded chain (its home lock), ``status`` reads the head from the store read-only (and says which
process holds it, ``held_by_process``) and ``deploy`` refuses: one process seals an embedded chain.

Settings come from ``teleledger.config.Settings``. The node's authority key (the embedded chain's
sealer and the deployer) is ``node:authority`` in the encrypted keystore (``identity.keystore``);
a ``<home>/chain/authority.key`` file left by earlier versions is imported into it on first use.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from teleledger.cli_support import fail, load_settings
from teleledger.core.errors import TeleledgerError

__all__ = ["register"]

_fail, _settings = fail, load_settings


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
        from teleledger.bootstrap import open_keystore
        from teleledger.identity.keystore import NODE_AUTHORITY
        from teleledger.ledger.chain.deploy import addresses_path, deploy_all, save_addresses
        from teleledger.ledger.chain.runtime import embedded_chain_lock, open_chain_client

        settings = _settings()
        home = settings.home
        client = None
        with embedded_chain_lock(settings) as holder:
            if holder is not None:
                _fail(f"the embedded chain of this home is held by a running teleledger (process {holder}), which "
                      "deployed its contracts at start; stop it first to redeploy")
            try:
                with open_keystore(settings) as keystore:
                    key = keystore.key(NODE_AUTHORITY)
                    client = open_chain_client(settings, keystore)
                admins = admin or [key.public_key.to_checksum_address()]
                first_block = client.block_number()
                addresses = deploy_all(client, key, admins, quorum)
                save_addresses(addresses_path(home), client.chain_id(), addresses, deployed_block=first_block)
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
        from teleledger.bootstrap import open_keystore
        from teleledger.ledger.chain.deploy import addresses_path, check_deployment, load_addresses
        from teleledger.ledger.chain.embedded import peek_head
        from teleledger.ledger.chain.runtime import embedded_chain_lock, open_chain_client

        settings = _settings()
        home = settings.home
        recorded_chain_id, contracts = load_addresses(addresses_path(home))
        client = None
        with embedded_chain_lock(settings) as holder:
            if holder is not None:
                # a running server holds the chain: read its head from the store, open nothing
                head = peek_head(Path(home) / "chain")
                if head is None:
                    _fail("the embedded chain of this home has no blocks yet")
                print(json.dumps({"chain_id": head[0], "block_number": head[1], "mode": "embedded",
                                  "contracts": contracts, "held_by_process": int(holder) if holder.isdigit()
                                  else holder}, indent=2, sort_keys=True))
                return
            try:
                with open_keystore(settings) as keystore:  # the embedded chain opens with its sealer's key
                    client = open_chain_client(settings, keystore)
                print(json.dumps(_status(client, contracts), indent=2, sort_keys=True))
                if contracts:
                    check_deployment(client, contracts, chain_id=recorded_chain_id)
            except TeleledgerError as exc:
                _fail(exc.message)
            finally:
                if client is not None:
                    client.close()
