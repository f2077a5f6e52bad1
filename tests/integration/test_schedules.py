"""Retention end to end: a fast schedule (seconds) on a real lab VM (one ext4 disk under the
lab writer, the real qemu-ga) run by a real ``freezeframe serve`` process.

- A schedule whose last run was an hour ago (720 missed slots of 5 s) is run ONCE when the
  server starts, then every 5 s;
- after each run the server prunes by the rules (keep-last 2): at the end the VM's done
  snapshots are exactly the newest two, plus those whose delete was refused -- each refusal
  reported with its code (``snapshot prune --json``: kept, because <code>), never an abort;
- SIGTERM while the schedule runs: the server exits 0, no attempt is left ``running`` and
  the guest is not left frozen (the writer's counter keeps going).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from freezeframe.catalog import Catalog
from tests.api.server import FF, ServeProcess, lab_down

pytestmark = pytest.mark.integration

VM = f"sched{os.getpid() % 100000}"
EVERY_S = 5
KEEP_LAST = 2


def ff(*args: str, timeout: float = 300) -> tuple[int, Any]:
    r = subprocess.run(
        [*FF, *args], env=dict(os.environ), capture_output=True, text=True, timeout=timeout,
        check=False,
    )  # fmt: skip
    out: Any = r.stdout
    if "--json" in args and r.stdout.strip():
        out = json.loads(r.stdout)
    return r.returncode, out if out or "--json" in args else r.stderr


@pytest.fixture(scope="module")
def lab(lab_env: Path) -> Iterator[str]:
    try:
        code, doc = ff(
            "lab", "up", VM, "--disks", "ext4", "--timeout", "300", "--json", timeout=600
        )
        assert code == 0, doc
        yield VM
    finally:
        lab_down(VM)


async def _pretend_last_run(vm: str, at: datetime) -> None:
    cat = await Catalog.open()
    try:
        rec = await cat.get_schedule(vm)
        claimed = await cat.claim_schedule_run(vm, rec.last_run_at, at, "an-old-server")
        assert claimed is not None
        await cat.record_schedule_run(vm, "an-old-server", at, snapshot_id=None, outcome="done")
    finally:
        await cat.close()


def _done(vm: str) -> list[dict[str, Any]]:
    code, doc = ff("snapshot", "list", vm, "--json")
    assert code == 0, doc
    return [s for s in doc if s["status"] == "done"]


def test_fast_schedule_runs_prunes_and_stops_cleanly(lab: str, tmp_path: Path) -> None:
    code, doc = ff(
        "schedule", "set", lab, "--every", f"{EVERY_S}s", "--keep-last", str(KEEP_LAST),
        "--quiesce", "required", "--json",
    )  # fmt: skip
    assert code == 0, doc
    # the last run was an hour ago: 720 slots missed while no server ran
    asyncio.run(_pretend_last_run(lab, datetime.now(UTC) - timedelta(hours=1)))

    t0 = time.monotonic()
    srv = ServeProcess(tmp_path / "serve.log", "--schedule-poll", "0.5")
    try:
        # the missed run, once
        deadline = time.monotonic() + 120
        while "missed" not in srv.output():
            assert time.monotonic() < deadline, srv.output()
            time.sleep(0.2)
        missed = re.search(r"missed (\d+) run\(s\)", srv.output())
        assert missed is not None
        assert 700 <= int(missed.group(1)) <= 720
        # let it run for a while: every run snapshots, then prunes
        time.sleep(6 * EVERY_S)
        with srv.client() as client:
            view = client.get(f"/v1/vms/{lab}/schedule").json()
            listed = client.get("/v1/schedules").json()
            metrics = client.get("/metrics").text
        assert [v["schedule"]["vm"] for v in listed] == [lab]
        elapsed = time.monotonic() - t0
    finally:
        code = srv.stop()
    out = srv.output()
    assert code == 0, out
    assert "freezeframe serve: stopped" in out
    assert out.count("missed ") == 1  # the missed slots ran once, not once per slot

    # how often it ran (the server's own snapshot jobs: the same path as POST, counted in
    # its metrics): once at start, then every EVERY_S at most
    runs = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("freezeframe_snapshots_total{")
    )
    assert 3 <= runs <= elapsed / EVERY_S + 2, (runs, elapsed, out)
    assert view["schedule"]["last_run_at"] is not None
    assert view["every"] == f"{EVERY_S}s"

    # nothing left running, nothing left frozen
    code, snaps = ff("snapshot", "list", lab, "--json")
    assert code == 0
    assert not [s for s in snaps if s["status"] == "running"], snaps
    assert [s for s in snaps if s["status"] == "done"]
    assert all(s["level"] == "filesystem" for s in snaps if s["status"] == "done")
    code, rec_doc = ff("recover", lab, "--json")
    assert code == 0, rec_doc

    # prune keeps exactly what the rules say: the newest KEEP_LAST done snapshots, plus the
    # ones whose delete was refused (reported with their code, never an abort)
    code, report = ff("snapshot", "prune", lab, "--dry-run", "--json")
    assert code == 0, report
    done = _done(lab)
    newest = sorted(done, key=lambda s: (s["created_at"], s["id"]))[-KEEP_LAST:]
    kept_by_rule = {i["id"] for i in report["items"] if i["reason"] == "keep-last"}
    assert kept_by_rule == {s["id"] for s in newest}
    leftovers = {s["id"] for s in done} - kept_by_rule
    code, real = ff("snapshot", "prune", lab, "--json")
    refused = {i["id"]: i["refused"] for i in real["items"] if i["refused"]}
    deleted = {i["id"] for i in real["items"] if i["deleted"]}
    assert code == (20 if refused else 0), real
    assert leftovers == set(refused) | deleted, (leftovers, real)
    assert all(isinstance(c, str) and c for c in refused.values())
    after = {s["id"] for s in _done(lab)}
    assert after == kept_by_rule | set(refused)
    # what the server's own prunes did is on the schedule
    code, listed_cli = ff("schedule", "list", "--json")
    assert code == 0
    last_prune = listed_cli[0]["schedule"]["last_prune"]
    assert last_prune is not None
    assert re.match(r"(deleted \d+, kept \d+|skipped: the server is stopping)", last_prune)
    print(  # the numbers of the report
        f"\nschedule every {EVERY_S}s for {elapsed:.1f}s: {runs} runs; done snapshots now "
        f"{len(after)}; refused {sorted(set(refused.values()))}; last prune: {last_prune}"
    )
    ff("schedule", "remove", lab)
