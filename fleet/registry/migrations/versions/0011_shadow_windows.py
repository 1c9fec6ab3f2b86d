"""Shadow-evaluation windows reported by devices (docs/shadow.md).

Revision ID: 0011_shadow_windows
Revises: 0010_device_trust
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011_shadow_windows"
down_revision = "0010_device_trust"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "shadow_windows",
        sa.Column("device", sa.String(64), primary_key=True),
        sa.Column("seq", sa.BigInteger, primary_key=True),
        sa.Column("window_end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("candidate_id", sa.String(64), nullable=False),
        sa.Column("candidate_label", sa.String(140), nullable=False),
        sa.Column("serving_version", sa.String(64), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("sample_rate", sa.Float, nullable=True),
        sa.Column("compared", sa.Integer, nullable=False),
        sa.Column("dropped", sa.Integer, nullable=False),
        sa.Column("classified", sa.Integer, nullable=False),
        sa.Column("agreed", sa.Integer, nullable=False),
        sa.Column("abs_error_mean", sa.Float, nullable=True),
        sa.Column("abs_error_max", sa.Float, nullable=True),
        sa.Column("serving_p50_ms", sa.Float, nullable=True),
        sa.Column("serving_p95_ms", sa.Float, nullable=True),
        sa.Column("candidate_p50_ms", sa.Float, nullable=True),
        sa.Column("candidate_p95_ms", sa.Float, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
    )
    op.create_index("ix_shadow_windows_candidate_id", "shadow_windows", ["candidate_id"])


def downgrade() -> None:
    op.drop_index("ix_shadow_windows_candidate_id", table_name="shadow_windows")
    op.drop_table("shadow_windows")
