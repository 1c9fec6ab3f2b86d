"""The device's footprint: import time, `edgekit-agent run` memory, and the venv a device installs.

    .venv/bin/python benchmarks/bench_device.py [--runs 15] [--skip-venv] [--json]

- Import time: the median wall time of ``python -c "import X"`` in fresh interpreters (``--runs``
  each), against ``python -c pass`` in the same run (the baseline) and the workstation's
  ``import edgekit.cli`` for comparison.
- Memory: a real ``edgekit-agent run`` process (local inference on, no broker), its VmRSS at idle
  (no model) and serving a MobileNetV2-size model (keras.applications.MobileNetV2, 224x224x3,
  weights=None: 3.5 M parameters, fp32, nothing downloaded) after 20 HTTP predictions; the
  baseline is a bare LiteRT interpreter running the same model in its own process.
- arm64: the site-packages a Raspberry Pi / Jetson gets from ``pip install edgekit[agent]``
  (arm64 wheels downloaded, unpacked and byte-compiled here).
- Venv size: fresh venvs with ``pip install edgekit[agent]`` from the local wheelhouse
  (``make setup``), as a device installs it, against ``edgekit[agent,cli]`` (what a device got
  before the command line moved to the ``cli`` extra); with and without pip/setuptools.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _models import REPO, mobilenet_v2
from edgekit import SigningKey, create_bundle

WHEELHOUSE = REPO / ".cache" / "wheelhouse"

BARE = r"""
import sys, json
import numpy as np
from ai_edge_litert.interpreter import Interpreter
it = Interpreter(model_path=sys.argv[1], num_threads=1)
it.allocate_tensors()
i = it.get_input_details()[0]
x = np.random.default_rng(0).random(i["shape"]).astype(i["dtype"])
for _ in range(20):
    it.set_tensor(i["index"], x); it.invoke(); it.get_tensor(it.get_output_details()[0]["index"])
fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}))
"""


def import_times(runs: int) -> dict[str, float]:
    statements = {
        "baseline: python -c pass": "pass",
        "import edgekit.agent": "import edgekit.agent",
        "import edgekit.agent.cli (edgekit-agent)": "import edgekit.agent.cli",
        "import edgekit.cli (the workstation's edgekit)": "import edgekit.cli",
    }
    samples: dict[str, list[float]] = {name: [] for name in statements}
    for _ in range(runs):  # interleaved, so load on the machine hits every statement alike
        for name, code in statements.items():
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def _status(pid: int) -> dict[str, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}


def agent_memory(work: Path, model: Path) -> dict[str, Any]:
    key = SigningKey.generate()
    bundle = work / "mobilenet.ekb"
    create_bundle(model, name="mobilenet", version="1.0.0", key=key, output=bundle)
    port = _free_port()
    config = work / "agent.toml"
    config.write_text(
        f'device = "bench"\nfleet = "bench"\nstate_dir = "{work / "state"}"\nthreads = 1\n'
        f"trusted_keys = '''\n{key.public.pem().decode()}'''\n[serve]\nlisten = \"127.0.0.1:{port}\"\n"
    )
    agent = [sys.executable, "-m", "edgekit.agent.cli"]
    result: dict[str, Any] = {}

    def run_and_measure(label: str, predictions: int) -> None:
        process = subprocess.Popen(
            [*agent, "run", "--config", str(config)], stderr=subprocess.PIPE, text=True
        )
        assert process.stderr is not None
        try:
            for line in process.stderr:
                if "serving inference" in line:
                    break
            x = np.random.default_rng(0).random((1, 224, 224, 3), dtype=np.float32)
            npy = io.BytesIO()
            np.save(npy, x)
            bodies = {
                "npy": (npy.getvalue(), "application/x-npy"),
                "json": (json.dumps({"inputs": x.tolist()}).encode(), "application/json"),
            }
            result[label] = _status(process.pid)
            for kind, (body, content_type) in bodies.items():
                for _ in range(predictions):
                    request = urllib.request.Request(
                        f"http://127.0.0.1:{port}/v1/predict",
                        data=body,
                        headers={"Content-Type": content_type},
                    )
                    with urllib.request.urlopen(request, timeout=60) as reply:
                        reply.read()
                if predictions:
                    result[f"{label}, after {predictions} {kind} requests"] = _status(process.pid)
        finally:
            process.terminate()
            process.communicate(timeout=60)

    run_and_measure("idle", 0)
    subprocess.run([*agent, "install", str(bundle), "--config", str(config)], check=True, capture_output=True)
    run_and_measure("serving (model loaded)", 20)
    bare = subprocess.run(
        [sys.executable, "-c", BARE, str(model)], check=True, capture_output=True, text=True
    )
    result["bare"] = json.loads(bare.stdout)
    return result


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _own_wheel(work: Path) -> Path:
    """This checkout built as a wheel into ``work``."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(work),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = work.glob("edgekit-*.whl")
    return wheel


def venv_sizes(work: Path) -> dict[str, Any]:
    if not (WHEELHOUSE / ".fetched").exists():
        raise SystemExit(f"no wheelhouse in {WHEELHOUSE}: run `make setup` first")
    wheel = _own_wheel(work)
    sizes: dict[str, Any] = {}
    for label, extras in (("agent", "agent"), ("agent+cli (before)", "agent,cli")):
        venv = work / f"venv-{extras.replace(',', '-')}"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [
                str(venv / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-index",
                "--find-links",
                str(WHEELHOUSE),
                f"{wheel}[{extras}]",
            ],
            check=True,
        )
        site = next((venv / "lib").glob("python3*/site-packages"))
        packages = {}
        for dist in site.glob("*.dist-info"):
            name = dist.name.split("-")[0]
            files = [line.split(",")[0] for line in (dist / "RECORD").read_text().splitlines() if line]
            packages[name] = sum(
                (site / f).stat().st_size
                for f in files
                if (site / f).is_file() and not (site / f).is_symlink()
            )
        total = _du(venv)
        tools = sum(v for k, v in packages.items() if k.lower() in ("pip", "setuptools", "wheel"))
        sizes[label] = {"total": total, "without_pip": total - tools, "packages": packages}
        shutil.rmtree(venv)
    return sizes


ARM64 = (
    "manylinux_2_28_aarch64",
    "manylinux_2_27_aarch64",
    "manylinux2014_aarch64",
    "manylinux_2_17_aarch64",
)
CLI_ONLY = {"typer", "click", "rich", "pygments", "markdown_it_py", "mdurl", "shellingham"}


def arm64_site_packages(work: Path) -> dict[str, Any]:
    """What ``pip install edgekit[agent]`` puts in site-packages on an arm64 board (Python 3.11):
    the arm64 wheels pip picks (downloaded, not installed), unpacked and byte-compiled here
    (.pyc files are the same on every platform). Needs the package index."""
    wheels = work / "arm64"
    own = _own_wheel(work)
    platforms = [arg for p in ARM64 for arg in ("--platform", p)]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--only-binary=:all:",
            *platforms,
            "--python-version",
            "3.11",
            "-d",
            str(wheels),
            f"{own}[agent]",
            f"{own}[cli]",
        ],
        check=True,
        capture_output=True,
    )
    sizes: dict[str, int] = {}
    for wheel in sorted(wheels.glob("*.whl")):
        name = wheel.name.split("-")[0].lower()
        target = work / "site" / name
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(target)
        subprocess.run(
            [sys.executable, "-m", "compileall", "-q", str(target)], check=False, capture_output=True
        )
        sizes[name] = _du(target)
    agent = {k: v for k, v in sizes.items() if k not in CLI_ONLY}
    return {
        "agent": sum(agent.values()),
        "cli_extra": sum(sizes.values()) - sum(agent.values()),
        "packages": agent,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="fresh interpreters per import measured")
    parser.add_argument("--skip-venv", action="store_true", help="do not build the two venvs")
    parser.add_argument("--skip-imports", action="store_true", help="do not measure import times")
    parser.add_argument("--skip-arm64", action="store_true", help="do not download the arm64 wheels")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    results: dict[str, Any] = {"imports": {} if args.skip_imports else import_times(args.runs)}
    with tempfile.TemporaryDirectory() as tmp:
        results["memory"] = agent_memory(Path(tmp), mobilenet_v2(REPO / ".cache" / "bench-models"))
        if not args.skip_venv:
            results["venv"] = venv_sizes(Path(tmp))
        if not args.skip_arm64:
            results["arm64"] = arm64_site_packages(Path(tmp) / "arm")
    if args.json:
        print(json.dumps(results, indent=2))
        return
    if results["imports"]:
        base = results["imports"]["baseline: python -c pass"]
        print("import time (median of fresh interpreters)")
        for name, seconds in results["imports"].items():
            print(f"  {name:<48} {seconds * 1000:7.0f} ms  {seconds / base:5.1f}x baseline")
    mb = 1024 * 1024
    print("memory (VmRSS, peak VmHWM)")
    for name, row in results["memory"].items():
        print(f"  {name:<48} {row['VmRSS'] / mb:6.1f} MB  peak {row['VmHWM'] / mb:6.1f} MB")
    serving = results["memory"]["serving (model loaded), after 20 npy requests"]["VmRSS"]
    bare = results["memory"]["bare"]["VmRSS"]
    print(
        f"  agent serving (npy) / bare interpreter: {serving / bare:.2f}x (+{(serving - bare) / mb:.1f} MB)"
    )
    for label, row in results.get("venv", {}).items():
        top = sorted(row["packages"].items(), key=lambda kv: -kv[1])[:8]
        print(
            f"venv {label}: {row['total'] / mb:.1f} MB ({row['without_pip'] / mb:.1f} MB without pip/setuptools)"
        )
        print("  " + ", ".join(f"{k} {v / mb:.1f}" for k, v in top))
    if "arm64" in results:
        arm = results["arm64"]
        top = sorted(arm["packages"].items(), key=lambda kv: -kv[1])[:8]
        print(
            f"arm64 site-packages of edgekit[agent]: {arm['agent'] / mb:.1f} MB (the cli extra: +{arm['cli_extra'] / mb:.1f} MB)"
        )
        print("  " + ", ".join(f"{k} {v / mb:.1f}" for k, v in top))


if __name__ == "__main__":
    main()
