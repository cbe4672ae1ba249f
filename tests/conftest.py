"""Shared fixtures: a real node on a real database (SQLite file, and PostgreSQL when CI provides it)."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from teleledger.config import Settings

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples" / "synthea-10"
PG_URL = os.environ.get("TELELEDGER_TEST_POSTGRES_URL", "")
BACKENDS = ["sqlite", "postgres"]


def reset_postgres(url: str) -> None:
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()


def database_url(backend: str, tmp_path: Path) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'teleledger.db'}"
    if not PG_URL:
        if os.environ.get("TELELEDGER_REQUIRE_POSTGRES"):
            pytest.fail("TELELEDGER_REQUIRE_POSTGRES is set but TELELEDGER_TEST_POSTGRES_URL is not")
        pytest.skip("PostgreSQL backend: set TELELEDGER_TEST_POSTGRES_URL (.ci/run does) to run this case")
    reset_postgres(PG_URL)
    return PG_URL


def make_settings(tmp_path: Path, url: str, **overrides: object) -> Settings:
    values: dict = dict(
        environment="test", home=tmp_path / "home", database_url=url,
        master_key=base64.b64encode(b"k" * 32).decode(), password_hashing="fast", demo_data=False,
        base_url="http://testserver",
        # the suites that need a chain pass chain_enabled=True: the others stay fast
        chain_enabled=False,
    )
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def settings(tmp_path: Path, backend: str) -> Settings:
    return make_settings(tmp_path, database_url(backend, tmp_path))


@pytest.fixture
def node(settings: Settings) -> Iterator:
    from teleledger.bootstrap import build

    n = build(settings)
    yield n
    n.close()


@pytest.fixture
def client(node):  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from teleledger.web.app import create_app

    with TestClient(create_app(node), raise_server_exceptions=False) as c:
        yield c
