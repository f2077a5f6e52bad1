"""The one error root of freezeframe and its whole tree.

Every error freezeframe raises on purpose is a :class:`FreezeframeError`. Errors of the
libraries underneath (``qemu.qmp``'s ``QMPError``, ``OSError`` of a socket, ``sqlalchemy``'s
errors, a failing ``qemu-img``) are translated once, at the edge of the module that talks to
them, with ``raise X(...) from exc``; the original stays reachable as ``.__cause__`` and, where
it helps a caller decide, as data on the error (``AgentCommandError.qga_class``,
``ToolError.returncode``/``stderr``).

Each class carries a stable process exit code for the CLI (``exit_code``).

.. code-block:: text

    FreezeframeError                       exit 1   anything freezeframe reports
     +-- UsageError                        exit 2   bad input: unknown VM, bad option value, ...
     |    +-- NotFoundError                exit 2   unknown VM, snapshot id, lab VM
     |    +-- AlreadyExistsError           exit 2   name already registered / running
     +-- DependencyError                   exit 3   a host package or Python module is missing
     +-- ToolError                         exit 4   an external program (qemu-img, mkfs, ...) failed
     +-- LabError                          exit 5   the lab VM could not be built / booted / stopped
     +-- AgentError                        exit 6   the QEMU guest agent (QGA)
     |    +-- AgentUnavailableError        exit 6   no channel configured / socket missing / refused
     |    +-- AgentTimeoutError            exit 6   no (complete) reply in time
     |    +-- AgentProtocolError           exit 6   bad framing, oversize, invalid JSON, wrong shape
     |    +-- AgentCommandError            exit 6   the agent answered with an error object
     +-- HypervisorError                   exit 7   QMP / libvirt driver
     |    +-- HypervisorUnavailableError   exit 7   cannot connect to the VM's control socket
     |    +-- CutError                     exit 7   preparing or switching the overlays failed
     +-- CatalogError                      exit 8   the database
     |    +-- BusyError                    exit 9   another snapshot of this VM is in progress
     +-- SnapshotFailedError               exit 10  a snapshot was attempted and failed (recorded)
     |    +-- BrokenChainError             exit 10  ... refused: a disk's image chain lost a file
     |    +-- ThawUnconfirmedError         exit 12  ... and its guest may still be frozen
     |    +-- SnapshotUnrecordedError      exit 13  cut (the disks DID switch) but not recorded
     +-- VerifyError                       exit 11  an offline check could not be run
     +-- RecoverError                      exit 12  a guest could not be confirmed thawed

Exit code 20 is not an error: ``snapshot create`` succeeded but reached a weaker consistency
level than asked (see ``freezeframe.cli``).
"""

from __future__ import annotations

__all__ = [
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
    "SnapshotFailedError",
    "SnapshotUnrecordedError",
    "ThawUnconfirmedError",
    "ToolError",
    "UsageError",
    "VerifyError",
]


class FreezeframeError(Exception):
    """Root of every error freezeframe raises on purpose."""

    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: One line telling the operator what to do about it, when we know.
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(FreezeframeError):
    """Bad input from the caller: an option value, a name, a combination."""

    exit_code = 2


class NotFoundError(UsageError):
    """A named thing (VM, snapshot, lab VM) does not exist."""


class AlreadyExistsError(UsageError):
    """A name is already taken (registered VM, running lab VM)."""


class DependencyError(FreezeframeError):
    """A host package or an optional Python module is missing.

    ``package`` names what to install (a Debian package or a pip extra).
    """

    exit_code = 3

    def __init__(self, message: str, *, package: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint or f"install it: apt-get install -y {package}")
        self.package = package


class ToolError(FreezeframeError):
    """An external program failed; keeps its command line, return code and stderr."""

    exit_code = 4

    def __init__(
        self,
        message: str,
        *,
        argv: tuple[str, ...] = (),
        returncode: int | None = None,
        stderr: str = "",
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr


class LabError(FreezeframeError):
    """The lab VM could not be built, booted or stopped."""

    exit_code = 5


class AgentError(FreezeframeError):
    """Anything about the QEMU guest agent."""

    exit_code = 6


class AgentUnavailableError(AgentError):
    """The VM has no agent channel, or nobody answers on it."""


class AgentTimeoutError(AgentError):
    """The agent did not answer (completely) in time. The connection was re-synced or closed."""


class AgentProtocolError(AgentError):
    """The agent sent something that is not a valid reply (framing, size, JSON, shape)."""


class AgentCommandError(AgentError):
    """The agent answered with an error object.

    ``qga_class`` is the error's ``class`` member (e.g. ``GenericError``,
    ``CommandNotFound``), ``command`` the command that was executed.
    """

    def __init__(self, message: str, *, command: str, qga_class: str) -> None:
        super().__init__(message)
        self.command = command
        self.qga_class = qga_class


class HypervisorError(FreezeframeError):
    """Anything about the hypervisor driver (QMP, libvirt)."""

    exit_code = 7


class HypervisorUnavailableError(HypervisorError):
    """The VM's control socket cannot be reached."""


class CutError(HypervisorError):
    """Preparing the overlays or switching to them failed; nothing was switched."""


class CatalogError(FreezeframeError):
    """The catalog database failed or holds something unexpected."""

    exit_code = 8


class BusyError(CatalogError):
    """The VM's lock is held: another snapshot of it (or a doctor check, a recover, a lab down)
    is in progress. ``holder_purpose`` says which (``snapshot``, ``doctor``, ``recover``,
    ``lab-down``; None when unknown)."""

    exit_code = 9

    def __init__(
        self, message: str, *, hint: str | None = None, holder_purpose: str | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.holder_purpose = holder_purpose


class SnapshotFailedError(FreezeframeError):
    """A snapshot was attempted and failed; the failed attempt is recorded under ``snapshot_id``."""

    exit_code = 10

    def __init__(self, message: str, *, snapshot_id: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.snapshot_id = snapshot_id


class BrokenChainError(SnapshotFailedError):
    """A snapshot refused before anything was prepared or frozen: a file of a disk's image
    chain (its active image or one below) is missing on this host, deleted while QEMU keeps it
    open. Not the caller's bad input: the VM's storage is damaged, and what only the unlinked
    file holds is lost when QEMU exits. ``missing`` maps each such disk to its missing files
    (top first). The refused attempt is recorded as failed, with the reason."""

    def __init__(
        self,
        message: str,
        *,
        snapshot_id: str,
        missing: dict[str, tuple[str, ...]],
        hint: str | None = None,
    ) -> None:
        super().__init__(message, snapshot_id=snapshot_id, hint=hint)
        self.missing = missing


class ThawUnconfirmedError(SnapshotFailedError):
    """A failed snapshot whose thaw could not be confirmed: the guest may still be frozen (its
    freeze intent stays open for ``freezeframe recover``). Same exit code as RecoverError."""

    exit_code = 12


class SnapshotUnrecordedError(SnapshotFailedError):
    """The cut happened — every disk now writes to its new overlay (``overlays``) and the guest
    was thawed (confirmed) — but the catalog could not store the finished record (its
    filesystem full, say): the record stays ``running``, the overlays must not be deleted, and
    ``freezeframe recover VM`` records them once the catalog can be written again.
    ``intent_open`` tells whether the freeze intent could not be closed either (the guest is
    thawed all the same). When the thaw was not confirmed, ThawUnconfirmedError (exit 12)
    is raised instead, saying the same about the disks."""

    exit_code = 13

    def __init__(
        self,
        message: str,
        *,
        snapshot_id: str,
        overlays: tuple[str, ...],
        intent_open: bool,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, snapshot_id=snapshot_id, hint=hint)
        self.overlays = overlays
        self.intent_open = intent_open


class VerifyError(FreezeframeError):
    """An offline check of a snapshot could not be run (image missing, export failed, ...)."""

    exit_code = 11


class RecoverError(FreezeframeError):
    """A guest left with an open freeze intent could not be confirmed thawed."""

    exit_code = 12
