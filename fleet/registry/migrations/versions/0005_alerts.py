"""Alerts: rules, channels, alerts, pending deliveries and the evaluator's lease.

Revision ID: 0005_alerts
Revises: 0004_drift_severity
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_alerts"
down_revision = "0004_drift_severity"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "alert_rules",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("settings", sa.JSON, nullable=False),
        sa.Column("updated_at", TZ, nullable=False),
    )
    op.create_table(
        "alert_channels",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("settings", sa.JSON, nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("failing_since", TZ),
    )
    op.create_table(
        "alerts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("rule", sa.String(32), nullable=False),
        sa.Column("subject", sa.String(128), nullable=False),
        sa.Column("origin", sa.String(160)),
        sa.Column("fleet", sa.String(64)),
        sa.Column("device", sa.String(64)),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("since", TZ, nullable=False),
        sa.Column("opened_at", TZ),
        sa.Column("clearing_since", TZ),
        sa.Column("resolved_at", TZ),
        sa.Column("acked_at", TZ),
        sa.Column("acked_by", sa.String(64)),
        sa.Column("summary", sa.Text, nullable=False),
        sa.Column("facts", sa.JSON, nullable=False),
    )
    op.create_index("ix_alerts_rule_subject_state", "alerts", ["rule", "subject", "state"])
    op.create_table(
        "alert_deliveries",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "channel_id",
            sa.Integer,
            sa.ForeignKey("alert_channels.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("alert_id", sa.Integer, sa.ForeignKey("alerts.id")),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("next_attempt_at", TZ, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("last_error", sa.Text),
        sa.Column("sent_at", TZ),
        sa.Column("message", sa.JSON, nullable=False),
    )
    op.create_index("ix_alert_deliveries_channel_id", "alert_deliveries", ["channel_id"])
    op.create_index("ix_alert_deliveries_state_next", "alert_deliveries", ["state", "next_attempt_at"])
    op.create_table(
        "alert_lease",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("holder", sa.String(64)),
        sa.Column("expires_at", TZ),
    )
    op.execute("INSERT INTO alert_lease (name) VALUES ('evaluator')")


def downgrade() -> None:
    for table in ("alert_lease", "alert_deliveries", "alerts", "alert_channels", "alert_rules"):
        op.drop_table(table)
