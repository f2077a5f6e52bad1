"""The CLI under an operator's hands: text from outside is never taken for markup, signals and
a closed pipe give the Unix exit codes, output to a file is not wrapped, ``vm add/remove``
refuse what cannot work, and ``--json`` holds for option errors too."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from freezeframe.catalog import Catalog
from freezeframe.cli import _common, _render
from freezeframe.engine import CheckStatus, DoctorReport
from freezeframe.engine.doctor import Check
from freezeframe.errors import VerifyError
from freezeframe.models import (
    ConsistencyLevel,
    QuiescePolicy,
    SnapshotDisk,
    SnapshotFilesystem,
    SnapshotRecord,
    SnapshotStatus,
    TimelineEvent,
    VmConfig,
)

FF = [sys.executable, "-m", "freezeframe.cli.main"]
MARKUP = "qemu-img: Could not open [/tmp/x/disk0.qcow2] [bold]"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("FREEZEFRAME_HOME", str(home))
    monkeypatch.delenv("FREEZEFRAME_DATABASE_URL", raising=False)
    return home


def ff(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FF, *args], capture_output=True, text=True, timeout=60, check=False)


def register(cfg: VmConfig) -> None:
    async def go() -> None:
        async with await Catalog.open() as cat:
            await cat.add_vm(cfg)

    asyncio.run(go())


@pytest.fixture
def unix_socket(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "s.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    try:
        yield path
    finally:
        s.close()


# ------------------------------------------------------------------ 1. markup


def test_error_text_with_brackets_is_printed_literally(home: Path) -> None:
    r = ff("snapshot", "show", "[bold]x[/tmp/x]")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "'[bold]x[/tmp/x]'" in r.stderr


def test_die_escapes_message_and_hint(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ei:
        _common.die(VerifyError(MARKUP, hint="see [/var/log] [red]"))
    assert ei.value.code == 11
    err = capsys.readouterr().err
    assert MARKUP in err
    assert "see [/var/log] [red]" in err


def test_records_and_reports_print_outside_text_literally(
    capsys: pytest.CaptureFixture[str],
) -> None:
    now = datetime.now(UTC)
    rec = SnapshotRecord(
        id="s1",
        vm="web[1]",
        created_at=now,
        status=SnapshotStatus.FAILED,
        policy=QuiescePolicy.PREFERRED,
        level=ConsistencyLevel.NONE,
        level_reason="reason [/r]",
        error=MARKUP,
        disks=(SnapshotDisk("disk0", "n0", "/img/[a]/d.qcow2", "qcow2", "/img/[/b]"),),
        filesystems=(SnapshotFilesystem("/mnt/[/m]", "ext4", "disk0", False, "why [/w]"),),
        timeline=(TimelineEvent("failed", now, 1, "detail [/d]"),),
        evidence=("log [/e]",),
    )
    _render.print_record(rec)
    rep = DoctorReport(
        "web[1]",
        QuiescePolicy.PREFERRED,
        (Check("hypervisor", CheckStatus.FAIL, "cannot [/c]", "fix [/f]"),),
        ConsistencyLevel.NONE,
        "verdict [/v]",
    )
    _render.print_doctor(rep)
    out = capsys.readouterr().out
    for text in ("web[1]", "reason [/r]", MARKUP, "/img/[a]/d.qcow2", "/img/[/b]", "/mnt/[/m]",
                 "why [/w]", "detail [/d]", "log [/e]", "cannot [/c]", "fix [/f]",
                 "verdict [/v]"):  # fmt: skip
        assert text in out, text


# ------------------------------------------------------------------ 2. exit codes


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signals_exit_128_plus_the_signal(sig: signal.Signals, code: int) -> None:
    cleaned = []

    async def work() -> None:
        os.kill(os.getpid(), sig)
        try:
            await asyncio.sleep(30)
        finally:
            cleaned.append(True)

    with pytest.raises(SystemExit) as ei:
        _common.run(work)
    assert ei.value.code == code
    assert cleaned == [True]  # the work was cancelled, its cleanup ran


@pytest.mark.parametrize("args", [("vm", "list"), ("vm", "list", "--json"), ("snapshot", "list")])
def test_closed_pipe_exits_141_quietly(home: Path, args: tuple[str, ...]) -> None:
    register(VmConfig(name="web1", qmp_path=str(home / "missing.sock")))
    assert ff("snapshot", "create", "web1").returncode == 10  # one (failed) record to list
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first write: `| head -0`
    try:
        proc = subprocess.run(
            [*FF, *args], stdout=w, stderr=subprocess.PIPE, text=True, timeout=60, check=False
        )
    finally:
        os.close(w)
    assert proc.returncode == 141
    assert proc.stderr == ""


# ------------------------------------------------------------------ 3. no wrapping


def test_output_to_a_file_is_not_wrapped(home: Path) -> None:
    name = "a-rather-long-virtual-machine-name-" + "x" * 30
    register(VmConfig(name=name, qmp_path=str(home / "missing.sock")))
    r = ff("snapshot", "create", name)
    assert r.returncode == 10
    error = next(line for line in r.stderr.splitlines() if line.startswith("error:"))
    assert error.endswith("missing.sock does not exist"), r.stderr
    lines = ff("snapshot", "list").stdout.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].split() == [
        "ID", "CREATED", "(UTC)", "VM", "STATUS", "LEVEL", "WINDOW", "VERIFIED", "PARENT"
    ]  # fmt: skip
    assert name in lines[1]
    assert lines[1].rstrip().endswith("-")  # the parent column, on the same line


# ------------------------------------------------------------------ 4. vm add


def test_vm_add_checks_its_socket_paths(home: Path, tmp_path: Path, unix_socket: Path) -> None:
    regular = tmp_path / "passwd"
    regular.write_text("root:x:0:0\n")
    r = ff("vm", "add", "a", "--qmp", str(regular))
    assert r.returncode == 2
    assert "not a unix socket" in r.stderr
    r = ff("vm", "add", "a", "--qmp", str(unix_socket), "--qga", str(regular))
    assert r.returncode == 2
    r = ff(
        "vm", "add", "a", "--qmp", str(unix_socket), "--no-agent", "--qga", str(unix_socket),
        "--json",
    )  # fmt: skip
    assert r.returncode == 2
    assert json.loads(r.stdout)["code"] == "qga-without-agent"
    assert json.loads(ff("vm", "list", "--json").stdout) == []  # nothing registered

    r = ff("vm", "add", "later", "--qmp", str(tmp_path / "nonexistent"))
    assert r.returncode == 0, r.stderr
    assert "not there yet: is the VM running?" in r.stderr
    r = ff("vm", "add", "now", "--qmp", str(unix_socket), "--qga", str(unix_socket))
    assert r.returncode == 0, r.stderr
    assert "not there yet" not in r.stderr
    names = [v["name"] for v in json.loads(ff("vm", "list", "--json").stdout)]
    assert names == ["later", "now"]


# ------------------------------------------------------------------ 5. vm remove, list


def test_vm_remove_refuses_a_lab_vm_unless_forced(home: Path) -> None:
    register(VmConfig(name="lab1", qmp_path=str(home / "q.sock"), lab=True))
    r = ff("vm", "remove", "lab1")
    assert r.returncode == 2
    assert "freezeframe lab down lab1 --purge" in r.stderr
    assert len(json.loads(ff("vm", "list", "--json").stdout)) == 1
    assert ff("vm", "remove", "lab1", "--force").returncode == 0
    assert json.loads(ff("vm", "list", "--json").stdout) == []


def test_snapshot_list_of_a_removed_vm_shows_its_records(home: Path) -> None:
    register(VmConfig(name="web1", qmp_path=str(home / "missing.sock")))
    sid = json.loads(ff("snapshot", "create", "web1", "--json").stdout)["snapshot_id"]
    assert ff("vm", "remove", "web1").returncode == 0
    r = ff("snapshot", "list", "web1", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert [rec["id"] for rec in json.loads(r.stdout)] == [sid]
    r = ff("snapshot", "list", "never-was")
    assert r.returncode == 2
    assert "never-was" in r.stderr


# ------------------------------------------------------------------ 6. lab hint


def test_stopped_lab_vm_hint_says_lab_up(home: Path) -> None:
    register(VmConfig(name="lab1", qmp_path=str(home / "gone.sock"), lab=True))
    doc = json.loads(ff("snapshot", "create", "lab1", "--json").stdout)
    assert doc["exit_code"] == 10
    assert "freezeframe lab up lab1" in doc["hint"]
    assert "start QEMU" not in doc["hint"]
    doc = json.loads(ff("doctor", "lab1", "--json").stdout)
    hv = next(c for c in doc["checks"] if c["name"] == "hypervisor")
    assert "freezeframe lab up lab1" in hv["fix"]
    # a VM of the operator's own keeps the QEMU hint
    register(VmConfig(name="own", qmp_path=str(home / "gone.sock")))
    doc = json.loads(ff("snapshot", "create", "own", "--json").stdout)
    assert "start QEMU" in doc["hint"]


# ------------------------------------------------------------------ 7. --json usage errors


@pytest.mark.parametrize(
    "args",
    [
        ("snapshot", "create", "demo", "--quiesce", "bogus", "--json"),
        ("vm", "add", "x", "--json"),  # neither --qmp nor --libvirt
        ("snapshot", "list", "--json", "--no-such-option"),
    ],
)
def test_json_option_errors_are_json(home: Path, args: tuple[str, ...]) -> None:
    r = ff(*args)
    assert r.returncode == 2
    doc = json.loads(r.stdout)
    assert doc["error"] == "UsageError"
    assert doc["exit_code"] == 2
    assert doc["message"]
    assert "hint" in doc  # README: error, message, exit_code, hint (null when none)


def test_json_error_documents_always_carry_a_hint(home: Path) -> None:
    doc = json.loads(ff("snapshot", "list", "--json", "--bogus").stdout)  # no hint for that
    assert doc == {
        "error": "UsageError",
        "code": "invalid-argument",
        "message": doc["message"],
        "exit_code": 2,
        "hint": None,
        "remedy": None,
    }
    doc = json.loads(ff("snapshot", "show", "nope", "--json").stdout)
    assert doc["hint"] == "see `freezeframe snapshot list`"
    doc = json.loads(ff("vm", "add", "x", "--json").stdout)  # neither --qmp nor --libvirt
    assert doc["exit_code"] == 2
    assert doc["hint"] == "one of them, not both"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--json", "--bogus"), "No such option: --bogus"),
        (("--json", "snapshot", "list", "--bogus"), "No such option: --bogus"),
        (("--json",), "--json belongs to a command"),
        (("--json", "vm"), "--json belongs to a command"),
    ],
)
def test_a_json_option_before_the_command_still_gives_json(
    home: Path, args: tuple[str, ...], message: str
) -> None:
    r = ff(*args)
    assert r.returncode == 2
    doc = json.loads(r.stdout)
    assert doc["error"] == "UsageError"
    assert doc["message"].startswith(message)
    assert "No such option: --json" not in doc["message"]


def test_json_before_the_command_is_the_commands_json(home: Path) -> None:
    register(VmConfig(name="web1", qmp_path=str(home / "q.sock")))
    for args in (("--json", "vm", "list"), ("-v", "--json", "vm", "list")):
        r = ff(*args)
        assert r.returncode == 0, r.stdout + r.stderr
        assert [v["name"] for v in json.loads(r.stdout)] == ["web1"]
    r = ff("--database-url", f"sqlite:///{home / 'other.sqlite'}", "--json", "vm", "list")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout) == []


def test_vm_add_replace_refuses_a_lab_vm_unless_forced(home: Path) -> None:
    lab = VmConfig(
        name="lab1",
        qmp_path=str(home / "q.sock"),
        qga_path=str(home / "qga.sock"),
        agent_log_path="/var/log/qemu-ga.log",
        lab=True,
    )
    register(lab)
    r = ff("vm", "add", "lab1", "--qmp", str(home / "q.sock"), "--replace")
    assert r.returncode == 2
    assert "is a lab VM" in r.stderr
    assert "freezeframe lab down lab1 --purge" in r.stderr
    doc = json.loads(ff("vm", "add", "lab1", "--qmp", "/x", "--replace", "--json").stdout)
    assert doc["exit_code"] == 2
    assert doc["code"] == "lab-vm"
    assert doc["remedy"] == {"action": "lab-down", "vm": "lab1", "params": {"purge": "yes"}}
    [kept] = json.loads(ff("vm", "list", "--json").stdout)
    assert (kept["lab"], kept["qga_path"], kept["agent_log_path"]) == (
        True,
        lab.qga_path,
        lab.agent_log_path,
    )
    assert ff("vm", "remove", "lab1").returncode == 2  # still guarded

    r = ff("vm", "add", "lab1", "--qmp", str(home / "q.sock"), "--replace", "--force")
    assert r.returncode == 0, r.stderr
    [own] = json.loads(ff("vm", "list", "--json").stdout)
    assert own["lab"] is False
    # an operator's own VM is replaced without --force, as before
    r = ff("vm", "add", "lab1", "--qmp", str(home / "q2.sock"), "--replace")
    assert r.returncode == 0, r.stderr
