"""A database URL's password never reaches a message, ``--json`` or a log line, however
malformed the URL: a bad URL is a UsageError with code ``bad-database-url`` (exit 2)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from tests.unit.conftest import Ff

from freezeframe.catalog import Catalog, redact_url
from freezeframe.errors import UsageError
from freezeframe.service import Config

SECRET = "S3CRETPW"

#: Malformed shapes: no ``:`` after the scheme, a port that is not a number, a port out of
#: range, an unknown query parameter value, the password as a query parameter of a bad URL.
MALFORMED = [
    f"postgresql+psycopg//ff:{SECRET}@h/db",
    f"postgresql+psycopg://ff:{SECRET}@h:abc/db",
    f"postgresql+psycopg://ff:{SECRET}@h:5432x/db",
    f"postgresql+psycopg://ff:{SECRET}@h/db?connect_timeout=abc",
    f"postgresql+psycopg://ff@h:port/db?password={SECRET}",
    f"postgresql+psycopg:ff:{SECRET}@h/db",
]


@pytest.mark.parametrize("url", MALFORMED)
async def test_malformed_url_is_a_usage_error_without_the_password(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(UsageError) as err:
        await Catalog.open(url)
    assert err.value.code == "bad-database-url"
    assert err.value.exit_code == 2
    assert SECRET not in str(err.value)
    assert SECRET not in (err.value.hint or "")
    assert SECRET not in caplog.text


@pytest.mark.parametrize("url", MALFORMED)
def test_cli_json_never_shows_the_password(url: str, ff: Ff) -> None:
    r = ff("--database-url", url, "vm", "list", "--json")
    assert r.returncode == 2, r.stderr
    assert SECRET not in r.stdout
    assert SECRET not in r.stderr
    doc = json.loads(r.stdout)
    assert doc["code"] == "bad-database-url"
    assert "Traceback" not in r.stderr


def test_cli_text_never_shows_the_password(ff: Ff) -> None:
    r = ff("--database-url", MALFORMED[1], "vm", "list")
    assert r.returncode == 2
    assert SECRET not in r.stdout + r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql+psycopg://ff:pw@h:5432/db", "postgresql+psycopg://ff:***@h:5432/db"),
        ("postgresql+psycopg//ff:pw@h/db", "postgresql+psycopg//ff:***@h/db"),
        ("postgresql://ff:p:w@h/db", "postgresql://ff:***@h/db"),
        ("postgresql://ff@h/db?password=pw&x=1", "postgresql://ff@h/db?password=***&x=1"),
        ("postgresql://ff@h/db", "postgresql://ff@h/db"),
        ("sqlite:////var/lib/ff/catalog.sqlite", "sqlite:////var/lib/ff/catalog.sqlite"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_config_repr_hides_the_url(tmp_path: Path) -> None:
    cfg = Config(state_dir=tmp_path, database_url=f"postgresql://ff:{SECRET}@h/db")
    assert SECRET not in repr(cfg)
