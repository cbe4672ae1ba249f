"""``teleledger keys``: list, export and import the node's secp256k1 keys.

    teleledger keys list
    teleledger keys export KEY_ID --out FILE [--password-file FILE] [--light-kdf]
    teleledger keys import KEY_ID FILE [--password-file FILE] [--replace]

Keys leave and enter only as standard Ethereum keystore v3 JSON (scrypt), which geth,
MetaMask and eth-account read and write. The password comes from the first line of
``--password-file`` or, without one, from a hidden prompt (asked twice on export). An exported
file is written with mode 0600 and never over an existing file. Every error a user can cause
(wrong password, malformed file, unknown key id) ends in a one-line message and exit status 1.

This module must never print a private key or a password.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from teleledger.cli_support import fail, load_settings
from teleledger.core.errors import TeleledgerError

__all__ = ["register"]

#: geth's --lightkdf cost: fast to open, far cheaper to brute-force than the standard 2^18
LIGHT_SCRYPT_N = 1 << 12


_fail, _settings = fail, load_settings


def _password(password_file: Path | None, *, confirm: bool) -> str:
    if password_file is not None:
        try:
            text = password_file.read_text(encoding="utf-8")
        except OSError as exc:
            _fail(f"cannot read the password file {password_file}: {exc.strerror or exc}")
        except UnicodeDecodeError:
            _fail(f"the password file {password_file} is not UTF-8 text")
        lines = text.splitlines()
        password = lines[0] if lines else ""
    else:
        password = typer.prompt("Keystore password", hide_input=True, confirmation_prompt=confirm)
    if not password:
        _fail("the password is empty")
    return password


def _write_new(path: Path, text: str) -> None:
    """Write ``text`` to a new file, mode 0600 from its creation (no window where others may read)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        _fail(f"{path} exists; choose another file (an exported key is never written over a file)")
    except OSError as exc:
        _fail(f"cannot create {path}: {exc.strerror or exc}")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def register(app: typer.Typer) -> None:
    keys_app = typer.Typer(help="the node's secp256k1 keys: list, export and import (Ethereum keystore JSON)",
                           no_args_is_help=True)
    app.add_typer(keys_app, name="keys")

    @keys_app.command("list")
    def list_() -> None:
        """Show every key id and its address."""
        from teleledger.bootstrap import open_keystore

        try:
            with open_keystore(_settings()) as keystore:
                rows = keystore.key_ids()
        except TeleledgerError as exc:
            _fail(exc.message)
        table = Table(title=f"{len(rows)} key{'s' if len(rows) != 1 else ''} in the keystore")
        table.add_column("key id")
        table.add_column("address")
        for key_id, address in rows:
            table.add_row(escape(key_id), address)
        Console(soft_wrap=True).print(table)

    @keys_app.command("export")
    def export(
        key_id: Annotated[str, typer.Argument(help="e.g. node:authority, user:alice, org:acme")],
        out: Annotated[Path, typer.Option("--out", help="the keystore JSON file to create (mode 0600)")],
        password_file: Annotated[Optional[Path], typer.Option(help="read the password from this file's first line")] = None,
        light_kdf: Annotated[bool, typer.Option("--light-kdf", help="scrypt N=2^12 instead of 2^18: faster, weaker")] = False,
    ) -> None:
        """Write one key as a standard Ethereum keystore v3 file, encrypted with a password."""
        from teleledger.bootstrap import open_keystore
        from teleledger.identity.keystore import STANDARD_SCRYPT_N

        if out.exists():
            _fail(f"{out} exists; choose another file (an exported key is never written over a file)")
        try:
            with open_keystore(_settings()) as keystore:
                keystore.key(key_id, create=False)  # an unknown id fails before the password is asked
                password = _password(password_file, confirm=True)
                data = keystore.export_json(key_id, password,
                                            scrypt_n=LIGHT_SCRYPT_N if light_kdf else STANDARD_SCRYPT_N)
        except TeleledgerError as exc:
            _fail(exc.message)
        _write_new(out, json.dumps(data, indent=2) + "\n")
        typer.echo(f"exported {key_id} (address 0x{data['address']}) to {out}")

    @keys_app.command("import")
    def import_(
        key_id: Annotated[str, typer.Argument(help="the key id to store the key under")],
        file: Annotated[Path, typer.Argument(help="an Ethereum keystore v3 JSON file")],
        password_file: Annotated[Optional[Path], typer.Option(help="read the password from this file's first line")] = None,
        replace: Annotated[bool, typer.Option("--replace", help="overwrite a different key stored under KEY_ID")] = False,
    ) -> None:
        """Store the key of an Ethereum keystore v3 file under KEY_ID."""
        from teleledger.bootstrap import open_keystore

        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            _fail(f"cannot read {file}: {exc.strerror or exc}")
        except UnicodeDecodeError:
            _fail(f"{file} is not a keystore JSON file (not UTF-8 text)")
        password = _password(password_file, confirm=False)
        try:
            with open_keystore(_settings()) as keystore:
                address = keystore.import_json(key_id, text, password, replace=replace)
        except TeleledgerError as exc:
            _fail(exc.message)
        typer.echo(f"imported {key_id}: address {address}")
