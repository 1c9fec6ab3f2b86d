"""Captured field data: devices' sealed capture records (ciphertext; docs/capture.md).

Revision ID: 0009_capture
Revises: 0008_drift_threshold
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_capture"
down_revision = "0008_drift_threshold"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "capture_records",
        sa.Column("device", sa.String(64), primary_key=True),
        sa.Column("seq", sa.BigInteger, primary_key=True),
        sa.Column("fleet", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("received_at", TZ, nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )
    op.create_index("ix_capture_records_fleet", "capture_records", ["fleet"])
    op.create_index("ix_capture_records_received_at", "capture_records", ["received_at"])


def downgrade() -> None:
    op.drop_index("ix_capture_records_received_at", table_name="capture_records")
    op.drop_index("ix_capture_records_fleet", table_name="capture_records")
    op.drop_table("capture_records")
