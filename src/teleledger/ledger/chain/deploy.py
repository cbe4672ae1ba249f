"""Deploy the consortium contracts and check a recorded deployment.

    deploy_all(client, operator_key, admins, quorum)   deploy in CONTRACT_NAMES order
    save_addresses / load_addresses                    <home>/chain/contracts.json
    check_deployment(client, addresses)                ChainMisconfigured when code is missing

The addresses file is ``{"chain_id": int, "contracts": {name: checksummed address}}``.
Constructor arguments: ParticipantRegistry(admins, quorum); ConsentRegistry(participants),
AnchorRegistry(participants) and PrescriptionRegistry(participants) take ParticipantRegistry's
address.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from eth_utils import to_checksum_address

from teleledger.ledger.chain import CONTRACT_NAMES
from teleledger.ledger.chain.client import ChainClient, ChainMisconfigured, contract_abi


def addresses_path(home: Path | str) -> Path:
    return Path(home) / "chain" / "contracts.json"


#: contracts whose only constructor argument is ParticipantRegistry's address
TAKE_PARTICIPANTS = frozenset({"ConsentRegistry", "AnchorRegistry", "PrescriptionRegistry"})


def deploy_all(client: ChainClient, operator_key: Any, admins: list[str], quorum: int) -> dict[str, str]:
    """Deploy every contract, in order, signed by ``operator_key``; name -> address."""
    addresses: dict[str, str] = {}
    for name in CONTRACT_NAMES:
        if name == "ParticipantRegistry":
            args: tuple[Any, ...] = ([to_checksum_address(a) for a in admins], quorum)
        elif name in TAKE_PARTICIPANTS:
            args = (addresses["ParticipantRegistry"],)
        else:  # a new contract must say here what its constructor takes, not get a guess
            raise NotImplementedError(f"deploy_all does not know the constructor arguments of {name}")
        addresses[name] = client.deploy(name, *args, sender=operator_key)
    return addresses


def save_addresses(path: Path | str, chain_id: int, addresses: dict[str, str], *,
                   deployed_block: int | None = None) -> Path:
    """``deployed_block``: a block at or before the deployment (the indexer starts there rather
    than at genesis on a long external chain); None keeps what the file recorded."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if deployed_block is None:
        deployed_block = recorded_deployment_block(path)
    tmp = path.with_suffix(".tmp")
    body = {"chain_id": chain_id, "contracts": addresses, "deployed_block": deployed_block}
    tmp.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)  # never leave a half-written addresses file
    return path


def recorded_deployment_block(path: Path | str) -> int:
    """The block the addresses file says the contracts were deployed at or after (0 when unknown)."""
    path = Path(path)
    if not path.exists():
        return 0
    value = json.loads(path.read_text(encoding="utf-8")).get("deployed_block")
    return value if isinstance(value, int) and value >= 0 else 0


def load_addresses(path: Path | str) -> tuple[int | None, dict[str, str]]:
    path = Path(path)
    if not path.exists():
        return None, {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data.get("chain_id"), dict(data.get("contracts", {}))


def check_deployment(client: ChainClient, addresses: dict[str, str], *, chain_id: int | None = None) -> None:
    """Raise ``ChainMisconfigured`` (saying what to do) unless every contract's code is where recorded."""
    if chain_id is not None and chain_id != client.chain_id():
        raise ChainMisconfigured(
            f"the contract addresses were recorded on chain {chain_id} but the node serves chain "
            f"{client.chain_id()}; point TELELEDGER_CHAIN_URL at the right node or run `teleledger chain deploy`"
        )
    problems = []
    for name in CONTRACT_NAMES:
        address = addresses.get(name)
        if not address:
            problems.append(f"{name}: no address recorded")
            continue
        code = client.get_code(address)
        if not code:
            problems.append(f"{name}: no code at {address}")
        elif not code.startswith(contract_abi(name).runtime):  # immutables follow the runtime code
            problems.append(f"{name}: the code at {address} is not this version of {name}")
    if problems:
        raise ChainMisconfigured(
            "the chain contracts are missing or different (" + "; ".join(problems)
            + "); run `teleledger chain deploy` against this chain, or fix the addresses file"
        )
