"""Alembic environment: always run with a connection handed over by `Database.migrate`."""

from __future__ import annotations

from alembic import context

from tuberunner.coordinator.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only reachable from the alembic CLI
    raise RuntimeError("run migrations through tuberunner (Database.migrate), not the alembic CLI")

context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
