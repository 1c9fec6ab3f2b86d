"""Alembic environment: run by edgekit.fleet.registry.migrate(), which passes the connection."""

from __future__ import annotations

from alembic import context
from edgekit.fleet.registry.models import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
