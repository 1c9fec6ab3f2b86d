"""The candidate's drift severity in each shadow window (docs/shadow.md).

Revision ID: 0012_shadow_severity
Revises: 0011_shadow_windows
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012_shadow_severity"
down_revision = "0011_shadow_windows"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("shadow_windows") as batch:
        batch.add_column(sa.Column("candidate_severity", sa.String(16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("shadow_windows") as batch:
        batch.drop_column("candidate_severity")
