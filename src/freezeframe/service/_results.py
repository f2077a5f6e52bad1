"""What the service's operations return: frozen dataclasses with stable codes.

A face decides by the codes (the CLI maps them to exit codes, the API to statuses and JSON);
nothing here prints or exits.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from freezeframe.engine import RecoverOutcome
from freezeframe.engine.images import BootImage
from freezeframe.errors import Action, BusyError, FreezeframeError, RecoverError, Remedy
from freezeframe.lab import LabVm
from freezeframe.models import (
    ConsistencyLevel,
    QuiescePolicy,
    SnapshotRecord,
    SnapshotSummary,
    Verification,
    VerifyVerdict,
    VmConfig,
)

__all__ = [
    "DEFAULT_CHECK_TIMEOUT",
    "CreateSnapshot",
    "LabDownResult",
    "LabUpRequest",
    "LabUpResult",
    "LabVm",
    "Outcome",
    "Problem",
    "RecoverCode",
    "RecoverReport",
    "SnapshotOutcome",
    "SnapshotPage",
    "SnapshotShown",
    "VerifyOutcome",
    "VmAdded",
    "VmSpec",
    "expected_level",
]

#: Seconds a user check may run per filesystem (same default as the engine's).
DEFAULT_CHECK_TIMEOUT = 300.0


class Outcome(enum.StrEnum):
    """How a ``create_snapshot`` that returned a record ended (strongest concern first)."""

    DONE = "done"  # done at the level asked, thawed (confirmed), intent closed
    WEAKER = "weaker-than-asked"  # done, but weaker than asked (preferred fell back to crash)
    THAW_UNCONFIRMED = "thaw-unconfirmed"  # the cut is good; the guest may still be frozen
    INTENT_LEFT_OPEN = "intent-left-open"  # done and thawed; the catalog could not close the intent


class RecoverCode(enum.StrEnum):
    """How a ``recover`` ended as a whole."""

    DONE = "done"  # every guest thawed (or nothing to do)
    THAW_UNCONFIRMED = "thaw-unconfirmed"  # some guest could not be confirmed thawed
    DELETE_UNFINISHED = "delete-unfinished"  # a delete a dead process left is not finished
    INTENTS_SKIPPED = "intents-skipped"  # intents of live processes left alone


def expected_level(policy: QuiescePolicy) -> ConsistencyLevel:
    """The level a snapshot under ``policy`` is asked to reach: crash for ``off``, filesystem
    otherwise."""
    return ConsistencyLevel.CRASH if policy is QuiescePolicy.OFF else ConsistencyLevel.FILESYSTEM


@dataclass(frozen=True, slots=True)
class Problem:
    """An error as data (a step that failed without failing the operation, e.g. a verify run
    after a good snapshot): the error's class name, code, message, hint and remedy."""

    error: str
    code: str
    message: str
    hint: str | None = None
    remedy: Remedy | None = None

    @classmethod
    def of(cls, exc: FreezeframeError) -> Problem:
        return cls(type(exc).__name__, exc.code, exc.message, exc.hint, exc.remedy)


# ------------------------------------------------------------------ VMs


@dataclass(frozen=True, slots=True)
class VmSpec:
    """What ``add_vm`` registers: a QEMU VM by its sockets (``qmp``, ``qga``) or a libvirt
    domain (``libvirt_domain`` on ``connect_uri``), with its policy."""

    name: str
    qmp: str | None = None
    qga: str | None = None
    libvirt_domain: str | None = None
    connect_uri: str = "qemu:///system"
    agent: bool = True
    quiesce: QuiescePolicy = QuiescePolicy.PREFERRED
    freeze_timeout: float = 10.0
    agent_log: str | None = None
    exclude_mounts: tuple[str, ...] = ()
    overlay_dir: str | None = None
    #: Ceph settings for the VM's RBD disks (paths and a client id, never a secret).
    ceph_conf: str | None = None
    ceph_id: str | None = None
    ceph_keyring: str | None = None


@dataclass(frozen=True, slots=True)
class VmAdded:
    """A registered VM; ``not_there_yet``: its socket paths that do not exist yet (the VM is
    not running yet)."""

    vm: VmConfig
    not_there_yet: tuple[str, ...] = ()


# ------------------------------------------------------------------ snapshots


@dataclass(frozen=True, slots=True)
class CreateSnapshot:
    """One ``create_snapshot`` call's wishes (None: the VM's own setting). ``verify``: verify
    the images right after the cut, with the user ``checks`` (each bounded by
    ``check_timeout``). ``snapshot_id``: the new record's id (None: a random one)."""

    quiesce: QuiescePolicy | None = None
    freeze_timeout: float | None = None
    exclude_mounts: tuple[str, ...] = ()
    exclude_disks: tuple[str, ...] = ()
    verify: bool = False
    checks: tuple[str, ...] = ()
    check_timeout: float = DEFAULT_CHECK_TIMEOUT
    hold_frozen: float = 0.0
    snapshot_id: str | None = None
    overlay_dir: str | None = None  # this call's overlay directory (None: the VM's own)


@dataclass(frozen=True, slots=True)
class SnapshotOutcome:
    """A snapshot that was taken (the cut happened and is recorded).

    ``code`` says whether it is what was asked; ``asked`` the level asked; ``verify_requested``
    whether a verify was to follow; ``verify_problem`` why it could not run (the record's
    ``verification`` is the verdict when it ran)."""

    code: Outcome
    record: SnapshotRecord
    asked: ConsistencyLevel
    verify_requested: bool = False
    verify_problem: Problem | None = None

    @property
    def verification(self) -> Verification | None:
        return self.record.verification


@dataclass(frozen=True, slots=True)
class SnapshotPage:
    """One page of a snapshot list (summaries; the whole record: ``get_snapshot``);
    ``next_cursor`` fetches the next page (None: this is the last)."""

    items: tuple[SnapshotSummary, ...]
    next_cursor: str | None = None


@dataclass(frozen=True, slots=True)
class SnapshotShown:
    """What ``snapshot show`` shows: the ``record``; with ``live``, also ``images``, what
    QEMU runs each disk of the VM on now (``vm images``), so a disk that switched away from
    this snapshot's overlay is not shown as writing to it. Its document (``to_document``) is
    the record's, plus ``qemu_runs_on`` (device -> image) when ``live``."""

    record: SnapshotRecord
    live: bool = False
    images: tuple[BootImage, ...] = ()

    @property
    def qemu_runs_on(self) -> dict[str, str]:
        return {b.device: b.running_on for b in self.images if b.running_on}


@dataclass(frozen=True, slots=True)
class VerifyOutcome:
    """A verification that ran; ``code`` is its verdict (``verified-consistent``,
    ``needs-recovery``, ``check-failed``, ``corrupt``, ``unchecked``)."""

    verification: Verification

    @property
    def code(self) -> VerifyVerdict:
        return self.verification.verdict


# ------------------------------------------------------------------ recover


@dataclass(frozen=True, slots=True)
class RecoverReport:
    """What ``recover`` did: one outcome per intent or settled record, and the whole's code."""

    outcomes: tuple[RecoverOutcome, ...]

    @property
    def failed(self) -> tuple[RecoverOutcome, ...]:
        return tuple(o for o in self.outcomes if o.failed)

    @property
    def skipped(self) -> tuple[RecoverOutcome, ...]:
        return tuple(o for o in self.outcomes if o.skipped)

    @property
    def code(self) -> RecoverCode:
        if any(o.delete is None for o in self.failed):
            return RecoverCode.THAW_UNCONFIRMED
        if self.failed:
            return RecoverCode.DELETE_UNFINISHED
        if self.skipped:
            return RecoverCode.INTENTS_SKIPPED
        return RecoverCode.DONE

    def error(self) -> FreezeframeError | None:
        """The error this report amounts to (None: all done): RecoverError (code
        ``thaw-unconfirmed``) when a guest could not be confirmed thawed, else BusyError (code
        ``intents-skipped``) when intents of live processes were skipped."""
        if self.code is RecoverCode.DELETE_UNFINISHED:
            return RecoverError(
                f"{len(self.failed)} snapshot delete(s) left by a dead process could not be "
                "finished: " + "; ".join(f"{o.snapshot_id}: {o.detail}" for o in self.failed),
                hint="the records stay deleting; fix what the detail names and recover again",
                code=RecoverCode.DELETE_UNFINISHED.value,
                remedy=Remedy(Action.RECOVER),
            )
        if self.failed:
            return RecoverError(
                f"{len(self.failed)} guest(s) could not be confirmed thawed",
                hint="is the VM running and its agent up? retry",
                code=RecoverCode.THAW_UNCONFIRMED.value,
                remedy=Remedy(Action.RECOVER),
            )
        if self.skipped:  # a live process holds those guests frozen (or is about to)
            return BusyError(
                f"{len(self.skipped)} freeze intent(s) skipped: a live process owns them, and "
                "their guest may be frozen right now",
                hint="that process thaws them itself; if it hangs, stop it (it holds the "
                "agent's only connection), then recover again",
                code=RecoverCode.INTENTS_SKIPPED.value,
                remedy=Remedy(Action.RECOVER),
            )
        return None


# ------------------------------------------------------------------ lab


@dataclass(frozen=True, slots=True)
class LabUpRequest:
    """``lab_up``'s wishes (None: the default, or how a stopped VM was built)."""

    name: str
    disks: str | None = None  # "ext4,xfs"
    disk_size: str | None = None  # "256M"
    agent: bool | None = None
    accel: str = "auto"
    driver: str | None = None  # "qmp" | "libvirt"
    timeout: float = 60.0
    rbd: bool = False  # a new VM's data disks in the lab Ceph


@dataclass(frozen=True, slots=True)
class LabUpResult:
    """A lab VM that is up and registered; ``adopted``: it was running already, unregistered."""

    vm: LabVm
    adopted: bool = False


@dataclass(frozen=True, slots=True)
class LabDownResult:
    """``lab_down``: ``stopped`` False when there was no lab VM left to stop (only its catalog
    entries were forgotten); ``warnings``: what ``force`` went past."""

    name: str
    stopped: bool
    purged: bool
    snapshots_removed: int = 0
    warnings: tuple[str, ...] = field(default=())
