"""Alembic environment: runs on the connection handed over by service.storage.db.migrate."""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

from service.storage import models  # noqa: F401  (registers the tables)

target_metadata = SQLModel.metadata
connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `iectox migrate` (service.storage.db.migrate)")
context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
