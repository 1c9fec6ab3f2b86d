"""`make demo` in CI, reduced (two devices, two epochs): the outcome is checked, not just exit 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_demo_ships_to_every_device_and_the_registry_flags_the_shifted_one(tmp_path):
    out = tmp_path / "demo-output"
    env = {**os.environ, "DEMO_DEVICES": "2", "DEMO_EPOCHS": "2", "DEMO_OUT": str(out)}
    env.pop("DEMO_KEEP", None)
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart" / "demo.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["devices"]) == {"cam-1", "cam-2"}
    assert all(d["version"] == "1.0.0" for d in summary["devices"].values())
    assert summary["drifted"] == ["cam-2"]
    report = json.loads((out / "convert-report.json").read_text())
    assert report  # the evaluation table's figures were written
    for step in (
        "Convert it to int8",
        "Push the bundle",
        "inverted images for cam-2",
        "dashboard: http://127.0.0.1:",
    ):
        assert step in result.stdout
