"""The typed QEMU guest-agent client: :class:`GuestAgent`.

Owns the command layer over :mod:`freezeframe.agent.protocol`: one connection, one command in
flight (an ``asyncio.Lock``), a timeout on every call, re-synchronization after any failure, and
the narrowing of every reply into :mod:`freezeframe.models` types. Nothing above this module sees
raw QGA JSON.

Connection state, in one place:

- *closed*: no transport. Any call (or :meth:`GuestAgent.connect`) opens one.
- *needs sync*: a transport exists but the stream position is unknown (fresh connection, or the
  last call failed, timed out or was cancelled). The next call first runs
  ``guest-sync-delimited`` with a fresh id, discarding everything before the matching reply, so a
  late reply to an earlier command is never taken for the reply to a new one.
- *ready*: the last reply was consumed completely; the next command is sent directly.

Policy: after a timeout, a cancellation, an error reply or a protocol error the connection is
kept and marked *needs sync* (re-syncing the same stream is cheap, and reopening a QEMU
chardev socket would not flush anything queued inside the guest anyway). If that re-sync fails
with a protocol error (e.g. more garbage than ``max_reply``) or the stream ended, the
connection is closed and one fresh connection is tried within the same call. If the stream
breaks during a command, the call fails with AgentUnavailableError and the next call
reconnects. A timed-out sync keeps the connection: the agent is typically still busy with the
earlier command (e.g. a slow freeze) and will answer the sync once it is done.

The one call that does not wait for a re-sync is :meth:`GuestAgent.fsfreeze_thaw_urgent`: it
writes sync + thaw in one go (a *pipelined* exchange, see :mod:`freezeframe.agent.protocol`)
so the thaw is queued in the guest right behind a freeze that is still running.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Final, Self, TypeVar

from freezeframe.agent.base import Agent
from freezeframe.agent.protocol import (
    Connector,
    Pipelined,
    QgaChannel,
    Reply,
    open_channel,
    unix_connector,
)
from freezeframe.errors import (
    AgentCommandError,
    AgentError,
    AgentProtocolError,
    AgentTimeoutError,
    AgentUnavailableError,
)
from freezeframe.models import (
    AgentInfo,
    ExecResult,
    FsFreezeState,
    GuestDisk,
    GuestFilesystem,
    PciAddress,
)

__all__ = ["FREEZE_ALLOWED_COMMANDS", "GuestAgent"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Commands qemu-ga still runs while filesystems are frozen (the others answer
#: ``CommandNotFound: Command ... has been disabled``).
FREEZE_ALLOWED_COMMANDS: Final = frozenset(
    {
        "guest-ping",
        "guest-info",
        "guest-sync",
        "guest-sync-delimited",
        "guest-fsfreeze-status",
        "guest-fsfreeze-thaw",
    }
)

_EXEC_POLL_FIRST: Final = 0.005
_EXEC_POLL_MAX: Final = 0.2
_FILE_CHUNK_MAX: Final = 1 << 20


class GuestAgent(Agent):
    """A client for one guest agent socket. Use as ``async with GuestAgent(path) as ga``.

    ``timeout`` is the default for every call (each method takes a ``timeout`` override that
    bounds the whole call, including a re-sync and waiting for another call's turn).
    ``max_line`` bounds one reply line; ``max_reply`` the bytes one exchange may consume,
    noise and stale replies included. ``connector`` replaces the unix-socket transport (tests).

    Every method raises only :class:`~freezeframe.errors.AgentError` subclasses:

    - AgentUnavailableError: cannot connect, or the stream broke (the connection is closed;
      the next call reconnects);
    - AgentTimeoutError: no complete reply in time (connection kept, marked *needs sync*);
    - AgentProtocolError: oversize, invalid JSON, wrong reply shape (marked *needs sync*);
    - AgentCommandError: the agent answered with an error object (marked *needs sync*).

    Cancelling a call marks the connection *needs sync* and leaves the object usable.
    """

    def __init__(
        self,
        path: str,
        *,
        timeout: float = 5.0,
        max_line: int = 1 << 20,
        max_reply: int = 8 << 20,
        connector: Connector | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if max_line < 64 or max_reply < max_line:
            raise ValueError("need 64 <= max_line <= max_reply")
        self.path = str(path)
        self.address = self.path
        self.timeout = timeout
        self.max_line = max_line
        self.max_reply = max_reply
        self._connector = connector or unix_connector(self.path)
        self._channel: QgaChannel | None = None
        self._needs_sync = True
        self._lock = asyncio.Lock()
        #: guest-file handles whose close failed or was interrupted; closed at the next chance.
        self._orphan_handles: list[int] = []

    # ------------------------------------------------------------------ state

    @property
    def connected(self) -> bool:
        """True while a transport is open (it may still need a sync)."""
        return self._channel is not None

    @property
    def needs_sync(self) -> bool:
        """True when the next call re-syncs (or connects) before sending its command."""
        return self._channel is None or self._needs_sync

    @property
    def orphan_handles(self) -> tuple[int, ...]:
        """Guest file handles not closed yet (closed before the next non-freeze-safe call)."""
        return tuple(self._orphan_handles)

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self, timeout: float | None = None) -> None:
        """Open the socket (if needed) and sync with ``guest-sync-delimited``.

        Raises AgentUnavailableError (socket missing: hint to enable the agent channel;
        refused: hint to start qemu-ga), AgentTimeoutError (nobody answers the sync; the
        connection stays open, marked *needs sync*), AgentProtocolError (garbage instead of a
        sync reply; the connection is closed).
        """
        await self._run("connect", timeout, _nothing, freeze_safe=True)

    async def close(self) -> None:
        """Close the connection; never raises, never waits for a call in flight.

        If file handles are left over (see :attr:`orphan_handles`) and no call is in flight,
        it first re-syncs and closes them, for at most one second (only a fresh sync and
        ``guest-file-close`` of this client's own handles are sent). Closing the socket then
        waits at most one more second for unsent bytes (see :meth:`UnixTransport.close`). A
        call in flight fails with AgentUnavailableError. The object can connect again
        afterwards. Bytes already written stay readable by QEMU, but QEMU may drop what it had
        not passed on to the guest yet: after :meth:`fsfreeze_thaw_urgent` returned None, close
        as late as possible.
        """
        if self._orphan_handles and self._channel is not None and not self._lock.locked():
            try:
                async with asyncio.timeout(min(self.timeout, 1.0)), self._lock:
                    await self._close_orphans(await self._ready())
            except (AgentError, TimeoutError) as exc:
                log.debug("qga %s: could not close file handles: %s", self.path, exc)
        channel, self._channel = self._channel, None
        self._needs_sync = True
        if channel is not None:
            await channel.close()
            log.debug("qga %s: closed", self.path)

    # ------------------------------------------------------------------ core

    async def _run(
        self,
        what: str,
        timeout: float | None,
        fn: Callable[[QgaChannel], Awaitable[T]],
        *,
        freeze_safe: bool = False,
    ) -> T:
        """Run ``fn`` on a ready channel under the lock, bounded by ``timeout`` in total."""
        t = self.timeout if timeout is None else timeout
        if t <= 0:
            raise AgentTimeoutError(f"{what}: no time left (timeout {t:g}s)")
        acquired = False
        try:
            async with asyncio.timeout(t):
                async with self._lock:
                    acquired = True
                    channel = await self._ready()
                    try:
                        if self._orphan_handles and not freeze_safe:
                            await self._close_orphans(channel)
                        return await fn(channel)
                    except AgentUnavailableError:
                        await self._drop()
                        raise
                    except BaseException:
                        self._needs_sync = True
                        raise
        except TimeoutError as exc:
            if not acquired:
                raise AgentTimeoutError(
                    f"{what}: timed out after {t:g}s waiting for another guest-agent call"
                ) from exc
            raise AgentTimeoutError(
                f"{what}: no reply from the guest agent at {self.path} within {t:g}s",
                hint="is qemu-guest-agent running and responsive in the guest?",
            ) from exc

    async def _ready(self) -> QgaChannel:
        """Connect and/or sync as needed; returns a channel in sync. Caller holds the lock.

        If syncing a reused connection fails for other reasons than time (endless garbage,
        end of stream), it is closed and one fresh connection is tried.
        """
        if self._channel is not None and not self._needs_sync:
            return self._channel
        reused = self._channel is not None
        try:
            return await self._open_and_sync()
        except (AgentProtocolError, AgentUnavailableError) as exc:
            if not reused:
                raise
            log.debug("qga %s: re-sync failed (%s); reconnecting", self.path, exc)
        return await self._open_and_sync()

    async def _open_and_sync(self) -> QgaChannel:
        """Open a channel if there is none, then sync it; on a sync failure other than a
        timeout the channel is closed."""
        if self._channel is None:
            self._channel = await open_channel(
                self._connector, where=self.path, max_line=self.max_line, max_reply=self.max_reply
            )
            self._needs_sync = True
            log.debug("qga %s: connected", self.path)
        channel = self._channel
        try:
            await channel.sync()
        except (AgentProtocolError, AgentUnavailableError):
            await self._drop()
            raise
        self._needs_sync = False
        return channel

    async def _drop(self) -> None:
        channel, self._channel = self._channel, None
        self._needs_sync = True
        if channel is not None:
            await channel.close()

    async def _close_orphans(self, channel: QgaChannel) -> None:
        while self._orphan_handles:
            handle = self._orphan_handles[0]
            reply = await channel.command("guest-file-close", {"handle": handle})
            self._orphan_handles.pop(0)
            if "error" in reply:
                log.debug("qga %s: closing leftover handle %d failed", self.path, handle)
            else:
                log.debug("qga %s: closed leftover handle %d", self.path, handle)

    async def _call(
        self,
        command: str,
        arguments: Mapping[str, object] | None,
        timeout: float | None,
        parse: Callable[[object], T],
        *,
        sensitive: bool = False,
    ) -> T:
        """One command -> ``parse(its return value)``, all inside the lock, so a reply of the
        wrong shape also marks the stream *needs sync*. Raises as documented on the class."""

        async def exchange(channel: QgaChannel) -> T:
            start = time.monotonic()
            log.debug("qga %s -> %s %s", self.path, command, sorted(arguments) if arguments else "")
            reply = await channel.command(command, arguments, sensitive=sensitive)
            return self._check_reply(command, reply, parse, start)

        return await self._run(
            command, timeout, exchange, freeze_safe=command in FREEZE_ALLOWED_COMMANDS
        )

    def _check_reply(
        self, command: str, reply: Reply, parse: Callable[[object], T], start: float
    ) -> T:
        """``parse(reply["return"])``; AgentCommandError for an error object,
        AgentProtocolError for any other shape."""
        ms = (time.monotonic() - start) * 1000
        if "error" in reply:
            err = _obj(reply["error"], command, "error")
            qga_class = _str(err, "class", command, "error")
            desc = _str(err, "desc", command, "error")
            log.debug("qga %s <- %s error %s in %.1f ms", self.path, command, qga_class, ms)
            raise AgentCommandError(
                f"{command}: {qga_class}: {desc}", command=command, qga_class=qga_class
            )
        if "return" not in reply:
            raise AgentProtocolError(f"{command}: reply has neither 'return' nor 'error'")
        log.debug("qga %s <- %s ok in %.1f ms", self.path, command, ms)
        return parse(reply["return"])

    # ------------------------------------------------------------------ commands

    async def execute(
        self,
        command: str,
        arguments: Mapping[str, object] | None = None,
        *,
        timeout: float | None = None,
    ) -> object:
        """Low level: run any command, return its raw ``return`` value (unchecked JSON).

        Do not use it for commands that never reply (guest-shutdown, guest-suspend-*): it
        would time out. Raises as documented on the class; on failure the connection is
        marked *needs sync* (or closed if the stream broke).
        """
        return await self._call(command, arguments, timeout, _raw)

    async def ping(self, timeout: float | None = None) -> None:
        """``guest-ping``. Allowed while frozen. Raises as documented on the class."""
        await self._call("guest-ping", None, timeout, _raw)

    async def info(self, timeout: float | None = None) -> AgentInfo:
        """``guest-info``: version and supported commands (name -> enabled).

        Allowed while frozen. Raises as documented on the class.
        """
        return await self._call("guest-info", None, timeout, _parse_info)

    async def get_fsinfo(self, timeout: float | None = None) -> list[GuestFilesystem]:
        """``guest-get-fsinfo``: mounted filesystems with their backing disks.

        A disk whose PCI address the agent could not determine (negative numbers) gets
        ``pci=None``. Not allowed while frozen (AgentCommandError ``CommandNotFound``).
        Raises as documented on the class.
        """
        return await self._call("guest-get-fsinfo", None, timeout, _parse_fsinfo)

    async def fsfreeze_status(self, timeout: float | None = None) -> FsFreezeState:
        """``guest-fsfreeze-status``: thawed or frozen. Allowed while frozen.

        Raises as documented on the class (AgentProtocolError for an unknown state).
        """
        return await self._call("guest-fsfreeze-status", None, timeout, _parse_freeze_state)

    async def fsfreeze_freeze(self, timeout: float | None = None) -> int:
        """``guest-fsfreeze-freeze``: freeze every freezable guest filesystem.

        Returns how many were frozen (filesystems without FIFREEZE support, e.g. vfat, are
        skipped silently by qemu-ga: compare with :meth:`get_fsinfo`). On AgentTimeoutError,
        AgentProtocolError or cancellation the freeze may still complete in the guest: the
        caller must thaw at once with :meth:`fsfreeze_thaw_urgent` (:meth:`fsfreeze_thaw`
        would first wait for a re-sync that the agent answers only after the freeze). On
        AgentCommandError qemu-ga has thawed what it froze. Raises as documented on the class.
        """
        cmd = "guest-fsfreeze-freeze"
        return await self._call(cmd, None, timeout, _counter(cmd))

    async def fsfreeze_freeze_list(
        self, mountpoints: Sequence[str], timeout: float | None = None
    ) -> int:
        """``guest-fsfreeze-freeze-list``: freeze only ``mountpoints``; returns how many froze.

        qemu-ga ignores mountpoints it does not know. Same failure semantics as
        :meth:`fsfreeze_freeze`.
        """
        if isinstance(mountpoints, str):
            raise TypeError("mountpoints must be a sequence of strings, not a string")
        cmd = "guest-fsfreeze-freeze-list"
        return await self._call(cmd, {"mountpoints": list(mountpoints)}, timeout, _counter(cmd))

    async def fsfreeze_thaw(self, timeout: float | None = None) -> int:
        """``guest-fsfreeze-thaw``: thaw; returns how many filesystems were thawed (0 if none
        were frozen). Allowed while frozen and never delayed by other housekeeping. After
        AgentTimeoutError the thaw may still happen; check :meth:`fsfreeze_status`. Raises as
        documented on the class.
        """
        cmd = "guest-fsfreeze-thaw"
        return await self._call(cmd, None, timeout, _counter(cmd))

    async def fsfreeze_thaw_urgent(self, timeout: float | None = None) -> int | None:
        """Get a thaw into the agent's input *now*, then wait at most ``timeout`` for its reply.

        For the moment a freeze did not answer in time: the guest is slow or its vCPUs are
        paused, the freeze may still run, and a normal :meth:`fsfreeze_thaw` would first wait
        for its re-sync, which the agent answers only after the freeze. Instead this writes, in
        one write, ``0xFF`` + ``guest-sync-delimited`` (fresh id N) + ``guest-fsfreeze-thaw``,
        without syncing first and without waiting for the lock, so the thaw sits in the agent's
        queue right behind the freeze whatever happens next. Then, holding the lock (so it
        never reads while another call reads), it discards everything up to the ``0xFF`` sync
        reply N (late replies, stale sync replies, qemu-ga 7.2's stray-``0xFF`` error) and reads
        the thaw's reply. A blind thaw is safe: with nothing frozen qemu-ga answers 0.

        Returns how many filesystems were thawed, or ``None`` when that is not known within
        ``timeout`` (default: the client's): the reply did not come, the lock was not free in
        time, or the connection broke and could not be re-established. ``None`` leaves the
        connection open and marked *needs sync*; the thaw stays queued, so a guest that resumes
        runs freeze, sync, thaw in that order and ends thawed. Check with
        :meth:`fsfreeze_status` later.

        Lock: the write does not wait for the lock (normally it is free: the caller cancelled
        the freeze call; if another call is still in flight, the bytes go behind its command and
        every reader reads through this exchange's replies instead of taking them for its own,
        see :mod:`freezeframe.agent.protocol`). Reading waits for the lock, within ``timeout``.

        Connection: never closed here while it works. Bytes already written stay readable for
        QEMU after a close, and QEMU normally hands them to the guest's virtio-serial buffers
        at once; but if it could not yet (no free guest buffer), it may drop them when it sees
        the hang-up (our reading of QEMU's socket chardev, not measured here). So keep the
        object open as long as possible after a None. If there is no
        connection, or it broke (end of stream, I/O error), it reconnects and sends the same
        sync + thaw once more (a second thaw is harmless).

        Raises AgentCommandError when the agent answers the thaw with an error object,
        AgentProtocolError for garbage (too much noise, a malformed sync or thaw reply); never
        AgentTimeoutError or AgentUnavailableError.
        """
        cmd = "guest-fsfreeze-thaw"
        t = self._total(timeout)
        start = time.monotonic()
        channel = self._channel
        entry: Pipelined | None = None
        try:
            async with asyncio.timeout(t):
                if channel is not None:
                    try:
                        entry = await channel.send_pipelined(cmd)
                    except AgentUnavailableError as exc:
                        log.debug("qga %s: urgent thaw write failed: %s", self.path, exc)
                async with self._lock:
                    reply = await self._urgent_reply(cmd, channel, entry)
        except TimeoutError:
            reply = None
        except BaseException:
            self._needs_sync = True
            raise
        if reply is None:
            self._needs_sync = True
            log.warning(
                "qga %s: urgent thaw not confirmed within %gs (once written, it stays queued "
                "in the agent behind what it is still doing)",
                self.path,
                t,
            )
            return None
        try:
            return self._check_reply(cmd, reply, _counter(cmd), start)
        except AgentError:
            self._needs_sync = True
            raise

    async def _urgent_reply(
        self, command: str, channel: QgaChannel | None, entry: Pipelined | None
    ) -> Reply | None:
        """Under the lock: read the reply of the pipelined ``entry`` sent on ``channel``. If
        it was not sent, was lost, or the stream broke, send it again (at most three sends,
        reconnecting at most once). None when no reply can be had. Raises AgentProtocolError.
        """
        sends = 0 if entry is None else 1
        reconnected = False
        while True:
            if entry is not None and entry.done:  # read by us, or by another reader
                if entry.error is not None:
                    raise entry.error
                if entry.reply is not None:
                    return entry.reply
                log.debug("qga %s: urgent thaw was never answered (agent restarted?)", self.path)
                entry = None
            if entry is None or channel is None or channel is not self._channel:
                if sends >= 3:
                    return None
                if self._channel is None:
                    if reconnected:
                        return None
                    reconnected = True
                    try:
                        self._channel = await open_channel(
                            self._connector,
                            where=self.path,
                            max_line=self.max_line,
                            max_reply=self.max_reply,
                        )
                    except AgentUnavailableError as exc:
                        log.debug("qga %s: urgent thaw cannot connect: %s", self.path, exc)
                        return None
                    self._needs_sync = True
                channel = self._channel
                sends += 1
                try:
                    entry = await channel.send_pipelined(command)
                except AgentUnavailableError as exc:
                    log.debug("qga %s: urgent thaw write failed: %s", self.path, exc)
                    await self._drop()  # broken already
                    entry = None
                    continue
            try:
                await channel.finish_pipelined(entry)
            except AgentUnavailableError as exc:
                # The stream is dead already: closing our end loses nothing more.
                log.debug("qga %s: urgent thaw: the connection broke: %s", self.path, exc)
                await self._drop()
                entry = None
                continue
            if entry.reply is not None:
                self._needs_sync = False  # read through sync N: every earlier byte is consumed

    async def file_read(
        self,
        path: str,
        *,
        max_bytes: int = 1 << 20,
        tail: bool = False,
        timeout: float | None = None,
    ) -> bytes:
        """Read a whole guest file (``guest-file-open``/``-read``/``-close``); with ``tail``,
        only its last ``max_bytes`` bytes (``guest-file-seek`` from the end; a log that keeps
        growing is cut at ``max_bytes``).

        ``timeout`` bounds the whole sequence. The handle is always closed: right away, or, if
        the call failed in a way that leaves the stream unsynced (timeout, cancellation,
        protocol error), before the next call that is not freeze-safe (see
        :attr:`orphan_handles`).

        Raises AgentError when the file is larger than ``max_bytes`` (nothing is returned),
        AgentCommandError when the guest cannot open or read it, and as documented on the
        class. Contents never appear in logs or error messages.
        """
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        deadline = self._deadline(timeout)
        cmd = "guest-file-open"
        handle = await self._call(
            cmd, {"path": path, "mode": "r"}, self._left(deadline, cmd), _counter(cmd)
        )
        try:
            if tail:
                cmd = "guest-file-seek"
                size = await self._call(
                    cmd,
                    {"handle": handle, "offset": 0, "whence": "end"},
                    self._left(deadline, cmd),
                    _seek_position,
                )
                await self._call(
                    cmd,
                    {"handle": handle, "offset": max(0, size - max_bytes), "whence": "set"},
                    self._left(deadline, cmd),
                    _seek_position,
                )
            data = bytearray()
            # base64 grows by 4/3; leave room for the JSON around it.
            chunk_max = max(1, min(_FILE_CHUNK_MAX, (self.max_line - 128) * 3 // 4))
            cmd = "guest-file-read"
            while True:
                want = min(chunk_max, max_bytes + 1 - len(data))
                chunk, eof = await self._call(
                    cmd,
                    {"handle": handle, "count": want},
                    self._left(deadline, cmd),
                    _file_chunk_parser(want),
                    sensitive=True,
                )
                data += chunk
                if tail and len(data) >= max_bytes:
                    return bytes(data[:max_bytes])
                if len(data) > max_bytes:
                    raise AgentError(
                        f"guest file {path} is larger than max_bytes={max_bytes}",
                        hint="raise max_bytes, or read a part of it with exec (e.g. tail)",
                    )
                if eof or not chunk:
                    return bytes(data)
        finally:
            await self._release_handle(handle, deadline)

    async def _release_handle(self, handle: int, deadline: float) -> None:
        """Close ``handle`` now if the stream is in sync, else queue it. Never raises
        (except CancelledError, after queueing the handle)."""
        if self.needs_sync:
            self._orphan_handles.append(handle)
            return
        try:
            left = max(deadline - time.monotonic(), 0.1)
            await self._call("guest-file-close", {"handle": handle}, left, _raw)
        except AgentCommandError:
            log.debug("qga %s: guest-file-close %d refused; dropping it", self.path, handle)
        except AgentError:
            self._orphan_handles.append(handle)
        except asyncio.CancelledError:
            self._orphan_handles.append(handle)
            raise

    async def exec(
        self,
        path: str,
        args: Sequence[str] = (),
        *,
        timeout: float | None = None,
        capture: bool = True,
    ) -> ExecResult:
        """Run ``path args...`` in the guest (``guest-exec``) and wait for it to exit, polling
        ``guest-exec-status`` (the lock is released between polls); ``timeout`` bounds the
        whole run.

        Returns exit code or signal and (with ``capture``) stdout/stderr, which qemu-ga caps
        (it sets ``*-truncated``; logged at DEBUG). Raises AgentCommandError when the guest
        cannot start the program, AgentTimeoutError when it is still running at the deadline
        (the process keeps running in the guest; qemu-ga 7.2 cannot kill it; the connection
        stays in sync), and as documented on the class.
        """
        if isinstance(args, str):
            raise TypeError("args must be a sequence of strings, not a string")
        deadline = self._deadline(timeout)
        log.debug("qga %s: exec %s (%d args)", self.path, path, len(args))
        arguments: dict[str, object] = {"path": path, "arg": list(args), "capture-output": capture}
        cmd = "guest-exec"
        pid = await self._call(cmd, arguments, self._left(deadline, cmd), _parse_pid)
        pause = _EXEC_POLL_FIRST
        cmd = "guest-exec-status"
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AgentTimeoutError(
                    f"guest-exec {path}: pid {pid} still running after "
                    f"{self._total(timeout):g}s (left running in the guest)"
                )
            result = await self._call(cmd, {"pid": pid}, left, _parse_exec_status)
            if result is not None:
                return result
            await asyncio.sleep(max(0.0, min(pause, deadline - time.monotonic())))
            pause = min(pause * 2, _EXEC_POLL_MAX)

    # ------------------------------------------------------------------ helpers

    def _total(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    def _deadline(self, timeout: float | None) -> float:
        return time.monotonic() + self._total(timeout)

    @staticmethod
    def _left(deadline: float, what: str) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AgentTimeoutError(f"{what}: timed out")
        return left


async def _nothing(channel: QgaChannel) -> None:
    return None


# ---------------------------------------------------------------------- narrowing
# Each helper checks one field of an untrusted reply and names command and field on failure.


def _bad(command: str, where: str, key: str | None, want: str, got: object) -> AgentProtocolError:
    field = f"{where}.{key}" if key and where else (key or where)
    return AgentProtocolError(
        f"{command}: field {field!r} should be {want}, got {type(got).__name__}"
    )


def _obj(value: object, command: str, where: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise _bad(command, where, None, "an object", value)
    return value


def _as_list(value: object, command: str, where: str) -> list[object]:
    if not isinstance(value, list):
        raise _bad(command, where, None, "a list", value)
    return value


def _list(d: Mapping[str, object], key: str, command: str, where: str = "") -> list[object]:
    value = d.get(key)
    if not isinstance(value, list):
        raise _bad(command, where, key, "a list", value)
    return value


def _str(d: Mapping[str, object], key: str, command: str, where: str = "") -> str:
    value = d.get(key)
    if not isinstance(value, str):
        raise _bad(command, where, key, "a string", value)
    return value


def _opt_str(d: Mapping[str, object], key: str, command: str, where: str = "") -> str | None:
    if d.get(key) is None:
        return None
    return _str(d, key, command, where)


def _int_value(value: object, command: str, field: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(command, "", field, "an integer", value)
    return value


def _int(d: Mapping[str, object], key: str, command: str, where: str = "") -> int:
    value = d.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(command, where, key, "an integer", value)
    return value


def _opt_int(d: Mapping[str, object], key: str, command: str, where: str = "") -> int | None:
    if d.get(key) is None:
        return None
    return _int(d, key, command, where)


def _bool(d: Mapping[str, object], key: str, command: str, where: str = "") -> bool:
    value = d.get(key)
    if not isinstance(value, bool):
        raise _bad(command, where, key, "a boolean", value)
    return value


def _opt_bool(d: Mapping[str, object], key: str, command: str, where: str = "") -> bool:
    if d.get(key) is None:
        return False
    return _bool(d, key, command, where)


def _count(value: object, command: str) -> int:
    count = _int_value(value, command, "return")
    if count < 0:
        raise AgentProtocolError(f"{command}: field 'return' should be >= 0, got {count}")
    return count


# ---------------------------------------------------------------------- reply parsers
# Run inside the exchange (see GuestAgent._call), so a bad shape marks the stream for re-sync.


def _raw(value: object) -> object:
    return value


def _counter(command: str) -> Callable[[object], int]:
    def parse(value: object) -> int:
        return _count(value, command)

    return parse


def _parse_info(value: object) -> AgentInfo:
    cmd = "guest-info"
    ret = _obj(value, cmd, "return")
    version = _str(ret, "version", cmd)
    commands: dict[str, bool] = {}
    for i, item in enumerate(_list(ret, "supported_commands", cmd)):
        where = f"supported_commands[{i}]"
        entry = _obj(item, cmd, where)
        commands[_str(entry, "name", cmd, where)] = _bool(entry, "enabled", cmd, where)
    return AgentInfo(version=version, commands=commands)


def _parse_disk(value: object, cmd: str, where: str) -> GuestDisk:
    disk = _obj(value, cmd, where)
    pwhere = f"{where}.pci-controller"
    pci = _obj(disk.get("pci-controller"), cmd, pwhere)
    domain, bus, slot, function = (
        _int(pci, k, cmd, pwhere) for k in ("domain", "bus", "slot", "function")
    )
    for k in ("bus", "target", "unit"):
        _int(disk, k, cmd, where)
    unknown = min(domain, bus, slot, function) < 0
    return GuestDisk(
        dev=_opt_str(disk, "dev", cmd, where),
        bus_type=_str(disk, "bus-type", cmd, where),
        pci=None if unknown else PciAddress(domain, bus, slot, function),
        serial=_opt_str(disk, "serial", cmd, where),
    )


def _parse_fsinfo(value: object) -> list[GuestFilesystem]:
    cmd = "guest-get-fsinfo"
    result: list[GuestFilesystem] = []
    for i, item in enumerate(_as_list(value, cmd, "return")):
        where = f"return[{i}]"
        fs = _obj(item, cmd, where)
        disks = tuple(
            _parse_disk(d, cmd, f"{where}.disk[{j}]")
            for j, d in enumerate(_list(fs, "disk", cmd, where))
        )
        for k in ("used-bytes", "total-bytes"):
            _opt_int(fs, k, cmd, where)
        result.append(
            GuestFilesystem(
                mountpoint=_str(fs, "mountpoint", cmd, where),
                fstype=_str(fs, "type", cmd, where),
                name=_str(fs, "name", cmd, where),
                disks=disks,
            )
        )
    return result


def _parse_freeze_state(value: object) -> FsFreezeState:
    if not isinstance(value, str) or value not in {s.value for s in FsFreezeState}:
        raise AgentProtocolError(
            "guest-fsfreeze-status: field 'return' should be 'thawed' or 'frozen'"
        )
    return FsFreezeState(value)


def _file_chunk_parser(want: int) -> Callable[[object], tuple[bytes, bool]]:
    def parse(value: object) -> tuple[bytes, bool]:
        cmd = "guest-file-read"
        ret = _obj(value, cmd, "return")
        count = _int(ret, "count", cmd)
        eof = _bool(ret, "eof", cmd)
        chunk = _b64(_str(ret, "buf-b64", cmd), cmd, "buf-b64")
        if len(chunk) != count or count > want:
            raise AgentProtocolError(
                f"{cmd}: field 'count' ({count}) does not match the data "
                f"({len(chunk)} bytes, asked for {want})"
            )
        return chunk, eof

    return parse


def _seek_position(value: object) -> int:
    cmd = "guest-file-seek"
    pos = _int(_obj(value, cmd, "return"), "position", cmd)
    if pos < 0:
        raise _bad(cmd, "return", "position", "a position >= 0", pos)
    return pos


def _parse_pid(value: object) -> int:
    return _int(_obj(value, "guest-exec", "return"), "pid", "guest-exec")


def _parse_exec_status(value: object) -> ExecResult | None:
    """None while the process runs."""
    cmd = "guest-exec-status"
    st = _obj(value, cmd, "return")
    if not _bool(st, "exited", cmd):
        return None
    for stream in ("out", "err"):
        if _opt_bool(st, f"{stream}-truncated", cmd):
            log.debug("qga exec: std%s truncated by the agent", stream)
    out, err = st.get("out-data"), st.get("err-data")
    return ExecResult(
        exitcode=_opt_int(st, "exitcode", cmd),
        signal=_opt_int(st, "signal", cmd),
        stdout=b"" if out is None else _b64(_str(st, "out-data", cmd), cmd, "out-data"),
        stderr=b"" if err is None else _b64(_str(st, "err-data", cmd), cmd, "err-data"),
    )


def _b64(text: str, command: str, field: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise AgentProtocolError(f"{command}: field {field!r} is not base64") from exc
