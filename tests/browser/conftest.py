"""Fixtures of the browser test: a private FREEZEFRAME_HOME, one lab VM, one ``freezeframe
serve`` process, and Debian's Chromium driven by Playwright (never ``playwright install``: no
browser download). Skipped when Chromium or Playwright is not installed, or QEMU is not.
The home, the VM and the server live for the module, not the session: an idle TCG guest
costs ~10 % of a core for as long as it runs."""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.api.server import ServeProcess, lab_down, lab_up
from tests.integration.libvirt_helpers import private_home

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
QEMU = Path("/usr/bin/qemu-system-x86_64")
#: Where the test leaves its screenshots (FF_ARTIFACTS overrides it).
ARTIFACTS = Path(os.environ.get("FF_ARTIFACTS") or REPO / ".state" / "artifacts")
CHROMIUM_ARGS = [
    "--no-sandbox",  # as root
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    why = None
    if not CHROMIUM.exists():
        why = f"{CHROMIUM} is not installed (apt-get install chromium fonts-dejavu-core)"
    elif importlib.util.find_spec("playwright") is None:
        why = "playwright is not installed (pip install -e '.[browser]')"
    elif not QEMU.exists() or shutil.which("qemu-img") is None:
        why = f"{QEMU} is not installed (apt-get install qemu-system-x86)"
    if why is None:
        return
    for item in items:
        if "tests/browser" in str(item.fspath):
            item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(scope="module")
def browser_home() -> Iterator[Path]:
    with private_home("ffbrowser-", REPO / ".state/cache") as home:
        yield home


@pytest.fixture(scope="module")
def lab(browser_home: Path) -> Iterator[str]:
    name = f"web{os.getpid() % 100000}"
    try:
        lab_up(name)
        yield name
    finally:
        lab_down(name)


@pytest.fixture(scope="module")
def server(lab: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    srv = ServeProcess(tmp_path_factory.mktemp("serve") / "serve.log")
    try:
        yield srv
    finally:
        assert srv.stop() == 0, srv.output()
