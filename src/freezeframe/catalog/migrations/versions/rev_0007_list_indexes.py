"""Indexes that serve a snapshot list's keyset pages.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06

Replaces ``ix_snapshots_created_at`` (``created_at``) and ``ix_snapshots_vm`` (``vm``) by
``ix_snapshots_created_at_id`` (``created_at, id``) and ``ix_snapshots_vm_created_at``
(``vm, created_at, id``): a page of every snapshot, or of one VM's, in ``(created_at, id)``
order (either direction) after a cursor is then one index range read of ``limit`` entries,
not a sort of all the VM's records. The old indexes are prefixes of the new ones.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_snapshots_created_at_id", "snapshots", ["created_at", "id"])
    op.create_index("ix_snapshots_vm_created_at", "snapshots", ["vm", "created_at", "id"])
    op.drop_index("ix_snapshots_created_at", table_name="snapshots")
    op.drop_index("ix_snapshots_vm", table_name="snapshots")


def downgrade() -> None:
    op.create_index("ix_snapshots_vm", "snapshots", ["vm"])
    op.create_index("ix_snapshots_created_at", "snapshots", ["created_at"])
    op.drop_index("ix_snapshots_vm_created_at", table_name="snapshots")
    op.drop_index("ix_snapshots_created_at_id", table_name="snapshots")
