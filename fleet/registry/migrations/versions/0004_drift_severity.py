"""Drift severity and the label-free accuracy estimate, per telemetry window and per device.

Revision ID: 0004_drift_severity
Revises: 0003_control_plane
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_drift_severity"
down_revision = "0003_control_plane"
branch_labels = None
depends_on = None

_COLUMNS = ("accuracy_estimate", "accuracy_low", "accuracy_high")


def upgrade() -> None:
    # Rows written before this revision have no severity: NULL, "not judged".
    for table in ("devices", "telemetry"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("drift_severity", sa.String(16), nullable=True))
            for name in _COLUMNS:
                batch.add_column(sa.Column(name, sa.Float(), nullable=True))


def downgrade() -> None:
    for table in ("devices", "telemetry"):
        with op.batch_alter_table(table) as batch:
            for name in ("drift_severity", *_COLUMNS):
                batch.drop_column(name)
