"""A real ``freezeframe serve`` process for the integration and browser tests: started on a
free loopback port, its URL read from its own start line, stopped by its PID (SIGTERM, then
SIGKILL if it does not exit in time), and small helpers to read Server-Sent Events and boot a
lab VM through the CLI."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

FF = [sys.executable, "-m", "freezeframe.cli.main"]
_LISTENING = re.compile(r"listening on (http://\S+?)/? ")


class ServeProcess:
    """``freezeframe serve --listen 127.0.0.1:0`` with the environment's FREEZEFRAME_HOME."""

    def __init__(self, log: Path, *extra: str, start_timeout: float = 60.0) -> None:
        self.log = log
        self._log_file = log.open("wb")
        self.proc = subprocess.Popen(
            [*FF, "serve", "--listen", "127.0.0.1:0", *extra],
            env=dict(os.environ),
            stdout=subprocess.DEVNULL,
            stderr=self._log_file,
        )
        deadline = time.monotonic() + start_timeout
        while True:
            m = _LISTENING.search(self.output())
            if m:
                self.url = m.group(1)
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"freezeframe serve did not start:\n{self.output()}")
            time.sleep(0.05)
        home = Path(os.environ["FREEZEFRAME_HOME"])
        self.token = (home / "api-token").read_text().strip()
        self.auth = {"Authorization": f"Bearer {self.token}"}

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def client(self, **kw: Any) -> httpx.Client:
        kw.setdefault("timeout", httpx.Timeout(120.0, connect=10.0))
        return httpx.Client(base_url=self.url, headers=self.auth, **kw)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120.0) -> int:
        """Send ``sig`` and wait for the exit (SIGKILL after ``timeout``); its exit code."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            return self.proc.returncode
        finally:
            self._log_file.close()


def follow_events(
    client: httpx.Client, snapshot_id: str, *, stop_after: int | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """The (event, data) pairs of a snapshot's event stream, to its end (or the first
    ``stop_after`` events, then the connection is dropped)."""
    out: list[tuple[str, dict[str, Any]]] = []
    kind = ""
    with client.stream("GET", f"/v1/snapshots/{snapshot_id}/events") as r:
        assert r.status_code == 200, r.read()
        for line in _lines(r.iter_lines()):
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: ") and kind:
                out.append((kind, json.loads(line[6:])))
                kind = ""
                if stop_after is not None and len(out) >= stop_after:
                    break
    return out


def _lines(it: Iterator[str]) -> Iterator[str]:
    yield from it


def lab_up(name: str, *, timeout: float = 600.0) -> dict[str, Any]:
    """``freezeframe lab up NAME --json`` (ext4 + xfs, the writer running); its document."""
    r = subprocess.run(
        [*FF, "lab", "up", name, "--disks", "ext4,xfs", "--timeout", "300", "--json"],
        env=dict(os.environ), capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    if r.returncode != 0:
        raise RuntimeError(f"lab up {name} failed ({r.returncode}): {r.stdout}\n{r.stderr}")
    doc: dict[str, Any] = json.loads(r.stdout)
    return doc


def lab_down(name: str) -> None:
    """``freezeframe lab down NAME --purge --force`` (never raises)."""
    subprocess.run(
        [*FF, "lab", "down", name, "--purge", "--force"],
        env=dict(os.environ), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
