"""On-fleet benchmark reports (docs/bench.md): one row per device and candidate measured.

Revision ID: 0013_bench_results
Revises: 0012_shadow_severity
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013_bench_results"
down_revision = "0012_shadow_severity"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "bench_results",
        sa.Column("device", sa.String(64), primary_key=True),
        sa.Column("seq", sa.BigInteger, primary_key=True),
        sa.Column("fleet", sa.String(64), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("bench_seq", sa.BigInteger, nullable=False),
        sa.Column("candidate_id", sa.String(64), nullable=False),
        sa.Column("candidate_label", sa.String(140), nullable=False),
        sa.Column("board_class", sa.String(700), nullable=False),
        sa.Column("board_model", sa.String(200), nullable=True),
        sa.Column("board_cpu", sa.String(200), nullable=True),
        sa.Column("machine", sa.String(200), nullable=True),
        sa.Column("cores", sa.Integer, nullable=False),
        sa.Column("runtime", sa.String(32), nullable=False),
        sa.Column("xnnpack", sa.Boolean, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("load_ms", sa.Float, nullable=True),
        sa.Column("peak_rss_mb", sa.Float, nullable=True),
        sa.Column("added_rss_mb", sa.Float, nullable=True),
        sa.Column("by_threads", sa.Text, nullable=False),
        sa.Column("hc_samples", sa.Integer, nullable=True),
        sa.Column("hc_agreed", sa.Integer, nullable=True),
        sa.Column("hc_max_error", sa.Float, nullable=True),
        sa.Column("temperature_c", sa.Float, nullable=True),
        sa.Column("throttled", sa.String(32), nullable=True),
    )
    op.create_index("ix_bench_results_fleet_bench_seq", "bench_results", ["fleet", "bench_seq"])


def downgrade() -> None:
    op.drop_index("ix_bench_results_fleet_bench_seq", table_name="bench_results")
    op.drop_table("bench_results")
