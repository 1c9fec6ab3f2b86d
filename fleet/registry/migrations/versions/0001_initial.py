"""The first registry schema: fleets, devices, bundles, rollouts, deployments, telemetry, events.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "fleets",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("created_at", TZ, nullable=False),
    )
    op.create_table(
        "devices",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("fleet", sa.String(64), sa.ForeignKey("fleets.name"), nullable=False),
        sa.Column("online", sa.Boolean, nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("bundle_id", sa.String(64)),
        sa.Column("bundle_name", sa.String(64)),
        sa.Column("bundle_version", sa.String(64)),
        sa.Column("last_seen", TZ),
        sa.Column("last_seq", sa.BigInteger, nullable=False),
        sa.Column("latency_p95_ms", sa.Float),
        sa.Column("drift_score", sa.Float),
        sa.Column("drifted", sa.Boolean, nullable=False),
        sa.Column("detail", sa.Text),
    )
    op.create_index("ix_devices_fleet", "devices", ["fleet"])
    op.create_table(
        "bundles",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("manifest", sa.JSON, nullable=False),
    )
    op.create_index("ix_bundles_name", "bundles", ["name"])
    op.create_table(
        "rollouts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("fleet", sa.String(64), sa.ForeignKey("fleets.name"), nullable=False),
        sa.Column("bundle_id", sa.String(64), sa.ForeignKey("bundles.id"), nullable=False),
        sa.Column("previous_bundle_id", sa.String(64)),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("canaries", sa.JSON, nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("updated_at", TZ, nullable=False),
    )
    op.create_index("ix_rollouts_fleet", "rollouts", ["fleet"])
    op.create_table(
        "deployments",
        sa.Column("rollout_id", sa.Integer, sa.ForeignKey("rollouts.id"), primary_key=True),
        sa.Column("device", sa.String(64), sa.ForeignKey("devices.id"), primary_key=True),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("updated_at", TZ, nullable=False),
    )
    op.create_table(
        "telemetry",
        sa.Column("device", sa.String(64), primary_key=True),
        sa.Column("seq", sa.BigInteger, primary_key=True),
        sa.Column("window_start", TZ, nullable=False),
        sa.Column("window_end", TZ, nullable=False),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column("errors", sa.Integer, nullable=False),
        sa.Column("latency_p50_ms", sa.Float),
        sa.Column("latency_p95_ms", sa.Float),
        sa.Column("latency_p99_ms", sa.Float),
        sa.Column("drift_score", sa.Float),
        sa.Column("drifted", sa.Boolean, nullable=False),
        sa.Column("bundle_version", sa.String(64)),
        sa.Column("dropped", sa.Integer, nullable=False),
        sa.Column("cpu_percent", sa.Float),
        sa.Column("memory_mb", sa.Float),
        sa.Column("temperature_c", sa.Float),
        sa.Column("resolution_s", sa.Integer, nullable=False),
    )
    op.create_index("ix_telemetry_window_end", "telemetry", ["window_end"])
    op.create_index("ix_telemetry_device_end", "telemetry", ["device", "window_end"])
    op.create_table(
        "events",
        sa.Column("device", sa.String(64), primary_key=True),
        sa.Column("seq", sa.BigInteger, primary_key=True),
        sa.Column("at", TZ, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("bundle_id", sa.String(64)),
        sa.Column("message", sa.Text, nullable=False),
    )
    op.create_index("ix_events_at", "events", ["at"])


def downgrade() -> None:
    for table in ("events", "telemetry", "deployments", "rollouts", "bundles", "devices", "fleets"):
        op.drop_table(table)
