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
import contextlib
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
        """Send all of ``data``."""

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
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


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


class QgaChannel:
    """Framing over one :class:`Transport`: send a command, read one reply line, sync.

    Not safe for concurrent use; the client serializes calls. A channel never times out by
    itself: callers bound each exchange with ``asyncio.timeout``. After *any* failure or
    cancellation the stream position is unknown and the caller must :meth:`sync` (or close)
    before the next command.
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
        """The next non-blank line (without the newline), at most ``max_line`` bytes."""
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

    # ------------------------------------------------------------------ exchanges

    async def sync(self) -> int:
        """Resynchronize: send ``0xFF`` + ``guest-sync-delimited`` with a fresh random id and
        discard everything until the matching reply. Returns the id.

        Raises AgentUnavailableError (I/O failure, end of stream), AgentProtocolError (more than
        ``max_reply`` bytes of noise, a malformed sync reply). Never times out by itself.
        """
        sync_id = secrets.randbelow(1 << 53)
        while sync_id == self._last_sync_id:
            sync_id = secrets.randbelow(1 << 53)
        self._last_sync_id = sync_id
        cmd = {"execute": "guest-sync-delimited", "arguments": {"id": sync_id}}
        log.debug("qga %s: sync id=%d", self._where, sync_id)
        await self._send(_DELIM_BYTE + json.dumps(cmd).encode() + b"\n")
        budget = [self.max_reply]
        stale = 0
        while True:
            dropped = await self._skip_to_delimiter(budget)
            if dropped:
                log.debug("qga %s: discarded %d bytes before sync reply", self._where, dropped)
            line = await self._read_line("guest-sync-delimited", budget)
            reply = decode_reply(line, "guest-sync-delimited")
            got = reply.get("return")
            if isinstance(got, int) and not isinstance(got, bool) and got == sync_id:
                if stale:
                    log.debug("qga %s: skipped %d stale sync replies", self._where, stale)
                return sync_id
            if isinstance(got, int) and not isinstance(got, bool):
                stale += 1
                continue
            raise AgentProtocolError(
                f"guest-sync-delimited: expected return={sync_id}, got {_short(line)}"
            )

    async def command(
        self, command: str, arguments: Mapping[str, object] | None, *, sensitive: bool = False
    ) -> Reply:
        """Send one command and read the next reply line, decoded (shape not checked).

        The channel must be in sync. Raises AgentUnavailableError, AgentProtocolError (line
        over ``max_line``, invalid JSON, not an object). With ``sensitive`` (file contents),
        error messages never quote the reply.
        """
        msg: dict[str, object] = {"execute": command}
        if arguments is not None:
            msg["arguments"] = dict(arguments)
        try:
            data = json.dumps(msg).encode() + b"\n"
        except (TypeError, ValueError) as exc:
            raise AgentProtocolError(f"{command}: arguments are not JSON: {exc}") from exc
        await self._send(data)
        line = await self._read_line(command, [self.max_reply])
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

    ``quote`` puts the start of the bad line in the message (off for file contents).
    """
    shown = _short(line) if quote else f"({len(line)} bytes)"
    try:
        value = json.loads(line)
    except (UnicodeDecodeError, ValueError) as exc:
        raise AgentProtocolError(f"{command}: reply is not valid JSON: {shown}") from exc
    if not isinstance(value, dict):
        raise AgentProtocolError(f"{command}: reply is not a JSON object: {shown}")
    return value


def _short(line: bytes, n: int = 120) -> str:
    text = repr(line[:n])
    return text + ("..." if len(line) > n else "")
