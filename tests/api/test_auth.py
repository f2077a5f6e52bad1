"""The API token file and the session cookie (no server needed)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from freezeframe.api._auth import SESSION_SECONDS, Authenticator, load_or_create_token
from freezeframe.errors import UsageError


def test_token_generated_once_mode_0600(tmp_path: Path) -> None:
    token, path = load_or_create_token(tmp_path / "state")
    assert path == tmp_path / "state" / "api-token"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(token) >= 32
    again, _ = load_or_create_token(tmp_path / "state")
    assert again == token


def test_token_file_of_the_operator(tmp_path: Path) -> None:
    f = tmp_path / "tok"
    f.write_text("s3cret-s3cret-s3cret\n")
    f.chmod(0o600)
    assert load_or_create_token(tmp_path / "state", f) == ("s3cret-s3cret-s3cret", f)
    assert not (tmp_path / "state" / "api-token").exists()


@pytest.mark.parametrize(
    ("content", "mode", "words"),
    [
        ("s3cret-s3cret-s3cret\n", 0o644, "readable by others"),
        ("short\n", 0o600, "at least 16"),
        ("", 0o600, "at least 16"),
    ],
)
def test_bad_token_files_are_refused(tmp_path: Path, content: str, mode: int, words: str) -> None:
    f = tmp_path / "tok"
    f.write_text(content)
    f.chmod(mode)
    with pytest.raises(UsageError) as exc:
        load_or_create_token(tmp_path, f)
    assert words in exc.value.message
    assert content.strip() not in exc.value.message or not content.strip()


def test_missing_token_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        load_or_create_token(tmp_path, tmp_path / "nope")


def test_sessions() -> None:
    a = Authenticator("t" * 20)
    cookie = a.new_session(now=1000.0)
    assert a.session_ok(cookie, now=1001.0)
    assert not a.session_ok(cookie, now=1000.0 + SESSION_SECONDS + 1)  # expired
    assert not Authenticator("u" * 20).session_ok(cookie, now=1001.0)  # another token
    expiry, mac = cookie.split(".")
    assert not a.session_ok(f"{int(expiry) + 99}.{mac}", now=1001.0)  # tampered expiry
    assert not a.session_ok("garbage", now=1001.0)
    assert a.csrf_ok(cookie, a.csrf_for(cookie))
    assert not a.csrf_ok(cookie, a.csrf_for(a.new_session(now=5.0)))
    assert "t" * 20 not in repr(a)


def test_bearer() -> None:
    a = Authenticator("t" * 20)
    assert a.bearer_ok("Bearer " + "t" * 20)
    assert a.bearer_ok("bearer " + "t" * 20)
    assert not a.bearer_ok("Bearer " + "t" * 19)
    assert not a.bearer_ok(None)
    assert not a.bearer_ok("t" * 20)
