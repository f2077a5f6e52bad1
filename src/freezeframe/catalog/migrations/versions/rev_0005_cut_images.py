"""What a snapshot holds at its cut: fingerprint, mode before protection, per-disk note.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06

Adds to ``snapshot_disks`` (all nullable: older records have none of it):
``fp_size``, ``fp_mtime_ns``, ``fp_inode`` (the image at the cut right after the cut settled,
compared by ``snapshot verify``: ``changed-since-cut``), ``image_mode`` (the image's mode
before freezeframe took its write bits away, for a merge to give back) and ``quiesce_note``
(a per-disk code such as ``no-mounted-filesystem``).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("snapshot_disks") as batch:
        batch.add_column(sa.Column("fp_size", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("fp_mtime_ns", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("fp_inode", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("image_mode", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("quiesce_note", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("snapshot_disks") as batch:
        for name in ("quiesce_note", "image_mode", "fp_inode", "fp_mtime_ns", "fp_size"):
            batch.drop_column(name)
