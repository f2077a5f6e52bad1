"""The service: every operation of freezeframe as one typed async method, for every face.

Owns the business rules the faces used to hold: what a snapshot's outcome is (done, weaker
than asked, thaw unconfirmed, intent left open) and verify-after-create; the refusals that
protect lab VMs and the socket checks of ``add_vm``; the ``lab_down`` sequence (the VM's lock,
the open-intent refusal, the purge of its catalog entries); what a ``recover`` amounts to; the
remedies of errors about lab VMs. A face turns its input into one call here and renders what
comes back (:func:`~freezeframe.service.to_document` for JSON); it never decides.

One :class:`Service` per process: it opens the catalog once and is safe to share between
concurrent requests (the catalog serializes its calls, the engine locks each VM in the
database: a second snapshot of a busy VM raises BusyError, code ``vm-busy``). Snapshots,
verifies and exports also run as jobs of the service (:meth:`Service.start_snapshot`,
:meth:`Service.start_verify`, :meth:`Service.start_export`: one job per snapshot at a time,
else code ``job-running``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import logging
import os
import stat
import time
from collections.abc import Callable
from datetime import UTC, datetime

from freezeframe import lab as _lab
from freezeframe import paths
from freezeframe._aio import AsyncClosing, shielded
from freezeframe.catalog import Catalog, make_owner
from freezeframe.engine import (
    DoctorReport,
    ImportResult,
    SnapshotRequest,
    Snapshotter,
    doctor,
    import_libvirt,
    libvirt_vm,
    recover,
    verify_snapshot,
)
from freezeframe.engine.delete import DeleteProgress, DeleteResult, delete_snapshot
from freezeframe.engine.export import ExportOutcome, check_export, export_snapshot
from freezeframe.engine.images import BootImage, boot_images
from freezeframe.engine.snapshot import new_snapshot_id
from freezeframe.engine.verify import parse_user_checks
from freezeframe.errors import (
    Action,
    AlreadyExistsError,
    BusyError,
    FreezeframeError,
    NotFoundError,
    RecoverError,
    Remedy,
    UsageError,
)
from freezeframe.lab import (
    CephDown,
    CephLab,
    LabVm,
    libvirt_agent_address,
    parse_disks,
    parse_size,
    validate_timeout,
)
from freezeframe.models import (
    QuiescePolicy,
    SnapshotRecord,
    SnapshotStatus,
    SnapshotSummary,
    TimelineEvent,
    VmConfig,
)
from freezeframe.service import _schedules
from freezeframe.service._config import Config
from freezeframe.service._export import ExportJobs, ExportProgressFn, job_running
from freezeframe.service._jobs import ExportJob, SnapshotJob, VerifyJob
from freezeframe.service._restore import RestoreResult, restore_snapshot
from freezeframe.service._results import (
    CreateSnapshot,
    LabDownResult,
    LabUpRequest,
    LabUpResult,
    Outcome,
    Problem,
    RecoverReport,
    SnapshotOutcome,
    SnapshotPage,
    SnapshotShown,
    VerifyOutcome,
    VmAdded,
    VmSpec,
    expected_level,
)
from freezeframe.service._schedules import PruneReport, ScheduleSpec, ScheduleView

__all__ = ["ProgressFn", "Service"]

log = logging.getLogger(__name__)

#: Called with each timeline event of a snapshot as it happens (those inside the freeze window
#: after the thaw). Runs in the event loop; an exception it raises is logged and ignored.
ProgressFn = Callable[[TimelineEvent], None]

#: The largest page of ``list_snapshots``.
MAX_PAGE = 1000

#: How many verify jobs (running and ended) a service remembers for late followers.
KEEP_VERIFY_JOBS = 256


class Service(AsyncClosing):
    """freezeframe's operations over one catalog. Get one with :meth:`open` (``async with``);
    :meth:`close` waits for running snapshot jobs (their thaw is never cut short), then closes
    the catalog."""

    def __init__(self, config: Config) -> None:
        """A service over the catalog of ``config``, opened on first use (the lab operations
        that need no catalog never open it); :meth:`open` opens it at once."""
        self.config = config
        self._catalog: Catalog | None = None
        self._snapshotter: Snapshotter | None = None
        self._opening = asyncio.Lock()
        self._jobs: dict[str, SnapshotJob] = {}
        #: Verify jobs by snapshot id: the running ones and the last KEEP_VERIFY_JOBS ended.
        self._verify_jobs: dict[str, VerifyJob] = {}
        self._exports = ExportJobs()

    @classmethod
    async def open(cls, config: Config) -> Service:
        """The service with its catalog open (and migrated): a server finds a bad database at
        its start, not at its first request.

        Raises UsageError (bad URL), DependencyError (database driver missing), CatalogError.
        """
        svc = cls(config)
        await svc.catalog()
        return svc

    async def catalog(self) -> Catalog:
        """The catalog, opened once (raises as :meth:`open`)."""
        async with self._opening:
            if self._catalog is None:
                self._catalog = await Catalog.open(self.config.catalog_url)
            return self._catalog

    async def _engine(self) -> Snapshotter:
        """The one snapshotter of this service (its follow-ups are waited for on close)."""
        cat = await self.catalog()
        if self._snapshotter is None:  # no await between the test and the assignment
            self._snapshotter = Snapshotter(
                cat, thaw_timeout=self.config.thaw_timeout, followup=self.config.followup
            )
        return self._snapshotter

    async def close(self) -> None:
        """Wait for running snapshot jobs and thaw follow-ups, then close the catalog."""
        await self.drain()
        if self._snapshotter is not None:
            await self._snapshotter.wait_followups()
        if self._catalog is not None:
            await self._catalog.close()
            self._catalog = None

    # ------------------------------------------------------------------ VMs

    async def list_vms(self) -> list[VmConfig]:
        """The registered VMs, by name."""
        return await (await self.catalog()).list_vms()

    async def get_vm(self, name: str) -> VmConfig:
        """One registered VM. Raises NotFoundError (code ``vm-not-found``)."""
        return await (await self.catalog()).get_vm(name)

    async def vm_images(self, name: str) -> list[BootImage]:
        """Per disk of VM ``name``: the image it must boot from (the newest overlay recorded)
        and whether QEMU runs on it now (see :func:`freezeframe.engine.images.boot_images`).
        Raises NotFoundError (neither registered nor any record), CatalogError."""
        return await boot_images(await self.catalog(), name)

    async def add_vm(self, spec: VmSpec, *, replace: bool = False, force: bool = False) -> VmAdded:
        """Register a QEMU VM by its sockets (it need not be running: missing socket paths are
        returned in ``not_there_yet``) or a libvirt domain (resolved to its UUID).

        Raises UsageError: neither or both of ``qmp`` / ``libvirt_domain``, ``qga`` with a
        libvirt domain or without an agent, a socket path that exists and is no socket, bad
        values; code ``lab-vm`` when ``replace`` would overwrite a lab VM's registration
        without ``force``. AlreadyExistsError (code ``vm-exists``) without ``replace``;
        HypervisorUnavailableError / DependencyError for a libvirt domain; CatalogError.
        """
        if (spec.qmp is None) == (spec.libvirt_domain is None):
            raise UsageError(
                "name the VM's hypervisor: a QMP socket (QEMU) or a libvirt domain",
                hint="one of them, not both",
                code="vm-address-required",
            )
        if spec.libvirt_domain is not None and spec.qga is not None:
            raise UsageError(
                "a guest-agent socket is for QEMU VMs: libvirt owns a domain's agent socket",
                hint="drop the agent socket; freezeframe reaches the agent through libvirt",
                code="qga-with-libvirt",
            )
        if spec.qga is not None and not spec.agent:
            raise UsageError(
                "an agent socket is named, and the VM is said to have no agent",
                hint="drop one of them",
                code="qga-without-agent",
            )
        qmp, qga = _absolute(spec.qmp), _absolute(spec.qga)
        missing = tuple(p for p in (qmp, qga) if p is not None and not _socket_or_missing(p))
        if spec.libvirt_domain is not None:
            cfg = await libvirt_vm(
                spec.name,
                spec.libvirt_domain,
                spec.connect_uri,
                agent=spec.agent,
                quiesce=spec.quiesce,
                freeze_timeout=spec.freeze_timeout,
                agent_log_path=spec.agent_log,
                exclude_mounts=spec.exclude_mounts,
            )
            if spec.overlay_dir is not None:
                cfg = _with_overlay_dir(cfg, spec.overlay_dir)
            cfg = dataclasses.replace(
                cfg, ceph_conf=spec.ceph_conf, ceph_id=spec.ceph_id, ceph_keyring=spec.ceph_keyring
            )
        else:
            cfg = VmConfig(
                name=spec.name,
                qmp_path=qmp,
                qga_path=qga,
                agent=spec.agent,
                quiesce=spec.quiesce,
                freeze_timeout=spec.freeze_timeout,
                agent_log_path=spec.agent_log,
                exclude_mounts=spec.exclude_mounts,
                overlay_dir=spec.overlay_dir,
                ceph_conf=spec.ceph_conf,
                ceph_id=spec.ceph_id,
                ceph_keyring=spec.ceph_keyring,
            )
        if replace and not force:
            with contextlib.suppress(NotFoundError):
                if (await (await self.catalog()).get_vm(spec.name)).lab:
                    raise UsageError(
                        f"{spec.name!r} is a lab VM: replacing its registration would turn it "
                        "into a VM of your own (its agent socket and log forgotten) while the "
                        "lab VM runs on",
                        hint="stop and purge it, then start it again (or replace it by force)",
                        code="lab-vm",
                        remedy=Remedy(Action.LAB_DOWN, spec.name, {"purge": "yes"}),
                    )
        await (await self.catalog()).add_vm(cfg, replace=replace)
        return VmAdded(cfg, missing)

    async def remove_vm(self, name: str, *, force: bool = False) -> None:
        """Forget a VM (its snapshot records stay). Raises NotFoundError; UsageError (code
        ``lab-vm``) for a lab VM unless ``force`` (its QEMU would run on, unreachable)."""
        if (await (await self.catalog()).get_vm(name)).lab and not force:
            raise UsageError(
                f"{name!r} is a lab VM: removing only its registration would leave it running "
                "and unreachable",
                hint="stop and purge the lab VM instead (or remove it by force)",
                code="lab-vm",
                remedy=Remedy(Action.LAB_DOWN, name, {"purge": "yes"}),
            )
        await (await self.catalog()).remove_vm(name)

    async def import_libvirt(self, uri: str, *, replace: bool = False) -> list[ImportResult]:
        """Register every running domain of libvirt connection ``uri`` (see
        :func:`freezeframe.engine.import_libvirt`); per-domain outcomes in the results."""
        return await import_libvirt(await self.catalog(), uri, replace=replace)

    async def doctor(self, vm: str, *, quiesce: QuiescePolicy | None = None) -> DoctorReport:
        """The preflight of ``vm`` as a checklist (``quiesce``: the policy to judge by, None:
        the VM's). A lab VM's unreachable hypervisor gets the ``lab-up`` remedy. Raises
        NotFoundError, CatalogError."""
        rep = await doctor(await self.catalog(), vm, quiesce=quiesce)
        cfg = await (await self.catalog()).get_vm(vm)
        if not cfg.lab:
            return rep
        checks = tuple(
            dataclasses.replace(c, fix=_LAB_UP_HINT, remedy=Remedy(Action.LAB_UP, vm))
            if c.name == "hypervisor" and c.fix and c.remedy is None
            else c
            for c in rep.checks
        )
        return dataclasses.replace(rep, checks=checks)

    # ------------------------------------------------------------------ snapshots

    @staticmethod
    def new_snapshot_id() -> str:
        """A fresh snapshot id, for a caller that must name a snapshot before taking it."""
        return new_snapshot_id()

    async def create_snapshot(
        self, vm: str, request: CreateSnapshot | None = None, *, progress: ProgressFn | None = None
    ) -> SnapshotOutcome:
        """Snapshot every disk of ``vm`` at one point in time, quiesced as asked; verify the
        images afterwards with ``request.verify``. ``progress`` gets each timeline step.

        Returns the outcome: code ``done``, ``weaker-than-asked``, ``thaw-unconfirmed`` (the cut
        is good, the guest may still be frozen: recover) or ``intent-left-open``; a verify that
        could not run is ``verify_problem``, the verdict is ``record.verification``.

        Raises UsageError (bad request, found before anything is frozen: checks without
        verify, a check timeout without checks, a check that cannot be parsed), NotFoundError,
        BusyError (code ``vm-busy``), SnapshotFailedError and its subclasses (the failed
        attempt is recorded; ``thaw-unconfirmed``, ``snapshot-unrecorded``, the freeze's codes
        such as ``agent-unreachable`` or ``fs-not-freezable``).
        """
        req = request or CreateSnapshot()
        self._check_create(req)
        engine_req = SnapshotRequest(
            quiesce=req.quiesce,
            freeze_timeout=req.freeze_timeout,
            exclude_mounts=req.exclude_mounts,
            exclude_disks=req.exclude_disks,
            hold_frozen=req.hold_frozen,
            snapshot_id=req.snapshot_id,
            overlay_dir=req.overlay_dir,
        )
        try:
            rec = await (await self._engine()).snapshot(vm, engine_req, progress=progress)
        except FreezeframeError as exc:
            await self._lab_remedy(vm, exc)
            raise
        problem = None
        if req.verify:
            try:
                await verify_snapshot(
                    await self.catalog(), rec.id, checks=req.checks, check_timeout=req.check_timeout
                )
            except FreezeframeError as exc:
                problem = Problem.of(exc)
            rec = await (await self.catalog()).get_snapshot(rec.id)
        return _outcome(rec, req.verify, problem)

    async def start_snapshot(self, vm: str, request: CreateSnapshot | None = None) -> SnapshotJob:
        """Start :meth:`create_snapshot` as a job of this service, detached from the caller,
        and return it once the VM is locked and the attempt recorded (its first timeline
        step): the job's ``snapshot_id`` can be fetched from then on.

        Raises before returning what the start raises: UsageError, NotFoundError, BusyError
        (code ``vm-busy``), and a failure that happens before the first step.
        """
        req = request or CreateSnapshot()
        self._check_create(req)
        sid = req.snapshot_id or new_snapshot_id()
        job = SnapshotJob(sid, vm)
        self._jobs[sid] = job
        task = asyncio.get_running_loop().create_task(
            self.create_snapshot(vm, _with_id(req, sid), progress=job.publish)
        )
        job.task = task
        task.add_done_callback(job._finished)
        task.add_done_callback(lambda _t: self._jobs.pop(sid, None))
        await job.started.wait()
        if task.done() and not job.history:
            await task  # raises its error (a refusal before anything started)
        return job

    def job(self, snapshot_id: str) -> SnapshotJob | None:
        """The running job of ``snapshot_id`` (full id), or None (none, or finished)."""
        return self._jobs.get(snapshot_id)

    @property
    def jobs(self) -> tuple[SnapshotJob, ...]:
        """The running snapshot jobs."""
        return tuple(self._jobs.values())

    async def drain(self) -> None:
        """Wait until every running snapshot and verify job has ended (their errors are
        theirs)."""
        while True:
            tasks: list[asyncio.Task[object]] = [
                j.task for j in self._jobs.values() if j.task is not None
            ]
            tasks += [j.task for j in self._verify_jobs.values() if j.task and not j.done]
            tasks += self._exports.tasks()
            if not tasks:
                return
            await asyncio.gather(*tasks, return_exceptions=True)

    async def start_verify(
        self,
        snapshot_id: str,
        *,
        checks: tuple[str, ...] = (),
        check_timeout: float | None = None,
    ) -> VerifyJob:
        """Start :meth:`verify_snapshot` of ``snapshot_id`` (id or unique prefix) as a job of
        this service, detached from the caller; its first step (``verify_started``) is
        published before this returns. One job per snapshot at a time.

        Raises NotFoundError, UsageError (bad prefix, a timeout without checks), BusyError
        (code ``job-running``: a snapshot or verify job of this snapshot runs in this service).
        """
        if check_timeout is not None and not checks:
            raise UsageError(
                "a check timeout needs checks (it bounds each user check)",
                code="check-timeout-needs-checks",
            )
        rec = await self.get_snapshot(snapshot_id)
        sid = rec.id
        running = self._verify_jobs.get(sid)
        if (
            sid in self._jobs
            or (running is not None and not running.done)
            or self._exports.running(sid)
        ):
            raise job_running(rec)
        job = VerifyJob(sid, rec.vm)
        self._verify_jobs.pop(sid, None)  # the newest job of a snapshot is the one kept
        self._verify_jobs[sid] = job
        ended = [k for k, j in self._verify_jobs.items() if j.done]
        for k in ended[: max(0, len(self._verify_jobs) - KEEP_VERIFY_JOBS)]:
            del self._verify_jobs[k]  # oldest first (insertion order)
        job.publish(
            TimelineEvent(
                "verify_started",
                datetime.now(UTC),
                time.monotonic_ns(),
                "reading every image at the cut, read-only",
            )
        )
        task = asyncio.get_running_loop().create_task(
            self.verify_snapshot(sid, checks=checks, check_timeout=check_timeout)
        )
        job.task = task
        task.add_done_callback(job._finished)
        return job

    @property
    def verify_jobs(self) -> tuple[VerifyJob, ...]:
        """The running verify jobs."""
        return tuple(j for j in self._verify_jobs.values() if not j.done)

    def verify_job(self, snapshot_id: str) -> VerifyJob | None:
        """The verify job of ``snapshot_id`` (full id): running, or one of the last ended."""
        return self._verify_jobs.get(snapshot_id)

    async def export_snapshot(
        self,
        snapshot_id: str,
        to: str,
        *,
        fmt: str = "qcow2",
        compress: bool = False,
        verify: bool = False,
        progress: ExportProgressFn | None = None,
    ) -> ExportOutcome:
        """Export snapshot ``snapshot_id`` into directory ``to``: one standalone image per disk
        and ``metadata.json``, the snapshot held meanwhile; see
        :func:`freezeframe.engine.export.export_snapshot` (what it raises, codes)."""
        return await export_snapshot(
            await self.catalog(),
            snapshot_id,
            to,
            fmt=fmt,
            compress=compress,
            verify=verify,
            progress=progress,
        )

    async def start_export(
        self,
        snapshot_id: str,
        to: str,
        *,
        fmt: str = "qcow2",
        compress: bool = False,
        verify: bool = False,
    ) -> ExportJob:
        """Start :meth:`export_snapshot` as a job of this service, detached from the caller,
        once what it would refuse at once has been checked (bad format or path, a snapshot
        not done, a target that exists: raised here). Raises as
        :func:`~freezeframe.engine.export.check_export`, and BusyError (code ``job-running``:
        a snapshot, verify or export job of this snapshot runs in this service)."""
        rec = await check_export(await self.catalog(), snapshot_id, to, fmt=fmt, compress=compress)
        verifying = self._verify_jobs.get(rec.id)
        if (
            rec.id in self._jobs
            or (verifying is not None and not verifying.done)
            or self._exports.running(rec.id)
        ):
            raise job_running(rec)
        what = f"to {to} as {fmt}" + (" (compressed)" if compress else "")
        return self._exports.start(
            rec,
            what,
            lambda progress: self.export_snapshot(
                rec.id, to, fmt=fmt, compress=compress, verify=verify, progress=progress
            ),
        )

    def export_job(self, snapshot_id: str) -> ExportJob | None:
        """The export job of ``snapshot_id`` (full id): running, or one of the last ended."""
        return self._exports.get(snapshot_id)

    @property
    def export_jobs(self) -> tuple[ExportJob, ...]:
        """The running export jobs."""
        return self._exports.active

    async def list_snapshots(
        self,
        vm: str | None = None,
        *,
        limit: int | None = None,
        cursor: str | None = None,
        newest_first: bool = False,
        status: SnapshotStatus | None = None,
    ) -> SnapshotPage:
        """What a list shows of the snapshots (of ``vm``, also one no longer registered),
        oldest first (or ``newest_first``), failed attempts too (only those of ``status`` if
        given): :class:`~freezeframe.models.SnapshotSummary` items (no disks, filesystems or
        timeline; :meth:`get_snapshot` has the whole record); ``limit`` items after ``cursor``
        (the previous page's ``next_cursor``), all of them without ``limit``.

        Raises NotFoundError when ``vm`` is neither registered nor has records, UsageError
        (code ``bad-cursor``) for a cursor this service did not give, or a limit out of
        1..1000 (``bad-limit``); CatalogError.
        """
        if limit is not None and not 1 <= limit <= MAX_PAGE:
            raise UsageError(f"limit must be 1..{MAX_PAGE}, got {limit}", code="bad-limit")
        after = _decode_cursor(cursor) if cursor else None
        cat = await self.catalog()
        found = await cat.list_snapshot_summaries(
            vm,
            limit=None if limit is None else limit + 1,
            after=after,
            newest_first=newest_first,
            status=status,
        )
        if vm is not None and not found and cursor is None and status is None:
            await cat.get_vm(vm)  # NotFoundError: neither registered nor any record
        more = limit is not None and len(found) > limit
        items = tuple(found[:limit] if limit is not None else found)
        nxt = _encode_cursor(items[-1]) if more and items else None
        return SnapshotPage(items, nxt)

    async def get_snapshot(self, snapshot_id: str) -> SnapshotRecord:
        """One record by id or unique prefix. Raises NotFoundError (``snapshot-not-found``),
        UsageError (ambiguous or too short a prefix)."""
        return await (await self.catalog()).get_snapshot(snapshot_id)

    async def show_snapshot(self, snapshot_id: str, *, live: bool = True) -> SnapshotShown:
        """What ``snapshot show`` shows of one record (id or unique prefix). With ``live``,
        also what QEMU runs each disk on now: that asks the running VM under its lock (a
        snapshot of the VM starting at that moment is refused), so a face that must answer
        from the catalog alone passes ``live=False``.

        Raises NotFoundError (``snapshot-not-found``), UsageError (ambiguous or too short a
        prefix), and with ``live`` what :meth:`vm_images` raises.
        """
        rec = await self.get_snapshot(snapshot_id)
        if not live:
            return SnapshotShown(rec)
        images = await self.vm_images(rec.vm) if rec.disks else []
        return SnapshotShown(rec, live=True, images=tuple(images))

    async def verify_snapshot(
        self,
        snapshot_id: str,
        *,
        checks: tuple[str, ...] = (),
        check_timeout: float | None = None,
    ) -> VerifyOutcome:
        """Check every filesystem of every image at the cut, offline and read-only; store and
        return the verdict (the outcome's code). ``check_timeout`` bounds each user check
        (None: the default; only with ``checks``).

        Raises UsageError (a timeout without checks, bad checks), NotFoundError, VerifyError.
        """
        if check_timeout is not None and not checks:
            raise UsageError(
                "a check timeout needs checks (it bounds each user check)",
                code="check-timeout-needs-checks",
            )
        kw = {} if check_timeout is None else {"check_timeout": check_timeout}
        v = await verify_snapshot(await self.catalog(), snapshot_id, checks=checks, **kw)
        return VerifyOutcome(v)

    async def delete_snapshot(
        self,
        snapshot_id: str,
        *,
        progress: Callable[[DeleteProgress], None] | None = None,
        bandwidth: int = 0,
    ) -> DeleteResult:
        """Delete snapshot ``snapshot_id`` (or the one its prefix names) under its VM's lock
        (purpose ``delete``): its qcow2 layers merged away (live while the VM runs, offline
        when it is stopped), its RBD snapshots removed, then its record
        (:mod:`freezeframe.engine.delete`); ``progress`` gets the bytes of each merge;
        ``bandwidth`` caps each merge's copy in bytes per second (0: no limit; UsageError
        ``bad-bandwidth`` when negative).

        Raises NotFoundError, UsageError (codes ``snapshot-running``, ``layer-shared``,
        ``image-written-by-vm``), BusyError (``vm-busy``; ``snapshot-in-use``: a verify or
        export reads it), HypervisorError / ToolError (a merge failed: the record stays
        ``deleting``, deleting again or recover finishes it), StorageError, DependencyError,
        CatalogError.
        """
        if bandwidth < 0:
            raise UsageError(f"bandwidth must be >= 0, got {bandwidth}", code="bad-bandwidth")
        cat = await self.catalog()
        rec = await cat.get_snapshot(snapshot_id)
        owner = make_owner()
        await cat.acquire_vm_lock(rec.vm, owner, purpose="delete")
        try:
            rec = await cat.get_snapshot(rec.id)  # as it is now that nothing else runs
            return await delete_snapshot(cat, rec, progress=progress, bandwidth=bandwidth)
        finally:
            await shielded(cat.release_vm_lock(rec.vm, owner))

    # ------------------------------------------------------------------ schedules

    async def set_schedule(self, vm: str, spec: ScheduleSpec) -> ScheduleView:
        """Create or replace ``vm``'s schedule (see :mod:`freezeframe.service._schedules`).
        Raises UsageError (``invalid-interval``, ``invalid-keep-rule``), NotFoundError
        (``vm-not-found``), CatalogError."""
        return await _schedules.set_schedule(self, vm, spec)

    async def get_schedule(self, vm: str) -> ScheduleView:
        """``vm``'s schedule. Raises NotFoundError (``schedule-not-found``), CatalogError."""
        return await _schedules.get_schedule(self, vm)

    async def list_schedules(self) -> list[ScheduleView]:
        """Every schedule, by VM name, with when each runs next. Raises CatalogError."""
        return await _schedules.list_schedules(self)

    async def remove_schedule(self, vm: str) -> None:
        """Forget ``vm``'s schedule. Raises NotFoundError (``schedule-not-found``)."""
        await _schedules.remove_schedule(self, vm)

    async def prune(
        self, vm: str | None = None, *, dry_run: bool = False, stop: asyncio.Event | None = None
    ) -> PruneReport:
        """Apply the keep rules of ``vm``'s schedule (every scheduled VM's when None): one
        decision per snapshot with its reason code; pruned ones deleted with
        :meth:`delete_snapshot` (a refusal keeps the snapshot, reported with its code), none
        with ``dry_run``. Raises NotFoundError (``schedule-not-found``), CatalogError."""
        return await _schedules.prune(self, vm, dry_run=dry_run, stop=stop)

    async def restore_snapshot(
        self,
        snapshot_id: str,
        *,
        into: str | None = None,
        yes: bool = False,
        stop_timeout: float = 60.0,
    ) -> RestoreResult:
        """Restore a VM's disks to snapshot ``snapshot_id``: new overlays on the snapshot's
        images (a lab VM or a libvirt domain restarted on them — a domain is destroyed after
        ``stop_timeout`` s without a clean shutdown; ``into`` a new lab VM instead). See
        :mod:`freezeframe.service._restore` for the rules and what it raises."""
        if not 0 < stop_timeout <= 3600:
            raise UsageError(
                f"stop timeout must be in (0, 3600] seconds, got {stop_timeout:g}",
                code="bad-stop-timeout",
            )
        return await restore_snapshot(
            self, snapshot_id, into=into, yes=yes, stop_timeout=stop_timeout
        )

    # ------------------------------------------------------------------ recover

    async def recover(self, vm: str | None = None, *, force: bool = False) -> RecoverReport:
        """Thaw every guest left with an open freeze intent (of ``vm`` only, if given) and
        settle what dead snapshot processes left; the report's ``code`` / ``error()`` say how
        it ended. Raises NotFoundError, CatalogError."""
        outs = await recover(
            await self.catalog(), vm, force=force, timeout=self.config.recover_timeout
        )
        return RecoverReport(tuple(outs))

    # ------------------------------------------------------------------ lab

    # The lab's functions find their files under paths.lab_dir(): each call below runs with
    # this service's state directory as the root (Config.state_dir, not the environment).

    async def lab_list(self) -> list[LabVm]:
        """The lab VMs (in ``config.lab_dir``)."""
        with paths.using_state_dir(self.config.state_dir):
            return await asyncio.to_thread(_lab.lab_list)

    async def lab_status(self, name: str) -> LabVm:
        """One lab VM. Raises NotFoundError, UsageError, LabError."""
        with paths.using_state_dir(self.config.state_dir):
            return await asyncio.to_thread(_lab.lab_status, name)

    async def lab_up(self, request: LabUpRequest) -> LabUpResult:
        """Build (cached) and boot a lab VM, register it; return once its agent answers.

        A stopped lab VM restarts on its own disks; one that runs unregistered (its lab up was
        killed) is adopted and registered as it runs. Raises UsageError (bad values, found
        first), AlreadyExistsError (code ``vm-exists``: the name is registered and not a lab
        VM; or it runs already), LabError, DependencyError, CatalogError.
        """
        name = request.name
        fstypes = parse_disks(request.disks) if request.disks is not None else None
        if request.disk_size is not None:
            parse_size(request.disk_size)
        validate_timeout(request.timeout)
        registered = False
        with contextlib.suppress(NotFoundError):
            if not (await (await self.catalog()).get_vm(name)).lab:
                raise AlreadyExistsError(
                    f"a VM named {name!r} is registered and is not a lab VM",
                    hint="pick another name, or remove that VM first",
                    code="vm-exists",
                    remedy=Remedy(Action.REMOVE_VM, name),
                )
            registered = True
        running_pid = None
        if not registered:
            with contextlib.suppress(NotFoundError):
                before = await self.lab_status(name)
                running_pid = before.pid if before.running else None
        with paths.using_state_dir(self.config.state_dir):
            vm = await _lab.lab_up(
                name,
                disks=fstypes,
                disk_size=request.disk_size,
                agent=request.agent,
                accel=request.accel,
                timeout=request.timeout,
                adopt=not registered,  # running and registered: AlreadyExistsError as before
                driver=request.driver,
                rbd=request.rbd,
            )
        # Lab VMs are registered automatically, so a snapshot of NAME works right away.
        await (await self.catalog()).add_vm(vm.vm_config(), replace=True)
        return LabUpResult(vm, running_pid == vm.pid)

    async def lab_down(
        self, name: str, *, purge: bool = False, force: bool = False, save: bool = False
    ) -> LabDownResult:
        """Stop a lab VM (flushed first), under its lock; with ``purge`` also delete its files,
        registration and snapshot records.

        Refused, unless ``force`` (then each refusal is a warning in the result): BusyError
        (code ``vm-busy``) while its lock is held (a snapshot in progress); RecoverError (code
        ``intent-open``) while it runs with an open freeze intent; LabError while QEMU holds a
        deleted disk image open (unless ``save``). Raises NotFoundError when there is no such
        lab VM (with ``purge``: nor anything of it in the catalog).
        """
        warnings: list[str] = []
        owner = make_owner()
        locked = False
        try:
            await (await self.catalog()).acquire_vm_lock(name, owner, purpose="lab-down")
            locked = True
        except BusyError as exc:
            if not force:
                raise BusyError(
                    f"lab VM {name}: not stopped: {exc.message}",
                    hint="wait for it to finish, or stop it by force (a snapshot may then "
                    "fail; purged, its record would point at deleted images)",
                    holder_purpose=exc.holder_purpose,
                    remedy=Remedy(Action.FORCE, name),
                ) from exc
            warnings.append(f"{exc.message}; stopping {name} anyway (forced)")
            log.warning("%s", warnings[-1])
        try:
            await self.refuse_if_maybe_frozen(name, force=force, warnings=warnings)
            try:
                with paths.using_state_dir(self.config.state_dir):
                    await _lab.lab_down(name, purge=purge, force=force, save=save)
            except NotFoundError:
                # No lab VM of that name (its directory is gone), but the catalog may still
                # hold its registration and records: a purge forgets those too.
                if not purge:
                    raise
                removed = await self._forget_lab_vm(name)
                if removed is None:
                    raise
                return LabDownResult(name, False, purge, removed, tuple(warnings))
            removed = (await self._forget_lab_vm(name) or 0) if purge else 0
            return LabDownResult(name, True, purge, removed, tuple(warnings))
        finally:
            if locked:
                await (await self.catalog()).release_vm_lock(name, owner)

    async def ceph_up(
        self,
        *,
        paxos: str | None = None,
        mgr: bool | None = None,
        port: int | None = None,
        timeout: float = 60.0,
    ) -> CephLab:
        """Start the lab Ceph (idempotent; a stopped one restarts on its data); return once its
        pool takes a write. Raises as :func:`freezeframe.lab.ceph_up`."""
        with paths.using_state_dir(self.config.state_dir):
            return await _lab.ceph_up(paxos=paxos, mgr=mgr, port=port, timeout=timeout)

    async def ceph_down(self, *, purge: bool = False) -> CephDown:
        """Stop the lab Ceph by its recorded PIDs; ``purge`` deletes its folder. Raises as
        :func:`freezeframe.lab.ceph_down`."""
        with paths.using_state_dir(self.config.state_dir):
            return await _lab.ceph_down(purge=purge)

    async def ceph_status(self) -> CephLab:
        """The lab Ceph as it is. Raises NotFoundError (``ceph-not-found``), LabError."""
        with paths.using_state_dir(self.config.state_dir):
            return await asyncio.to_thread(_lab.ceph_status)

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _check_create(req: CreateSnapshot) -> None:
        """Bad check input is refused before anything is frozen or cut."""
        if req.checks and not req.verify:
            raise UsageError(
                "checks need verify (the checks run on the verified images)",
                code="checks-need-verify",
            )
        if req.check_timeout != _DEFAULT_CHECK_TIMEOUT and not req.checks:
            raise UsageError(
                "a check timeout needs checks (it bounds each user check)",
                code="check-timeout-needs-checks",
            )
        if not 0 < req.check_timeout < float("inf"):
            raise UsageError(
                f"check timeout must be a number of seconds > 0, got {req.check_timeout:g}"
            )
        parse_user_checks(req.checks)

    async def _lab_remedy(self, vm: str, exc: FreezeframeError) -> None:
        """A lab VM is started by lab up, not by running QEMU by hand: an error whose cause is
        its unreachable control socket names that remedy."""
        if exc.code != "hypervisor-unreachable" or exc.remedy is not None:
            return
        with contextlib.suppress(FreezeframeError):
            if (await (await self.catalog()).get_vm(vm)).lab:
                exc.hint = _LAB_UP_HINT
                exc.remedy = Remedy(Action.LAB_UP, vm)

    async def refuse_if_maybe_frozen(self, name: str, *, force: bool, warnings: list[str]) -> None:
        """Raise RecoverError (code ``intent-open``) if the lab VM ``name`` runs and the
        catalog holds an open freeze intent of it (a snapshot died while its guest was frozen:
        stopping it now would skip the flush and leave the intent open); with ``force`` only
        warn."""
        intents = await (await self.catalog()).open_intents(name)
        if not intents:
            return
        try:
            running = (await self.lab_status(name)).running
        except FreezeframeError:  # no such lab VM, unreadable record: lab_down decides
            return
        if not running:
            return  # a stopped guest is not frozen; a purge closes its intents
        which = ", ".join(f"intent {i.id} of snapshot {i.snapshot_id}" for i in intents)
        what = f"open freeze intent(s) ({which}): its guest may still be frozen"
        if force:
            warnings.append(f"lab VM {name}: {what}; stopping it anyway (forced)")
            log.warning("%s", warnings[-1])
            return
        raise RecoverError(
            f"lab VM {name}: not stopped: {what}",
            hint="recover it first (or stop it by force: a frozen guest cannot flush what it "
            "has not written back)",
            code="intent-open",
            remedy=Remedy(Action.RECOVER, name),
        )

    async def _forget_lab_vm(self, name: str) -> int | None:
        """Forget what the catalog holds of the lab VM ``name`` (its directory is gone): its
        registration if it is a lab VM's, the records whose images all lived in its directory
        or were its images in the lab Ceph (and, with a lab registration, its records without
        images), and its intents on a socket in its directory (no guest is left to thaw).
        Returns how many records went, or None when nothing of a lab VM of that name was
        found; a VM that is not a lab VM is never touched."""
        cat = await self.catalog()
        labdir = str(self.config.lab_dir / name)
        try:
            cfg: VmConfig | None = await cat.get_vm(name)
        except NotFoundError:
            cfg = None
        if cfg is not None and not cfg.lab:
            return None
        records = [
            r
            for r in await cat.list_snapshots(name)
            if (r.disks and all(_lab_image(d.image, labdir, name) for d in r.disks))
            or (not r.disks and cfg is not None)
        ]
        if cfg is None and not records:
            return None
        if cfg is not None:
            await cat.remove_vm(name)
        for rec in records:
            with contextlib.suppress(NotFoundError):
                await cat.delete_snapshot(rec.id)
        await cat.forget_images(name, labdir)
        # A libvirt lab VM's agent is not a path in its directory but its domain's address.
        domain = (
            libvirt_agent_address(cfg.domain, cfg.connect_uri)
            if cfg is not None and cfg.driver == "libvirt" and cfg.domain and cfg.connect_uri
            else None
        )
        for intent in await cat.open_intents(name):
            if intent.agent_address == domain or _inside([intent.agent_address], labdir):
                await cat.close_intent(intent.id, "lab down --purge")
        return len(records)


_DEFAULT_CHECK_TIMEOUT = CreateSnapshot().check_timeout

#: The neutral hint of a lab VM whose QEMU is not reachable (remedy: lab up).
_LAB_UP_HINT = "is the lab VM running? start it"


def _outcome(rec: SnapshotRecord, verify: bool, problem: Problem | None) -> SnapshotOutcome:
    """The outcome of a taken snapshot: the strongest concern wins (a guest maybe still frozen,
    then an intent left open, then a level weaker than asked)."""
    asked = expected_level(rec.policy)
    if rec.thaw_unconfirmed:
        code = Outcome.THAW_UNCONFIRMED
    elif rec.intent_left_open:
        code = Outcome.INTENT_LEFT_OPEN
    elif rec.level.rank < asked.rank:
        code = Outcome.WEAKER
    else:
        code = Outcome.DONE
    return SnapshotOutcome(code, rec, asked, verify, problem)


def _with_id(req: CreateSnapshot, sid: str) -> CreateSnapshot:
    return dataclasses.replace(req, snapshot_id=sid)


def _with_overlay_dir(cfg: VmConfig, overlay_dir: str) -> VmConfig:
    return dataclasses.replace(cfg, overlay_dir=overlay_dir)


def _absolute(path: str | None) -> str | None:
    return os.path.abspath(path) if path is not None else None


def _socket_or_missing(path: str) -> bool:
    """True if ``path`` is a unix socket, False if it does not exist (yet).

    Raises UsageError when it exists and is something else, or cannot ever be one.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return False
    except OSError as exc:  # e.g. a parent is a regular file
        raise UsageError(f"{path} cannot be a socket: {exc.strerror}", code="not-a-socket") from exc
    if not stat.S_ISSOCK(mode):
        raise UsageError(
            f"{path} exists and is not a unix socket",
            code="not-a-socket",
            hint="pass the path QEMU was started with: -qmp unix:PATH / -chardev socket,path=PATH",
        )
    return True


def _lab_image(image: str, labdir: str, name: str) -> bool:
    """A recorded image of the lab VM ``name``: a file in its directory ``labdir``, or an RBD
    snapshot of one of its images in the lab Ceph (``rbd:POOL/fflab-NAME-DEVICE@...``, as
    ``lab up --rbd`` names them; the lab removes those images with the VM)."""
    return image.startswith(f"rbd:{_lab.LAB_CEPH_POOL}/fflab-{name}-") or _inside([image], labdir)


def _inside(files: list[str], directory: str) -> bool:
    """Every one of ``files`` lies in ``directory`` (recorded paths are absolute)."""
    prefix = os.path.abspath(directory) + os.sep
    return all(os.path.normpath(f).startswith(prefix) for f in files)


def _encode_cursor(rec: SnapshotSummary) -> str:
    raw = f"{rec.created_at.isoformat()}|{rec.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        when, sid = raw.split("|", 1)
        at = datetime.fromisoformat(when)
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise UsageError(f"not a cursor of this service: {cursor!r}", code="bad-cursor") from exc
    if at.tzinfo is None or not sid:
        raise UsageError(f"not a cursor of this service: {cursor!r}", code="bad-cursor")
    return at, sid
