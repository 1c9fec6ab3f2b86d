"""Agent speed and memory against a bare interpreter, measured side by side in one run.

    .venv/bin/python benchmarks/bench_agent.py [--threads N] [--seconds S] [--json]

Throughput: ``agent.predict(x)`` (drift sampling at the default rate, telemetry recording on)
against a bare loop of ``set_tensor / invoke / get_tensor`` on the same model, runtime and
thread count, in alternating rounds in the same process; the ratio is the median over rounds.
Memory: two fresh subprocesses, one running the bare loop, one the agent, each reporting
its resident set (VmRSS) and peak (VmHWM) after 2000 calls.
Targets: throughput ratio >= 0.97; agent RSS <= bare RSS + 15 MB.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _models import digits_models, face_baseline_data, face_detector
from edgekit import SigningKey, create_bundle
from edgekit.agent import Agent

CHILD = r"""
import sys, json
import numpy as np
mode, model, config, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
def rss():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}
if mode == "bare":
    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(model_content=open(model, "rb").read(), num_threads=threads)
    it.allocate_tensors()
    i, outs = it.get_input_details()[0], [d["index"] for d in it.get_output_details()]
    x = np.random.default_rng(0).random(i["shape"]).astype(i["dtype"])
    for _ in range(2000):
        it.set_tensor(i["index"], x); it.invoke(); [it.get_tensor(o) for o in outs]
else:
    from edgekit.agent import Agent
    agent = Agent.from_config(config)
    shape = agent.status().inputs[0]["shape"]
    x = np.random.default_rng(0).random(shape).astype(np.float32)
    for _ in range(2000):
        agent.predict(x)
    agent.flush_telemetry()
print(json.dumps(rss()))
"""


def write_config(path: Path, key: SigningKey, state: Path, threads: int) -> Path:
    path.write_text(
        f'device = "bench"\nfleet = "bench"\nstate_dir = "{state}"\nruntime = "ai_edge_litert"\n'
        f"threads = {threads}\ntrusted_keys = '''\n{key.public.pem().decode()}'''\n"
    )
    return path


def throughput(model: Path, config: Path, threads: int, seconds: float, rounds: int) -> dict[str, float]:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model.read_bytes(), num_threads=threads)
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]
    x = np.random.default_rng(0).random(inp["shape"]).astype(inp["dtype"])
    agent = Agent.from_config(config, background=False)
    i_index = inp["index"]
    o_indices = [d["index"] for d in interpreter.get_output_details()]

    def bare(n: int) -> None:
        # What a caller writes by hand: feed, run, fetch every output (predict() returns them all).
        for _ in range(n):
            interpreter.set_tensor(i_index, x)
            interpreter.invoke()
            [interpreter.get_tensor(o) for o in o_indices]

    def served(n: int) -> None:
        predict = agent.predict
        for _ in range(n):
            predict(x)

    # Calls per round, sized so that a round of the bare loop lasts about `seconds`.
    start = time.perf_counter()
    bare(50)
    per_call = (time.perf_counter() - start) / 50
    n = max(100, int(seconds / per_call))
    ratios, bare_rates, agent_rates = [], [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        bare(n)
        t1 = time.perf_counter()
        served(n)
        t2 = time.perf_counter()
        bare_rates.append(n / (t1 - t0))
        agent_rates.append(n / (t2 - t1))
        ratios.append((t1 - t0) / (t2 - t1))
    sampled = agent._served.drift.sampled if agent._served and agent._served.drift else 0
    agent.close()
    return {
        "bare_per_s": statistics.median(bare_rates),
        "agent_per_s": statistics.median(agent_rates),
        "ratio": statistics.median(ratios),
        "calls_per_round": n,
        "drift_sampled": sampled,
    }


def memory(model: Path, config: Path, threads: int) -> dict[str, int]:
    result = {}
    for mode in ("bare", "agent"):
        out = subprocess.run(
            [sys.executable, "-c", CHILD, mode, str(model), str(config), str(threads)],
            check=True,
            capture_output=True,
            text=True,
        )
        result[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        "bare_rss": result["bare"]["VmRSS"],
        "agent_rss": result["agent"]["VmRSS"],
        "bare_peak": result["bare"]["VmHWM"],
        "agent_peak": result["agent"]["VmHWM"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="interpreter threads for both sides")
    parser.add_argument("--seconds", type=float, default=0.5, help="length of one bare round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        key = SigningKey.generate()
        digits = digits_models()
        face = face_detector(tmp)
        cases = [
            ("digits fp32 (8x8x1, tiny)", digits / "digits_fp32.tflite", digits / "digits_test.npz"),
            ("face detector (128x128x3)", face, face_baseline_data(tmp)),
        ]
        for label, model, data in cases:
            bundle = tmp / f"{model.stem}.ekb"
            create_bundle(model, name="bench", version="1.0.0", key=key, output=bundle, baseline=data)
            config = write_config(tmp / f"{model.stem}.toml", key, tmp / f"state-{model.stem}", args.threads)
            with Agent.from_config(config, background=False) as agent:
                agent.install(bundle)
            speed = throughput(model, config, args.threads, args.seconds, args.rounds)
            mem = memory(model, config, args.threads)
            rows.append({"model": label, "threads": args.threads, **speed, **mem})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    mb = 1024 * 1024
    for r in rows:
        print(f"{r['model']}, {r['threads']} thread(s):")
        print(
            f"  throughput  bare {r['bare_per_s']:,.0f}/s  agent {r['agent_per_s']:,.0f}/s  "
            f"ratio {r['ratio']:.3f}  (target >= 0.97: {'met' if r['ratio'] >= 0.97 else 'NOT met'}; "
            f"{r['drift_sampled']} inputs sampled for drift)"
        )
        extra = (r["agent_rss"] - r["bare_rss"]) / mb
        print(
            f"  memory      bare RSS {r['bare_rss'] / mb:.1f} MB  agent RSS {r['agent_rss'] / mb:.1f} MB  "
            f"(+{extra:.1f} MB; target <= +15 MB: {'met' if extra <= 15 else 'NOT met'}); "
            f"peaks {r['bare_peak'] / mb:.1f} / {r['agent_peak'] / mb:.1f} MB"
        )


if __name__ == "__main__":
    main()
