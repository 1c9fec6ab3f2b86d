"""`edgekit push` to a fleet with a TUF key hierarchy: real agent processes (one on the key
hierarchy, one still on single-key trust), a real Mosquitto, the real CLI."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from test_push import BIN, Fleet, Watcher, all_serving, edgekit, fleet, push_and_wait

__all__ = ["fleet"]


def ok(*args: str) -> dict:
    result = edgekit(*args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def bundle(model: Path, version: str, out: Path) -> Path:
    ok("bundle", "create", str(model), "--name", "digits", "--version", version, "-o", str(out))
    return out


def start_tuf_agent(fleet: Fleet, device: str, root: Path) -> None:
    path = fleet.config(device)
    path.write_text(f'trust_root = "{root}"\n' + path.read_text())
    log = open(fleet.root / f"{device}.log", "wb")  # noqa: SIM115 - closed with the process
    fleet.processes[device] = subprocess.Popen(
        [str(BIN / "edgekit-agent"), "--log-level", "info", "run", "--config", str(path)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def test_push_reaches_tuf_and_single_key_devices_and_an_unauthorised_bundle_is_refused_first(
    fleet, mosquitto, digits_models, tmp_path, edgekit_home
):
    for role in ("root", "targets", "online"):
        ok("keys", "init", "--role", role)
    ok("trust", "init", "--fleet", "lab", "--root-keys", "root", "--threshold", "1")
    v1 = bundle(digits_models.fp32, "1.0.0", tmp_path / "v1.ekb")
    ok("trust", "authorise", str(v1), "--fleet", "lab")
    ok("trust", "sign", str(edgekit_home / "trust" / "lab" / "pending" / "targets.json"), "--key", "targets")
    ok("trust", "submit", "targets", "--fleet", "lab")
    ok("trust", "publish", "--fleet", "lab", "--broker", mosquitto.url)
    root = tmp_path / "root.json"
    assert edgekit("trust", "export-root", "--fleet", "lab", "-o", str(root)).returncode == 0

    watcher = Watcher(mosquitto.url)
    devices = ["cam-1", "cam-2"]
    try:
        fleet.start("cam-1")  # single-key trust
        start_tuf_agent(fleet, "cam-2", root)
        watcher.wait_for(lambda _: all(watcher.states(d) for d in devices))
        outcome = push_and_wait(v1, mosquitto.url)
        assert outcome["phase"] == "done" and outcome["failed"] == {}
        watcher.wait_for(all_serving(watcher, devices, "1.0.0"))
        assert watcher.states("cam-2")[-1].trust_root == 1 and watcher.states("cam-1")[-1].trust_root is None

        # Not authorised by the targets key: refused before anything is saved or sent.
        v2 = bundle(digits_models.int8, "2.0.0", tmp_path / "v2.ekb")
        refused = edgekit("push", str(v2), "--fleet", "lab", "--wait", "--broker", mosquitto.url)
        assert refused.returncode == 17, refused.stderr
        assert "Traceback" not in refused.stderr and "trust authorise" in refused.stderr
        # Authorised, the same push goes through (no half-started rollout is in the way).
        ok("trust", "authorise", str(v2), "--fleet", "lab")
        ok(
            "trust",
            "sign",
            str(edgekit_home / "trust" / "lab" / "pending" / "targets.json"),
            "--key",
            "targets",
        )
        ok("trust", "submit", "targets", "--fleet", "lab")
        ok("trust", "publish", "--fleet", "lab", "--broker", mosquitto.url)
        assert push_and_wait(v2, mosquitto.url)["phase"] == "done"
        watcher.wait_for(all_serving(watcher, devices, "2.0.0"))
    finally:
        watcher.close()


def test_push_shadow_and_bench_on_a_tuf_fleet_reach_devices_only_with_a_candidate_targets_authorised(
    fleet, mosquitto, digits_models, tmp_path, edgekit_home
):
    pending = str(edgekit_home / "trust" / "lab" / "pending" / "targets.json")
    for role in ("root", "targets", "online"):
        ok("keys", "init", "--role", role)
    ok("trust", "init", "--fleet", "lab", "--root-keys", "root", "--threshold", "1")
    v1 = bundle(digits_models.fp32, "1.0.0", tmp_path / "v1.ekb")
    ok("trust", "authorise", str(v1), "--fleet", "lab")
    ok("trust", "sign", pending, "--key", "targets")
    ok("trust", "submit", "targets", "--fleet", "lab")
    ok("trust", "publish", "--fleet", "lab", "--broker", mosquitto.url)
    root = tmp_path / "root.json"
    assert edgekit("trust", "export-root", "--fleet", "lab", "-o", str(root)).returncode == 0

    watcher = Watcher(mosquitto.url)
    try:
        start_tuf_agent(fleet, "cam-2", root)
        watcher.wait_for(lambda _: watcher.states("cam-2"))
        assert push_and_wait(v1, mosquitto.url)["phase"] == "done"
        watcher.wait_for(all_serving(watcher, ["cam-2"], "1.0.0"))

        # A candidate targets has not authorised: refused before anything is sent, for both.
        v2 = bundle(digits_models.int8, "2.0.0", tmp_path / "v2.ekb")
        shadow = ("push", str(v2), "--fleet", "lab", "--shadow", "--sample", "1", "--for", "1h")
        bench = ("bench", str(v2), "--fleet", "lab", "--threads", "1", "--runs", "3")
        for command in (shadow, bench):
            refused = edgekit(*command, "--broker", mosquitto.url)
            assert refused.returncode == 17, refused.stderr
            assert "Traceback" not in refused.stderr and "trust authorise" in refused.stderr
            assert "digits@2.0.0 is not authorised for fleet lab" in refused.stderr

        # Authorised by the targets key: the TUF device tries it in the shadow, and measures it.
        ok("trust", "authorise", str(v2), "--fleet", "lab")
        ok("trust", "sign", pending, "--key", "targets")
        ok("trust", "submit", "targets", "--fleet", "lab")
        ok("trust", "publish", "--fleet", "lab", "--broker", mosquitto.url)
        for command in (shadow, bench):
            done = edgekit(*command, "--broker", mosquitto.url)
            assert done.returncode == 0, done.stderr
        watcher.wait_for(
            lambda _: any(e["kind"] == "shadow_started" for e in watcher.records("events", "cam-2"))
        )
        watcher.wait_for(lambda _: watcher.records("bench", "cam-2"), timeout=120)
        assert [r["candidate"]["version"] for r in watcher.records("bench", "cam-2")] == ["2.0.0"]
        refusals = [e for e in watcher.records("events", "cam-2") if e["kind"].endswith("_refused")]
        assert refusals == []
    finally:
        watcher.close()
