"""What every ``teleledger`` command group shares: the error console, the one-line failure, and
loading the settings with a bad one reported as such (never a traceback)."""

from __future__ import annotations

from typing import NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from teleledger.config import Settings

__all__ = ["console", "fail", "load_settings"]

# soft_wrap: an error message stays on one line when stderr is not a terminal
console = Console(stderr=True, soft_wrap=True)


def fail(message: str, code: int = 1) -> NoReturn:
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def load_settings(**overrides: object) -> Settings:
    """The settings from the environment; ``overrides`` (command options) win when not None."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        fail(f"bad setting TELELEDGER_{'_'.join(str(p) for p in first['loc']).upper()}: {first['msg']}")
