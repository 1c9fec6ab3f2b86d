"""The control plane in the registry database, on SQLite and on PostgreSQL: two operators
pushing at the same moment start exactly one rollout, sequence numbers never repeat across
processes, an old ``$EDGEKIT_HOME`` is brought in once, a dead leader's role is taken over, and
every action lands in the audit log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from edgekit import TrustedKeys, create_bundle
from edgekit.errors import BundleError, ConfigError
from edgekit.fleet.control import ControlPlane
from edgekit.fleet.registry.models import AlertLease
from edgekit.fleet.rollout import RolloutPolicy, start
from edgekit.keys import load_signing_key
from test_push import BIN, Fleet, all_serving, edgekit, fleet, push_and_wait  # noqa: F401 - fleet is a fixture
from test_serve import serve, wait_until  # noqa: F401 - serve is a fixture
from watcher import Watcher


def operator_env(name: str, registry_url: str) -> dict[str, str]:
    return {**os.environ, "EDGEKIT_OPERATOR": name, "EDGEKIT_REGISTRY": registry_url, "COLUMNS": "200"}


PUSH = [str(BIN / "edgekit"), "push", "--fleet", "lab", "--canary", "1"]


def test_two_operators_pushing_at_once_start_exactly_one_rollout(
    mosquitto, digits_models, edgekit_home, registry_url
):
    assert edgekit("keys", "init").returncode == 0
    pushes = {
        name: subprocess.Popen(
            [
                *PUSH,
                str(digits_models.fp32),
                "--name",
                "digits",
                "--version",
                version,
                "--broker",
                mosquitto.url,
            ],
            env=operator_env(name, registry_url),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, version in (("alice", "1.0.0"), ("bob", "2.0.0"))
    }
    outcomes = {name: (p.wait(120), p.stderr.read() if p.stderr else "") for name, p in pushes.items()}
    winners = [name for name, (code, _) in outcomes.items() if code == 0]
    assert len(winners) == 1, outcomes
    (loser,) = set(outcomes) - set(winners)
    code, stderr = outcomes[loser]
    assert code == 15 and "Traceback" not in stderr, outcomes
    assert len(stderr.strip().splitlines()) == 1
    assert "rollout in progress" in stderr and f"started by {winners[0]}" in stderr

    with ControlPlane.open(registry_url) as control:
        info = control.rollout_info("lab")
        assert info is not None and info.started_by == winners[0]
        assert not info.rollout.finished  # no device has installed it: nobody stepped it on
        log = [(e.actor, e.action, e.result) for e in reversed(control.audit_log("lab"))]
    assert (winners[0], "push", "ok") in log and (loser, "push", "failed") in log
    audit = json.loads(
        subprocess.run(
            [str(BIN / "edgekit"), "fleet", "audit", "--fleet", "lab", "--json"],
            env=operator_env("carol", registry_url),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert {(a["actor"], a["result"]) for a in audit} == {(winners[0], "ok"), (loser, "failed")}
    assert [a["detail"] for a in audit if a["result"] == "failed"] == [stderr.strip().removeprefix("error: ")]

    # The operator who started it may push again (it supersedes their own rollout).
    again = subprocess.run(
        [str(BIN / "edgekit"), "push", "digits", "--fleet", "lab", "--broker", mosquitto.url],
        env=operator_env(winners[0], registry_url),
        capture_output=True,
        text=True,
        check=False,
    )
    assert again.returncode == 0, again.stderr


COUNT = (
    "import sys; from edgekit.fleet.control import ControlPlane\n"
    "control = ControlPlane.open(sys.argv[1])\n"
    "print(' '.join(str(control.next_seq('lab', above=int(sys.argv[2]))) for _ in range(40)))"
)


def test_sequence_numbers_never_repeat_across_processes(registry_url):
    with ControlPlane.open(registry_url) as control:
        assert control.next_seq("lab") == 1  # migrates the database before the processes race
    workers = [
        subprocess.Popen([sys.executable, "-c", COUNT, registry_url, "0"], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    handed = [int(n) for w in workers for n in (w.communicate(timeout=120)[0] or "").split()]
    assert all(w.returncode == 0 for w in workers)
    assert sorted(handed) == list(range(2, 2 + 3 * 40))  # each once, none skipped
    with ControlPlane.open(registry_url) as control:
        assert control.next_seq("lab", above=500) == 501  # a number seen on the broker wins
        assert control.next_seq("lab", above=3) == 502  # and the counter never goes back


def test_an_old_edgekit_home_is_imported_once(digits_models, edgekit_home, registry_url, tmp_path):
    assert edgekit("keys", "init").returncode == 0
    key = load_signing_key(edgekit_home)
    for version in ("1.0.0", "1.1.0"):
        folder = edgekit_home / "bundles" / "digits"
        folder.mkdir(parents=True, exist_ok=True)
        create_bundle(
            digits_models.fp32, name="digits", version=version, key=key, output=folder / f"{version}.ekb"
        )
    (edgekit_home / "bundles" / "digits" / "2.0.0.ekb").write_bytes(b"not a bundle")  # skipped, said
    (edgekit_home / "fleets").mkdir()
    history = [{"id": "a" * 64, "label": "digits@1.0.0"}, {"id": "b" * 64, "label": "digits@1.1.0"}]
    doc = {"seq": 7, "bundle_id": "b" * 64, "label": "digits@1.1.0", "history": history, "devices": ["cam-1"]}
    (edgekit_home / "fleets" / "lab.json").write_text(json.dumps(doc))
    (edgekit_home / "rollouts").mkdir()
    rollout, _ = start("lab", "b" * 64, "digits@1.1.0", [], "a" * 64, RolloutPolicy(canary=0), time.time())
    (edgekit_home / "rollouts" / "lab.json").write_bytes(rollout.to_json())

    trusted = TrustedKeys([key.public])
    with ControlPlane.open(registry_url, trusted, home=edgekit_home, actor="alice") as control:
        assert control.catalog.versions("digits") == ["1.0.0", "1.1.0"]
        record = control.record("lab")
        assert (record.seq, record.label, record.devices) == (7, "digits@1.1.0", ["cam-1"])
        assert record.previous() == history[0]
        assert control.rollout("lab") == rollout
        assert control.next_seq("lab") == 8
        (entry,) = control.audit_log()
        assert entry.action == "import-home" and json.loads(entry.detail or "{}")["skipped"] == 1
    # Once: the second open changes nothing, even though the files are still there.
    with ControlPlane.open(registry_url, trusted, home=edgekit_home) as control:
        assert control.next_seq("lab") == 9 and len(control.audit_log()) == 1
        # Versions are never reused, by any operator.
        other = tmp_path / "other.ekb"
        create_bundle(digits_models.int8, name="digits", version="1.0.0", key=key, output=other)
        with pytest.raises(BundleError, match="already holds a different digits@1.0.0"):
            control.catalog.add(other)


LEAD = (
    "import sys; from edgekit.fleet.control import ControlPlane\n"
    "with ControlPlane.open(sys.argv[1], actor='serve-a').leader('rollout-controller') as leading:\n"
    "    print(leading, flush=True); sys.stdin.read()"
)


def test_a_dead_leaders_role_is_taken_over(registry_url):
    with ControlPlane.open(registry_url, actor="serve-b") as control:
        leader = subprocess.Popen(
            [sys.executable, "-c", LEAD, registry_url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert leader.stdout is not None and leader.stdout.readline() == "True\n"
            with control.leader("rollout-controller") as leading:
                assert leading is False  # one leader at a time
            leader.kill()  # kill -9: the database (or the kernel, for SQLite) frees the role
            leader.wait(10)
            with control.leader("rollout-controller", wait=15) as leading:
                assert leading is True
        finally:
            if leader.poll() is None:
                leader.kill()
                leader.wait(10)


def test_commands_say_what_is_missing_in_one_line(edgekit_home):
    result = edgekit("rollout", "status", "--fleet", "lab")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        == "error: fleet lab has no rollout yet; start one with `edgekit push --canary N`"
    )
    nothing = edgekit("fleet", "audit")
    assert nothing.returncode == 0 and "Nothing has been done" in nothing.stdout


def test_a_lock_folder_that_cannot_be_made_is_a_config_error(tmp_path):
    registry = tmp_path / "registry.db"
    (tmp_path / "registry.db.locks").write_text("a file where the lock folder goes")
    refused = pytest.raises(
        ConfigError, match=r"^cannot create the registry's lock folder .*registry\.db\.locks"
    )
    with ControlPlane.open(f"sqlite:///{registry}") as control, refused, control.driving("lab", "alice"):
        pass


def leader_pid(control: ControlPlane) -> int | None:
    return control.lock_pid("role:rollout-controller")


def evaluator_pid(control: ControlPlane) -> int | None:
    return control.lock_pid("role:alert-evaluator")


def lease_pid(control: ControlPlane) -> int | None:
    """The process id in the alert evaluator's lease (``host:pid:nonce``): who evaluated last."""
    with control.registry.session() as session:
        holder = session.get(AlertLease, "evaluator").holder
    return int(holder.split(":")[1]) if holder else None


def test_killing_the_leading_fleet_serve_mid_canary_hands_the_rollout_to_the_other(
    serve,  # noqa: F811 - the fixture imported above
    fleet: Fleet,  # noqa: F811 - the fixture imported above
    mosquitto,
    postgres_url,
    digits_models,
    monkeypatch,
):
    """Two `fleet serve` on one PostgreSQL registry: one leads the rollout controller and runs
    the alert evaluator. kill -9 of the leader (with its workers) while a canary soaks: the
    other leads within 15 s and evaluates alerts within 15 s (it holds the evaluator's lock and
    has taken the lease), finishes the rollout, and no step is done twice (one desired state
    per step: the counter says so)."""
    monkeypatch.setenv("EDGEKIT_REGISTRY", postgres_url)
    devices = ["cam-1", "cam-2", "cam-3"]
    watcher = Watcher(mosquitto.url)
    try:
        for device in devices:
            fleet.start(device)
        push_and_wait(digits_models.fp32, mosquitto.url, "--name", "digits", "--version", "1.0.0")  # seq 1
        first = serve("--registry", postgres_url, new_session=True)
        second = serve("--registry", postgres_url, "--group", "second")
        control = ControlPlane.open(postgres_url)
        wait_until(lambda: leader_pid(control) in (first.process.pid, second.process.pid), first, "a leader")
        leader, other = (first, second) if leader_pid(control) == first.process.pid else (second, first)
        assert leader is first, "the first to start leads"
        wait_until(lambda: evaluator_pid(control) == first.process.pid, first, "the first evaluating")
        wait_until(lambda: lease_pid(control) == first.process.pid, first, "the first's lease")

        canary = edgekit(
            "push", str(digits_models.int8), "--fleet", "lab", "--canary", "1", "--soak", "5",
            "--name", "digits", "--version", "2.0.0", "--broker", mosquitto.url,
        )  # fmt: skip
        assert canary.returncode == 0, canary.stderr  # seq 2: cam-1's own desired state
        watcher.wait_for(watcher.serving("2.0.0", "cam-1"), timeout=60)
        assert control.rollout("lab").phase in ("canary", "soak")

        os.killpg(leader.process.pid, signal.SIGKILL)  # the leader's machine is gone
        killed = time.monotonic()
        leader.process.wait(10)
        wait_until(lambda: leader_pid(control) == other.process.pid, other, "the other leading", timeout=15)
        wait_until(  # within 15 s of the same kill
            lambda: evaluator_pid(control) == lease_pid(control) == other.process.pid,
            other,
            "the other evaluating alerts",
            timeout=max(0.0, killed + 15 - time.monotonic()),
        )

        watcher.wait_for(all_serving(watcher, devices, "2.0.0"), timeout=120)  # seq 3: the fleet's
        wait_until(lambda: control.rollout("lab").finished, other, "the rollout finished", timeout=30)
        assert control.rollout("lab").phase == "done"
        assert control.record("lab").seq == 3  # no step was done twice
        control.close()
        assert other.stop()["stopped"]
    finally:
        watcher.close()
