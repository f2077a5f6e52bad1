"""A VM's Ceph connection settings for its RBD disks.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06

Adds ``vms.ceph_conf``, ``vms.ceph_id`` and ``vms.ceph_keyring`` (nullable: without them the
settings QEMU/libvirt give each RBD disk, else the global defaults, are used). Paths and a
client id only: no secret is ever stored in the catalog. The RBD snapshot of a disk is
recorded in ``snapshot_disks`` as ``backend = 'rbd'``, ``image = 'rbd:pool/image@ff-ID'``
(no new column).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        batch.add_column(sa.Column("ceph_conf", sa.Text(), nullable=True))
        batch.add_column(sa.Column("ceph_id", sa.Text(), nullable=True))
        batch.add_column(sa.Column("ceph_keyring", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        batch.drop_column("ceph_keyring")
        batch.drop_column("ceph_id")
        batch.drop_column("ceph_conf")
