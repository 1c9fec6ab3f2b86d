"""The shadow view: each fleet's shadow evaluation (docs/shadow.md) per device and in total, in
an owner's words ("The new model agreed with the current one on 97% of 1,200 inputs
(95-98%)"), with Promote and Stop for operators. The buttons run the code of ``edgekit shadow
promote|stop`` (:mod:`edgekit.fleet.actions`) through the dashboard's ``act``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Optional

from edgekit.errors import ConfigError, PromotionRefusedError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Route

from ..actions import promote_shadow, shadow_verdict, stop_shadow
from ..api import shadow_json
from ..control import ControlPlane
from ..push import FleetLink
from ..registry import Registry

__all__ = ["shadow_routes", "shadow_views"]

PAGE = Path(__file__).resolve().parent / "static" / "shadow.html"

#: The dashboard's ``act``: an operator's button running ``work`` over the service's link.
Act = Callable[
    [Request, str, str, Callable[[ControlPlane, FleetLink, str], dict[str, Any]]], Awaitable[JSONResponse]
]

STATES = {
    "running": "trying the new model",
    "failed": "the new model failed here and was unloaded; the current model kept serving",
    "stopped": "stopped",
    "expired": "finished: its time was up",
    "not reported": "asked to try the new model; it has not reported yet",
}

SEVERITY = {
    None: "not judged yet",
    "ok": "this device's inputs look like the data the new model was built on",
    "inputs changed": "this device's inputs differ from the data the new model was built on; "
    "its answers hold up so far",
    "model affected": "this device's inputs push the new model away from what it was built on: "
    "do not switch to it here",
}


def _percent(value: float) -> str:
    """97%, or 99.6% where rounding would say 100% (or 0%) and it is not."""
    if 0.995 <= value < 1 or 0 < value < 0.005:
        return f"{100 * value:.1f}%"
    return f"{100 * value:.0f}%"


def _ms(value: float) -> str:
    """Three decimals below 1 ms: a tiny model's 0.004 ms is not 0.0 ms."""
    return f"{value:.1f} ms" if value >= 1 else f"{value:.3f} ms"


def agreement_words(figures: dict[str, Any]) -> str:
    """How often the two models agreed, in a sentence an owner reads."""
    if not figures["compared"]:
        return "No input compared yet: devices report every telemetry window."
    if figures["agreement"] is None:
        mean, top = figures["abs_error_mean"], figures["abs_error_max"]
        if top is None:
            return f"{figures['compared']:,} inputs compared; the outputs are not classes to agree on."
        return (
            f"{figures['compared']:,} inputs compared: the two models' outputs differ by at most "
            f"{top:.4g} (on average {mean:.4g})."
        )
    low, high = _percent(figures["agreement_low"]), _percent(figures["agreement_high"])
    return (
        f"The new model agreed with the current one on {_percent(figures['agreement'])} of "
        f"{figures['classified']:,} inputs ({low.rstrip('%')}–{high})."
    )


def speed_words(figures: dict[str, Any]) -> Optional[str]:
    serving, trying, ratio = figures["serving_p95_ms"], figures["candidate_p95_ms"], figures["latency_ratio"]
    if serving is None or trying is None or ratio is None:
        return None
    how = "as long" if ratio >= 1 else "the time"
    words = (
        f"The new model answers within {_ms(trying)}, the current one within {_ms(serving)} on the same "
        f"inputs (95% of answers): {ratio:.2f}× {how}."
    )
    serving_p50, trying_p50 = figures.get("serving_p50_ms"), figures.get("candidate_p50_ms")
    if serving_p50 is not None and trying_p50 is not None:
        words += f" Half of its answers come within {_ms(trying_p50)}, the current one's within {_ms(serving_p50)}."
    return words


def dropped_words(figures: dict[str, Any]) -> Optional[str]:
    dropped = figures["dropped"]
    if not dropped:
        return None
    return f"{dropped:,} inputs were skipped because the device was busy (serving comes first)."


def memory_words(figures: dict[str, Any]) -> Optional[str]:
    peak = figures.get("peak_memory_bytes")
    if peak is None:
        return None
    return f"With both models loaded, edgekit used at most {peak / (1024 * 1024):.0f} MiB of memory."


def _device_view(d: dict[str, Any]) -> dict[str, Any]:
    words = [agreement_words(d), speed_words(d), dropped_words(d), memory_words(d)]
    return {
        **d,
        "state_words": STATES.get(d["state"], d["state"]),
        "severity_words": SEVERITY.get(d["severity"], d["severity"]),
        "words": [w for w in words if w],
    }


def shadow_views(registry: Registry) -> list[dict[str, Any]]:
    """Every fleet whose devices reported a shadow evaluation: its newest candidate's figures
    per device and in total (``edgekit shadow status --json``), each with its sentences."""
    views = []
    for fleet in sorted({d.fleet for d in registry.devices()}):
        doc = shadow_json(registry, fleet)
        if doc["candidate"] is None:
            continue
        total = doc["total"]
        failed = [d["device"] for d in doc["devices"] if d["state"] == "failed"]
        running = sum(d["state"] == "running" for d in doc["devices"])
        views.append(
            {
                **doc,
                "devices": [_device_view(d) for d in doc["devices"]],
                "total": {**total, "words": [w for w in (agreement_words(total), speed_words(total)) if w]},
                "headline": (
                    f"{doc['candidate']} tried beside the serving model on {len(doc['devices'])} "
                    f"device(s) of fleet {fleet}"
                    + (f"; {running} still trying it" if running else "")
                    + (f"; it failed on {', '.join(failed)}" if failed else "")
                ),
            }
        )
    return views


def _setting(doc: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = doc.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ConfigError(f"{name} must be a number from {low:g} to {high:g}")
    return float(value)


def shadow_routes(registry: Registry, act: Act) -> list[Route]:
    """The page ``/shadow``, ``GET /api/shadow``, and the operator's ``POST /api/shadow/{fleet}/promote`` (JSON
    ``{min_agreement, max_latency_ratio, canary, max_error}``: refused, it answers the verdict with its
    reasons) and ``POST /api/shadow/{fleet}/stop``."""

    async def views(request: Request) -> JSONResponse:
        return JSONResponse(await run_in_threadpool(shadow_views, registry))

    async def promote(request: Request) -> JSONResponse:
        fleet = request.path_params["fleet"]
        try:
            doc = await request.json()
            if not isinstance(doc, dict):
                raise ConfigError("send a JSON object")
            min_agreement = _setting(doc, "min_agreement", 0.98, 0, 1)
            max_latency_ratio = _setting(doc, "max_latency_ratio", 1.2, 0, 1000)
            canary = int(_setting(doc, "canary", 0, 0, 10_000))
            # None (or absent): output differences are not judged (outputs that are not
            # classes then do not pass: edgekit.fleet.shadow.judge).
            max_error = None if doc.get("max_error") is None else _setting(doc, "max_error", 0, 0, 1e12)
        except (ValueError, ConfigError) as exc:
            why = f"send {{min_agreement, max_latency_ratio, canary, max_error}} as JSON: {exc}"
            return JSONResponse({"error": why}, status_code=400)

        def work(control: ControlPlane, link: FleetLink, holder: str) -> dict[str, Any]:
            try:
                verdict = shadow_verdict(control, fleet, min_agreement, max_latency_ratio, max_error)
            except PromotionRefusedError as refused:  # the page lists the reasons
                return {**refused.verdict, "error": str(refused)}
            return promote_shadow(control, link, verdict, canary, holder)

        return await act(request, "shadow-promote", fleet, work)

    async def stop(request: Request) -> JSONResponse:
        fleet = request.path_params["fleet"]

        def work(control: ControlPlane, link: FleetLink, holder: str) -> dict[str, Any]:
            return {"fleet": fleet, "seq": stop_shadow(control, link, holder), "shadow": None}

        return await act(request, "shadow-stop", fleet, work)

    async def page(request: Request) -> FileResponse:
        return FileResponse(PAGE)

    return [
        Route("/shadow", page),
        Route("/api/shadow", views),
        Route("/api/shadow/{fleet}/promote", promote, methods=["POST"]),
        Route("/api/shadow/{fleet}/stop", stop, methods=["POST"]),
    ]
