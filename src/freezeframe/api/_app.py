"""The FastAPI app of ``freezeframe serve``: the REST API (``/v1``), ``/healthz``, ``/metrics``,
``/openapi.json`` and the dashboard, over one :class:`~freezeframe.service.Service`.

Owns the HTTP face only: request bodies and query parameters into service calls, results into
JSON documents (:func:`~freezeframe.service.to_document`, the same documents as the CLI's
``--json``), errors into the one shape (:mod:`._errors`), snapshots and verifications as jobs of
the server (the service's snapshot and verify jobs), authentication
(:mod:`._auth`). No business rule lives here: what a snapshot's outcome is, what may be
refused, and why, is the service's.

The app does not own the service's life: whoever opened it closes it (``freezeframe serve``
does, after the HTTP server stopped: :meth:`Service.close` waits for running snapshots, their
thaw is never cut short). :meth:`ApiState.begin_stop` (on SIGTERM) makes new jobs ``503
shutting-down`` and ends the event streams that follow nothing running.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, cast
from urllib.parse import quote

from fastapi import Body, FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Receive, Scope, Send

from freezeframe import __version__
from freezeframe.api._auth import SESSION_COOKIE, Authenticator
from freezeframe.api._errors import error_body, install_error_handlers, render_remedy
from freezeframe.api._jobs import ShuttingDown
from freezeframe.api._metrics import CONTENT_TYPE_LATEST, Metrics
from freezeframe.api._sse import snapshot_events
from freezeframe.errors import FreezeframeError
from freezeframe.models import QuiescePolicy, SnapshotRecord
from freezeframe.service import (
    MAX_PAGE,
    CreateSnapshot,
    ExportJob,
    Scheduler,
    ScheduleSpec,
    Service,
    SnapshotJob,
    SnapshotOutcome,
    SnapshotPage,
    VerifyJob,
    VerifyOutcome,
    VmSpec,
    summary_document,
    to_document,
)

__all__ = ["ApiState", "create_app"]

log = logging.getLogger(__name__)

HERE = Path(__file__).parent


@dataclass
class ApiState:
    """What the app's handlers share (``app.state.ff``)."""

    service: Service
    auth: Authenticator
    token_path: Path | None = None
    metrics: Metrics = field(default_factory=Metrics)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    sse_clients: int = 0
    #: The scheduler ``serve`` runs (None: none); stopped with the app, woken by a PUT.
    scheduler: Scheduler | None = None

    def begin_stop(self) -> None:
        """The server is stopping: no new jobs (the scheduler claims no more runs); streams
        that follow nothing running end."""
        self.stopping.set()
        if self.scheduler is not None:
            self.scheduler.stop()

    async def start_snapshot(self, vm: str, request: CreateSnapshot) -> SnapshotJob:
        """A snapshot job of ``vm`` (:meth:`Service.start_snapshot`), counted in this app's
        metrics: what ``POST /v1/vms/{vm}/snapshots`` and the scheduler start. Raises
        ShuttingDown, and what the service's start raises (BusyError ``vm-busy`` ...)."""
        return await _start_job(self, vm, request)

    async def drain(self) -> None:
        """Wait for every job of this app (snapshot and verify jobs, run by the service)."""
        self.begin_stop()
        await self.service.drain()


def _state(request: Request) -> ApiState:
    st: ApiState = request.app.state.ff
    return st


# ------------------------------------------------------------------ authentication


#: Paths anybody may fetch: the health check, the login page and the dashboard's CSS/JS.
_OPEN_PATHS = ("/healthz", "/login", "/static/")


class _AuthMiddleware:
    """Every request but those of :data:`_OPEN_PATHS` proves it knows the token: the bearer
    header, or the dashboard's session cookie (for the pages and the API's GETs only).
    Otherwise ``401`` (the one error shape) for the API, a redirect to the login page for the
    dashboard's pages."""

    def __init__(self, app: ASGIApp, auth: Authenticator) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path == "/healthz" or any(path.startswith(p) for p in _OPEN_PATHS[1:]):
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        api = path.startswith("/v1/") or path in ("/metrics", "/openapi.json")
        if self.auth.bearer_ok(request.headers.get("authorization")):
            await self.app(scope, receive, send)
            return
        # The session cookie opens the pages and the API's reads (the dashboard's scripts
        # fetch doctor verdicts and follow events); the API's writes need the bearer token
        # (the dashboard writes through its own forms, which carry a CSRF field).
        if self.auth.session_ok(request.cookies.get(SESSION_COOKIE)) and (
            not api or scope["method"] in ("GET", "HEAD")
        ):
            await self.app(scope, receive, send)
            return
        if api or "text/html" not in request.headers.get("accept", ""):
            response: Response = JSONResponse(
                {
                    "code": "unauthorized",
                    "message": "this endpoint needs the API token",
                    "hint": "send `Authorization: Bearer TOKEN` (the token is in the server's "
                    "state directory, file api-token, unless it was started with --token-file)",
                },
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        else:
            query = scope["query_string"].decode()
            target = path + (f"?{query}" if query else "")
            location = f"/login?next={quote(target)}"
            response = Response(status_code=303, headers={"Location": location})
        await response(scope, receive, send)


# ------------------------------------------------------------------ request bodies


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class VmBody(_Body):
    """``POST /v1/vms``: a QEMU VM by its sockets, or a libvirt domain."""

    name: str
    qmp: str | None = Field(None, description="QEMU's QMP unix socket")
    qga: str | None = Field(None, description="the guest agent's unix socket")
    libvirt_domain: str | None = Field(None, description="a libvirt domain: name, UUID or id")
    connect_uri: str = "qemu:///system"
    agent: bool = True
    quiesce: QuiescePolicy = QuiescePolicy.PREFERRED
    freeze_timeout: float = 10.0
    agent_log: str | None = Field(None, description="qemu-ga's --logfile inside the guest")
    exclude_mounts: list[str] = []
    overlay_dir: str | None = Field(
        None, description="where the snapshots' overlays go (default: next to each disk)"
    )
    ceph_conf: str | None = Field(None, description="ceph.conf for the VM's RBD disks")
    ceph_id: str | None = Field(None, description="the Ceph client id (without 'client.')")
    ceph_keyring: str | None = Field(None, description="the keyring file of that client")
    replace: bool = False
    force: bool = False


class CreateBody(_Body):
    """``POST /v1/vms/{vm}/snapshots``; a missing field is the VM's own setting."""

    quiesce: QuiescePolicy | None = None
    freeze_timeout: float | None = None
    exclude_mounts: list[str] = []
    exclude_disks: list[str] = []
    verify: bool = False
    overlay_dir: str | None = Field(
        default=None, description="this snapshot's overlay directory (default: the VM's own)"
    )


class RecoverBody(_Body):
    force: bool = False


class ScheduleBody(_Body):
    """``PUT /v1/vms/{vm}/schedule``: a snapshot every ``every``, then a prune by the keep
    rules (a missing rule is off; no rule at all keeps everything)."""

    every: str = Field(description="interval: 30s, 15m, 1h, 1d, 1w, 1h30m")
    keep_last: int | None = Field(None, ge=0)
    keep_hourly: int | None = Field(None, ge=0)
    keep_daily: int | None = Field(None, ge=0)
    keep_weekly: int | None = Field(None, ge=0)
    keep_monthly: int | None = Field(None, ge=0)
    keep_yearly: int | None = Field(None, ge=0)
    quiesce: QuiescePolicy | None = Field(None, description="default: the VM's own policy")
    enabled: bool = True


class PruneBody(_Body):
    """``POST /v1/prune``: apply the keep rules of ``vm``'s schedule (every scheduled VM's
    when missing); ``dry_run`` only says what would go."""

    vm: str | None = None
    dry_run: bool = False


class ExportBody(_Body):
    """``POST /v1/snapshots/{id}/export``: where (a directory on the server's host) and how."""

    to: str = Field(description="absolute path of the directory to write into (created)")
    format: str = Field("qcow2", description="qcow2 | raw")
    compress: bool = Field(False, description="compressed qcow2 clusters")
    verify: bool = Field(False, description="verify the snapshot first (verdict in metadata)")


class RestoreBody(_Body):
    """``POST /v1/snapshots/{id}/restore``: in place (``yes`` confirms that what the disks
    wrote since the newest snapshot is discarded) or ``as`` a new lab VM."""

    yes: bool = Field(False, description="confirm an in-place restore")
    as_: str | None = Field(None, alias="as", description="restore into a new lab VM of this name")
    stop_timeout: float = Field(60.0, description="seconds before a libvirt domain is destroyed")


# ------------------------------------------------------------------ jobs


def _job_accepted(sid: str, vm: str, kind: str) -> JSONResponse:
    where = f"/v1/snapshots/{quote(sid, safe='')}"
    return JSONResponse(
        {"id": sid, "vm": vm, "job": kind, "location": where, "events": f"{where}/events"},
        status_code=202,
        headers={"Location": where},
    )


def _count_snapshot(st: ApiState, task: asyncio.Task[SnapshotOutcome]) -> None:
    """Metrics of one snapshot job that ended (its task's done callback)."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is None:
        out = task.result()
        rec = out.record
        st.metrics.snapshot_done(
            outcome=out.code.value,
            level=rec.level.value,
            window_ms=rec.freeze_window_ms,
            thaw_unconfirmed=rec.thaw_unconfirmed,
        )
        if rec.verification is not None:
            st.metrics.verify_done(rec.verification.verdict.value)
    elif isinstance(exc, FreezeframeError):
        st.metrics.snapshot_done(
            outcome=exc.code,
            level="none",
            window_ms=None,
            thaw_unconfirmed=exc.code == "thaw-unconfirmed",
        )


async def _start_snapshot(st: ApiState, vm: str, body: CreateBody) -> SnapshotJob:
    request = CreateSnapshot(
        quiesce=body.quiesce,
        freeze_timeout=body.freeze_timeout,
        exclude_mounts=tuple(body.exclude_mounts),
        exclude_disks=tuple(body.exclude_disks),
        verify=body.verify,
        overlay_dir=body.overlay_dir,
    )
    return await _start_job(st, vm, request)


async def _start_job(st: ApiState, vm: str, request: CreateSnapshot) -> SnapshotJob:
    if st.stopping.is_set():
        raise ShuttingDown
    job = await st.service.start_snapshot(vm, request)
    if job.task is not None:
        job.task.add_done_callback(lambda t: _count_snapshot(st, t))
    st.metrics.jobs_running.inc()
    if job.task is not None:
        job.task.add_done_callback(lambda _t: st.metrics.jobs_running.dec())
    return job


async def _start_verify(st: ApiState, rec: SnapshotRecord) -> VerifyJob:
    """A verify of ``rec`` as a job of the service (:meth:`Service.start_verify`), counted in
    this app's metrics. Raises ShuttingDown, BusyError (code ``job-running``), what the
    service's start raises."""
    if st.stopping.is_set():
        raise ShuttingDown
    job = await st.service.start_verify(rec.id)
    st.metrics.jobs_running.inc()

    def ended(task: asyncio.Task[VerifyOutcome]) -> None:
        st.metrics.jobs_running.dec()
        if not task.cancelled() and task.exception() is None:
            st.metrics.verify_done(task.result().code.value)

    if job.task is not None:
        job.task.add_done_callback(ended)
    return job


async def _start_export(st: ApiState, snapshot_id: str, body: ExportBody) -> ExportJob:
    """An export as a job of the service (:meth:`Service.start_export`), counted as a running
    job. Raises ShuttingDown, what the service's start raises."""
    if st.stopping.is_set():
        raise ShuttingDown
    job = await st.service.start_export(
        snapshot_id, body.to, fmt=body.format, compress=body.compress, verify=body.verify
    )
    st.metrics.jobs_running.inc()
    if job.task is not None:
        job.task.add_done_callback(lambda _t: st.metrics.jobs_running.dec())
    return job


# ------------------------------------------------------------------ the app


async def _json(obj: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """``obj`` as a JSON response, serialized in a worker thread: a page of records takes
    tens of milliseconds to turn into JSON, and the event loop it would block also runs the
    snapshots' freeze windows."""

    def encode() -> bytes:
        return json.dumps(to_document(obj), separators=(",", ":")).encode()

    body = await asyncio.to_thread(encode)
    return Response(body, status_code=status, media_type="application/json", headers=headers)


#: Pages of more summaries than this are encoded in a worker thread (~5 us each here).
_INLINE_ITEMS = 100


async def _page(page: SnapshotPage, request: Request) -> Response:
    """A page of a snapshot list: ``items`` (summaries, :func:`summary_document`) and
    ``next_cursor`` (also as ``Link: rel="next"``)."""
    headers = {}
    if page.next_cursor:
        url = request.url.include_query_params(cursor=page.next_cursor)
        headers["Link"] = f'<{url.path}?{url.query}>; rel="next"'

    def encode() -> bytes:
        doc = {"items": [summary_document(s) for s in page.items], "next_cursor": page.next_cursor}
        return json.dumps(doc, separators=(",", ":")).encode()

    body = encode() if len(page.items) <= _INLINE_ITEMS else await asyncio.to_thread(encode)
    return Response(body, media_type="application/json", headers=headers)


Limit = Annotated[int, Query(ge=1, le=MAX_PAGE, description="records per page")]
Cursor = Annotated[str | None, Query(description="next_cursor of the previous page")]
Order = Annotated[str, Query(pattern="^(newest|oldest)$", description="newest (default) first")]


def create_app(
    service: Service,
    *,
    token: str,
    token_path: Path | None = None,
    dashboard: bool = True,
) -> FastAPI:
    """The app over an open ``service``; requests must know ``token`` (see :mod:`._auth`).
    ``token_path`` is only named on the login page (never the token)."""
    app = FastAPI(
        title="freezeframe",
        version=__version__,
        description="Consistent snapshots of running QEMU/KVM VMs and all their volumes, "
        "with proof. Every endpoint but /healthz needs `Authorization: Bearer TOKEN`.",
        openapi_url=None,  # served below, behind the token
        docs_url=None,  # the interactive docs would load scripts from the internet
        redoc_url=None,
    )
    st = ApiState(service, Authenticator(token), token_path)
    app.state.ff = st
    install_error_handlers(app)
    app.add_middleware(_AuthMiddleware, auth=st.auth)

    @app.exception_handler(ShuttingDown)
    async def _stopping(_request: Request, _exc: ShuttingDown) -> JSONResponse:
        return JSONResponse(
            {"code": "shutting-down", "message": "the server is stopping", "hint": "retry later"},
            status_code=503,
        )

    @app.get("/healthz", tags=["server"])
    async def healthz() -> dict[str, Any]:
        """Liveness, without the token: ``{"status": "ok"}`` (``stopping`` once SIGTERM came)."""
        return {
            "status": "stopping" if st.stopping.is_set() else "ok",
            "version": __version__,
            "jobs": len(service.jobs) + len(service.verify_jobs) + len(service.export_jobs),
            "event_streams": st.sse_clients,
        }

    @app.get("/metrics", tags=["server"])
    async def metrics() -> Response:
        """Prometheus metrics of this server."""
        return Response(st.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/openapi.json", tags=["server"], include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    # ---------------------------------------------------------------- VMs

    @app.get("/v1/vms", tags=["vms"])
    async def list_vms() -> Any:
        """The registered VMs."""
        return to_document(await service.list_vms())

    @app.post("/v1/vms", tags=["vms"], status_code=201)
    async def add_vm(body: VmBody) -> JSONResponse:
        """Register a VM (as ``freezeframe vm add``); ``not_there_yet``: its sockets that do
        not exist yet."""
        spec = VmSpec(
            name=body.name,
            qmp=body.qmp,
            qga=body.qga,
            libvirt_domain=body.libvirt_domain,
            connect_uri=body.connect_uri,
            agent=body.agent,
            quiesce=body.quiesce,
            freeze_timeout=body.freeze_timeout,
            agent_log=body.agent_log,
            exclude_mounts=tuple(body.exclude_mounts),
            overlay_dir=body.overlay_dir,
            ceph_conf=body.ceph_conf,
            ceph_id=body.ceph_id,
            ceph_keyring=body.ceph_keyring,
        )
        added = await service.add_vm(spec, replace=body.replace, force=body.force)
        return JSONResponse(
            to_document(added),
            status_code=201,
            headers={"Location": f"/v1/vms/{quote(added.vm.name, safe='')}"},
        )

    @app.get("/v1/vms/{vm}", tags=["vms"])
    async def get_vm(vm: str) -> Any:
        """One registered VM."""
        return to_document(await service.get_vm(vm))

    @app.delete("/v1/vms/{vm}", tags=["vms"], status_code=204)
    async def remove_vm(vm: str, force: bool = False) -> Response:
        """Forget a VM (its snapshot records stay); a lab VM only with ``force``."""
        await service.remove_vm(vm, force=force)
        return Response(status_code=204)

    @app.get("/v1/vms/{vm}/doctor", tags=["vms"])
    async def doctor(vm: str, quiesce: QuiescePolicy | None = None) -> Any:
        """The preflight checklist (``ok`` false when a check FAILs) and the level a snapshot
        would reach."""
        return to_document(await service.doctor(vm, quiesce=quiesce), render=render_remedy)

    @app.post("/v1/vms/{vm}/recover", tags=["vms"])
    async def recover(vm: str, body: Annotated[RecoverBody | None, Body()] = None) -> Any:
        """Thaw the VM's guest if a freeze intent is open and settle what dead snapshot
        processes left. ``code``: ``done``, ``thaw-unconfirmed``, ``intents-skipped``."""
        report = await service.recover(vm, force=body.force if body else False)
        err = report.error()
        return {
            "code": report.code.value,
            "outcomes": to_document(report, render=render_remedy),
            "error": error_body(err) if err is not None else None,
        }

    # ---------------------------------------------------------------- schedules

    @app.get("/v1/schedules", tags=["schedules"])
    async def list_schedules() -> Any:
        """Every schedule: ``schedule`` (as stored, with the last run's outcome), ``every``,
        ``rules``, ``next_run_at``, ``due``, ``running``."""
        return to_document(await service.list_schedules())

    @app.get("/v1/vms/{vm}/schedule", tags=["schedules"])
    async def get_schedule(vm: str) -> Any:
        """The VM's schedule (``404 schedule-not-found`` when it has none)."""
        return to_document(await service.get_schedule(vm))

    @app.put("/v1/vms/{vm}/schedule", tags=["schedules"])
    async def put_schedule(vm: str, body: ScheduleBody) -> Any:
        """Create or replace the VM's schedule (its last run is kept). ``400
        invalid-interval`` / ``invalid-keep-rule``, ``404 vm-not-found``."""
        spec = ScheduleSpec(**body.model_dump())
        view = await service.set_schedule(vm, spec)
        if st.scheduler is not None:
            st.scheduler.wake()
        return to_document(view)

    @app.delete("/v1/vms/{vm}/schedule", tags=["schedules"], status_code=204)
    async def delete_schedule(vm: str) -> Response:
        """Forget the VM's schedule (its snapshots stay)."""
        await service.remove_schedule(vm)
        return Response(status_code=204)

    @app.post("/v1/prune", tags=["schedules"])
    async def prune(body: Annotated[PruneBody | None, Body()] = None) -> Any:
        """Apply the keep rules now: one item per snapshot with ``keep`` and its ``reason``
        code; a refused delete keeps the snapshot (``refused``: the refusal's code) and the
        report's ``code`` is ``delete-refused``. ``dry_run``: nothing is deleted."""
        b = body or PruneBody()
        if not b.dry_run and st.stopping.is_set():
            raise ShuttingDown
        return to_document(await service.prune(b.vm, dry_run=b.dry_run))

    # ---------------------------------------------------------------- snapshots

    @app.post("/v1/vms/{vm}/snapshots", tags=["snapshots"], status_code=202)
    async def create_snapshot(
        vm: str, body: Annotated[CreateBody | None, Body()] = None
    ) -> JSONResponse:
        """Start a snapshot of every disk of ``vm`` as a job of the server: ``202`` once the VM
        is locked and the attempt recorded, with its id and ``Location``. The job does not
        depend on this request: a client that goes away never interrupts a freeze. ``409
        vm-busy`` when another snapshot of the VM runs (in any process on this catalog)."""
        job = await _start_snapshot(st, vm, body or CreateBody())
        return _job_accepted(job.snapshot_id, vm, "snapshot")

    @app.get("/v1/vms/{vm}/snapshots", tags=["snapshots"])
    async def list_vm_snapshots(
        vm: str,
        request: Request,
        limit: Limit = 50,
        cursor: Cursor = None,
        order: Order = "newest",
    ) -> Response:
        """The VM's snapshots, a page at a time (``next_cursor``, ``Link: rel=next``): what a
        list shows of each (``GET /v1/snapshots/{id}`` has the whole record)."""
        page = await service.list_snapshots(
            vm, limit=limit, cursor=cursor, newest_first=order == "newest"
        )
        return await _page(page, request)

    @app.get("/v1/snapshots", tags=["snapshots"])
    async def list_snapshots(
        request: Request, limit: Limit = 50, cursor: Cursor = None, order: Order = "newest"
    ) -> Response:
        """Every snapshot, a page at a time: what a list shows of each (``id``, ``vm``,
        ``created_at``, ``status``, ``policy``, ``level``, ``error``, ``parent_id``,
        ``freeze_window_ms``, ``disk_count``, ``filesystem_count``, ``frozen_count``,
        ``verdict``, ``verified_at``, ``thaw_unconfirmed``, ``intent_left_open``);
        ``GET /v1/snapshots/{id}`` has the whole record."""
        page = await service.list_snapshots(
            None, limit=limit, cursor=cursor, newest_first=order == "newest"
        )
        return await _page(page, request)

    @app.get("/v1/snapshots/{snapshot_id}", tags=["snapshots"])
    async def get_snapshot(snapshot_id: str, live: bool = False) -> Response:
        """One record (id or unique prefix): the document of ``snapshot show --json``. With
        ``live=true`` also ``qemu_runs_on`` (the image each disk runs on now), as the CLI
        shows it: that asks the running VM under its lock, so a snapshot of the VM starting
        at that moment is refused; without it the answer comes from the catalog alone."""
        return await _json(await service.show_snapshot(snapshot_id, live=live))

    @app.delete("/v1/snapshots/{snapshot_id}", tags=["snapshots"])
    async def delete_snapshot(
        snapshot_id: str,
        bandwidth: Annotated[int, Query(ge=0, description="bytes/s per merge, 0: no limit")] = 0,
    ) -> dict[str, Any]:
        """Delete a snapshot (id or unique prefix): its qcow2 layers merged away (live while
        the VM runs), its RBD snapshots removed, then its record; answers with what was done
        to each disk (``snapshot delete --json``). The delete runs to its end even if the
        client goes away. ``409 snapshot-running`` while it runs, ``409 snapshot-in-use``
        while a verify or export reads it, ``409 layer-shared`` / ``image-written-by-vm``."""
        result = await asyncio.shield(service.delete_snapshot(snapshot_id, bandwidth=bandwidth))
        return cast(dict[str, Any], to_document(result))

    @app.get("/v1/snapshots/{snapshot_id}/events", tags=["snapshots"])
    async def events(snapshot_id: str, request: Request) -> StreamingResponse:
        """Server-Sent Events: each step as it happens (those inside the freeze window right
        after the thaw), then the outcome or the error, then the record."""
        rec = await service.get_snapshot(snapshot_id)
        last = request.headers.get("last-event-id", "")
        after = int(last) if last.isdigit() else 0

        async def stream() -> Any:
            st.sse_clients += 1
            try:
                async for chunk in snapshot_events(service, rec, st.stopping, after=after):
                    yield chunk
            finally:
                st.sse_clients -= 1

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.post("/v1/snapshots/{snapshot_id}/verify", tags=["snapshots"], status_code=202)
    async def verify(snapshot_id: str) -> JSONResponse:
        """Verify the snapshot's images offline, as a job of the server (``202``; follow its
        events). The verdict is stored on the record."""
        rec = await service.get_snapshot(snapshot_id)
        await _start_verify(st, rec)
        return _job_accepted(rec.id, rec.vm, "verify")

    @app.post("/v1/snapshots/{snapshot_id}/export", tags=["snapshots"], status_code=202)
    async def export(snapshot_id: str, body: ExportBody) -> JSONResponse:
        """Export the snapshot (a ``done`` one) as one standalone image per disk plus
        ``metadata.json`` into ``to`` on the server's host, as a job of the server (``202``;
        follow its events: ``export_progress`` steps, then ``export``, the result, or
        ``error``). Refused at once: ``400`` ``bad-export-format``, ``compress-needs-qcow2``,
        ``export-path-not-absolute``; ``409`` ``snapshot-not-done``,
        ``export-target-exists``, ``job-running``."""
        job = await _start_export(st, snapshot_id, body)
        return _job_accepted(job.snapshot_id, job.vm, "export")

    @app.post("/v1/snapshots/{snapshot_id}/restore", tags=["snapshots"])
    async def restore(snapshot_id: str, body: RestoreBody) -> dict[str, Any]:
        """Restore the VM's disks to the snapshot: new overlays on the snapshot's images; a lab
        VM is restarted on them (``as``: a new lab VM boots on them, the original runs on).
        Answers with each disk's new image (``snapshot restore --json``) once the VM is ready;
        runs to its end even if the client goes away. ``409`` ``confirmation-required``
        (in place without ``yes``), ``vm-running`` (a VM freezeframe cannot restart: stop it
        first), ``snapshot-in-use``, ``vm-busy``; ``400`` ``restore-unsupported`` (RBD)."""
        result = await asyncio.shield(
            service.restore_snapshot(
                snapshot_id, into=body.as_, yes=body.yes, stop_timeout=body.stop_timeout
            )
        )
        return cast(dict[str, Any], to_document(result))

    if dashboard:
        from freezeframe.api._dashboard import install_dashboard

        app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
        install_dashboard(app, st)
    return app
