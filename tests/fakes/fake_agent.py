"""A fake QEMU guest agent speaking the real wire protocol on a real unix socket.

Owns :class:`FakeAgent`, for unit tests of the agent client and error-path tests of the engine.
It frames like qemu-ga 7.2 (measured): a ``0xFF`` byte from the client resets the parser and,
like 7.2, produces a ``JSON parse error, stray '\\xff'`` error reply; ``guest-sync-delimited``
is answered with ``0xFF`` + ``{"return": id}``; every other reply is one JSON object per line.
Commands are handled one at a time per connection, in order, like the real agent. Input keeps
arriving while a command runs (in a real guest it queues in the virtio-serial buffers), and
what arrived is still processed after the client hung up; replies to a client that is gone are
dropped (:attr:`FakeAgent.dropped_replies`), the state changes still happen. So a freeze that
is still running when the client writes sync + thaw and disconnects ends thawed, like qemu-ga.

State machine: freeze / freeze-list / thaw / status over the scripted filesystems (``fs``), with
the real "frozen" rules (only :data:`FREEZE_ALLOWED` commands run while frozen; the others get
``CommandNotFound: Command X has been disabled: the agent is in frozen state``), guest files for
``guest-file-*`` and scripted programs for ``guest-exec``/``guest-exec-status``.

Scripted misbehaviour per command with :meth:`FakeAgent.behave`::

    async with FakeAgent(tmp_path / "qga.sock", fs=[FakeFs("/"), FakeFs("/data", "xfs")]) as fake:
        fake.behave("guest-fsfreeze-freeze", silent=True)      # froze, but never answers
        fake.behave("guest-fsfreeze-thaw", delay=0.3, times=1)  # slow once
        fake.behave("guest-sync-delimited", stale=2)             # two old sync ids first
        ...
        assert fake.commands == ["guest-ping", "guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]

``fake.received`` records every command (sync included) with its arguments, in arrival order;
``fake.commands`` the names without the sync commands.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Self

__all__ = ["FREEZE_ALLOWED", "Behaviour", "FakeAgent", "FakeExec", "FakeFs"]

#: Commands qemu-ga runs while frozen.
FREEZE_ALLOWED: Final = frozenset(
    {
        "guest-ping",
        "guest-info",
        "guest-sync",
        "guest-sync-delimited",
        "guest-fsfreeze-status",
        "guest-fsfreeze-thaw",
    }
)
_SYNC: Final = frozenset({"guest-sync", "guest-sync-delimited"})
_STRAY_FF: Final = (
    b'{"error": {"class": "GenericError", "desc": "JSON parse error, stray \'\\uFFFD\'"}}\n'
)
_UNSET: Final[Any] = object()


@dataclass
class Behaviour:
    """How the fake answers one command (see :meth:`FakeAgent.behave`).

    Reply (first match wins): ``hang`` (stop processing this connection until
    :meth:`FakeAgent.release`; input still queues up; this command gets no reply),
    ``silent`` (no reply, the next command is served),
    ``error=(class, desc)``, ``raw`` bytes sent as they are, ``invalid_json``, ``oversize=N``
    (a valid JSON line of about N bytes), ``returns`` (this ``return`` value instead of the
    real one, e.g. wrong types), else the normal reply. ``delay`` seconds pass before the
    command runs (commands behind it wait, like the real agent). ``stale=N`` (sync only): N
    sync replies with other ids first. ``effect``: whether the command still changes the
    state (freeze, thaw, file, exec); default True, except with ``error``/``hang``.
    ``times``: applies to the next N calls of that command, then the normal behaviour returns.
    """

    returns: Any = _UNSET
    error: tuple[str, str] | None = None
    silent: bool = False
    hang: bool = False
    delay: float = 0.0
    raw: bytes | None = None
    invalid_json: bool = False
    oversize: int | None = None
    stale: int = 0
    effect: bool | None = None
    times: int | None = None


@dataclass
class FakeFs:
    """One guest filesystem. ``freezable=False`` acts like vfat: skipped silently by freeze.
    ``pci=None`` reports the address qemu-ga uses when it cannot find one (all -1)."""

    mountpoint: str
    fstype: str = "ext4"
    name: str = "vda"
    dev: str | None = None  # default /dev/<name>
    bus_type: str = "virtio"
    pci: tuple[int, int, int, int] | None = (0, 0, 4, 0)
    serial: str | None = None
    freezable: bool = True
    total_bytes: int = 1 << 30
    used_bytes: int = 1 << 20

    def to_json(self) -> dict[str, Any]:
        domain, bus, slot, function = self.pci or (-1, -1, -1, -1)
        disk: dict[str, Any] = {
            "pci-controller": {"domain": domain, "bus": bus, "slot": slot, "function": function},
            "bus-type": self.bus_type,
            "bus": 0,
            "target": 0,
            "unit": 0,
            "dev": self.dev or f"/dev/{self.name}",
        }
        if self.serial is not None:
            disk["serial"] = self.serial
        return {
            "name": self.name,
            "mountpoint": self.mountpoint,
            "type": self.fstype,
            "disk": [disk],
            "used-bytes": self.used_bytes,
            "total-bytes": self.total_bytes,
        }


@dataclass
class FakeExec:
    """A program the guest can run: ``running_polls`` status polls say "not exited" first."""

    exitcode: int | None = 0
    signal: int | None = None
    stdout: bytes = b""
    stderr: bytes = b""
    running_polls: int = 0


@dataclass
class _Proc:
    prog: FakeExec
    capture: bool
    polls_left: int
    argv: list[str] = field(default_factory=list)


class _Conn:
    """One client connection: input received and not parsed yet, and whether the client is
    still there to get replies."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.inbox = bytearray()
        self.eof = False
        self.more = asyncio.Event()
        self.gone = False


class _Error(Exception):
    def __init__(self, qga_class: str, desc: str) -> None:
        super().__init__(desc)
        self.qga_class = qga_class
        self.desc = desc


class FakeAgent:
    """An asyncio unix-socket server that behaves like qemu-ga 7.2. Use as ``async with``."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fs: Iterable[FakeFs] = (FakeFs("/"),),
        files: dict[str, bytes] | None = None,
        execs: dict[str, FakeExec] | None = None,
        version: str = "7.2.22",
        stray_ff_error: bool = True,
        disabled: Iterable[str] = (),
    ) -> None:
        self.path = str(path)
        if len(os.fsencode(self.path)) > 107:
            raise ValueError(f"unix socket path too long: {self.path}")
        self.fs: list[FakeFs] = list(fs)
        self.files: dict[str, bytes] = dict(files or {})
        self.execs: dict[str, FakeExec] = dict(execs or {})
        self.version = version
        self.stray_ff_error = stray_ff_error
        #: Commands reported disabled by guest-info and refused (like ``--blacklist``).
        self.disabled: set[str] = set(disabled)
        #: Every command received, in order: (name, arguments).
        self.received: list[tuple[str, dict[str, Any]]] = []
        #: Mountpoints frozen right now.
        self.frozen_mounts: list[str] = []
        self.frozen = False
        self.connections = 0
        #: Replies not delivered because the client had closed its end.
        self.dropped_replies = 0
        self.exec_log: list[list[str]] = []
        self._behaviours: dict[str, Behaviour] = {}
        self._handles: dict[int, list[Any]] = {}  # handle -> [path, offset]
        self._next_handle = 1000
        self._procs: dict[int, _Proc] = {}
        self._next_pid = 4000
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._release = asyncio.Event()
        self._received_event = asyncio.Event()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        _unlink(self.path)
        self._server = await asyncio.start_unix_server(self._serve, path=self.path)

    async def stop(self) -> None:
        """Close the server and every connection; remove the socket file."""
        self.release()
        if self._server is not None:
            self._server.close()
        await self.disconnect()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        _unlink(self.path)

    async def disconnect(self) -> None:
        """Drop the current client connections (the server keeps listening)."""
        for w in list(self._writers):
            w.close()
        tasks = list(self._conns)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await t

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ scripting

    def behave(self, command: str, **kwargs: Any) -> Behaviour:
        """Script how ``command`` is answered (see :class:`Behaviour`); no kwargs = normal."""
        b = Behaviour(**kwargs)
        if kwargs:
            self._behaviours[command] = b
        else:
            self._behaviours.pop(command, None)
        return b

    def reset(self) -> None:
        """Forget every scripted behaviour."""
        self._behaviours.clear()

    def release(self) -> None:
        """Let connections stuck on a ``hang`` behaviour go on (their command gets no reply)."""
        self._release.set()
        self._release = asyncio.Event()

    @property
    def commands(self) -> list[str]:
        """Names of the commands received, in order, without guest-sync(-delimited)."""
        return [name for name, _ in self.received if name not in _SYNC]

    def count(self, command: str) -> int:
        return sum(1 for name, _ in self.received if name == command)

    async def wait_for(self, command: str, n: int = 1, timeout: float = 5.0) -> None:
        """Wait until ``command`` has been received ``n`` times."""
        async with asyncio.timeout(timeout):
            while self.count(command) < n:
                self._received_event.clear()
                await self._received_event.wait()

    # ------------------------------------------------------------------ wire

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        self._writers.add(writer)
        self.connections += 1
        conn = _Conn(writer)
        pump = asyncio.create_task(self._pump(reader, conn))
        try:
            await self._loop(conn)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
            self._conns.discard(task)
            self._writers.discard(writer)
            writer.close()

    async def _pump(self, reader: asyncio.StreamReader, conn: _Conn) -> None:
        """Move input into ``conn.inbox`` as it arrives, whatever the command loop is doing."""
        try:
            while data := await reader.read(65536):
                conn.inbox += data
                conn.more.set()
        except ConnectionError:
            pass
        finally:
            conn.eof = True
            conn.more.set()

    async def _next(self, conn: _Conn) -> bytes:
        """The input received so far (waiting for some), or b"" once it is all consumed and
        the client closed its end."""
        while not conn.inbox:
            if conn.eof:
                return b""
            conn.more.clear()
            await conn.more.wait()
        data = bytes(conn.inbox)
        conn.inbox.clear()
        return data

    async def _loop(self, conn: _Conn) -> None:
        decoder = json.JSONDecoder()
        buf = b""
        while True:
            data = await self._next(conn)
            if not data:
                return
            buf += data
            while True:
                buf = buf.lstrip(b" \t\r\n")
                if not buf:
                    break
                if buf[0] == 0xFF:  # parser reset; qemu-ga 7.2 complains about it first
                    buf = buf[1:]
                    if self.stray_ff_error:
                        await self._write(conn, _STRAY_FF)
                    continue
                ff = buf.find(b"\xff")
                part = buf if ff < 0 else buf[:ff]
                text = part.decode("utf-8", "surrogateescape")
                try:
                    obj, end = decoder.raw_decode(text)
                except json.JSONDecodeError:
                    if ff >= 0:  # a partial value cut short by a reset byte: dropped
                        buf = buf[ff:]
                        continue
                    nl = part.find(b"\n")
                    if nl < 0:
                        break  # incomplete: wait for more
                    buf = buf[nl + 1 :]
                    await self._reply_error(conn, "GenericError", "JSON parse error")
                    continue
                buf = buf[len(text[:end].encode("utf-8", "surrogateescape")) :]
                await self._dispatch(obj, conn)

    async def _write(self, conn: _Conn, data: bytes) -> None:
        if not conn.gone:
            try:
                conn.writer.write(data)
                await conn.writer.drain()
                return
            except ConnectionError:
                conn.gone = True  # like QEMU with no client on the socket: output is dropped
        self.dropped_replies += 1

    async def _reply(self, conn: _Conn, value: Any, *, delim: bool = False) -> None:
        data = json.dumps({"return": value}).encode() + b"\n"
        await self._write(conn, (b"\xff" if delim else b"") + data)

    async def _reply_error(self, conn: _Conn, qga_class: str, desc: str) -> None:
        data = json.dumps({"error": {"class": qga_class, "desc": desc}}).encode() + b"\n"
        await self._write(conn, data)

    def _take(self, command: str) -> Behaviour | None:
        b = self._behaviours.get(command)
        if b is None:
            return None
        if b.times is not None:
            b.times -= 1
            if b.times <= 0:
                del self._behaviours[command]
        return b

    async def _dispatch(self, obj: Any, conn: _Conn) -> None:
        if not isinstance(obj, dict):
            await self._reply_error(conn, "GenericError", "QMP input must be a JSON object")
            return
        name = obj.get("execute")
        if not isinstance(name, str):
            await self._reply_error(conn, "GenericError", "QMP input lacks member 'execute'")
            return
        args = obj.get("arguments") or {}
        self.received.append((name, dict(args) if isinstance(args, dict) else {}))
        self._received_event.set()
        b = self._take(name)
        if b is not None and b.hang:
            await self._release.wait()
            return
        if b is not None and b.delay:
            await asyncio.sleep(b.delay)
        effect = b is None or (b.effect if b.effect is not None else b.error is None)
        result: Any = None
        error: _Error | None = None
        if effect:
            try:
                result = self._run(name, args if isinstance(args, dict) else {})
            except _Error as exc:
                error = exc
        if b is not None:
            if b.silent:
                return
            if b.error is not None:
                await self._reply_error(conn, *b.error)
                return
            if b.raw is not None:
                await self._write(conn, b.raw)
                return
            if b.invalid_json:
                await self._write(conn, b'{"return": {"count": 1,, ]\n')
                return
            if b.oversize is not None:
                pad = max(0, b.oversize - 16)
                await self._write(conn, b'{"return": "' + b"x" * pad + b'"}\n')
                return
            if b.returns is not _UNSET:
                await self._reply(conn, b.returns, delim=name == "guest-sync-delimited")
                return
        if error is not None:
            await self._reply_error(conn, error.qga_class, error.desc)
            return
        if name == "guest-sync-delimited":
            for _ in range(b.stale if b is not None else 0):
                await self._reply(conn, random.randrange(1 << 40), delim=True)
            await self._reply(conn, result, delim=True)
            return
        await self._reply(conn, result)

    # ------------------------------------------------------------------ commands

    def _run(self, name: str, args: dict[str, Any]) -> Any:
        handler = _HANDLERS.get(name)
        if handler is None:
            raise _Error("CommandNotFound", f"The command {name} has not been found")
        if name in self.disabled or (self.frozen and name not in FREEZE_ALLOWED):
            reason = ": the agent is in frozen state" if self.frozen else ""
            raise _Error("CommandNotFound", f"Command {name} has been disabled{reason}")
        return handler(self, args)

    def _sync(self, args: dict[str, Any]) -> Any:
        if not isinstance(args.get("id"), int):
            raise _Error("GenericError", "Parameter 'id' is missing")
        return args["id"]

    def _ping(self, args: dict[str, Any]) -> Any:
        return {}

    def _info(self, args: dict[str, Any]) -> Any:
        cmds = [
            {
                "name": n,
                "enabled": n not in self.disabled and (not self.frozen or n in FREEZE_ALLOWED),
                "success-response": True,
            }
            for n in sorted(_HANDLERS)
        ]
        return {"version": self.version, "supported_commands": cmds}

    def _fsinfo(self, args: dict[str, Any]) -> Any:
        return [f.to_json() for f in self.fs]

    def _status(self, args: dict[str, Any]) -> Any:
        return "frozen" if self.frozen else "thawed"

    def _freeze(self, args: dict[str, Any], only: Sequence[str] | None = None) -> Any:
        self.frozen = True  # qemu-ga enters the frozen state even if nothing could be frozen
        self.frozen_mounts = [
            f.mountpoint for f in self.fs if f.freezable and (only is None or f.mountpoint in only)
        ]
        return len(self.frozen_mounts)

    def _freeze_list(self, args: dict[str, Any]) -> Any:
        mps = args.get("mountpoints")
        if mps is not None and not (isinstance(mps, list) and all(isinstance(m, str) for m in mps)):
            raise _Error("GenericError", "Invalid parameter type for 'mountpoints'")
        return self._freeze(args, only=mps)

    def _thaw(self, args: dict[str, Any]) -> Any:
        n = len(self.frozen_mounts)
        self.frozen = False
        self.frozen_mounts = []
        return n

    def _file_open(self, args: dict[str, Any]) -> Any:
        path = args.get("path")
        mode = args.get("mode", "r")
        if not isinstance(path, str) or path not in self.files:
            raise _Error(
                "GenericError",
                f"failed to open file '{path}' (mode: '{mode}'): No such file or directory",
            )
        handle = self._next_handle
        self._next_handle += 1
        self._handles[handle] = [path, 0]
        return handle

    def _handle(self, args: dict[str, Any]) -> list[Any]:
        h = args.get("handle")
        if not isinstance(h, int) or h not in self._handles:
            raise _Error("GenericError", f"handle '{h}' has not been found")
        return self._handles[h]

    def _file_read(self, args: dict[str, Any]) -> Any:
        entry = self._handle(args)
        count = args.get("count", 4096)
        if not isinstance(count, int) or count < 0:
            raise _Error("GenericError", "value '-1' is invalid for argument count")
        data = self.files[entry[0]][entry[1] : entry[1] + count]
        entry[1] += len(data)
        return {
            "count": len(data),
            "buf-b64": base64.b64encode(data).decode(),
            "eof": len(data) < count,
        }

    def _file_seek(self, args: dict[str, Any]) -> Any:
        entry = self._handle(args)
        offset, whence = args.get("offset"), args.get("whence")
        base = {"set": 0, "cur": entry[1], "end": len(self.files[entry[0]])}.get(str(whence))
        if not isinstance(offset, int) or base is None or base + offset < 0:
            raise _Error("GenericError", "error seeking file: Invalid argument")
        entry[1] = base + offset
        return {"position": entry[1], "eof": entry[1] >= len(self.files[entry[0]])}

    def _file_close(self, args: dict[str, Any]) -> Any:
        self._handle(args)
        del self._handles[args["handle"]]
        return {}

    @property
    def open_handles(self) -> list[int]:
        """Guest file handles opened and not closed yet."""
        return sorted(self._handles)

    def _exec(self, args: dict[str, Any]) -> Any:
        path = args.get("path")
        argv = [str(path), *[str(a) for a in args.get("arg") or []]]
        prog = self.execs.get(path) if isinstance(path, str) else None
        if prog is None:
            raise _Error(
                "GenericError",
                "Guest agent command failed, error was 'Failed to execute child process "
                f"\u201c{path}\u201d (No such file or directory)'",
            )
        self.exec_log.append(argv)
        pid = self._next_pid
        self._next_pid += 1
        self._procs[pid] = _Proc(
            prog, bool(args.get("capture-output", False)), prog.running_polls, argv
        )
        return {"pid": pid}

    def _exec_status(self, args: dict[str, Any]) -> Any:
        pid = args.get("pid")
        proc = self._procs.get(pid) if isinstance(pid, int) else None
        if proc is None:
            raise _Error("GenericError", "Invalid parameter 'pid'")
        if proc.polls_left > 0:
            proc.polls_left -= 1
            return {"exited": False}
        del self._procs[pid]  # type: ignore[arg-type]
        st: dict[str, Any] = {"exited": True}
        if proc.prog.signal is not None:
            st["signal"] = proc.prog.signal
        else:
            st["exitcode"] = proc.prog.exitcode
        if proc.capture:
            st["out-data"] = base64.b64encode(proc.prog.stdout).decode()
            st["err-data"] = base64.b64encode(proc.prog.stderr).decode()
            st["out-truncated"] = False
            st["err-truncated"] = False
        return st


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


_HANDLERS: Final = {
    "guest-sync": FakeAgent._sync,
    "guest-sync-delimited": FakeAgent._sync,
    "guest-ping": FakeAgent._ping,
    "guest-info": FakeAgent._info,
    "guest-get-fsinfo": FakeAgent._fsinfo,
    "guest-fsfreeze-status": FakeAgent._status,
    "guest-fsfreeze-freeze": FakeAgent._freeze,
    "guest-fsfreeze-freeze-list": FakeAgent._freeze_list,
    "guest-fsfreeze-thaw": FakeAgent._thaw,
    "guest-file-open": FakeAgent._file_open,
    "guest-file-read": FakeAgent._file_read,
    "guest-file-seek": FakeAgent._file_seek,
    "guest-file-close": FakeAgent._file_close,
    "guest-exec": FakeAgent._exec,
    "guest-exec-status": FakeAgent._exec_status,
}
