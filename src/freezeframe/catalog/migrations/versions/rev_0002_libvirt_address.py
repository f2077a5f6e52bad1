"""VMs reached through libvirt: the connection URI and the domain's UUID.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06

Adds ``vms.connect_uri`` and ``vms.domain`` (both nullable: QMP VMs keep using their socket
paths). A freeze intent's ``qga_path`` column now holds the driver's agent address, which for
existing rows is the socket path it always held.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        batch.add_column(sa.Column("connect_uri", sa.Text(), nullable=True))
        batch.add_column(sa.Column("domain", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        batch.drop_column("domain")
        batch.drop_column("connect_uri")
