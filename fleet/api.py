"""The fleet service's operator API, ``/api/v1/``: what ``edgekit push|rollout|shadow|fleet
rollback --server URL`` (and the dashboard's buttons) call. Every action goes through
:mod:`edgekit.fleet.actions`, the code the CLI runs on its own registry.

Authentication: ``Authorization: Bearer TOKEN``, where TOKEN is a session opened by ``POST
/api/v1/login`` (``edgekit login``) or the service's own ``--token``. Viewers may ``GET``;
operators may also act. Refusals are JSON ``{"error": one line}`` with 401 (no or a dead
session) or 403 (a viewer acting).

The service holds the signing key that signs desired states (its ``$EDGEKIT_HOME``): an
operator using ``--server`` needs none on their laptop. A bundle uploaded must be signed by a
key the service trusts (its own); a ``.tflite`` uploaded is bundled and signed here.
"""

from __future__ import annotations

import hmac
import logging
import math
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TypeVar

from edgekit.bundle import Bundle, create_bundle
from edgekit.desired import LONGEST_S
from edgekit.errors import (
    AuthError,
    BrokerError,
    BundleError,
    ConfigError,
    EdgekitError,
    PromotionRefusedError,
    RolloutError,
)
from edgekit.keys import SigningKey, load_signing_key
from edgekit.provision import DEFAULT_STATE_DIR, provision_device
from edgekit.trust import TrustedKeys
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .accounts import Accounts, Identity
from .actions import (
    abort_rollout,
    previous_bundle,
    promote_shadow,
    pushing,
    rollback_device,
    rolling_back,
    shadow_devices,
    shadow_verdict,
    start_shadow,
    stop_shadow,
)
from .control import ControlPlane
from .push import FleetLink, connect_operator
from .registry import Registry
from .registry.views import audit_json
from .rollout import RolloutPolicy

__all__ = ["ApiContext", "api_routes", "outcome_json", "rollout_json", "shadow_json", "shadow_started_json"]

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_UPLOAD = 512 * 1024 * 1024  # the bundle reader's own limit


@dataclass
class ApiContext:
    """What the API needs of the service: its registry, where the devices are, and the home
    holding its signing key (None: a service that cannot act)."""

    registry: Registry
    broker: str
    home: Optional[Path] = None
    username: Optional[str] = None
    password: Optional[str] = field(default=None, repr=False)
    token: Optional[str] = field(default=None, repr=False)
    _key: Optional[SigningKey] = field(default=None, repr=False)

    def key(self) -> SigningKey:
        if self.home is None:
            raise ConfigError(
                "this fleet service has no signing key; start it with EDGEKIT_HOME holding keys/"
            )
        if self._key is None:
            self._key = load_signing_key(self.home)
        return self._key

    def control(self, who: Identity) -> ControlPlane:
        return ControlPlane(self.registry, TrustedKeys([self.key().public]), actor=who.name)

    def with_link(self, who: Identity, fleet: str, work: Callable[[ControlPlane, FleetLink], T]) -> T:
        """Run ``work`` (an action of :mod:`edgekit.fleet.actions`) as ``who`` with a link to
        ``fleet`` over the service's own operator connection: what the API's and the
        dashboard's buttons do."""
        control = self.control(who)
        client = connect_operator(self.broker, self.username, self.password, home=self.home)
        try:
            link = FleetLink(client, fleet, self.key(), control, trust_home=self.home)
            link.discover()
            return work(control, link)
        finally:
            client.close()


def rollout_json(control: ControlPlane, fleet: str) -> dict[str, Any]:
    info = control.rollout_info(fleet)
    if info is None:
        raise ConfigError(f"fleet {fleet} has no rollout yet; start one with `edgekit push --canary N`")
    rollout = info.rollout
    return {
        "fleet": rollout.fleet,
        "bundle": rollout.label,
        "bundle_id": rollout.bundle_id,
        "phase": rollout.phase,
        "canaries": list(rollout.canaries),
        "devices": list(rollout.devices),
        "failed": dict(rollout.failed),
        "reason": rollout.reason,
        # The shadow phase's length (push --canary N --shadow-first), or null without one.
        "shadow_first_s": rollout.rollout_policy.shadow_s or None,
        "max_error": rollout.rollout_policy.max_error,
        # What `push --wait --server` needs to give each phase its time (the soak's length).
        "soak_s": rollout.rollout_policy.soak_s,
        "started_by": info.started_by,
        "started_at": info.started_at.isoformat(),
    }


def outcome_json(rollout: Any, link: FleetLink) -> dict[str, Any]:
    """What ``push``, ``rollout resume`` and ``fleet rollback`` print with ``--json``."""
    return {
        "fleet": rollout.fleet,
        "bundle_id": rollout.bundle_id,
        "bundle": rollout.label,
        "phase": rollout.phase,
        "reason": rollout.reason,
        "canaries": list(rollout.canaries),
        "failed": dict(rollout.failed),
        "devices": {
            d: {"status": s.status, "version": s.bundle_version, "bundle_id": s.bundle_id, "error": s.error}
            for d, s in sorted(link.states.items())
        },
    }


def shadow_json(registry: Registry, fleet: str) -> dict[str, Any]:
    """What ``edgekit shadow status --json`` prints: the fleet's shadow windows of its newest
    candidate, per device and in total (edgekit.fleet.shadow.summarize), of the devices asked
    only (``push --shadow --devices N``: ControlPlane.shadow_summary)."""
    return {"fleet": fleet, **ControlPlane(registry).shadow_summary(fleet)}


def shadow_started_json(
    link: FleetLink,
    candidate: Bundle,
    sample: float,
    seconds: float,
    seq: int,
    devices: int,
    asked: Optional[list[str]] = None,
) -> dict[str, Any]:
    """What ``push --shadow --json`` prints once :func:`start_shadow` asked the fleet (``asked``:
    the devices asked to try it; None: every device)."""
    return {
        "asked": asked,
        "fleet": link.fleet,
        "candidate": candidate.manifest.label,
        "candidate_id": candidate.bundle_id,
        "serving": link.record.label,
        "sample": sample,
        "seconds": seconds,
        "seq": seq,
        "devices": devices,
    }


_STATUS = {AuthError: 401, RolloutError: 409, BundleError: 400, ConfigError: 400, BrokerError: 503}

Handler = Callable[[Request, Identity], Awaitable[JSONResponse]]


def _error(exc: EdgekitError) -> JSONResponse:
    status = next((code for cls, code in _STATUS.items() if isinstance(exc, cls)), 500)
    doc: dict[str, Any] = {"error": str(exc), "exit_code": exc.exit_code}
    if isinstance(exc, PromotionRefusedError):
        doc["verdict"] = exc.verdict  # what `shadow promote --json` prints
    return JSONResponse(doc, status_code=status)


def api_routes(ctx: ApiContext) -> list[Route]:
    accounts = Accounts(ctx.registry)

    def identify(request: Request) -> Identity:
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not given:
            raise AuthError("sign in first: `edgekit login --server URL`")
        if ctx.token and hmac.compare_digest(given.encode(), ctx.token.encode()):
            return Identity("service-token", "operator")
        return accounts.identify(given)

    def guarded(handler: Handler, act: bool = False) -> Callable[[Request], Awaitable[JSONResponse]]:
        async def endpoint(request: Request) -> JSONResponse:
            try:
                who = await run_in_threadpool(identify, request)
                if act and not who.may_act:
                    await run_in_threadpool(
                        ControlPlane(ctx.registry).audit,
                        request.url.path.rsplit("/", 1)[-1],
                        fleet=request.path_params.get("fleet"),
                        result="refused",
                        detail="a viewer may not change the fleet",
                        actor=who.name,
                    )
                    return JSONResponse(
                        {
                            "error": f"{who.name} is a viewer and may not change the fleet; "
                            "ask an operator, or for an operator account",
                            "exit_code": AuthError.exit_code,
                        },
                        status_code=403,
                    )
                return await handler(request, who)
            except EdgekitError as exc:
                if not isinstance(exc, (AuthError, RolloutError)):
                    log.warning("API %s %s refused: %s", request.method, request.url.path, exc)
                return _error(exc)

        return endpoint

    async def login(request: Request) -> JSONResponse:
        try:
            doc = await request.json()
            name, password = str(doc["account"]), str(doc["password"])
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": "send {account, password} as JSON"}, status_code=400)
        try:
            token, expires = await run_in_threadpool(accounts.sign_in, name, password)
        except AuthError as exc:
            log.warning(
                "failed sign-in for account %r from %s", name, request.client.host if request.client else "?"
            )
            return _error(exc)
        found = accounts.find(name)
        role = found.role if found else "viewer"
        return JSONResponse(
            {"token": token, "expires_at": expires.isoformat(), "account": name, "role": role}
        )

    async def logout(request: Request, who: Identity) -> JSONResponse:
        token = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        await run_in_threadpool(accounts.sign_out, token)
        return JSONResponse({"signed_out": who.name})

    async def whoami(request: Request, who: Identity) -> JSONResponse:
        return JSONResponse({"account": who.name, "role": who.role})

    async def rollout(request: Request, who: Identity) -> JSONResponse:
        fleet = request.path_params["fleet"]
        doc = await run_in_threadpool(lambda: rollout_json(ControlPlane(ctx.registry, actor=who.name), fleet))
        return JSONResponse(doc)

    async def audit(request: Request, who: Identity) -> JSONResponse:
        fleet = request.query_params.get("fleet")
        try:
            limit = max(1, min(int(request.query_params.get("limit", "50")), 1000))
        except ValueError:
            raise ConfigError("limit must be a whole number") from None
        rows = await run_in_threadpool(lambda: ControlPlane(ctx.registry).audit_log(fleet, limit))
        return JSONResponse([audit_json(a) for a in rows])

    async def push(request: Request, who: Identity) -> JSONResponse:
        fleet = request.path_params["fleet"]
        q = request.query_params
        try:
            policy = RolloutPolicy(
                canary=int(q.get("canary", 0)),
                soak_s=_number(q, "soak", 60.0),
                install_timeout_s=_number(q, "timeout", 600.0),
                max_error_rate=float(q.get("max_error_rate", 0.05)),
                max_p95_regression=float(q.get("max_p95_regression", 0.5)),
                abort_on_drift=q.get("ignore_drift", "false") != "true",
                # The shadow phase (push --canary N --shadow-first): 0 s is none.
                shadow_s=_number(q, "shadow_s", 0.0),
                shadow_sample=_number(q, "shadow_sample", 0.1),
                min_agreement=_number(q, "min_agreement", 0.98),
                max_latency_ratio=_number(q, "max_latency_ratio", 1.2),
                max_error=_optional_number(q, "max_error"),
            )
        except ValueError as exc:
            raise ConfigError(f"bad rollout setting: {exc}") from None
        body = await request.body()
        if len(body) > MAX_UPLOAD:
            raise BundleError(f"upload of {len(body)} bytes is over the {MAX_UPLOAD} byte limit")

        def work(control: ControlPlane, link: FleetLink) -> dict[str, Any]:
            bundle = _resolve(
                control, ctx.key(), body, q.get("kind", "bundle"), q.get("name"), q.get("version")
            )
            with pushing(control, link, bundle, policy, f"edgekit push --server ({who.name})") as (
                started,
                _,
            ):
                return outcome_json(started, link)

        return JSONResponse(await run_in_threadpool(ctx.with_link, who, fleet, work))

    async def abort(request: Request, who: Identity) -> JSONResponse:
        fleet = request.path_params["fleet"]

        def work(control: ControlPlane, link: FleetLink) -> dict[str, Any]:
            return outcome_json(
                abort_rollout(control, link, f"edgekit rollout abort --server ({who.name})"), link
            )

        return JSONResponse(await run_in_threadpool(ctx.with_link, who, fleet, work))

    async def rollback(request: Request, who: Identity) -> JSONResponse:
        fleet = request.path_params["fleet"]
        to = request.query_params.get("to") or None
        timeout = float(request.query_params.get("timeout", 600))
        device = request.query_params.get("device") or None
        if device is not None:

            def one(control: ControlPlane, link: FleetLink) -> dict[str, Any]:
                bundle = previous_bundle(control, fleet, to)
                holder = f"edgekit fleet rollback --device --server ({who.name})"
                seq = rollback_device(control, link, device, bundle, holder)
                return {"fleet": fleet, "device": device, "bundle": bundle.manifest.label, "seq": seq}

            return JSONResponse(await run_in_threadpool(ctx.with_link, who, fleet, one))

        def work(control: ControlPlane, link: FleetLink) -> dict[str, Any]:
            bundle = previous_bundle(control, fleet, to)
            holder = f"edgekit fleet rollback --server ({who.name})"
            with rolling_back(control, link, bundle, timeout, holder) as (started, _):
                return outcome_json(started, link)

        return JSONResponse(await run_in_threadpool(ctx.with_link, who, fleet, work))

    async def device_add(request: Request, who: Identity) -> JSONResponse:
        try:
            doc = await request.json()
            device, fleet = str(doc["device"]), str(doc["fleet"])
            broker, state_dir = str(doc.get("broker") or ""), str(doc.get("state_dir") or DEFAULT_STATE_DIR)
            tls, force = bool(doc.get("tls", False)), bool(doc.get("force", False))
        except (ValueError, KeyError, TypeError):
            raise ConfigError("send {device, fleet[, broker, state_dir, tls, force]} as JSON") from None
        return JSONResponse(
            await run_in_threadpool(provision_through, ctx, who, device, fleet, broker, state_dir, tls, force)
        )

    async def shadow_status(request: Request, who: Identity) -> JSONResponse:
        fleet = request.path_params["fleet"]
        return JSONResponse(await run_in_threadpool(shadow_json, ctx.registry, fleet))

    async def shadow_start(request: Request, who: Identity) -> JSONResponse:
        fleet = request.path_params["fleet"]
        q = request.query_params
        sample, seconds = _number(q, "sample", 0.1), _number(q, "seconds", 1800.0)
        if not 0 < sample <= 1:
            raise ConfigError(
                f"sample {sample:g}: give the share of live inputs compared, above 0 and at most 1"
            )
        if not 0 < seconds <= LONGEST_S:
            raise ConfigError(
                f"seconds {seconds:g}: give how long devices try the candidate, above 0 and at most "
                f"{LONGEST_S} ({LONGEST_S // 86400} days)"
            )
        body = await request.body()
        if len(body) > MAX_UPLOAD:
            raise BundleError(f"upload of {len(body)} bytes is over the {MAX_UPLOAD} byte limit")

        count = None if q.get("devices") in (None, "") else int(_number(q, "devices", 0))
        names = [n for n in (q.get("device") or "").split(",") if n]
        if count is not None and (count < 1 or names):
            raise ConfigError("devices: give a number of devices (at least 1), or device=NAME,..., not both")

        def work(control: ControlPlane, link: FleetLink) -> dict[str, Any]:
            asked = shadow_devices(link, count, names)  # before anything is catalogued or sent
            candidate = _resolve(
                control, ctx.key(), body, q.get("kind", "bundle"), q.get("name"), q.get("version")
            )
            holder = f"edgekit push --shadow --server ({who.name})"
            seq = start_shadow(control, link, candidate, sample, seconds, holder, asked)
            return shadow_started_json(link, candidate, sample, seconds, seq, len(link.devices()), asked)

        return JSONResponse(await run_in_threadpool(ctx.with_link, who, fleet, work))

    async def shadow_promote(request: Request, who: Identity) -> JSONResponse:
        fleet = request.path_params["fleet"]
        q = request.query_params
        min_agreement = _number(q, "min_agreement", 0.98)
        max_latency_ratio = _number(q, "max_latency_ratio", 1.2)
        canary = int(_number(q, "canary", 0))
        max_error = _optional_number(q, "max_error")
        if (
            not 0 <= min_agreement <= 1
            or max_latency_ratio < 0
            or canary < 0
            or (max_error is not None and max_error < 0)
        ):
            raise ConfigError(
                "min_agreement is a share from 0 to 1, max_latency_ratio, max_error and canary are 0 or more"
            )
        control = ctx.control(who)
        verdict = await run_in_threadpool(
            shadow_verdict, control, fleet, min_agreement, max_latency_ratio, max_error
        )

        def work(control: ControlPlane, link: FleetLink) -> dict[str, Any]:
            return promote_shadow(
                control, link, verdict, canary, f"edgekit shadow promote --server ({who.name})"
            )

        return JSONResponse(await run_in_threadpool(ctx.with_link, who, fleet, work))

    async def shadow_stop(request: Request, who: Identity) -> JSONResponse:
        fleet = request.path_params["fleet"]

        def work(control: ControlPlane, link: FleetLink) -> dict[str, Any]:
            seq = stop_shadow(control, link, f"edgekit shadow stop --server ({who.name})")
            return {"fleet": fleet, "seq": seq, "shadow": None}

        return JSONResponse(await run_in_threadpool(ctx.with_link, who, fleet, work))

    return [
        Route("/api/v1/devices", guarded(device_add, act=True), methods=["POST"]),
        Route("/api/v1/login", login, methods=["POST"]),
        Route("/api/v1/logout", guarded(logout), methods=["POST"]),
        Route("/api/v1/whoami", guarded(whoami)),
        Route("/api/v1/audit", guarded(audit)),
        Route("/api/v1/fleets/{fleet}/rollout", guarded(rollout)),
        Route("/api/v1/fleets/{fleet}/push", guarded(push, act=True), methods=["POST"]),
        Route("/api/v1/fleets/{fleet}/abort", guarded(abort, act=True), methods=["POST"]),
        Route("/api/v1/fleets/{fleet}/rollback", guarded(rollback, act=True), methods=["POST"]),
        Route("/api/v1/fleets/{fleet}/shadow", guarded(shadow_status)),
        Route("/api/v1/fleets/{fleet}/shadow", guarded(shadow_start, act=True), methods=["POST"]),
        Route("/api/v1/fleets/{fleet}/shadow/promote", guarded(shadow_promote, act=True), methods=["POST"]),
        Route("/api/v1/fleets/{fleet}/shadow/stop", guarded(shadow_stop, act=True), methods=["POST"]),
    ]


def provision_through(
    ctx: ApiContext,
    who: Identity,
    device: str,
    fleet: str,
    broker: str,
    state_dir: str,
    tls: bool,
    force: bool,
) -> dict[str, Any]:
    """``edgekit device add --server``: the service provisions the device with its keys and its
    broker accounts, records it, and returns the config (and TLS files) for the operator to
    write. (The broker must be told again: ``edgekit broker mosquitto-config`` on the service.)"""
    if ctx.home is None:
        raise ConfigError("this fleet service has no EDGEKIT_HOME to keep broker accounts in")
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp) / f"{device}.toml"
        done = provision_device(
            device, fleet, output, broker=broker, state_dir=state_dir, tls=tls, force=force, home=ctx.home
        )
        files = {p.name: p.read_text() for p in Path(tmp).iterdir() if p != output}
        config = output.read_text()
    ControlPlane(ctx.registry, actor=who.name).record_provisioned(device, fleet, done.username, tls)
    return {
        "device": device,
        "fleet": fleet,
        "broker": broker,
        "state_dir": state_dir,
        "trusted_key_ids": list(done.trusted_key_ids),
        "username": done.username,
        "tls": tls,
        "config": config,
        "files": files,
    }


def _number(query: Any, name: str, default: float) -> float:
    """A number from the query string; ConfigError (400) naming it when it is not one."""
    text = query.get(name)
    if text is None or text == "":
        return default
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{name} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ConfigError(f"{name} {text!r} is not a finite number")
    return value


def _optional_number(query: Any, name: str) -> Optional[float]:
    """A number from the query string, or None when it is not given."""
    return None if query.get(name) in (None, "") else _number(query, name, 0.0)


def _resolve(
    control: ControlPlane,
    key: SigningKey,
    body: bytes,
    kind: str,
    name: Optional[str],
    version: Optional[str],
) -> Bundle:
    """The bundle a push names: an uploaded ``.ekb`` (``kind=bundle``), an uploaded ``.tflite``
    bundled and signed here (``kind=tflite``, with ``name``), or ``name`` in the catalog."""
    if kind == "catalog" or not body:
        if not name:
            raise ConfigError("name the bundle to push, or upload one")
        return control.catalog.read(name, version)
    if kind == "tflite":
        if not name:
            raise ConfigError("an uploaded .tflite model needs a bundle name")
        with tempfile.TemporaryDirectory() as tmp:
            model, out = Path(tmp) / "model.tflite", Path(tmp) / "bundle.ekb"
            model.write_bytes(body)
            create_bundle(
                model, name=name, version=version or control.catalog.next_version(name), key=key, output=out
            )
            return control.catalog.add(out.read_bytes())
    if kind != "bundle":
        raise ConfigError(f"unknown upload kind {kind!r}: use bundle, tflite or catalog")
    return control.catalog.add(body)
