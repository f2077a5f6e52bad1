"""The guest-agent interface the engine, doctor and recover talk to.

Owns :class:`Agent`, the typed guest-agent API (ping, info, fsinfo, freeze / thaw / status,
exec, file read, each with a timeout). Drivers supply one per VM
(:meth:`freezeframe.hypervisor.HypervisorDriver.open_agent`): the QMP driver a
:class:`~freezeframe.agent.GuestAgent` on the agent's unix socket, the libvirt driver one
that goes through libvirtd (which owns that socket). Nothing outside a driver builds an agent
from an address itself.

Every method raises only :class:`~freezeframe.errors.AgentError` subclasses
(AgentUnavailableError, AgentTimeoutError, AgentProtocolError, AgentCommandError): foreign
errors are translated inside the implementation.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Self

from freezeframe.models import AgentInfo, ExecResult, FsFreezeState, GuestFilesystem

__all__ = ["Agent"]


class Agent(abc.ABC):
    """One VM's guest agent. Use as ``async with``; one call at a time is sent to the guest.

    ``address`` names the agent in the driver's terms (stored in freeze intents so that
    ``freezeframe recover`` can reach it again); ``timeout`` is the default bound of a call.
    ``taints`` lists the commands this implementation sends in a way the hypervisor records as
    a taint (libvirt's ``custom-ga-command``), for doctor and the README to say.
    """

    address: str
    timeout: float
    taints: tuple[str, ...] = ()

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @abc.abstractmethod
    async def connect(self, timeout: float | None = None) -> None:
        """Get ready to talk to the agent (open, sync). Raises AgentUnavailableError when the
        agent cannot be reached, AgentTimeoutError when it does not answer."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the connection; never raises. The object can connect again."""

    @abc.abstractmethod
    async def ping(self, timeout: float | None = None) -> None:
        """``guest-ping``. Allowed while frozen."""

    @abc.abstractmethod
    async def info(self, timeout: float | None = None) -> AgentInfo:
        """``guest-info``: version and which commands are enabled. Allowed while frozen."""

    @abc.abstractmethod
    async def get_fsinfo(self, timeout: float | None = None) -> list[GuestFilesystem]:
        """The guest's mounted filesystems with the disks they live on (PCI address, serial or
        the hypervisor's target name, whatever the implementation can tell)."""

    @abc.abstractmethod
    async def fsfreeze_status(self, timeout: float | None = None) -> FsFreezeState:
        """``guest-fsfreeze-status``. Allowed while frozen."""

    async def ready_for_freeze(self, deadline: float) -> None:
        """Called right before a freeze with its deadline (seconds), outside the freeze
        window: set up whatever bounds the freeze (libvirt: the domain's agent response
        timeout). Never raises; the default does nothing."""
        return None

    @abc.abstractmethod
    async def fsfreeze_freeze(self, timeout: float | None = None) -> int:
        """Freeze every freezable filesystem; returns how many froze. On AgentTimeoutError,
        AgentProtocolError or cancellation the freeze may still complete: thaw at once with
        :meth:`fsfreeze_thaw_urgent`. On AgentCommandError nothing stays frozen."""

    @abc.abstractmethod
    async def fsfreeze_freeze_list(
        self, mountpoints: Sequence[str], timeout: float | None = None
    ) -> int:
        """Freeze only ``mountpoints``; same failure semantics as :meth:`fsfreeze_freeze`."""

    @abc.abstractmethod
    async def fsfreeze_thaw(self, timeout: float | None = None) -> int:
        """Thaw; returns how many filesystems were thawed (0 if none were frozen)."""

    @abc.abstractmethod
    async def fsfreeze_thaw_urgent(self, timeout: float | None = None) -> int | None:
        """Thaw right after a freeze that did not answer: get the thaw to the guest without
        waiting for the pending freeze, then wait at most ``timeout`` for its reply. Returns
        the count, or None when not known in time (the thaw stays queued). Raises
        AgentCommandError / AgentProtocolError for a bad reply; never AgentTimeoutError."""

    @abc.abstractmethod
    async def file_read(
        self,
        path: str,
        *,
        max_bytes: int = 1 << 20,
        tail: bool = False,
        timeout: float | None = None,
    ) -> bytes:
        """A guest file's contents (with ``tail``, its last ``max_bytes``)."""

    @abc.abstractmethod
    async def exec(
        self,
        path: str,
        args: Sequence[str] = (),
        *,
        timeout: float | None = None,
        capture: bool = True,
    ) -> ExecResult:
        """Run a program in the guest and wait for it to exit."""
