"""The dashboard in a real browser (Debian's Chromium, driven by Playwright) on a real lab VM:
log in with the token, see the doctor's verdict, press Create snapshot (with the keyboard),
watch the progress, then the level, the verification verdict and the freeze-window chart;
readable on a narrow window. Screenshots are left in the artifacts directory."""

from __future__ import annotations

import re

import pytest

from tests.api.server import ServeProcess
from tests.browser.conftest import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS

pytestmark = pytest.mark.integration


def test_create_snapshot_in_the_dashboard(server: ServeProcess, lab: str) -> None:
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.set_default_timeout(120_000)
            # not logged in: the dashboard sends the browser to its login page
            page.goto(server.url + "/")
            expect(page).to_have_url(re.compile(r"/login"))
            page.get_by_label("API token").fill(server.token)
            page.get_by_role("button", name="Log in").click()
            # the VM list, with the doctor's verdict of each VM
            row = page.locator("tr", has=page.get_by_role("link", name=lab, exact=True))
            expect(row.locator(".doctor-level")).to_have_text("filesystem")
            expect(row.locator(".doctor-fails")).to_have_text("none")
            page.get_by_role("link", name=lab, exact=True).click()
            expect(page.locator("#doctor .doctor-verdict .level")).to_be_visible()
            page.get_by_label("required").check()
            expect(page.get_by_label("verify afterwards")).to_be_checked()
            button = page.get_by_role("button", name="Create snapshot")
            button.focus()
            page.keyboard.press("Enter")  # usable with the keyboard
            # the snapshot's page: live progress, then the result
            expect(page).to_have_url(re.compile(r"/snapshots/[0-9a-f]+$"))
            sid = page.url.rsplit("/", 1)[1]
            expect(page.locator("#steps li").first).to_be_visible()
            steps_seen = page.locator("#steps li").all_inner_texts()
            page.screenshot(path=str(ARTIFACTS / "dashboard-progress.png"), full_page=True)
            expect(page.locator("#progress")).to_have_count(0)  # reloaded with the result
            expect(page.locator("#status")).to_have_text("done")
            expect(page.locator("#level")).to_have_text("filesystem")
            expect(page.locator("#verdict")).to_contain_text("verified-consistent")
            chart = page.locator("#timeline-chart svg.timeline")
            expect(chart).to_be_visible()
            for phase in ("prepare", "freeze", "cut", "thaw"):
                expect(
                    chart.locator("text.lbl", has_text=re.compile(f"^{phase}$")).first
                ).to_be_visible()
            expect(page.locator("#disk-verdicts")).to_contain_text("verified-consistent")
            page.screenshot(path=str(ARTIFACTS / "dashboard-snapshot.png"), full_page=True)
            assert steps_seen, "no progress was shown"
            assert any("started" in s for s in steps_seen), steps_seen
            # a narrow window: nothing wider than the screen (tables scroll in their box)
            page.set_viewport_size({"width": 380, "height": 800})
            page.reload()
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= 380, width
            page.screenshot(path=str(ARTIFACTS / "dashboard-narrow.png"), full_page=True)
            # the snapshot list shows it with its level, window and verdict
            page.set_viewport_size({"width": 1100, "height": 900})
            page.get_by_role("link", name="Snapshots").click()
            row = page.locator("tr", has=page.get_by_role("link", name=sid))
            expect(row).to_contain_text("filesystem")
            expect(row).to_contain_text("verified-consistent")
            expect(row).to_contain_text(" ms")
            expect(row.get_by_role("button", name=f"Verify snapshot {sid}")).to_be_visible()
        finally:
            browser.close()
