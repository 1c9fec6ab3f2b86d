"""Every signed capture policy of a fleet, kept (the dataset README names those its records were
collected under; docs/capture.md).

Revision ID: 0015_capture_policies
Revises: 0014_shadow_phase
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015_capture_policies"
down_revision = "0014_shadow_phase"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "capture_policies",
        sa.Column("fleet", sa.String(64), primary_key=True),
        sa.Column("seq", sa.BigInteger, primary_key=True),
        sa.Column("enabled", sa.Boolean, nullable=False),
        sa.Column("note", sa.Text, nullable=False),
        sa.Column("signer", sa.String(64), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("document", sa.Text, nullable=False),
        sa.Column("envelope", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("capture_policies")
