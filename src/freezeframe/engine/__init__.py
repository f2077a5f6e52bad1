"""The engine: the only layer that sequences plan -> prepare -> freeze -> cut -> thaw -> record.

Public entry points (all async, usable from the CLI and from a long-running server):

- :class:`Snapshotter` / :class:`SnapshotRequest` -- take a snapshot (:mod:`.snapshot`);
- :func:`recover` -- thaw guests left with an open freeze intent (:mod:`.recover`);
- :func:`doctor` -- the preflight as a checklist (:mod:`.doctor`);
- :func:`verify_snapshot` -- offline proof of a snapshot (:mod:`.verify`);
- :func:`~freezeframe.engine.delete.delete_snapshot` -- delete a snapshot whose parts can go
  without a merge (RBD snapshots), then its record (:mod:`.delete`);
- :func:`libvirt_vm` / :func:`import_libvirt` -- register libvirt domains (:mod:`.vms`).
"""

from __future__ import annotations

from freezeframe.engine.doctor import Check, CheckStatus, DoctorReport, doctor
from freezeframe.engine.plan import Plan, make_plan
from freezeframe.engine.recover import RecoverOutcome, recover
from freezeframe.engine.snapshot import SnapshotRequest, Snapshotter, open_driver
from freezeframe.engine.verify import verify_snapshot
from freezeframe.engine.vms import ImportAction, ImportResult, import_libvirt, libvirt_vm

__all__ = [
    "Check",
    "CheckStatus",
    "DoctorReport",
    "ImportAction",
    "ImportResult",
    "Plan",
    "RecoverOutcome",
    "SnapshotRequest",
    "Snapshotter",
    "doctor",
    "import_libvirt",
    "libvirt_vm",
    "make_plan",
    "open_driver",
    "recover",
    "verify_snapshot",
]
