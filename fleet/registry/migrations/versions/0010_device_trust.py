"""What a device on the TUF key hierarchy last reported: the root version it trusts and when the
timestamp it applied expires (the `old_root` and `trust_expiry` alert rules; docs/alerts.md).

Revision ID: 0010_device_trust
Revises: 0009_capture
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010_device_trust"
down_revision = "0009_capture"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("trust_root", sa.Integer, nullable=True))
        batch.add_column(sa.Column("trust_expires", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("trust_expires")
        batch.drop_column("trust_root")
