"""The snapshot sequence: plan -> preflight -> prepare -> freeze -> cut -> thaw -> record.

This module is the only place that knows the order freeze -> cut -> thaw. Everything that can
happen before the freeze does (overlays created, the guest's dirty data flushed with
``guest-exec sync``, the write-ahead records written), so the freeze window holds only
``guest-fsfreeze-freeze``, one atomic cut and ``guest-fsfreeze-thaw``.

Guarantees:

- The thaw always runs once a freeze was sent: on errors, on cancellation (SIGINT/SIGTERM are
  turned into cancellation by the CLI), with its own timeout, confirmed with
  ``guest-fsfreeze-status``. A write-ahead *freeze intent* is stored before the freeze is sent
  and closed only when a thaw is confirmed; :mod:`.recover` closes what a killed process left.
- The freeze window is bounded by the freeze deadline (default 10 s): a freeze that does not
  answer in time is abandoned, a thaw is sent, and the policy decides (fail or fall back).
- ``required``: any problem fails the snapshot; nothing is switched and the overlays prepared
  are removed; the failed attempt is recorded with its reason.
- ``preferred``: the cut is still atomic; the record says ``crash`` and why.
- One snapshot at a time per VM (the catalog's VM lock).
- A disk whose image chain holds a file missing on this host (deleted while QEMU keeps it
  open) is refused before anything is prepared or frozen (:class:`BrokenChainError`).
- Each disk is cut by the storage backend that owns its image
  (:mod:`freezeframe.storage.backends`: ``qcow2`` overlays through the driver, ``rbd``
  snapshots); the parts that can be taken back (RBD snapshots, all at once) are cut first, the
  qcow2 transaction last, so any failure takes every part back. Without a freeze, a cut with a
  backend that has no atomic multi-disk cut runs with the vCPUs paused (recorded).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from freezeframe._aio import shielded
from freezeframe.agent import Agent
from freezeframe.catalog import Catalog, holder_is_dead, make_owner
from freezeframe.engine.chain import (
    broken_chain_hint,
    describe_missing,
    missing_chain_files,
    open_copies,
)
from freezeframe.engine.images import (
    IMAGE_HELD,
    fingerprint,
    held_images,
    held_message,
    protect_image,
)
from freezeframe.engine.plan import (
    Plan,
    agent_of_other_disks,
    check_exclusions,
    level_of,
    make_plan,
)
from freezeframe.engine.timeline import Timeline
from freezeframe.errors import (
    Action,
    AgentCommandError,
    AgentError,
    AgentProtocolError,
    AgentTimeoutError,
    BrokenChainError,
    CatalogError,
    CutError,
    FreezeframeError,
    HypervisorError,
    Remedy,
    SnapshotFailedError,
    SnapshotUnrecordedError,
    StorageError,
    ThawUnconfirmedError,
    UsageError,
)
from freezeframe.hypervisor import HypervisorDriver, PreparedCut, load_driver
from freezeframe.hypervisor.base import CutState
from freezeframe.models import (
    MAX_FREEZE_TIMEOUT,
    NO_MOUNTED_FILESYSTEM,
    AgentInfo,
    ConsistencyLevel,
    DiskInfo,
    FreezeIntent,
    FsFreezeState,
    GuestFilesystem,
    ImageFingerprint,
    QuiescePolicy,
    SnapshotDisk,
    SnapshotFilesystem,
    SnapshotRecord,
    SnapshotStatus,
    TimelineEvent,
    VmConfig,
)
from freezeframe.storage.backends import (
    Qcow2Backend,
    StorageBackend,
    backend_name_for,
    load_backend,
)

__all__ = [
    "AgentFactory",
    "AgentProbe",
    "DriverFactory",
    "Hook",
    "SnapshotRequest",
    "Snapshotter",
    "new_snapshot_id",
    "open_driver",
]

log = logging.getLogger(__name__)

#: Code of a registration whose agent is provably not the one inside the VM (another VM's
#: socket, or a guest with none of the VM's disks): refused under every policy.
AGENT_WRONG_VM = "agent-wrong-vm"

#: Commands the freeze needs from the agent.
FREEZE_COMMANDS = ("guest-fsfreeze-freeze", "guest-fsfreeze-thaw", "guest-fsfreeze-status")

ProgressFn = Callable[[TimelineEvent], None]
#: Builds an unconnected driver for a VM (default: :func:`open_driver`, by the VM's driver name).
DriverFactory = Callable[[VmConfig], HypervisorDriver]
#: Builds an unconnected agent client for an agent address, given the VM's connected driver and
#: the default call timeout (default: the driver's own :meth:`HypervisorDriver.agent_at`).
AgentFactory = Callable[[HypervisorDriver, str, float], Agent]
#: Called with the VM's name and its connected driver; runs outside the freeze window.
Hook = Callable[[str, HypervisorDriver], Awaitable[None]]


def new_snapshot_id() -> str:
    """A short random id; snapshots are ordered by their creation time, not by id."""
    return secrets.token_hex(6)


def open_driver(cfg: VmConfig) -> HypervisorDriver:
    """An unconnected driver for ``cfg`` (its class loaded lazily by name).

    Raises UsageError (unknown driver, missing setting), DependencyError (optional module).
    """
    cls = load_driver(cfg.driver)
    return cls.from_config(cfg)


@dataclass(frozen=True, slots=True)
class SnapshotRequest:
    """One call's wishes; None means "the VM's own setting"."""

    quiesce: QuiescePolicy | None = None
    freeze_timeout: float | None = None
    exclude_mounts: tuple[str, ...] = ()
    exclude_disks: tuple[str, ...] = ()
    #: Keep the guest frozen this long after the cut (demonstrations and kill tests); bounded
    #: by the freeze deadline.
    hold_frozen: float = 0.0
    #: The id of the new record (a caller that must name the snapshot before it is taken, such
    #: as a server answering ``202 Accepted``); None: a new random id.
    snapshot_id: str | None = None
    #: Where this call's overlays go (``--overlay-dir``); None: the VM's own ``overlay_dir``,
    #: else next to each image.
    overlay_dir: str | None = None


@dataclass(frozen=True, slots=True)
class AgentProbe:
    """What the engine learned from the agent before deciding anything. ``address`` is the
    agent's address in the driver's terms (a socket path for QMP)."""

    address: str | None
    problem: str | None = None
    info: AgentInfo | None = None
    filesystems: list[GuestFilesystem] | None = None
    state: FsFreezeState | None = None
    ping_ms: float | None = None
    #: The VM's run state when the agent did not answer (``paused``, ``io-error``, ...).
    vm_state: str | None = None
    #: Why there is no usable agent, as a stable code (None when there is one):
    #: ``agent-off`` (configured without), ``no-channel``, ``no-address``, ``guest-frozen``,
    #: ``freeze-commands-disabled``, ``vm-not-running``, ``agent-protocol`` (what answers
    #: breaks the protocol), ``agent-unreachable`` (nothing answers), ``agent-wrong-vm`` (the
    #: registered agent is not the one inside this VM: never frozen, refused).
    code: str | None = None


@dataclass(slots=True)
class _Run:
    """The working state of one snapshot call (mutable; turned into the record at the end)."""

    cfg: VmConfig
    req: SnapshotRequest
    policy: QuiescePolicy
    freeze_timeout: float
    owner: str
    tl: Timeline
    record: SnapshotRecord
    plan: Plan | None = None
    prepared: PreparedCut | None = None
    probe: AgentProbe | None = None
    agent: Agent | None = None
    frozen_count: int | None = None
    freeze_problem: str | None = None
    freeze_sent: bool = False
    freeze_refused: bool = False  # the agent answered the freeze with an error
    thaw_confirmed: bool = False
    thaw_note: str = ""
    cut_done: bool = False
    cut_unknown: bool = False
    cut_interrupted: bool = False  # cancelled while the cut's transaction ran
    intent_id: int | None = None  # the freeze intent, once the thaw was attempted
    intent_closed: bool = False
    notes: list[str] = field(default_factory=list)
    #: Per disk (device): the image at the cut's fingerprint and its mode before protection.
    cut_images: dict[str, tuple[ImageFingerprint | None, int | None]] = field(default_factory=dict)
    followup: asyncio.Task[bool] | None = None
    stored: asyncio.Event = field(default_factory=asyncio.Event)
    #: The storage backends of this VM's disks by name (``qcow2`` always; ``rbd`` when a disk
    #: is in Ceph), and the prepared parts of the backends other than qcow2 (whose part is
    #: ``prepared``), in the order they are cut: before the qcow2 transaction.
    backends: dict[str, StorageBackend] = field(default_factory=dict)
    parts: list[tuple[StorageBackend, Any]] = field(default_factory=list)

    @property
    def sid(self) -> str:
        return self.record.id


class Snapshotter:
    """Takes snapshots of VMs registered in a catalog. Safe to reuse from a long-running server.

    ``thaw_timeout`` bounds one thaw + status confirmation; ``ping_timeout`` the preflight ping;
    ``preflush_timeout`` the ``guest-exec sync`` before the freeze (also bounded by the freeze
    deadline). With ``followup`` (servers), a thaw that could not be confirmed keeps being
    retried in the background for ``followup_for`` seconds, holding the VM's lock meanwhile
    (see :meth:`wait_followups`); without it (the CLI) the freeze intent stays open for
    ``freezeframe recover``.

    ``before_freeze`` runs after everything is prepared, right before the freeze is sent (for
    application quiescing, or to pause the vCPUs in a test); ``after_thaw`` runs after every
    thaw attempt once ``before_freeze`` ran, even on failures. ``driver_factory`` and
    ``agent_factory`` replace how drivers and agents are built (tests run the engine on
    :mod:`freezeframe.testing`'s fakes this way). A ``before_freeze`` that raises
    FreezeframeError fails the snapshot like any step; an ``after_thaw`` error is noted on the
    record.
    """

    def __init__(
        self,
        catalog: Catalog,
        *,
        thaw_timeout: float = 5.0,
        ping_timeout: float = 2.0,
        preflush_timeout: float = 30.0,
        followup: bool = False,
        followup_for: float = 300.0,
        before_freeze: Hook | None = None,
        after_thaw: Hook | None = None,
        driver_factory: DriverFactory | None = None,
        agent_factory: AgentFactory | None = None,
    ) -> None:
        self.catalog = catalog
        self.thaw_timeout = thaw_timeout
        self.ping_timeout = ping_timeout
        self.preflush_timeout = preflush_timeout
        self.followup = followup
        self.followup_for = followup_for
        self.before_freeze = before_freeze
        self.after_thaw = after_thaw
        self.driver_factory: DriverFactory = driver_factory or open_driver
        self.agent_factory: AgentFactory = agent_factory or _driver_agent
        self._followups: set[asyncio.Task[bool]] = set()

    # ------------------------------------------------------------------ public

    async def snapshot(
        self, vm: str, request: SnapshotRequest | None = None, progress: ProgressFn | None = None
    ) -> SnapshotRecord:
        """Take one snapshot set of every disk of ``vm``; return the stored record.

        Raises NotFoundError (unknown VM), UsageError (bad request), BusyError (another
        snapshot of this VM is running), SnapshotFailedError (attempted and failed; the failed
        record is stored under its ``snapshot_id``), ThawUnconfirmedError (a SnapshotFailedError
        whose guest may still be frozen: its intent stays open for ``freezeframe recover``).
        A successful record may still be weaker than asked (``preferred``): compare
        ``record.level``, and ``record.thaw_unconfirmed``. ``progress`` is called for each
        step; steps inside the freeze window are reported after the thaw, and an exception
        raised by ``progress`` is logged and ignored.
        """
        req = request or SnapshotRequest()
        cfg = await self.catalog.get_vm(vm)
        policy = req.quiesce or cfg.quiesce
        freeze_timeout = (
            req.freeze_timeout if req.freeze_timeout is not None else cfg.freeze_timeout
        )
        if not 0 < freeze_timeout <= MAX_FREEZE_TIMEOUT:  # also false for NaN
            raise UsageError(
                f"freeze timeout must be in (0, {MAX_FREEZE_TIMEOUT:g}] seconds, "
                f"got {freeze_timeout:g}"
            )
        if not req.hold_frozen >= 0:
            raise UsageError("hold time must not be negative")
        owner = make_owner()
        try:
            await self.catalog.acquire_vm_lock(vm, owner)
        except asyncio.CancelledError:  # the lock may have been taken just before
            await shielded(self.catalog.release_vm_lock(vm, owner))
            raise
        run: _Run | None = None
        failing: BaseException | None = None
        try:
            record = SnapshotRecord(
                id=req.snapshot_id or new_snapshot_id(),
                vm=cfg.name,
                created_at=datetime.now(UTC),
                status=SnapshotStatus.RUNNING,
                policy=policy,
                level=ConsistencyLevel.NONE,
            )
            run = _Run(cfg, req, policy, freeze_timeout, owner, Timeline(progress), record)
            return await self._snapshot_locked(run)
        except BaseException as exc:
            failing = exc
            raise
        finally:
            # A follow-up still talking to the agent keeps the lock and releases it itself.
            if run is None or run.followup is None or run.followup.done():
                await shielded(self._release_lock(vm, owner, failing))

    async def _release_lock(self, vm: str, owner: str, failing: BaseException | None) -> None:
        """Release the VM's lock. When a snapshot error is on its way out, a release that fails
        too (the catalog is full or locked) does not replace it: it is logged and named in it
        (a dead process's lock is taken over by the next snapshot or ``recover`` of the VM)."""
        try:
            await self.catalog.release_vm_lock(vm, owner)
        except FreezeframeError as exc:
            if failing is None:
                raise
            log.error("could not release the lock of VM %s: %s", vm, exc.message)
            if isinstance(failing, FreezeframeError):
                failing.message += (
                    f"; the lock of VM {vm} could not be released ({exc.message}): it is taken "
                    "over once this process is gone"
                )

    async def wait_followups(self, timeout: float | None = None) -> bool:
        """Wait for background thaw follow-ups; True if every one confirmed a thaw."""
        tasks = list(self._followups)
        if not tasks:
            return True
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        return not pending and all(t.result() for t in done if not t.cancelled())

    async def probe_agent(
        self, cfg: VmConfig, driver: HypervisorDriver, disks: list[DiskInfo] | None = None
    ) -> AgentProbe:
        """Ask the agent everything the plan needs; never raises for agent trouble (it becomes
        ``problem``). With ``disks`` (the VM's), an agent whose guest has none of their serials
        is found out (``agent-wrong-vm``) like one on another VM's socket. The connection is
        closed again."""
        agent, probe = await self._connect_agent(cfg, driver, disks)
        if agent is not None:
            await agent.close()
        return probe

    # ------------------------------------------------------------------ the sequence

    async def _snapshot_locked(self, run: _Run) -> SnapshotRecord:
        tl = run.tl
        try:
            await self.catalog.begin_snapshot(run.record)
        except asyncio.CancelledError:  # it may have been stored just before: not an attempt
            with contextlib.suppress(FreezeframeError):
                await shielded(self.catalog.delete_snapshot(run.sid))
            raise
        tl.mark("started", f"policy {run.policy.value}, freeze deadline {run.freeze_timeout:g}s")
        try:
            record = await self._take(run)
            try:
                await self.catalog.finish_snapshot(record)
            except CatalogError as exc:
                if not run.cut_done:
                    raise
                # The disks switched: not "failed, nothing switched" (see _unrecorded).
                unrecorded = self._unrecorded(run, record, exc)
            else:
                return record
        except asyncio.CancelledError:
            await shielded(self._store_failure(run, "interrupted; " + self._thaw_summary(run)))
            raise
        except SnapshotFailedError as exc:
            # Refused before anything was prepared or frozen (a broken chain, another VM's
            # agent, an image a snapshot holds): recorded as failed, as it is.
            tl.mark("failed", exc.message, notify=False)
            await shielded(self._store_failure(run, exc.message))
            raise
        except UsageError:
            # Bad input found once the VM was asked (an exclusion naming nothing): not an
            # attempt, nothing was touched; forget the write-ahead record.
            await shielded(self.catalog.delete_snapshot(run.sid))
            raise
        except FreezeframeError as exc:
            tl.mark("failed", exc.message, notify=False)
            fs = exc.filesystems if isinstance(exc, _Failed) else ()
            await shielded(self._store_failure(run, exc.message, fs))
            if run.freeze_sent and not run.thaw_confirmed:
                raise ThawUnconfirmedError(
                    f"snapshot {run.sid} of {run.cfg.name} failed: {exc.message}; the thaw was "
                    "NOT confirmed: the guest may still be frozen",
                    snapshot_id=run.sid,
                    hint="thaw it now",
                    remedy=Remedy(Action.RECOVER, run.cfg.name),
                ) from exc
            raise SnapshotFailedError(
                f"snapshot {run.sid} of {run.cfg.name} failed: {exc.message}",
                snapshot_id=run.sid,
                hint=exc.hint,
                # why it failed: the cause's code (agent-unreachable, fs-not-freezable, ...)
                code=None if exc.code == FreezeframeError.default_code else exc.code,
                remedy=exc.remedy,
            ) from exc
        except Exception as exc:
            log.exception("snapshot %s of %s: internal error", run.sid, run.cfg.name)
            msg = f"internal error: {exc!r}; " + self._thaw_summary(run)
            await shielded(self._store_failure(run, msg))
            raise
        finally:
            run.stored.set()
        raise unrecorded

    def _unrecorded(
        self, run: _Run, record: SnapshotRecord, exc: CatalogError
    ) -> SnapshotFailedError:
        """The error for a cut that happened but whose finished record the catalog refused (its
        filesystem full, say). Nothing more is written — the catalog just failed — so the stored
        record stays ``running`` with the overlays the checkpoint recorded before the freeze,
        and ``freezeframe recover`` (which settles running records under the VM's lock) keeps
        and records them. Exit 13 (SnapshotUnrecordedError), or 12 (ThawUnconfirmedError) when
        the guest may still be frozen too."""
        vm = run.cfg.name
        overlays = tuple(d.overlay for d in record.disks if d.overlay)
        if run.intent_id is None:
            intent = "no freeze intent was opened (the guest was not frozen)"
            intent_open = False
        elif run.intent_closed:
            intent = (
                f"the guest was thawed (confirmed) and its freeze intent {run.intent_id} is closed"
            )
            intent_open = False
        elif run.thaw_confirmed:
            intent = (
                f"the guest was thawed (confirmed) but its freeze intent {run.intent_id} stays "
                "open (the catalog failed)"
            )
            intent_open = True
        else:
            intent = (
                f"the thaw was NOT confirmed: the guest may still be frozen; its freeze intent "
                f"{run.intent_id} stays open"
            )
            intent_open = True
        message = (
            f"snapshot {run.sid} of {vm} was cut but could not be recorded: {exc.message}. "
            f"The disks DID switch: the VM now writes to {', '.join(overlays)} (do not delete "
            f"them); the record stays 'running'; {intent}"
        )
        log.error("%s", message)
        err: SnapshotFailedError
        if run.freeze_sent and not run.thaw_confirmed:
            err = ThawUnconfirmedError(
                message,
                snapshot_id=run.sid,
                hint="recover it now: that thaws the guest and, once the catalog can be written "
                "again, records the switched disks",
                remedy=Remedy(Action.RECOVER, vm),
            )
        else:
            err = SnapshotUnrecordedError(
                message,
                snapshot_id=run.sid,
                overlays=overlays,
                intent_open=intent_open,
                hint="make the catalog writable again (free space on its filesystem), then "
                "recover the VM: that records the switched disks",
                remedy=Remedy(Action.RECOVER, vm),
            )
        err.__cause__ = exc
        return err

    async def _store_failure(
        self, run: _Run, error: str, filesystems: tuple[SnapshotFilesystem, ...] = ()
    ) -> None:
        """Record a failed attempt; when the cut happened (or may have), its disks too, so the
        overlays the VM now writes to are never lost from the catalog."""
        disks = (
            _snapshot_disks(run.prepared, parts=run.parts)
            if run.cut_done or run.cut_unknown
            else ()
        )
        failed = replace(
            run.record,
            status=SnapshotStatus.FAILED,
            error=error,
            disks=disks,
            filesystems=filesystems,
            timeline=run.tl.events,
            freeze_window_ms=run.tl.ms_between("freeze_sent", "thawed"),
        )
        try:
            await self.catalog.finish_snapshot(failed)
        except FreezeframeError as exc:
            log.error("could not record the failure of snapshot %s: %s", run.sid, exc)

    @staticmethod
    def _thaw_summary(run: _Run) -> str:
        if not run.freeze_sent:
            return "nothing was frozen"
        if run.thaw_confirmed:
            return "the guest was thawed (confirmed)"
        return "the thaw was NOT confirmed: the VM needs a recover"

    async def _take(self, run: _Run) -> SnapshotRecord:
        cfg, tl = run.cfg, run.tl
        driver = self.driver_factory(cfg)
        async with driver:
            await self._apply_driver_policy(run, driver)
            cfg = run.cfg
            disks = await driver.disks()
            if not disks:
                raise UsageError(f"VM {cfg.name} has no writable disk to snapshot")
            self._refuse_broken_chain(run, disks)
            self._refuse_held_images(run, disks, await self.catalog.list_snapshots(cfg.name))
            if cfg.agent and run.policy is QuiescePolicy.OFF:
                # Not frozen, but a registration naming another VM's agent is refused all
                # the same: the next quiesced snapshot would freeze the wrong guest.
                await self._refuse_wrong_agent(run, driver)
            if await driver.run_state() == "io-error":
                # QEMU paused the VM because writing to its images failed (a full host
                # filesystem, typically): overlays and a cut would land on the same storage.
                raise _Failed(
                    f"VM {cfg.name} is paused on an I/O error (status io-error): its storage "
                    "is full or failing; nothing was prepared or frozen",
                    hint="free space on the filesystem of its images (or fix the storage), "
                    "resume the VM (QMP `cont`, `virsh resume`), then retry",
                )
            cut_disks = [d for d in disks if d.device not in set(run.req.exclude_disks)]
            run.record = replace(run.record, parent_id=await self._parent(cfg.name, cut_disks))
            run.backends = self._backends(run, driver, disks)
            run.probe = AgentProbe(address=None, problem="quiesce off")
            if run.policy is not QuiescePolicy.OFF:
                run.agent, run.probe = await self._connect_agent(cfg, driver, disks)
                if run.probe.code == AGENT_WRONG_VM:
                    raise self._wrong_agent_error(run, run.probe.problem or "")
            try:
                plan = run.plan = self._plan(run, disks, driver)
                tl.mark("planned", _plan_summary(plan))
                if run.policy is QuiescePolicy.REQUIRED and plan.problems:
                    hint, code, remedy = _hint_for(cfg.name, plan.problems)
                    raise _Failed(
                        "quiesce is required but: " + "; ".join(plan.problems),
                        filesystems=tuple(d.as_record(frozen=False) for d in plan.filesystems),
                        hint=hint,
                        code=code,
                        remedy=remedy,
                    )
                await self._prepare(run, list(plan.disks))
                tl.mark("prepared", _prepared_summary(run))
                try:
                    await self._checkpoint(run)
                    quiesce = (
                        plan.quiesce and run.agent is not None and run.probe.address is not None
                    )
                    if quiesce:
                        problem = await self._preflush(run)
                        if problem is not None:
                            run.freeze_problem = problem
                            if run.policy is QuiescePolicy.REQUIRED:
                                raise _Failed(f"quiesce is required but {problem}; nothing frozen")
                            quiesce = False
                    if quiesce:
                        await self._freeze_cut_thaw(run, driver)
                    else:
                        await self._settle_cut(run, driver, await self._cut(run, driver, None))
                finally:
                    if run.cut_interrupted:
                        await shielded(self._resolve_interrupted_cut(run, driver))
                    # An unknown outcome keeps everything: the VM may be writing to an overlay.
                    if not run.cut_done and not run.cut_unknown:
                        await shielded(self._abort(run))
                await self._verify_cut(run, driver)
                self._protect_cut(run)
                evidence: tuple[str, ...] = ()
                if run.agent is not None and cfg.agent_log_path and run.frozen_count is not None:
                    evidence = await self._evidence(run.agent, cfg.agent_log_path, tl)
            finally:
                if run.agent is not None and run.followup is None:
                    await shielded(run.agent.close())
        return self._finish(run, evidence)

    # ------------------------------------------------------------------ steps

    @staticmethod
    def _refuse_broken_chain(run: _Run, disks: list[DiskInfo]) -> None:
        """Raise BrokenChainError when a file of the chain of a disk to snapshot (not one
        excluded with ``--exclude-disk``) is missing on this host: the overlay would back onto
        an unlinked file, and the image at the cut would be lost when QEMU exits."""
        excluded = set(run.req.exclude_disks)
        chosen = [d for d in disks if d.device not in excluded and d.node not in excluded]
        missing = missing_chain_files(chosen)
        if not missing:
            return
        copies = open_copies([f for files in missing.values() for f in files])
        raise BrokenChainError(
            f"snapshot {run.sid} of {run.cfg.name} refused, nothing prepared or frozen: "
            f"{describe_missing(missing)} on this host (the image chain QEMU runs on is "
            "broken: a snapshot now would back onto a deleted file)",
            snapshot_id=run.sid,
            missing=missing,
            hint=broken_chain_hint(copies),
        )

    async def _apply_driver_policy(self, run: _Run, driver: HypervisorDriver) -> None:
        """A policy kept with the VM by its hypervisor (libvirt: ``<freezeframe:policy>`` in
        the domain's metadata) wins over the registration; the request wins over both."""
        pol = await driver.policy()
        if pol is None:
            return
        said = []
        if pol.agent is not None and pol.agent != run.cfg.agent:
            run.cfg = replace(run.cfg, agent=pol.agent)
            said.append(f"agent {'yes' if pol.agent else 'no'}")
        if pol.quiesce is not None and run.req.quiesce is None:
            run.policy = pol.quiesce
            run.record = replace(run.record, policy=pol.quiesce)
            said.append(f"quiesce {pol.quiesce.value}")
        if pol.freeze_timeout is not None and run.req.freeze_timeout is None:
            if not 0 < pol.freeze_timeout <= MAX_FREEZE_TIMEOUT:
                raise UsageError(
                    f"the VM's metadata sets a freeze timeout of {pol.freeze_timeout:g} s, "
                    f"outside (0, {MAX_FREEZE_TIMEOUT:g}]"
                )
            run.freeze_timeout = pol.freeze_timeout
            said.append(f"freeze deadline {pol.freeze_timeout:g}s")
        if said:
            run.tl.mark("policy", f"from the {driver.name} VM's own metadata: " + ", ".join(said))

    async def _checkpoint(self, run: _Run) -> None:
        """Store the running record with its prepared disks, parent and timeline so far: if the
        process dies from here on, ``freezeframe recover`` finds the overlays to clean up (or,
        when the cut happened, to keep) and the record keeps its story."""
        rec = replace(run.record, disks=_snapshot_disks(run.prepared, parts=run.parts),
                      timeline=run.tl.events)  # fmt: skip
        await self.catalog.finish_snapshot(rec)

    async def _parent(self, vm: str, disks: list[DiskInfo]) -> str | None:
        """The snapshot this one continues, for the ``disks`` it cuts: the newest one that
        covered exactly these disks and whose new overlays are what they write to now (not
        merely the VM's newest: a VM re-created under the same name starts a new chain).
        None when no single snapshot is that for every disk (one taken with ``exclude_disks``
        before, or a disk added since): each disk's own ancestor is then the snapshot whose
        overlay is its image at the cut."""
        current = {d.device: d.file for d in disks}
        for rec in reversed(await self.catalog.list_snapshots(vm)):
            # Failed attempts count too when their cut happened (their disks are recorded).
            # An RBD disk writes on to its image (``rbd:pool/image``) after its snapshot.
            overlays = {d.device: o for d in rec.disks if (o := _written_after(d))}
            if overlays == current:
                return rec.id
            if any(_written_after(d) in current.values() for d in rec.disks):
                return None  # the newest ancestor of some disk covers other disks
        return None

    def _refuse_held_images(
        self, run: _Run, disks: list[DiskInfo], records: list[SnapshotRecord]
    ) -> None:
        """Raise SnapshotFailedError (code ``image-held-by-snapshot``) when a disk of the VM
        writes to an image a recorded snapshot holds at its cut (the VM was restarted on it):
        whatever it writes changes that snapshot, and a new snapshot would back onto it."""
        held = held_images(disks, records)
        if not held:
            return
        message, hint, remedy = held_message(run.cfg.name, held)
        raise SnapshotFailedError(
            f"snapshot {run.sid} of {run.cfg.name} refused, nothing prepared or frozen: " + message,
            snapshot_id=run.sid,
            hint=hint,
            code=IMAGE_HELD,
            remedy=remedy,
        )

    async def _refuse_wrong_agent(self, run: _Run, driver: HypervisorDriver) -> None:
        """Without connecting to any agent: raise SnapshotFailedError (``agent-wrong-vm``) when
        the agent address the VM is registered with is not the channel QEMU serves."""
        if not driver.capabilities.agent_channel_check:
            return
        channel = await driver.agent_channel()
        address = driver.agent_address(run.cfg, channel)
        if channel is None or address is None:
            return
        elsewhere = driver.agent_elsewhere(address, channel)
        if elsewhere is not None:
            raise self._wrong_agent_error(run, _wrong_socket(run.cfg.name, address, elsewhere))

    @staticmethod
    def _wrong_agent_error(run: _Run, problem: str) -> SnapshotFailedError:
        run.tl.mark("agent_wrong_vm", problem)
        return SnapshotFailedError(
            f"snapshot {run.sid} of {run.cfg.name} refused, nothing frozen or cut: {problem}",
            snapshot_id=run.sid,
            hint="register the agent socket QEMU serves for this VM again, keeping its other "
            "settings (its doctor check names the socket)",
            remedy=Remedy(Action.ADD_VM, run.cfg.name, {"replace": "yes", "qga": "PATH"}),
            code=AGENT_WRONG_VM,
        )

    async def _connect_agent(
        self, cfg: VmConfig, driver: HypervisorDriver, disks: list[DiskInfo] | None = None
    ) -> tuple[Agent | None, AgentProbe]:
        if not cfg.agent:
            return None, AgentProbe(
                address=None,
                code="agent-off",
                problem="the VM is configured without a guest agent "
                "(set hw_qemu_guest_agent=yes on the image / register it with an agent)",
            )
        channel: str | None = None
        if driver.capabilities.agent_channel_check:
            channel = await driver.agent_channel()
            if channel is None:
                return None, AgentProbe(
                    address=None,
                    code="no-channel",
                    problem="the VM has no guest-agent channel (no virtio-serial port "
                    "org.qemu.guest_agent.0; set hw_qemu_guest_agent=yes on the image)",
                )
        address = driver.agent_address(cfg, channel)
        if address is None:
            return None, AgentProbe(
                address=None,
                code="no-address",
                problem="no guest-agent socket path is known (the VM is registered without one)",
            )
        elsewhere = driver.agent_elsewhere(address, channel)
        if elsewhere is not None:  # never connected to: its guest is not this VM
            return None, AgentProbe(
                address=address,
                code=AGENT_WRONG_VM,
                problem=_wrong_socket(cfg.name, address, elsewhere),
            )
        agent = self.agent_factory(driver, address, self.thaw_timeout)
        keep = False
        try:
            await agent.connect(timeout=self.ping_timeout)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            await agent.ping(timeout=self.ping_timeout)
            ping_ms = (loop.time() - t0) * 1000
            # Ask the freeze state first: while frozen, qemu-ga reports most commands disabled.
            state = await agent.fsfreeze_status()
            info = await agent.info()
            fs = await agent.get_fsinfo() if state is FsFreezeState.THAWED else None
            foreign = agent_of_other_disks(fs, disks) if fs and disks else None
            if foreign is not None:
                return None, AgentProbe(
                    address=address,
                    info=info,
                    state=state,
                    code=AGENT_WRONG_VM,
                    problem=f"the guest agent at {address} is not VM {cfg.name}'s: {foreign}",
                )
            if state is FsFreezeState.FROZEN:
                return None, AgentProbe(
                    address=address,
                    info=info,
                    state=state,
                    code="guest-frozen",
                    problem=await self._frozen_by(cfg.name),
                )
            missing = [c for c in FREEZE_COMMANDS if not info.enabled(c)]
            if missing:
                return None, AgentProbe(
                    address=address,
                    info=info,
                    state=state,
                    code="freeze-commands-disabled",
                    problem="the guest agent has the freeze commands disabled or unsupported: "
                    + ", ".join(missing),
                )
            keep = True
            return agent, AgentProbe(
                address=address, info=info, filesystems=fs, state=state, ping_ms=ping_ms
            )
        except AgentError as exc:
            run_state = await driver.run_state()
            if run_state is not None and run_state != "running":
                # Not the guest's package: the vCPUs do not run, nothing in the guest answers.
                why = " (QEMU paused it on an I/O error: is the host's storage full?)"
                return None, AgentProbe(
                    address=address,
                    vm_state=run_state,
                    code="vm-not-running",
                    problem=f"the VM is not running (status {run_state})"
                    + (why if run_state == "io-error" else "")
                    + f": its guest agent cannot answer ({exc.message})",
                )
            if isinstance(exc, AgentProtocolError):
                # Something answers, but not as qemu-ga does: not a missing package.
                return None, AgentProbe(
                    address=address,
                    vm_state=run_state,
                    code="agent-protocol",
                    problem=f"what answers on the guest-agent channel breaks the protocol "
                    f"({exc.message}): it is no working qemu-ga",
                )
            return None, AgentProbe(
                address=address,
                vm_state=run_state,
                code="agent-unreachable",
                problem=f"the guest agent does not answer ({exc.message}); "
                "install and start qemu-guest-agent in the guest",
            )
        finally:
            if not keep:  # also on cancellation: QEMU's agent socket serves one client
                await shielded(agent.close())

    async def _frozen_by(self, vm: str) -> str:
        """Why the guest is frozen already, as far as the catalog knows: an earlier snapshot
        whose freeze was never confirmed thawed (its process died or hangs), or someone else."""
        try:
            intents = await self.catalog.open_intents(vm)
        except FreezeframeError:
            intents = []
        if not intents:
            return (
                "the guest is already frozen by someone else (guest-fsfreeze-status); not "
                "touching it — thaw it with guest-fsfreeze-thaw if that freeze is stale"
            )
        i = intents[0]
        who = "a process that is gone" if holder_is_dead(i.owner, i.opened_at) else "running"
        return (
            f"the guest is still frozen by snapshot {i.snapshot_id} (freeze intent {i.id}, "
            f"{i.owner}: {who}); not touching it — recover {vm} first"
        )

    def _plan(self, run: _Run, disks: list[DiskInfo], driver: HypervisorDriver) -> Plan:
        cfg, req = run.cfg, run.req
        probe = run.probe
        assert probe is not None
        excl_mounts = tuple(dict.fromkeys((*cfg.exclude_mounts, *req.exclude_mounts)))
        bad = check_exclusions(disks, probe.filesystems, excl_mounts, req.exclude_disks)
        if bad:
            raise UsageError("; ".join(bad))
        plan = make_plan(
            policy=run.policy,
            disks=disks,
            guest_fs=probe.filesystems,
            exclude_mounts=excl_mounts,
            exclude_disks=req.exclude_disks,
            agent_problem=probe.problem if run.policy is not QuiescePolicy.OFF else None,
        )
        if not plan.disks:
            raise UsageError("every disk is excluded: nothing to snapshot")
        uncuttable = [
            f"disk {d.device}: {why}"
            for d in plan.disks
            if (why := run.backends[backend_name_for(d)].cut_problem(d))
        ]
        if uncuttable:
            raise _Failed(
                "cannot snapshot " + "; ".join(uncuttable),
                hint="leave such disks out of the snapshot",
                code="disk-not-cuttable",
            )
        return plan

    async def _preflush(self, run: _Run) -> str | None:
        """Flush the guest's dirty data while it still runs, so FIFREEZE has little to do.

        Returns a problem when the flush did not finish in time: the guest's storage or agent
        is too slow to freeze within the deadline, so no freeze is sent.
        """
        agent, probe, tl = run.agent, run.probe, run.tl
        assert agent is not None
        if probe is None or probe.info is None or not probe.info.enabled("guest-exec"):
            tl.mark("preflush_skipped", "guest-exec is disabled in the agent")
            return None
        budget = min(self.preflush_timeout, run.freeze_timeout)
        tl.mark("preflush_sent", "guest-exec sync")
        try:
            res = await agent.exec("sync", timeout=budget, capture=False)
        except AgentTimeoutError:
            problem = f"the pre-freeze flush (guest-exec sync) did not finish within {budget:g} s"
            tl.mark("preflush_timeout", problem)
            return problem
        except AgentError as exc:
            tl.mark("preflush_failed", exc.message)
            return None
        tl.mark("preflushed", f"exit {res.exitcode}")
        return None

    async def _freeze_cut_thaw(self, run: _Run, driver: HypervisorDriver) -> None:
        """The freeze window: freeze -> cut -> thaw, nothing else. Progress notifications are
        held until the thaw is done; the thaw and the intent's closing are one shielded unit."""
        cfg, tl, plan, agent = run.cfg, run.tl, run.plan, run.agent
        assert plan is not None
        assert agent is not None
        assert run.probe is not None
        address = run.probe.address
        assert address is not None
        hooked = False
        intent: FreezeIntent | None = None
        cut_exc: BaseException | None = None
        try:
            if self.before_freeze is not None:
                hooked = True  # a hook that fails half-way still gets its after_thaw
                await self.before_freeze(cfg.name, driver)
                tl.mark("before_freeze_hook")
            try:
                intent = await self.catalog.open_intent(cfg.name, run.sid, address, run.owner)
            except asyncio.CancelledError:  # stored just before? nothing is frozen: close it
                await shielded(self._close_own_intents(run))
                raise
            await agent.ready_for_freeze(run.freeze_timeout)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + run.freeze_timeout
            with tl.deferred():
                try:
                    run.freeze_sent = True
                    tl.mark("freeze_sent", "all filesystems" if plan.freeze_list is None else
                            "list: " + " ".join(plan.freeze_list))  # fmt: skip
                    await self._freeze(run, agent, plan)
                    if run.freeze_problem is None or run.policy is not QuiescePolicy.REQUIRED:
                        if run.req.hold_frozen > 0 and run.freeze_problem is None:
                            hold = min(run.req.hold_frozen, max(0.0, deadline - loop.time()))
                            tl.mark("holding", f"{hold:.2f} s (requested)")
                            await asyncio.sleep(hold)
                        cut_exc = await self._cut(run, driver, deadline)
                finally:
                    urgent = run.frozen_count is None  # the freeze never answered
                    await shielded(self._thaw_and_close(run, agent, intent, urgent=urgent))
        finally:
            if hooked and self.after_thaw is not None:
                await shielded(self._after_thaw(run, driver))
        assert intent is not None
        if not run.thaw_confirmed and not run.freeze_refused and not self.followup:
            await shielded(self._thaw_late(run, agent, intent))
        if not run.thaw_confirmed:
            self._unconfirmed(run, agent, intent)
        await self._settle_cut(run, driver, cut_exc)
        if run.freeze_problem is not None and run.policy is QuiescePolicy.REQUIRED:
            raise _Failed(
                f"quiesce is required but {run.freeze_problem}; nothing was switched"
                + (f"; {run.thaw_note}" if run.thaw_note else ""),
                hint="check the guest agent",
                code="freeze-failed",
                remedy=Remedy(Action.DOCTOR, run.cfg.name),
            )

    async def _freeze(self, run: _Run, agent: Agent, plan: Plan) -> None:
        tl = run.tl
        try:
            if plan.freeze_list is None:
                count = await agent.fsfreeze_freeze(timeout=run.freeze_timeout)
            else:
                count = await agent.fsfreeze_freeze_list(
                    plan.freeze_list, timeout=run.freeze_timeout
                )
        except AgentTimeoutError:
            run.freeze_problem = (
                f"the freeze did not complete within the {run.freeze_timeout:g} s deadline"
            )
            tl.mark("freeze_timeout", run.freeze_problem)
            return
        except AgentCommandError as exc:
            # The agent refused or failed the freeze and says so: qemu-ga froze nothing (it
            # thaws its own partial freeze before answering an error).
            run.freeze_problem = f"the freeze failed: {exc.message}"
            run.freeze_refused = True
            tl.mark("freeze_failed", exc.message)
            return
        except AgentError as exc:
            run.freeze_problem = f"the freeze failed: {exc.message}"
            tl.mark("freeze_failed", exc.message)
            return
        run.frozen_count = count
        tl.mark("frozen", f"{count} filesystem(s) frozen, {plan.expected_frozen} expected")
        if count < plan.expected_frozen:
            run.freeze_problem = (
                f"the agent froze {count} of {plan.expected_frozen} filesystems; "
                "which ones failed is not reported by the agent"
            )

    async def _cut(
        self, run: _Run, driver: HypervisorDriver, deadline: float | None
    ) -> BaseException | None:
        """One atomic cut; bounded by the freeze deadline (at least 1 s) when frozen. Returns
        the error instead of raising so the thaw comes first; :meth:`_settle_cut` judges it."""
        prepared = run.prepared
        assert prepared is not None
        paused = await self._pause_for_cut(run, driver)
        try:
            run.tl.mark("cut_sent")
            try:
                if deadline is None:
                    await self._cut_parts(run)
                else:
                    left = max(deadline - asyncio.get_running_loop().time(), 1.0)
                    async with asyncio.timeout(left):
                        await self._cut_parts(run)
            except (HypervisorError, StorageError, TimeoutError) as exc:
                msg = exc.message if isinstance(exc, FreezeframeError) else "no answer in time"
                run.tl.mark("cut_failed", msg)
                return exc
            except asyncio.CancelledError:
                # The transaction may have been sent: until asked (after the thaw), the VM
                # may write to the new overlays, so nothing may be deleted and the disks are
                # recorded.
                run.cut_unknown = run.cut_interrupted = True
                run.tl.mark("cut_interrupted", "cancelled while the transaction ran")
                raise
        finally:
            if paused:
                await shielded(self._resume_after_cut(run, driver))
        run.cut_done = True
        n_other = sum(len(b.record_disks(h)) for b, h in run.parts)
        if n_other:
            run.tl.mark(
                "cut",
                f"{n_other} RBD snapshot(s) at once"
                + (f", then {len(prepared.disks)} disk(s) in one transaction"
                   if prepared.disks else ""),
            )  # fmt: skip
        else:
            run.tl.mark("cut", f"{len(prepared.disks)} disk(s) in one transaction")
        return None

    async def _cut_parts(self, run: _Run) -> None:
        """The cut itself: first the parts that can be taken back (every RBD snapshot at once,
        all or nothing), then the qcow2 disks' one atomic transaction; if that fails, the
        RBD snapshots are removed again by the abort that follows (nothing is switched)."""
        prepared = run.prepared
        assert prepared is not None
        if run.parts:
            results = await asyncio.gather(
                *(b.cut(h) for b, h in run.parts), return_exceptions=True
            )
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                raise errors[0]
        if prepared.disks:
            await run.backends["qcow2"].cut(prepared)

    async def _pause_for_cut(self, run: _Run, driver: HypervisorDriver) -> bool:
        """Pause the vCPUs before a cut that is not atomic by itself (several disks, one of
        them cut by a backend without an atomic multi-disk cut: RBD) while nothing is frozen
        (no agent, quiesce off, or a freeze that failed under ``preferred``). True when it
        paused (and :meth:`_resume_after_cut` must follow). Raises HypervisorError."""
        frozen = run.frozen_count is not None and run.freeze_problem is None
        if frozen or not run.parts:
            return False
        if all(b.capabilities.atomic_multi_disk for b, _ in run.parts):
            return False
        if len(_snapshot_disks(run.prepared, parts=run.parts)) < 2:
            return False
        if not driver.capabilities.pause_resume:
            run.notes.append(f"the {driver.name} driver cannot pause the vCPUs: the cut of "
                             "several disks with RBD images is not atomic")  # fmt: skip
            return False
        state = await driver.run_state()
        if state not in ("running", None):
            run.tl.mark("not_paused", f"the VM is {state} already: the cut is atomic")
            return False
        await driver.pause()
        run.tl.mark("paused", "vCPUs stopped around the cut (nothing frozen)")
        return True

    async def _resume_after_cut(self, run: _Run, driver: HypervisorDriver) -> None:
        """Resume the vCPUs :meth:`_pause_for_cut` stopped; mark how long they were stopped
        (``resumed``, ``pause_window``) and say so on the record. Never raises a
        HypervisorError (a failed resume is noted)."""
        try:
            await driver.resume()
        except HypervisorError as exc:
            run.tl.mark("resume_failed", exc.message)
            run.notes.append(f"the vCPUs paused for the cut could not be resumed: {exc.message}")
            return
        run.tl.mark("resumed")
        paused_ms = run.tl.ms_between("paused", "resumed") or 0.0
        run.tl.mark("pause_window", f"{paused_ms:.1f} ms")
        run.notes.append(
            f"the guest's vCPUs were paused for {paused_ms:.0f} ms around the cut "
            "(nothing frozen: a cut of several disks with RBD images is atomic only so)"
        )

    def _backends(
        self, run: _Run, driver: HypervisorDriver, disks: list[DiskInfo]
    ) -> dict[str, StorageBackend]:
        """The storage backend of each kind of disk the VM has: ``qcow2`` (the driver's
        overlays) always, the others loaded by name when a disk needs them. Raises UsageError
        / DependencyError (a backend whose package is missing)."""
        out: dict[str, StorageBackend] = {
            "qcow2": Qcow2Backend(driver, run.req.overlay_dir or run.cfg.overlay_dir)
        }
        for d in disks:
            name = backend_name_for(d)
            if name not in out:
                out[name] = load_backend(name).for_vm(run.cfg, driver)
        return out

    async def _prepare(self, run: _Run, disks: list[DiskInfo]) -> PreparedCut:
        """Prepare every disk with its backend before the freeze: the qcow2 overlays (the
        driver's), then the other backends' parts (``run.parts``: RBD images opened). On a
        failure, what was prepared is removed again and the error raised."""
        groups: dict[str, list[DiskInfo]] = {}
        for d in disks:
            groups.setdefault(backend_name_for(d), []).append(d)
        qcow2 = run.backends["qcow2"]
        assert isinstance(qcow2, Qcow2Backend)
        prepared = await qcow2.prepare(run.sid, groups.pop("qcow2", []))
        run.prepared = prepared
        try:
            for name, group in groups.items():
                backend = run.backends[name]
                run.parts.append((backend, await backend.prepare(run.sid, group)))
        except BaseException:
            await shielded(self._abort(run))
            raise
        return prepared

    async def _abort(self, run: _Run) -> None:
        """Remove every part prepared (and made, when the cut is not kept). Never raises."""
        for backend, handle in run.parts:
            await backend.abort(handle)
        if run.prepared is not None:
            await run.backends["qcow2"].abort(run.prepared)

    async def _cut_state(self, run: _Run, driver: HypervisorDriver) -> CutState:
        """The state of the whole cut: the qcow2 transaction decides when there is one (the
        RBD snapshots are made before it: not switched there means nothing is kept); else
        every RBD snapshot made (switched) or none (not switched). Never raises."""
        prepared = run.prepared
        assert prepared is not None
        others = [await b.cut_state(h) for b, h in run.parts]
        if prepared.disks:
            state = await run.backends["qcow2"].cut_state(prepared)
            if state == "switched" and any(s != "switched" for s in others):
                return "unknown"
            return state
        if others and all(s == "switched" for s in others):
            return "switched"
        if others and all(s == "not-switched" for s in others):
            return "not-switched"
        return "unknown"

    async def _resolve_interrupted_cut(self, run: _Run, driver: HypervisorDriver) -> None:
        """After a cancellation during the cut (the guest is thawed by now): ask which images the
        disks use, so a switched cut is recorded and an unswitched one is cleaned up."""
        prepared = run.prepared
        assert prepared is not None
        try:
            async with asyncio.timeout(10):
                state = await self._cut_state(run, driver)
        except (HypervisorError, TimeoutError):
            state = "unknown"
        run.tl.mark("cut_state", state)
        if state == "switched":
            run.cut_done, run.cut_unknown = True, False
        elif state == "not-switched":
            run.cut_unknown = False

    async def _verify_cut(self, run: _Run, driver: HypervisorDriver) -> None:
        """Check that every disk writes to its new overlay. A check that cannot be made (QMP
        gone) falls back to :meth:`HypervisorDriver.cut_state`: a switched cut stays done."""
        prepared = run.prepared
        assert prepared is not None
        try:
            await run.backends["qcow2"].confirm(prepared)
            for backend, handle in run.parts:
                await backend.confirm(handle)
        except CutError as exc:
            raise _Failed(f"the cut was reported done but {exc.message}") from exc
        except HypervisorError as exc:
            try:
                state = await self._cut_state(run, driver)
            except HypervisorError:
                state = "unknown"
            if state != "switched":
                raise _Failed(
                    f"the cut was reported done but could not be checked ({exc.message}); "
                    "the overlays are kept and listed",
                    hint="check the VM's disks (query-block) before deleting any overlay",
                ) from exc
            run.notes.append(f"the cut could not be verified in full ({exc.message})")
            run.tl.mark("cut_state", state)
            return
        run.tl.mark(
            "cut_verified",
            ("every disk writes to its new overlay" if prepared.disks else "")
            + ("; " if prepared.disks and run.parts else "")
            + ("every RBD snapshot exists" if run.parts else ""),
        )

    def _protect_cut(self, run: _Run) -> None:
        """Once the cut is verified (the images at the cut are backing files now, settled): take
        their write bits away and fingerprint them (outside the window; a chmod that fails is
        noted, the snapshot stands)."""
        prepared = run.prepared
        assert prepared is not None
        if not prepared.disks:  # RBD snapshots are read-only by nature: nothing to protect
            return
        problems = []
        for p in prepared.disks:
            mode, problem = protect_image(p.image_at_cut)
            if problem is not None:
                problems.append(problem)
            run.cut_images[p.disk.device] = (fingerprint(p.image_at_cut), mode)
        if problems:
            note = "could not take the write bits of the images at the cut: " + "; ".join(problems)
            run.notes.append(note)
            run.tl.mark("protect_failed", note)
        else:
            run.tl.mark("protected", "images at the cut: write bits taken away, fingerprinted")

    async def _settle_cut(
        self, run: _Run, driver: HypervisorDriver, exc: BaseException | None
    ) -> None:
        """After a failed cut (outside the window): did the disks switch after all?"""
        if exc is None or run.cut_done:
            return
        prepared = run.prepared
        assert prepared is not None
        msg = exc.message if isinstance(exc, FreezeframeError) else "no answer in time"
        state = await self._cut_state(run, driver)
        run.tl.mark("cut_state", state)
        if state == "switched":
            run.cut_done = True
            run.notes.append(f"the cut reported an error ({msg}) but every disk did switch")
            return
        if state == "unknown":
            run.cut_unknown = True
            raise _Failed(
                f"the cut's outcome is unknown ({msg}); the overlays are kept and listed",
                hint="check the VM's disks (query-block) before deleting any overlay",
            )
        raise _Failed(
            f"the cut failed, nothing was switched: {msg}",
            code=exc.code if isinstance(exc, StorageError) else None,
            hint=exc.hint if isinstance(exc, StorageError) else None,
        )

    async def _thaw_and_close(
        self,
        run: _Run,
        agent: Agent,
        intent: FreezeIntent,
        *,
        urgent: bool,
    ) -> None:
        budget = 1.5 if urgent else self.thaw_timeout
        run.intent_id = intent.id
        if run.freeze_refused:
            # Nothing of ours is frozen: a thaw now could only undo someone else's freeze.
            run.thaw_confirmed = await self._nothing_frozen(run, agent, budget)
        else:
            run.thaw_confirmed = await self._thaw(agent, run.tl, budget, urgent=urgent)
        if run.thaw_confirmed:
            try:
                await self.catalog.close_intent(intent.id, "engine")
                run.intent_closed = True
            except FreezeframeError as exc:  # the guest is thawed; recover closes it later
                run.notes.append(f"freeze intent {intent.id} left open: {exc.message}")
                run.tl.mark("intent_left_open", f"freeze intent {intent.id}: {exc.message}")

    async def _thaw_late(self, run: _Run, agent: Agent, intent: FreezeIntent) -> None:
        """The thaw was not confirmed (the guest, its agent or QEMU hung) and no background
        follow-up will keep thawing (the CLI): keep the connection and keep thawing and asking
        for ``thaw_timeout`` seconds more before giving up. Closing the connection now could
        leave a guest that comes back frozen: qemu-ga blocks on the reply to a late freeze
        that nobody reads, and never gets to the thaw queued behind it."""
        loop = asyncio.get_running_loop()
        end = loop.time() + self.thaw_timeout
        while not run.thaw_confirmed and (left := end - loop.time()) > 0.1:
            run.thaw_confirmed = await self._thaw(agent, run.tl, min(left, 2.0), urgent=False)
            if not run.thaw_confirmed:
                await asyncio.sleep(min(0.25, max(0.0, end - loop.time())))
        if run.thaw_confirmed:
            run.tl.mark("thaw_late", "the thaw was confirmed on a later try")
            try:
                await self.catalog.close_intent(intent.id, "engine")
                run.intent_closed = True
            except FreezeframeError as exc:  # the guest is thawed; recover closes it later
                run.notes.append(f"freeze intent {intent.id} left open: {exc.message}")
                run.tl.mark("intent_left_open", f"freeze intent {intent.id}: {exc.message}")

    async def _close_own_intents(self, run: _Run) -> None:
        """Close the intents of this snapshot that are open although no freeze was sent."""
        try:
            for intent in await self.catalog.open_intents(run.cfg.name):
                if intent.snapshot_id == run.sid:
                    await self.catalog.close_intent(intent.id, "engine (no freeze sent)")
        except FreezeframeError as exc:
            log.warning("could not close the intents of snapshot %s: %s", run.sid, exc)

    async def _thaw(self, agent: Agent, tl: Timeline, budget: float, *, urgent: bool) -> bool:
        """Send the thaw and confirm it with guest-fsfreeze-status, within ``budget`` seconds.

        ``urgent`` (the freeze never answered): the thaw is written right behind a re-sync
        without waiting for it, so it sits in the agent's queue behind the late freeze even if
        nobody reads the answer (see Agent.fsfreeze_thaw_urgent).
        """
        tl.mark("thaw_sent", "pipelined behind the pending freeze" if urgent else "")
        try:
            async with asyncio.timeout(budget):
                if urgent:
                    n = await agent.fsfreeze_thaw_urgent(timeout=budget)
                    if n is None:
                        tl.mark("thaw_queued", "no answer yet; the thaw waits in the agent's queue")
                        return False
                else:
                    n = await agent.fsfreeze_thaw(timeout=budget)
                tl.mark("thawed", f"{n} filesystem(s) thawed")
                state = await agent.fsfreeze_status(timeout=budget)
        except (AgentError, TimeoutError) as exc:
            msg = exc.message if isinstance(exc, AgentError) else f"no answer within {budget:g} s"
            tl.mark("thaw_failed", msg)
            log.warning("thaw not confirmed: %s", msg)
            return False
        confirmed = state is FsFreezeState.THAWED
        tl.mark("thaw_confirmed" if confirmed else "still_frozen", f"status {state.value}")
        return confirmed

    async def _nothing_frozen(self, run: _Run, agent: Agent, budget: float) -> bool:
        """After a refused freeze: no thaw is sent; the intent closes, and a guest found frozen
        (by someone else) is named, not touched."""
        try:
            state = await agent.fsfreeze_status(timeout=budget)
        except AgentError as exc:
            run.tl.mark("status_failed", exc.message)
            return False
        run.tl.mark("not_frozen_by_us", f"freeze refused, no thaw sent; status {state.value}")
        if state is FsFreezeState.FROZEN:
            run.notes.append("the guest is frozen by someone else; freezeframe did not thaw it")
        return True

    async def _after_thaw(self, run: _Run, driver: HypervisorDriver) -> None:
        assert self.after_thaw is not None
        try:
            await self.after_thaw(run.cfg.name, driver)
            run.tl.mark("after_thaw_hook")
        except FreezeframeError as exc:
            run.tl.mark("after_thaw_hook_failed", exc.message)
            run.notes.append(f"after-thaw hook failed: {exc.message}")

    def _unconfirmed(self, run: _Run, agent: Agent, intent: FreezeIntent) -> None:
        run.thaw_note = (
            "thaw not confirmed: the guest may still be frozen or freeze late; the freeze "
            f"intent {intent.id} stays open"
        )
        if self.followup:
            task = asyncio.get_running_loop().create_task(self._followup(run, agent, intent))
            self._followups.add(task)
            task.add_done_callback(self._followups.discard)
            run.followup = task
            run.thaw_note += " (a background follow-up keeps thawing)"
        else:
            run.thaw_note += " — the VM needs a recover"
        run.tl.mark("thaw_unconfirmed", run.thaw_note)

    async def _followup(self, run: _Run, agent: Agent, intent: FreezeIntent) -> bool:
        """Keep thawing until confirmed (a freeze that reaches the guest late is undone), then
        note it on the record and release the VM's lock, which it holds until then."""
        loop = asyncio.get_running_loop()
        end = loop.time() + self.followup_for
        tl = Timeline()
        try:
            while loop.time() < end:
                if await self._thaw(agent, tl, min(self.thaw_timeout, 2.0), urgent=False):
                    await self.catalog.close_intent(intent.id, "engine-followup")
                    await run.stored.wait()  # the main record first, then our note
                    await self._note_on_record(run.sid, "thaw_confirmed", "by the follow-up")
                    return True
                await asyncio.sleep(0.5)
            return False
        finally:
            await shielded(agent.close())
            await shielded(self.catalog.release_vm_lock(run.cfg.name, run.owner))

    async def _note_on_record(self, sid: str, name: str, detail: str) -> None:
        await self.catalog.append_timeline(sid, [Timeline().mark(name, detail)])

    async def _evidence(self, agent: Agent, path: str, tl: Timeline) -> tuple[str, ...]:
        """The agent's log lines from the freeze window (qemu-ga --logfile --verbose)."""
        try:
            data = await agent.file_read(path, max_bytes=1 << 20, tail=True)
        except AgentError as exc:
            tl.mark("evidence_unavailable", f"{path}: {exc.message}", notify=False)
            return ()
        return select_window_lines(data.decode(errors="replace"), tl)

    def _finish(self, run: _Run, evidence: tuple[str, ...]) -> SnapshotRecord:
        plan, tl = run.plan, run.tl
        assert plan is not None
        froze = run.frozen_count is not None and run.freeze_problem is None
        if run.policy is QuiescePolicy.OFF:
            fs = tuple(d.as_record(frozen=False, reason="quiesce off") for d in plan.filesystems)
            level, why = ConsistencyLevel.CRASH, "quiesce off: not frozen, crash-consistent cut"
        elif not plan.quiesce:
            fs = tuple(d.as_record(frozen=False) for d in plan.filesystems)
            level = ConsistencyLevel.CRASH
            why = "not frozen: " + "; ".join(plan.problems or ("nothing to freeze",))
        elif not froze:
            reason = run.freeze_problem or "freeze failed"
            fs = tuple(
                d.as_record(frozen=False, reason=d.reason or reason) for d in plan.filesystems
            )
            level, why = ConsistencyLevel.CRASH, f"fell back to crash-consistent: {reason}"
        else:
            fs = tuple(d.as_record(frozen=d.freeze) for d in plan.filesystems)
            level = level_of(plan.disks, list(fs), raw=plan.raw_disks)
            # A filesystem spanning several disks has a record per disk: name it once.
            frozen = list(dict.fromkeys(f.mountpoint for f in fs if f.frozen))
            not_frozen = list(
                dict.fromkeys(f"{f.mountpoint} ({f.reason})" for f in fs if not f.frozen)
            )
            why = f"frozen: {', '.join(frozen) or 'none'}"
            if not_frozen:
                why += f"; not frozen: {', '.join(not_frozen)}"
            named = {f.mountpoint for f in fs if not f.frozen}
            # Problems about a filesystem already named as not frozen are not repeated.
            extra = [p for p in plan.problems if not any(p.startswith(m + " ") for m in named)]
            if extra:
                why += "; " + "; ".join(extra)
        if plan.raw_disks:
            why += (
                f"; cut as raw data ({NO_MOUNTED_FILESYSTEM}: the guest mounts nothing from "
                f"{', '.join(plan.raw_disks)}, crash-level for that disk); to leave it out, "
                "exclude it from the snapshot"
            )
        for note in (run.thaw_note, *run.notes):
            if note:
                why += f"; {note}"
        return replace(
            run.record,
            status=SnapshotStatus.DONE,
            level=level,
            level_reason=why,
            disks=_snapshot_disks(run.prepared, run),
            filesystems=fs,
            timeline=tl.events,
            freeze_window_ms=tl.ms_between("freeze_sent", "thawed"),
            evidence=evidence,
        )


# ---------------------------------------------------------------------- helpers


def _driver_agent(driver: HypervisorDriver, address: str, timeout: float) -> Agent:
    return driver.agent_at(address, timeout=timeout)


def _prepared_summary(run: _Run) -> str:
    prepared = run.prepared
    n = len(prepared.disks) if prepared is not None else 0
    text = f"{n} overlay(s) created before the freeze"
    for backend, handle in run.parts:
        text += f"; {len(backend.record_disks(handle))} {backend.name} image(s) opened"
    return text


def _snapshot_disks(
    prepared: PreparedCut | None,
    run: _Run | None = None,
    *,
    parts: list[tuple[StorageBackend, Any]] | None = None,
) -> tuple[SnapshotDisk, ...]:
    """The record's disks; with ``run`` (the finished snapshot), what is known about each at
    the cut: fingerprint, mode before protection, per-disk quiesce note."""
    if prepared is None:
        return ()
    raw = set(run.plan.raw_disks) if run is not None and run.plan is not None else set()
    out = []
    for p in prepared.disks:
        fp, mode = run.cut_images.get(p.disk.device, (None, None)) if run else (None, None)
        out.append(
            SnapshotDisk(
                device=p.disk.device,
                node=p.disk.node,
                image=p.image_at_cut,
                format=p.disk.format,
                overlay=p.overlay_file,
                backend="qcow2-external",
                virtual_size=p.disk.virtual_size,
                fingerprint=fp,
                image_mode=mode,
                quiesce_note=NO_MOUNTED_FILESYSTEM if p.disk.device in raw else None,
            )
        )
    for backend, handle in parts if parts is not None else (run.parts if run else []):
        for d in backend.record_disks(handle):
            note = NO_MOUNTED_FILESYSTEM if d.device in raw else None
            out.append(replace(d, quiesce_note=note))
    return tuple(out)


def _written_after(disk: SnapshotDisk) -> str | None:
    """What a recorded disk writes to after its cut: its overlay, or for an RBD snapshot its
    image (``rbd:pool/image``)."""
    if disk.overlay:
        return disk.overlay
    return disk.image.partition("@")[0] if disk.backend == "rbd" else None


def _wrong_socket(vm: str, address: str, elsewhere: str) -> str:
    """The problem of a VM registered with an agent socket that is not the one QEMU serves."""
    return (
        f"the guest agent registered for VM {vm} (agent socket {address}) is not this VM's: QEMU "
        f"serves VM {vm}'s agent port org.qemu.guest_agent.0 at {elsewhere}; the agent at "
        f"{address} is another guest's (freezing it would freeze that guest and cut {vm} "
        "unfrozen)"
    )


class _Failed(FreezeframeError):
    """Internal: a snapshot failure with what is known about the filesystems."""

    def __init__(
        self,
        message: str,
        *,
        filesystems: tuple[SnapshotFilesystem, ...] = (),
        hint: str | None = None,
        code: str | None = None,
        remedy: Remedy | None = None,
    ) -> None:
        super().__init__(message, hint=hint, code=code, remedy=remedy)
        self.filesystems = filesystems


def _plan_summary(plan: Plan) -> str:
    n_fs = len({d.fs.mountpoint for d in plan.filesystems if d.freeze})
    return (
        f"{len(plan.disks)} disk(s), {n_fs} filesystem(s) to freeze, "
        f"predicted level {plan.predicted_level.value}"
        + (f", {len(plan.problems)} problem(s)" if plan.problems else "")
    )


def _hint_for(vm: str, problems: tuple[str, ...]) -> tuple[str, str, Remedy | None]:
    """Why quiesce ``required`` cannot be met, as (neutral hint, code, remedy)."""
    text = " ".join(problems)
    doctor = Remedy(Action.DOCTOR, vm)
    preferred = Remedy(Action.SET_QUIESCE, vm, {"quiesce": QuiescePolicy.PREFERRED.value})
    if "without a guest agent" in text or "no guest-agent channel" in text:
        return (
            "set hw_qemu_guest_agent=yes on the image, or snapshot with quiesce preferred",
            "agent-unreachable",
            preferred,
        )
    if "breaks the protocol" in text:
        return (
            "check what serves the guest-agent channel (qemu-ga answers guest-sync-delimited); "
            "restart qemu-guest-agent in the guest",
            "agent-protocol-error",
            doctor,
        )
    if "the VM is not running (status" in text:
        return "resume the VM (QMP `cont`, `virsh resume`) and retry", "vm-not-running", doctor
    if "does not answer" in text:
        return "install and start qemu-guest-agent in the guest", "agent-unreachable", doctor
    if "cannot be frozen" in text:
        return (
            "exclude the mount point or the disk from the snapshot (the VM's doctor report "
            "names them)",
            "fs-not-freezable",
            doctor,
        )
    if "the guest mounts nothing from" in text or "carries no guest filesystem" in text:
        return (
            "leave such disks out of the snapshot, or snapshot with quiesce preferred",
            "disk-without-filesystem",
            preferred,
        )
    return "see what stands in the way, or use quiesce preferred", "quiesce-impossible", doctor


_LOG_TIME = re.compile(r"^(\d{9,11})\.(\d{1,6}):\s")
#: qemu-ga --verbose chatter that says nothing about the freeze.
_LOG_NOISE = re.compile(r"(?:dis|en)abling command:|process_event: called|received EOF")
_FREEZE_WORDS = ("fsfreeze", "freeze", "thaw")


def select_window_lines(text: str, tl: Timeline, skew: float = 2.0) -> tuple[str, ...]:
    """The agent's own account of the freeze, from its ``--verbose`` log.

    qemu-ga logs ``<sec>.<usec>: <level>: <msg>`` lines: ``read data ... guest-fsfreeze-freeze``
    (or ``-freeze-list``), ``disabling logging due to filesystem freeze``, then at the thaw
    ``logging re-enabled due to filesystem unfreeze`` (the thaw request arrives while logging
    is off, so it is not in the log).
    The guest clock may be off by a second or so (it starts from the RTC's whole seconds), so
    the window is found by content: the last freeze request logged within ``skew`` seconds of
    ours, up to the request that follows the thaw. Per-command enable/disable chatter is left
    out; anything but printable ASCII is replaced by ``?``. When no freeze request matches, the
    last lines that mention the freeze are returned.
    """
    start, end = tl.find("freeze_sent"), tl.find("thaw_sent") or tl.find("freeze_sent")
    if start is None or end is None:
        return ()
    lo, hi = start.t - timedelta(seconds=skew), end.t + timedelta(seconds=skew)
    lines = ["".join(c if " " <= c <= "~" else "?" for c in ln) for ln in text.splitlines()]
    stamped: list[tuple[datetime, str]] = []
    for line in lines:
        m = _LOG_TIME.match(line)
        if m is not None:
            sec = int(m.group(1)) + int(m.group(2).ljust(6, "0")) / 1e6
            stamped.append((datetime.fromtimestamp(sec, UTC), line))
    freezes = [
        i
        for i, (t, line) in enumerate(stamped)
        if "read data" in line and "guest-fsfreeze-freeze" in line and lo <= t <= hi
    ]
    if not freezes:
        return tuple([ln for ln in lines if any(w in ln for w in _FREEZE_WORDS)][-10:])
    first = freezes[-1]
    last = len(stamped) - 1
    # The thaw request itself is not logged (logging is off while frozen): the line saying
    # logging is back marks the thaw.
    thaw = next(
        (
            i
            for i in range(first, len(stamped))
            if "guest-fsfreeze-thaw" in stamped[i][1] or "unfreeze" in stamped[i][1]
        ),
        None,
    )
    if thaw is not None:
        nxt = next((i for i in range(thaw + 1, len(stamped)) if "read data" in stamped[i][1]), None)
        last = nxt - 1 if nxt is not None else last
    picked = [line for _, line in stamped[first : last + 1] if not _LOG_NOISE.search(line)]
    return tuple(picked[:100])
