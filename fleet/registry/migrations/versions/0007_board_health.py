"""The board's RAM and the state directory's disk in use, per telemetry window (the `board` rule).

Revision ID: 0007_board_health
Revises: 0006_desired_expiry
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_board_health"
down_revision = "0006_desired_expiry"
branch_labels = None
depends_on = None

_COLUMNS = ("memory_used_percent", "disk_used_percent")


def upgrade() -> None:
    with op.batch_alter_table("telemetry") as batch:
        for name in _COLUMNS:
            batch.add_column(sa.Column(name, sa.Float, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("telemetry") as batch:
        for name in _COLUMNS:
            batch.drop_column(name)
