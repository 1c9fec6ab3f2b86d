"""Write the message samples of docs/alerts.md from the code that writes the messages
(:mod:`edgekit.fleet.alerts.messages`): a mail (subject and body) for every rule, opened and
resolved, the digest, and one webhook document, so the samples cannot drift from what is sent.

    python docs/gen_alert_samples.py           # rewrite the samples in docs/alerts.md  (make docs)
    python docs/gen_alert_samples.py --check   # exit 1 if docs/alerts.md is stale (the tests do this)

The samples sit between ``<!-- BEGIN NAME (generated ...) -->`` and ``<!-- END NAME -->`` lines;
everything else in docs/alerts.md is written by hand.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "alerts.md"
LINK = "http://shop-laptop:8765/"
SINCE = datetime(2026, 12, 1, 14, 2, tzinfo=timezone.utc)
OPENED = SINCE + timedelta(minutes=7)
RESOLVED = SINCE + timedelta(minutes=27)
BASE = {"version": "1.2.0", "last_seen": SINCE.isoformat()}
ROLLOUT = {"label": "digits@2.0.0", "reason": None, "canaries": ["cam-1"]}

#: (heading, rule, fleet, device, facts, resolved too): what the evaluator would hold for each.
SAMPLES: list[tuple[str, str, str | None, str | None, dict[str, Any], bool]] = [
    ("offline", "offline", "shop", "cam-3", BASE, True),
    (
        "drift (model affected; the default)",
        "drift",
        "shop",
        "cam-2",
        {**BASE, "severity": "model affected", "accuracy": 0.62},
        True,
    ),
    (
        "drift (inputs changed; only with `on=inputs-changed`)",
        "drift",
        "shop",
        "cam-2",
        {**BASE, "severity": "inputs changed", "accuracy": None},
        True,
    ),
    (
        "install: refused",
        "install",
        "shop",
        "cam-4",
        {**BASE, "event": "install_refused", "message": "digits@2.0.0 is not signed by a trusted key"},
        False,
    ),
    (
        "install: failed",
        "install",
        "shop",
        "cam-4",
        {**BASE, "event": "install_failed", "message": "digits@2.0.0: the model does not load"},
        False,
    ),
    (
        "install: health check failed",
        "install",
        "shop",
        "cam-4",
        {**BASE, "event": "healthcheck_failed", "message": "digits@2.0.0 answered 0 of 5 test inputs"},
        False,
    ),
    (
        "install: rolled back automatically",
        "install",
        "shop",
        "cam-4",
        {**BASE, "event": "rolled_back", "message": "back to digits@1.2.0 after a failed health check"},
        True,
    ),
    (
        "rollout aborted",
        "rollout",
        "shop",
        None,
        {**ROLLOUT, "phase": "aborted", "reason": "cam-1's error rate 30.0% is above 5.0%"},
        True,
    ),
    (
        "rollout stalled",
        "rollout",
        "shop",
        None,
        {**ROLLOUT, "phase": "fleet", "stalled": True, "quiet_since": SINCE.isoformat()},
        True,
    ),
    ("latency", "latency", "shop", "cam-5", {**BASE, "p95_ms": 41.3, "fleet_p95_ms": 12.8}, True),
    ("errors", "errors", "shop", "cam-5", {**BASE, "error_rate": 0.214, "fleet_error_rate": 0.012}, True),
    ("board: temperature", "board", "shop", "cam-6", {**BASE, "temperature_c": 82.4}, True),
    ("board: memory", "board", "shop", "cam-6", {**BASE, "part": "memory", "used_percent": 97.2}, False),
    ("board: disk", "board", "shop", "cam-6", {**BASE, "part": "disk", "used_percent": 93.5}, False),
    (
        "expiry",
        "expiry",
        "shop",
        None,
        {
            "fleet": "shop",
            "label": "digits@1.2.0",
            "expires_at": (SINCE + timedelta(days=6)).isoformat(),
            "expired": False,
            "devices": ["cam-1", "cam-2"],
        },
        True,
    ),
    (
        "freeze",
        "freeze",
        "shop",
        "cam-1",
        {
            **BASE,
            "fleet": "shop",
            "message": "timestamp expired",
            "trust_expires": (SINCE - timedelta(hours=1)).isoformat(),
        },
        True,
    ),
    (
        "old_root",
        "old_root",
        "shop",
        "cam-2",
        {**BASE, "fleet": "shop", "trust_root": 1, "fleet_root": 2},
        True,
    ),
    (
        "trust_expiry",
        "trust_expiry",
        "shop",
        None,
        {
            "fleet": "shop",
            "devices": ["cam-1", "cam-2"],
            "expires_at": (SINCE + timedelta(hours=5)).isoformat(),
            "expired": False,
        },
        True,
    ),
    ("channel failing", "channel", None, None, {"channel": "mail"}, True),
]


def _message(rule: str, event: str, fleet: str | None, device: str | None, facts: Mapping[str, Any]) -> Any:
    from edgekit.fleet.alerts.messages import render

    return render(
        alert_id=12,
        rule=rule,
        event=event,
        fleet=fleet,
        device=device,
        since=SINCE,
        facts={**facts, "flaps": 0},
        now=OPENED if event == "opened" else RESOLVED,
        link_base=LINK,
    )


def _mail(message: Mapping[str, Any]) -> list[str]:
    return ["```", f"Subject: {message['subject']}", "", message["text"], "```", ""]


def mails() -> str:
    """Every rule's mails, then the digest."""
    from edgekit.fleet.alerts.messages import digest_message

    lines: list[str] = []
    for heading, rule, fleet, device, facts, resolved in SAMPLES:
        lines += [f"#### {heading}", ""]
        lines += _mail(_message(rule, "opened", fleet, device, facts))
        if resolved:
            lines += _mail(_message(rule, "resolved", fleet, device, facts))
    held = [_message("offline", "opened", "shop", f"cam-{i}", BASE) for i in range(1, 4)]
    lines += ["#### the digest (beyond a channel's hourly limit)", ""]
    lines += _mail(digest_message(held, OPENED + timedelta(hours=1), 20))
    return "\n".join(lines).rstrip("\n")


def webhook() -> str:
    """The webhook document of the offline alert, as sent."""
    doc = _message("offline", "opened", "shop", "cam-3", BASE)["json"]
    return "\n".join(["```json", json.dumps(doc, indent=2, ensure_ascii=False), "```"])


BLOCKS = {"mail-samples": mails, "webhook-sample": webhook}


def render_doc(text: str) -> str:
    for name, make in BLOCKS.items():
        pattern = re.compile(rf"(<!-- BEGIN {name} [^\n]*-->\n)(?:.*?\n)?(<!-- END {name} -->)", re.DOTALL)
        if not pattern.search(text):
            raise SystemExit(f"docs/alerts.md has no <!-- BEGIN {name} ... --> / <!-- END {name} --> lines")
        text = pattern.sub(lambda m, body=make(): m.group(1) + body + "\n" + m.group(2), text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale; write nothing")
    args = parser.parse_args(argv)
    current = OUT.read_text()
    fresh = render_doc(current)
    if args.check:
        if fresh != current:
            print(f"{OUT} is stale: run `python docs/gen_alert_samples.py` and commit it", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
