"""An in-memory guest agent for tests: :class:`FakeAgent` over a scriptable :class:`FakeGuest`.

Owns the guest side of the fake world: :class:`FakeGuest` (its filesystems, which of them are
frozen, the agent's enabled commands, guest files and programs, the qemu-ga style log, every
command received) and :class:`FakeAgent`, a complete :class:`~freezeframe.agent.Agent` that
talks to it at the command level (no sockets, no JSON). Data that does not change is a frozen
dataclass (:class:`FakeFilesystem`, :class:`FakeProgram`, :class:`AgentCall`).

The guest behaves like qemu-ga 7.2 where the engine depends on it:

- commands run one at a time, in the order they were sent, whoever sent them; a command whose
  caller gave up (timeout, cancellation) still runs when its turn comes, so a late freeze is
  undone by the thaw queued behind it;
- while frozen only the commands of :data:`FREEZE_ALLOWED_COMMANDS` run, the others fail with
  ``CommandNotFound``, and ``guest-info`` reports them disabled;
- a filesystem that cannot be frozen (vfat & co) is skipped silently: the freeze answers a
  smaller count;
- while the VM is paused (:meth:`FakeGuest.pause`, :meth:`freezeframe.testing.FakeDriver.pause`)
  nothing runs and commands queue up; when the client hangs up meanwhile its queued commands
  are dropped (QEMU drops what it had not passed on to the guest), on :meth:`FakeGuest.resume`
  the others run in order;
- one client at a time: a second :meth:`FakeAgent.connect` waits for the first to close.

Faults are scripted per command with :meth:`FakeGuest.script` (:class:`AgentFault`), plus
``agent_running=False`` (no qemu-ga: connect raises AgentUnavailableError) and ``disabled``
commands (``--block-rpcs``). Every method of :class:`FakeAgent` raises only
:class:`~freezeframe.errors.AgentError` and its subclasses (plus ``ValueError`` / ``TypeError``
for a bad argument, like :class:`~freezeframe.agent.GuestAgent`).

A guest belongs to one event loop (it holds asyncio events and tasks); make a new one per test.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, TypeVar

from freezeframe.agent.base import Agent
from freezeframe.agent.client import FREEZE_ALLOWED_COMMANDS
from freezeframe.errors import (
    AgentCommandError,
    AgentError,
    AgentTimeoutError,
    AgentUnavailableError,
)
from freezeframe.models import AgentInfo, ExecResult, FsFreezeState, GuestDisk, GuestFilesystem

__all__ = [
    "FREEZE_ALLOWED_COMMANDS",
    "QGA_COMMANDS",
    "SKIPPED_FSTYPES",
    "AgentCall",
    "AgentFault",
    "FakeAgent",
    "FakeFilesystem",
    "FakeGuest",
    "FakeProgram",
]

T = TypeVar("T")

#: The commands the fake agent knows (reported by ``guest-info``).
QGA_COMMANDS: Final = (
    "guest-ping",
    "guest-info",
    "guest-sync",
    "guest-sync-delimited",
    "guest-get-fsinfo",
    "guest-fsfreeze-status",
    "guest-fsfreeze-freeze",
    "guest-fsfreeze-freeze-list",
    "guest-fsfreeze-thaw",
    "guest-file-open",
    "guest-file-seek",
    "guest-file-read",
    "guest-file-close",
    "guest-exec",
    "guest-exec-status",
)

#: Filesystem types whose FIFREEZE fails with EOPNOTSUPP, which qemu-ga skips silently (the
#: guest's behaviour; :data:`freezeframe.engine.plan.UNFREEZABLE_FSTYPES` is the engine's
#: prediction of it, kept separate on purpose).
SKIPPED_FSTYPES: Final = frozenset({"vfat", "msdos", "fat", "exfat", "ntfs", "ntfs3", "fuseblk"})

#: The QGA commands each :class:`FakeAgent` method needs enabled.
_NEEDS: Final[Mapping[str, tuple[str, ...]]] = {
    "guest-file-open": ("guest-file-open", "guest-file-read", "guest-file-close"),
    "guest-exec": ("guest-exec", "guest-exec-status"),
}

DEFAULT_LOG_PATH: Final = "/var/log/qemu-ga.log"


class AgentFault(enum.Enum):
    """A scripted misbehaviour of one command (see :meth:`FakeGuest.script`)."""

    #: No answer and no effect until a thaw runs in the guest (the hung command then ends,
    #: nothing frozen by it) or its caller gives up; the commands sent after it are served.
    HANG = "hang"
    #: The command takes effect but never answers (a freeze that completes after its caller
    #: gave up).
    SILENT = "silent"
    #: The agent answers an error (AgentCommandError ``GenericError``); no effect (qemu-ga
    #: thaws what a failed freeze had frozen).
    REFUSE = "refuse"


@dataclass(frozen=True, slots=True)
class FakeFilesystem:
    """One mounted guest filesystem.

    ``disks`` names the VM disks it lives on by the hypervisor's target name
    (:attr:`freezeframe.models.DiskInfo.device`, e.g. ``disk0`` or ``vda``; several for LVM or
    md; none for a filesystem on no VM disk); ``name`` is the guest kernel's device name
    (default: the first disk's name). ``freezable`` None means by ``fstype``: vfat and the other
    :data:`SKIPPED_FSTYPES` are skipped silently by the freeze, like FIFREEZE's EOPNOTSUPP in
    qemu-ga.
    """

    mountpoint: str
    fstype: str = "ext4"
    disks: tuple[str, ...] = ()
    name: str = ""
    freezable: bool | None = None

    @property
    def can_freeze(self) -> bool:
        if self.freezable is not None:
            return self.freezable
        return self.fstype not in SKIPPED_FSTYPES

    def to_guest(self) -> GuestFilesystem:
        """What ``guest-get-fsinfo`` reports for it (disks identified by target name only)."""
        name = self.name or (self.disks[0] if self.disks else "root")
        return GuestFilesystem(
            mountpoint=self.mountpoint,
            fstype=self.fstype,
            name=name,
            disks=tuple(
                GuestDisk(dev=f"/dev/{target}", bus_type="virtio", pci=None, target=target)
                for target in self.disks
            ),
        )


@dataclass(frozen=True, slots=True)
class FakeProgram:
    """A program the guest can run with ``guest-exec``: what it returns, and how long it runs
    (seconds; longer than the call's timeout makes the call raise AgentTimeoutError)."""

    exitcode: int | None = 0
    signal: int | None = None
    stdout: bytes = b""
    stderr: bytes = b""
    duration: float = 0.0


@dataclass(frozen=True, slots=True)
class AgentCall:
    """One command a :class:`FakeAgent` sent, recorded when sent (whether it ran or not).

    ``command`` is the QGA command the method starts with (``file_read`` records
    ``guest-file-open``, ``exec`` records ``guest-exec``; the urgent thaw records
    ``guest-fsfreeze-thaw`` with ``urgent`` True); ``client`` numbers the connection (1, 2,
    ...); ``at`` is ``time.monotonic()``.
    """

    command: str
    args: Mapping[str, object] = field(default_factory=dict)
    client: int = 0
    at: float = 0.0
    urgent: bool = False


@dataclass(eq=False)
class _Job:
    """A command on its way through the guest: ``reply`` is what its caller awaits."""

    call: AgentCall
    run: Callable[[], object]
    reply: asyncio.Future[object]
    started: bool = False
    dropped: bool = False


def _consume(fut: asyncio.Future[object]) -> None:
    """Mark a reply's exception as retrieved: nobody may be waiting for it any more."""
    if not fut.cancelled():
        fut.exception()


def _settle(
    fut: asyncio.Future[object], value: object = None, exc: BaseException | None = None
) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value)


def _disabled(command: str, why: str) -> AgentCommandError:
    return AgentCommandError(
        f"{command}: Command {command} has been disabled{why}",
        command=command,
        qga_class="CommandNotFound",
    )


class FakeGuest:
    """The guest side of a fake VM: filesystems, freeze state, the agent's configuration and
    faults, guest files and programs, and the record of every command received.

    ``agent_running`` False is a guest without qemu-ga (AgentUnavailableError on connect);
    ``disabled`` commands are reported disabled by ``guest-info`` and refused with
    ``CommandNotFound``; ``files`` are readable with ``file_read``; ``programs`` runnable with
    ``exec`` by path (default: ``sync``, exit 0); ``log_path``, when set, is a guest file the
    agent appends qemu-ga ``--verbose`` style lines to (the freeze evidence the engine reads).
    """

    def __init__(
        self,
        filesystems: Iterable[FakeFilesystem] = (FakeFilesystem("/"),),
        *,
        agent_running: bool = True,
        version: str = "7.2.0-fake",
        disabled: Iterable[str] = (),
        files: Mapping[str, bytes] | None = None,
        programs: Mapping[str, FakeProgram] | None = None,
        log_path: str | None = DEFAULT_LOG_PATH,
    ) -> None:
        self.filesystems: list[FakeFilesystem] = list(filesystems)
        self.agent_running = agent_running
        self.version = version
        self.disabled: set[str] = set(disabled)
        self.files: dict[str, bytes] = dict(files or {})
        self.programs: dict[str, FakeProgram] = dict(
            programs if programs is not None else {"sync": FakeProgram()}
        )
        self.log_path = log_path
        if log_path is not None:
            self.files.setdefault(log_path, b"")
        #: Mount points frozen right now, in the order they froze.
        self.frozen_mounts: list[str] = []
        #: Every command sent to this guest, in order.
        self.calls: list[AgentCall] = []
        #: Connections made so far.
        self.connections = 0
        self._faults: dict[str, list[tuple[AgentFault, int | None]]] = {}
        self._running = asyncio.Event()
        self._running.set()
        self._free = asyncio.Event()
        self._free.set()
        self._client: int | None = None
        self._ids = itertools.count(1)
        self._tail: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._jobs: set[_Job] = set()
        self._hung: list[_Job] = []

    # ------------------------------------------------------------------ state

    @property
    def frozen(self) -> bool:
        return bool(self.frozen_mounts)

    @property
    def state(self) -> FsFreezeState:
        return FsFreezeState.FROZEN if self.frozen_mounts else FsFreezeState.THAWED

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    @property
    def commands(self) -> list[str]:
        """The names of every command sent, in order."""
        return [c.command for c in self.calls]

    def sent(self, command: str) -> int:
        """How many times ``command`` was sent (``guest-fsfreeze-freeze`` also counts
        ``guest-fsfreeze-freeze-list``)."""
        names = {command}
        if command == "guest-fsfreeze-freeze":
            names.add("guest-fsfreeze-freeze-list")
        return sum(1 for c in self.calls if c.command in names)

    def freeze(self, mountpoints: Sequence[str] | None = None) -> int:
        """Freeze now, out of band (another tool, or a snapshot process killed while frozen);
        not recorded as a command. Returns how many filesystems froze. Raises nothing."""
        return self._do_freeze(mountpoints)

    def thaw(self) -> int:
        """Thaw now, out of band; returns how many filesystems were thawed. Raises nothing."""
        return self._do_thaw()

    # ------------------------------------------------------------------ faults

    def script(self, command: str, fault: AgentFault | None, *, times: int | None = None) -> None:
        """Make ``command`` misbehave (``fault``) for its next ``times`` runs (None: until
        scripted again); ``fault`` None restores the normal behaviour. ``command`` is a QGA name
        as recorded in :class:`AgentCall` (``guest-fsfreeze-freeze``, ``-freeze-list``,
        ``-thaw``, ``-status``, ``guest-exec``, ...). Raises ValueError for ``times`` < 1."""
        if times is not None and times < 1:
            raise ValueError("times must be at least 1")
        if fault is None:
            self._faults.pop(command, None)
        else:
            self._faults[command] = [(fault, times)]

    def _take_fault(self, command: str) -> AgentFault | None:
        scripted = self._faults.get(command)
        if not scripted:
            return None
        fault, times = scripted[0]
        if times is not None:
            if times <= 1:
                del self._faults[command]
            else:
                scripted[0] = (fault, times - 1)
        return fault

    # ------------------------------------------------------------------ the vCPUs

    def pause(self) -> None:
        """Stop running commands (the VM's vCPUs are paused): they queue up."""
        self._running.clear()

    def resume(self) -> None:
        """Run the queued commands again, in order (those of clients gone meanwhile were
        dropped)."""
        self._running.set()

    def close(self) -> None:
        """End everything in flight (test teardown): queued commands are dropped, callers get
        AgentUnavailableError. Never raises."""
        for job in list(self._jobs):
            job.dropped = True
            _settle(job.reply, exc=AgentUnavailableError("the fake guest was shut down"))
        for task in list(self._tasks):
            task.cancel()
        self._tail = None
        self._hung.clear()
        self._client = None
        self._free.set()

    # ------------------------------------------------------------------ clients

    async def _attach(self, timeout: float) -> int:
        if not self.agent_running:
            raise AgentUnavailableError(
                "no guest agent answers (qemu-ga is not running in the fake guest)",
                hint="install and start qemu-guest-agent in the guest",
            )
        try:
            async with asyncio.timeout(timeout):
                while self._client is not None:
                    self._free.clear()
                    await self._free.wait()
                await self._running.wait()  # the sync needs a running guest
        except TimeoutError as exc:
            raise AgentTimeoutError(
                f"the fake guest agent did not answer the sync within {timeout:g}s"
            ) from exc
        client = next(self._ids)
        self._client = client
        self.connections += 1
        return client

    def _detach(self, client: int) -> None:
        """The client hung up: its calls in flight fail; while paused, its queued commands are
        dropped (the others still run)."""
        for job in list(self._jobs):
            if job.call.client != client:
                continue
            _settle(job.reply, exc=AgentUnavailableError("the connection was closed"))
            if not job.started and self.paused:
                job.dropped = True
        if self._client == client:
            self._client = None
            self._free.set()

    def _send(
        self,
        client: int,
        command: str,
        run: Callable[[], object],
        args: Mapping[str, object] | None = None,
        *,
        urgent: bool = False,
    ) -> _Job:
        call = AgentCall(command, dict(args or {}), client, time.monotonic(), urgent)
        self.calls.append(call)
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[object] = loop.create_future()
        reply.add_done_callback(_consume)
        job = _Job(call, run, reply)
        self._jobs.add(job)
        task = loop.create_task(self._serve(self._tail, job))
        self._tail = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    async def _serve(self, prev: asyncio.Task[None] | None, job: _Job) -> None:
        """Run ``job`` in the guest once the command before it ran and the vCPUs run."""
        try:
            if prev is not None:
                await asyncio.wait([prev])
            await self._running.wait()
            if job.dropped:
                _settle(job.reply, exc=AgentUnavailableError("dropped: the client hung up"))
                return
            job.started = True
            fault = self._take_fault(job.call.command)
            self._log_request(job.call)
            if fault is AgentFault.HANG:
                self._hung.append(job)  # ends at the next thaw; no effect
                return
            if fault is AgentFault.REFUSE:
                _settle(
                    job.reply,
                    exc=AgentCommandError(
                        f"{job.call.command}: refused by the fake guest (scripted)",
                        command=job.call.command,
                        qga_class="GenericError",
                    ),
                )
                return
            try:
                result = job.run()
            except AgentError as exc:
                _settle(job.reply, exc=exc)
                return
            if fault is not AgentFault.SILENT:
                _settle(job.reply, result)
        finally:
            self._jobs.discard(job)

    # ------------------------------------------------------------------ commands (in the guest)

    def _allowed(self, command: str) -> None:
        for needed in _NEEDS.get(command, (command,)):
            if needed in self.disabled:
                raise _disabled(needed, " for this instance")
            if self.frozen and needed not in FREEZE_ALLOWED_COMMANDS:
                raise _disabled(needed, ": the agent is in frozen state")

    def _info(self) -> AgentInfo:
        return AgentInfo(
            version=self.version,
            commands={
                c: c not in self.disabled and (not self.frozen or c in FREEZE_ALLOWED_COMMANDS)
                for c in QGA_COMMANDS
            },
        )

    def _do_freeze(self, mountpoints: Sequence[str] | None) -> int:
        for fs in self.filesystems:
            if mountpoints is not None and fs.mountpoint not in mountpoints:
                continue
            if fs.can_freeze and fs.mountpoint not in self.frozen_mounts:
                self.frozen_mounts.append(fs.mountpoint)
        if self.frozen_mounts:
            self._log("warning: disabling logging due to filesystem freeze", force=True)
        return len(self.frozen_mounts)

    def _do_thaw(self) -> int:
        n = len(self.frozen_mounts)
        self.frozen_mounts.clear()
        for job in self._hung:
            _settle(
                job.reply,
                exc=AgentCommandError(
                    f"{job.call.command}: interrupted by guest-fsfreeze-thaw",
                    command=job.call.command,
                    qga_class="GenericError",
                ),
            )
        self._hung.clear()
        if n:
            self._log("warning: logging re-enabled due to filesystem unfreeze")
        return n

    def _log(self, message: str, *, force: bool = False) -> None:
        """Append a qemu-ga ``--verbose`` line; like qemu-ga, nothing while frozen (``force``:
        the line that says logging stops)."""
        if self.log_path is None or (self.frozen and not force):
            return
        line = f"{time.time():.6f}: {message}\n".encode()
        self.files[self.log_path] = self.files.get(self.log_path, b"") + line

    def _log_request(self, call: AgentCall) -> None:
        data = json.dumps(
            {"execute": call.command, **({"arguments": call.args} if call.args else {})}
        )
        self._log(f"debug: read data, count: {len(data)}, data: {data}")


class FakeAgent(Agent):
    """A complete :class:`~freezeframe.agent.Agent` on a :class:`FakeGuest` (None: the VM has
    no guest agent at all, every connect raises AgentUnavailableError).

    ``address`` is the address it was built for (``fake:<vm>``), ``timeout`` the default bound
    of a call. Calls connect first when not connected (like
    :class:`~freezeframe.agent.GuestAgent`).

    Every call raises AgentUnavailableError (no agent, or this client hung up meanwhile),
    AgentTimeoutError (no reply within the timeout: its command stays queued in the guest and
    runs when its turn comes) or AgentCommandError (the guest refused it: a disabled command,
    one not allowed while frozen, a scripted REFUSE), and what its own docstring adds.
    """

    def __init__(self, guest: FakeGuest | None, *, address: str = "fake:", timeout: float = 5.0):
        self.guest = guest
        self.address = address
        self.timeout = timeout
        self._client: int | None = None
        #: The deadlines :meth:`ready_for_freeze` was called with, in order.
        self.freeze_deadlines: list[float] = []

    @property
    def connected(self) -> bool:
        return self._client is not None

    def _t(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    async def connect(self, timeout: float | None = None) -> None:
        """Attach to the guest (one client at a time: waits for the other to close). Raises
        AgentUnavailableError (no agent), AgentTimeoutError (another client holds the agent,
        or the VM is paused, for longer than ``timeout``)."""
        if self._client is not None:
            return
        if self.guest is None:
            raise AgentUnavailableError(
                f"{self.address}: the VM has no guest-agent channel",
                hint="set hw_qemu_guest_agent=yes on the image",
            )
        self._client = await self.guest._attach(self._t(timeout))

    async def close(self) -> None:
        """Hang up; never raises. Calls in flight fail with AgentUnavailableError."""
        client, self._client = self._client, None
        if client is not None and self.guest is not None:
            self.guest._detach(client)

    async def _call(
        self,
        command: str,
        run: Callable[[FakeGuest], object],
        timeout: float | None,
        args: Mapping[str, object] | None = None,
    ) -> object:
        t = self._t(timeout)
        start = time.monotonic()
        await self.connect(t)
        guest, client = self.guest, self._client
        assert guest is not None
        assert client is not None

        def body() -> object:
            guest._allowed(command)
            return run(guest)

        job = guest._send(client, command, body, args)
        left = t - (time.monotonic() - start)
        try:
            async with asyncio.timeout(max(left, 0.0)):
                return await asyncio.shield(job.reply)
        except TimeoutError as exc:
            raise AgentTimeoutError(
                f"{command}: no reply from the fake guest within {t:g}s"
            ) from exc

    async def ping(self, timeout: float | None = None) -> None:
        """``guest-ping``."""
        await self._call("guest-ping", lambda g: None, timeout)

    async def info(self, timeout: float | None = None) -> AgentInfo:
        """``guest-info``: every command of :data:`QGA_COMMANDS`, disabled ones (and, while
        frozen, those not freeze-safe) reported disabled."""
        result = await self._call("guest-info", FakeGuest._info, timeout)
        assert isinstance(result, AgentInfo)
        return result

    async def get_fsinfo(self, timeout: float | None = None) -> list[GuestFilesystem]:
        """The guest's filesystems, their disks named by target (refused while frozen)."""
        result = await self._call(
            "guest-get-fsinfo", lambda g: [fs.to_guest() for fs in g.filesystems], timeout
        )
        assert isinstance(result, list)
        return result

    async def fsfreeze_status(self, timeout: float | None = None) -> FsFreezeState:
        """Frozen while any filesystem is."""
        result = await self._call("guest-fsfreeze-status", lambda g: g.state, timeout)
        assert isinstance(result, FsFreezeState)
        return result

    async def ready_for_freeze(self, deadline: float) -> None:
        """Records ``deadline`` in :attr:`freeze_deadlines`; never raises."""
        self.freeze_deadlines.append(deadline)

    async def fsfreeze_freeze(self, timeout: float | None = None) -> int:
        """Freeze every filesystem that can be frozen (others skipped silently); returns the
        count. Refused while frozen."""
        result = await self._call("guest-fsfreeze-freeze", lambda g: g._do_freeze(None), timeout)
        assert isinstance(result, int)
        return result

    async def fsfreeze_freeze_list(
        self, mountpoints: Sequence[str], timeout: float | None = None
    ) -> int:
        """Freeze those of ``mountpoints`` that are mounted and can be frozen; returns the
        count. Raises TypeError for a string instead of a sequence."""
        if isinstance(mountpoints, str):
            raise TypeError("mountpoints must be a sequence of strings, not a string")
        wanted = tuple(mountpoints)
        result = await self._call(
            "guest-fsfreeze-freeze-list",
            lambda g: g._do_freeze(wanted),
            timeout,
            {"mountpoints": list(wanted)},
        )
        assert isinstance(result, int)
        return result

    async def fsfreeze_thaw(self, timeout: float | None = None) -> int:
        """Thaw; returns how many filesystems were frozen (0 if none). Ends hung commands."""
        result = await self._call("guest-fsfreeze-thaw", FakeGuest._do_thaw, timeout)
        assert isinstance(result, int)
        return result

    async def fsfreeze_thaw_urgent(self, timeout: float | None = None) -> int | None:
        """Queue a thaw right behind whatever was sent (a hung freeze does not hold it up) and
        wait at most ``timeout`` for its reply: the count, or None when not known in time (the
        thaw stays queued) or the agent cannot be reached. Raises AgentCommandError when the
        thaw is refused."""
        t = self._t(timeout)
        command = "guest-fsfreeze-thaw"
        try:
            async with asyncio.timeout(t):
                await self.connect(t)
                guest, client = self.guest, self._client
                assert guest is not None
                assert client is not None

                def body() -> object:
                    guest._allowed(command)
                    return guest._do_thaw()

                job = guest._send(client, command, body, urgent=True)
                result = await asyncio.shield(job.reply)
        except (TimeoutError, AgentTimeoutError, AgentUnavailableError):
            return None
        assert isinstance(result, int)
        return result

    async def file_read(
        self,
        path: str,
        *,
        max_bytes: int = 1 << 20,
        tail: bool = False,
        timeout: float | None = None,
    ) -> bytes:
        """A guest file (with ``tail``, its last ``max_bytes``). Raises AgentCommandError when
        it does not exist, AgentError when it is larger than ``max_bytes`` without ``tail``."""
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")

        def read(g: FakeGuest) -> object:
            if tail and "guest-file-seek" in g.disabled:
                raise _disabled("guest-file-seek", " for this instance")
            data = g.files.get(path)
            if data is None:
                raise AgentCommandError(
                    f"guest-file-open: failed to open file '{path}' (mode: 'r'): "
                    "No such file or directory",
                    command="guest-file-open",
                    qga_class="GenericError",
                )
            if tail:
                return data[-max_bytes:] if max_bytes else b""
            if len(data) > max_bytes:
                raise AgentError(f"guest file {path} is larger than max_bytes={max_bytes}")
            return data

        result = await self._call("guest-file-open", read, timeout, {"path": path, "mode": "r"})
        assert isinstance(result, bytes)
        return result

    async def exec(
        self,
        path: str,
        args: Sequence[str] = (),
        *,
        timeout: float | None = None,
        capture: bool = True,
    ) -> ExecResult:
        """Run one of the guest's :attr:`FakeGuest.programs` (by ``path``). Raises
        AgentCommandError when there is no such program, AgentTimeoutError when it runs longer
        than ``timeout`` (it goes on in the guest)."""
        if isinstance(args, str):
            raise TypeError("args must be a sequence of strings, not a string")
        t = self._t(timeout)
        start = time.monotonic()

        def start_program(g: FakeGuest) -> object:
            prog = g.programs.get(path)
            if prog is None:
                raise AgentCommandError(
                    f"guest-exec: Guest agent command failed, error was 'Failed to execute "
                    f"child process \u201c{path}\u201d (No such file or directory)'",
                    command="guest-exec",
                    qga_class="GenericError",
                )
            return prog

        prog = await self._call(
            "guest-exec",
            start_program,
            t,
            {"path": path, "arg": list(args), "capture-output": capture},
        )
        assert isinstance(prog, FakeProgram)
        left = t - (time.monotonic() - start)
        if prog.duration > left:
            await asyncio.sleep(max(left, 0.0))
            raise AgentTimeoutError(
                f"guest-exec {path}: still running after {t:g}s (left running in the guest)"
            )
        if prog.duration > 0:
            await asyncio.sleep(prog.duration)
        return ExecResult(
            exitcode=prog.exitcode,
            signal=prog.signal,
            stdout=prog.stdout if capture else b"",
            stderr=prog.stderr if capture else b"",
        )
