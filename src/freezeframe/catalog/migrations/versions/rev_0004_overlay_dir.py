"""A VM's own directory for the overlays of its snapshots.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06

Adds ``vms.overlay_dir`` (nullable: without it an overlay is created next to the image it
covers, as before), set by ``vm add --overlay-dir`` where a disk's own directory is not right.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        batch.add_column(sa.Column("overlay_dir", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        batch.drop_column("overlay_dir")
