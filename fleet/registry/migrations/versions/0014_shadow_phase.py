"""The agent's peak memory with both models loaded, in each shadow window (docs/shadow.md).

(A rollout's shadow phase, ``push --canary N --shadow-first``, needs no column: the rollout's
document holds it.)

Revision ID: 0014_shadow_phase
Revises: 0013_bench_results
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014_shadow_phase"
down_revision = "0013_bench_results"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("shadow_windows") as batch:
        batch.add_column(sa.Column("peak_memory_bytes", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("shadow_windows") as batch:
        batch.drop_column("peak_memory_bytes")
