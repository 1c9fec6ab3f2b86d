"""The bench view (docs/bench.md): a fleet's newest on-fleet benchmark, by board class, with
each candidate's figures side by side (the same summary `edgekit bench results` prints).

``/fleets/{fleet}/bench`` is the page (static/bench.html, static/bench.js), and
``/api/fleets/{fleet}/bench[?bench=SEQ]`` its JSON."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Route

from ..bench import row_of_result, summarize
from ..registry import Registry

__all__ = ["bench_routes", "bench_view"]

STATIC = Path(__file__).resolve().parent / "static"


def bench_view(registry: Registry, fleet: str, bench_seq: int | None = None) -> dict[str, Any]:
    """The summary of ``fleet``'s benchmark ``bench_seq`` (default: the newest reported)."""
    return {"fleet": fleet, **summarize([row_of_result(r) for r in registry.bench_results(fleet, bench_seq)])}


def bench_routes(registry: Registry) -> list[Route]:
    """The bench page and its JSON, for :func:`edgekit.fleet.dashboard.create_app`."""

    async def api(request: Request) -> JSONResponse:
        text = request.query_params.get("bench", "")
        if text and not re.fullmatch(r"[0-9]{1,18}", text):
            why = f"bench={text[:40]!r} is not a benchmark number; give one like ?bench=12, or none for the newest"
            return JSONResponse({"error": why}, status_code=400)
        seq = int(text) if text else None
        return JSONResponse(await run_in_threadpool(bench_view, registry, request.path_params["fleet"], seq))

    async def page(request: Request) -> FileResponse:
        return FileResponse(STATIC / "bench.html")

    return [Route("/api/fleets/{fleet}/bench", api), Route("/fleets/{fleet}/bench", page)]
