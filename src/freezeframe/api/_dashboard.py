"""The dashboard: server-rendered pages (Jinja2) over the same service calls as the API.

Owns the pages and their forms: login (the token, then a session cookie), the VM list (each
VM's doctor verdict, fetched by the page from ``/v1/vms/{vm}/doctor``), a VM's page with
**Create snapshot** (policy, verify afterwards), a snapshot's page (live progress from the
event stream while a job runs, then the level and why, the filesystems, the freeze-window
chart, the verdict per disk, the agent's log lines) and the snapshot list with a verify button.
Forms are plain HTML posts (they work without JavaScript) carrying a CSRF field; the little
JavaScript in ``static/app.js`` only fills in the doctor's verdicts and follows progress.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any
from urllib.parse import parse_qs, quote

from fastapi import FastAPI, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates

from freezeframe.api._app import HERE, ApiState, CreateBody, _start_snapshot, _start_verify
from freezeframe.api._auth import SESSION_COOKIE, SESSION_SECONDS
from freezeframe.api._chart import phases, timeline_svg
from freezeframe.api._errors import ApiError, error_body, status_of
from freezeframe.api._jobs import ShuttingDown
from freezeframe.errors import FreezeframeError, NotFoundError
from freezeframe.models import FsCheck, QuiescePolicy, SnapshotStatus

__all__ = ["install_dashboard"]

_MAX_FORM = 16 * 1024


async def _form(request: Request) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body (first value of each field)."""
    body = await request.body()
    if len(body) > _MAX_FORM:
        raise ApiError(413, "too-large", "form too large")
    fields = parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True)
    return {k: v[0] for k, v in fields.items()}


def _safe_next(target: str | None) -> str:
    """Only a local path (no scheme, no other host) is followed after the login."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/"


def install_dashboard(app: FastAPI, st: ApiState) -> None:
    templates = Jinja2Templates(directory=HERE / "templates")
    svc = st.service

    def render(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        cookie = request.cookies.get(SESSION_COOKIE)
        logged_in = st.auth.session_ok(cookie)
        context.setdefault("flash", None)
        return templates.TemplateResponse(
            request,
            name,
            {
                "logged_in": logged_in,
                "csrf": st.auth.csrf_for(cookie) if logged_in and cookie else "",
                **context,
            },
            status_code=status,
            headers={"Cache-Control": "no-store"},
        )

    async def check_csrf(request: Request) -> dict[str, str]:
        form = await _form(request)
        if not st.auth.csrf_ok(request.cookies.get(SESSION_COOKIE), form.get("csrf")):
            raise ApiError(
                403, "bad-csrf", "the form is stale or not from this dashboard", "reload the page"
            )
        return form

    def error_page(request: Request, exc: FreezeframeError | ApiError) -> HTMLResponse:
        if isinstance(exc, FreezeframeError):
            status, body = status_of(exc), error_body(exc)
        else:
            status = exc.status
            body = {"code": exc.code, "message": exc.message, "hint": exc.hint}
        return render(request, "error.html", status, title="Error", nav=None, **body)

    @app.get("/login", include_in_schema=False)
    async def login_page(request: Request, next: str = "/") -> HTMLResponse:
        hint = str(st.token_path) if st.token_path else "the token file"
        return render(request, "login.html", next=_safe_next(next), token_hint=hint, nav=None)

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        form = await _form(request)
        if not st.auth.token_ok(form.get("token", "")):
            hint = str(st.token_path) if st.token_path else "the token file"
            return render(
                request, "login.html", 401, next=_safe_next(form.get("next")), token_hint=hint,
                nav=None, flash="That is not the API token.", flash_kind="error",
            )  # fmt: skip
        resp = RedirectResponse(_safe_next(form.get("next")), status_code=303)
        resp.set_cookie(
            SESSION_COOKIE,
            st.auth.new_session(),
            max_age=SESSION_SECONDS,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )
        return resp

    @app.post("/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        await check_csrf(request)
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(SESSION_COOKIE, path="/")
        return resp

    @app.get("/", include_in_schema=False)
    async def vms_page(request: Request) -> HTMLResponse:
        return render(request, "vms.html", vms=await svc.list_vms(), nav="vms")

    async def vm_page_response(
        request: Request, vm: str, cursor: str | None, status: int = 200, **extra: Any
    ) -> HTMLResponse:
        cfg = await svc.get_vm(vm)
        page = await svc.list_snapshots(vm, limit=20, cursor=cursor, newest_first=True)
        return render(
            request, "vm.html", status, vm=cfg, snapshots=page.items,
            next_cursor=page.next_cursor, show_vm=False, nav="vms", **extra,
        )  # fmt: skip

    @app.get("/vms/{vm}", include_in_schema=False)
    async def vm_page(request: Request, vm: str, cursor: str | None = None) -> HTMLResponse:
        try:
            return await vm_page_response(request, vm, cursor)
        except FreezeframeError as exc:
            return error_page(request, exc)

    @app.post("/vms/{vm}/snapshots", include_in_schema=False)
    async def create_from_form(request: Request, vm: str) -> Response:
        try:
            form = await check_csrf(request)
            quiesce = form.get("quiesce") or None
            body = CreateBody(
                quiesce=QuiescePolicy(quiesce) if quiesce else None,
                verify=form.get("verify") == "yes",
            )
            job = await _start_snapshot(st, vm, body)
        except ShuttingDown:
            return error_page(request, ApiError(503, "shutting-down", "the server is stopping"))
        except ValueError:
            return error_page(request, ApiError(422, "invalid-request", "unknown policy"))
        except ApiError as exc:
            return error_page(request, exc)
        except NotFoundError as exc:
            return error_page(request, exc)
        except FreezeframeError as exc:  # vm-busy and other refusals: shown on the VM's page
            body_ = error_body(exc)
            msg = f"{body_['code']}: {body_['message']}"
            if body_["hint"]:
                msg += f" ({body_['hint']})"
            return await vm_page_response(
                request, vm, None, status_of(exc), flash=msg, flash_kind="error"
            )
        return RedirectResponse(f"/snapshots/{quote(job.snapshot_id, safe='')}", status_code=303)

    @app.get("/snapshots", include_in_schema=False)
    async def snapshots_page(request: Request, cursor: str | None = None) -> HTMLResponse:
        try:
            page = await svc.list_snapshots(None, limit=50, cursor=cursor, newest_first=True)
        except FreezeframeError as exc:
            return error_page(request, exc)
        return render(
            request, "snapshots.html", snapshots=page.items, next_cursor=page.next_cursor,
            show_vm=True, nav="snapshots",
        )  # fmt: skip

    @app.get("/snapshots/{snapshot_id}", include_in_schema=False)
    async def snapshot_page(request: Request, snapshot_id: str) -> HTMLResponse:
        try:
            rec = await svc.get_snapshot(snapshot_id)
        except FreezeframeError as exc:
            return error_page(request, exc)
        live = None
        if svc.job(rec.id) is not None:
            live = "snapshot"
        elif (vj := svc.verify_job(rec.id)) is not None and not vj.done:
            live = "verify"
        elif rec.status is SnapshotStatus.RUNNING:
            live = "snapshot"  # run by another process: the stream polls the catalog
        by_disk: defaultdict[str, list[FsCheck]] = defaultdict(list)
        if rec.verification is not None:
            for c in rec.verification.checks:
                by_disk[c.device].append(c)
        return render(
            request, "snapshot.html", rec=rec, live=live, outcome=None,
            chart=timeline_svg(rec.timeline, rec.freeze_window_ms),
            phases=phases(rec.timeline), checks_by_disk=dict(by_disk), nav="snapshots",
        )  # fmt: skip

    @app.post("/snapshots/{snapshot_id}/verify", include_in_schema=False)
    async def verify_from_form(request: Request, snapshot_id: str) -> Response:
        try:
            await check_csrf(request)
            rec = await svc.get_snapshot(snapshot_id)
            await _start_verify(st, rec)
        except ShuttingDown:
            return error_page(request, ApiError(503, "shutting-down", "the server is stopping"))
        except (FreezeframeError, ApiError) as exc:
            return error_page(request, exc)
        return RedirectResponse(f"/snapshots/{quote(rec.id, safe='')}", status_code=303)
