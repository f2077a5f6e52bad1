"""``snapshot verify``: check every disk image of a snapshot offline and store the verdict.

The checks themselves (throw-away overlay, export, loop device, fsck) live in
:mod:`freezeframe.storage`; this module picks the images from the record, passes what the
record knows about the filesystems, and stores the result. The cut images are never written.
"""

from __future__ import annotations

from collections.abc import Sequence

from freezeframe.catalog import Catalog
from freezeframe.errors import VerifyError
from freezeframe.models import SnapshotStatus, Verification
from freezeframe.storage import verify_disks

__all__ = ["verify_snapshot"]


async def verify_snapshot(
    catalog: Catalog, snapshot_id: str, *, checks: Sequence[str] = ()
) -> Verification:
    """Verify snapshot ``snapshot_id`` (id or unique prefix) and store the verdict.

    Raises NotFoundError / UsageError (unknown or ambiguous id), VerifyError (a failed
    snapshot, or an image that cannot be read: the catalog is left unchanged).
    """
    rec = await catalog.get_snapshot(snapshot_id)
    if rec.status is not SnapshotStatus.DONE or not rec.disks:
        raise VerifyError(
            f"snapshot {rec.id} is {rec.status.value} and has no images to verify"
            + (f" ({rec.error})" if rec.error else "")
        )
    expect = {f.device: f.fstype for f in rec.filesystems if f.device}
    result = await verify_disks(rec.disks, user_checks=tuple(checks), expect=expect)
    await catalog.set_verification(rec.id, result)
    return result
