"""Alerts: the evaluator and the dispatcher on a real registry (SQLite and PostgreSQL), sending
to a real SMTP server (aiosmtpd) and a real HTTP receiver.

Most tests drive :class:`Evaluator` and :class:`Dispatcher` one round at a time with explicit
times (a clock passed in, not a fake: the rules' holds and the hourly limit are minutes and
hours, which a test cannot wait for); the end-to-end test in test_alerts_service.py runs them
inside ``edgekit fleet serve`` with a killed agent."""

from __future__ import annotations

import json
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from alert_receivers import RawServer, SmtpServer, WebhookReceiver, body
from edgekit.broker import ensure_fleet_ca, ensure_server_certificate
from edgekit.desired import new_desired_state
from edgekit.errors import ConfigError
from edgekit.fleet.alerts import AlertStore, Dispatcher, Evaluator, email_channel, webhook_channel
from edgekit.fleet.control import ControlPlane
from edgekit.fleet.registry import DeviceState, EventRow, Registry, TelemetryRow
from edgekit.fleet.registry.models import AlertDelivery
from edgekit.fleet.rollout import Rollout
from edgekit.topics import Topics
from fleet_messages import event_doc, state_doc, telemetry_doc
from helpers import free_port
from test_fleet_cli import edgekit

T = Topics()

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
LINK = "http://shop-laptop:8765/"


@pytest.fixture
def smtp():
    server = SmtpServer().start()
    yield server
    server.stop()


@pytest.fixture
def hook():
    receiver = WebhookReceiver().start()
    yield receiver
    receiver.stop()


class Alerts:
    """A registry with the alert evaluator and dispatcher on it."""

    def __init__(self, url: str, home: Path, **dispatch: object) -> None:
        self.registry = Registry(url)
        self.store = AlertStore(self.registry, home)
        self.evaluator = Evaluator(self.registry, home, link_base=LINK)
        options = {"retry_base": 1.0, "timeout": 2.0, **dispatch}
        self.dispatcher = Dispatcher(self.registry, home, link_base=LINK, **options)  # type: ignore[arg-type]

    def round(self, at: datetime) -> int:
        """One evaluation and one delivery round at ``at``; messages sent."""
        assert self.evaluator.tick(at) is not None
        return self.dispatcher.run_once(at)

    def states(self, at: datetime, online: bool, *devices: str) -> None:
        status = "serving" if online else "offline"
        self.registry.record_states([DeviceState(d, "lab", online, status, at) for d in devices])

    def close(self) -> None:
        self.registry.close()


@pytest.fixture
def alerts(registry_url, edgekit_home):
    made = Alerts(registry_url, edgekit_home)
    yield made
    made.close()


def window(device: str, seq: int, end: datetime, **extra: object) -> TelemetryRow:
    return TelemetryRow(device, seq, end - timedelta(seconds=60), end, 100, 0, 1.0, 2.0, 3.0, **extra)  # type: ignore[arg-type]


def test_drift_a_failed_install_and_an_aborted_rollout_each_raise_their_alert_then_resolve(
    alerts, smtp, hook, edgekit_home
):
    alerts.store.add_channel(
        email_channel("mail", ["owner@shop.example"], f"smtp://127.0.0.1:{smtp.port}?tls=none"), T0
    )
    alerts.store.add_channel(webhook_channel("hook", hook.url), T0)
    alerts.states(T0, True, "cam-1", "cam-2", "cam-3")
    # cam-1's model is affected; cam-3's inputs changed but its model seems fine: no alert.
    affected = {"drift_severity": "model affected", "accuracy_estimate": 0.62}
    alerts.registry.add_telemetry(
        [
            window("cam-1", 1, T0, drift_score=2.98, drifted=True, **affected),
            window("cam-3", 1, T0, drift_score=1.7, drifted=True, drift_severity="inputs changed"),
        ]
    )
    alerts.registry.add_events(
        [EventRow("cam-2", 1, T0, "install_failed", "digits@2.0.0: the model does not load")]
    )
    rollout = Rollout(
        fleet="lab",
        bundle_id="b" * 64,
        label="digits@2.0.0",
        previous_bundle_id="a" * 64,
        devices=("cam-1", "cam-2"),
        canaries=("cam-1",),
        phase="aborted",
        phase_since=T0.timestamp(),
        started_at=T0.timestamp() - 120,
        reason="cam-1's error rate 30.0% is above 5.0%",
    )
    ControlPlane(alerts.registry).save_rollout(rollout, new=True)

    assert alerts.round(T0 + timedelta(seconds=1)) == 6
    mails = smtp.wait_for(lambda m: len(m) == 3, what="three alert mails")
    hooks = hook.wait_for(lambda b: len(b) == 3, what="three webhooks")
    by_rule = {b["alert"]["rule"]: b for b in hooks}
    assert set(by_rule) == {"drift", "install", "rollout"}
    for doc in hooks:
        assert (doc["schema"], doc["schema_version"], doc["event"]) == ("edgekit.alert", 1, "opened")
        assert doc["text"] and doc["alert"]["what_happened"] and doc["alert"]["what_you_can_do"]
    assert by_rule["drift"]["alert"]["link"] == LINK + "devices/cam-1"
    assert by_rule["drift"]["alert"]["title"] == "cam-1: its model is likely making more mistakes"
    assert "accuracy at 62%" in by_rule["drift"]["alert"]["what_happened"]
    assert "failed to install" in by_rule["install"]["alert"]["title"]
    assert "the model does not load" in by_rule["install"]["alert"]["what_happened"]
    assert "rolled back" in by_rule["rollout"]["alert"]["what_edgekit_did"]
    assert "30.0%" in by_rule["rollout"]["alert"]["what_happened"]
    subjects = sorted(m["Subject"] for m in mails)
    assert subjects == sorted(f"[edgekit] {b['alert']['title']}" for b in hooks)
    drift_mail = next(m for m in mails if "mistakes" in m["Subject"])
    assert "cam-1" in drift_mail["Subject"] and LINK + "devices/cam-1" in body(drift_mail)
    assert drift_mail["To"] == "owner@shop.example"

    # Nothing new while the conditions hold: one alert per condition until it resolves.
    assert alerts.round(T0 + timedelta(seconds=30)) == 0
    # cam-2 installs; cam-1's inputs look normal again (the drift alert waits clear_after).
    alerts.registry.add_events(
        [EventRow("cam-2", 2, T0 + timedelta(seconds=40), "installed", "installed digits@2.0.1")]
    )
    alerts.registry.add_telemetry([window("cam-1", 2, T0 + timedelta(seconds=40), drift_severity="ok")])
    assert alerts.round(T0 + timedelta(seconds=41)) == 2  # install resolved, through both channels
    assert alerts.round(T0 + timedelta(seconds=41 + 299)) == 0
    assert alerts.round(T0 + timedelta(seconds=41 + 301)) == 2  # drift resolved
    hooks = hook.wait_for(lambda b: len(b) == 5, what="two resolve webhooks")
    resolved = {b["alert"]["rule"]: b["alert"]["title"] for b in hooks if b["event"] == "resolved"}
    assert resolved == {
        "install": "Resolved: cam-2 installed an update successfully",
        "drift": "Resolved: cam-1: its model no longer looks affected by drift",
    }
    listed = json.loads(
        edgekit("alerts", "list", "--open", "--json", "--registry", alerts.registry.url).stdout
    )
    assert [a["rule"] for a in listed] == ["rollout"]  # the aborted rollout stays until a new one


def test_an_offline_device_alerts_once_after_offline_after_and_flapping_is_damped(alerts, hook):
    alerts.store.add_channel(webhook_channel("hook", hook.url), T0)
    alerts.store.set_rule("offline", ["offline_after=10s", "clear_after=1m"], T0)
    alerts.states(T0, False, "cam-1")
    assert alerts.round(T0) == 0  # the first round that sees it offline starts the clock
    assert alerts.round(T0 + timedelta(seconds=9)) == 0  # not yet: offline for 9 s
    assert alerts.round(T0 + timedelta(seconds=10)) == 1
    # It comes back and drops off again every few seconds: the same alert, no new message.
    t = T0 + timedelta(seconds=10)
    for _ in range(5):
        t += timedelta(seconds=5)
        alerts.states(t, True, "cam-1")
        assert alerts.round(t) == 0
        t += timedelta(seconds=5)
        alerts.states(t, False, "cam-1")
        assert alerts.round(t) == 0
    alerts.states(t, True, "cam-1")
    assert alerts.round(t + timedelta(seconds=1)) == 0
    assert alerts.round(t + timedelta(seconds=59)) == 0  # online for less than clear_after
    assert alerts.round(t + timedelta(seconds=62)) == 1
    opened, resolved = hook.wait_for(lambda b: len(b) == 2, what="opened and resolved")
    assert opened["alert"]["title"] == "cam-1 is offline" and opened["event"] == "opened"
    assert resolved["alert"]["title"] == "Resolved: cam-1 is back online"
    assert resolved["alert"]["facts"]["flaps"] == 5
    (alert,) = alerts.store.alerts()
    assert alert.state == "resolved" and alert.id == opened["alert"]["id"] == resolved["alert"]["id"]


def test_a_thousand_flaps_stay_within_the_hourly_limit_and_the_rest_arrive_as_one_digest(
    tmp_path, hook, edgekit_home
):
    alerts = Alerts(f"sqlite:///{tmp_path / 'registry.db'}", edgekit_home)
    alerts.store.add_channel(webhook_channel("hook", hook.url, per_hour=20), T0)
    alerts.store.set_rule("offline", ["offline_after=0", "clear_after=0"], T0)
    devices = [f"cam-{i}" for i in range(100)]
    t = T0
    for _ in range(10):  # 100 devices x 10 flaps: 2,000 messages
        t += timedelta(seconds=30)
        alerts.states(t, False, *devices)
        alerts.round(t)
        t += timedelta(seconds=30)
        alerts.states(t, True, *devices)
        alerts.round(t)
    assert len(hook.bodies()) == 20  # the limit, within the hour
    assert alerts.dispatcher.run_once(T0 + timedelta(minutes=59)) == 0
    assert alerts.dispatcher.run_once(T0 + timedelta(minutes=61)) == 1  # the hour has room again
    bodies = hook.wait_for(lambda b: len(b) == 21, what="the digest")
    digest = bodies[-1]
    assert digest["event"] == "digest" and len(digest["digest"]) == 1980
    assert "1980 more alert messages" in digest["text"]
    states = {d.state for d in alerts.store.deliveries()}
    assert states == {"sent", "digested"}
    assert len(alerts.store.deliveries("sent")) == 21
    alerts.close()


def test_pending_deliveries_are_retried_with_backoff_and_survive_a_restart(
    alerts, edgekit_home, registry_url
):
    port = free_port()
    alerts.store.add_channel(
        email_channel("mail", ["owner@shop.example"], f"smtp://127.0.0.1:{port}?tls=none"), T0
    )
    alerts.store.set_rule("offline", ["offline_after=0"], T0)
    alerts.states(T0, False, "cam-1")
    assert alerts.round(T0) == 0  # nobody listens on the port
    (delivery,) = alerts.store.deliveries("pending")
    assert delivery.attempts == 1 and "cannot reach the mail server" in delivery.last_error
    assert delivery.next_attempt_at.replace(tzinfo=timezone.utc) == T0 + timedelta(seconds=1)
    (channel,) = alerts.store.channels()
    assert channel.failing_since is not None
    assert alerts.dispatcher.run_once(T0 + timedelta(seconds=1)) == 0
    (delivery,) = alerts.store.deliveries("pending")
    assert delivery.attempts == 2 and delivery.next_attempt_at.replace(tzinfo=timezone.utc) == T0 + timedelta(
        seconds=3
    )
    alerts.evaluator.release()  # what the service's stop does
    alerts.close()

    # The service restarts; the mail server is up now, and refuses for a while.
    server = SmtpServer(port=port).start()
    try:
        server.refuse = "451 4.3.0 try again later"
        again = Alerts(registry_url, edgekit_home)
        assert again.round(T0 + timedelta(seconds=3)) == 0
        (delivery,) = again.store.deliveries("pending")
        assert delivery.attempts == 3 and "451" in delivery.last_error
        server.refuse = None
        assert again.round(T0 + timedelta(seconds=7)) == 1
        (mail,) = server.wait_for(lambda m: len(m) == 1, what="the offline mail")
        assert mail["Subject"] == "[edgekit] cam-1 is offline"
        (channel,) = again.store.channels()
        assert channel.failing_since is None
        assert [a.rule for a in again.store.alerts()] == ["offline"]  # still one alert
        again.close()
    finally:
        server.stop()


def test_a_channel_that_keeps_failing_raises_its_own_alert_through_the_others(alerts, hook):
    alerts.store.add_channel(webhook_channel("hook", hook.url), T0)
    alerts.store.add_channel(webhook_channel("broken", f"http://127.0.0.1:{free_port()}/x"), T0)
    alerts.store.set_rule("offline", ["offline_after=0"], T0)
    alerts.states(T0, False, "cam-1")
    alerts.round(T0)
    hook.wait_for(lambda b: len(b) == 1)
    assert alerts.round(T0 + timedelta(minutes=5)) == 0
    alerts.round(T0 + timedelta(minutes=11))
    bodies = hook.wait_for(lambda b: len(b) == 2, what="the channel alert")
    assert bodies[-1]["alert"]["rule"] == "channel"
    assert bodies[-1]["alert"]["title"] == "Alerts cannot reach channel broken"
    broken = [d for d in alerts.store.deliveries() if d.channel_id == 2]
    assert all(d.alert_id != bodies[-1]["alert"]["id"] for d in broken)  # not told about itself


def test_a_message_that_cannot_be_sent_does_not_hold_up_the_others(alerts, hook):
    channel = alerts.store.add_channel(webhook_channel("hook", hook.url), T0)
    with alerts.registry.session() as session, session.begin():
        bad = AlertDelivery(
            channel_id=channel.id,
            kind="opened",
            state="pending",
            created_at=T0,
            next_attempt_at=T0,
            attempts=0,
            message={},
        )
        session.add(bad)
    alerts.store.set_rule("offline", ["offline_after=0"], T0)
    alerts.states(T0, False, "cam-1")
    assert alerts.round(T0) == 1  # the good one went out
    assert hook.wait_for(lambda b: len(b) == 1)[0]["alert"]["title"] == "cam-1 is offline"
    (stuck,) = alerts.store.deliveries("pending")
    assert stuck.attempts == 1 and stuck.last_error.startswith("the message cannot be sent")
    assert alerts.store.channels()[0].failing_since is None  # the channel itself works


def test_only_one_evaluator_works_on_a_registry(alerts, edgekit_home, registry_url):
    other = Evaluator(Registry(registry_url), edgekit_home)
    assert alerts.evaluator.tick(T0) is not None
    assert other.tick(T0 + timedelta(seconds=10)) is None  # the lease is held
    assert other.tick(T0 + timedelta(seconds=31)) is not None  # it expired: the other takes over
    assert alerts.evaluator.tick(T0 + timedelta(seconds=32)) is None
    other.release()
    assert alerts.evaluator.tick(T0 + timedelta(seconds=33)) is not None
    other.registry.close()


def server_certificate(home: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate, key): a mail server's certificate for localhost,
    signed by a fleet CA under ``home``, which the channels trust with ?ca=."""
    ca, _ = ensure_fleet_ca(home)
    return (ca, *ensure_server_certificate(["localhost", "127.0.0.1"], home))


def test_mail_over_starttls_with_a_login_and_several_recipients(tmp_path, edgekit_home, registry_url):
    ca, cert, key = server_certificate(tmp_path)
    server = SmtpServer(users={"shop": "s3cret pass"}, tls=(cert, key)).start()
    try:
        alerts = Alerts(registry_url, edgekit_home)
        url = f"smtp://shop@localhost:{server.port}?ca={ca}"
        alerts.store.add_channel(
            email_channel(
                "mail", ["a@shop.example", "b@shop.example"], url, "alerts@shop.example", "s3cret pass"
            ),
            T0,
        )
        assert [(n, e) for n, e in alerts.dispatcher.test_all(T0)] == [("mail", None)]
        (mail,) = server.wait_for(lambda m: len(m) == 1)
        assert mail["To"] == "a@shop.example, b@shop.example" and mail["From"] == "alerts@shop.example"
        assert "This is a test from edgekit" in body(mail) and LINK in body(mail)
        # A wrong password is one line naming the user.
        alerts.store.remove_channel("mail")
        alerts.store.add_channel(email_channel("mail", ["a@shop.example"], url, None, "wrong"), T0)
        ((_, error),) = alerts.dispatcher.test_all(T0)
        assert error == f"the mail server localhost:{server.port} refused the user shop and its password"
        alerts.close()
    finally:
        server.stop()


def test_mail_over_tls_from_the_first_byte_and_a_server_without_starttls(tmp_path, edgekit_home):
    ca, cert, key = server_certificate(tmp_path)
    tls = SmtpServer(users={"shop": "pw"}, tls=(cert, key), implicit_tls=True).start()
    plain = SmtpServer().start()
    registry = Registry(f"sqlite:///{tmp_path / 'registry.db'}")
    try:
        store = AlertStore(registry, edgekit_home)
        store.add_channel(
            email_channel(
                "tls", ["a@shop.example"], f"smtps://shop@localhost:{tls.port}?ca={ca}", None, "pw"
            ),
            T0,
        )
        store.add_channel(
            email_channel("nostarttls", ["a@shop.example"], f"smtp://127.0.0.1:{plain.port}"), T0
        )
        results = dict(Dispatcher(registry, edgekit_home, timeout=5).test_all(T0))
        assert results["tls"] is None
        tls.wait_for(lambda m: len(m) == 1, what="the mail over TLS")
        assert results["nostarttls"] == (
            f"the mail server 127.0.0.1:{plain.port} does not offer STARTTLS; "
            "use smtps:// (port 465) or, for a local relay, ?tls=none"
        )
        assert plain.mails() == []  # nothing went out in clear text
    finally:
        registry.close()
        tls.stop()
        plain.stop()


def _one_line(result) -> str:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_secrets_are_stored_0600_and_never_printed(tmp_path, edgekit_home, hook):
    registry = f"sqlite:///{tmp_path / 'registry.db'}"
    add = edgekit(
        "alerts", "channel", "add", "--email", "owner@shop.example", "--smtp",
        "smtp://shop:hunter2-secret@127.0.0.1:1?tls=none", "--registry", registry,
    )  # fmt: skip
    assert add.returncode == 0, add.stderr
    add = edgekit("alerts", "channel", "add", "--webhook", hook.url, "--registry", registry)
    assert add.returncode == 0, add.stderr
    secrets = edgekit_home / "alerts" / "secrets.json"
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o600
    assert "hunter2-secret" in secrets.read_text() and "edgekit-secret-token" in secrets.read_text()
    outputs = [add.stdout + add.stderr]
    for args in (
        ("channel", "list"),
        ("channel", "list", "--json"),
        ("test", "--timeout", "2"),
        ("test", "--json"),
    ):
        result = edgekit("alerts", *args, "--registry", registry)
        outputs.append(result.stdout + result.stderr)
    assert not any("hunter2" in o or "edgekit-secret-token" in o for o in outputs), outputs
    listed = json.loads(outputs[2])
    port = hook.url.split("/")[2].rsplit(":", 1)[1]
    assert listed[1]["target"] == f"webhook to http://127.0.0.1:{port}/..."  # the port, not the path
    tested = json.loads(result.stdout)
    assert [(t["channel"], t["ok"]) for t in tested] == [("email-1", False), ("webhook-1", True)]
    assert "cannot reach the mail server 127.0.0.1:1" in tested[0]["error"]
    secrets.chmod(0o644)
    assert "run chmod 600" in _one_line(edgekit("alerts", "test", "--registry", registry))


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda: webhook_channel("h", "ftp://hooks.example.com/x"), "use an http:// or https:// URL"),
        (lambda: webhook_channel("h", "not a url"), "use an http:// or https:// URL"),
        (lambda: webhook_channel("h", "http://example.com:99999/x"), "the port must be a number"),
        (lambda: webhook_channel("h", "https://example.com/x", "xml"), "--format xml: use json"),
        (lambda: webhook_channel("bad name!", "https://example.com/x"), "channel name 'bad name!'"),
        (lambda: email_channel("m", ["a@shop.example"], "imap://mail.example.com"), "use smtp://"),
        (lambda: email_channel("m", ["owner"], "smtp://mail.example.com"), "'owner' is not an email address"),
        (lambda: email_channel("m", ["a@shop.example"], "smtp://"), "name the mail server"),
        (lambda: email_channel("m", ["a@shop.example"], "smtp://h:0x19"), "the port must be a number"),
        (lambda: email_channel("m", ["a@shop.example"], "smtp://h?tls=maybe"), "the only options are"),
        (lambda: email_channel("m", ["a@shop.example"], "smtp://h?ca=/nonexistent.pem"), "no such CA file"),
        (lambda: email_channel("m", ["a@shop.example"], "smtp://shop@h"), "but no password"),
        (lambda: email_channel("m", [], "smtp://h"), "at least one address"),
    ],
)
def test_malformed_channels_are_refused_with_the_fix(make, problem):
    with pytest.raises(ConfigError) as raised:
        make()
    message = str(raised.value)
    assert problem in message and "\n" not in message


def test_bad_input_and_broken_servers_are_one_line_each(tmp_path, edgekit_home, hook):
    registry = f"sqlite:///{tmp_path / 'registry.db'}"
    assert "use an http:// or https:// URL" in _one_line(
        edgekit("alerts", "channel", "add", "--webhook", "ftp://x/y", "--registry", registry)
    )
    assert "no setting 'after'" in _one_line(
        edgekit("alerts", "rule", "set", "offline", "after=1", "--registry", registry)
    )
    store = AlertStore(Registry(registry), edgekit_home)
    with pytest.raises(ConfigError, match="use a number"):
        store.set_rule("offline", ["offline_after=soon"], T0)
    assert "use smtp://[user@]host[:port] (STARTTLS)" in _one_line(  # not eaten as markup
        edgekit(
            "alerts",
            "channel",
            "add",
            "--email",
            "a@shop.example",
            "--smtp",
            "ftp://x",
            "--registry",
            registry,
        )
    )
    assert "drift on=always: use model-affected or inputs-changed" in _one_line(
        edgekit("alerts", "rule", "set", "drift", "on=always", "--registry", registry)
    )
    with pytest.raises(ConfigError, match="no alert rule 'ofline'"):
        store.set_rule("ofline", ["enabled=no"], T0)
    with pytest.raises(ConfigError, match="no alert 7"):
        store.ack(7, "me", T0)
    with pytest.raises(ConfigError, match="no alert channel named 'x'"):
        store.remove_channel("x")

    garbage, silent, nobody = RawServer(b"HTTP/1.1 400 Bad Request\r\n\r\n"), RawServer(), free_port()
    try:
        for name, smtp in (
            ("garbage", f"smtp://127.0.0.1:{garbage.port}?tls=none"),
            ("silent", f"smtp://127.0.0.1:{silent.port}?tls=none"),
            ("down", f"smtp://127.0.0.1:{nobody}?tls=none"),
            ("nohost", "smtp://mail.invalid:25?tls=none"),
        ):
            store.add_channel(email_channel(name, ["a@shop.example"], smtp), T0)
        store.add_channel(webhook_channel("hook", hook.url), T0)
        store.registry.close()
        hook.status = 500
        result = edgekit("alerts", "test", "--timeout", "2", "--registry", registry)
        assert _one_line(result) == (
            "error: the test alert did not go through garbage, silent, down, nohost, hook; see above"
        )
        lines = dict(line.split(": ", 1) for line in result.stdout.strip().splitlines())
        where = "failed: the mail server 127.0.0.1"
        assert (
            lines["garbage"].startswith(f"{where}:{garbage.port} ")
            and "is it an SMTP server?" in lines["garbage"]
        )
        assert lines["silent"] == f"{where}:{silent.port} did not answer within 2s"
        assert lines["down"] == f"failed: cannot reach the mail server 127.0.0.1:{nobody}: Connection refused"
        assert lines["nohost"].startswith("failed: cannot reach the mail server mail.invalid:25")
        hook_url = f"http://127.0.0.1:{hook.server.server_address[1]}/..."
        assert lines["hook"] == f"failed: the webhook {hook_url} answered HTTP 500 Internal Server Error"
        hook.status = 200
        hook.hang.set()
        result = edgekit("alerts", "test", "--timeout", "2", "--json", "--registry", registry)
        hung = {t["channel"]: t["error"] for t in json.loads(result.stdout)}["hook"]
        assert hung == f"the webhook {hook_url} did not answer within 2s"
    finally:
        garbage.stop()
        silent.stop()


def test_delivery_never_stalls_ingest(start_ingest, publisher, tmp_path, edgekit_home):
    """A mail server that accepts and never answers holds the dispatcher; ingest (and the
    evaluator) go on."""
    from edgekit.fleet.alerts import Alerting

    registry = Registry(f"sqlite:///{tmp_path / 'registry.db'}")
    silent = RawServer()
    try:
        store = AlertStore(registry, edgekit_home)
        store.add_channel(
            email_channel("mail", ["a@shop.example"], f"smtp://127.0.0.1:{silent.port}?tls=none"), T0
        )
        store.set_rule("offline", ["offline_after=0"], T0)
        ingest = start_ingest(registry)
        dispatcher = Dispatcher(registry, edgekit_home, timeout=30.0, poll=0.1)
        alerting = Alerting(registry, edgekit_home, interval=0.1, dispatcher=dispatcher).start()
        try:
            publisher.send(T.device_state("cam-1"), state_doc("cam-1", "offline"), retain=True)
            ingest.wait_for(lambda s: s.states >= 1)
            assert alerting.wait_for(lambda t: t.opened >= 1), "the offline alert never opened"
            assert silent.accepted.wait(30), "the dispatcher never tried the mail server"
            # The dispatcher now waits on a server that never answers (30 s timeout); meanwhile:
            publisher.send_many(
                [(T.device_telemetry("cam-2"), telemetry_doc("cam-2", s)) for s in range(500)]
            )
            assert ingest.wait_for(lambda s: s.telemetry >= 500, timeout=30)
            assert registry.telemetry_count("cam-2") == 500
            publisher.send(T.device_state("cam-3"), state_doc("cam-3", "offline"), retain=True)
            assert alerting.wait_for(lambda t: t.opened >= 2), "the evaluator waited on the dispatcher"
            assert dispatcher.sent == 0 and len(store.deliveries("pending")) == 2
        finally:
            silent.stop()
            alerting.stop()
    finally:
        registry.close()


def test_a_desired_state_about_to_expire_alerts_once_per_fleet_until_a_fresh_one_is_pushed(alerts, hook):
    """The fleet's desired state expires in 6 days (the default warning: 7): one alert for the
    fleet, naming the devices that run by it and the push that renews it; a device serving
    another bundle is not among them. A fresh desired state resolves it."""
    alerts.store.add_channel(webhook_channel("hook", hook.url), T0)
    control = ControlPlane(alerts.registry)
    ttl = 30 * 86400
    issued = int(T0.timestamp()) - ttl + 6 * 86400  # expires 6 days after T0

    def desired(seq: int, at: int) -> None:
        state = new_desired_state(
            "lab",
            bundle_sha256="a" * 64,
            bundle_name="digits",
            bundle_version="1.2.0",
            seq=seq,
            ttl=ttl,
            now=at,
        )
        control.record_desired(state)

    desired(3, issued)
    served = [("cam-1", "a" * 64), ("cam-2", "a" * 64), ("cam-3", "b" * 64)]
    alerts.registry.record_states(
        [DeviceState(d, "lab", True, "serving", T0, bundle, "digits", "1.2.0") for d, bundle in served]
    )
    assert alerts.round(T0) == 1
    (opened,) = hook.wait_for(lambda b: len(b) == 1, what="the expiry alert")
    alert = opened["alert"]
    assert (alert["rule"], alert["fleet"], alert["device"]) == ("expiry", "lab", None)
    assert alert["title"] == "fleet lab: its signed instructions expire on 2026-12-07"
    assert (
        "fleet lab's devices (cam-1, cam-2) to run digits@1.2.0 expire at 2026-12-07"
        in alert["what_happened"]
    )
    assert "`edgekit push digits --version 1.2.0 --fleet lab`" in alert["what_you_can_do"]
    assert alerts.round(T0 + timedelta(days=1)) == 0  # one alert, not one a round

    desired(4, int(T0.timestamp()) + 86400)  # pushed again: 30 days from now
    assert alerts.round(T0 + timedelta(days=1, seconds=1)) == 1
    resolved = hook.wait_for(lambda b: len(b) == 2, what="the resolve message")[-1]
    assert resolved["alert"]["title"] == "Resolved: fleet lab has fresh signed instructions"


def test_on_the_key_hierarchy_the_expiry_rule_judges_the_fleets_desired_role_not_the_desired_state(
    alerts, hook, edgekit_home
):
    """A device on TUF does not check a desired state's own expires_at (30 days): what expires
    for it is the fleet's signed desired role (7 days). The fleet reads it from its own trust
    repository: one alert naming the TUF devices when the role expires within role_warning (2
    days), while the single-key device is judged by the desired state it runs, as before; the
    fleet service re-signing the role resolves the first."""
    from edgekit.keys import load_signing_key
    from test_trust_keeper import make_fleet

    alerts.store.add_channel(webhook_channel("hook", hook.url), T0)
    repo = make_fleet(edgekit_home, now=T0.timestamp() - 6 * 86400)  # the role expires a day after T0
    ttl = 30 * 86400
    state = new_desired_state(
        "lab",
        bundle_sha256="a" * 64,
        bundle_name="digits",
        bundle_version="1.2.0",
        seq=3,
        ttl=ttl,
        now=int(T0.timestamp()) - ttl + 6 * 86400,  # the single-key document expires 6 days after T0
    )
    ControlPlane(alerts.registry).record_desired(state)
    fresh = T0 + timedelta(hours=20)  # the timestamp: not the trust_expiry rule's business here
    alerts.registry.record_states(
        [
            DeviceState(
                "cam-1",
                "lab",
                True,
                "serving",
                T0,
                "a" * 64,
                "digits",
                "1.2.0",
                trust_root=1,
                trust_expires=fresh,
            ),
            DeviceState("cam-2", "lab", True, "serving", T0, "a" * 64, "digits", "1.2.0"),
        ]
    )
    assert alerts.round(T0) == 2
    opened = {
        b["alert"]["what_happened"]: b["alert"] for b in hook.wait_for(lambda b: len(b) == 2, what="2 alerts")
    }
    role = next(a for text, a in opened.items() if "desired role" in text)
    single = next(a for text, a in opened.items() if "desired role" not in text)
    assert (role["rule"], role["fleet"], role["device"]) == ("expiry", "lab", None)
    assert "fleet lab's devices (cam-1) to run digits@1.2.0 expire at 2026-12-02" in role["what_happened"]
    assert "`edgekit fleet serve`" in role["what_you_can_do"]
    assert "fleet lab's devices (cam-2) to run digits@1.2.0 expire at 2026-12-07" in single["what_happened"]
    # The fleet service re-signs the desired role (half its life is gone): that alert resolves.
    assert repo.resign_online([load_signing_key(edgekit_home, "online")], now=T0.timestamp()) != []
    repo.save(edgekit_home / "trust" / "lab")
    assert alerts.round(T0 + timedelta(seconds=1)) == 1
    resolved = hook.wait_for(lambda b: len(b) == 3, what="the resolve message")[-1]
    assert resolved["event"] == "resolved" and resolved["alert"]["what_happened"] == role["what_happened"]


def test_a_board_nearly_out_of_memory_or_disk_alerts_each_on_its_own(alerts, hook):
    """cam-1 reports 97% of its RAM and 93% of its disk in use (defaults: 95, 90) for longer
    than `hold` (60 s): two alerts, one each; the memory one resolves when it drops."""
    alerts.store.add_channel(webhook_channel("hook", hook.url), T0)
    alerts.store.set_rule("board", ["clear_after=0", "max_disk_percent=92"], T0)
    alerts.states(T0, True, "cam-1")
    full = {"memory_used_percent": 97.0, "disk_used_percent": 93.0}
    alerts.registry.add_telemetry(
        [window("cam-1", 1, T0, **full), window("cam-2", 1, T0, disk_used_percent=91.0)]
    )
    assert alerts.round(T0) == 0  # not yet: it must last `hold`
    assert alerts.round(T0 + timedelta(seconds=61)) == 2
    hooks = hook.wait_for(lambda b: len(b) == 2, what="memory and disk alerts")
    titles = sorted(b["alert"]["title"] for b in hooks)
    assert titles == ["cam-1 is running out of memory", "cam-1's disk is nearly full"]
    memory = next(b["alert"] for b in hooks if "memory" in b["alert"]["title"])
    assert memory["what_happened"].startswith("97.0% of cam-1's memory is in use since")
    assert memory["device"] == "cam-1" and memory["link"] == LINK + "devices/cam-1"

    later = T0 + timedelta(minutes=20)  # the window (15 min) no longer holds the full reading
    alerts.registry.add_telemetry(
        [window("cam-1", 2, later, memory_used_percent=60.0, disk_used_percent=93.0)]
    )
    alerts.evaluator.performance_interval = 0  # read telemetry again now
    assert alerts.round(later) == 1
    resolved = hook.wait_for(lambda b: len(b) == 3, what="the memory alert resolved")[-1]
    assert (
        resolved["event"] == "resolved"
        and resolved["alert"]["title"] == "Resolved: cam-1's board is back to normal"
    )


def test_a_device_stuck_on_an_old_root_an_expiring_timestamp_and_a_freeze_each_alert_then_resolve(
    alerts, hook, smtp, start_ingest, publisher, edgekit_home
):
    """Issue 16: devices on the key hierarchy report their root version and their timestamp's
    expiry in their state (computed here by the device's own DeviceTrust on the fleet's real
    metadata), and freeze_suspected / freeze_ended events; ingest takes them from a real
    Mosquitto into the registry, and the fleet alerts."""
    from edgekit.fleet.trustrepo import current_roots
    from edgekit.keys import SigningKey, load_signing_key
    from edgekit.roles import DeviceTrust
    from test_trust_keeper import make_fleet
    from trust_sim import Retained

    alerts.store.add_channel(
        email_channel("mail", ["owner@shop.example"], f"smtp://127.0.0.1:{smtp.port}?tls=none"), T0
    )
    alerts.store.add_channel(webhook_channel("hook", hook.url), T0)
    start = T0.timestamp()
    repo = make_fleet(edgekit_home, now=start)
    devices = {d: DeviceTrust("lab", d, repo.files()["root/1"]) for d in ("cam-1", "cam-2")}
    expires = {
        d: t.refresh(Retained(repo.files()), now=start).expires["timestamp"] for d, t in devices.items()
    }
    # The owner rotates the root (v2); only cam-1 receives it.
    repo.rotate("root", add=[SigningKey.generate().public], now=start)
    repo.sign("root", load_signing_key(edgekit_home, "root"))
    repo.submit("root", now=start)
    repo.save(edgekit_home / "trust" / "lab")
    assert current_roots(edgekit_home) == {"lab": 2}
    assert devices["cam-1"].refresh(Retained(repo.files()), now=start).root_version == 2
    ingest = start_ingest(alerts.registry)
    sent_states = 0

    def report_states(at: float) -> None:
        nonlocal sent_states
        for d, trust in devices.items():
            doc = state_doc(d, time=at, trust_root=trust.root_version, trust_expires=expires[d])
            publisher.send(T.device_state(d), doc, retain=True)
        sent_states += len(devices)
        assert ingest.wait_for(lambda s: s.states >= sent_states)

    report_states(start)
    row = {d.id: d for d in alerts.registry.devices()}["cam-2"]
    assert row.trust_root == 1 and row.trust_expires is not None
    assert abs(row.trust_expires.timestamp() - expires["cam-2"]) < 1

    assert alerts.round(T0 + timedelta(seconds=1)) == 0  # behind, but not yet for stuck_after (1 h)
    assert alerts.round(T0 + timedelta(hours=1, seconds=1)) == 2  # mail and webhook
    (stuck,) = hook.wait_for(lambda b: len(b) == 1, what="the old-root alert")
    alert = stuck["alert"]
    assert (alert["rule"], alert["device"], alert["fleet"]) == ("old_root", "cam-2", "lab")
    assert alert["title"] == "cam-2 is stuck on an old root of trust"
    assert "still trusts version 1" in alert["what_happened"] and "version 2" in alert["what_happened"]
    assert "`edgekit trust publish --fleet lab`" in alert["what_you_can_do"]
    assert alert["link"] == LINK + "devices/cam-2"
    mail = smtp.wait_for(lambda m: len(m) == 1, what="the old-root mail")[0]
    assert mail["Subject"] == "[edgekit] cam-2 is stuck on an old root of trust"

    # 19 hours on, nobody re-signed the timestamp (no fleet service): it expires within 6 h.
    assert alerts.round(T0 + timedelta(hours=19)) == 2
    expiring = hook.wait_for(lambda b: len(b) == 2, what="the timestamp alert")[-1]["alert"]
    assert (expiring["rule"], expiring["fleet"], expiring["device"]) == ("trust_expiry", "lab", None)
    assert expiring["title"] == "fleet lab: its signed timestamp expires at 2026-12-02 12:00 UTC"
    assert "fleet lab's devices (cam-1, cam-2)" in expiring["what_happened"]
    assert "`edgekit trust refresh --fleet lab`" in expiring["what_you_can_do"]
    assert alerts.round(T0 + timedelta(hours=20)) == 0  # one alert per fleet, not one a round

    # A day and an hour on, cam-1's agent notices the freeze and says so.
    frozen_at = start + 25 * 3600
    assert devices["cam-1"].refresh(Retained(repo.files()), now=frozen_at).freeze_suspected
    message = "device cam-1 has had no fresh word from fleet lab since 2026-12-02 12:00 UTC"
    publisher.send(
        T.device_events("cam-1"),
        event_doc("cam-1", 7, kind="freeze_suspected", message=message, time=frozen_at),
    )
    assert ingest.wait_for(lambda s: s.events >= 1)
    assert alerts.round(T0 + timedelta(hours=25, seconds=1)) == 2
    freeze = hook.wait_for(lambda b: len(b) == 3, what="the freeze alert")[-1]["alert"]
    assert (freeze["rule"], freeze["device"]) == ("freeze", "cam-1")
    assert freeze["title"] == "cam-1 gets no fresh word from the fleet"
    assert "since 2026-12-02 12:00 UTC" in freeze["what_happened"]
    assert "keeps serving" in freeze["what_edgekit_did"]
    assert (
        "fleet service" in freeze["what_you_can_do"]
        and "trust refresh --fleet lab" in freeze["what_you_can_do"]
    )

    # The owner runs `edgekit trust refresh` and `trust publish`: both devices take the fresh
    # metadata (cam-2 walks to root 2), cam-1 says the freeze ended; every alert resolves.
    fresh_at = frozen_at + 60
    repo.refresh_timestamp([load_signing_key(edgekit_home, "online")], now=fresh_at)
    repo.save(edgekit_home / "trust" / "lab")
    for d, trust in devices.items():
        report = trust.refresh(Retained(repo.files()), now=fresh_at)
        assert not report.freeze_suspected and trust.root_version == 2
        expires[d] = report.expires["timestamp"]
    publisher.send(
        T.device_events("cam-1"),
        event_doc("cam-1", 8, kind="freeze_ended", message="fresh trust metadata again", time=fresh_at),
    )
    assert ingest.wait_for(lambda s: s.events >= 2)
    report_states(fresh_at)
    assert alerts.round(T0 + timedelta(hours=25, minutes=2)) == 6
    resolved = hook.wait_for(lambda b: len(b) == 6, what="three resolve messages")[3:]
    assert {r["event"] for r in resolved} == {"resolved"}
    assert sorted(r["alert"]["title"] for r in resolved) == [
        "Resolved: cam-1 has fresh word from the fleet again",
        "Resolved: cam-2 trusts the fleet's current root",
        "Resolved: fleet lab's devices have a fresh signed timestamp",
    ]


def test_trust_rules_are_quiet_for_single_key_devices_and_offline_ones(alerts, hook, edgekit_home):
    """A device that reports no root (single-key trust, or an older agent) and an offline device
    behind the fleet's root, its timestamp about to expire, raise no trust alert; the offline one
    alerts as offline only."""
    from test_trust_keeper import make_fleet

    alerts.store.add_channel(webhook_channel("hook", hook.url), T0)
    alerts.store.set_rule("old_root", ["stuck_after=0"], T0)
    make_fleet(edgekit_home, now=T0.timestamp())
    alerts.registry.record_states(
        [
            DeviceState("cam-1", "lab", True, "serving", T0),
            DeviceState(
                "cam-2", "lab", False, "offline", T0, trust_root=0, trust_expires=T0 + timedelta(hours=1)
            ),
        ]
    )
    assert alerts.round(T0 + timedelta(seconds=1)) == 0  # offline counts from the first round
    assert alerts.round(T0 + timedelta(minutes=10)) == 1
    (only,) = hook.wait_for(lambda b: len(b) == 1, what="the offline alert")
    assert (only["alert"]["rule"], only["alert"]["device"]) == ("offline", "cam-2")


def stalled_rollout(phase: str, since: datetime, **policy: float) -> Rollout:
    return Rollout(
        fleet="lab",
        bundle_id="b" * 64,
        label="digits@2.0.0",
        previous_bundle_id="a" * 64,
        devices=("cam-1", "cam-2", "cam-3"),
        canaries=("cam-1",),
        phase=phase,
        phase_since=since.timestamp(),
        started_at=T0.timestamp() - 60,
        policy={"canary": 1, **policy},
    )


def test_a_rollout_is_stalled_only_when_nothing_moved_for_stall_after(alerts, hook):
    """A one-hour soak is the rollout's plan, not a stall (stall_after 10 min); once it is over
    and nothing moves for 10 min the rollout is stuck, and the alert resolves when it moves on.
    In the fleet phase each device's install is progress; a stalled download or an event about
    another bundle is not."""
    alerts.store.add_channel(webhook_channel("hook", hook.url), T0)
    alerts.store.set_rule("rollout", ["stall_after=10m"], T0)
    alerts.states(T0, True, "cam-1", "cam-2", "cam-3")
    control = ControlPlane(alerts.registry)
    control.save_rollout(stalled_rollout("soak", T0, soak_s=3600.0), new=True)
    b = "b" * 64
    alerts.registry.add_events([EventRow("cam-1", 1, T0 - timedelta(seconds=30), "installed", "ok", b)])
    assert alerts.round(T0 + timedelta(minutes=45)) == 0  # soaking, as planned, for an hour
    assert alerts.round(T0 + timedelta(minutes=69)) == 0  # 9 min past the soak's end
    assert alerts.round(T0 + timedelta(minutes=70)) == 1
    (opened,) = hook.wait_for(lambda m: len(m) == 1, what="the stalled alert")
    assert opened["alert"]["title"] == "The rollout of digits@2.0.0 is stuck"
    assert "soak phase and nothing has moved since 2026-12-01 13:00 UTC" in opened["alert"]["what_happened"]
    assert opened["alert"]["since"].startswith("2026-12-01T13:00:00")

    fleet_phase = T0 + timedelta(minutes=71)  # the controller takes its step: to the whole fleet
    control.save_rollout(stalled_rollout("fleet", fleet_phase, soak_s=3600.0))
    assert alerts.round(fleet_phase + timedelta(seconds=1)) == 1
    resolved = hook.wait_for(lambda m: len(m) == 2, what="the resolve message")[-1]
    assert resolved["alert"]["title"] == "Resolved: fleet lab: the rollout of digits@2.0.0 moved on"

    alerts.registry.add_events(
        [EventRow("cam-2", 1, fleet_phase + timedelta(minutes=8), "installed", "ok", b)]
    )
    assert alerts.round(fleet_phase + timedelta(minutes=15)) == 0  # cam-2 installed 7 min ago
    alerts.registry.add_events(
        [
            EventRow("cam-3", 1, fleet_phase + timedelta(minutes=12), "download_stalled", "slow", b),
            EventRow("cam-3", 2, fleet_phase + timedelta(minutes=13), "installed", "other", "c" * 64),
        ]
    )
    assert alerts.round(fleet_phase + timedelta(minutes=17, seconds=59)) == 0
    assert alerts.round(fleet_phase + timedelta(minutes=18)) == 1  # 10 min since cam-2 installed
    again = hook.wait_for(lambda m: len(m) == 3, what="stalled again")[-1]
    assert again["event"] == "opened" and "fleet phase" in again["alert"]["what_happened"]
    assert again["alert"]["id"] != opened["alert"]["id"]


def test_a_device_slower_than_its_fleet_alerts_then_resolves(alerts, hook):
    """cam-1's p95 is 10 ms where its fleet's average is 4 ms (ratio 2): an alert naming both;
    it resolves once its recent windows are back to the fleet's level."""
    alerts.store.add_channel(webhook_channel("hook", hook.url), T0)
    alerts.store.set_rule("latency", ["clear_after=0"], T0)
    devices = ("cam-1", "cam-2", "cam-3", "cam-4")
    alerts.states(T0, True, *devices)
    alerts.registry.add_telemetry(
        [window(d, 1, T0)._replace(latency_p95_ms=10.0 if d == "cam-1" else 2.0) for d in devices]
    )
    assert alerts.round(T0) == 1
    (opened,) = hook.wait_for(lambda m: len(m) == 1, what="the latency alert")
    assert opened["alert"]["title"] == "cam-1 is slow" and opened["alert"]["device"] == "cam-1"
    assert "cam-1 answers in 10.0 ms (p95)" in opened["alert"]["what_happened"]
    assert "against 4.0 ms usual for its fleet" in opened["alert"]["what_happened"]

    later = T0 + timedelta(minutes=20)  # the window (15 min) holds only the new reading
    alerts.registry.add_telemetry([window("cam-1", 2, later)])
    alerts.evaluator.performance_interval = 0
    assert alerts.round(later) == 1
    resolved = hook.wait_for(lambda m: len(m) == 2, what="the resolve message")[-1]
    assert resolved["alert"]["title"] == "Resolved: cam-1 answers as fast as usual again"


def test_a_device_failing_more_predictions_than_its_fleet_alerts_then_resolves(alerts, hook):
    """cam-1 fails 20% of its predictions where its fleet fails 5% overall (ratio 2, min_rate
    1%): an alert; cam-2 at 4% stays quiet (under 2 x 5%); back to none, it resolves."""
    alerts.store.add_channel(webhook_channel("hook", hook.url), T0)
    alerts.store.set_rule("errors", ["clear_after=0"], T0)
    alerts.states(T0, True, "cam-1", "cam-2", "cam-3", "cam-4")
    failing = {"cam-1": 20, "cam-2": 4, "cam-3": 0, "cam-4": 0}
    alerts.registry.add_telemetry([window(d, 1, T0)._replace(errors=n) for d, n in failing.items()])
    assert alerts.round(T0) == 1
    (opened,) = hook.wait_for(lambda m: len(m) == 1, what="the error-rate alert")
    assert opened["alert"]["title"] == "cam-1 fails predictions"
    assert opened["alert"]["what_happened"].startswith("20.0% of cam-1's predictions fail since")
    assert "against 6.0% usual for its fleet" in opened["alert"]["what_happened"]

    later = T0 + timedelta(minutes=20)
    alerts.registry.add_telemetry([window("cam-1", 2, later)])
    alerts.evaluator.performance_interval = 0
    assert alerts.round(later) == 1
    resolved = hook.wait_for(lambda m: len(m) == 2, what="the resolve message")[-1]
    assert resolved["alert"]["title"] == "Resolved: cam-1's error rate is back to usual"


def test_a_board_at_80_c_alerts_after_hold_then_resolves(alerts, hook):
    """cam-1 at 80.0 C (the default limit: a Pi throttles there) for longer than `hold` (60 s)
    alerts; cam-2 at 79.9 C does not; cooled down, the alert resolves."""
    alerts.store.add_channel(webhook_channel("hook", hook.url), T0)
    alerts.store.set_rule("board", ["clear_after=0"], T0)
    alerts.states(T0, True, "cam-1", "cam-2")
    alerts.registry.add_telemetry(
        [window("cam-1", 1, T0, temperature_c=80.0), window("cam-2", 1, T0, temperature_c=79.9)]
    )
    assert alerts.round(T0) == 0  # not yet: it must last `hold`
    assert alerts.round(T0 + timedelta(seconds=61)) == 1
    (opened,) = hook.wait_for(lambda m: len(m) == 1, what="the temperature alert")
    assert opened["alert"]["title"] == "cam-1 is too hot"
    assert opened["alert"]["what_happened"].startswith("cam-1's board is at 80.0 C since")

    later = T0 + timedelta(minutes=20)
    alerts.registry.add_telemetry([window("cam-1", 2, later, temperature_c=62.0)])
    alerts.evaluator.performance_interval = 0
    assert alerts.round(later) == 1
    resolved = hook.wait_for(lambda m: len(m) == 2, what="the resolve message")[-1]
    assert resolved["alert"]["title"] == "Resolved: cam-1's board is back to normal"


def test_the_drift_rule_can_alert_on_inputs_changed_too(alerts, hook):
    """By default only `model affected` alerts (issue 20); `alerts rule set drift
    on=inputs-changed` makes a device whose inputs changed alert too, in words that say its
    model seems unaffected, and back to model-affected it resolves."""
    alerts.store.add_channel(webhook_channel("hook", hook.url), T0)
    alerts.store.set_rule("drift", ["clear_after=0"], T0)
    alerts.states(T0, True, "cam-1", "cam-2")
    alerts.registry.add_telemetry(
        [
            window("cam-1", 1, T0, drift_score=1.7, drifted=True, drift_severity="inputs changed"),
            window("cam-2", 1, T0, drift_score=0.1, drift_severity="ok"),
        ]
    )
    assert alerts.round(T0) == 0  # the default: inputs changed is shown, not sent
    listed = edgekit("alerts", "rule", "set", "drift", "on=inputs-changed", "--registry", alerts.registry.url)
    assert listed.returncode == 0 and "on=inputs-changed" in listed.stdout
    assert alerts.round(T0 + timedelta(seconds=1)) == 1
    (opened,) = hook.wait_for(lambda m: len(m) == 1, what="the inputs-changed alert")
    assert opened["alert"]["title"] == "cam-1: inputs no longer look like the training data"
    assert "its answers look the same so far" in opened["alert"]["what_happened"]
    assert opened["alert"]["facts"]["severity"] == "inputs changed"

    alerts.store.set_rule("drift", ["on=model-affected"], T0)
    assert alerts.round(T0 + timedelta(seconds=2)) == 1
    resolved = hook.wait_for(lambda m: len(m) == 2, what="the resolve message")[-1]
    assert resolved["alert"]["title"] == "Resolved: cam-1: inputs look like the training data again"
