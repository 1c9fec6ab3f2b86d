"""The drift score above which a telemetry window counts as drifted (drawn on the drift chart).

Revision ID: 0008_drift_threshold
Revises: 0007_board_health
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_drift_threshold"
down_revision = "0007_board_health"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("telemetry") as batch:
        batch.add_column(sa.Column("drift_threshold", sa.Float, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("telemetry") as batch:
        batch.drop_column("drift_threshold")
