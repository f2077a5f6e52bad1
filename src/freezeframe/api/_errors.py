"""The API's one error shape, ``{"code", "message", "hint"}``, and its HTTP statuses.

Owns the translation at the HTTP edge: a :class:`~freezeframe.errors.FreezeframeError` keeps
its stable ``code`` and message, gets the status of its kind (:func:`status_of`) and a hint in
the API's own words (its remedy named as an endpoint, :func:`render_remedy`). Request
validation errors (bad JSON, wrong types, unknown fields) are ``422`` with code
``invalid-request``; unknown routes ``404 not-found``; anything unexpected ``500
internal-error`` with no traceback in the response (it goes to the server's log).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from freezeframe.errors import (
    Action,
    AgentUnavailableError,
    AlreadyExistsError,
    BusyError,
    CatalogError,
    DependencyError,
    FreezeframeError,
    HypervisorUnavailableError,
    NotFoundError,
    Remedy,
    UsageError,
)
from freezeframe.service import join_hint

__all__ = [
    "ApiError",
    "error_body",
    "install_error_handlers",
    "render_remedy",
    "status_of",
]

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error of the HTTP face itself (not of the service): status, code, message, hint."""

    def __init__(self, status: int, code: str, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.hint = hint


#: Codes whose status is not the one of their class: refusals because of the VM's state.
_CONFLICT_CODES = frozenset(
    {
        "intent-open",
        "lab-vm",
        "vm-exists",
        "intents-skipped",
        "layer-shared",
        "confirmation-required",
        "vm-running",
        "restore-as-unsupported",
        "image-written-by-vm",
        "snapshot-running",
        "snapshot-not-done",
        "snapshot-changed-since-cut",
    }
)


def status_of(exc: FreezeframeError) -> int:
    """The HTTP status of a service error: 404 unknown thing; 409 the resource's state refuses
    it (``vm-busy``, ``vm-exists``, ``intent-open``, a lab VM); 400 other bad input; 503 what
    the server depends on is not there (database, hypervisor, agent, a package); 500 the rest.
    """
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, BusyError | AlreadyExistsError) or exc.code in _CONFLICT_CODES:
        return 409
    if isinstance(exc, UsageError):
        return 400
    if isinstance(
        exc, CatalogError | DependencyError | HypervisorUnavailableError | AgentUnavailableError
    ):
        return 503
    return 500


def _vm(remedy: Remedy) -> str:
    return quote(remedy.vm or "{vm}", safe="")


#: Remedies that are fields of a new snapshot's body: (remedy parameter, body field).
_CREATE_FIELDS = {
    Action.EXCLUDE_DISK: ("disk", "exclude_disks"),
    Action.EXCLUDE_MOUNT: ("mount", "exclude_mounts"),
    Action.SET_QUIESCE: ("quiesce", "quiesce"),
}


def render_remedy(remedy: Remedy) -> str:
    """A remedy in the API's words: the endpoint that helps (or, for what only the CLI on the
    server does, the command there)."""
    a, vm, params = remedy.action, _vm(remedy), dict(remedy.params)
    if a is Action.RECOVER:
        if remedy.vm:
            return f"POST /v1/vms/{vm}/recover"
        return "POST /v1/vms/{vm}/recover for each VM (GET /v1/vms)"
    if a is Action.DOCTOR:
        return f"GET /v1/vms/{vm}/doctor"
    if a is Action.LIST_VMS:
        return "GET /v1/vms"
    if a is Action.LIST_SNAPSHOTS:
        return f"GET /v1/vms/{vm}/snapshots" if remedy.vm else "GET /v1/snapshots"
    if a is Action.ADD_VM:
        params.pop("replace", None)
        extra = "".join(
            f', "{k.replace("-", "_")}": ' + ("true" if v == "yes" else json.dumps(v))
            for k, v in params.items()
        )
        return f'POST /v1/vms {{"name": "{remedy.vm}", "replace": true{extra}}}'
    if a in _CREATE_FIELDS:
        param, name = _CREATE_FIELDS[a]
        values = [v for v in params.get(param, "").split(",") if v]
        value = json.dumps(values[0] if a is Action.SET_QUIESCE and values else values)
        return f'POST /v1/vms/{vm}/snapshots {{"{name}": {value}}}'
    if a is Action.REMOVE_VM:
        return f"DELETE /v1/vms/{vm}"
    if a is Action.IMPORT_LIBVIRT:
        return "`freezeframe vm import --libvirt` on the server (no endpoint)"
    if a is Action.LAB_UP:
        return f"`freezeframe lab up {remedy.vm}` on the server (lab VMs have no endpoint)"
    if a is Action.LAB_DOWN:
        purge = " --purge" if params.get("purge") == "yes" else ""
        return f"`freezeframe lab down {remedy.vm}{purge}` on the server"
    if a is Action.FORCE:
        return 'repeat the request with "force": true'
    if a in (Action.SHOW_SNAPSHOT, Action.VERIFY):
        sid = quote(params.get("id", "{id}"), safe="{}")
        return (
            f"POST /v1/snapshots/{sid}/verify" if a is Action.VERIFY else f"GET /v1/snapshots/{sid}"
        )
    if a is Action.LIST_IMAGES:
        return f"`freezeframe vm images {remedy.vm or 'VM'}` on the server (no endpoint)"
    return a.value


def error_body(exc: FreezeframeError) -> dict[str, Any]:
    """``{"code", "message", "hint"}`` of a service error (hint null when there is none)."""
    return {
        "code": exc.code,
        "message": exc.message,
        "hint": join_hint(exc.hint, exc.remedy, render_remedy),
    }


def _response(status: int, code: str, message: str, hint: str | None) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(
        {"code": code, "message": message, "hint": hint}, status_code=status, headers=headers
    )


def _describe(errors: Sequence[Any]) -> str:
    parts = []
    for e in list(errors)[:5]:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        if e.get("type") == "json_invalid":
            parts.append("the body is not valid JSON")
        else:
            parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


_HTTP_CODES = {
    400: "bad-request",
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    406: "not-acceptable",
    413: "too-large",
    415: "unsupported-media-type",
}


def install_error_handlers(app: FastAPI) -> None:
    """Make every error of ``app`` the one shape."""

    @app.exception_handler(FreezeframeError)
    async def _ff(_request: Request, exc: FreezeframeError) -> JSONResponse:
        status = status_of(exc)
        if status >= 500:
            log.error("%s: %s", exc.code, exc.message)
        body = error_body(exc)
        return _response(status, body["code"], body["message"], body["hint"])

    @app.exception_handler(ApiError)
    async def _api(_request: Request, exc: ApiError) -> JSONResponse:
        return _response(exc.status, exc.code, exc.message, exc.hint)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _response(
            422,
            "invalid-request",
            _describe(exc.errors()),
            "see GET /openapi.json for the request's schema",
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http-error")
        message = exc.detail if isinstance(exc.detail, str) else code
        if exc.status_code == 404 and message == "Not Found":
            message = "no such endpoint"
        return _response(exc.status_code, code, message, None)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error", exc_info=exc)
        return _response(
            500, "internal-error", f"internal error ({type(exc).__name__})", "see the server's log"
        )
