"""The HTTP face of freezeframe: ``freezeframe serve``'s REST API and web dashboard.

A thin face over :class:`freezeframe.service.Service` (FastAPI; run by uvicorn in
:mod:`freezeframe.cli.serve`): request in, one service call, document out. No business rule
lives here.

- :func:`create_app` (:mod:`._app`): the app over an open service; ``/v1`` endpoints,
  ``/healthz``, ``/metrics`` (:mod:`._metrics`), ``/openapi.json``, the dashboard
  (:mod:`._dashboard`, templates and static files next to it);
- :mod:`._auth`: the bearer token (``<state dir>/api-token``, mode 0600) and session cookies;
- :mod:`._errors`: the one error shape ``{"code", "message", "hint"}`` and HTTP statuses;
- :mod:`._jobs`: the refusal of new jobs while the server stops; :mod:`._sse`: the event streams;
- :mod:`._chart`: the freeze-window timeline as inline SVG.
"""

from __future__ import annotations

from freezeframe.api._app import ApiState, create_app
from freezeframe.api._auth import TOKEN_FILE_NAME, load_or_create_token
from freezeframe.api._errors import render_remedy

__all__ = ["TOKEN_FILE_NAME", "ApiState", "create_app", "load_or_create_token", "render_remedy"]
