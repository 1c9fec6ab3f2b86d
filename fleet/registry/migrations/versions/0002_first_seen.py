"""Devices remember when they were first seen (the inventory's ``first_seen``).

Revision ID: 0002_first_seen
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_first_seen"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("first_seen", sa.DateTime(timezone=True)))
    # Devices registered before this revision: the best we know is when they were last seen.
    op.execute("UPDATE devices SET first_seen = last_seen WHERE first_seen IS NULL")


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("first_seen")
