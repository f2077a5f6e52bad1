"""The one error root of freezeframe and its whole tree.

Every error freezeframe raises on purpose is a :class:`FreezeframeError`. Errors of the
libraries underneath (``qemu.qmp``'s ``QMPError``, ``OSError`` of a socket, ``sqlalchemy``'s
errors, a failing ``qemu-img``) are translated once, at the edge of the module that talks to
them, with ``raise X(...) from exc``; the original stays reachable as ``.__cause__`` and, where
it helps a caller decide, as data on the error (``AgentCommandError.qga_class``,
``ToolError.returncode``/``stderr``).

Each class carries a stable process exit code for the CLI (``exit_code``) and a stable
machine-readable ``code`` (the class default below, narrowed per instance with ``code=``, e.g.
``vm-not-found`` for a NotFoundError about a VM); faces and tests decide by the code, never by
the message. What to do about an error is data too: ``hint`` is a neutral sentence (no command
syntax of any face) and ``remedy`` (:class:`Remedy`) names the operation that helps, which each
face renders in its own words (the CLI as ``freezeframe recover web1``, the API as its endpoint).

.. code-block:: text

    class                                  exit  code (class default)   what
    FreezeframeError                       1     error                  anything freezeframe reports
     +-- UsageError                        2     invalid-argument       bad input: option value, ...
     |    +-- NotFoundError                2     not-found              vm-, snapshot-not-found
     |    +-- AlreadyExistsError           2     already-exists         vm-exists, ...
     +-- DependencyError                   3     dependency-missing     a host package / module
     +-- ToolError                         4     tool-failed            qemu-img, mkfs, ... failed
     +-- LabError                          5     lab-error              lab VM build / boot / stop
     +-- AgentError                        6     agent-error            the QEMU guest agent (QGA)
     |    +-- AgentUnavailableError        6     agent-unreachable      no channel / nobody answers
     |    +-- AgentTimeoutError            6     agent-timeout          no (complete) reply in time
     |    +-- AgentProtocolError           6     agent-protocol-error   bad framing, JSON, shape
     |    +-- AgentCommandError            6     agent-command-failed   the agent answered an error
     +-- HypervisorError                   7     hypervisor-error       QMP / libvirt driver
     |    +-- HypervisorUnavailableError   7     hypervisor-unreachable control socket unreachable
     |    +-- CutError                     7     cut-failed             overlays not switched
     +-- CatalogError                      8     catalog-error          the database
     |    +-- CatalogFullError (catalog)   8     catalog-full           its filesystem is full
     |    +-- BusyError                    9     vm-busy                the VM's lock is held
     +-- SnapshotFailedError               10    snapshot-failed        attempted, failed, recorded
     |    +-- BrokenChainError             10    broken-chain           a chain lost a file
     |    +-- ThawUnconfirmedError         12    thaw-unconfirmed       guest may still be frozen
     |    +-- SnapshotUnrecordedError      13    snapshot-unrecorded    cut, not recorded
     +-- VerifyError                       11    verify-failed          offline check could not run
     +-- RecoverError                      12    recover-failed         thaw not confirmed
                                                 intent-open: refused, a freeze intent is open
     +-- StorageError                      14    rbd-failed             a storage backend (Ceph RBD)
                                                 ceph-config, ceph-unreachable, ceph-timeout,
                                                 ceph-permission-denied, rbd-pool-/image-/
                                                 snapshot-not-found, rbd-image-/snapshot-exists,
                                                 rbd-busy (freezeframe.storage.rbd.CODES)

A snapshot refused or failed by the freeze (policy ``required``) carries a narrower code:
``agent-unreachable`` (no agent), ``fs-not-freezable`` (a filesystem cannot be frozen),
``freeze-failed`` (the freeze itself failed or timed out).

Exit code 20 is not an error: ``snapshot create`` succeeded but reached a weaker consistency
level than asked (see ``freezeframe.cli``).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = [
    "Action",
    "AgentCommandError",
    "AgentError",
    "AgentProtocolError",
    "AgentTimeoutError",
    "AgentUnavailableError",
    "AlreadyExistsError",
    "BrokenChainError",
    "BusyError",
    "CatalogError",
    "CutError",
    "DependencyError",
    "FreezeframeError",
    "HypervisorError",
    "HypervisorUnavailableError",
    "LabError",
    "NotFoundError",
    "RecoverError",
    "Remedy",
    "SnapshotFailedError",
    "SnapshotUnrecordedError",
    "StorageError",
    "ThawUnconfirmedError",
    "ToolError",
    "UsageError",
    "VerifyError",
]


class Action(enum.StrEnum):
    """An operation that helps with an error (or a doctor finding); each face names it in its
    own terms. Parameters travel in :attr:`Remedy.vm` / :attr:`Remedy.params`."""

    RECOVER = "recover"  # thaw guests left frozen, settle dead attempts (vm: only that one)
    DOCTOR = "doctor"  # check a VM (vm)
    LIST_VMS = "list-vms"  # see the registered VMs
    LIST_SNAPSHOTS = "list-snapshots"  # see the snapshot records (vm: of that VM)
    SHOW_SNAPSHOT = "show-snapshot"  # one record (params: id)
    VERIFY = "verify"  # verify a snapshot offline (params: id)
    LIST_IMAGES = "list-images"  # the image chain of each disk of a VM (vm)
    ADD_VM = "add-vm"  # (re-)register a VM (vm; params: the options to change, e.g. qga)
    REMOVE_VM = "remove-vm"  # forget a VM's registration (vm)
    IMPORT_LIBVIRT = "import-libvirt"  # register libvirt domains
    LAB_UP = "lab-up"  # start a lab VM (vm)
    LAB_DOWN = "lab-down"  # stop a lab VM (vm; params: purge=yes to delete it)
    FORCE = "force"  # repeat the refused operation with force (it goes ahead anyway)
    # Options of a new snapshot of ``vm`` that get around a finding (params as named):
    EXCLUDE_DISK = "exclude-disk"  # leave disks out (params: disk, names joined by ",")
    EXCLUDE_MOUNT = "exclude-mount"  # take a filesystem unfrozen (params: mount)
    SET_QUIESCE = "set-quiesce"  # another quiesce policy (params: quiesce)


@dataclass(frozen=True, slots=True)
class Remedy:
    """What to run about an error: ``action`` on ``vm`` with ``params`` (option name -> value,
    ``"yes"`` for a flag). Rendered by each face (the CLI: ``freezeframe recover web1``)."""

    action: Action
    vm: str | None = None
    params: Mapping[str, str] = field(default_factory=dict)


class FreezeframeError(Exception):
    """Root of every error freezeframe raises on purpose.

    ``code`` is the stable machine-readable code (class default, or the ``code`` keyword);
    ``hint`` a neutral sentence on what to do; ``remedy`` the operation that helps, if any.
    """

    exit_code: int = 1
    #: The stable machine-readable code of this class (instances may narrow it).
    default_code: str = "error"

    def __init__(
        self,
        message: str,
        *,
        hint: str | None = None,
        code: str | None = None,
        remedy: Remedy | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        #: One line telling the operator what to do about it, when we know (no face syntax).
        self.hint = hint
        #: Stable machine-readable code: what faces and tests decide by.
        self.code: str = code or self.default_code
        #: The operation that helps, rendered by each face.
        self.remedy = remedy

    def __str__(self) -> str:
        return self.message


class UsageError(FreezeframeError):
    """Bad input from the caller: an option value, a name, a combination."""

    default_code = "invalid-argument"

    exit_code = 2


class NotFoundError(UsageError):
    """A named thing (VM, snapshot, lab VM) does not exist."""

    default_code = "not-found"


class AlreadyExistsError(UsageError):
    """A name is already taken (registered VM, running lab VM)."""

    default_code = "already-exists"


class DependencyError(FreezeframeError):
    """A host package or an optional Python module is missing.

    ``package`` names what to install (a Debian package or a pip extra).
    """

    default_code = "dependency-missing"

    exit_code = 3

    def __init__(
        self,
        message: str,
        *,
        package: str,
        hint: str | None = None,
        code: str | None = None,
        remedy: Remedy | None = None,
    ) -> None:
        super().__init__(
            message,
            hint=hint or f"install it: apt-get install -y {package}",
            code=code,
            remedy=remedy,
        )
        self.package = package


class ToolError(FreezeframeError):
    """An external program failed; keeps its command line, return code and stderr."""

    default_code = "tool-failed"

    exit_code = 4

    def __init__(
        self,
        message: str,
        *,
        argv: tuple[str, ...] = (),
        returncode: int | None = None,
        stderr: str = "",
        hint: str | None = None,
        code: str | None = None,
        remedy: Remedy | None = None,
    ) -> None:
        super().__init__(message, hint=hint, code=code, remedy=remedy)
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr


class LabError(FreezeframeError):
    """The lab VM could not be built, booted or stopped."""

    default_code = "lab-error"

    exit_code = 5


class AgentError(FreezeframeError):
    """Anything about the QEMU guest agent."""

    default_code = "agent-error"

    exit_code = 6


class AgentUnavailableError(AgentError):
    """The VM has no agent channel, or nobody answers on it."""

    default_code = "agent-unreachable"


class AgentTimeoutError(AgentError):
    """The agent did not answer (completely) in time. The connection was re-synced or closed."""

    default_code = "agent-timeout"


class AgentProtocolError(AgentError):
    """The agent sent something that is not a valid reply (framing, size, JSON, shape)."""

    default_code = "agent-protocol-error"


class AgentCommandError(AgentError):
    """The agent answered with an error object.

    ``qga_class`` is the error's ``class`` member (e.g. ``GenericError``,
    ``CommandNotFound``), ``command`` the command that was executed.
    """

    default_code = "agent-command-failed"

    def __init__(
        self, message: str, *, command: str, qga_class: str, code: str | None = None
    ) -> None:
        super().__init__(message, code=code)
        self.command = command
        self.qga_class = qga_class


class HypervisorError(FreezeframeError):
    """Anything about the hypervisor driver (QMP, libvirt)."""

    default_code = "hypervisor-error"

    exit_code = 7


class HypervisorUnavailableError(HypervisorError):
    """The VM's control socket cannot be reached."""

    default_code = "hypervisor-unreachable"


class CutError(HypervisorError):
    """Preparing the overlays or switching to them failed; nothing was switched."""

    default_code = "cut-failed"


class CatalogError(FreezeframeError):
    """The catalog database failed or holds something unexpected."""

    default_code = "catalog-error"

    exit_code = 8


class BusyError(CatalogError):
    """The VM's lock is held: another snapshot of it (or a doctor check, a recover, a lab down)
    is in progress. ``holder_purpose`` says which (``snapshot``, ``doctor``, ``recover``,
    ``lab-down``; None when unknown)."""

    default_code = "vm-busy"

    exit_code = 9

    def __init__(
        self,
        message: str,
        *,
        hint: str | None = None,
        holder_purpose: str | None = None,
        code: str | None = None,
        remedy: Remedy | None = None,
    ) -> None:
        super().__init__(message, hint=hint, code=code, remedy=remedy)
        self.holder_purpose = holder_purpose


class SnapshotFailedError(FreezeframeError):
    """A snapshot was attempted and failed; the failed attempt is recorded under ``snapshot_id``."""

    default_code = "snapshot-failed"

    exit_code = 10

    def __init__(
        self,
        message: str,
        *,
        snapshot_id: str,
        hint: str | None = None,
        code: str | None = None,
        remedy: Remedy | None = None,
    ) -> None:
        super().__init__(message, hint=hint, code=code, remedy=remedy)
        self.snapshot_id = snapshot_id


class BrokenChainError(SnapshotFailedError):
    """A snapshot refused before anything was prepared or frozen: a file of a disk's image
    chain (its active image or one below) is missing on this host, deleted while QEMU keeps it
    open. Not the caller's bad input: the VM's storage is damaged, and what only the unlinked
    file holds is lost when QEMU exits. ``missing`` maps each such disk to its missing files
    (top first). The refused attempt is recorded as failed, with the reason."""

    default_code = "broken-chain"

    def __init__(
        self,
        message: str,
        *,
        snapshot_id: str,
        missing: dict[str, tuple[str, ...]],
        hint: str | None = None,
        code: str | None = None,
        remedy: Remedy | None = None,
    ) -> None:
        super().__init__(message, snapshot_id=snapshot_id, hint=hint, code=code, remedy=remedy)
        self.missing = missing


class ThawUnconfirmedError(SnapshotFailedError):
    """A failed snapshot whose thaw could not be confirmed: the guest may still be frozen (its
    freeze intent stays open for ``freezeframe recover``). Same exit code as RecoverError."""

    default_code = "thaw-unconfirmed"

    exit_code = 12


class SnapshotUnrecordedError(SnapshotFailedError):
    """The cut happened — every disk now writes to its new overlay (``overlays``) and the guest
    was thawed (confirmed) — but the catalog could not store the finished record (its
    filesystem full, say): the record stays ``running``, the overlays must not be deleted, and
    ``freezeframe recover VM`` records them once the catalog can be written again.
    ``intent_open`` tells whether the freeze intent could not be closed either (the guest is
    thawed all the same). When the thaw was not confirmed, ThawUnconfirmedError (exit 12)
    is raised instead, saying the same about the disks."""

    default_code = "snapshot-unrecorded"

    exit_code = 13

    def __init__(
        self,
        message: str,
        *,
        snapshot_id: str,
        overlays: tuple[str, ...],
        intent_open: bool,
        hint: str | None = None,
        code: str | None = None,
        remedy: Remedy | None = None,
    ) -> None:
        super().__init__(message, snapshot_id=snapshot_id, hint=hint, code=code, remedy=remedy)
        self.overlays = overlays
        self.intent_open = intent_open


class VerifyError(FreezeframeError):
    """An offline check of a snapshot could not be run (image missing, export failed, ...)."""

    default_code = "verify-failed"

    exit_code = 11


class RecoverError(FreezeframeError):
    """A guest left with an open freeze intent could not be confirmed thawed."""

    default_code = "recover-failed"

    exit_code = 12


class StorageError(FreezeframeError):
    """A storage backend (Ceph RBD) failed. ``code`` says how (see the tree above),
    ``errno`` is the backend's error number when it gave one, ``target`` what it was about
    (``pool/image``, ``pool/image@snap``, a ceph.conf path). ``left``: what a failed
    all-or-nothing operation could not undo (e.g. RBD snapshots it could not remove again)."""

    default_code = "rbd-failed"

    exit_code = 14

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        errno: int | None = None,
        target: str = "",
        hint: str | None = None,
        remedy: Remedy | None = None,
    ) -> None:
        super().__init__(message, hint=hint, code=code, remedy=remedy)
        self.errno = errno
        self.target = target
        self.left: tuple[str, ...] = ()
