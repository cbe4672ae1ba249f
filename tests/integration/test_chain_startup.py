"""Start-up checks of the node's chain: a first start prepares the embedded chain; a wrong chain
id, an unreachable node, missing contracts or another chain's database stop the start with what
to do (a one-line CLI error, never a traceback); a second process on one home waits on standby."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from teleledger.bootstrap import build
from teleledger.core.errors import ConfigurationError
from teleledger.ledger.chain import CONTRACT_NAMES, ROLE_OPERATOR
from teleledger.ledger.chain.deploy import addresses_path, load_addresses, save_addresses
from teleledger.ledger.chain.outbox import entry
from teleledger.ledger.chain.rpc import JsonRpcChain
from tests.conftest import database_url, make_settings
from tests.integration.test_chain_support import AUTHORITY, enqueue_anchor, fund, hardhat_url, org_of


def settings_for(tmp_path: Path, backend: str, **overrides):  # type: ignore[no-untyped-def]
    return make_settings(tmp_path, database_url(backend, tmp_path), **{"chain_enabled": True, **overrides})


def test_a_first_start_deploys_the_contracts_and_lets_the_node_anchor_and_a_restart_reuses_them(
        tmp_path, backend) -> None:
    settings = settings_for(tmp_path, backend)
    node = build(settings)
    try:
        rt = node.chain
        assert rt.active and rt.mode == "embedded" and rt.registration_error is None
        assert list(rt.addresses) == list(CONTRACT_NAMES)
        assert rt.client.call(rt.addresses["ParticipantRegistry"], "ParticipantRegistry", "has_role", org_of(node),
                              node.keystore.address(AUTHORITY), ROLE_OPERATOR)
        status = rt.status()
        assert status["role"] == "active" and status["reachable"] and status["chain_id"] == 1337
        first = rt.addresses
        head = rt.client.block_number()
    finally:
        node.close()
    node = build(settings)
    try:
        assert node.chain.addresses == first and node.chain.client.block_number() == head  # nothing redeployed
    finally:
        node.close()


def test_chain_enabled_false_builds_a_node_without_a_chain(tmp_path, backend) -> None:
    node = build(settings_for(tmp_path, backend, chain_enabled=False))
    try:
        assert node.chain is None and not (Path(node.settings.home) / "chain").exists()
    finally:
        node.close()


def test_an_unreachable_node_stops_the_start_saying_what_to_do(tmp_path) -> None:
    settings = settings_for(tmp_path, "sqlite", chain_url="http://127.0.0.1:9")
    with pytest.raises(ConfigurationError, match=r"http://127.0.0.1:9 does not answer: start it, or fix "
                                                 r"TELELEDGER_CHAIN_URL"):
        build(settings)


def test_contracts_missing_at_the_recorded_addresses_stop_the_start(tmp_path) -> None:
    settings = settings_for(tmp_path, "sqlite")
    build(settings).close()
    path = addresses_path(settings.home)
    chain_id, addresses = load_addresses(path)
    save_addresses(path, chain_id, {**addresses, "AnchorRegistry": "0x" + "ab" * 20})
    with pytest.raises(ConfigurationError, match=r"AnchorRegistry: no code at .*run `teleledger chain deploy`"):
        build(settings)


def test_addresses_recorded_on_another_chain_id_stop_the_start(tmp_path) -> None:
    settings = settings_for(tmp_path, "sqlite")
    build(settings).close()
    path = addresses_path(settings.home)
    _, addresses = load_addresses(path)
    save_addresses(path, 999, addresses)
    with pytest.raises(ConfigurationError, match="recorded on chain 999 but the node serves chain 1337"):
        build(settings)


def test_a_database_whose_outbox_belongs_to_another_chain_is_refused(tmp_path, backend) -> None:
    url = database_url(backend, tmp_path)
    build(make_settings(tmp_path, url, chain_enabled=True, home=tmp_path / "a")).close()
    # the authority key lives in the shared database: only the genesis timestamp (seconds) tells
    # a second embedded chain created within the same second from the first
    time.sleep(1.1)
    with pytest.raises(ConfigurationError, match="this database's chain writes belong to chain 1337"):
        build(make_settings(tmp_path, url, chain_enabled=True, home=tmp_path / "b"))  # a fresh embedded chain


def test_a_second_process_on_one_home_runs_on_standby_and_only_records_chain_writes(tmp_path, backend) -> None:
    settings = settings_for(tmp_path, backend)
    holder = build(settings)
    try:
        standby = build(settings)  # the same home: in real life a second `teleledger serve`
        try:
            assert not standby.chain.active and standby.chain.client is None
            status = standby.chain.status()
            assert status["role"] == "standby" and str(os.getpid()) in status["standby_reason"]
            standby.chain.start()  # nothing to run
            key = enqueue_anchor(standby, 1)
            holder.chain.worker.drain_once()  # the holder sends what the standby recorded
            assert standby.chain.wait(key, timeout=1).status == "done"
        finally:
            standby.close()
    finally:
        holder.close()


def test_an_external_chain_without_recorded_contracts_says_to_deploy(tmp_path) -> None:
    url = hardhat_url()
    with pytest.raises(ConfigurationError, match=r"no contract addresses are recorded .*teleledger chain deploy"):
        build(settings_for(tmp_path, "sqlite", chain_url=url))


def test_an_external_chain_starts_with_recorded_contracts_and_anchoring_waits_for_approval(tmp_path) -> None:
    url = hardhat_url()
    settings = settings_for(tmp_path, "sqlite", chain_url=url, chain_enabled=False)
    node = build(settings)  # a keystore first, to fund its authority
    me = node.keystore.key(AUTHORITY)
    node.close()
    fund(url, me.public_key.to_checksum_address())
    from teleledger.ledger.chain.deploy import deploy_all

    client = JsonRpcChain(url)
    save_addresses(addresses_path(settings.home), client.chain_id(),
                   deploy_all(client, me, [me.public_key.to_checksum_address()], 1))
    client.close()
    node = build(settings.model_copy(update={"chain_enabled": True}))
    try:
        rt = node.chain
        assert rt.active and rt.mode == "external"
        assert "is not approved yet: ask the consortium admins" in rt.status()["anchoring"]
        org = org_of(node)
    finally:
        node.close()
    client = JsonRpcChain(url)  # the consortium admins approve (here the only admin is this authority)
    registry = load_addresses(addresses_path(settings.home))[1]["ParticipantRegistry"]
    client.transact(registry, "ParticipantRegistry", "approve_organization", org,
                    me.public_key.to_checksum_address(), sender=me)
    client.close()
    node = build(settings.model_copy(update={"chain_enabled": True}))  # the restart
    try:
        assert node.chain.status()["anchoring"] == "enabled"  # it made itself an operator
        assert node.chain.client.call(registry, "ParticipantRegistry", "has_role", org,
                                      me.public_key.to_checksum_address(), ROLE_OPERATOR)
    finally:
        node.close()


def test_the_cli_reports_a_chain_start_up_error_in_one_line(tmp_path) -> None:
    env = {**os.environ, "TELELEDGER_HOME": str(tmp_path / "home"),
           "TELELEDGER_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}",
           "TELELEDGER_MASTER_KEY": base64.b64encode(b"m" * 32).decode(), "TELELEDGER_ENVIRONMENT": "test",
           "TELELEDGER_DEMO_DATA": "false", "TELELEDGER_CHAIN_URL": "http://127.0.0.1:9"}
    r = subprocess.run([sys.executable, "-m", "teleledger.cli", "clients", "create", "--client-id", "c",
                        "--secret", "service-secret-0123456789", "--scope", "system/*.cruds"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "does not answer" in r.stderr and "TELELEDGER_CHAIN_URL" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_chain_write_recorded_on_standby_survives_the_holders_absence(tmp_path) -> None:
    settings = settings_for(tmp_path, "sqlite")
    holder = build(settings)
    standby = build(settings)
    key = enqueue_anchor(standby, 1)
    standby.close()
    holder.close()  # nobody sent it: it waits in the database
    node = build(settings)
    try:
        assert entry(node.engine, key).status == "pending"
        node.chain.worker.drain_once()
        assert entry(node.engine, key).status == "done"
    finally:
        node.close()



def test_chain_commands_leave_the_embedded_chain_of_a_running_node_alone(tmp_path) -> None:
    """``teleledger chain status`` while a server holds the embedded chain reads the head without
    opening the chain; ``chain deploy`` refuses (two sealers on one chain would fork it)."""
    import json

    settings = settings_for(tmp_path, "sqlite")
    env = {**os.environ, "TELELEDGER_HOME": str(settings.home), "TELELEDGER_DATABASE_URL": settings.database_url,
           "TELELEDGER_MASTER_KEY": settings.master_key, "TELELEDGER_ENVIRONMENT": "test",
           "TELELEDGER_DEMO_DATA": "false", "TELELEDGER_CHAIN_ENABLED": "true"}
    env.pop("TELELEDGER_CHAIN_URL", None)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "teleledger.cli", "chain", *args], env=env,
                              capture_output=True, text=True, timeout=120)

    holder = build(settings)
    try:
        head = holder.chain.client.block_number()
        r = cli("status")
        assert r.returncode == 0, r.stderr
        status = json.loads(r.stdout)
        assert status["mode"] == "embedded" and status["block_number"] == head
        assert status["held_by_process"] == os.getpid()
        assert status["contracts"] == holder.chain.addresses
        r = cli("deploy")
        assert r.returncode != 0 and "held by a running teleledger" in r.stderr and "Traceback" not in r.stderr
        assert holder.chain.client.block_number() == head  # nothing was sealed by the command
    finally:
        holder.close()
    r = cli("status")  # the server stopped: the command opens the chain itself
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["block_number"] == head and "held_by_process" not in json.loads(r.stdout)


def test_a_standby_takes_the_embedded_chain_over_when_its_holder_stops(tmp_path, backend) -> None:
    """The holder goes away (here it closes; a kill -9 releases the lock the same way): the
    standby, watching the home lock, becomes the holder and sends what it had recorded."""
    settings = settings_for(tmp_path, backend)
    holder = build(settings)
    standby = build(settings)
    try:
        standby.chain.start()  # standby: the follower and the takeover watch
        assert not standby.chain.active
        key = enqueue_anchor(standby, 1)
        assert not standby.chain.take_over()  # the holder is alive: nothing happens
        head = holder.chain.client.block_number()
        holder.close()
        deadline = time.monotonic() + 15
        while not standby.chain.active and time.monotonic() < deadline:
            time.sleep(0.1)
        assert standby.chain.active and standby.chain.status()["role"] == "active"
        assert standby.chain.client.block_number() >= head  # the same chain, not a new one
        assert standby.chain.wait(key, timeout=15).status == "done"  # its own worker sent the row
        assert standby.chain.indexer is not None and standby.chain.indexer.running
    finally:
        standby.close()
        holder.close()
