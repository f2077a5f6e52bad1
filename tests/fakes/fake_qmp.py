"""A fake QMP server on a real unix socket, for the error paths a real QEMU will not show.

Speaks the wire protocol QEMU speaks: a greeting on connect, JSON objects back to back,
``qmp_capabilities`` before anything else, replies carrying the request's ``id``. What it
answers to each command is scripted with :class:`Return`, :class:`Error`, :class:`Hang`
(never answer), :class:`Hangup` (close the connection) and :class:`Delay` (answer late; like
QEMU, nothing else on that connection is answered meanwhile); a list scripts successive calls.
``greeting`` may be replaced by arbitrary bytes (not QMP) or None (say nothing, like a
guest-agent socket). Every request received is kept in ``received``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Self

__all__ = ["GREETING", "Delay", "Error", "FakeQmpServer", "Hang", "Hangup", "Reply", "Return"]

GREETING: dict[str, object] = {
    "QMP": {
        "version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "fake"},
        "capabilities": ["oob"],
    }
}


@dataclass(frozen=True)
class Return:
    """Answer ``{"return": value}``."""

    value: object = field(default_factory=dict)


@dataclass(frozen=True)
class Error:
    """Answer ``{"error": {"class": cls, "desc": desc}}``."""

    desc: str
    cls: str = "GenericError"


@dataclass(frozen=True)
class Hang:
    """Never answer this command."""


@dataclass(frozen=True)
class Hangup:
    """Close the connection instead of answering."""


@dataclass(frozen=True)
class Delay:
    """Wait ``seconds``, then answer with ``reply``."""

    seconds: float
    reply: Return | Error | Hangup


Reply = Return | Error | Hang | Hangup | Delay


async def _messages(reader: asyncio.StreamReader) -> AsyncIterator[dict[str, object]]:
    """JSON objects as the client sends them: back to back, newline or not (like QEMU's
    streaming parser)."""
    decoder = json.JSONDecoder()
    buf = ""
    while chunk := await reader.read(65536):
        buf += chunk.decode()
        while buf.strip():
            try:
                obj, end = decoder.raw_decode(buf.lstrip())
            except json.JSONDecodeError:
                break  # incomplete: read more
            buf = buf.lstrip()[end:]
            if isinstance(obj, dict):
                yield obj


class FakeQmpServer:
    """Serve QMP on ``path``; use as ``async with``. ``replies`` maps a command to a reply or
    a list of replies used one per call (the last one repeats)."""

    def __init__(
        self,
        path: str,
        replies: dict[str, Reply | list[Reply]] | None = None,
        *,
        greeting: dict[str, object] | bytes | None = GREETING,
    ) -> None:
        self.path = path
        self.replies: dict[str, Reply | list[Reply]] = dict(replies or {})
        self.greeting = greeting
        self.received: list[dict[str, object]] = []
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_unix_server(self._serve, path=self.path)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Close the listener and every connection; remove the socket file."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._conns):
            writer.close()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def commands(self) -> list[str]:
        """Names of the commands received, in order."""
        return [str(msg.get("execute")) for msg in self.received]

    def _next_reply(self, command: str) -> Reply:
        script = self.replies.get(command)
        if script is None:
            if command == "qmp_capabilities":
                return Return()
            return Error(f"The command {command} has not been found", "CommandNotFound")
        if isinstance(script, list):
            return script.pop(0) if len(script) > 1 else script[0]
        return script

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        try:
            if isinstance(self.greeting, bytes):
                writer.write(self.greeting)
            elif self.greeting is not None:
                writer.write(json.dumps(self.greeting).encode() + b"\r\n")
            await writer.drain()
            negotiated = False
            async for msg in _messages(reader):
                self.received.append(msg)
                command = str(msg.get("execute"))
                reply = self._next_reply(command)
                if not negotiated and command != "qmp_capabilities":
                    reply = Error("Expecting capabilities negotiation", "CommandNotFound")
                negotiated = negotiated or (
                    command == "qmp_capabilities" and isinstance(reply, Return)
                )
                if isinstance(reply, Delay):
                    await asyncio.sleep(reply.seconds)
                    reply = reply.reply
                if isinstance(reply, Hangup):
                    return
                if isinstance(reply, Hang):
                    continue
                body: dict[str, object] = (
                    {"return": reply.value}
                    if isinstance(reply, Return)
                    else {"error": {"class": reply.cls, "desc": reply.desc}}
                )
                if "id" in msg:
                    body["id"] = msg["id"]
                writer.write(json.dumps(body).encode() + b"\r\n")
                await writer.drain()
        except (ConnectionError, UnicodeDecodeError):
            pass
        finally:
            self._conns.discard(writer)
            writer.close()
