"""What the ARM lane's boards share: bundles made here (x86) for a board, and the check that the
board installed them and predicts what x86 predicts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from board import Board
from edgekit import SigningKey, create_bundle
from edgekit.bundle import read_bundle
from edgekit.trust import TrustedKeys
from on_board import run as run_bundles


def bundles_job(job: Path, sources: dict, key: SigningKey) -> None:
    """Bundles made here (x86), their inputs and on_board.py in ``job``, for on_board.py to run."""
    job.mkdir()
    spec: dict = {"pem": key.public.pem().decode(), "bundles": {}}
    for name, (model, baseline, inputs) in sources.items():
        create_bundle(
            model, name=name, version="1.0.0", key=key, output=job / f"{name}.ekb", baseline=baseline
        )
        np.savez(job / f"{name}.npz", x=inputs)
        spec["bundles"][name] = {"bundle": f"{name}.ekb", "inputs": f"{name}.npz"}
    (job / "job.json").write_text(json.dumps(spec))
    (job / "on_board.py").write_bytes((Path(__file__).parent / "on_board.py").read_bytes())


def assert_board_predicts_like_x86(
    board: Board,
    job: Path,
    names: list[str],
    key: SigningKey,
    tmp_path: Path,
    runtime: str,
    quanta: int | None = None,
) -> dict[str, float]:
    """on_board.py on the board and here: each bundle installed on the board (verified, loaded,
    its health check passed on the board's own kernels) and predicted what x86 predicts, within
    the bundle's health-check tolerance; or, with ``quanta``, a quantized output within that
    many steps of its scale and the same class for every input. Returns each bundle's largest
    difference from x86."""
    ran = board.python(
        f"/host/{job.name}/on_board.py", f"/host/{job.name}/job.json", f"/host/{job.name}/arm", timeout=900
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    on_arm = json.loads((job / "arm" / "results.json").read_text())
    on_x86 = run_bundles(job / "job.json", tmp_path / "x86")
    assert all(r["runtime"] == "ai_edge_litert" for r in on_x86.values()), on_x86

    trusted = TrustedKeys([key.public])
    worst: dict[str, float] = {}
    with np.load(job / "arm" / "outputs.npz") as arm, np.load(tmp_path / "x86" / "outputs.npz") as x86:
        assert sorted(arm.files) == sorted(x86.files)
        for name in names:
            assert on_arm[name]["version"] == "1.0.0" and on_arm[name]["changed"] is True
            assert on_arm[name]["runtime"] == runtime, on_arm[name]
            health = read_bundle(job / f"{name}.ekb", trusted).manifest.healthcheck
            assert health is not None
            assert on_arm[name]["healthcheck_error"] <= health.atol
            manifest = read_bundle(job / f"{name}.ekb", trusted).manifest
            for output in (f for f in arm.files if f.startswith(f"{name}/")):
                worst[name] = max(worst.get(name, 0.0), float(np.abs(arm[output] - x86[output]).max()))
                spec = manifest.outputs[int(output.rsplit("/", 1)[1])]
                if quanta is not None and spec.quantized:
                    np.testing.assert_allclose(
                        arm[output], x86[output], atol=quanta * max(spec.scale) + 1e-9, rtol=0, err_msg=output
                    )
                    np.testing.assert_array_equal(arm[output].argmax(axis=-1), x86[output].argmax(axis=-1))
                    continue
                np.testing.assert_allclose(
                    arm[output], x86[output], atol=health.atol, rtol=health.rtol, err_msg=output
                )
    return worst
