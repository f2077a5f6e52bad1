"""Bad ``--check`` input is refused with exit 2 before anything is frozen, cut or read."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from tests.unit.conftest import Ff


@pytest.fixture
def ff(ff: Ff, tmp_path: Path) -> Ff:
    # a registered VM whose QMP socket does not exist: a snapshot attempt fails and is recorded
    r = ff("vm", "add", "web1", "--qmp", str(tmp_path / "qmp.sock"))
    assert r.returncode == 0, r.stderr
    return ff


def error_of(r: subprocess.CompletedProcess[str]) -> dict[str, object]:
    doc = json.loads(r.stdout)
    assert isinstance(doc, dict)
    return doc


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--verify", "--check", "no-such-program-ff"), "not found on this host's PATH"),
        (("--verify", "--check", 'sh -c "unterminated'), "cannot be parsed"),
        (("--verify", "--check", ""), "empty --check"),
        (("--verify", "--check", "/etc/passwd"), "not an executable file"),
        (("--check", "true"), "checks-need-verify"),
        (("--verify", "--check-timeout", "5"), "check-timeout-needs-checks"),
    ],
)
def test_create_refuses_bad_checks_before_the_snapshot(ff, args, message) -> None:  # type: ignore[no-untyped-def]
    r = ff("snapshot", "create", "web1", *args, "--json")
    assert r.returncode == 2, (r.stdout, r.stderr)
    err = error_of(r)
    assert err["error"] == "UsageError"
    # the code where the service gives one, else the message
    assert message == err["code"] or message in str(err["message"])
    # nothing was attempted: no (failed) snapshot record
    listed = ff("snapshot", "list", "web1", "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == []


@pytest.mark.parametrize(
    ("check", "message"),
    [
        ("no-such-program-ff", "not found on this host's PATH"),
        ('sh -c "unterminated', "cannot be parsed"),
        ("", "empty --check"),
    ],
)
def test_verify_refuses_bad_checks_first(ff, check, message) -> None:  # type: ignore[no-untyped-def]
    # the id is unknown too: the check is judged first, before anything is looked up or read
    r = ff("snapshot", "verify", "0123456789ab", "--check", check, "--json")
    assert r.returncode == 2, (r.stdout, r.stderr)
    err = error_of(r)
    assert err["error"] == "UsageError"
    assert message in str(err["message"])
