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

from ..accounts import SESSION_SECONDS, Accounts, Sessions, audit, audit_json, audit_log
from ..registry import Registry
from ..registry.views import device_json, event_json, iso, telemetry_json
from .metrics import FleetMetrics
from .rollouts import rollout_views

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
    home: Path | None = None,
    broker: str | None = None,
) -> Starlette:
    """The dashboard app over ``registry``. With ``token`` or accounts every request must be
    signed in or present the token; ``home`` keeps the session key (else one per process), the
    saved rollouts and the signing key; ``broker`` is where actions on the fleet are sent."""
    metrics = metrics or FleetMetrics(registry)
    accounts = Accounts(registry)
    sessions = Sessions(home)

    def refuse(request: Request, action: str, target: str, why: str) -> JSONResponse:
        principal = request.state.principal
        actor = principal.name if principal else "anonymous"
        audit(registry, _now(), actor, "dashboard", action, target, "refused", why)
        return JSONResponse({"error": why}, status_code=403)

    def operator(request: Request, action: str, target: str) -> JSONResponse | Principal:
        """The operator asking for ``action``, or the 403 (audited) that refuses it."""
        principal: Principal | None = request.state.principal
        if principal is None:
            return refuse(request, action, target, "sign in as an operator first")
        if principal.role != "operator":
            return refuse(
                request, action, target, f"{principal.name} is a viewer; only an operator can do this"
            )
        if principal.via == "session" and not sessions.csrf_ok(
            request.cookies.get(SESSION_COOKIE), request.headers.get("x-csrf-token")
        ):
            return refuse(request, action, target, "the request carried no valid CSRF token; reload the page")
        return principal

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

    async def fleet_history(request: Request) -> JSONResponse:
        hours = max(1.0, min(_float(request.query_params.get("hours"), 24.0), 24.0 * 31))
        bucket = 300 if hours <= 6 else 3600 if hours <= 24 * 7 else 86400
        since = datetime.now(timezone.utc) - timedelta(hours=hours)
        fleet = request.path_params["fleet"]
        points = registry.fleet_history(fleet, since, bucket)
        previous = _previous(home, fleet)
        return JSONResponse({"fleet": fleet, "bucket_s": bucket, "points": points, "previous": previous})

    async def rollback_fleet(request: Request) -> JSONResponse:
        fleet = request.path_params["fleet"]
        who = operator(request, "fleet.rollback", f"fleet {fleet}")
        if isinstance(who, JSONResponse):
            return who
        if home is None or broker is None:
            why = "this dashboard runs without a broker and EDGEKIT_HOME: use `edgekit fleet rollback`"
            audit(registry, _now(), who.name, "dashboard", "fleet.rollback", f"fleet {fleet}", "failed", why)
            return JSONResponse({"error": why}, status_code=409)
        try:
            label = await run_in_threadpool(_rollback, broker, home, fleet, who.name)
        except EdgekitError as exc:
            audit(
                registry,
                _now(),
                who.name,
                "dashboard",
                "fleet.rollback",
                f"fleet {fleet}",
                "failed",
                str(exc),
            )
            return JSONResponse({"error": str(exc)}, status_code=409)
        audit(
            registry,
            _now(),
            who.name,
            "dashboard",
            "fleet.rollback",
            f"fleet {fleet}",
            "ok",
            f"back to {label}",
        )
        return JSONResponse({"fleet": fleet, "to": label})

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
        who = operator(request, "alert.ack", target)
        if isinstance(who, JSONResponse):
            return who
        try:
            row = AlertStore(registry, None).ack(
                int(request.path_params["alert"]), who.name, _now(), via="dashboard"
            )
        except (ConfigError, ValueError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=404)
        return JSONResponse(alert_json(row))

    async def audit_entries(request: Request) -> JSONResponse:
        limit = int(_float(request.query_params.get("limit"), 50))
        return JSONResponse([audit_json(e) for e in audit_log(registry, max(1, min(limit, 1000)))])

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
        user = accounts.check(name, password)
        if user is None:
            audit(registry, _now(), name, "dashboard", "sign-in", None, "refused", "wrong name or password")
            return JSONResponse({"error": "wrong name or password"}, status_code=401)
        audit(registry, _now(), name, "dashboard", "sign-in", None, "ok")
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
        return JSONResponse(rollout_views(registry, home))

    async def abort_rollout(request: Request) -> JSONResponse:
        fleet = request.path_params["fleet"]
        who = operator(request, "rollout.abort", f"fleet {fleet}")
        if isinstance(who, JSONResponse):
            return who
        if home is None or broker is None:
            why = "this dashboard runs without a broker and EDGEKIT_HOME: use `edgekit rollout abort`"
            audit(registry, _now(), who.name, "dashboard", "rollout.abort", f"fleet {fleet}", "failed", why)
            return JSONResponse({"error": why}, status_code=409)
        try:
            rollout = await run_in_threadpool(_abort, broker, home, fleet, who.name)
        except EdgekitError as exc:
            audit(
                registry, _now(), who.name, "dashboard", "rollout.abort", f"fleet {fleet}", "failed", str(exc)
            )
            return JSONResponse({"error": str(exc)}, status_code=409)
        target = f"fleet {fleet}: {rollout.label}"
        audit(registry, _now(), who.name, "dashboard", "rollout.abort", target, "ok", f"now {rollout.phase}")
        return JSONResponse({"fleet": fleet, "label": rollout.label, "phase": rollout.phase})

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
        Route("/fleets/{fleet}", fleet_page),
        Route("/api/devices", devices),
        Route("/api/devices/{device}", device),
        Route("/api/devices/{device}/telemetry", telemetry),
        Route("/api/events", events),
        Route("/api/alerts", alerts),
        Route("/api/alerts/{alert}/ack", ack, methods=["POST"]),
        Route("/api/audit", audit_entries),
        Route("/api/rollouts", rollouts),
        Route("/api/rollouts/{fleet}/abort", abort_rollout, methods=["POST"]),
        Route("/rollouts", rollouts_page),
        Route("/api/session", session),
        Route("/api/login", login, methods=["POST"]),
        Route("/api/logout", logout, methods=["POST"]),
        Route("/login", login_page),
        Route("/metrics", prometheus),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    middleware = [Middleware(_AuthMiddleware, token=token, accounts=accounts, sessions=sessions)]
    return Starlette(routes=routes, middleware=middleware)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _previous(home: Path | None, fleet: str) -> str | None:
    """The label of what ``fleet`` ran before its current bundle, as the workstation recorded it."""
    from ..push import FleetRecord

    if home is None:
        return None
    try:
        previous = FleetRecord.load(home, fleet).previous()
    except ConfigError:
        return None
    return previous["label"] if previous else None


def _rollback(broker: str, home: Path, fleet: str, who: str) -> str:
    """What `edgekit fleet rollback --fleet F` does (without --wait), from the dashboard."""
    from edgekit.catalog import Catalog
    from edgekit.keys import load_signing_key
    from edgekit.trust import TrustedKeys

    from ..push import FleetLink, connect_operator, driving, rollback_target, start_rollback

    key = load_signing_key(home, "default")
    bundle = rollback_target(Catalog(home, TrustedKeys([key.public])), home, fleet)
    client = connect_operator(broker, home=home)
    try:
        link = FleetLink(client, fleet, key, home)
        link.discover()
        with driving(home, fleet, f"the dashboard ({who})", wait=15.0):
            start_rollback(link, bundle, 600.0)
    finally:
        client.close()
    return bundle.manifest.label


def _abort(broker: str, home: Path, fleet: str, who: str) -> Any:
    """What `edgekit rollout abort` does, from the dashboard: its own operator connection, the
    workstation's signing key (``$EDGEKIT_KEY_PASSPHRASE`` for an encrypted one)."""
    from edgekit.keys import load_signing_key

    from ..push import abort_saved_rollout, connect_operator

    key = load_signing_key(home, "default")
    client = connect_operator(broker, home=home)
    try:
        return abort_saved_rollout(client, home, fleet, key, f"the dashboard ({who})")
    finally:
        client.close()


def _float(text: str | None, default: float) -> float:
    try:
        return float(text) if text is not None else default
    except ValueError:
        return default
