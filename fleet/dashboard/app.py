"""The dashboard's web app (Starlette): pages, the JSON API under /api/, and /metrics.

It binds to localhost by default; bound anywhere else it requires a token, given as
``Authorization: Bearer TOKEN`` or once as ``?token=TOKEN`` (then kept in a cookie).
"""

from __future__ import annotations

import hmac
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from edgekit.errors import ConfigError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..registry import Registry
from ..registry.views import device_json, event_json, iso, telemetry_json
from .metrics import FleetMetrics

STATIC = Path(__file__).resolve().parent / "static"
TOKEN_COOKIE = "edgekit_token"


class _TokenMiddleware(BaseHTTPMiddleware):
    def __init__(self, app: Any, token: str) -> None:
        super().__init__(app)
        self.token = token

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        given = given or request.query_params.get("token", "") or request.cookies.get(TOKEN_COOKIE, "")
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return PlainTextResponse(
                "edgekit dashboard: a token is required (?token=... or Authorization: Bearer)",
                status_code=401,
            )
        response = await call_next(request)
        if "token" in request.query_params:
            response.set_cookie(TOKEN_COOKIE, self.token, httponly=True, samesite="strict")
        return response


LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def check_bind(host: str, token: str | None) -> None:
    """Refuse to serve the dashboard beyond this machine without a token."""
    if host not in LOCAL_HOSTS and not token:
        raise ConfigError(
            f"the dashboard would listen on {host}, reachable from other machines; "
            "set a token (--token or EDGEKIT_DASHBOARD_TOKEN) or bind to 127.0.0.1"
        )


def create_app(
    registry: Registry, metrics: FleetMetrics | None = None, token: str | None = None
) -> Starlette:
    """The dashboard app over ``registry``. With ``token`` every request must present it."""
    metrics = metrics or FleetMetrics(registry)

    async def fleets(request: Request) -> JSONResponse:
        summary: dict[str, dict[str, Any]] = {}
        for d in registry.devices():
            f = summary.setdefault(
                d.fleet,
                {"fleet": d.fleet, "devices": 0, "online": 0, "offline": 0, "drifted": 0, "versions": {}},
            )
            f["devices"] += 1
            f["online" if d.online else "offline"] += 1
            f["drifted"] += int(d.drifted)
            if d.bundle_version:
                f["versions"][d.bundle_version] = f["versions"].get(d.bundle_version, 0) + 1
        return JSONResponse(sorted(summary.values(), key=lambda f: f["fleet"]))

    def with_drift(d: Any) -> dict[str, Any]:
        """The device's JSON, and when its drift began (the dashboard says it in words)."""
        since = registry.drifted_since(d.id) if d.drifted else None
        return {**device_json(d), "drifted_since": iso(since)}

    async def devices(request: Request) -> JSONResponse:
        return JSONResponse([with_drift(d) for d in registry.devices(request.query_params.get("fleet"))])

    async def device(request: Request) -> JSONResponse:
        wanted = request.path_params["device"]
        found = [d for d in registry.devices() if d.id == wanted]
        if not found:
            return JSONResponse({"error": f"no device {wanted!r}"}, status_code=404)
        return JSONResponse(
            {
                **with_drift(found[0]),
                "events": [event_json(e) for e in registry.events(device=wanted, limit=20)],
            }
        )

    async def telemetry(request: Request) -> JSONResponse:
        hours = _float(request.query_params.get("hours"), 24.0)
        since = datetime.now(timezone.utc) - timedelta(hours=hours)
        rows = registry.telemetry(request.path_params["device"], since=since)
        return JSONResponse([telemetry_json(t) for t in rows])

    async def events(request: Request) -> JSONResponse:
        limit = int(_float(request.query_params.get("limit"), 100))
        rows = registry.events(device=request.query_params.get("device"), limit=max(1, min(limit, 1000)))
        return JSONResponse([event_json(e) for e in rows])

    async def alerts(request: Request) -> JSONResponse:
        from ..alerts import AlertStore, alert_json

        limit = int(_float(request.query_params.get("limit"), 100))
        open_only = request.query_params.get("open") in ("1", "true", "yes")
        rows = AlertStore(registry, None).alerts(open_only=open_only, limit=max(1, min(limit, 1000)))
        return JSONResponse([alert_json(a) for a in rows])

    async def prometheus(request: Request) -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    async def index(request: Request) -> FileResponse:
        return FileResponse(STATIC / "index.html")

    async def device_page(request: Request) -> FileResponse:
        return FileResponse(STATIC / "device.html")

    routes = [
        Route("/", index),
        Route("/devices/{device}", device_page),
        Route("/api/fleets", fleets),
        Route("/api/devices", devices),
        Route("/api/devices/{device}", device),
        Route("/api/devices/{device}/telemetry", telemetry),
        Route("/api/events", events),
        Route("/api/alerts", alerts),
        Route("/metrics", prometheus),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    middleware = [Middleware(_TokenMiddleware, token=token)] if token else []
    return Starlette(routes=routes, middleware=middleware)


def _float(text: str | None, default: float) -> float:
    try:
        return float(text) if text is not None else default
    except ValueError:
        return default
