"""The canary rollout state machine, step by step."""

from __future__ import annotations

from dataclasses import replace

import pytest
from edgekit import ConfigError
from edgekit.desired import ShadowRequest
from edgekit.fleet.rollout import (
    ABORTED,
    CANARY,
    DONE,
    FLEET,
    SHADOW,
    SOAK,
    Action,
    DeviceReport,
    Rollout,
    RolloutPolicy,
    abort,
    advance,
    phase_deadline,
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


# -- the shadow phase (push --canary N --shadow-first) -----------------------------------------

SHADOW_POLICY = RolloutPolicy(
    canary=2,
    soak_s=60,
    install_timeout_s=300,
    min_samples=20,
    shadow_s=900,
    shadow_sample=0.5,
    min_agreement=0.98,
    max_latency_ratio=1.2,
)


def figures(device: str, **extra: object) -> dict:
    base = {
        "device": device, "state": "running", "compared": 200, "classified": 200, "agreed": 199,
        "agreement": 199 / 200, "latency_ratio": 1.1, "error": None, "severity": "ok",
    }  # fmt: skip
    return {**base, **extra}


def shadowing(**extra: dict) -> list[DeviceReport]:
    """Every device serves OLD; the canaries report shadow figures (``extra`` per canary)."""
    return [
        DeviceReport(
            r.device,
            bundle_id=OLD,
            p95_ms=10.0,
            shadow=figures(r.device, **extra.get(r.device.replace("-", "_"), {}))
            if r.device in ("cam-1", "cam-2")
            else None,
        )
        for r in reports()
    ]


def begin_shadow() -> Rollout:
    rollout, actions = start("shop", NEW, "digits@2.0.0", reports(), OLD, SHADOW_POLICY, now=0)
    assert rollout.phase == SHADOW and rollout.canaries == ("cam-1", "cam-2")
    # The canaries keep serving OLD and try NEW beside it, until the phase cannot last longer.
    request = ShadowRequest(NEW, "digits", "2.0.0", 0.5, 900 + 300 + 1)
    assert actions == [Action(OLD, "cam-1", request), Action(OLD, "cam-2", request)]
    return rollout


def test_a_shadow_phase_that_passes_installs_on_the_canaries_then_soaks_as_usual():
    rollout = begin_shadow()
    rollout, actions = advance(rollout, shadowing(), SHADOW_POLICY, now=600)
    assert rollout.phase == SHADOW and actions == []  # 10 min of 15: not judged yet
    rollout, actions = advance(rollout, shadowing(), SHADOW_POLICY, now=901)
    assert rollout.phase == CANARY and rollout.phase_since == 901
    assert actions == [Action(NEW, "cam-1"), Action(NEW, "cam-2")]  # no shadow section: it ends
    rollout, _ = advance(rollout, serving_canaries(), SHADOW_POLICY, now=910)
    assert rollout.phase == SOAK


@pytest.mark.parametrize(
    ("cam_2", "fragment"),
    [
        ({"agreed": 20, "agreement": 0.1}, "canary cam-2: agreement 10.0% is below 98.0%"),
        ({"latency_ratio": 3.0}, "canary cam-2: the candidate is 3.00x as slow"),
        ({"severity": "model affected"}, "canary cam-2: this device's inputs affect the candidate"),
    ],
)
def test_a_shadow_phase_whose_figures_fail_aborts_naming_the_canary_and_the_figure(cam_2, fragment):
    rollout = begin_shadow()
    rollout, actions = advance(rollout, shadowing(cam_2=cam_2), SHADOW_POLICY, now=901)
    assert rollout.phase == ABORTED
    assert rollout.reason.startswith("in the shadow phase, digits@2.0.0 did not pass: ")
    assert fragment in rollout.reason and "cam-1" not in rollout.reason
    # Every canary is told to serve OLD, with no shadow: nothing was switched, the shadow ends.
    assert actions == [Action(OLD, "cam-1"), Action(OLD, "cam-2")]


def test_a_candidate_failing_in_the_shadow_aborts_at_once():
    rollout = begin_shadow()
    failed = {"state": "failed", "error": "it returned NaN or infinity"}
    rollout, actions = advance(rollout, shadowing(cam_1=failed), SHADOW_POLICY, now=5)
    assert (
        rollout.phase == ABORTED and "canary cam-1: the candidate digits@2.0.0 failed there" in rollout.reason
    )
    assert "NaN" in rollout.reason and actions == [Action(OLD, "cam-1"), Action(OLD, "cam-2")]


def test_a_shadow_phase_waits_for_enough_inputs_then_gives_up_naming_the_canary():
    rollout = begin_shadow()
    few = {"compared": 3, "classified": 3, "agreed": 3, "agreement": 1.0}
    rollout, actions = advance(rollout, shadowing(cam_2=few), SHADOW_POLICY, now=950)
    assert rollout.phase == SHADOW and actions == []  # time is up, but cam-2 compared 3 of 20
    silent = [r for r in shadowing() if r.device != "cam-1"]  # cam-1 reported nothing at all
    rollout, actions = advance(rollout, silent, SHADOW_POLICY, now=1000)
    assert rollout.phase == SHADOW
    rollout, actions = advance(rollout, silent, SHADOW_POLICY, now=1201)
    assert rollout.phase == ABORTED
    assert "canary cam-1 compared 0 input(s), fewer than the 20 needed" in rollout.reason
    assert "cam-2" not in rollout.reason


def test_a_shadow_phase_survives_a_restart_and_needs_a_served_bundle(tmp_path):
    rollout = begin_shadow()
    rollout.save(tmp_path / "r.json")
    loaded = Rollout.load(tmp_path / "r.json")
    assert loaded == rollout and loaded.rollout_policy == SHADOW_POLICY
    rollout, _ = advance(loaded, shadowing(), loaded.rollout_policy, now=901)
    assert rollout.phase == CANARY
    with pytest.raises(ConfigError, match="serves nothing yet"):
        start("shop", NEW, "digits@2.0.0", reports(), None, SHADOW_POLICY, now=0)
    with pytest.raises(ConfigError, match="needs at least one canary"):
        RolloutPolicy(canary=0, shadow_s=60)
    with pytest.raises(ConfigError, match="min agreement"):
        RolloutPolicy(canary=1, shadow_s=60, min_agreement=1.5)


def test_a_shadow_phase_aborts_once_a_judged_canary_fails_without_waiting_for_short_ones():
    rollout = begin_shadow()
    few = {"compared": 3, "classified": 3, "agreed": 3, "agreement": 1.0}
    bad = {"agreed": 20, "agreement": 0.1}
    # cam-1 compared too few, cam-2 enough and fails agreement: no need to wait for cam-1.
    rollout, actions = advance(rollout, shadowing(cam_1=few, cam_2=bad), SHADOW_POLICY, now=901)
    assert rollout.phase == ABORTED
    assert "canary cam-2: agreement 10.0% is below 98.0%" in rollout.reason
    assert "cam-1" not in rollout.reason
    assert actions == [Action(OLD, "cam-1"), Action(OLD, "cam-2")]
    # Before the phase's time is up nothing is judged, a failing figure included.
    rollout = begin_shadow()
    rollout, actions = advance(rollout, shadowing(cam_1=few, cam_2=bad), SHADOW_POLICY, now=600)
    assert rollout.phase == SHADOW and actions == []


def test_outputs_that_are_not_classes_are_judged_by_max_error_only_when_given(tmp_path):
    """A regression candidate has no agreement: without --max-error the phase does not pass
    on latency alone; with it, the largest output difference decides."""
    regression = {"classified": 0, "agreed": 0, "agreement": None, "abs_error_max": 0.3}
    rollout = begin_shadow()
    rollout, _ = advance(rollout, shadowing(cam_1=regression, cam_2=regression), SHADOW_POLICY, now=901)
    assert rollout.phase == ABORTED
    assert "canary cam-1: its outputs are not classes, so agreement could not be judged" in rollout.reason
    assert "--max-error" in rollout.reason

    strict = replace(SHADOW_POLICY, max_error=0.1)
    rollout, _ = start("shop", NEW, "digits@2.0.0", reports(), OLD, strict, now=0)
    rollout.save(tmp_path / "r.json")  # the gate is part of the saved policy
    rollout = Rollout.load(tmp_path / "r.json")
    assert rollout.rollout_policy.max_error == 0.1
    close = {**regression, "abs_error_max": 0.05}
    over, _ = advance(rollout, shadowing(cam_1=close, cam_2=regression), rollout.rollout_policy, now=901)
    assert over.phase == ABORTED
    assert "canary cam-2: the outputs differ by up to 0.3, over the 0.1 allowed" in over.reason
    assert "cam-1" not in over.reason
    passed, _ = advance(rollout, shadowing(cam_1=close, cam_2=close), rollout.rollout_policy, now=901)
    assert passed.phase == CANARY


def test_a_drive_gives_each_phase_its_own_time_then_the_timeout():
    """`push --wait --timeout T` waits T per phase, after the phase's own time: a 900 s shadow
    phase with T 300 is not given up before the controller's own verdict at 900 + 300 s."""
    rollout = begin_shadow()
    deadline = phase_deadline(rollout, SHADOW_POLICY, 300, since=0)
    assert deadline > 900 + 300
    silent = [r for r in shadowing() if r.device != "cam-1"]
    judged, _ = advance(rollout, silent, SHADOW_POLICY, now=900 + 300 + 0.5)
    assert judged.phase == ABORTED and deadline > 900 + 300 + 0.5  # the controller spoke first
    # A drive resumed late in the phase gets the rest of it; one resumed after it, the timeout.
    assert phase_deadline(rollout, SHADOW_POLICY, 300, since=600) == deadline
    assert phase_deadline(rollout, SHADOW_POLICY, 300, since=5000) == deadline - 900 + 5000
    soaking = replace(rollout, phase=SOAK, phase_since=1000)
    assert phase_deadline(soaking, SHADOW_POLICY, 300, since=0) > 1000 + 60 + 300
    installing = replace(rollout, phase=CANARY, phase_since=1000)
    assert 1000 + 300 < phase_deadline(installing, SHADOW_POLICY, 300, since=0) < 1000 + 60 + 300


def test_durations_longer_than_a_year_are_refused():
    """A desired state's times must stay in the calendar: 99999999 days is a typo, refused."""
    for field in ("shadow_s", "soak_s", "install_timeout_s"):
        with pytest.raises(ConfigError, match="at most 365 days"):
            RolloutPolicy(canary=1, **{field: 1e12})
    with pytest.raises(ConfigError, match="max output error"):
        RolloutPolicy(canary=1, shadow_s=60, max_error=-1)
