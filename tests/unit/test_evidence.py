"""Choosing the agent's log lines that cover the freeze window."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

from freezeframe.engine.snapshot import select_window_lines
from freezeframe.engine.timeline import Timeline

# An excerpt of a real qemu-ga 7.2 --verbose log around a freeze (lab VM, 2026-11-26).
LOG = """\
1795695720.729220: debug: read data, count: 60, data: {"execute": "guest-exec-status"}
1795695720.730191: debug: sending data, count: 44
1795695720.733805: debug: read data, count: 37, data: \ufffd{"execute": "guest-fsfreeze-freeze"}
1795695720.733949: debug: process_event: called
1795695720.735340: debug: disabling command: guest-get-time
1795695720.735918: warning: disabling logging due to filesystem freeze
1795695720.827446: warning: logging re-enabled due to filesystem unfreeze
1795695720.827637: debug: enabling command: guest-get-time
1795695720.828000: debug: sending data, count: 14
1795695720.829000: debug: read data, count: 37, data: {"execute": "guest-fsfreeze-status"}
1795695799.000000: debug: read data, count: 26, data: {"execute": "guest-ping"}
"""


def _timeline(freeze: float, thaw: float) -> Timeline:
    tl = Timeline()
    a = tl.mark("freeze_sent")
    b = tl.mark("thaw_sent")
    tl._events[0] = replace(a, t=datetime.fromtimestamp(freeze, UTC))
    tl._events[1] = replace(b, t=datetime.fromtimestamp(thaw, UTC))
    return tl


EXPECTED = [
    'read data, count: 37, data: ?{"execute": "guest-fsfreeze-freeze"}',
    "disabling logging due to filesystem freeze",
    "logging re-enabled due to filesystem unfreeze",
    "sending data, count: 14",
]


def test_window_from_freeze_request_to_thaw_reply_without_chatter() -> None:
    lines = select_window_lines(LOG, _timeline(1795695720.7335, 1795695720.8265))
    assert [ln.split(": ", 2)[2] for ln in lines] == EXPECTED


def test_guest_clock_off_by_a_second_still_finds_the_window() -> None:
    lines = select_window_lines(LOG, _timeline(1795695721.6, 1795695721.7))
    assert [ln.split(": ", 2)[2] for ln in lines] == EXPECTED


def test_unrelated_clock_falls_back_to_freeze_lines() -> None:
    lines = select_window_lines(LOG, _timeline(1700000000.0, 1700000000.1))
    assert lines
    assert all("freeze" in ln or "thaw" in ln for ln in lines)


def test_no_freeze_no_evidence() -> None:
    assert select_window_lines(LOG, Timeline()) == ()
