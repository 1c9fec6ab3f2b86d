"""Alerts end to end: `edgekit fleet serve` (two ingest workers, one evaluator), a real agent
process killed with SIGKILL, a real Mosquitto, a real SMTP server and a real HTTP receiver."""

from __future__ import annotations

import json

from alert_receivers import SmtpServer, WebhookReceiver, body
from test_fleet_cli import edgekit
from test_push import Fleet, fleet  # noqa: F401 - fleet is a fixture
from test_serve import serve, wait_until  # noqa: F401 - serve is a fixture

OFFLINE_AFTER = 3


def test_a_killed_agent_sends_one_offline_mail_and_webhook_then_one_back_online(
    serve,  # noqa: F811 - the fixture imported above
    fleet: Fleet,  # noqa: F811 - the fixture imported above
    tmp_path,
):
    registry = f"sqlite:///{tmp_path / 'registry.db'}"
    smtp, hook = SmtpServer().start(), WebhookReceiver().start()
    try:
        for args in (
            (
                "channel",
                "add",
                "--email",
                "owner@shop.example",
                "--smtp",
                f"smtp://127.0.0.1:{smtp.port}?tls=none",
            ),
            ("channel", "add", "--webhook", hook.url),
            ("rule", "set", "offline", f"offline_after={OFFLINE_AFTER}s", "clear_after=0"),
        ):
            result = edgekit("alerts", *args, "--registry", registry)
            assert result.returncode == 0, result.stderr
        served = serve(
            "--registry", registry, "--workers", "2", "--alert-interval", "0.5",
            "--public-url", "http://shop-laptop:8765/",
        )  # fmt: skip
        fleet.start("cam-1")
        wait_until(
            lambda: [d for d in json.loads(served.get("api/devices")) if d["online"]], served, "cam-1 online"
        )

        agent = fleet.processes["cam-1"]
        agent.kill()  # SIGKILL: no goodbye; the broker publishes the agent's will
        agent.wait(10)
        (mail,) = smtp.wait_for(lambda m: len(m) == 1, timeout=OFFLINE_AFTER + 30, what="the offline mail")
        (doc,) = hook.wait_for(lambda b: len(b) == 1, timeout=OFFLINE_AFTER + 30, what="the offline webhook")
        assert mail["Subject"] == "[edgekit] cam-1 is offline"
        assert "cam-1 went offline at" in body(mail)
        assert "http://shop-laptop:8765/devices/cam-1" in body(mail)
        assert (doc["event"], doc["alert"]["rule"], doc["alert"]["device"]) == ("opened", "offline", "cam-1")

        fleet.start("cam-1")
        mails = smtp.wait_for(lambda m: len(m) == 2, timeout=60, what="the back-online mail")
        docs = hook.wait_for(lambda b: len(b) == 2, timeout=60, what="the back-online webhook")
        assert [m["Subject"] for m in mails] == [
            "[edgekit] cam-1 is offline",
            "[edgekit] Resolved: cam-1 is back online",
        ]
        assert [d["event"] for d in docs] == ["opened", "resolved"]
        (alert,) = json.loads(edgekit("alerts", "list", "--json", "--registry", registry).stdout)
        assert (alert["rule"], alert["state"], alert["device"]) == ("offline", "resolved", "cam-1")
        served.stop()
    finally:
        smtp.stop()
        hook.stop()
