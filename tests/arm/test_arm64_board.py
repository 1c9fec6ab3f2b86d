"""The agent on an emulated 64-bit Raspberry Pi (Debian bookworm arm64 under qemu-user, a Pi 4's
CPU): installed by examples/raspberry-pi/install.sh with the arm64 LiteRT wheel; bundles made on
x86 install, pass their health checks and predict what x86 predicts; `edgekit-agent run` takes a
`push --wait` from the host's Mosquitto, serves over HTTP and reports telemetry.

Timings under emulation mean nothing (ten to a hundred times slower than a board): nothing here
measures speed. Run with `make test-arm` (part of `make test`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
from board import CPUINFO_PI5, Board, Installed
from edgekit import SigningKey, create_bundle
from edgekit.keys import load_own_public_key, load_signing_key
from edgekit.provision import agent_config_text
from helpers import free_port
from lane import assert_board_predicts_like_x86, bundles_job
from watcher import Watcher

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fleet"))
from test_push import edgekit, push_and_wait


def test_install_sh_installs_the_agent_with_the_arm64_litert_wheel(installed: Installed):
    result, board = installed.result, installed.board
    assert result.returncode == 0, result.stdout + result.stderr
    assert "with runtime(s): ai_edge_litert" in result.stdout
    machine = board.python("-c", "import platform, sys; print(platform.machine(), sys.version_info[:2])")
    assert machine.stdout.strip().split(maxsplit=1) == ["aarch64", "(3, 11)"], machine.stderr
    litert = board.root / "opt/edgekit/lib/python3.11/site-packages/ai_edge_litert"
    assert any(litert.glob("**/*.so")), "LiteRT's native library is missing"
    assert (board.root / "etc/systemd/system/edgekit-agent.service").is_file()
    version = board.run("edgekit-agent", "--version")  # the /usr/local/bin link, on PATH
    assert version.returncode == 0 and version.stdout.startswith("edgekit"), version.stderr


def test_x86_bundles_install_on_arm64_pass_their_health_checks_and_predict_like_x86(
    installed: Installed, models, third_party_tflite, mobilenet_model, tmp_path
):
    board = installed.board
    assert installed.result.returncode == 0, installed.result.stdout + installed.result.stderr
    key = SigningKey.generate()
    rng = np.random.default_rng(0)
    sources = {
        # name: (model, baseline (real inputs for the health check), inputs to predict on)
        "digits-int8": (models.int8, models.data_npz, models.x_test[:40, None]),
        "digits-fp32": (models.fp32, models.data_npz, models.x_test[:40, None]),
        # MediaPipe's face detector: a float model nobody here trained (two outputs).
        "face-detector": (third_party_tflite, None, rng.random((3, 1, 128, 128, 3), dtype=np.float32)),
        # keras.applications MobileNetV2 (weights=None, seeded), built on the host: 14 MB fp32.
        "mobilenet-v2": (mobilenet_model, None, rng.random((2, 1, 224, 224, 3), dtype=np.float32)),
    }
    bundles_job(board.host / "job", sources, key)
    assert_board_predicts_like_x86(board, board.host / "job", list(sources), key, tmp_path, "ai_edge_litert")


def test_on_a_pi_5_cpu_the_digits_bundles_install_and_predict_like_x86(
    installed: Installed, models, tmp_path
):
    """The same venv under the Pi 5's core (QEMU_CPU=cortex-a76, a Pi 5's /proc/cpuinfo): it has
    instructions the Pi 4's lacks (dot product, fp16 arithmetic), which LiteRT's kernels pick at
    run time, so the int8 path differs from the a72 run above. Digits only: the lane's time."""
    pi5 = replace(installed.board, cpu="cortex-a76", cpuinfo=CPUINFO_PI5)
    assert installed.result.returncode == 0, installed.result.stdout + installed.result.stderr
    cpu = pi5.run("cat", "/proc/cpuinfo")
    assert "Raspberry Pi 5" in cpu.stdout, cpu.stderr
    key = SigningKey.generate()
    sources = {
        "digits-int8": (models.int8, models.data_npz, models.x_test[:40, None]),
        "digits-fp32": (models.fp32, models.data_npz, models.x_test[:40, None]),
    }
    bundles_job(pi5.host / "job-pi5", sources, key)
    assert_board_predicts_like_x86(pi5, pi5.host / "job-pi5", list(sources), key, tmp_path, "ai_edge_litert")


def _agent_pid(process: subprocess.Popen[bytes]) -> int:
    """The agent under ``unshare --fork`` (its only child: bash and chroot exec into it)."""
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def test_the_agent_on_arm64_takes_a_push_serves_and_reports_telemetry(
    installed: Installed, mosquitto, edgekit_home, models, tmp_path
):
    board: Board = installed.board
    assert installed.result.returncode == 0, installed.result.stdout + installed.result.stderr
    assert edgekit("keys", "init").returncode == 0
    key = load_signing_key(edgekit_home)
    bundle = tmp_path / "digits-1.0.0.ekb"
    create_bundle(
        models.int8, name="digits", version="1.0.0", key=key, output=bundle, baseline=models.data_npz
    )
    port = free_port()
    (board.host / "pi-arm.toml").write_text(
        "\n".join(
            [
                'device = "pi-arm"',
                'fleet = "lab"',
                'state_dir = "/host/pi-arm-state"',
                f'broker = "{mosquitto.url}"',  # the host's 127.0.0.1: the board shares its network
                "threads = 1",
                f"trusted_keys = '''\n{load_own_public_key(edgekit_home).pem().decode()}'''",
                "[telemetry]",
                "interval = 0.5",
                "[serve]",
                f'listen = "127.0.0.1:{port}"',
            ]
        )
        + "\n"
    )
    watcher = Watcher(mosquitto.url)
    log = tmp_path / "agent.log"
    agent = board.popen(
        "edgekit-agent", "--log-level", "info", "run", "--config", "/host/pi-arm.toml", log=log
    )
    try:
        watcher.wait_for(lambda _: watcher.states("pi-arm"), timeout=120)  # up and following the fleet
        outcome = push_and_wait(bundle, mosquitto.url)
        assert outcome["phase"] == "done" and outcome["failed"] == {}, outcome
        assert outcome["devices"]["pi-arm"]["version"] == "1.0.0"

        x = models.x_test[:3]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/predict",
            data=json.dumps({"instances": x[:, None].tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as reply:
            served = json.loads(reply.read())
        assert served["bundle"] == {"name": "digits", "version": "1.0.0"}
        assert len(served["predictions"]) == 3

        # Telemetry from the board: the window that holds those three predictions, for 1.0.0.
        watcher.wait_for(
            lambda _: (
                sum(
                    r.get("count", 0)
                    for r in watcher.records("telemetry", "pi-arm")
                    if r["bundle"] and r["bundle"]["version"] == "1.0.0"
                )
                >= 3
            ),
            timeout=60,
        )
        os.kill(_agent_pid(agent), signal.SIGTERM)
        assert agent.wait(timeout=60) == 0, log.read_text()[-3000:]
        watcher.wait_for(lambda _: watcher.states("pi-arm")[-1].status == "offline")
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(timeout=30)
        watcher.close()


# systemd 252 under qemu-user cannot set up a unit's credentials: every unit with
# LoadCredential= or ImportCredential= fails at step CREDENTIALS with EINVAL, Debian's own
# systemd-sysusers and systemd-tmpfiles-setup included. So this drop-in hands the agent its config
# by path instead (readable: it holds no password here); everything else is the unit as shipped.
CREDENTIALS_DROPIN = """\
[Service]
LoadCredential=
ExecStart=
ExecStart=/opt/edgekit/bin/edgekit-agent run --config /etc/edgekit/agent.toml
Environment=QEMU_CPU={cpu}
"""

# Units a headless test boot does without (logins, consoles, periodic jobs).
UNNEEDED = (
    "console-getty.service",
    "getty.target",
    "systemd-logind.service",
    "systemd-update-utmp.service",
    "systemd-update-utmp-runlevel.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "systemd-tmpfiles-clean.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
)

BOOT = r"""
mkdir -p /run/systemd/nspawn
mount -t tmpfs tmpfs /run/systemd/nspawn  # nspawn wants it a tmpfs; private to this namespace
exec systemd-nspawn --quiet --directory "$1" --boot --register=no --keep-unit --setenv=QEMU_CPU="$2"
"""


def _unit(pid1: int, *properties: str) -> dict[str, str]:
    """The unit's properties, from the container's systemctl; {} while systemd is not up yet."""
    shown = subprocess.run(
        [
            *("nsenter", "-t", str(pid1), "-a", "/usr/bin/systemctl", "show", "edgekit-agent.service"),
            *(f"--property={p}" for p in properties),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if shown.returncode != 0:
        return {}
    return dict(line.split("=", 1) for line in shown.stdout.splitlines() if "=" in line)


def _wait(predicate, timeout: float, what: str, every: float = 1.0):
    """Poll systemd (it has no event a test outside the container can await) until true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_unit_boots_under_systemd_says_ready_and_feeds_the_watchdog(installed: Installed, tmp_path):
    board: Board = installed.board
    assert installed.result.returncode == 0, installed.result.stdout + installed.result.stderr
    key = SigningKey.generate()
    etc = board.root / "etc" / "edgekit"
    etc.mkdir(exist_ok=True)
    (etc / "agent.toml").write_text(
        agent_config_text("pi-unit", "lab", "", "/var/lib/edgekit", key.public.pem().decode())
    )
    dropin = board.root / "etc/systemd/system/edgekit-agent.service.d/lane.conf"
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text(CREDENTIALS_DROPIN.format(cpu=board.cpu))
    enabled = board.run("systemctl", "enable", "edgekit-agent.service")
    assert enabled.returncode == 0, enabled.stderr
    masked = board.run("systemctl", "mask", *UNNEEDED)  # a faster boot under emulation
    assert masked.returncode == 0, masked.stderr

    log = tmp_path / "boot.log"
    with log.open("wb") as out:
        boot = subprocess.Popen(
            [
                *("unshare", "--mount", "--propagation", "private", "--fork", "--kill-child"),
                *("bash", "-c", BOOT, "boot", str(board.root), board.cpu),
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    nspawn = pid1 = None
    try:
        nspawn = _wait(lambda: _children(boot.pid), 30, "systemd-nspawn")[0]
        pid1 = _wait(lambda: _children(nspawn), 60, "the container's systemd")[0]
        # Type=notify: active only once the agent sent READY=1.
        unit = _wait(
            lambda: (u := _unit(pid1, "ActiveState", "StatusText")).get("ActiveState") == "active" and u,
            300,
            "edgekit-agent.service to be active",
            every=2,
        )
        assert unit["StatusText"] == "pi-unit: no model installed yet"
        first = _unit(pid1, "WatchdogTimestampMonotonic").get("WatchdogTimestampMonotonic")
        assert first
        # WatchdogSec=30: a ping every 15 s; wait for the next one.
        _wait(
            lambda: (
                _unit(pid1, "WatchdogTimestampMonotonic").get("WatchdogTimestampMonotonic", first) != first
            ),
            45,
            "a watchdog ping",
        )
        final = _unit(pid1, "ActiveState", "SubState", "NRestarts", "WatchdogUSec")
        assert final == {
            "ActiveState": "active",
            "SubState": "running",
            "NRestarts": "0",
            "WatchdogUSec": "30s",
        }
    finally:
        # No clean poweroff: nspawn's SIGRTMIN+3 reaches systemd through qemu-user's signal
        # mapping as SIGRTMIN+1 (isolate rescue.target), and the container would never stop.
        # Killing the container's init takes every process in it along; nspawn then exits.
        cmdline = Path(f"/proc/{pid1}/cmdline")
        if pid1 is not None and cmdline.exists() and b"/systemd" in cmdline.read_bytes():
            os.kill(pid1, signal.SIGKILL)
        elif nspawn is not None:
            os.kill(nspawn, signal.SIGTERM)
        try:
            boot.wait(timeout=60)
        except subprocess.TimeoutExpired:
            boot.kill()  # unshare --kill-child: nspawn gets SIGKILL too
            boot.wait(timeout=30)


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []
