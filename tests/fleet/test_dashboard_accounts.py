"""The dashboard acts: accounts with roles, sessions, CSRF, the acknowledge action and the audit
log, through the API, the CLI, and in headless Chromium by clicking."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
from cdp import Browser
from edgekit.errors import ConfigError
from edgekit.fleet.accounts import Accounts
from edgekit.fleet.alerts import AlertStore, Evaluator
from edgekit.fleet.api import ApiContext
from edgekit.fleet.control import ControlPlane, FleetRecord
from edgekit.fleet.dashboard import check_bind, create_app
from edgekit.fleet.registry.models import Account
from edgekit.fleet.rollout import Rollout
from edgekit.keys import load_own_public_key
from edgekit.mqtt import MqttClient
from edgekit.topics import Topics
from edgekit.trust import TrustedKeys
from sqlalchemy import select
from starlette.testclient import TestClient
from test_dashboard import serving
from test_fleet_cli import edgekit
from test_push import BIN, Fleet, fleet  # noqa: F401 - fleet is a fixture
from test_serve import serve  # noqa: F401 - serve is a fixture
from watcher import Watcher

NOW = datetime.now(timezone.utc)
SCREENSHOTS = os.environ.get("EDGEKIT_SCREENSHOTS")
OPERATOR, VIEWER = ("olga", "operator-pass-1"), ("victor", "viewer-pass-22")


@pytest.fixture
def shop(registry, tmp_path):
    """The populated registry with an operator, a viewer and two open alerts."""
    accounts = Accounts(registry)
    accounts.add(OPERATOR[0], "operator", OPERATOR[1])
    accounts.add(VIEWER[0], "viewer", VIEWER[1])
    AlertStore(registry, tmp_path).set_rule("offline", ["offline_after=0"], NOW)
    Evaluator(registry, tmp_path).tick()
    return registry


def audit_log(registry):
    return ControlPlane(registry).audit_log()


def signed_in(app, who: tuple[str, str]) -> tuple[TestClient, str]:
    client = TestClient(app)
    response = client.post("/api/login", json={"name": who[0], "password": who[1]})
    assert response.status_code == 200, response.text
    session = client.get("/api/session").json()
    assert session["user"] == who[0] and session["csrf"]
    return client, session["csrf"]


def test_operators_act_viewers_read_and_every_refusal_is_audited(shop):
    app = create_app(shop)
    (alert,) = [a for a in AlertStore(shop, None).alerts(open_only=True) if a.rule == "offline"]
    anonymous = TestClient(app)
    assert anonymous.get("/", follow_redirects=False).headers["location"] == "/login"
    assert anonymous.get("/api/devices").status_code == 401
    assert anonymous.get("/login").status_code == 200
    assert anonymous.post("/api/login", json={"name": OPERATOR[0], "password": "wrong"}).status_code == 401

    viewer, viewer_csrf = signed_in(app, VIEWER)
    assert viewer.get("/api/devices").status_code == 200
    refused = viewer.post(f"/api/alerts/{alert.id}/ack", headers={"X-CSRF-Token": viewer_csrf})
    assert refused.status_code == 403 and "viewer" in refused.json()["error"]

    operator, csrf = signed_in(app, OPERATOR)
    assert operator.post(f"/api/alerts/{alert.id}/ack").status_code == 403  # no CSRF token: a forged form
    assert (
        operator.post(f"/api/alerts/{alert.id}/ack", headers={"X-CSRF-Token": viewer_csrf}).status_code == 403
    )
    done = operator.post(f"/api/alerts/{alert.id}/ack", headers={"X-CSRF-Token": csrf})
    assert done.status_code == 200 and done.json()["acked_by"] == OPERATOR[0]

    log = [(e.actor, e.action, e.result) for e in reversed(audit_log(shop))]
    assert log == [
        (OPERATOR[0], "sign-in", "refused"),
        (VIEWER[0], "sign-in", "ok"),
        (VIEWER[0], "alert-ack", "refused"),
        (OPERATOR[0], "sign-in", "ok"),
        (OPERATOR[0], "alert-ack", "refused"),
        (OPERATOR[0], "alert-ack", "refused"),
        (OPERATOR[0], "alert-ack", "ok"),
    ]
    assert "CSRF" in audit_log(shop)[1].detail
    assert operator.get("/api/audit").json()[0]["target"] == f"alert {alert.id}: cam-2 is offline"

    # Passwords are kept as scrypt hashes only; a removed account's session ends at once.
    with shop.session() as session:
        hashes = list(session.execute(select(Account.password_hash)).scalars())
    assert all(h.startswith("scrypt$") and OPERATOR[1] not in h and VIEWER[1] not in h for h in hashes)
    Accounts(shop).remove(VIEWER[0])
    assert viewer.get("/api/devices").status_code == 401


def test_forged_pushes_aborts_and_rollbacks_are_refused_and_audited(shop):
    """A forged form (an operator's session, no CSRF token) and a viewer with a valid token are
    refused (403) on every action, each refusal audited; an acknowledgement of an alert id that
    is no number is a 404, audited too."""
    app = create_app(shop)
    viewer, viewer_csrf = signed_in(app, VIEWER)
    operator, csrf = signed_in(app, OPERATOR)
    actions = [
        ("push", "/api/fleets/shop/push", {"name": "digits", "version": "1.1.0", "canary": 1}),
        ("push", "/api/fleets/shop/push", None),  # refused before its body is read
        ("rollout-abort", "/api/rollouts/shop/abort", None),
        ("rollout-resume", "/api/rollouts/shop/resume", None),
        ("rollback", "/api/fleets/shop/rollback", None),
        ("device-rollback", "/api/devices/cam-1/rollback", None),
    ]
    before = len(audit_log(shop))
    for _action, path, body in actions:
        forged = operator.post(path, json=body)  # the session's cookie rides along; no token
        assert forged.status_code == 403 and "CSRF" in forged.json()["error"], path
        as_viewer = viewer.post(path, json=body, headers={"X-CSRF-Token": viewer_csrf})
        assert as_viewer.status_code == 403 and "viewer" in as_viewer.json()["error"], path
    log = [(e.actor, e.action, e.result, e.fleet) for e in list(reversed(audit_log(shop)))[before:]]
    assert log == [
        entry
        for action, _path, _body in actions
        for entry in ((OPERATOR[0], action, "refused", "shop"), (VIEWER[0], action, "refused", "shop"))
    ]
    bad = operator.post("/api/alerts/abc/ack", headers={"X-CSRF-Token": csrf})
    assert bad.status_code == 404 and "is a number" in bad.json()["error"]
    (entry, *_) = audit_log(shop)
    assert (entry.actor, entry.action, entry.result, entry.target) == (
        OPERATOR[0],
        "alert-ack",
        "failed",
        "alert abc",
    )


def test_the_token_keeps_working_for_scripts_and_metrics(shop):
    app = create_app(shop, token="s3cret-token")
    bearer = {"Authorization": "Bearer s3cret-token"}
    client = TestClient(app)
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=bearer).status_code == 200
    (alert, *_) = AlertStore(shop, None).alerts(open_only=True)
    done = client.post(f"/api/alerts/{alert.id}/ack", headers=bearer)  # a script: no CSRF needed
    assert done.status_code == 200 and done.json()["acked_by"] == "token"
    browser = TestClient(app)
    assert browser.get("/?token=s3cret-token").status_code == 200  # a browser with ?token= reads
    assert browser.post(f"/api/alerts/{alert.id}/ack").status_code == 403


def test_binding_beyond_localhost_needs_a_token_or_accounts():
    check_bind("0.0.0.0", None, accounts=True)
    with pytest.raises(ConfigError, match="add an account"):
        check_bind("0.0.0.0", None, accounts=False)


@pytest.mark.parametrize("registry_url", ["sqlite"], indirect=True)
def test_acknowledging_from_the_cli_is_audited(shop, registry_url):
    (alert, *_) = AlertStore(shop, None).alerts(open_only=True)
    assert edgekit("alerts", "ack", str(alert.id), "--registry", registry_url).returncode == 0
    missing = edgekit("alerts", "ack", "999", "--registry", registry_url)
    assert missing.returncode == 2 and "no alert 999" in missing.stderr and "Traceback" not in missing.stderr
    log = json.loads(edgekit("fleet", "audit", "--json", "--registry", registry_url).stdout)
    assert [(e["action"], e["result"]) for e in log[:2]] == [("alert-ack", "failed"), ("alert-ack", "ok")]
    assert log[1]["target"] == f"alert {alert.id}: {alert.summary}"


@pytest.fixture
def served(shop) -> Iterator[str]:
    with serving(create_app(shop)) as url:
        yield url


@pytest.fixture
def browser() -> Iterator[Browser]:
    b = Browser()
    yield b
    b.close()


def sign_in(browser: Browser, base: str, who: tuple[str, str]) -> None:
    browser.goto(base + "/login")
    fill(browser, who)
    browser.wait_for(
        "location.pathname === '/' && document.querySelector('#who').textContent.includes('signed in')"
    )


@pytest.mark.parametrize("registry_url", ["sqlite"], indirect=True)
def test_an_operator_acknowledges_an_alert_by_clicking_and_a_viewer_sees_no_button(served, browser, shop):
    browser.goto(served + "/")  # redirected to the sign-in page
    browser.wait_for("location.pathname === '/login'")
    fill(browser, (OPERATOR[0], "not the password"))
    browser.wait_for("document.getElementById('login-error').textContent === 'wrong name or password'")

    sign_in(browser, served, VIEWER)
    browser.wait_for("document.querySelectorAll('#alerts tr[data-alert]').length === 3")
    assert browser.evaluate("document.querySelectorAll('button.ack').length") == 0
    browser.evaluate("document.getElementById('sign-out').click()")
    browser.wait_for("location.pathname === '/login'")

    sign_in(browser, served, OPERATOR)
    browser.wait_for("document.querySelector('#alerts tr.rule-offline button.ack') !== null")
    browser.evaluate("document.querySelector('#alerts tr.rule-offline button.ack').click()")
    (question,) = browser.dialogs
    assert question.startswith("Acknowledge alert ") and '"cam-2 is offline"' in question
    assert "stays open until the problem clears" in question
    browser.wait_for("document.querySelector('#alerts tr.rule-offline').textContent.includes('by olga')")
    browser.wait_for("document.querySelector('#audit tbody').textContent.includes('alert-ack')")
    (alert,) = [a for a in AlertStore(shop, None).alerts(open_only=True) if a.rule == "offline"]
    assert alert.acked_by == OPERATOR[0]
    assert browser.evaluate("document.querySelectorAll('#alerts tr.rule-offline button.ack').length") == 0
    if SCREENSHOTS:  # EDGEKIT_SCREENSHOTS=docs/images refreshes the pictures of docs/fleet.md
        browser.screenshot(Path(SCREENSHOTS) / "dashboard-overview.png", height=1000)
        browser.goto(served + "/devices/cam-1")
        browser.wait_for("document.querySelectorAll('canvas').length >= 3")
        browser.screenshot(Path(SCREENSHOTS) / "dashboard-device.png", height=1100)


#: Buttons a person can press on the page (the sign-out button aside; a hidden panel's do not count).
ACTION_BUTTONS = (
    "[...document.querySelectorAll('button')]"
    ".filter((b) => b.id !== 'sign-out' && b.offsetParent !== null).map((b) => b.className || b.id)"
)
#: Each page, and what says it has drawn everything (its refresh ends by stamping the time).
PAGES = ("/fleets/shop", "/rollouts", "/devices/cam-1")
DRAWN = "document.getElementById('updated').textContent.startsWith('updated')"


@pytest.mark.parametrize("registry_url", ["sqlite"], indirect=True)
def test_a_viewer_sees_no_action_button_on_the_fleet_rollouts_and_device_pages(
    shop, browser, edgekit_home, digits_models, tmp_path
):
    """Where an operator gets buttons (a catalog version to push and the fleet's rollback on the
    fleet page, abort and resume on an unfinished rollout, a device's rollback), a viewer
    signed in to the same pages gets none."""
    assert edgekit("keys", "init").returncode == 0
    made = edgekit("bundle", "create", str(digits_models.fp32), "--name", "digits", "--version", "1.2.0",
                   "-o", str(tmp_path / "digits-1.2.0.ekb"))  # fmt: skip
    assert made.returncode == 0, made.stderr
    control = ControlPlane(shop, TrustedKeys([load_own_public_key(edgekit_home)]))
    control.catalog.add(tmp_path / "digits-1.2.0.ekb")
    history = [{"id": "b" * 64, "label": "digits@1.0.0"}, {"id": "a" * 64, "label": "digits@1.1.0"}]
    control.save_record(FleetRecord("shop", bundle_id="a" * 64, label="digits@1.1.0", history=history))
    unfinished = Rollout(
        fleet="shop",
        bundle_id="c" * 64,
        label="digits@1.2.0",
        previous_bundle_id="a" * 64,
        devices=("cam-1", "cam-2"),
        canaries=("cam-1",),
        phase="soak",
        phase_since=NOW.timestamp(),
        started_at=NOW.timestamp(),
        policy={"canary": 1},
    )
    control.save_rollout(unfinished, new=True)
    expected = {
        "/fleets/shop": ["rollback", "push"],
        "/rollouts": ["abort", "resume"],
        "/devices/cam-1": ["rollback-device"],
    }
    with serving(create_app(shop)) as base:
        sign_in(browser, base, OPERATOR)
        for page in PAGES:
            browser.goto(base + page)
            browser.wait_for(f"{DRAWN} && {ACTION_BUTTONS}.length >= {len(expected[page])}")
            assert browser.evaluate(ACTION_BUTTONS) == expected[page], page
        browser.goto(base + "/fleets/shop")
        browser.wait_for(DRAWN)
        browser.evaluate("document.getElementById('sign-out').click()")
        browser.wait_for("location.pathname === '/login'")

        sign_in(browser, base, VIEWER)
        for page in PAGES:
            browser.goto(base + page)
            browser.wait_for(DRAWN)
            assert browser.evaluate(ACTION_BUTTONS) == [], page
    assert not [e for e in audit_log(shop) if e.action not in ("sign-in", "alert-ack")]  # nothing was done


def fill(browser: Browser, who: tuple[str, str]) -> None:
    browser.evaluate(
        f"document.getElementById('name').value = {json.dumps(who[0])};"
        f"document.getElementById('password').value = {json.dumps(who[1])};"
        "document.getElementById('sign-in').click()"
    )


def retained_desired_state(broker: str, topic: str) -> dict:
    """The signed desired state retained on ``topic``, decoded (its signature is the agents'
    business; here: what it names)."""
    told = threading.Event()
    desired: list[bytes] = []

    def got(message) -> None:
        desired.append(message.payload)
        told.set()

    client = MqttClient(broker).connect()
    try:
        client.subscribe(topic, got)
        assert told.wait(10), f"no desired state on {topic}"
    finally:
        client.close()
    return dict(json.loads(base64.b64decode(json.loads(desired[-1])["payload"])))


def test_an_operator_pushes_with_a_canary_watches_it_aborts_and_rolls_a_device_back_by_clicking(
    serve,  # noqa: F811 - the fixture imported above
    fleet: Fleet,  # noqa: F811 - the fixture imported above
    mosquitto,
    edgekit_home,
    digits_models,
    browser,
    tmp_path,
):
    """The whole loop on a running `fleet serve` with two real agents: the operator pushes a
    catalog version with a canary of 1 (button, confirmation), follows the canary on the
    rollout page, aborts (the canary goes back), then sends the other device alone back to the
    version before. Each through edgekit.fleet.actions, as the CLI and the API; each audited."""
    registry = f"sqlite:///{edgekit_home / 'registry.db'}"
    for version in ("1.0.0", "1.1.0"):  # the fleet's history: 1.0.0, then 1.1.0
        model = str(digits_models.fp32)
        pushed = edgekit("push", model, "--fleet", "lab", "--name", "digits", "--version", version,
                         "--broker", mosquitto.url, "--registry", registry)  # fmt: skip
        assert pushed.returncode == 0, pushed.stderr
    made = edgekit("bundle", "create", str(digits_models.fp32), "--name", "digits", "--version", "1.2.0",
                   "-o", str(tmp_path / "digits-1.2.0.ekb"))  # fmt: skip
    assert made.returncode == 0, made.stderr
    with ControlPlane.open(registry, TrustedKeys([load_own_public_key(edgekit_home)])) as control:
        control.catalog.add(tmp_path / "digits-1.2.0.ekb")  # in the catalog, not pushed yet
    added = subprocess.run(
        [str(BIN / "edgekit"), "fleet", "user", "add", OPERATOR[0], "--role", "operator",
         "--password-stdin", "--registry", registry],
        input=OPERATOR[1] + "\n", capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    served = serve("--registry", registry)  # ingest, the rollout controller, the dashboard
    base = served.urls["dashboard"].rstrip("/")
    watcher = Watcher(mosquitto.url)
    try:
        for device in ("cam-1", "cam-2"):
            fleet.start(device)
        watcher.wait_for(lambda _: all(watcher.serving("1.1.0", d)(_) for d in ("cam-1", "cam-2")), 60)

        sign_in(browser, base, OPERATOR)
        browser.goto(base + "/fleets/lab")
        browser.wait_for("!document.getElementById('push-panel').hidden")
        assert browser.evaluate("document.getElementById('push-version').selectedOptions[0].textContent") == (
            "digits@1.2.0"
        )
        browser.evaluate("document.getElementById('push-canary').value = '1'")
        browser.evaluate("document.getElementById('push-button').click()")
        browser.wait_for("location.pathname === '/rollouts'")
        (question,) = browser.dialogs
        assert question.startswith("Push digits@1.2.0 to fleet lab?")
        assert "1 device(s) get it first (the canaries)" in question

        # The canary page: the canary installs 1.2.0, the other device keeps 1.1.0.
        canary_row = "document.querySelector('section.rollout tr[data-canary=\"true\"]')"
        browser.wait_for(
            f"{canary_row} !== null && {canary_row}.textContent.includes('serves digits@1.2.0')", 90_000
        )
        canary = browser.evaluate(f"{canary_row}.dataset.device")
        other = ({"cam-1", "cam-2"} - {canary}).pop()
        assert watcher.serving("1.1.0", other)([])
        browser.evaluate("document.querySelector('button.resume').click()")  # a step now: still soaking
        assert browser.dialogs[-1].startswith(
            "Take the rollout of digits@1.2.0 to fleet lab one step on now?"
        )
        browser.wait_for("document.getElementById('rollouts-note').textContent.includes('now soak')")
        browser.evaluate("document.querySelector('button.abort').click()")
        browser.wait_for("document.querySelector('section.rollout').classList.contains('phase-aborted')")
        assert browser.dialogs[-1].startswith("Stop the rollout of digits@1.2.0 to fleet lab?")
        watcher.wait_for(watcher.serving("1.1.0", canary), 60)  # the canary went back

        browser.goto(f"{base}/devices/{other}")
        browser.wait_for("document.querySelector('button.rollback-device') !== null")
        assert browser.evaluate("document.querySelector('button.rollback-device').textContent") == (
            f"Roll {other} back to digits@1.0.0"
        )
        browser.evaluate("document.querySelector('button.rollback-device').click()")
        assert browser.dialogs[-1].startswith(f"Send {other} alone back to digits@1.0.0?")
        browser.wait_for("document.getElementById('device-actions').textContent.includes('told to go back')")
        watcher.wait_for(watcher.serving("1.0.0", other), 60)
        assert watcher.serving("1.1.0", canary)([])  # the rest of the fleet keeps what it runs
    finally:
        watcher.close()
    audit = json.loads(edgekit("fleet", "audit", "--json", "--registry", registry).stdout)
    mine = [(e["action"], e["target"], e["result"]) for e in reversed(audit) if e["actor"] == OPERATOR[0]]
    assert mine == [
        ("sign-in", None, "ok"),
        ("push", "digits@1.2.0", "ok"),
        ("rollout-resume", "digits@1.2.0", "ok"),
        ("rollout-abort", "digits@1.2.0", "ok"),
        ("device-rollback", f"{other}: digits@1.0.0", "ok"),
    ]


@pytest.mark.parametrize("registry_url", ["sqlite"], indirect=True)
def test_an_operator_rolls_a_fleet_back_by_clicking_through_the_code_of_fleet_rollback(
    shop, registry_url, browser, mosquitto, edgekit_home, digits_models
):
    assert edgekit("keys", "init").returncode == 0
    for version in ("1.0.0", "1.1.0"):
        pushed = edgekit(
            "push",
            str(digits_models.fp32),
            "--fleet",
            "shop",
            "--version",
            version,
            "--broker",
            mosquitto.url,
            "--registry",
            registry_url,
        )
        assert pushed.returncode == 0, pushed.stderr
    before, current = ControlPlane(shop).record("shop").history[-2:]
    assert before["label"].endswith("@1.0.0") and current["label"].endswith("@1.1.0")
    with serving(create_app(shop, api=ApiContext(shop, mosquitto.url, edgekit_home))) as base:
        sign_in(browser, base, OPERATOR)
        browser.goto(base + "/fleets/shop")
        browser.wait_for("document.querySelector('button.rollback') !== null")
        assert browser.evaluate("document.querySelector('button.rollback').textContent") == (
            f"Roll the fleet back to {before['label']}"
        )
        browser.evaluate("document.querySelector('button.rollback').click()")
        (question,) = browser.dialogs
        assert question.startswith(f"Send every device of fleet shop back to {before['label']}?")
        browser.wait_for("document.getElementById('fleet-actions').textContent.includes('told to go back')")

    state = retained_desired_state(mosquitto.url, Topics().fleet_desired("shop"))
    assert state["bundle"]["sha256"] == before["id"]  # the whole fleet: back to 1.0.0
    (kept,) = [d for d in ControlPlane(shop).desired_states() if d.fleet == "shop" and not d.device]
    assert (kept.seq, kept.bundle_id) == (state["seq"], before["id"])  # for the expiry rule
    (entry, *_) = audit_log(shop)
    assert (entry.actor, entry.action, entry.result, entry.target) == (
        OPERATOR[0],
        "rollback",
        "ok",
        before["label"],
    )
    # The CLI's one-device rollback (the same action) names a device the fleet does not have.
    unknown = edgekit("fleet", "rollback", "--fleet", "shop", "--device", "cam-9",
                      "--broker", mosquitto.url, "--registry", registry_url)  # fmt: skip
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    assert unknown.stderr.strip() == "error: fleet shop has no device cam-9 (devices heard from: none)"
