"""`make demo`: the whole edgekit story on one machine, step by step.

1. a signing key; 2. a tiny CNN trained on scikit-learn's digits; 3. converted to int8 TFLite
with an evaluation table; 4. a signed bundle with a drift baseline and a health check;
5. `edgekit fleet up` (a broker, registry, ingest, dashboard); 6. three devices
provisioned with `edgekit device add` and started as real `edgekit-agent run` processes, each
with its own state directory; 7. `edgekit push --canary 1 --wait`; 8. the status table;
9. one device is fed shifted inputs (through its local inference endpoint) until the registry
flags drift; 10. the dashboard URL. Then everything stops cleanly, unless DEMO_KEEP=1.

Everything happens in ./demo-output with its own EDGEKIT_HOME; nothing is downloaded.
Environment: DEMO_DEVICES (default 3), DEMO_EPOCHS (default 5), DEMO_KEEP=1 (keep running until
Ctrl-C), DEMO_OUT (default ./demo-output). tests/test_demo.py runs a reduced form and checks
the outcome; the summary is written to DEMO_OUT/summary.json.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import numpy as np

OUT = Path(os.environ.get("DEMO_OUT", "demo-output")).resolve()
BIN = Path(sys.executable).parent
DEVICES = int(os.environ.get("DEMO_DEVICES", "3"))
EPOCHS = int(os.environ.get("DEMO_EPOCHS", "5"))
KEEP = os.environ.get("DEMO_KEEP") == "1"
FLEET = "demo"


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def fail(text: str) -> None:
    sys.exit(f"demo failed: {text}")


def edgekit(*args: str, capture: bool = False) -> str:
    print("$ edgekit " + " ".join(args), flush=True)
    result = subprocess.run(
        [str(BIN / "edgekit"), *args], text=True, check=False, stdout=subprocess.PIPE if capture else None
    )
    if result.returncode != 0:
        fail(f"`edgekit {' '.join(args)}` exited with {result.returncode}")
    return result.stdout or ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_json(url: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def wait_for(what: str, check: Any, timeout: float, process: subprocess.Popen[Any] | None = None) -> Any:
    """Poll ``check`` (which returns a truthy value when done) until ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            fail(f"{what}: the process exited with {process.returncode}")
        try:
            value = check()
        except (OSError, urllib.error.URLError, ValueError):
            value = None
        if value:
            return value
        time.sleep(0.25)  # polling a separate process's HTTP/TCP endpoint; bounded by timeout
    fail(f"{what} did not happen within {timeout:.0f} s")


def train_model() -> tuple[Path, Path]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
    import keras
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    y = digits.target
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input(shape=(8, 8, 1), batch_size=1),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x[:1500], y[:1500], epochs=EPOCHS, batch_size=32, verbose=0)
    _, accuracy = model.evaluate(x[1500:], y[1500:], verbose=0)
    print(f"trained a digits CNN: {model.count_params()} parameters, test accuracy {accuracy:.3f}")
    keras_path = OUT / "digits.keras"
    model.save(keras_path)
    data_path = OUT / "digits_test.npz"
    np.savez(data_path, x=x[1500:], y=y[1500:])
    np.save(OUT / "digits_calibration.npy", x[:200])
    return keras_path, data_path


class Demo:
    def __init__(self) -> None:
        self.processes: list[tuple[str, subprocess.Popen[Any]]] = []
        self.broker_port = free_port()
        self.http_port = free_port()
        # The broker of `fleet up`; clients find out which MQTT version it speaks by themselves.
        self.broker = f"mqtt://127.0.0.1:{self.broker_port}"
        self.registry = f"sqlite:///{OUT / 'registry.db'}"
        self.dashboard = f"http://127.0.0.1:{self.http_port}"
        self.serve_ports: dict[str, int] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[Any]:
        log = (OUT / "logs" / f"{name}.log").open("w")
        print(
            f"$ {' '.join(Path(argv[0]).name if i == 0 else a for i, a in enumerate(argv))}  (log: demo-output/logs/{name}.log)",
            flush=True,
        )
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        self.processes.append((name, process))
        return process

    def stop_all(self) -> None:
        for _, process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for name, process in reversed(self.processes):
            try:
                code = process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                code = process.wait()
                print(f"{name} did not stop within 30 s; killed", flush=True)
            if code not in (0, -signal.SIGTERM):
                print(f"{name} exited with {code}; see demo-output/logs/{name}.log", flush=True)
        self.processes.clear()

    def fleet_status(self) -> list[dict[str, Any]]:
        out = subprocess.run(
            [
                str(BIN / "edgekit"),
                "fleet",
                "status",
                "--fleet",
                FLEET,
                "--registry",
                self.registry,
                "--json",
            ],
            text=True,
            capture_output=True,
            check=False,
        )
        return json.loads(out.stdout) if out.returncode == 0 else []

    def run(self) -> dict[str, Any]:
        step("1. Create a signing key (EDGEKIT_HOME=demo-output/home)")
        edgekit("keys", "init")

        step("2. Train a tiny model on scikit-learn digits")
        keras_path, data_path = train_model()

        step("3. Convert it to int8 TFLite, measured against the float model")
        model_path = OUT / "digits_int8.tflite"
        edgekit(
            "convert",
            str(keras_path),
            "-o",
            str(model_path),
            "--quantize",
            "int8",
            "--calibration",
            str(OUT / "digits_calibration.npy"),
            "--eval",
            str(data_path),
            "--max-accuracy-drop",
            "2",
            "--report",
            str(OUT / "convert-report.json"),
        )

        step("4. Bundle and sign it, with a drift baseline and a health check")
        bundle = OUT / "digits-1.0.0.ekb"
        edgekit(
            "bundle",
            "create",
            str(model_path),
            "--name",
            "digits",
            "--version",
            "1.0.0",
            "--baseline",
            str(data_path),
            "-o",
            str(bundle),
        )
        edgekit("bundle", "verify", str(bundle))

        step("5. Start the fleet: a broker (Mosquitto if installed), registry, ingest and dashboard")
        fleet = self.start(
            "fleet-up",
            [
                str(BIN / "edgekit"),
                "fleet",
                "up",
                "--port",
                str(self.broker_port),
                "--http-port",
                str(self.http_port),
                "--registry",
                self.registry,
            ],
        )
        wait_for(
            "the dashboard answering",
            lambda: http_json(f"{self.dashboard}/api/fleets") is not None,
            60,
            fleet,
        )
        wait_for(
            "the broker accepting connections",
            lambda: socket.create_connection(("127.0.0.1", self.broker_port), 1).close() or True,
            30,
            fleet,
        )
        print(f"broker {self.broker}, dashboard {self.dashboard}")

        names = [f"cam-{i}" for i in range(1, DEVICES + 1)]
        step(f"6. Provision {DEVICES} devices and start their agents (real edgekit-agent processes)")
        for name in names:
            config = OUT / "devices" / f"{name}.toml"
            edgekit(
                "device",
                "add",
                name,
                "--fleet",
                FLEET,
                "--broker",
                self.broker,
                "--state-dir",
                str(OUT / "devices" / name),
                "-o",
                str(config),
            )
            self.serve_ports[name] = free_port()
            self.start(
                name,
                [str(BIN / "edgekit-agent"), "run", "--config", str(config)],
                env={
                    # Demo pace: a telemetry window every 2 s, every input sampled for drift.
                    "EDGEKIT_TELEMETRY_INTERVAL": "2",
                    "EDGEKIT_DRIFT_SAMPLE_RATE": "1.0",
                    "EDGEKIT_SERVE_LISTEN": f"127.0.0.1:{self.serve_ports[name]}",
                },
            )
        wait_for(
            f"{DEVICES} devices reporting to the registry",
            lambda: len([d for d in self.fleet_status() if d["online"]]) == DEVICES,
            60,
        )

        step("7. Push the bundle: one canary first, then the fleet")
        edgekit(
            "push",
            str(bundle),
            "--fleet",
            FLEET,
            "--canary",
            "1",
            "--soak",
            "3",
            "--wait",
            "--timeout",
            "120",
            "--broker",
            self.broker,
            "--registry",
            self.registry,
        )

        step("8. The fleet, as the registry sees it")
        wait_for(
            "the registry seeing every device on 1.0.0",
            lambda: (
                all(d["version"] == "1.0.0" for d in self.fleet_status())
                and len(self.fleet_status()) == DEVICES
            ),
            60,
        )
        edgekit("fleet", "status", "--fleet", FLEET, "--registry", self.registry)

        shifted = names[-1]
        step(f"9. Normal inputs for every device, inverted images for {shifted}, until drift shows")
        with np.load(data_path) as data:
            x = data["x"][:200]
        for name in names:
            inputs = (1.0 - x) if name == shifted else x
            port = self.serve_ports[name]
            for start in range(0, len(inputs), 50):
                http_json(
                    f"http://127.0.0.1:{port}/v1/predict",
                    {"instances": inputs[start : start + 50, None].tolist()},
                )

        def drift_flagged() -> list[dict[str, Any]]:
            devices = self.fleet_status()
            return devices if any(d["device"] == shifted and d["drifted"] for d in devices) else []

        status = wait_for(f"the registry flagging {shifted} as drifted", drift_flagged, 90)
        edgekit("fleet", "status", "--fleet", FLEET, "--registry", self.registry)
        drifted = sorted(d["device"] for d in status if d["drifted"])

        step("10. Watch it in the browser")
        print(f"dashboard: {self.dashboard}  (fleet overview, per-device latency and drift charts)")
        return {
            "devices": {
                d["device"]: {"version": d["version"], "online": d["online"], "drifted": d["drifted"]}
                for d in status
            },
            "drifted": drifted,
            "dashboard": self.dashboard,
            "broker": self.broker,
            "registry": self.registry,
        }


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    (OUT / "logs").mkdir(parents=True)
    os.environ["EDGEKIT_HOME"] = str(OUT / "home")
    demo = Demo()
    try:
        summary = demo.run()
        (OUT / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if KEEP:
            print("\nDEMO_KEEP=1: everything keeps running; Ctrl-C stops it.", flush=True)
            signal.signal(signal.SIGTERM, signal.default_int_handler)
            while True:
                signal.pause()
    except KeyboardInterrupt:
        print("\ninterrupted", flush=True)
    finally:
        step("Stopping the devices and the fleet")
        demo.stop_all()
    step(f"Done. Everything is in {OUT}")


if __name__ == "__main__":
    main()
