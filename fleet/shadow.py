"""What the fleet's devices measured of a candidate in the shadow (docs/shadow.md), summed up
per device and in total, with a confidence interval on agreement. Pure: rows in, a dict out."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional, Protocol

__all__ = ["ShadowWindowLike", "judge", "summarize", "wilson_interval"]


class ShadowWindowLike(Protocol):
    """A registry ``shadow_windows`` row (:class:`edgekit.fleet.registry.models.ShadowWindow`)."""

    device: str
    candidate_id: str
    candidate_label: str
    serving_version: Optional[str]
    state: str
    sample_rate: Optional[float]
    compared: int
    dropped: int
    classified: int
    agreed: int
    abs_error_mean: Optional[float]
    abs_error_max: Optional[float]
    serving_p50_ms: Optional[float]
    serving_p95_ms: Optional[float]
    candidate_p50_ms: Optional[float]
    candidate_p95_ms: Optional[float]
    error: Optional[str]
    candidate_severity: Optional[str]
    peak_memory_bytes: Optional[int]


def wilson_interval(agreed: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of the proportion ``agreed / n``: sound for
    small ``n`` and for proportions near 0 or 1, where the normal approximation is not."""
    if n <= 0:
        return (0.0, 1.0)
    p = agreed / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def _median(values: Sequence[Optional[float]]) -> Optional[float]:
    """The middle one of the values given (the upper one of an even count), or None."""
    known = sorted(v for v in values if v is not None)
    return known[len(known) // 2] if known else None


def _figures(windows: Sequence[ShadowWindowLike]) -> dict[str, Any]:
    compared = sum(w.compared for w in windows)
    classified = sum(w.classified for w in windows)
    agreed = sum(w.agreed for w in windows)
    weighted = [
        (w.abs_error_mean, w.compared) for w in windows if w.abs_error_mean is not None and w.compared
    ]
    weight = sum(n for _, n in weighted)
    maxima = [w.abs_error_max for w in windows if w.abs_error_max is not None]
    low, high = wilson_interval(agreed, classified)
    # Percentiles of different windows cannot be merged: the median of the windows' p50s and p95s.
    serving_p50 = _median([w.serving_p50_ms for w in windows])
    candidate_p50 = _median([w.candidate_p50_ms for w in windows])
    serving_p95 = _median([w.serving_p95_ms for w in windows])
    candidate_p95 = _median([w.candidate_p95_ms for w in windows])
    # Rows from before the figure (and plain test rows) may lack it: read with a default.
    peaks = [p for p in (getattr(w, "peak_memory_bytes", None) for w in windows) if p is not None]
    return {
        "compared": compared,
        "dropped": sum(w.dropped for w in windows),
        "classified": classified,
        "agreed": agreed,
        "agreement": agreed / classified if classified else None,
        "agreement_low": low if classified else None,
        "agreement_high": high if classified else None,
        "abs_error_mean": sum(m * n for m, n in weighted) / weight if weight else None,
        "abs_error_max": max(maxima) if maxima else None,
        "serving_p50_ms": serving_p50,
        "serving_p95_ms": serving_p95,
        "candidate_p50_ms": candidate_p50,
        "candidate_p95_ms": candidate_p95,
        "latency_ratio": candidate_p95 / serving_p95 if candidate_p95 and serving_p95 else None,
        # The agent's peak resident memory with both models loaded (the highest sampled).
        "peak_memory_bytes": max(peaks) if peaks else None,
    }


def _not_reported(device: str) -> dict[str, Any]:
    """A device asked to try the candidate that has not reported a window yet."""
    return {
        "device": device,
        "state": "not reported",
        "serving_version": None,
        "sample_rate": None,
        "error": None,
        "severity": None,
        **_figures([]),
    }


def summarize(windows: Sequence[ShadowWindowLike], devices: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Per device (its windows summed, its latest state and error) and in total. With
    ``devices`` (those asked to try the candidate: ``push --shadow --devices N``), only those
    count, and one that has not reported yet is listed as ``not reported``."""
    asked = None if devices is None else set(devices)
    if asked is not None:
        windows = [w for w in windows if w.device in asked]
    if not windows:
        return {
            "candidate": None,
            "candidate_id": None,
            "devices": [_not_reported(d) for d in sorted(asked or ())],
            "total": _figures([]),
        }
    by_device: dict[str, list[ShadowWindowLike]] = {d: [] for d in sorted(asked or ())}
    for window in windows:
        by_device.setdefault(window.device, []).append(window)
    summaries = []
    for device, own in sorted(by_device.items()):
        if not own:
            summaries.append(_not_reported(device))
            continue
        last = own[-1]
        summaries.append(
            {
                "device": device,
                "state": last.state,
                "serving_version": last.serving_version,
                "sample_rate": last.sample_rate,
                "error": next((w.error for w in reversed(own) if w.error), None),
                # The candidate's drift severity on this device's inputs: its latest verdict.
                "severity": next((w.candidate_severity for w in reversed(own) if w.candidate_severity), None),
                **_figures(own),
            }
        )
    return {
        "candidate": windows[-1].candidate_label,
        "candidate_id": windows[-1].candidate_id,
        "devices": summaries,
        "total": _figures(windows),
    }


def judge(
    summary: dict[str, Any],
    min_agreement: float,
    max_latency_ratio: float,
    max_error: Optional[float] = None,
) -> list[str]:
    """Why the candidate must not be promoted, one sentence per failing figure (empty: it
    passes): no inputs compared, the candidate failed, agreement below ``min_agreement``, its
    largest output difference above ``max_error`` (on dequantized values; None: not judged), its
    p95 latency above ``max_latency_ratio`` times the serving model's on the same inputs, or its
    drift severity on the device's inputs ``model affected`` (docs/agent.md, "Drift": judged
    from the candidate's own baseline and calibration).

    Outputs that are not classes (a regression, several outputs) have no agreement: without
    ``max_error`` nothing says the two models answer alike, so such a device does not pass."""
    if not summary["devices"]:
        return ["no device has reported a shadow evaluation"]
    reasons = []
    for d in summary["devices"]:
        name = d["device"]
        if d["state"] == "not reported":
            reasons.append(f"{name}: it was asked to try the candidate and has not reported yet")
        elif d["state"] == "failed":
            reasons.append(f"{name}: the candidate failed there ({d['error'] or 'no reason given'})")
        elif d["compared"] == 0:
            reasons.append(f"{name}: no input was compared yet")
        else:
            if d["agreement"] is not None and d["agreement"] < min_agreement:
                reasons.append(
                    f"{name}: agreement {d['agreement']:.1%} is below {min_agreement:.1%} "
                    f"({d['agreed']} of {d['classified']} inputs)"
                )
            worst = d.get("abs_error_max")
            if max_error is not None and worst is not None and worst > max_error:
                reasons.append(
                    f"{name}: the outputs differ by up to {worst:.4g}, over the {max_error:.4g} allowed"
                )
            if d["agreement"] is None and max_error is None:
                reasons.append(
                    f"{name}: its outputs are not classes, so agreement could not be judged; give "
                    "--max-error (the largest output difference you accept) to judge them"
                )
            if d.get("severity") == "model affected":
                reasons.append(
                    f"{name}: this device's inputs affect the candidate (drift: model affected): "
                    "its answers or confidence moved away from the data it was built on"
                )
            ratio = d["latency_ratio"]
            if ratio is not None and ratio > max_latency_ratio:
                reasons.append(
                    f"{name}: the candidate is {ratio:.2f}x as slow (p95), over {max_latency_ratio:.2f}x"
                )
    return reasons
