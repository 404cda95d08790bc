"""Shared fixtures: real databases (SQLite file and the local PostgreSQL), the app, clients.

PostgreSQL tests never skip: if the server at IECTOX_TEST_POSTGRES_URL (default
127.0.0.1:5432, database test, trust auth) is unreachable they fail.

Markers (pyproject.toml): a test is ``integration`` when it needs PostgreSQL, the Node FHIR
test server, the npm validators, uvicorn or a subprocess. Every test that uses the ``engine``
fixture (so also ``clean_engine``, ``app``, ``client``: parametrised over SQLite and
PostgreSQL), the ``fhir_server`` or the ``chromium`` fixture is marked here; the others that need node or a
subprocess carry the mark in their module. ``pytest -m "not integration"`` runs the pure tests.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from sqlalchemy import Engine, create_engine, text
from sqlmodel import SQLModel

from service.api.app import create_app
from service.config.settings import Settings
from service.storage.db import make_engine, migrate, normalise_url
from tests.auth import auth_settings, bearer
from tests.browser import chromium  # noqa: F401  (Debian's Chromium through Playwright)
from tests.fhir_server import fhir_server, fhir_server_clean  # noqa: F401  (real FHIR test server)

# Fixtures that make a test an integration test (directly or through other fixtures).
INTEGRATION_FIXTURES = frozenset({"engine", "fhir_server", "chromium"})

PG_URL = os.environ.get("IECTOX_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
FIXED_NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


def pg_url(schema: str) -> str:
    """PG_URL with `schema` as the search path (for make_engine, settings and child processes)."""
    return f"{PG_URL}{'&' if '?' in PG_URL else '?'}options=-csearch_path%3D{schema}"


def _pg_engine(schema: str) -> Engine:
    return make_engine(pg_url(schema))  # as the service builds it (hidden parameters, lock_timeout)


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """A migrated database of each kind; PostgreSQL gets a private schema, dropped at the end."""
    if request.param == "sqlite":
        eng = make_engine(f"sqlite:///{tmp_path_factory.mktemp('db') / 'iectox.db'}")
        migrate(eng)
        yield eng
        eng.dispose()
        return
    schema = f"iectox_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(normalise_url(PG_URL))
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    eng = _pg_engine(schema)
    migrate(eng)
    yield eng
    eng.dispose()
    with admin.begin() as conn:
        conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


@pytest.fixture
def clean_engine(engine: Engine) -> Iterator[Engine]:
    yield engine
    with engine.begin() as conn:
        for table in reversed(SQLModel.metadata.sorted_tables):
            conn.execute(table.delete())


@pytest.fixture
def settings() -> Settings:
    # jwt mode trusting the test issuer (tests/auth.py); the `client` fixture sends its token.
    return Settings(
        database_url="sqlite://", auto_migrate=False, max_body_bytes=200_000, max_bundle_entries=300, **auth_settings()
    )


@pytest.fixture
def app(settings: Settings, clean_engine: Engine):  # type: ignore[no-untyped-def]
    return create_app(settings, engine=clean_engine, clock=lambda: FIXED_NOW)


@pytest_asyncio.fixture
async def client(app) -> AsyncIterator[httpx.AsyncClient]:  # type: ignore[no-untyped-def]
    """Sends a valid bearer token with broad scopes (system/*.read system/*.write) by default."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://iectox.test", headers=bearer()) as c:
        yield c


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
