"""``freezeframe serve``: what the API costs, measured against the CLI on the same lab VM.

Three measurements, each with a ``freezeframe serve`` process of its own:

1. **window** -- the freeze window of snapshots created through the API (``POST``, the event
   stream followed to its end) vs through the CLI (``snapshot create``), alternating on ONE lab
   VM (ext4 + xfs under the writer), quiesce required. Target: median API / CLI <= 1.05 (the API
   adds nothing inside the window).
2. **rss** -- the server's resident memory (``VmRSS`` of its PID) idle, and its peak while 50
   clients follow one snapshot's event stream (sampled every 20 ms). Target <= 150 MB.
3. **list** -- ``GET /v1/snapshots?limit=50`` latency (p50 / p99 over sequential requests on
   one keep-alive connection, client included) with 10,000 records in the catalog: the first
   page, and pages deep in the list (following ``next_cursor``); a page is 50 summaries. For
   scale, ``GET /v1/snapshots/{id}`` (one whole record) on the same server. On SQLite, and on
   PostgreSQL 15 (a throw-away server, :mod:`freezeframe.testing.postgres`) unless
   ``--no-postgres`` or it is not installed: the same records (same template, same count,
   written the same way), one after the other in one run. Target p99 <= 50 ms.

The records are clones of one real snapshot record (taken on a fake VM, so they have its
disks, filesystems and timeline), written through the catalog's own API.

    .venv/bin/python bench/api_bench.py [--runs 10] [--clients 50] [--records 10000]
        [--only window,rss,list] [--no-postgres] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx
from tests.api.server import FF, ServeProcess, follow_events, lab_down, lab_up

from freezeframe.catalog import Catalog
from freezeframe.models import SnapshotStatus
from freezeframe.service import Config, Service
from freezeframe.testing import FakeHost, FakeVm


@contextmanager
def home(prefix: str) -> Iterator[Path]:
    """A private FREEZEFRAME_HOME (0755 under /var/tmp), the shared lab build cache."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    path.chmod(0o755)
    saved = {k: os.environ.get(k) for k in ("FREEZEFRAME_HOME", "FREEZEFRAME_CACHE",
                                            "FREEZEFRAME_DATABASE_URL")}  # fmt: skip
    os.environ["FREEZEFRAME_HOME"] = str(path)
    os.environ.setdefault("FREEZEFRAME_CACHE", str(REPO / ".state" / "cache"))
    os.environ.pop("FREEZEFRAME_DATABASE_URL", None)
    try:
        yield path
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(path, ignore_errors=True)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


# ------------------------------------------------------------------ window + rss


def cli_window(vm: str) -> float:
    r = subprocess.run(
        [*FF, "snapshot", "create", vm, "--quiesce", "required", "--json"],
        env=dict(os.environ), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    if r.returncode != 0:
        raise RuntimeError(f"CLI create failed ({r.returncode}): {r.stderr}")
    rec = json.loads(r.stdout)
    assert rec["level"] == "filesystem", rec
    return float(rec["freeze_window_ms"])


def api_window(c: httpx.Client, vm: str) -> float:
    r = c.post(f"/v1/vms/{vm}/snapshots", json={"quiesce": "required"})
    if r.status_code != 202:
        raise RuntimeError(f"API create failed: {r.status_code} {r.text}")
    events = follow_events(c, r.json()["id"])
    kind, rec = events[-1]
    assert kind == "record", events[-2:]
    assert rec["level"] == "filesystem", rec
    return float(rec["freeze_window_ms"])


async def follow_all(url: str, auth: dict[str, str], sid: str, n: int) -> list[int]:
    """``n`` clients following one snapshot's events to the end; events each one got."""
    limits = httpx.Limits(max_connections=n + 5)
    async with httpx.AsyncClient(base_url=url, headers=auth, timeout=300, limits=limits) as c:

        async def one() -> int:
            count = 0
            async with c.stream("GET", f"/v1/snapshots/{sid}/events") as r:
                async for line in r.aiter_lines():
                    if line.startswith("event: "):
                        count += 1
            return count

        return await asyncio.gather(*(one() for _ in range(n)))


def bench_lab(args: argparse.Namespace, out: dict[str, Any], tmp: Path) -> None:
    vm = f"bench{os.getpid() % 100000}"
    with home("ffapibench-"):
        print(f"lab up {vm} (ext4 + xfs) ...", flush=True)
        lab_up(vm)
        srv = ServeProcess(tmp / "serve-lab.log")
        try:
            with srv.client() as c:
                c.get("/v1/vms")
                time.sleep(1.0)
                if "rss" in args.only:
                    bench_rss(args, out, srv, c, vm)
                if "window" in args.only:
                    bench_window(args, out, c, vm)
        finally:
            code = srv.stop()
            if code != 0:
                print(srv.output(), file=sys.stderr)
            lab_down(vm)


def bench_rss(
    args: argparse.Namespace, out: dict[str, Any], srv: ServeProcess, c: httpx.Client, vm: str
) -> None:
    pid = srv.proc.pid
    idle = rss_mb(pid)
    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(rss_mb(pid))
            time.sleep(0.02)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    r = c.post(f"/v1/vms/{vm}/snapshots", json={"quiesce": "required", "verify": True})
    sid = r.json()["id"]
    counts = asyncio.run(follow_all(srv.url, srv.auth, sid, args.clients))
    stop.set()
    t.join()
    rec = c.get(f"/v1/snapshots/{sid}").json()
    peak = max(samples) if samples else 0.0
    out["rss"] = {
        "idle_mb": round(idle, 1),
        "peak_mb_with_followers": round(peak, 1),
        "followers": args.clients,
        "events_per_follower": sorted(set(counts)),
        "window_ms_of_that_snapshot": rec["freeze_window_ms"],
        "verdict": (rec.get("verification") or {}).get("verdict"),
        "target_mb": 150,
        "pass": peak <= 150,
    }
    print(f"RSS idle {idle:.1f} MB; peak {peak:.1f} MB with {args.clients} SSE followers "
          f"(each got {sorted(set(counts))} events; window {rec['freeze_window_ms']:.1f} ms) "
          f"-> {'PASS' if peak <= 150 else 'MISS'} (<= 150 MB)", flush=True)  # fmt: skip


def bench_window(args: argparse.Namespace, out: dict[str, Any], c: httpx.Client, vm: str) -> None:
    api: list[float] = []
    cli: list[float] = []
    for i in range(args.runs):
        for kind in ("api", "cli") if i % 2 == 0 else ("cli", "api"):
            w = api_window(c, vm) if kind == "api" else cli_window(vm)
            (api if kind == "api" else cli).append(w)
            print(f"  run {i + 1:2d} {kind}: {w:7.1f} ms", flush=True)
    ratio = statistics.median(api) / statistics.median(cli)
    out["window"] = {
        "runs": args.runs,
        "api_median_ms": round(statistics.median(api), 1),
        "cli_median_ms": round(statistics.median(cli), 1),
        "api_ms": api,
        "cli_ms": cli,
        "ratio": round(ratio, 3),
        "target": 1.05,
        "pass": ratio <= 1.05,
    }
    verdict = "PASS" if ratio <= 1.05 else "MISS"
    print(f"freeze window: API median {statistics.median(api):.1f} ms vs CLI "
          f"{statistics.median(cli):.1f} ms ({args.runs} + {args.runs} alternating): ratio "
          f"{ratio:.3f} -> {verdict} (<= 1.05)", flush=True)  # fmt: skip


# ------------------------------------------------------------------ list


async def populate(url: str, state: Path, n: int) -> None:
    """``n`` done records in the catalog at ``url``: clones of one real record of a fake VM."""
    with FakeHost() as host:
        vm = host.add(FakeVm.simple("web1"))
        async with await Service.open(Config(state_dir=state, database_url=url)) as svc:
            cat = await svc.catalog()
            await cat.add_vm(vm.config())
            template = (await svc.create_snapshot("web1")).record
    cat = await Catalog.open(url)
    try:
        t0 = datetime.now(UTC) - timedelta(days=30)
        for i in range(n - 1):
            rec = dataclasses.replace(
                template,
                id=f"{i:012x}",
                created_at=t0 + timedelta(seconds=i * 7),
                status=SnapshotStatus.RUNNING,
                parent_id=None,
            )
            await cat.begin_snapshot(rec)
            await cat.finish_snapshot(dataclasses.replace(rec, status=SnapshotStatus.DONE))
            if (i + 1) % 2000 == 0:
                print(f"  {i + 1} records", flush=True)
    finally:
        await cat.close()


def bench_list_on(
    backend: str, url: str | None, args: argparse.Namespace, out: dict[str, Any], tmp: Path
) -> None:
    with home(f"ffapilist-{backend}-") as state:
        url = url or f"sqlite:///{state / 'catalog.sqlite'}"
        started = time.monotonic()
        asyncio.run(populate(url, state, args.records))
        fill = time.monotonic() - started
        os.environ["FREEZEFRAME_DATABASE_URL"] = url
        srv = ServeProcess(tmp / f"serve-list-{backend}.log")
        try:
            first: list[float] = []
            deep: list[float] = []
            with srv.client() as c:
                for _ in range(20):  # warm up
                    c.get("/v1/snapshots?limit=50")
                for _ in range(args.requests):
                    t = time.perf_counter()
                    r = c.get("/v1/snapshots?limit=50")
                    first.append((time.perf_counter() - t) * 1000)
                    assert r.status_code == 200
                    assert len(r.json()["items"]) == 50
                ids = [d["id"] for d in r.json()["items"]]
                one: list[float] = []
                for i in range(args.requests // 3):
                    t = time.perf_counter()
                    r = c.get(f"/v1/snapshots/{ids[i % len(ids)]}")
                    one.append((time.perf_counter() - t) * 1000)
                    assert r.status_code == 200
                    assert r.json()["timeline"]
                cursor = None
                for _ in range(args.requests):
                    q = "/v1/snapshots?limit=50" + (f"&cursor={cursor}" if cursor else "")
                    t = time.perf_counter()
                    r = c.get(q)
                    deep.append((time.perf_counter() - t) * 1000)
                    assert r.status_code == 200, r.text
                    cursor = r.json()["next_cursor"]
                total = 0
                cur = None
                while True:  # every record reachable by paging
                    q = "/v1/snapshots?limit=1000" + (f"&cursor={cur}" if cur else "")
                    page = c.get(q).json()
                    total += len(page["items"])
                    cur = page["next_cursor"]
                    if not cur:
                        break
            rss = rss_mb(srv.proc.pid)
        finally:
            srv.stop()
    res = {
        "records": total,
        "fill_s": round(fill, 1),
        "first_page_p50_ms": round(pct(first, 50), 2),
        "first_page_p99_ms": round(pct(first, 99), 2),
        "paging_p50_ms": round(pct(deep, 50), 2),
        "paging_p99_ms": round(pct(deep, 99), 2),
        "record_p50_ms": round(pct(one, 50), 2),
        "record_p99_ms": round(pct(one, 99), 2),
        "requests": args.requests,
        "server_rss_mb": round(rss, 1),
        "target_p99_ms": 50,
        "pass": max(pct(first, 99), pct(deep, 99)) <= 50,
    }
    out.setdefault("list", {})[backend] = res
    print(f"GET /v1/snapshots?limit=50 on {backend} with {total} records: first page p50 "
          f"{res['first_page_p50_ms']} ms p99 {res['first_page_p99_ms']} ms; paging p50 "
          f"{res['paging_p50_ms']} ms p99 {res['paging_p99_ms']} ms ({args.requests} requests "
          f"each) -> {'PASS' if res['pass'] else 'MISS'} (p99 <= 50 ms); one whole record "
          f"p50 {res['record_p50_ms']} ms p99 {res['record_p99_ms']} ms", flush=True)  # fmt: skip


def bench_list(args: argparse.Namespace, out: dict[str, Any], tmp: Path) -> None:
    bench_list_on("sqlite", None, args, out, tmp)
    if args.no_postgres:
        out.setdefault("list", {})["postgresql"] = "skipped (--no-postgres)"
        return
    from freezeframe.testing.postgres import PostgresServer, available

    why = available()
    if why is not None:
        print(f"PostgreSQL: skipped ({why})")
        out.setdefault("list", {})["postgresql"] = f"skipped: {why}"
        return
    with PostgresServer.start() as pg:
        bench_list_on("postgresql", pg.create_database("ffbench"), args, out, tmp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10, help="API and CLI snapshots each")
    ap.add_argument("--clients", type=int, default=50, help="SSE followers of one snapshot")
    ap.add_argument("--records", type=int, default=10_000)
    ap.add_argument("--requests", type=int, default=300, help="timed GETs per measurement")
    ap.add_argument("--only", default="window,rss,list")
    ap.add_argument("--no-postgres", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    args.only = set(args.only.split(","))
    out: dict[str, Any] = {"when": datetime.now(UTC).isoformat(timespec="seconds")}
    with tempfile.TemporaryDirectory(prefix="ffapibench-") as tmp:
        if args.only & {"window", "rss"}:
            bench_lab(args, out, Path(tmp))
        if "list" in args.only:
            bench_list(args, out, Path(tmp))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "window"} | (
        {"window": {k: v for k, v in out["window"].items() if not k.endswith("_ms")}}
        if "window" in out else {}), indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
