"""The fleet registry, rollout control and dashboard."""

from __future__ import annotations

__all__: list[str] = []
