"""The dashboard's web app (Starlette): pages, the JSON API under /api/, and /metrics.

Who may see and do what:

- **accounts** (:mod:`edgekit.fleet.accounts`): once any exists, every page and API needs a
  signed-in session (``/login``); a ``viewer`` reads, an ``operator`` also acts. Actions are
  POSTs that need an operator and, from a session, the CSRF token of ``/api/session`` in
  ``X-CSRF-Token``; each one, refused ones included, goes to the audit log;
- **the token** (``--token``) keeps working for scripts and ``/metrics``: given as
  ``Authorization: Bearer TOKEN`` it reads and acts (as ``token``, no CSRF: a browser never
  sends that header by itself), given once as ``?token=TOKEN`` it is kept in a cookie and reads;
- with neither, on localhost, everyone reads and nobody acts.

It binds to localhost by default; bound anywhere else it requires a token or accounts.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from edgekit.errors import ConfigError, EdgekitError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..accounts import Accounts, Identity
from ..actions import abort_rollout, previous_bundle, pushing, resume_rollout, rolling_back
from ..actions import rollback_device as rollback_one
from ..api import ApiContext, api_routes, outcome_json
from ..control import ControlPlane
from ..push import FleetLink
from ..registry import Registry
from ..registry.views import audit_json, device_json, event_json, iso, telemetry_json
from ..rollout import RolloutPolicy
from .bench import bench_routes
from .metrics import FleetMetrics
from .rollouts import rollout_views
from .sessions import SESSION_SECONDS, Sessions
from .shadow import shadow_routes

STATIC = Path(__file__).resolve().parent / "static"
TOKEN_COOKIE = "edgekit_token"
SESSION_COOKIE = "edgekit_session"


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: a signed-in user, or a holder of the token."""

    name: str
    role: str
    via: str  # "session" or "token"


PUBLIC = ("/login", "/api/login", "/static/")


class _AuthMiddleware(BaseHTTPMiddleware):
    def __init__(self, app: Any, token: str | None, accounts: Accounts, sessions: Sessions) -> None:
        super().__init__(app)
        self.token = token
        self.accounts = accounts
        self.sessions = sessions

    def principal(self, request: Request) -> Principal | None:
        name = self.sessions.user(request.cookies.get(SESSION_COOKIE))
        role = self.accounts.role_of(name) if name else None
        if name and role:
            return Principal(name, role, "session")
        if self.token:
            header = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            given = request.query_params.get("token", "") or request.cookies.get(TOKEN_COOKIE, "")
            if header and hmac.compare_digest(header.encode(), self.token.encode()):
                return Principal("token", "operator", "token")
            if given and hmac.compare_digest(given.encode(), self.token.encode()):
                return Principal("token", "viewer", "token")
        return None

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        if request.url.path.startswith("/api/v1/"):  # the operator API checks its own sessions
            return await call_next(request)
        principal = self.principal(request)
        request.state.principal = principal
        path = request.url.path
        guarded = self.token is not None or self.accounts.any()
        if guarded and principal is None and not path.startswith(PUBLIC):
            if path.startswith("/api/") or path == "/metrics":
                return PlainTextResponse(
                    "edgekit dashboard: sign in at /login, or give the token (Authorization: Bearer)",
                    status_code=401,
                )
            return RedirectResponse("/login", status_code=303)
        response = await call_next(request)
        if self.token and "token" in request.query_params and principal is not None:
            response.set_cookie(TOKEN_COOKIE, self.token, httponly=True, samesite="strict")
        return response


LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def check_bind(host: str, token: str | None, accounts: bool = False) -> None:
    """Refuse to serve the dashboard beyond this machine without a token or accounts."""
    if host not in LOCAL_HOSTS and not token and not accounts:
        raise ConfigError(
            f"the dashboard would listen on {host}, reachable from other machines; "
            "add an account (edgekit fleet user add NAME --role operator), set a token "
            "(--token or EDGEKIT_DASHBOARD_TOKEN), or bind to 127.0.0.1"
        )


def create_app(
    registry: Registry,
    metrics: FleetMetrics | None = None,
    token: str | None = None,
    api: ApiContext | None = None,
) -> Starlette:
    """The dashboard app over ``registry``. With ``token`` or accounts every request must be
    signed in or present the token (but the operator API, ``api``, which signs its callers in
    itself). ``api`` is also how the dashboard's buttons act on the fleet: its broker, its
    signing key, and its ``home``, which keeps the session key (else one per process)."""
    metrics = metrics or FleetMetrics(registry)
    accounts = Accounts(registry)
    sessions = Sessions(api.home if api is not None else None)

    def audit(actor: str, action: str, fleet: str | None, target: str | None, result: str, why: str) -> None:
        ControlPlane(registry).audit(
            action, fleet=fleet, target=target, result=result, detail=why, actor=actor
        )

    def refuse(
        request: Request, action: str, fleet: str | None, target: str | None, why: str
    ) -> JSONResponse:
        principal = request.state.principal
        actor = principal.name if principal else "anonymous"
        audit(actor, action, fleet, target, "refused", why)
        return JSONResponse({"error": why}, status_code=403)

    def operator(
        request: Request, action: str, fleet: str | None, target: str | None = None
    ) -> JSONResponse | Principal:
        """The operator asking for ``action``, or the 403 (audited) that refuses it."""
        principal: Principal | None = request.state.principal
        if principal is None:
            return refuse(request, action, fleet, target, "sign in as an operator first")
        if principal.role != "operator":
            why = f"{principal.name} is a viewer; only an operator can do this"
            return refuse(request, action, fleet, target, why)
        if principal.via == "session" and not sessions.csrf_ok(
            request.cookies.get(SESSION_COOKIE), request.headers.get("x-csrf-token")
        ):
            why = "the request carried no valid CSRF token; reload the page"
            return refuse(request, action, fleet, target, why)
        return principal

    async def act(
        request: Request,
        action: str,
        fleet: str,
        work: Callable[[ControlPlane, FleetLink, str], dict[str, Any]],
    ) -> JSONResponse:
        """An operator's button: ``work`` calls :mod:`edgekit.fleet.actions` (the code of the
        CLI and the API, which audits it) over the service's operator connection."""
        who = operator(request, action, fleet)
        if isinstance(who, JSONResponse):
            return who
        if api is None:
            why = "this dashboard runs without the fleet service's broker and keys: use the edgekit CLI"
            audit(who.name, action, fleet, None, "failed", why)
            return JSONResponse({"error": why}, status_code=409)
        started = False
        holder = f"the dashboard ({who.name})"

        def run(control: ControlPlane, link: FleetLink) -> dict[str, Any]:
            nonlocal started
            started = True
            return work(control, link, holder)

        try:
            doc = await run_in_threadpool(api.with_link, Identity(who.name, who.role), fleet, run)
        except EdgekitError as exc:
            if not started:  # the action audits itself; this failed before it began
                audit(who.name, action, fleet, None, "failed", str(exc))
            return JSONResponse({"error": str(exc)}, status_code=409)
        return JSONResponse(doc)

    async def fleets(request: Request) -> JSONResponse:
        summary: dict[str, dict[str, Any]] = {}
        for d in registry.devices():
            f = summary.setdefault(
                d.fleet,
                {
                    "fleet": d.fleet,
                    "devices": 0,
                    "online": 0,
                    "offline": 0,
                    "drifted": 0,
                    "model_affected": 0,
                    "inputs_changed": 0,
                    "versions": {},
                },
            )
            f["devices"] += 1
            f["online" if d.online else "offline"] += 1
            f["drifted"] += int(d.drifted)
            f["model_affected"] += d.drift_severity == "model affected"
            f["inputs_changed"] += d.drift_severity == "inputs changed"
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
        previous = ControlPlane(registry).record(found[0].fleet).previous()
        return JSONResponse(
            {
                **with_drift(found[0]),
                "events": [event_json(e) for e in registry.events(device=wanted, limit=20)],
                "rollback_to": previous["label"] if previous else None,
            }
        )

    async def telemetry(request: Request) -> JSONResponse:
        hours = _float(request.query_params.get("hours"), 24.0)
        since = datetime.now(timezone.utc) - timedelta(hours=hours)
        rows = registry.telemetry(request.path_params["device"], since=since)
        return JSONResponse([telemetry_json(t) for t in rows])

    async def fleet_history(request: Request) -> JSONResponse:
        hours = max(1.0, min(_float(request.query_params.get("hours"), 24.0), 24.0 * 31))
        bucket = 300 if hours <= 6 else 3600 if hours <= 24 * 7 else 86400
        since = datetime.now(timezone.utc) - timedelta(hours=hours)
        fleet = request.path_params["fleet"]
        points = registry.fleet_history(fleet, since, bucket)
        previous = ControlPlane(registry).record(fleet).previous()
        return JSONResponse(
            {
                "fleet": fleet,
                "bucket_s": bucket,
                "points": points,
                "previous": previous["label"] if previous else None,
            }
        )

    async def rollback_fleet(request: Request) -> JSONResponse:
        fleet = request.path_params["fleet"]

        def work(control: ControlPlane, link: FleetLink, holder: str) -> dict[str, Any]:
            bundle = previous_bundle(control, fleet, None)
            with rolling_back(control, link, bundle, 600.0, holder) as (started, _):
                return outcome_json(started, link)

        return await act(request, "rollback", fleet, work)

    async def catalog(request: Request) -> JSONResponse:
        def listing() -> list[dict[str, Any]]:
            found = ControlPlane(registry).catalog
            return [{"name": n, "versions": found.versions(n)} for n in found.names()]

        return JSONResponse(await run_in_threadpool(listing))

    async def push(request: Request) -> JSONResponse:
        fleet = request.path_params["fleet"]
        refused = operator(request, "push", fleet)  # before the body: a forged push is a 403, audited
        if isinstance(refused, JSONResponse):
            return refused
        try:
            doc = await request.json()
            name, version, canary = str(doc["name"]), str(doc["version"]), int(doc.get("canary", 0))
            if canary < 0:
                raise ValueError(canary)
        except (ValueError, KeyError, TypeError):
            why = "send {name, version, canary} as JSON (canary: a number of devices, 0 or more)"
            return JSONResponse({"error": why}, status_code=400)

        def work(control: ControlPlane, link: FleetLink, holder: str) -> dict[str, Any]:
            bundle = control.catalog.read(name, version)
            with pushing(control, link, bundle, RolloutPolicy(canary=canary), holder) as (started, _):
                return outcome_json(started, link)

        return await act(request, "push", fleet, work)

    async def rollback_device(request: Request) -> JSONResponse:
        device = request.path_params["device"]
        found = [d for d in registry.devices() if d.id == device]
        if not found:
            return JSONResponse({"error": f"no device {device!r}"}, status_code=404)
        fleet = found[0].fleet

        def work(control: ControlPlane, link: FleetLink, holder: str) -> dict[str, Any]:
            bundle = previous_bundle(control, fleet, None)
            seq = rollback_one(control, link, device, bundle, holder)
            return {"fleet": fleet, "device": device, "bundle": bundle.manifest.label, "seq": seq}

        return await act(request, "device-rollback", fleet, work)

    async def fleet_page(request: Request) -> FileResponse:
        return FileResponse(STATIC / "fleet.html")

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

    async def ack(request: Request) -> JSONResponse:
        from ..alerts import AlertStore, alert_json

        target = f"alert {request.path_params['alert']}"
        who = operator(request, "alert-ack", None, target)
        if isinstance(who, JSONResponse):
            return who
        try:
            alert_id = int(request.path_params["alert"])
        except ValueError:
            why = f"no alert {request.path_params['alert']!r}: an alert's id is a number"
            audit(who.name, "alert-ack", None, target, "failed", why)
            return JSONResponse({"error": why}, status_code=404)
        try:
            row = AlertStore(registry, None).ack(alert_id, who.name, _now())
        except ConfigError as exc:  # audited by ack
            return JSONResponse({"error": str(exc)}, status_code=404)
        return JSONResponse(alert_json(row))

    async def audit_entries(request: Request) -> JSONResponse:
        limit = max(1, min(int(_float(request.query_params.get("limit"), 50)), 1000))
        fleet = request.query_params.get("fleet")
        rows = await run_in_threadpool(ControlPlane(registry).audit_log, fleet, limit)
        return JSONResponse([audit_json(e) for e in rows])

    async def session(request: Request) -> JSONResponse:
        principal: Principal | None = request.state.principal
        cookie = request.cookies.get(SESSION_COOKIE)
        return JSONResponse(
            {
                "user": principal.name if principal else None,
                "role": principal.role if principal else None,
                "csrf": sessions.csrf(cookie)
                if principal and principal.via == "session" and cookie
                else None,
                "accounts": accounts.any(),
            }
        )

    async def login(request: Request) -> Response:
        try:
            doc = await request.json()
            name, password = str(doc["name"]), str(doc["password"])
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": "send a JSON object with name and password"}, status_code=400)
        user = await run_in_threadpool(accounts.check, name, password)
        if user is None:
            audit(name, "sign-in", None, None, "refused", "wrong name or password (dashboard)")
            return JSONResponse({"error": "wrong name or password"}, status_code=401)
        audit(name, "sign-in", None, None, "ok", "dashboard")
        response = JSONResponse({"user": user.name, "role": user.role})
        response.set_cookie(
            SESSION_COOKIE,
            sessions.issue(user.name),
            max_age=SESSION_SECONDS,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    async def logout(request: Request) -> Response:
        response = JSONResponse({"user": None})
        response.delete_cookie(SESSION_COOKIE)
        return response

    async def rollouts(request: Request) -> JSONResponse:
        return JSONResponse(await run_in_threadpool(rollout_views, registry))

    async def abort(request: Request) -> JSONResponse:
        fleet = request.path_params["fleet"]

        def work(control: ControlPlane, link: FleetLink, holder: str) -> dict[str, Any]:
            return outcome_json(abort_rollout(control, link, holder), link)

        return await act(request, "rollout-abort", fleet, work)

    async def resume(request: Request) -> JSONResponse:
        fleet = request.path_params["fleet"]

        def work(control: ControlPlane, link: FleetLink, holder: str) -> dict[str, Any]:
            return outcome_json(resume_rollout(control, link, holder), link)

        return await act(request, "rollout-resume", fleet, work)

    async def rollouts_page(request: Request) -> FileResponse:
        return FileResponse(STATIC / "rollouts.html")

    async def login_page(request: Request) -> FileResponse:
        return FileResponse(STATIC / "login.html")

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
        Route("/api/fleets/{fleet}/history", fleet_history),
        Route("/api/fleets/{fleet}/rollback", rollback_fleet, methods=["POST"]),
        Route("/api/fleets/{fleet}/push", push, methods=["POST"]),
        Route("/api/devices/{device}/rollback", rollback_device, methods=["POST"]),
        Route("/api/catalog", catalog),
        Route("/fleets/{fleet}", fleet_page),
        Route("/api/devices", devices),
        Route("/api/devices/{device}", device),
        Route("/api/devices/{device}/telemetry", telemetry),
        Route("/api/events", events),
        Route("/api/alerts", alerts),
        Route("/api/alerts/{alert}/ack", ack, methods=["POST"]),
        Route("/api/audit", audit_entries),
        Route("/api/rollouts", rollouts),
        Route("/api/rollouts/{fleet}/abort", abort, methods=["POST"]),
        Route("/api/rollouts/{fleet}/resume", resume, methods=["POST"]),
        Route("/rollouts", rollouts_page),
        Route("/api/session", session),
        Route("/api/login", login, methods=["POST"]),
        Route("/api/logout", logout, methods=["POST"]),
        Route("/login", login_page),
        Route("/metrics", prometheus),
        *shadow_routes(registry, act),
        *bench_routes(registry),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    if api is not None:
        routes[:0] = api_routes(api)
    middleware = [Middleware(_AuthMiddleware, token=token, accounts=accounts, sessions=sessions)]
    return Starlette(routes=routes, middleware=middleware)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _float(text: str | None, default: float) -> float:
    try:
        return float(text) if text is not None else default
    except ValueError:
        return default
