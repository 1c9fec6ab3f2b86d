"""Install bundles and predict with them: run on the emulated board by the agent's own venv
(numpy, LiteRT and edgekit only), and in-process on the host for the x86 reference.

    python on_board.py JOB.json OUT_DIR

JOB.json names, relative to its own directory, each bundle and an .npz whose ``x`` holds the
inputs, one per row with the model's batch axis (``(N, 1, ...)``), and gives the trusted public
key. Each bundle goes into a fresh state directory under OUT_DIR; OUT_DIR/results.json gets each
install's result, OUT_DIR/outputs.npz every output (``NAME/J``: output J over the N inputs).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from edgekit.agent import Agent
from edgekit.provision import agent_config_text


def run(job: Path, out: Path) -> dict[str, Any]:
    spec = json.loads(job.read_text())
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    for name, item in spec["bundles"].items():
        config = out / f"{name}.toml"
        config.write_text(agent_config_text(name, "lab", "", str(out / f"state-{name}"), spec["pem"]))
        with Agent.from_config(config, background=False) as agent:
            result = agent.install(job.parent / item["bundle"])
            with np.load(job.parent / item["inputs"]) as data:
                inputs = data["x"]
            rows: list[list[np.ndarray]] = []
            for x in inputs:
                outputs = agent.predict(x)
                rows.append([np.asarray(o) for o in (outputs if isinstance(outputs, list) else [outputs])])
            results[name] = {**result.to_dict(), "runtime": agent.status().runtime}
        for j in range(len(rows[0])):
            arrays[f"{name}/{j}"] = np.stack([row[j] for row in rows])
    (out / "results.json").write_text(json.dumps(results, indent=1))
    np.savez(out / "outputs.npz", **arrays)  # type: ignore[arg-type]
    return results


if __name__ == "__main__":
    run(Path(sys.argv[1]), Path(sys.argv[2]))
