"""The service layer: every operation of freezeframe as a typed async call, for every face.

The faces (the CLI in :mod:`freezeframe.cli`, the HTTP API in :mod:`freezeframe.api`) turn
their input into one call on :class:`Service` and render what comes back; no business rule
lives in a face. Layers, one way: faces -> service -> engine -> agent, hypervisor, storage,
catalog -> models, errors.

Public API::

    config = Config.from_env(state_dir=None, database_url=None, followup=False)
    async with await Service.open(config) as svc:    # or Service(config): catalog on first use
        # VMs
        await svc.list_vms() -> list[VmConfig]
        await svc.get_vm(name) -> VmConfig
        await svc.vm_images(name) -> list[BootImage]   # the image each disk must boot from
        await svc.add_vm(VmSpec(...), replace=False, force=False) -> VmAdded
        await svc.remove_vm(name, force=False) -> None
        await svc.import_libvirt(uri, replace=False) -> list[ImportResult]
        await svc.doctor(vm, quiesce=None) -> DoctorReport
        # snapshots
        await svc.create_snapshot(vm, CreateSnapshot(...), progress=fn) -> SnapshotOutcome
        await svc.start_snapshot(vm, CreateSnapshot(...)) -> SnapshotJob   # servers
        svc.job(snapshot_id) -> SnapshotJob | None; svc.jobs; await svc.drain()
        await svc.list_snapshots(vm=None, limit=None, cursor=None, newest_first=False)
            -> SnapshotPage                       # .items: SnapshotSummary, .next_cursor
        await svc.get_snapshot(snapshot_id) -> SnapshotRecord
        await svc.show_snapshot(snapshot_id, live=True) -> SnapshotShown  # + what QEMU runs on
        await svc.verify_snapshot(snapshot_id, checks=(), check_timeout=None) -> VerifyOutcome
        await svc.start_verify(snapshot_id, ...) -> VerifyJob   # servers; BusyError job-running
        svc.verify_job(snapshot_id) -> VerifyJob | None; svc.verify_jobs
        await svc.delete_snapshot(snapshot_id, progress=fn) -> DeleteResult  # merges layers away
        await svc.restore_snapshot(snapshot_id, into=None, yes=False) -> RestoreResult
        await svc.export_snapshot(snapshot_id, to, fmt="qcow2", compress=False, verify=False,
                                  progress=fn) -> ExportOutcome   # standalone images + metadata
        await svc.start_export(snapshot_id, to, ...) -> ExportJob  # servers; job-running
        svc.export_job(snapshot_id) -> ExportJob | None; svc.export_jobs
        # schedules and retention (service/_schedules.py)
        await svc.set_schedule(vm, ScheduleSpec(every="1h", keep_last=3, ...)) -> ScheduleView
        await svc.get_schedule(vm) / list_schedules() -> ScheduleView(s); remove_schedule(vm)
        await svc.prune(vm=None, dry_run=False) -> PruneReport   # .code, .items (reason codes)
        Scheduler(svc, start=svc.start_snapshot, poll=5.0).run()  # what `serve` runs
        # recover
        await svc.recover(vm=None, force=False) -> RecoverReport   # .code, .error()
        # lab
        await svc.lab_up(LabUpRequest(name, ...)) -> LabUpResult
        await svc.lab_down(name, purge=False, force=False, save=False) -> LabDownResult
        await svc.lab_list() -> list[LabVm]; await svc.lab_status(name) -> LabVm
        await svc.ceph_up(paxos=None, mgr=None, port=None, timeout=60.0) -> CephLab
        await svc.ceph_down(purge=False) -> CephDown; await svc.ceph_status() -> CephLab

    to_document(obj, render=None) -> JSON value        # one serializer for every face
    summary_document(summary) -> dict                  # a list item (to_document's fast path)
    error_document(exc, render=None) -> dict           # {"error","code","message",...}

Codes: a returned outcome has ``code`` (:class:`Outcome`: ``done``, ``weaker-than-asked``,
``thaw-unconfirmed``, ``intent-left-open``; :class:`RecoverCode`; a verification's verdict);
an error has ``code`` (:mod:`freezeframe.errors`) and, when something helps, ``remedy``
(:class:`~freezeframe.errors.Remedy`), rendered by each face (``render``).
"""

from __future__ import annotations

from freezeframe.engine import (
    Check,
    CheckStatus,
    DoctorReport,
    ImportAction,
    ImportResult,
    RecoverOutcome,
)
from freezeframe.engine.delete import DeleteProgress, DeleteResult, LayerMerged
from freezeframe.engine.export import ExportedImage, ExportOutcome, ExportProgress
from freezeframe.engine.images import BootImage
from freezeframe.engine.restore import RestoredDisk
from freezeframe.errors import Action, Remedy
from freezeframe.lab import CephDown, CephLab
from freezeframe.service._config import Config
from freezeframe.service._documents import (
    RemedyRenderer,
    error_document,
    join_hint,
    summary_document,
    to_document,
)
from freezeframe.service._export import ExportProgressFn
from freezeframe.service._jobs import ExportJob, Job, SnapshotJob, VerifyJob
from freezeframe.service._restore import RestoreResult
from freezeframe.service._results import (
    DEFAULT_CHECK_TIMEOUT,
    CreateSnapshot,
    LabDownResult,
    LabUpRequest,
    LabUpResult,
    LabVm,
    Outcome,
    Problem,
    RecoverCode,
    RecoverReport,
    SnapshotOutcome,
    SnapshotPage,
    SnapshotShown,
    VerifyOutcome,
    VmAdded,
    VmSpec,
    expected_level,
)
from freezeframe.service._schedules import (
    PruneItem,
    PruneReport,
    Scheduler,
    ScheduleSpec,
    ScheduleView,
)
from freezeframe.service._service import MAX_PAGE, ProgressFn, Service

__all__ = [
    "DEFAULT_CHECK_TIMEOUT",
    "MAX_PAGE",
    "Action",
    "BootImage",
    "CephDown",
    "CephLab",
    "Check",
    "CheckStatus",
    "Config",
    "CreateSnapshot",
    "DeleteProgress",
    "DeleteResult",
    "DoctorReport",
    "ExportJob",
    "ExportOutcome",
    "ExportProgress",
    "ExportProgressFn",
    "ExportedImage",
    "ImportAction",
    "ImportResult",
    "Job",
    "LabDownResult",
    "LabUpRequest",
    "LabUpResult",
    "LabVm",
    "LayerMerged",
    "Outcome",
    "Problem",
    "ProgressFn",
    "PruneItem",
    "PruneReport",
    "RecoverCode",
    "RecoverOutcome",
    "RecoverReport",
    "Remedy",
    "RemedyRenderer",
    "RestoreResult",
    "RestoredDisk",
    "ScheduleSpec",
    "ScheduleView",
    "Scheduler",
    "Service",
    "SnapshotJob",
    "SnapshotOutcome",
    "SnapshotPage",
    "SnapshotShown",
    "VerifyJob",
    "VerifyOutcome",
    "VmAdded",
    "VmSpec",
    "error_document",
    "expected_level",
    "join_hint",
    "summary_document",
    "to_document",
]
