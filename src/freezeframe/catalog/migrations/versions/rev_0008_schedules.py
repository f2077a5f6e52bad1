"""Snapshot schedules with retention rules.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06

Adds ``schedules``: one row per VM (``vm`` is the key) with the interval (``every_s``), the
keep rules (``keep_last`` ... ``keep_yearly``, NULL: off), the quiesce policy asked (NULL: the
VM's own), ``enabled``, and the last run: ``last_run_at`` (the claim a server moves with a
compare-and-set before running a slot), ``run_owner``, ``last_snapshot``, ``last_outcome``,
``last_error``, ``last_prune`` (what the prune after it did), ``last_finished_at``.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "schedules",
        sa.Column("vm", sa.String(length=255), nullable=False),
        sa.Column("every_s", sa.Integer(), nullable=False),
        sa.Column("keep_last", sa.Integer(), nullable=True),
        sa.Column("keep_hourly", sa.Integer(), nullable=True),
        sa.Column("keep_daily", sa.Integer(), nullable=True),
        sa.Column("keep_weekly", sa.Integer(), nullable=True),
        sa.Column("keep_monthly", sa.Integer(), nullable=True),
        sa.Column("keep_yearly", sa.Integer(), nullable=True),
        sa.Column("quiesce", sa.String(length=32), nullable=True),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_run_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("run_owner", sa.String(length=255), nullable=True),
        sa.Column("last_snapshot", sa.String(length=255), nullable=True),
        sa.Column("last_outcome", sa.String(length=64), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("last_prune", sa.Text(), nullable=True),
        sa.Column("last_finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("vm", name=op.f("pk_schedules")),
    )


def downgrade() -> None:
    op.drop_table("schedules")
