"""The fleet dashboard: HTML pages, a JSON API under /api/ and Prometheus /metrics."""

from __future__ import annotations

from .app import check_bind, create_app
from .metrics import FleetMetrics

__all__ = ["FleetMetrics", "check_bind", "create_app"]
