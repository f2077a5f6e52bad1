"""QGA wire protocol: the byte transport and the framing on top of it.

Owns everything below "send this command, give me its JSON reply":

- :class:`Transport`, the tiny interface the client depends on (``read``/``write``/``close``),
  and :class:`UnixTransport`, the one real implementation (a unix stream socket, the way QEMU
  and libvirt expose a guest's ``org.qemu.guest_agent.0`` channel). A :data:`Connector` is an
  async callable that opens a transport; tests can plug in their own.
- :class:`QgaChannel`, the framing: commands are JSON objects sent as one line; replies are one
  JSON object per line. QGA has no greeting and commands carry no ids, so the only way to know
  which reply belongs to which command is ``guest-sync-delimited``: the client sends a ``0xFF``
  byte (which resets the agent's JSON parser) and the sync command with a fresh random id; the
  agent answers ``0xFF`` followed by ``{"return": <id>}``. Everything before that ``0xFF`` is
  discarded (late replies of timed-out commands, and the ``JSON parse error, stray '\\xff'``
  error reply qemu-ga 7.2 sends for the client's own ``0xFF``); a sync reply with another id is
  stale (an earlier, timed-out sync) and reading goes on to the next ``0xFF``. A ``0xFF`` byte
  can never occur inside the agent's JSON, which is UTF-8.
- *Pipelined* exchanges (:meth:`QgaChannel.send_pipelined`): ``0xFF`` + a sync + one command in
  a single write, without waiting for anything, then later the reply of both. They exist for the
  urgent thaw: the bytes queue inside the guest behind a command that is still running. Such an
  exchange is *pending* until its replies are read, and every reader of the channel reads
  through pending replies (keeping them for their owner) instead of taking them for its own:
  :meth:`QgaChannel.sync` recognizes their sync ids, :meth:`QgaChannel.command` settles them
  before it writes.

The guest is untrusted: every line is bounded (``max_line``), and so is the total number of
bytes one exchange may consume (``max_reply``, which also counts discarded noise and stale
replies). Foreign errors are translated here, once: ``OSError`` and end of stream become
:class:`~freezeframe.errors.AgentUnavailableError`, bad bytes
:class:`~freezeframe.errors.AgentProtocolError`. Timeouts are *not* handled here: the caller
wraps a whole exchange in ``asyncio.timeout`` (see :mod:`freezeframe.agent.client`).
"""

from __future__ import annotations

import abc
import asyncio
import errno
import json
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import Final

from freezeframe.errors import AgentProtocolError, AgentUnavailableError

__all__ = [
    "DELIMITER",
    "Connector",
    "Pipelined",
    "QgaChannel",
    "Reply",
    "Transport",
    "UnixTransport",
    "decode_reply",
    "open_channel",
    "unix_connector",
]

log = logging.getLogger(__name__)

#: The byte that precedes a ``guest-sync-delimited`` reply (and resets the agent's parser).
DELIMITER: Final = 0xFF
_DELIM_BYTE: Final = b"\xff"
_READ_CHUNK: Final = 64 * 1024
#: How long closing waits for unsent bytes to leave before the socket is aborted.
_CLOSE_GRACE: Final = 1.0

#: A decoded reply: ``{"return": ...}`` or ``{"error": {...}}`` (shape checked by the client).
Reply = dict[str, object]

HINT_NO_SOCKET: Final = (
    "the VM has no guest-agent channel: set hw_qemu_guest_agent=yes on the image "
    "(or add an org.qemu.guest_agent.0 virtserialport) and restart the VM"
)
HINT_NOBODY: Final = "install and start qemu-guest-agent in the guest"


class Transport(abc.ABC):
    """A byte stream to one guest agent. Implementations raise only ``OSError`` subclasses
    (the channel translates them); ``read`` returns ``b""`` at end of stream."""

    @abc.abstractmethod
    async def read(self, n: int) -> bytes:
        """Up to ``n`` bytes, at least one; ``b""`` when the peer closed the stream."""

    @abc.abstractmethod
    async def write(self, data: bytes) -> None:
        """Send all of ``data``. Concurrent calls must not interleave their bytes and must
        keep call order (an urgent thaw writes while another call waits for its reply);
        :class:`UnixTransport` queues the whole buffer before its first suspension."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the stream; never raises."""


#: Opens a transport; raises ``OSError`` (e.g. ``FileNotFoundError``) when it cannot.
Connector = Callable[[], Awaitable[Transport]]


class UnixTransport(Transport):
    """A connected unix stream socket (``asyncio.open_unix_connection``)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, path: str) -> UnixTransport:
        """Connect to ``path``; raises ``OSError`` (missing socket, refused, ...)."""
        reader, writer = await asyncio.open_unix_connection(path, limit=_READ_CHUNK)
        return cls(reader, writer)

    async def read(self, n: int) -> bytes:
        return await self._reader.read(n)

    async def write(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def close(self) -> None:
        """Close, waiting at most ``_CLOSE_GRACE`` seconds for unsent bytes to leave.

        A peer that does not read (a hung agent, a full socket buffer) would keep a plain
        ``wait_closed`` waiting forever; then the socket is aborted, dropping only the bytes
        still in this process (bytes already in the kernel stay readable by the peer).
        """
        self._writer.close()
        try:
            async with asyncio.timeout(_CLOSE_GRACE):
                await self._writer.wait_closed()
        except TimeoutError:
            log.debug("unix transport: peer does not read; aborting the socket")
            self._writer.transport.abort()
        except OSError:
            pass


def unix_connector(path: str) -> Connector:
    """A :data:`Connector` for the unix socket at ``path``."""

    async def connect() -> Transport:
        return await UnixTransport.open(path)

    return connect


async def open_channel(
    connector: Connector, *, where: str, max_line: int, max_reply: int
) -> QgaChannel:
    """Open a transport with ``connector`` and wrap it in a :class:`QgaChannel` (not synced).

    Raises AgentUnavailableError (with a hint) when the socket is missing or refuses.
    """
    try:
        transport = await connector()
    except FileNotFoundError as exc:
        raise AgentUnavailableError(
            f"guest agent socket {where} does not exist", hint=HINT_NO_SOCKET
        ) from exc
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        hint = HINT_NOBODY if exc.errno in (errno.ECONNREFUSED, errno.ECONNRESET) else None
        raise AgentUnavailableError(
            f"cannot connect to the guest agent at {where}: {reason}", hint=hint
        ) from exc
    return QgaChannel(transport, where=where, max_line=max_line, max_reply=max_reply)


class Pipelined:
    """One pipelined exchange (see :meth:`QgaChannel.send_pipelined`): the sync id and the
    command queued right behind it.

    Becomes ``done`` once its replies were read, by whichever reader came across them:
    ``reply`` is the command's decoded reply, or ``error`` says why its reply line was
    unusable. ``done`` with neither means *lost*: a reply to a later write arrived first, so
    the agent never ran this one (it answers in order).
    """

    __slots__ = ("command", "done", "error", "reply", "seq", "sync_id")

    def __init__(self, sync_id: int, command: str, seq: int) -> None:
        self.sync_id = sync_id
        self.command = command
        self.seq = seq
        self.done = False
        self.reply: Reply | None = None
        self.error: AgentProtocolError | None = None


class QgaChannel:
    """Framing over one :class:`Transport`: send a command, read one reply line, sync.

    Not safe for concurrent use; the client serializes calls. The one exception is
    :meth:`send_pipelined`, which may write while another task reads (it never reads). A
    channel never times out by itself: callers bound each exchange with ``asyncio.timeout``.
    After *any* failure or cancellation the stream position is unknown and the caller must
    :meth:`sync` (or close) before the next command.
    """

    def __init__(self, transport: Transport, *, where: str, max_line: int, max_reply: int) -> None:
        if max_line < 64 or max_reply < max_line:
            raise ValueError("need 64 <= max_line <= max_reply")
        self._transport = transport
        self._where = where
        self._buf = bytearray()
        self._eof = False
        self.max_line = max_line
        self.max_reply = max_reply
        self._last_sync_id: int | None = None
        #: Number of writes so far; a pipelined exchange remembers its own.
        self._seq = 0
        #: Pipelined exchanges whose replies were not read yet, by sync id.
        self._pending: dict[int, Pipelined] = {}
        #: A pending exchange whose sync reply was read but not the command's reply (a reader
        #: was cancelled in between): the next line belongs to it.
        self._half: Pipelined | None = None

    # ------------------------------------------------------------------ bytes

    async def _fill(self, budget: list[int]) -> None:
        """Read one chunk into the buffer, charging it to ``budget[0]`` (bytes left)."""
        if self._eof:
            raise AgentUnavailableError(
                f"the guest agent at {self._where} closed the connection", hint=HINT_NOBODY
            )
        try:
            data = await self._transport.read(_READ_CHUNK)
        except OSError as exc:
            raise AgentUnavailableError(
                f"reading from the guest agent at {self._where} failed: {exc}"
            ) from exc
        if not data:
            self._eof = True
            raise AgentUnavailableError(
                f"the guest agent at {self._where} closed the connection", hint=HINT_NOBODY
            )
        budget[0] -= len(data)
        if budget[0] < 0:
            raise AgentProtocolError(
                f"the guest agent sent more than max_reply={self.max_reply} bytes for one exchange"
            )
        self._buf += data

    async def _read_line(self, what: str, budget: list[int]) -> bytes:
        """The next non-blank line (without the newline), at most ``max_line`` bytes.

        Cancel-safe: the buffer only changes once a whole line is there.
        """
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > self.max_line:
                    raise AgentProtocolError(
                        f"{what}: reply line exceeds max_line={self.max_line} bytes"
                    )
                await self._fill(budget)
                continue
            if nl > self.max_line:
                raise AgentProtocolError(
                    f"{what}: reply line exceeds max_line={self.max_line} bytes"
                )
            line = bytes(self._buf[:nl])
            del self._buf[: nl + 1]
            if line.strip():
                return line

    async def _skip_to_delimiter(self, budget: list[int]) -> int:
        """Discard everything up to and including the next ``0xFF``; returns bytes dropped."""
        dropped = 0
        while True:
            pos = self._buf.find(_DELIM_BYTE)
            if pos >= 0:
                dropped += pos
                del self._buf[: pos + 1]
                return dropped
            dropped += len(self._buf)
            self._buf.clear()
            await self._fill(budget)

    async def _send(self, data: bytes) -> None:
        try:
            await self._transport.write(data)
        except OSError as exc:
            raise AgentUnavailableError(
                f"writing to the guest agent at {self._where} failed: {exc}"
            ) from exc

    def _new_sync_id(self) -> int:
        sync_id = secrets.randbelow(1 << 53)
        while sync_id == self._last_sync_id or sync_id in self._pending:
            sync_id = secrets.randbelow(1 << 53)
        return sync_id

    @staticmethod
    def _sync_bytes(sync_id: int) -> bytes:
        cmd = {"execute": "guest-sync-delimited", "arguments": {"id": sync_id}}
        return _DELIM_BYTE + json.dumps(cmd).encode() + b"\n"

    # ------------------------------------------------------------------ reading sync replies

    async def _read_until(self, sync_id: int, seq: int, budget: list[int]) -> None:
        """Read sync replies until the one for ``sync_id`` (sent as write number ``seq``).

        Everything before a ``0xFF`` is discarded, and so are sync replies with unknown ids
        (stale). A sync reply of a pending pipelined exchange is followed by that exchange's
        command reply, which is read and kept for its owner. Returns early when an exchange
        written after ``seq`` is answered (then ``sync_id`` was lost; the stream is in sync all
        the same). Raises AgentUnavailableError, AgentProtocolError (a sync reply that is not
        an integer, too much noise).
        """
        stale = 0
        while True:
            entry = self._half
            if entry is None:
                dropped = await self._skip_to_delimiter(budget)
                if dropped:
                    log.debug(
                        "qga %s: discarded %d bytes before a sync reply", self._where, dropped
                    )
                line = await self._read_line("guest-sync-delimited", budget)
                reply = decode_reply(line, "guest-sync-delimited")
                got = reply.get("return")
                if not isinstance(got, int) or isinstance(got, bool):
                    raise AgentProtocolError(
                        f"guest-sync-delimited: expected return={sync_id}, got {_short(line)}"
                    )
                entry = self._pending.get(got)
                if entry is None:
                    if got == sync_id:
                        self._settle_lost(seq)
                        if stale:
                            log.debug("qga %s: skipped %d stale sync replies", self._where, stale)
                        return
                    stale += 1
                    continue
                self._half = entry
            await self._finish(entry, budget)
            self._settle_lost(entry.seq)
            if entry.seq >= seq:
                return

    async def _finish(self, entry: Pipelined, budget: list[int]) -> None:
        """Read the command reply of ``entry``, whose sync reply was just read."""
        line = await self._read_line(entry.command, budget)
        self._half = None
        self._pending.pop(entry.sync_id, None)
        entry.done = True
        if line.startswith(_DELIM_BYTE):
            entry.error = AgentProtocolError(
                f"{entry.command}: unexpected sync reply {_short(line)}"
            )
            return
        try:
            entry.reply = decode_reply(line, entry.command)
        except AgentProtocolError as exc:
            entry.error = exc
        log.debug("qga %s: read the pipelined %s reply", self._where, entry.command)

    def _settle_lost(self, seq: int) -> None:
        """Mark pending exchanges written before write number ``seq`` as lost."""
        for entry in [e for e in self._pending.values() if e.seq < seq]:
            del self._pending[entry.sync_id]
            entry.done = True
            log.debug("qga %s: pipelined %s was never answered", self._where, entry.command)

    async def _settle_pending(self, budget: list[int]) -> None:
        """Read the replies of every pending pipelined exchange (they precede anything the
        caller writes next)."""
        while self._pending:
            last = max(self._pending.values(), key=lambda e: e.seq)
            await self._read_until(last.sync_id, last.seq, budget)

    # ------------------------------------------------------------------ exchanges

    async def sync(self) -> int:
        """Resynchronize: send ``0xFF`` + ``guest-sync-delimited`` with a fresh random id and
        discard everything until the matching reply (reading through the replies of pending
        pipelined exchanges, see :meth:`send_pipelined`). Returns the id.

        Raises AgentUnavailableError (I/O failure, end of stream), AgentProtocolError (more than
        ``max_reply`` bytes of noise, a malformed sync reply). Never times out by itself.
        """
        sync_id = self._new_sync_id()
        self._last_sync_id = sync_id
        log.debug("qga %s: sync id=%d", self._where, sync_id)
        self._seq += 1
        seq = self._seq
        await self._send(self._sync_bytes(sync_id))
        await self._read_until(sync_id, seq, [self.max_reply])
        return sync_id

    async def send_pipelined(self, command: str) -> Pipelined:
        """Write ``0xFF`` + ``guest-sync-delimited`` (fresh id) + ``command`` (no arguments) in
        one write, without reading anything; returns the pending exchange.

        The only method that may run while another task reads: the bytes go behind whatever
        was written before, and every reader reads through their replies (see the module
        docstring). Read them with :meth:`finish_pipelined`. Raises AgentUnavailableError
        when the write fails (the exchange is then forgotten).
        """
        sync_id = self._new_sync_id()
        data = self._sync_bytes(sync_id) + json.dumps({"execute": command}).encode() + b"\n"
        self._seq += 1
        entry = Pipelined(sync_id, command, self._seq)
        self._pending[sync_id] = entry
        log.debug("qga %s: pipelined sync id=%d + %s", self._where, sync_id, command)
        try:
            await self._send(data)
        except AgentUnavailableError:
            self._pending.pop(sync_id, None)
            raise
        return entry

    async def finish_pipelined(self, entry: Pipelined) -> None:
        """Read until ``entry`` is done (see :class:`Pipelined`); the caller must be the only
        reader. Raises AgentUnavailableError, AgentProtocolError (noise, bad sync reply)."""
        if not entry.done:
            await self._read_until(entry.sync_id, entry.seq, [self.max_reply])

    async def command(
        self, command: str, arguments: Mapping[str, object] | None, *, sensitive: bool = False
    ) -> Reply:
        """Send one command and read the next reply line, decoded (shape not checked).

        The channel must be in sync; replies of pending pipelined exchanges are read first.
        Raises AgentUnavailableError, AgentProtocolError (line over ``max_line``, invalid
        JSON, not an object). With ``sensitive`` (file contents), error messages never quote
        the reply.
        """
        msg: dict[str, object] = {"execute": command}
        if arguments is not None:
            msg["arguments"] = dict(arguments)
        try:
            data = json.dumps(msg).encode() + b"\n"
        except (TypeError, ValueError) as exc:
            raise AgentProtocolError(f"{command}: arguments are not JSON: {exc}") from exc
        budget = [self.max_reply]
        await self._settle_pending(budget)
        self._seq += 1
        await self._send(data)
        line = await self._read_line(command, budget)
        if line.startswith(_DELIM_BYTE):
            raise AgentProtocolError(f"{command}: unexpected sync reply {_short(line)}")
        return decode_reply(line, command, quote=not sensitive)

    async def close(self) -> None:
        """Close the transport; never raises."""
        try:
            await self._transport.close()
        except OSError as exc:  # pragma: no cover - transports should not raise
            log.debug("qga %s: close failed: %s", self._where, exc)


def decode_reply(line: bytes, command: str, *, quote: bool = True) -> Reply:
    """One reply line -> a dict; raises AgentProtocolError for invalid JSON or a non-object.

    The line comes from the guest, which is untrusted: whatever ``json.loads`` raises on it
    (ValueError for bad JSON or bad UTF-8, RecursionError for deep nesting like ``[[[[...``,
    ValueError for integers over the digit limit, MemoryError) becomes AgentProtocolError.
    ``quote`` puts the start of the bad line in the message (off for file contents).
    """
    shown = _short(line) if quote else f"({len(line)} bytes)"
    try:
        value = json.loads(line)
    except Exception as exc:  # hostile input: any failure to decode is a protocol error
        kind = "is nested too deeply" if isinstance(exc, RecursionError) else "is not valid JSON"
        raise AgentProtocolError(f"{command}: reply {kind}: {shown}") from exc
    if not isinstance(value, dict):
        raise AgentProtocolError(f"{command}: reply is not a JSON object: {shown}")
    return value


def _short(line: bytes, n: int = 120) -> str:
    text = repr(line[:n])
    return text + ("..." if len(line) > n else "")
