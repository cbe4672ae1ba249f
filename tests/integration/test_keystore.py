"""The encrypted keystore on SQLite and PostgreSQL, its Ethereum keystore JSON files, the
``teleledger keys`` command, and keystore keys signing EIP-712 consent on the embedded chain."""

from __future__ import annotations

import base64
import copy
import json
import os
import threading
from pathlib import Path

import pytest
from eth_account import Account
from eth_keys import keys
from sqlalchemy import select, update
from typer.testing import CliRunner

from teleledger.bootstrap import build
from teleledger.core.crypto import DecryptionError
from teleledger.core.errors import Conflict, NotFound
from teleledger.identity.keystore import NODE_AUTHORITY, Keystore, KeystoreError, keystore, legacy_authority_file
from teleledger.storage.db import UnitOfWork
from tests.conftest import make_settings

PASSWORD = "correct horse battery staple"
LIGHT = 1 << 10  # scrypt N for tests that do not care about the KDF cost


@pytest.fixture
def other_node(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A second node: its own SQLite database and a different master key."""
    settings = make_settings(tmp_path / "other", f"sqlite:///{tmp_path / 'other.db'}",
                             master_key=base64.b64encode(b"o" * 32).decode())
    n = build(settings)
    yield n
    n.close()


def _sealed(node, key_id: str) -> bytes:  # type: ignore[no-untyped-def]
    with UnitOfWork(node.engine) as uow:
        return bytes(uow.c.execute(select(keystore.c.sealed).where(keystore.c.key_id == key_id)).scalar_one())


def test_an_exported_key_imported_on_another_node_has_the_same_address(node, other_node):
    address = node.keystore.address("org:acme")
    exported = node.keystore.export_json("org:acme", PASSWORD, scrypt_n=LIGHT)
    assert other_node.keystore.import_json("org:acme", json.dumps(exported), PASSWORD) == address
    assert other_node.keystore.address("org:acme") == address
    assert other_node.keystore.key("org:acme").to_bytes() == node.keystore.key("org:acme").to_bytes()
    assert ("org:acme", address) in other_node.keystore.key_ids()


def test_the_exported_file_is_a_standard_scrypt_keystore_v3_that_eth_account_decrypts(node):
    key = node.keystore.key("user:alice")
    exported = node.keystore.export_json("user:alice", PASSWORD)  # the standard cost, as geth writes it
    assert exported["version"] == 3
    assert exported["crypto"]["kdf"] == "scrypt"
    assert exported["crypto"]["kdfparams"]["n"] == 1 << 18
    assert exported["address"].lower() == key.public_key.to_checksum_address()[2:].lower()
    assert bytes(Account.decrypt(exported, PASSWORD)) == key.to_bytes()
    assert key.to_bytes().hex() not in json.dumps(exported)


def test_a_key_written_by_another_wallet_imports_with_its_address(node):
    wallet = Account.create()
    file = Account.encrypt(wallet.key, PASSWORD, kdf="pbkdf2", iterations=1000)
    assert node.keystore.import_json("user:wallet-owner", file, PASSWORD) == wallet.address


def test_a_wrong_password_fails_cleanly_and_stores_nothing(node):
    node_id = "org:acme"
    node.keystore.key(node_id)
    exported = node.keystore.export_json(node_id, PASSWORD, scrypt_n=LIGHT)
    with pytest.raises(KeystoreError, match="wrong password") as caught:
        node.keystore.import_json("org:copy", exported, "not the password")
    assert caught.value.status == 400
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert [k for k, _ in node.keystore.key_ids()] == [NODE_AUTHORITY, node_id]


def _tampered(exported: dict) -> list[tuple[str, object, str]]:
    flipped = copy.deepcopy(exported)
    ct = bytearray.fromhex(flipped["crypto"]["ciphertext"])
    ct[0] ^= 1
    flipped["crypto"]["ciphertext"] = ct.hex()
    other_address = copy.deepcopy(exported)
    other_address["address"] = "00" * 20
    costly = copy.deepcopy(exported)
    costly["crypto"]["kdfparams"]["n"] = 1 << 30
    v4 = {**copy.deepcopy(exported), "version": 4}
    no_crypto = {k: v for k, v in exported.items() if k != "crypto"}
    bad_hex = copy.deepcopy(exported)
    bad_hex["crypto"]["salt"] = "zz"
    bad_hex["crypto"]["kdfparams"]["salt"] = "not hex"
    return [
        ("ciphertext flipped", flipped, "wrong password for this keystore file .or the file was altered"),
        ("address changed", other_address, "address does not match its key"),
        ("ruinous scrypt cost", costly, "scrypt parameters too costly"),
        ("version 4", v4, "expected version 3"),
        ("no crypto", no_crypto, "no crypto object"),
        ("salt not hex", bad_hex, "not a standard Ethereum keystore"),
        ("not JSON", "{not json", "not JSON"),
        ("a JSON list", "[1, 2]", "expected a JSON object"),
    ]


def test_a_tampered_or_malformed_keystore_file_is_refused_with_a_clear_error(node):
    node.keystore.key("org:acme")
    exported = node.keystore.export_json("org:acme", PASSWORD, scrypt_n=LIGHT)
    for what, bad, message in _tampered(exported):
        with pytest.raises(KeystoreError, match=message):
            node.keystore.import_json("org:copy", bad, PASSWORD)
        assert "org:copy" not in dict(node.keystore.key_ids()), what


def test_sealed_rows_do_not_contain_the_key_and_cannot_be_moved_to_another_key_id(node):
    key = node.keystore.key("user:alice")
    node.keystore.key("user:mallory")
    sealed = _sealed(node, "user:alice")
    assert key.to_bytes() not in sealed
    assert key.to_bytes().hex().encode() not in sealed
    with UnitOfWork(node.engine) as uow:  # an attacker with database access swaps the rows
        uow.c.execute(update(keystore).where(keystore.c.key_id == "user:mallory").values(sealed=sealed))
        uow.commit()
    with pytest.raises(DecryptionError, match="keystore entry user:mallory: authentication failed"):
        node.keystore.key("user:mallory")


def test_another_master_key_cannot_open_the_keystore(node):
    node.keystore.key("user:alice")
    stranger = Keystore(node.engine, type(node.master)(b"x" * 32))
    with pytest.raises(DecryptionError):
        stranger.key("user:alice")


def test_two_threads_creating_the_same_key_id_get_one_key(node):
    # two keystores on separate connections, as two processes would be
    stores = [Keystore(node.engine, node.master), Keystore(node.engine, node.master)]
    barrier = threading.Barrier(len(stores))
    results: list[bytes] = []
    errors: list[BaseException] = []

    def create(store: Keystore) -> None:
        try:
            barrier.wait()
            results.append(store.key("org:race").to_bytes())
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert len(results) == 2 and results[0] == results[1]
    assert [k for k, _ in node.keystore.key_ids()] == [NODE_AUTHORITY, "org:race"]


def test_importing_over_a_different_key_needs_replace_and_the_same_key_changes_nothing(node):
    original = node.keystore.address("org:acme")
    again = node.keystore.export_json("org:acme", PASSWORD, scrypt_n=LIGHT)
    assert node.keystore.import_json("org:acme", again, PASSWORD) == original
    newcomer = Account.create()
    file = Account.encrypt(newcomer.key, PASSWORD, iterations=LIGHT)
    with pytest.raises(Conflict, match="already holds another key as 'org:acme'.*replace"):
        node.keystore.import_json("org:acme", file, PASSWORD)
    assert node.keystore.address("org:acme") == original
    assert node.keystore.import_json("org:acme", file, PASSWORD, replace=True) == newcomer.address
    assert node.keystore.address("org:acme") == newcomer.address
    assert dict(node.keystore.key_ids())["org:acme"] == newcomer.address


def test_an_absent_key_is_not_found_without_create_and_a_malformed_key_id_is_refused(node):
    with pytest.raises(NotFound, match="no key 'org:nobody'"):
        node.keystore.key("org:nobody", create=False)
    with pytest.raises(NotFound):
        node.keystore.export_json("org:nobody", PASSWORD)
    for bad in ("alice", "user:", "user:a b", "patient:x", "user:" + "a" * 200):
        with pytest.raises(KeystoreError, match="key id must be"):
            node.keystore.key(bad)
    with pytest.raises(KeystoreError, match="non-empty password"):
        node.keystore.export_json(NODE_AUTHORITY, "")
    assert [k for k, _ in node.keystore.key_ids()] == [NODE_AUTHORITY]  # nothing was created on the way


def test_every_new_account_gets_its_own_key_in_the_same_commit(node):
    alice = node.accounts.create_user(username="alice", password="correct-horse-battery", role="admin")
    bob = node.accounts.create_user(username="bob", password="correct-horse-battery", role="admin")
    stored = dict(node.keystore.key_ids())
    assert set(stored) == {NODE_AUTHORITY, "user:alice", "user:bob"}
    assert stored["user:alice"] != stored["user:bob"]
    assert node.keystore.address("user:alice") == stored["user:alice"]
    with pytest.raises(Conflict):
        node.accounts.create_user(username="alice", password="correct-horse-battery", role="admin")
    assert dict(node.keystore.key_ids()) == stored
    assert alice.username == "alice" and bob.username == "bob"


def test_the_authority_key_file_of_earlier_versions_becomes_the_keystores_node_authority(tmp_path, backend):
    from teleledger.ledger.chain.embedded import EmbeddedChain
    from tests.conftest import database_url

    settings = make_settings(tmp_path, database_url(backend, tmp_path), chain_enabled=True)
    legacy = legacy_authority_file(settings.home)
    legacy.parent.mkdir(parents=True)
    raw = os.urandom(31) + b"\x01"
    legacy.write_text(base64.b64encode(raw).decode() + "\n")
    legacy.chmod(0o600)
    EmbeddedChain(settings.home / "chain", keys.PrivateKey(raw)).close()  # a chain sealed by the file's key
    n = build(settings)
    try:
        assert n.keystore.key(NODE_AUTHORITY).to_bytes() == raw
        address = keys.PrivateKey(raw).public_key.to_checksum_address()
        assert n.keystore.address(NODE_AUTHORITY) == address
        # the existing embedded chain reopened with its sealer
        assert n.chain is not None and n.chain.active and n.chain.authority == address
        assert n.chain.client.get_block(n.chain.client.block_number()).miner == address
    finally:
        n.close()
    # once imported, the keystore is the truth: a later change of the file is ignored
    legacy.write_text(base64.b64encode(os.urandom(31) + b"\x02").decode() + "\n")
    n = build(settings)
    try:
        assert n.keystore.key(NODE_AUTHORITY).to_bytes() == raw
    finally:
        n.close()


# ---- teleledger keys -------------------------------------------------------------------------------


@pytest.fixture
def cli_env(settings) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {"TELELEDGER_HOME": str(settings.home), "TELELEDGER_DATABASE_URL": settings.database_url,
            "TELELEDGER_MASTER_KEY": settings.master_key, "TELELEDGER_ENVIRONMENT": "test",
            "TELELEDGER_PASSWORD_HASHING": "fast", "TELELEDGER_DEMO_DATA": "false", "TELELEDGER_CHAIN_URL": ""}


def _keys(env: dict, *args: str, input: str | None = None):  # type: ignore[no-untyped-def]
    from teleledger.cli import app

    return CliRunner().invoke(app, ["keys", *args], env=env, input=input)


def test_keys_list_export_and_import_round_trip_through_the_command(cli_env, tmp_path, other_node):
    from teleledger.bootstrap import open_keystore
    from teleledger.config import Settings

    with open_keystore(Settings(**{k.removeprefix("TELELEDGER_").lower(): v for k, v in cli_env.items()})) as ks:
        address = ks.address("org:acme")
    listed = _keys(cli_env, "list")
    assert listed.exit_code == 0, listed.output
    assert "org:acme" in listed.output and address in listed.output

    password_file = tmp_path / "password.txt"
    password_file.write_text(PASSWORD + "\n")
    out = tmp_path / "acme.json"
    exported = _keys(cli_env, "export", "org:acme", "--out", str(out), "--password-file", str(password_file),
                     "--light-kdf")
    assert exported.exit_code == 0, exported.output
    assert out.stat().st_mode & 0o777 == 0o600
    data = json.loads(out.read_text())
    assert Account.from_key(Account.decrypt(data, PASSWORD)).address == address

    other_env = {**cli_env, "TELELEDGER_HOME": str(other_node.settings.home),
                 "TELELEDGER_DATABASE_URL": other_node.settings.database_url,
                 "TELELEDGER_MASTER_KEY": other_node.settings.master_key}
    imported = _keys(other_env, "import", "org:acme", str(out), input=PASSWORD + "\n")  # the prompt
    assert imported.exit_code == 0, imported.output
    assert address in imported.output
    assert other_node.keystore.address("org:acme") == address


def test_keys_import_with_a_wrong_password_says_so_and_exits_1(cli_env, tmp_path):
    out = tmp_path / "k.json"
    out.write_text(json.dumps(Account.encrypt(Account.create().key, PASSWORD, iterations=LIGHT)))
    result = _keys(cli_env, "import", "org:acme", str(out), input="wrong password\n")
    assert result.exit_code == 1
    assert "wrong password for this keystore file" in result.output
    assert "Traceback" not in result.output
    assert "org:acme" not in _keys(cli_env, "list").output


def test_keys_commands_refuse_bad_input_with_a_message_and_exit_1(cli_env, tmp_path):
    password_file = tmp_path / "password.txt"
    password_file.write_text(PASSWORD)
    cases = [
        (["export", "org:nobody", "--out", str(tmp_path / "x.json"), "--password-file", str(password_file)],
         "no key 'org:nobody'"),
        (["import", "org:acme", str(tmp_path / "missing.json"), "--password-file", str(password_file)],
         "cannot read"),
        (["export", "bad id", "--out", str(tmp_path / "y.json"), "--password-file", str(password_file)],
         "key id must be"),
    ]
    not_json = tmp_path / "not.json"
    not_json.write_text("hello")
    cases.append((["import", "org:acme", str(not_json), "--password-file", str(password_file)], "not JSON"))
    for args, message in cases:
        result = _keys(cli_env, *args)
        assert result.exit_code == 1, (args, result.output)
        assert message in result.output, (args, result.output)
        assert "Traceback" not in result.output
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "y.json").exists()
    # an existing file is never overwritten
    existing = tmp_path / "existing.json"
    existing.write_text("keep me")
    result = _keys(cli_env, "export", "node:authority", "--out", str(existing), "--password-file", str(password_file))
    assert result.exit_code == 1 and "exists" in result.output
    assert existing.read_text() == "keep me"


def test_keys_export_asks_for_the_password_twice_and_refuses_a_mismatch(cli_env, tmp_path):
    out = tmp_path / "a.json"
    result = _keys(cli_env, "export", "node:authority", "--out", str(out), "--light-kdf",
                   input=f"{PASSWORD}\n{PASSWORD}\n")
    assert result.exit_code == 0, result.output
    assert bytes(Account.decrypt(json.loads(out.read_text()), PASSWORD))
    result = _keys(cli_env, "export", "node:authority", "--out", str(tmp_path / "b.json"), "--light-kdf",
                   input=f"{PASSWORD}\nsomething else\n")
    assert result.exit_code != 0
    assert not (tmp_path / "b.json").exists()


# ---- keystore keys sign EIP-712 consent; the contract refuses replays and alterations -------------


ORG = b"acme".ljust(32, b"\0")
PSEUDONYM = bytes.fromhex("aa" * 32)
GRANTEE = b"pharmacy".ljust(32, b"\0")
PROVISION = bytes.fromhex("cc" * 32)
FAR = 2**40


def _vrs(key: keys.PrivateKey, digest: bytes) -> tuple[int, bytes, bytes]:
    sig = key.sign_msg_hash(digest)
    return sig.v + 27, sig.r.to_bytes(32, "big"), sig.s.to_bytes(32, "big")


def test_a_consent_grant_signed_with_a_keystore_key_verifies_and_a_replayed_or_altered_one_is_refused(node, tmp_path):
    from eth_account.messages import encode_typed_data

    from teleledger.ledger.chain import ROLE_OPERATOR, ROLE_ORG_ADMIN, eip712
    from teleledger.ledger.chain.client import ChainRevert
    from teleledger.ledger.chain.deploy import deploy_all
    from teleledger.ledger.chain.embedded import EmbeddedChain

    authority = node.keystore.key(NODE_AUTHORITY)
    operator = authority.public_key.to_checksum_address()
    chain = EmbeddedChain(tmp_path / "chain", authority)
    try:
        contracts = deploy_all(chain, authority, [operator], 1)
        registry, consent = contracts["ParticipantRegistry"], contracts["ConsentRegistry"]
        chain.transact(registry, "ParticipantRegistry", "approve_organization", ORG, operator, sender=authority)
        chain.transact(registry, "ParticipantRegistry", "set_member_roles", ORG, operator, ROLE_ORG_ADMIN | ROLE_OPERATOR,
                       sender=authority)
        node.accounts.create_user(username="alice", password="correct-horse-battery", role="patient",
                                  patient="Patient/p-1")
        alice = node.keystore.key("user:alice")
        alice_address = node.keystore.address("user:alice")

        def digest(message: eip712.Message) -> bytes:
            return eip712.digest(message, chain_id=chain.chain_id(), verifying_contract=consent)

        bind = eip712.BindPatient(pseudonym=PSEUDONYM, signer=alice_address, nonce=0, deadline=FAR)
        chain.transact(consent, "ConsentRegistry", "bind_patient", ORG, PSEUDONYM, alice_address, FAR,
                       *_vrs(alice, digest(bind)), sender=authority)

        grant = eip712.GrantConsent(pseudonym=PSEUDONYM, grantee=GRANTEE, provision_hash=PROVISION, valid_from=0,
                                    valid_until=0, nonce=chain.call(consent, "ConsentRegistry", "nonces", PSEUDONYM),
                                    deadline=FAR)
        v, r, s = _vrs(alice, digest(grant))
        # anyone holding the message and the signature recovers who signed it
        recovered = keys.Signature(vrs=(v - 27, int.from_bytes(r, "big"), int.from_bytes(s, "big")))
        assert recovered.recover_public_key_from_msg_hash(digest(grant)).to_checksum_address() == alice_address
        # a patient's own wallet signing the same typed data produces the same signature
        typed = eip712.typed_data(grant, chain_id=chain.chain_id(), verifying_contract=consent)
        wallet = Account.sign_typed_data(alice.to_bytes(), full_message=typed)
        assert (wallet.v, wallet.r, wallet.s) == (v, int.from_bytes(r, "big"), int.from_bytes(s, "big"))
        assert Account.recover_message(encode_typed_data(full_message=typed), signature=wallet.signature) == alice_address

        receipt = chain.transact(consent, "ConsentRegistry", "grant_by_sig", PSEUDONYM, GRANTEE, PROVISION, 0, 0, FAR,
                                 v, r, s, sender=authority)
        assert [e.name for e in receipt.events] == ["ConsentGranted"]
        assert chain.call(consent, "ConsentRegistry", "is_active", PSEUDONYM, GRANTEE, PROVISION)

        with pytest.raises(ChainRevert, match="consent: invalid signature"):  # replayed
            chain.transact(consent, "ConsentRegistry", "grant_by_sig", PSEUDONYM, GRANTEE, PROVISION, 0, 0, FAR,
                           v, r, s, sender=authority)
        fresh = eip712.GrantConsent(pseudonym=PSEUDONYM, grantee=GRANTEE, provision_hash=PROVISION, valid_from=0,
                                    valid_until=0, nonce=2, deadline=FAR)
        v2, r2, s2 = _vrs(alice, digest(fresh))
        with pytest.raises(ChainRevert, match="consent: invalid signature"):  # relayed with other terms
            chain.transact(consent, "ConsentRegistry", "grant_by_sig", PSEUDONYM, GRANTEE, PROVISION, 0, 12345, FAR,
                           v2, r2, s2, sender=authority)
        tampered_s = (int.from_bytes(s2, "big") ^ 1).to_bytes(32, "big")
        with pytest.raises(ChainRevert, match="consent: invalid signature"):  # altered signature bytes
            chain.transact(consent, "ConsentRegistry", "grant_by_sig", PSEUDONYM, GRANTEE, PROVISION, 0, 0, FAR,
                           v2, r2, tampered_s, sender=authority)
        assert chain.call(consent, "ConsentRegistry", "nonces", PSEUDONYM) == 2
    finally:
        chain.close()
