"""The API's one secret: a bearer token, and the dashboard's session cookie derived from it.

Owns where the token comes from (``<state dir>/api-token``, created at first start with mode
0600, or a ``--token-file`` of the operator's), how a request proves it knows the token (the
``Authorization: Bearer`` header, or the dashboard's session cookie) and the cookie's format.
The token never appears in a log line, an error message or a response.

The session cookie is stateless: ``<expiry>.<HMAC-SHA256(token, "session:" + expiry)>``, so
several ``serve`` processes sharing a token accept each other's cookies and a restart does not
log the operator out; changing the token invalidates every cookie. Form posts of the dashboard
carry a CSRF field derived the same way from the cookie (the cookie is also ``SameSite=Strict``).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import stat
import time
from pathlib import Path

from freezeframe.errors import UsageError

__all__ = [
    "SESSION_COOKIE",
    "SESSION_SECONDS",
    "TOKEN_FILE_NAME",
    "Authenticator",
    "load_or_create_token",
]

#: File name of the generated token in the state directory.
TOKEN_FILE_NAME = "api-token"  # noqa: S105 - a file name, not a secret
#: Name of the dashboard's session cookie.
SESSION_COOKIE = "ff_session"
#: Lifetime of a dashboard session.
SESSION_SECONDS = 12 * 3600

_MIN_TOKEN_LEN = 16


def load_or_create_token(state_dir: Path, token_file: Path | None = None) -> tuple[str, Path]:
    """The API token and the file it came from.

    With ``token_file``: read it (it must exist, hold at least 16 characters on its first line
    and be readable by its owner only). Without: ``state_dir/api-token``, created with mode
    0600 (a random 256-bit token) when missing; created exclusively, so two servers starting at
    once agree on one token.

    Raises:
        UsageError: the file is missing, unreadable, too short, or readable by others.
    """
    if token_file is not None:
        return _read_token(token_file), token_file
    path = state_dir / TOKEN_FILE_NAME
    state_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, (secrets.token_urlsafe(32) + "\n").encode())
        finally:
            os.close(fd)
    return _read_token(path), path


def _read_token(path: Path) -> str:
    try:
        st = os.stat(path)
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(
            f"token file {path} does not exist",
            hint="write a token of at least 16 characters into it (mode 0600), or leave "
            "--token-file out to have one generated in the state directory",
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read token file {path}: {exc}") from exc
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise UsageError(
            f"token file {path} is readable by others (mode {stat.S_IMODE(st.st_mode):04o})",
            hint=f"chmod 600 {path}",
        )
    lines = text.splitlines()
    token = lines[0].strip() if lines else ""
    if len(token) < _MIN_TOKEN_LEN:
        raise UsageError(
            f"token file {path} holds no token of at least {_MIN_TOKEN_LEN} characters",
            hint="e.g. `python3 -c 'import secrets; print(secrets.token_urlsafe(32))' > FILE`",
        )
    return token


class Authenticator:
    """Checks bearer tokens and dashboard sessions against one token."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    def __repr__(self) -> str:  # never show the secret
        return "Authenticator(<token>)"

    def bearer_ok(self, header: str | None) -> bool:
        """True if ``header`` (an ``Authorization`` value) is ``Bearer <the token>``."""
        if not header:
            return False
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(value.strip().encode(), self._token)

    def token_ok(self, candidate: str) -> bool:
        """True if ``candidate`` (typed into the login form) is the token."""
        return hmac.compare_digest(candidate.strip().encode(), self._token)

    def _mac(self, what: str) -> str:
        return hmac.new(self._token, what.encode(), hashlib.sha256).hexdigest()

    def new_session(self, now: float | None = None) -> str:
        """A session cookie value valid for :data:`SESSION_SECONDS`."""
        expiry = int((now if now is not None else time.time()) + SESSION_SECONDS)
        return f"{expiry}.{self._mac(f'session:{expiry}')}"

    def session_ok(self, cookie: str | None, now: float | None = None) -> bool:
        """True if ``cookie`` is a session of this token that has not expired."""
        if not cookie:
            return False
        expiry, _, mac = cookie.partition(".")
        if not expiry.isdigit():
            return False
        if int(expiry) < (now if now is not None else time.time()):
            return False
        return hmac.compare_digest(mac.encode(), self._mac(f"session:{expiry}").encode())

    def csrf_for(self, cookie: str) -> str:
        """The CSRF value the dashboard's forms carry for session ``cookie``."""
        return self._mac(f"csrf:{cookie}")

    def csrf_ok(self, cookie: str | None, value: str | None) -> bool:
        if not cookie or not value:
            return False
        return hmac.compare_digest(value.encode(), self.csrf_for(cookie).encode())
