"""Initial schema of the freezeframe catalog.

Revision ID: 0001
Revises:
Create Date: 2026-11-26

Creates every table of the catalog (see freezeframe.catalog for what each holds).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "freeze_intents",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("vm", sa.String(length=255), nullable=False),
        sa.Column("snapshot_id", sa.String(length=255), nullable=False),
        sa.Column("qga_path", sa.Text(), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("owner", sa.String(length=255), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("closed_by", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_freeze_intents")),
    )
    op.create_index(op.f("ix_freeze_intents_vm"), "freeze_intents", ["vm"], unique=False)

    op.create_table(
        "snapshots",
        sa.Column("id", sa.String(length=255), nullable=False),
        sa.Column("vm", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("policy", sa.String(length=32), nullable=False),
        sa.Column("level", sa.String(length=32), nullable=False),
        sa.Column("level_reason", sa.Text(), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("parent_id", sa.String(length=255), nullable=True),
        sa.Column("freeze_window_ms", sa.Double(), nullable=True),
        sa.Column("evidence", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_snapshots")),
    )
    op.create_index(op.f("ix_snapshots_created_at"), "snapshots", ["created_at"], unique=False)
    op.create_index(op.f("ix_snapshots_vm"), "snapshots", ["vm"], unique=False)

    op.create_table(
        "vm_locks",
        sa.Column("vm", sa.String(length=255), nullable=False),
        sa.Column("owner", sa.String(length=255), nullable=False),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("vm", name=op.f("pk_vm_locks")),
    )
    op.create_table(
        "vms",
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("driver", sa.String(length=64), nullable=False),
        sa.Column("qmp_path", sa.Text(), nullable=True),
        sa.Column("qga_path", sa.Text(), nullable=True),
        sa.Column("agent", sa.Boolean(), nullable=False),
        sa.Column("quiesce", sa.String(length=32), nullable=False),
        sa.Column("freeze_timeout", sa.Double(), nullable=False),
        sa.Column("agent_log_path", sa.Text(), nullable=True),
        sa.Column("exclude_mounts", sa.JSON(), nullable=False),
        sa.Column("lab", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_vms")),
    )
    op.create_table(
        "snapshot_disks",
        sa.Column("snapshot_id", sa.String(length=255), nullable=False),
        sa.Column("ordinal", sa.Integer(), nullable=False),
        sa.Column("device", sa.String(length=255), nullable=False),
        sa.Column("node", sa.String(length=255), nullable=False),
        sa.Column("image", sa.Text(), nullable=False),
        sa.Column("format", sa.String(length=64), nullable=False),
        sa.Column("overlay", sa.Text(), nullable=True),
        sa.Column("backend", sa.String(length=64), nullable=False),
        sa.Column("virtual_size", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["snapshot_id"],
            ["snapshots.id"],
            name=op.f("fk_snapshot_disks_snapshot_id_snapshots"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("snapshot_id", "ordinal", name=op.f("pk_snapshot_disks")),
    )
    op.create_table(
        "snapshot_filesystems",
        sa.Column("snapshot_id", sa.String(length=255), nullable=False),
        sa.Column("ordinal", sa.Integer(), nullable=False),
        sa.Column("mountpoint", sa.Text(), nullable=False),
        sa.Column("fstype", sa.String(length=64), nullable=False),
        sa.Column("device", sa.String(length=255), nullable=True),
        sa.Column("frozen", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["snapshot_id"],
            ["snapshots.id"],
            name=op.f("fk_snapshot_filesystems_snapshot_id_snapshots"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("snapshot_id", "ordinal", name=op.f("pk_snapshot_filesystems")),
    )
    op.create_table(
        "timeline_events",
        sa.Column("snapshot_id", sa.String(length=255), nullable=False),
        sa.Column("ordinal", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("t", sa.DateTime(timezone=True), nullable=False),
        sa.Column("mono_ns", sa.BigInteger(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["snapshot_id"],
            ["snapshots.id"],
            name=op.f("fk_timeline_events_snapshot_id_snapshots"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("snapshot_id", "ordinal", name=op.f("pk_timeline_events")),
    )
    op.create_table(
        "verifications",
        sa.Column("snapshot_id", sa.String(length=255), nullable=False),
        sa.Column("verdict", sa.String(length=32), nullable=False),
        sa.Column("checked_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("bytes_read", sa.BigInteger(), nullable=False),
        sa.Column("duration_ms", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(
            ["snapshot_id"],
            ["snapshots.id"],
            name=op.f("fk_verifications_snapshot_id_snapshots"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("snapshot_id", name=op.f("pk_verifications")),
    )
    op.create_table(
        "fs_checks",
        sa.Column("snapshot_id", sa.String(length=255), nullable=False),
        sa.Column("ordinal", sa.Integer(), nullable=False),
        sa.Column("device", sa.String(length=255), nullable=False),
        sa.Column("fstype", sa.String(length=64), nullable=False),
        sa.Column("verdict", sa.String(length=32), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("log_replayed", sa.Boolean(), nullable=False),
        sa.Column("partition", sa.String(length=255), nullable=True),
        sa.ForeignKeyConstraint(
            ["snapshot_id"],
            ["verifications.snapshot_id"],
            name=op.f("fk_fs_checks_snapshot_id_verifications"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("snapshot_id", "ordinal", name=op.f("pk_fs_checks")),
    )


def downgrade() -> None:
    op.drop_table("fs_checks")
    op.drop_table("verifications")
    op.drop_table("timeline_events")
    op.drop_table("snapshot_filesystems")
    op.drop_table("snapshot_disks")
    op.drop_table("vms")
    op.drop_table("vm_locks")
    op.drop_index(op.f("ix_snapshots_vm"), table_name="snapshots")
    op.drop_index(op.f("ix_snapshots_created_at"), table_name="snapshots")
    op.drop_table("snapshots")
    op.drop_index(op.f("ix_freeze_intents_vm"), table_name="freeze_intents")
    op.drop_table("freeze_intents")
