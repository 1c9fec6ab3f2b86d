"""The newest desired state of each fleet and device, with its expiry (the `expiry` alert rule).

Revision ID: 0006_desired_expiry
Revises: 0005_alerts
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_desired_expiry"
down_revision = "0005_alerts"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "desired_states",
        sa.Column("fleet", sa.String(64), primary_key=True),
        sa.Column("device", sa.String(64), primary_key=True),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("bundle_id", sa.String(64), nullable=False),
        sa.Column("label", sa.String(140), nullable=False),
        sa.Column("issued_at", TZ, nullable=False),
        sa.Column("expires_at", TZ, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("desired_states")
