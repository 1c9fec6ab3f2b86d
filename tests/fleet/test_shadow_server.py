"""`edgekit push --shadow`, `shadow status|promote|stop` through a running `fleet serve`
(`--server`): an operator with no key on their laptop does what the workstation does, with the
same output, `--json` and one-line refusals; a viewer reads but may not act. SQLite and
PostgreSQL registries; shadow windows written into the registry as ingest writes them."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone

from edgekit.fleet.registry import DeviceState, Registry, ShadowRow
from edgekit.topics import Topics
from test_api import laptop, one_line
from test_dashboard_accounts import retained_desired_state
from test_push import BIN, edgekit
from test_serve import serve  # noqa: F401 - serve is a fixture

NOW = datetime.now(timezone.utc).replace(microsecond=0)


def reported(registry_url: str, candidate_id: str, cam2_agreed: int) -> None:
    """cam-1 and cam-2 of fleet lab tried the candidate: 199 and ``cam2_agreed`` of 200."""
    registry = Registry(registry_url)
    figures = {"serving_version": "1.0.0", "state": "running", "sample_rate": 0.5, "compared": 200}
    windows = [
        ShadowRow(
            d,
            1,
            NOW - timedelta(minutes=1),
            candidate_id,
            "digits@2.0.0",
            **figures,
            dropped=0,
            classified=200,
            agreed=agreed,
            abs_error_mean=0.01,
            abs_error_max=0.1,
            serving_p50_ms=1.0,
            serving_p95_ms=2.0,
            candidate_p50_ms=1.1,
            candidate_p95_ms=2.2,
            candidate_severity="ok",
        )
        for d, agreed in (("cam-1", 199), ("cam-2", cam2_agreed))
    ]
    try:
        registry.write_batch(
            states=[
                DeviceState(d, "lab", True, "serving", NOW, "a" * 64, "digits", "1.0.0")
                for d in ("cam-1", "cam-2")
            ],
            shadows=windows,
        )
    finally:
        registry.close()


def add_user(registry_url: str, name: str, role: str, password: str) -> None:
    added = subprocess.run(
        [str(BIN / "edgekit"), "fleet", "user", "add", name, "--role", role, "--password-stdin",
         "--registry", registry_url],
        input=password + "\n", capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr


def test_an_operator_tries_judges_stops_and_promotes_a_candidate_through_the_service(
    serve,  # noqa: F811 - the fixture imported above
    mosquitto,
    registry_url,
    digits_models,
    edgekit_home,
    tmp_path,
):
    assert edgekit("keys", "init").returncode == 0  # the service's key, in its home
    served = serve("--registry", registry_url)
    url = served.urls["dashboard"]
    add_user(registry_url, "alice", "operator", "alice-secret")
    add_user(registry_url, "vic", "viewer", "vic-secret")
    alice, vic = tmp_path / "alice-laptop", tmp_path / "vic-laptop"
    for home, name in ((alice, "alice"), (vic, "vic")):
        signed = laptop(home, url, "login", "--account", name, "--password-stdin", stdin=f"{name}-secret\n")
        assert signed.returncode == 0, signed.stderr
    here = ["--registry", registry_url]  # the same commands on the service's machine, without --server

    one_line(laptop(alice, url, "shadow", "promote", "--fleet", "lab"), 15, "no device has reported a shadow")
    nothing = laptop(alice, url, "push", str(digits_models.int8), "--fleet", "lab", "--shadow")
    one_line(nothing, 15, "nothing was pushed to fleet lab yet")
    pushed = laptop(alice, url, "push", str(digits_models.fp32), "--fleet", "lab", "--name", "digits",
                    "--version", "1.0.0", "--json")  # fmt: skip
    assert pushed.returncode == 0, pushed.stderr
    shadowed = laptop(alice, url, "push", str(digits_models.int8), "--fleet", "lab", "--name", "digits",
                      "--version", "2.0.0", "--shadow", "--sample", "0.5", "--for", "1h", "--json")  # fmt: skip
    assert shadowed.returncode == 0, shadowed.stderr
    started = json.loads(shadowed.stdout)
    assert (started["serving"], started["candidate"], started["sample"], started["seconds"]) == (
        "digits@1.0.0", "digits@2.0.0", 0.5, 3600.0,
    )  # fmt: skip
    asked = retained_desired_state(mosquitto.url, Topics().fleet_desired("lab"))
    assert asked["seq"] == started["seq"] and asked["bundle"]["version"] == "1.0.0"
    assert (asked["shadow"]["sha256"], asked["shadow"]["sample"]) == (started["candidate_id"], 0.5)
    words = laptop(alice, url, "push", "digits", "--fleet", "lab", "--version", "2.0.0", "--shadow")
    assert (
        words.returncode == 0
        and "tries digits@2.0.0 beside digits@1.0.0 on 10% of live inputs" in words.stdout
    )

    reported(registry_url, started["candidate_id"], cam2_agreed=150)
    remote = laptop(vic, url, "shadow", "status", "--fleet", "lab", "--json")  # a viewer may look
    local = edgekit("shadow", "status", "--fleet", "lab", "--json", *here)
    assert remote.returncode == 0 and local.returncode == 0, (remote.stderr, local.stderr)
    assert json.loads(remote.stdout) == json.loads(local.stdout)
    assert json.loads(remote.stdout)["total"]["agreed"] == 349
    table = laptop(alice, url, "shadow", "status", "--fleet", "lab")
    assert table.returncode == 0 and "digits@2.0.0 in the shadow of fleet lab" in table.stdout
    assert "total" in table.stdout and "75.0%" in table.stdout
    assert "1.0 / 2.0 ms" in table.stdout and "1.1 / 2.2 ms" in table.stdout  # p50 / p95 of each model
    total = json.loads(remote.stdout)["total"]
    assert (total["serving_p50_ms"], total["candidate_p50_ms"]) == (1.0, 1.1)

    # A viewer may not act: 403, one line, audited.
    for args in (("shadow", "promote", "--fleet", "lab"), ("shadow", "stop", "--fleet", "lab"),
                 ("push", "digits", "--fleet", "lab", "--shadow")):  # fmt: skip
        one_line(laptop(vic, url, *args), 16, "vic is a viewer")

    # Refused: the same reasons and exit code as on the workstation, the verdict with --json.
    refused = laptop(alice, url, "shadow", "promote", "--fleet", "lab", "--min-agreement", "0.9", "--json")
    there = edgekit("shadow", "promote", "--fleet", "lab", "--min-agreement", "0.9", "--json", *here)
    line = one_line(
        refused, 15, "digits@2.0.0 was not promoted on fleet lab", "cam-2: agreement 75.0% is below 90.0%"
    )
    assert line == there.stderr.strip() and refused.returncode == there.returncode
    verdict = json.loads(refused.stdout)
    assert verdict == json.loads(there.stdout)
    assert not verdict["passed"] and verdict["reasons"] == [
        "cam-2: agreement 75.0% is below 90.0% (150 of 200 inputs)"
    ]

    # --max-error goes through too: the outputs differ by up to 0.1 on both devices.
    strict = laptop(alice, url, "shadow", "promote", "--fleet", "lab", "--min-agreement", "0.7",
                    "--max-error", "0.05", "--json")  # fmt: skip
    there = edgekit("shadow", "promote", "--fleet", "lab", "--min-agreement", "0.7", "--max-error", "0.05",
                    "--json", *here)  # fmt: skip
    assert strict.returncode == 15 and json.loads(strict.stdout) == json.loads(there.stdout)
    assert json.loads(strict.stdout)["reasons"] == [
        f"{d}: the outputs differ by up to 0.1, over the 0.05 allowed" for d in ("cam-1", "cam-2")
    ]

    stopped = laptop(alice, url, "shadow", "stop", "--fleet", "lab", "--json")
    assert stopped.returncode == 0, stopped.stderr
    assert json.loads(stopped.stdout)["seq"] > started["seq"] and json.loads(stopped.stdout)["shadow"] is None
    told = retained_desired_state(mosquitto.url, Topics().fleet_desired("lab"))
    assert "shadow" not in told and told["seq"] == json.loads(stopped.stdout)["seq"]

    promoted = laptop(alice, url, "shadow", "promote", "--fleet", "lab", "--min-agreement", "0.7",
                      "--max-latency-ratio", "2", "--json")  # fmt: skip
    assert promoted.returncode == 0, promoted.stderr
    done = json.loads(promoted.stdout)
    assert done["passed"] and done["rollout"]["bundle"] == "digits@2.0.0"
    switched = retained_desired_state(mosquitto.url, Topics().fleet_desired("lab"))
    assert switched["bundle"]["version"] == "2.0.0" and "shadow" not in switched

    audit = json.loads(edgekit("fleet", "audit", "--json", *here).stdout)
    mine = [
        (e["actor"], e["action"], e["result"]) for e in reversed(audit) if e["action"].startswith("shadow")
    ]
    assert ("alice", "shadow-promote", "failed") in mine and ("alice", "shadow-stop", "ok") in mine
    assert mine[-1] == ("alice", "shadow-promote", "ok")
    assert any(e["actor"] == "vic" and e["result"] == "refused" for e in audit)
    assert served.stop()["stopped"]


def test_bad_input_is_refused_with_one_line(
    serve,  # noqa: F811 - the fixture imported above
    registry_url,
    edgekit_home,
    tmp_path,
):
    assert edgekit("keys", "init").returncode == 0
    served = serve("--registry", registry_url, "--token", "s3cret-token")
    url = served.urls["dashboard"]
    env = {**os.environ, "EDGEKIT_TOKEN": "s3cret-token"}
    bad_url = laptop(tmp_path, "ftp://nowhere", "shadow", "status", "--fleet", "lab")
    one_line(bad_url, 2, "server URL 'ftp://nowhere'", "http://HOST:PORT/")
    unsigned = laptop(tmp_path, url, "shadow", "stop", "--fleet", "lab")
    one_line(unsigned, 16, "not signed in", "edgekit login")
    duration = edgekit(
        "push", "digits", "--fleet", "lab", "--shadow", "--for", "soon", "--server", url, env=env
    )
    assert duration.returncode == 2 and "is not a duration like 90s" in duration.stderr

    def refused(method: str, path: str) -> tuple[int, str]:
        request = urllib.request.Request(
            url + path, method=method, data=b"" if method == "POST" else None,
            headers={"Authorization": "Bearer s3cret-token"},
        )  # fmt: skip
        try:
            urllib.request.urlopen(request, timeout=30)
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())["error"]
        raise AssertionError(f"{path} was not refused")

    assert refused("POST", "api/v1/fleets/lab/shadow?sample=2") == (
        400, "sample 2: give the share of live inputs compared, above 0 and at most 1",
    )  # fmt: skip
    assert refused("POST", "api/v1/fleets/lab/shadow/promote?min_agreement=most") == (
        400, "min_agreement 'most' is not a number",
    )  # fmt: skip
    assert refused("POST", "api/v1/fleets/lab/shadow/promote?canary=-1")[0] == 400
    assert refused("POST", "api/v1/fleets/lab/shadow/promote?max_error=-1")[0] == 400
    # Durations past the calendar (a typo): one line, not a 500 from formatting the end time.
    assert refused("POST", "api/v1/fleets/lab/shadow?seconds=1e12") == (
        400, "seconds 1e+12: give how long devices try the candidate, above 0 and at most 31536000 (365 days)",
    )  # fmt: skip
    status, why = refused("POST", "api/v1/fleets/lab/push?canary=1&shadow_s=1e12")
    assert status == 400 and "at most 365 days" in why
    duration = edgekit(
        "push", "digits", "--fleet", "lab", "--shadow", "--for", "99999999d", "--server", url, env=env
    )
    assert duration.returncode == 2 and "too long: give at most 365d" in duration.stderr
    assert served.stop()["stopped"]
