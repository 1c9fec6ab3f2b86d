"""The control plane moves into the registry: the bundle catalog, each fleet's record (desired-
state sequence counter, what it was last told to run), rollouts, who drives a fleet, an audit log,
the operators' accounts and API sessions, and a record of every device provisioned.

Until this revision those lived in files under one operator's ``$EDGEKIT_HOME``
(``bundles/``, ``fleets/``, ``rollouts/``); :meth:`edgekit.fleet.control.ControlPlane.import_home`
brings an existing home in once. The ``bundles``, ``rollouts`` and ``deployments`` tables of
revision 0001 were never written to; they are replaced.

Revision ID: 0003_control_plane
Revises: 0002_first_seen
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_control_plane"
down_revision = "0002_first_seen"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.drop_table("deployments")
    op.drop_table("rollouts")
    op.drop_index("ix_bundles_name", table_name="bundles")
    op.drop_table("bundles")
    op.create_table(
        "catalog",
        sa.Column("bundle_id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("added_by", sa.String(128), nullable=False),
        sa.Column("added_at", TZ, nullable=False),
        sa.UniqueConstraint("name", "version", name="uq_catalog_name_version"),
    )
    op.create_table(
        "fleet_records",
        sa.Column("fleet", sa.String(64), primary_key=True),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("bundle_id", sa.String(64)),
        sa.Column("label", sa.String(140)),
        sa.Column("history", sa.JSON, nullable=False),
        sa.Column("devices", sa.JSON, nullable=False),
        sa.Column("updated_at", TZ, nullable=False),
    )
    op.create_table(
        "rollouts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("fleet", sa.String(64), nullable=False),
        sa.Column("label", sa.String(140), nullable=False),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("started_by", sa.String(128), nullable=False),
        sa.Column("started_at", TZ, nullable=False),
        sa.Column("updated_at", TZ, nullable=False),
        sa.Column("doc", sa.Text, nullable=False),
    )
    op.create_index("ix_rollouts_fleet", "rollouts", ["fleet"])
    op.create_table(
        "fleet_drivers",
        sa.Column("fleet", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(200), nullable=False),
        sa.Column("since", TZ, nullable=False),
    )
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", TZ, nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("fleet", sa.String(64)),
        sa.Column("target", sa.String(200)),
        sa.Column("result", sa.String(16), nullable=False),
        sa.Column("detail", sa.Text),
    )
    op.create_index("ix_audit_log_at", "audit_log", ["at"])
    op.create_table(
        "provisioned_devices",
        sa.Column("device", sa.String(64), primary_key=True),
        sa.Column("fleet", sa.String(64), nullable=False),
        sa.Column("username", sa.String(64), nullable=False),
        sa.Column("tls", sa.Boolean, nullable=False),
        sa.Column("added_by", sa.String(128), nullable=False),
        sa.Column("added_at", TZ, nullable=False),
    )
    op.create_table(
        "accounts",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("password_hash", sa.String(200), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
    )
    op.create_table(
        "api_sessions",
        sa.Column("token_hash", sa.String(64), primary_key=True),
        sa.Column("account", sa.String(64), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("expires_at", TZ, nullable=False),
    )
    op.create_index("ix_api_sessions_account", "api_sessions", ["account"])
    op.create_table(
        "control_meta",
        sa.Column("key", sa.String(200), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )


def downgrade() -> None:
    for table in (
        "control_meta",
        "api_sessions",
        "accounts",
        "provisioned_devices",
        "audit_log",
        "fleet_drivers",
        "rollouts",
        "fleet_records",
        "catalog",
    ):
        op.drop_table(table)
