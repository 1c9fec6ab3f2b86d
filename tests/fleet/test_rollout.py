"""The canary rollout state machine, step by step."""

from __future__ import annotations

import pytest
from edgekit import ConfigError
from edgekit.fleet.rollout import (
    ABORTED,
    CANARY,
    DONE,
    FLEET,
    SOAK,
    Action,
    DeviceReport,
    Rollout,
    RolloutPolicy,
    abort,
    advance,
    start,
)

NEW, OLD = "n" * 64, "o" * 64
DEVICES = ["cam-1", "cam-2", "cam-3", "cam-4", "cam-5"]
POLICY = RolloutPolicy(
    canary=2, soak_s=60, install_timeout_s=300, max_error_rate=0.05, max_p95_regression=0.5, min_samples=20
)


def reports(**overrides: dict) -> list[DeviceReport]:
    base = {d: {"device": d, "bundle_id": OLD, "p95_ms": 10.0} for d in DEVICES}
    for device, values in overrides.items():
        base[device.replace("_", "-")].update(values)
    return [DeviceReport(**v) for v in base.values()]


def begin() -> Rollout:
    rollout, actions = start("shop", NEW, "digits@2.0.0", reports(), OLD, POLICY, now=0)
    assert rollout.phase == CANARY and rollout.canaries == ("cam-1", "cam-2")
    assert actions == [Action(NEW, "cam-1"), Action(NEW, "cam-2")]
    return rollout


def serving_canaries(**extra: dict) -> list[DeviceReport]:
    canary = {"bundle_id": NEW, "count": 100, "errors": 0, "p95_ms": 11.0}
    return reports(cam_1={**canary, **extra.get("cam_1", {})}, cam_2={**canary, **extra.get("cam_2", {})})


def test_a_healthy_rollout_goes_canary_soak_fleet_done():
    rollout = begin()
    rollout, actions = advance(rollout, reports(), POLICY, now=10)
    assert rollout.phase == CANARY and actions == []
    rollout, actions = advance(rollout, serving_canaries(), POLICY, now=20)
    assert rollout.phase == SOAK and actions == []
    rollout, actions = advance(rollout, serving_canaries(), POLICY, now=50)
    assert rollout.phase == SOAK  # still soaking: 30 s of 60
    rollout, actions = advance(rollout, serving_canaries(), POLICY, now=81)
    assert rollout.phase == FLEET and actions == [Action(NEW)]
    everyone = [DeviceReport(d, bundle_id=NEW) for d in DEVICES]
    rollout, actions = advance(rollout, everyone[:3], POLICY, now=90)
    assert rollout.phase == FLEET
    rollout, actions = advance(rollout, everyone, POLICY, now=100)
    assert rollout.phase == DONE and rollout.failed == {} and rollout.reason is None


def test_a_failed_canary_install_aborts_and_rolls_the_canaries_back():
    rollout = begin()
    failing = reports(cam_2={"failed_bundle_id": NEW, "reason": "health check failed"})
    rollout, actions = advance(rollout, failing, POLICY, now=5)
    assert rollout.phase == ABORTED and "cam-2 failed to install" in (rollout.reason or "")
    assert "health check failed" in (rollout.reason or "")
    assert actions == [Action(OLD, "cam-1"), Action(OLD, "cam-2")]
    assert advance(rollout, failing, POLICY, now=6) == (rollout, [])  # finished stays finished


@pytest.mark.parametrize(
    ("canary_1", "fragment"),
    [
        ({"errors": 10}, "error rate 10.0% exceeds 5.0%"),
        ({"p95_ms": 16.0}, "p95 latency 16.0 ms is more than 50% above its 10.0 ms"),
        ({"drifted": True}, "input drift"),  # an agent that does not judge severity
        ({"drifted": True, "drift_severity": "model affected"}, "drift has affected the model"),
        ({"bundle_id": OLD}, "stopped serving"),
    ],
)
def test_soak_aborts_on_error_rate_latency_regression_or_drift(canary_1, fragment):
    rollout = begin()
    rollout, _ = advance(rollout, serving_canaries(), POLICY, now=20)
    assert rollout.phase == SOAK
    rollout, actions = advance(rollout, serving_canaries(cam_1=canary_1), POLICY, now=30)
    assert rollout.phase == ABORTED and fragment in (rollout.reason or "")
    assert actions == [Action(OLD, "cam-1"), Action(OLD, "cam-2")]


def test_a_canary_whose_inputs_changed_harmlessly_keeps_soaking():
    rollout = begin()
    rollout, _ = advance(rollout, serving_canaries(), POLICY, now=20)
    changed = serving_canaries(cam_1={"drifted": True, "drift_severity": "inputs changed"})
    rollout, actions = advance(rollout, changed, POLICY, now=30)
    assert rollout.phase == SOAK and actions == []


def test_too_few_samples_are_not_judged():
    rollout = begin()
    rollout, _ = advance(rollout, serving_canaries(), POLICY, now=20)
    few = serving_canaries(cam_1={"count": 5, "errors": 3, "p95_ms": 99.0})
    rollout, _ = advance(rollout, few, POLICY, now=30)
    assert rollout.phase == SOAK


def test_a_canary_that_never_installs_times_out():
    rollout = begin()
    rollout, actions = advance(rollout, reports(cam_1={"bundle_id": NEW}), POLICY, now=301)
    assert rollout.phase == ABORTED and "cam-2 did not serve" in (rollout.reason or "")
    assert actions == [Action(OLD, "cam-1"), Action(OLD, "cam-2")]


def test_fleet_phase_names_failed_and_late_devices():
    rollout = begin()
    rollout, _ = advance(rollout, serving_canaries(), POLICY, now=20)
    rollout, _ = advance(rollout, serving_canaries(), POLICY, now=90)
    assert rollout.phase == FLEET
    state = [DeviceReport(d, bundle_id=NEW) for d in DEVICES[:3]]
    state += [
        DeviceReport("cam-4", bundle_id=OLD, failed_bundle_id=NEW, reason="disk full"),
        DeviceReport("cam-5", online=False, bundle_id=OLD),
    ]
    rollout, _ = advance(rollout, state, POLICY, now=100)
    assert rollout.phase == FLEET and rollout.failed == {"cam-4": "disk full"}
    rollout, _ = advance(rollout, state, POLICY, now=90 + 301)
    assert rollout.phase == DONE
    assert rollout.failed == {"cam-4": "disk full", "cam-5": "timed out"}
    assert "cam-4" in (rollout.reason or "") and "cam-5" in (rollout.reason or "")


def test_no_canary_tells_the_fleet_at_once_and_abort_mid_fleet_rolls_everyone_back():
    rollout, actions = start("shop", NEW, "digits@2.0.0", reports(), OLD, RolloutPolicy(canary=0), now=0)
    assert rollout.phase == FLEET and actions == [Action(NEW)]
    rollout, actions = abort(rollout, "operator abort", now=5)
    assert rollout.phase == ABORTED and actions == [Action(OLD)]


def test_a_first_rollout_has_nothing_to_roll_back_to():
    rollout, _ = start("shop", NEW, "digits@1.0.0", reports(), None, POLICY, now=0)
    rollout, actions = abort(rollout, "operator abort", now=1)
    assert rollout.phase == ABORTED and actions == []


def test_rollouts_survive_a_restart(tmp_path):
    rollout = begin()
    rollout, _ = advance(rollout, serving_canaries(), POLICY, now=20)
    path = tmp_path / "rollouts" / "shop.json"
    rollout.save(path)
    loaded = Rollout.load(path)
    assert loaded == rollout
    resumed, actions = advance(loaded, serving_canaries(), POLICY, now=81)
    assert resumed.phase == FLEET and actions == [Action(NEW)]


def test_corrupt_or_missing_state_and_bad_policies_are_config_errors(tmp_path):
    path = tmp_path / "shop.json"
    with pytest.raises(ConfigError, match="no rollout saved"):
        Rollout.load(path)
    path.write_text('{"schema": "edgekit.rollout", "schema_version": 1, "phase": "x"}')
    with pytest.raises(ConfigError, match="corrupt"):
        Rollout.load(path)
    with pytest.raises(ConfigError):
        RolloutPolicy(canary=-1)
    with pytest.raises(ConfigError):
        RolloutPolicy(max_error_rate=2)
