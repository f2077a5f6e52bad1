"""What a VM lock is held for (snapshot, doctor, recover, lab down).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06

Adds ``vm_locks.purpose`` (nullable: a lock taken by an older freezeframe reads as
``snapshot``), so that a refusal names what really holds the VM.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("vm_locks") as batch:
        batch.add_column(sa.Column("purpose", sa.String(32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("vm_locks") as batch:
        batch.drop_column("purpose")
