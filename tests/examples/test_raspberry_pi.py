"""examples/raspberry-pi: the camera app on a real bundle, install.sh into a temporary root.

install.sh runs for real (a venv, pip, the config, the unit, `systemctl --root enable`) into a
directory instead of /, offline: its dependencies come from the wheelhouse `make setup` fills
(.cache/wheelhouse) and edgekit itself from a wheel built here from the current sources.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from edgekit import SigningKey, create_bundle
from edgekit.agent import Agent
from edgekit.keys import init_key
from edgekit.provision import agent_config_text

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "raspberry-pi"
WHEELHOUSE = REPO / ".cache" / "wheelhouse"


@pytest.fixture(scope="module")
def digits_bundle(digits_models, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SigningKey]:
    key = SigningKey.generate()
    path = tmp_path_factory.mktemp("rpi-bundle") / "digits.ekb"
    create_bundle(
        digits_models.fp32,
        name="digits",
        version="1.0.0",
        key=key,
        output=path,
        baseline=digits_models.data_npz,
    )
    return path, key


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion, capturing its text output; the caller checks the outcome."""
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, env=env, check=False)


def sample_images(folder: Path) -> list[str]:
    """scikit-image's sample images as files a camera folder would hold (PNG, and a .npy)."""
    from PIL import Image
    from skimage import data

    folder.mkdir()
    Image.fromarray(data.camera()).save(folder / "camera.png")
    Image.fromarray(data.astronaut()).save(folder / "astronaut.jpg")
    Image.fromarray(data.coins()).save(folder / "coins.png")
    np.save(folder / "chelsea.npy", data.chelsea())
    return sorted(p.name for p in folder.iterdir())


def test_camera_app_runs_the_installed_model_on_a_folder_of_images(digits_bundle, tmp_path):
    bundle, key = digits_bundle
    config = tmp_path / "agent.toml"
    config.write_text(
        agent_config_text("cam-01", "lab", "", str(tmp_path / "state"), key.public.pem().decode())
    )
    with Agent.from_config(config, background=False) as agent:
        agent.install(bundle)
    names = sample_images(tmp_path / "frames")
    result = run(
        *(sys.executable, str(EXAMPLE / "camera_app.py"), "--config", str(config)),
        *("--source", "auto", "--folder", str(tmp_path / "frames"), "--json"),
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    frames, summary = lines[:-1], lines[-1]["summary"]
    assert [f["frame"] for f in frames] == names
    assert all(0 <= f["class"] <= 9 and 0.0 <= f["score"] <= 1.0 for f in frames)
    assert summary["frames"] == len(names) and summary["model"] == "digits@1.0.0"
    # In this venv neither picamera2 nor a camera exists: the app said so and fell back.
    assert summary["source"] == "folder" and "picamera2 unavailable" in result.stderr
    with Agent.from_config(config, background=False) as agent:  # its latencies were recorded
        records = [r for r in agent.telemetry.peek() if r["count"]]
    assert sum(r["count"] for r in records) == len(names)


def test_camera_app_without_a_model_says_what_to_do(tmp_path):
    key = SigningKey.generate()
    config = tmp_path / "agent.toml"
    config.write_text(
        agent_config_text("cam-02", "lab", "", str(tmp_path / "state"), key.public.pem().decode())
    )
    result = run(
        sys.executable, str(EXAMPLE / "camera_app.py"), "--config", str(config), "--source", "folder"
    )
    assert result.returncode == 1 and "edgekit-agent install" in result.stderr
    assert "Traceback" not in result.stderr


def install_sh(*args: str, find_links: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(find_links)}
    env.pop("DESTDIR", None)
    return run("bash", str(EXAMPLE / "install.sh"), "--python", sys.executable, *args, env=env, timeout=600)


@pytest.mark.slow
def test_install_sh_falls_back_to_tflite_runtime_then_upgrades_in_place(
    digits_bundle, tmp_path, edgekit_home
):
    if not (WHEELHOUSE / ".fetched").exists():
        pytest.fail(f"no wheelhouse in {WHEELHOUSE}; `make setup` fills it (pip download)")
    wheels = tmp_path / "dist"
    built = run(
        *(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation"),
        *("-w", str(wheels), str(REPO)),
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("edgekit-*.whl")
    # A provisioned device with TLS: the config and the three files it names, as device add writes them.
    init_key(edgekit_home)
    root = tmp_path / "root"
    add = run(
        *(sys.executable, "-c", "from edgekit.cli import main; main()", "device", "add", "pi-01"),
        *("--fleet", "lab", "--broker", "mqtts://broker:8883", "--tls"),
        *("--state-dir", str(root / "var/lib/edgekit"), "-o", str(tmp_path / "conf" / "pi-01.toml")),
    )
    assert add.returncode == 0, add.stderr
    # No LiteRT wheel for this "device": [agent] cannot install, [agent-tflite] can.
    no_litert = tmp_path / "no-litert"
    no_litert.mkdir()
    for wheel_file in WHEELHOUSE.glob("*.whl"):
        if not wheel_file.name.startswith("ai_edge_litert"):
            (no_litert / wheel_file.name).symlink_to(wheel_file)
    args = ("--root", str(root), "--source", str(wheel), "--config", str(tmp_path / "conf" / "pi-01.toml"))
    first = install_sh(*args, find_links=no_litert)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "trying tflite-runtime" in first.stderr
    assert "runtime(s): tflite_runtime" in first.stdout

    etc = root / "etc" / "edgekit"
    for name in ("agent.toml", "pi-01.ca.pem", "pi-01.cert.pem", "pi-01.key.pem"):
        assert stat.S_IMODE((etc / name).stat().st_mode) == 0o600, name
    unit = (root / "etc/systemd/system/edgekit-agent.service").read_text()
    agent_bin = root / "opt/edgekit/bin/edgekit-agent"
    assert f"ExecStart={agent_bin} run --config ${{CREDENTIALS_DIRECTORY}}/agent.toml" in unit
    assert f"LoadCredential=agent.toml:{etc}/agent.toml" in unit
    dropin = (root / "etc/systemd/system/edgekit-agent.service.d/tls.conf").read_text()
    assert f"LoadCredential=pi-01.key.pem:{etc}/pi-01.key.pem" in dropin
    assert (root / "usr/local/bin/edgekit-agent").resolve() == agent_bin.resolve()
    if shutil.which("systemctl"):
        assert (root / "etc/systemd/system/multi-user.target.wants/edgekit-agent.service").is_symlink()
    if shutil.which("systemd-analyze"):
        verify = run("systemd-analyze", "verify", str(root / "etc/systemd/system/edgekit-agent.service"))
        assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr

    # The installed agent (not this venv's) verifies, installs and serves a bundle.
    bundle, key = digits_bundle
    config = etc / "agent.toml"
    trusting = config.read_text().replace(
        "trusted_keys = '''\n", f"trusted_keys = '''\n{key.public.pem().decode()}"
    )
    config.write_text(trusting)
    installed = run(str(agent_bin), "install", str(bundle), "--config", str(config), "--json")
    assert installed.returncode == 0, installed.stderr
    status = run(str(agent_bin), "status", "--config", str(config), "--json")
    assert (json.loads(status.stdout)["version"], json.loads(status.stdout)["runtime"]) == (
        "1.0.0",
        "tflite_runtime",
    )

    # Run again where LiteRT has a wheel: the same venv gains it; the unit is left alone.
    second = install_sh(*args[:4], find_links=WHEELHOUSE)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "reusing the venv" in second.stdout and "keeping the config" in second.stdout
    assert "ai_edge_litert" in second.stdout and "unit ->" not in second.stdout


def test_install_sh_refuses_bad_usage_in_one_line(tmp_path):
    for args, words in (
        (["--bogus"], "unknown option '--bogus'"),
        (["--config"], "--config needs a value"),
        (["--root", str(tmp_path), "--config", str(tmp_path / "none.toml")], "edgekit device add"),
        (["--root", str(tmp_path), "--prefix", "opt/edgekit"], "absolute path"),
    ):
        result = install_sh(*args, find_links=tmp_path)
        assert result.returncode == 2 and words in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1
    assert "Usage:" in install_sh("--help", find_links=tmp_path).stdout


def test_cloud_init_user_data_runs_firstboot_from_the_boot_partition():
    text = (EXAMPLE / "cloud-init" / "user-data").read_text()
    assert text.startswith("#cloud-config\n") and "firstboot.sh" in text
    for name in ("install.sh", "edgekit-agent.service", "cloud-init/firstboot.sh"):
        assert (EXAMPLE / name).exists()
