"""The chain model: images as catalog entries, snapshot holds, merge write-ahead records.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06

Adds ``images`` (one row per image of a VM disk's chain: a file layer or an RBD snapshot,
its backing image, the snapshot whose cut it holds, whether the disk writes to it, the mode
to give back to a merge), ``snapshot_disks.image_id`` (the row holding the disk's data at the
cut), ``snapshot_holds`` (readers of a snapshot: verify, export) and ``merges`` (write-ahead
records of a delete's layer merges).

Existing catalogs are filled in: for every ``done`` snapshot, oldest first, the image at the
cut gets a row naming the snapshot and each qcow2 overlay an ``active`` row backed by it; the
next snapshot's cut turns that overlay row into its image, as the catalog does from now on.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_NAME = sa.String(255)


def upgrade() -> None:
    op.create_table(
        "images",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("vm", _NAME, nullable=False),
        sa.Column("device", _NAME, nullable=False),
        sa.Column("location", sa.String(1024), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("format", sa.String(64), nullable=False),
        sa.Column("backing_id", sa.Integer(), nullable=True),
        sa.Column("snapshot_id", _NAME, nullable=True),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("mode", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["backing_id"],
            ["images.id"],
            name="fk_images_backing_id_images",
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_images"),
        sa.UniqueConstraint("vm", "location", name="uq_images_vm_location"),
    )
    op.create_index("ix_images_vm_device", "images", ["vm", "device"])
    op.create_table(
        "snapshot_holds",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("snapshot_id", _NAME, nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("owner", _NAME, nullable=False),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["snapshot_id"],
            ["snapshots.id"],
            name="fk_snapshot_holds_snapshot_id_snapshots",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_snapshot_holds"),
    )
    op.create_index("ix_snapshot_holds_snapshot_id", "snapshot_holds", ["snapshot_id"])
    op.create_table(
        "merges",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("vm", _NAME, nullable=False),
        sa.Column("snapshot_id", _NAME, nullable=False),
        sa.Column("device", _NAME, nullable=False),
        sa.Column("top", sa.String(1024), nullable=False),
        sa.Column("base", sa.String(1024), nullable=False),
        sa.Column("live", sa.Boolean(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("owner", _NAME, nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_merges"),
    )
    op.create_index("ix_merges_vm", "merges", ["vm"])
    with op.batch_alter_table("snapshot_disks") as batch:
        batch.add_column(sa.Column("image_id", sa.Integer(), nullable=True))
        batch.create_foreign_key(
            "fk_snapshot_disks_image_id_images", "images", ["image_id"], ["id"], ondelete="SET NULL"
        )
    _fill_images()


def _fill_images() -> None:
    """Rows for the images of existing ``done`` snapshots, oldest snapshot first."""
    bind = op.get_bind()
    now = datetime.now(UTC)
    if bind.dialect.name == "sqlite":
        now = now.replace(tzinfo=None)
    images = sa.Table(
        "images",
        sa.MetaData(),
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("vm", _NAME),
        sa.Column("device", _NAME),
        sa.Column("location", sa.String(1024)),
        sa.Column("kind", sa.String(32)),
        sa.Column("format", sa.String(64)),
        sa.Column("backing_id", sa.Integer()),
        sa.Column("snapshot_id", _NAME),
        sa.Column("active", sa.Boolean()),
        sa.Column("mode", sa.Integer()),
        sa.Column("created_at", sa.DateTime(timezone=True)),
    )
    rows = bind.execute(
        sa.text(
            "SELECT s.id, s.vm, d.ordinal, d.device, d.image, d.format, d.overlay, d.backend, "
            "d.image_mode FROM snapshots s JOIN snapshot_disks d ON d.snapshot_id = s.id "
            "WHERE s.status = 'done' ORDER BY s.created_at, s.id, d.ordinal"
        )
    ).all()
    known: dict[tuple[str, str], int] = {}

    def row_for(vm: str, device: str, location: str, kind: str, fmt: str) -> int:
        key = (vm, location)
        if key not in known:
            result = bind.execute(
                images.insert().values(
                    vm=vm,
                    device=device,
                    location=location,
                    kind=kind,
                    format=fmt,
                    backing_id=None,
                    snapshot_id=None,
                    active=False,
                    mode=None,
                    created_at=now,
                )
            )
            pk = result.inserted_primary_key
            assert pk is not None
            known[key] = int(pk[0])
        return known[key]

    for snap, vm, ordinal, device, image, fmt, overlay, backend, mode in rows:
        rbd = backend == "rbd"
        img = row_for(vm, device, image, "rbd-snap" if rbd else "file", fmt)
        bind.execute(
            images.update()
            .where(images.c.id == img)
            .values(snapshot_id=snap, active=False, mode=mode)
        )
        bind.execute(
            sa.text(
                "UPDATE snapshot_disks SET image_id = :img WHERE snapshot_id = :snap "
                "AND ordinal = :ordinal"
            ),
            {"img": img, "snap": snap, "ordinal": ordinal},
        )
        if not rbd and overlay:
            top = row_for(vm, device, overlay, "file", "qcow2")
            bind.execute(
                images.update()
                .where(images.c.id == top, images.c.snapshot_id.is_(None))
                .values(active=True, backing_id=img)
            )


def downgrade() -> None:
    with op.batch_alter_table("snapshot_disks") as batch:
        batch.drop_constraint("fk_snapshot_disks_image_id_images", type_="foreignkey")
        batch.drop_column("image_id")
    op.drop_index("ix_merges_vm", table_name="merges")
    op.drop_table("merges")
    op.drop_index("ix_snapshot_holds_snapshot_id", table_name="snapshot_holds")
    op.drop_table("snapshot_holds")
    op.drop_index("ix_images_vm_device", table_name="images")
    op.drop_table("images")
