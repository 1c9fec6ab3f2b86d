"""What the benchmarks that measure serving beside other work share: an agent config, the
serving loop, the serving/candidate bundles, and the ratios against the baseline measured in
the same run (bench_shadow.py, bench_fleet_bench.py)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from edgekit import SigningKey, create_bundle
from edgekit.agent import Agent


def serving_inputs(models: Path) -> tuple[np.ndarray, np.ndarray]:
    """The digits test set, each in the model's own (1, 8, 8, 1) shape, and eight random
    224x224x3 images for MobileNetV2."""
    with np.load(models / "digits_test.npz") as data:
        xs = data["x"].astype(np.float32)[:, None]
    large = np.random.default_rng(0).random((8, 1, 224, 224, 3)).astype(np.float32)
    return xs, large


def write_config(path: Path, key: SigningKey, state: Path) -> Path:
    """An agent config for device ``bench`` of fleet ``bench``, one interpreter thread."""
    path.write_text(
        f'device = "bench"\nfleet = "bench"\nstate_dir = "{state}"\nthreads = 1\n'
        f"trusted_keys = '''\n{key.public.pem().decode()}'''\n"
    )
    return path


def bundles(tmp: Path, key: SigningKey, serving_model: Path, candidate_model: Path) -> tuple[Path, Path]:
    """``bench@1.0.0`` (serving) and ``bench@2.0.0`` (candidate), signed with ``key``."""
    serving, candidate = tmp / f"{serving_model.stem}-s.ekb", tmp / f"{candidate_model.stem}-c.ekb"
    create_bundle(serving_model, name="bench", version="1.0.0", key=key, output=serving)
    create_bundle(candidate_model, name="bench", version="2.0.0", key=key, output=candidate)
    return serving, candidate


def serve(agent: Agent, xs: np.ndarray, calls: int, gap: float = 0.0) -> tuple[float, float]:
    """Serving p95 (ms) and throughput (calls/s) over ``calls`` predict() calls, ``gap`` seconds
    apart (0: back to back)."""
    latencies = []
    predict = agent.predict
    start = time.perf_counter()
    for i in range(calls):
        x = xs[i % len(xs)]
        t0 = time.perf_counter()
        predict(x)
        latencies.append(time.perf_counter() - t0)
        if gap:
            time.sleep(gap)
    elapsed = time.perf_counter() - start
    return float(np.percentile(latencies, 95)) * 1000, calls / elapsed


def ratios(results: dict[str, dict[str, list[float]]], baseline: str) -> dict[str, dict[str, Any]]:
    """Per mode: median p95 and throughput over the rounds, and the median of the per-round
    ratios to ``baseline``'s (each round's modes ran back to back, so they share its load)."""
    base_p95, base_rate = results[baseline]["p95"], results[baseline]["rate"]
    return {
        mode: {
            "p95_ms": statistics.median(r["p95"]),
            "per_s": statistics.median(r["rate"]),
            "p95_ratio": statistics.median([a / b for a, b in zip(r["p95"], base_p95)]),
            "throughput_ratio": statistics.median([a / b for a, b in zip(r["rate"], base_rate)]),
        }
        for mode, r in results.items()
    }
