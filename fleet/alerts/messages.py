"""What an alert says, in the owner's words, as mail text and as a webhook's JSON.

Every message says what happened, to which device (or fleet), since when, what edgekit already
did, what the owner can do, and links to the device's page. The webhook body has a stable,
versioned schema (``edgekit.alert``, version 1) and always carries the same words in ``text``,
so Slack and Mattermost incoming webhooks show it as it is; a channel in the ``text`` form
sends ``{"text": ...}`` alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

from ..registry.views import iso
from .rules import INSTALL_PROBLEMS

__all__ = ["ALERT_SCHEMA", "ALERT_SCHEMA_VERSION", "digest_message", "render", "test_message"]

ALERT_SCHEMA = "edgekit.alert"
ALERT_SCHEMA_VERSION = 1


def _clock(value: datetime) -> str:
    value = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def _sentence(text: str) -> str:
    """``text`` ending as a sentence ends (a device's event message usually has no full stop)."""
    text = text.strip()
    return text if text.endswith((".", "!", "?")) else text + "."


def link_for(base: str | None, device: str | None) -> str | None:
    """The dashboard page of ``device`` (else the dashboard), under ``base``."""
    if not base:
        return None
    base = base if base.endswith("/") else base + "/"
    return f"{base}devices/{quote(device, safe='')}" if device else base


def _words(rule: str, facts: Mapping[str, Any], who: str, since: datetime) -> tuple[str, str, str, str]:
    """(title, what happened, what edgekit did, what you can do) of an opened alert."""
    at = _clock(since)
    if rule == "offline":
        return (
            f"{who} is offline",
            f"{who} went offline at {at} (it was running version {facts.get('version') or 'unknown'}).",
            "edgekit keeps its desired state on the broker: when it reconnects it installs what it missed.",
            "Check that it has power and network; restart it if it stays off.",
        )
    if rule == "drift":
        accuracy = facts.get("accuracy")
        estimate = (
            f" edgekit estimates its accuracy at {float(accuracy):.0%}."
            if isinstance(accuracy, (int, float))
            else ""
        )
        todo = (
            "Check the device's surroundings (camera angle, lighting, sensor); "
            "if the change is here to stay, retrain with recent data and push the new model."
        )
        severity = facts.get("severity")
        if severity == "inputs changed":
            return (
                f"{who}: inputs no longer look like the training data",
                f"{who} has reported since {at} that what it sees differs from what its model was trained "
                f"on; its answers look the same so far, so its model seems unaffected.{estimate}",
                "edgekit keeps serving the current model and keeps measuring; it tells you if the model "
                "becomes affected.",
                todo,
            )
        if severity is None:  # an agent too old to judge severity: its drift flag alone
            return (
                f"{who}: inputs no longer look like the training data",
                f"{who} has reported drift since {at}: what it sees differs from what its model was "
                "trained on, and its predictions may be affected.",
                "edgekit keeps serving the current model and keeps measuring.",
                todo,
            )
        return (
            f"{who}: its model is likely making more mistakes",
            f"{who} has reported since {at} that its model is likely affected by a change in what it "
            f"sees: its estimated accuracy fell, or its answers shifted along with its inputs.{estimate}",
            "edgekit keeps serving the current model and keeps measuring.",
            todo,
        )
    if rule == "install":
        verb = INSTALL_PROBLEMS.get(str(facts.get("event")), "had trouble with")
        return (
            f"{who} {verb} an update",
            f"{who} {verb} an update at {at}: {_sentence(str(facts.get('message') or 'no detail given'))}",
            f"{who} keeps serving the version it had ({facts.get('version') or 'unknown'}).",
            "Look at the device's events in the dashboard; fix the bundle and push it again.",
        )
    if rule == "rollout":
        label = facts.get("label", "a new version")
        if facts.get("stalled"):
            return (
                f"The rollout of {label} is stuck",
                f"The rollout of {label} is in its {facts.get('phase')} phase and nothing has moved since "
                f"{at}: no device reported progress on it, and the rollout took no step.",
                "edgekit keeps waiting for the devices; nothing was rolled back.",
                "Check that the fleet service (`edgekit fleet serve` or `fleet up`), which drives rollouts, "
                "is running and that the devices are online; `edgekit rollout resume --fleet "
                f"{who.removeprefix('fleet ')}` takes it on now, `edgekit rollout abort` stops it.",
            )
        names = list(facts.get("canaries") or [])
        if len(names) == 1:
            canaries = f"The canary {names[0]} was"
        else:
            canaries = f"The canaries ({', '.join(names)}) were" if names else "The canaries were"
        return (
            f"The rollout of {label} was stopped",
            f"The rollout of {label} was aborted at {at}: {facts.get('reason') or 'no reason given'}.",
            f"{canaries} rolled back to the previous version; the rest of the fleet never received it.",
            "Look at the canary's events and telemetry in the dashboard, fix the model, and push again.",
        )
    if rule == "latency":
        return (
            f"{who} is slow",
            f"{who} answers in {facts.get('p95_ms')} ms (p95) since {at}, against "
            f"{facts.get('fleet_p95_ms')} ms usual for its fleet.",
            "edgekit keeps serving; nothing was changed.",
            "Check whether the device is overloaded or overheating, or whether a recent update made it slower.",
        )
    if rule == "errors":
        rate = float(facts.get("error_rate") or 0.0)
        usual = float(facts.get("fleet_error_rate") or 0.0)
        return (
            f"{who} fails predictions",
            f"{rate:.1%} of {who}'s predictions fail since {at}, against {usual:.1%} usual for its fleet.",
            "edgekit keeps serving; nothing was changed.",
            "Look at the device's events; a recent update or a broken input (sensor, camera) is the usual cause.",
        )
    if rule == "board" and facts.get("part") == "memory":
        return (
            f"{who} is running out of memory",
            f"{facts.get('used_percent')}% of {who}'s memory is in use since {at}.",
            "edgekit keeps serving; the system may stop programs, the agent included, if it runs out.",
            "Look for other programs using the device's memory; a smaller (quantized) model needs less.",
        )
    if rule == "board" and facts.get("part") == "disk":
        return (
            f"{who}'s disk is nearly full",
            f"{facts.get('used_percent')}% of the disk holding {who}'s edgekit data is in use since {at}.",
            "edgekit keeps serving; an update that does not fit is refused and the device keeps its version.",
            "Free space on the device (old logs, captured samples, files of other programs) or use a larger card.",
        )
    if rule == "board":
        return (
            f"{who} is too hot",
            f"{who}'s board is at {facts.get('temperature_c')} C since {at}; it slows itself down at this heat.",
            "edgekit keeps serving; predictions may be slower.",
            "Give it air: a case with a fan or a heatsink, out of the sun.",
        )
    if rule == "expiry":
        label = facts.get("label", "its version")
        expires = _clock(datetime.fromisoformat(str(facts["expires_at"])))
        devices = list(facts.get("devices") or [])
        runs = f"{who}'s devices ({', '.join(devices)})" if who.startswith("fleet ") else who
        bundle, _, number = str(label).rpartition("@")
        push = f"edgekit push {bundle} --version {number} --fleet {facts.get('fleet')}"
        if facts.get("role") == "desired":  # devices on the key hierarchy (edgekit trust)
            state = "expired" if facts.get("expired") else "expire"
            return (
                f"{who}: its signed instructions expire on {expires[:10]}",
                f"The fleet's signed instructions (its desired role) telling {runs} to run {label} "
                f"{state} at {expires}: from then on devices refuse the fleet's metadata and take no "
                "new instructions, and a new device installs nothing.",
                "edgekit keeps every device serving what it runs. The fleet service re-signs these "
                "instructions before they expire when it holds the fleet's online key.",
                "Check that `edgekit fleet serve` runs with the fleet's online key, or sign fresh ones "
                "by pushing the same version again"
                + (f": `{push}`" if bundle else "")
                + f"; then `edgekit trust publish --fleet {facts.get('fleet')}` if the service is not running.",
            )
        if facts.get("expired"):
            happened = (
                f"The signed instructions telling {runs} to run {label} expired at {expires}: a device "
                "that restarts from scratch, or a new one, refuses them and installs nothing."
            )
        else:
            happened = (
                f"The signed instructions telling {runs} to run {label} expire at {expires}. Until then "
                "nothing changes; after that, a device that restarts from scratch, or a new one, would "
                "refuse them and install nothing."
            )
        return (
            f"{who}: its signed instructions expire on {expires[:10]}",
            happened,
            "edgekit keeps every device serving what it runs; it does not sign new instructions by itself.",
            f"Sign fresh ones by pushing the same version again: `{push}` "
            "(devices that run it already do not reinstall).",
        )
    if rule == "freeze":
        held = facts.get("trust_expires")
        since_when = f" since {_clock(datetime.fromisoformat(str(held)))}" if held else ""
        return (
            f"{who} gets no fresh word from the fleet",
            f"{who} reported at {at} that it has had no fresh signed word from the fleet{since_when}: "
            "either the fleet service stopped re-signing it, or someone between the fleet and the "
            "device (the broker, the network) is holding updates back.",
            f"{who} keeps serving what it runs, and takes fresh signed metadata as soon as it arrives.",
            "Check that the fleet service (`edgekit fleet serve` or `fleet up`) is running and reaches "
            f"the broker; `edgekit trust refresh --fleet {facts.get('fleet') or 'FLEET'}` signs a fresh "
            "timestamp by hand. If the service runs and this stays, check the broker and the network "
            "to the device.",
        )
    if rule == "old_root":
        mine, theirs = facts.get("trust_root"), facts.get("fleet_root")
        return (
            f"{who} is stuck on an old root of trust",
            f"{who} still trusts version {mine} of the fleet's root keys since at least {at}, while "
            f"the fleet is on version {theirs}: it may not follow the newest key changes (a revoked "
            "or rotated key).",
            f"{who} keeps serving what it runs; edgekit keeps the new root on the broker for it to take.",
            f"Run `edgekit trust publish --fleet {facts.get('fleet') or 'FLEET'}` to put every root "
            "on the broker again; if it stays behind, look at its events in the dashboard for "
            "`trust_refused` (`edgekit trust status --devices` shows which root every device has).",
        )
    if rule == "trust_expiry":
        fleet_name = facts.get("fleet")
        expires = _clock(datetime.fromisoformat(str(facts["expires_at"])))
        holders = ", ".join(facts.get("devices") or [])
        if facts.get("expired"):
            happened = (
                f"The fleet's signed timestamp that {who}'s devices ({holders}) hold expired at {expires}: "
                "the fleet service did not re-sign it, or it does not reach them. They raise "
                "freeze_suspected."
            )
        else:
            happened = (
                f"The fleet's signed timestamp that {who}'s devices ({holders}) hold expires at {expires}; "
                "the fleet service normally re-signs it long before that, so it is not running, or "
                "what it publishes does not reach them."
            )
        return (
            f"{who}: its signed timestamp expires at {expires}",
            happened,
            "The devices keep serving what they run; edgekit signs nothing new while the service is down.",
            "Check that the fleet service (`edgekit fleet serve` or `fleet up`) is running and reaches "
            f"the broker; run `edgekit trust refresh --fleet {fleet_name}` to sign and publish a fresh "
            "timestamp now.",
        )
    if rule == "channel":
        name = facts.get("channel")
        return (
            f"Alerts cannot reach channel {name}",
            f"Every message to channel {name} has failed since {at}.",
            "edgekit keeps retrying, and meanwhile sends alerts through the other channels.",
            "Run `edgekit alerts test` to see the error; fix the address or password with "
            "`edgekit alerts channel remove` and `add`.",
        )
    return (f"{who}: {rule}", f"{who}: {rule} since {at}.", "", "")


def render(
    *,
    alert_id: int,
    rule: str,
    event: str,
    fleet: str | None,
    device: str | None,
    since: datetime,
    facts: Mapping[str, Any],
    now: datetime,
    link_base: str | None,
) -> dict[str, Any]:
    """The message of an alert that ``event`` ("opened" or "resolved"): subject, text, JSON."""
    who = device or (f"fleet {fleet}" if fleet else "edgekit")
    title, happened, did, todo = _words(rule, facts, who, since)
    link = link_for(link_base, device)
    where = f" (fleet {fleet})" if fleet and device else ""
    if event == "resolved":
        lasted = _duration((now - since).total_seconds())
        over = _resolved_title(rule, who, facts)
        subject = f"Resolved: {over}"
        flaps = int(facts.get("flaps") or 0)
        body = [
            f"{over}{where} at {_clock(now)}, after {lasted}.",
            f"Earlier: {happened}",
            f"It came and went {flaps} more times before it settled." if flaps else "",
        ]
    else:
        subject = title
        body = [happened + (f" It belongs to fleet {fleet}." if fleet and device else ""), did, todo]
    if link:
        body.append(f"Open the dashboard: {link}")
    text = "\n\n".join(line for line in body if line)
    doc = {
        "schema": ALERT_SCHEMA,
        "schema_version": ALERT_SCHEMA_VERSION,
        "event": event,
        "alert": {
            "id": alert_id,
            "rule": rule,
            "fleet": fleet,
            "device": device,
            "since": iso(since),
            "at": iso(now),
            "title": subject,
            "what_happened": happened,
            "what_edgekit_did": did,
            "what_you_can_do": todo,
            "facts": dict(facts),
            "link": link,
        },
        "text": f"{subject}\n{text}",
    }
    return {"subject": f"[edgekit] {subject}", "text": text, "json": doc}


def _resolved_title(rule: str, who: str, facts: Mapping[str, Any]) -> str:
    if rule == "drift":
        if facts.get("severity") == "model affected":
            return f"{who}: its model no longer looks affected by drift"
        return f"{who}: inputs look like the training data again"
    if rule == "rollout":
        label = facts.get("label", "the new version")
        if facts.get("stalled"):
            return f"{who}: the rollout of {label} moved on"
        return f"{who}: a new rollout replaced the stopped rollout of {label}"
    return {
        "offline": f"{who} is back online",
        "install": f"{who} installed an update successfully",
        "latency": f"{who} answers as fast as usual again",
        "errors": f"{who}'s error rate is back to usual",
        "board": f"{who}'s board is back to normal",
        "channel": f"Alerts reach channel {facts.get('channel')} again",
        "expiry": f"{who} has fresh signed instructions",
        "freeze": f"{who} has fresh word from the fleet again",
        "old_root": f"{who} trusts the fleet's current root",
        "trust_expiry": f"{who}'s devices have a fresh signed timestamp",
    }.get(rule, f"{who}: {rule} is over")


def digest_message(held: Sequence[Mapping[str, Any]], now: datetime, per_hour: int) -> dict[str, Any]:
    """One message for the ``held`` messages beyond the hourly limit of a channel."""
    lines = [f"- {m.get('subject', '').removeprefix('[edgekit] ')}" for m in held[:50]]
    if len(held) > 50:
        lines.append(f"- ... and {len(held) - 50} more")
    intro = (
        f"{len(held)} more alert messages came up after this channel reached its limit of "
        f"{per_hour} messages an hour. Here they are in one message; the dashboard lists them all "
        "(`edgekit alerts list --open`)."
    )
    text = intro + "\n\n" + "\n".join(lines)
    subject = f"Digest: {len(held)} more alert messages"
    doc = {
        "schema": ALERT_SCHEMA,
        "schema_version": ALERT_SCHEMA_VERSION,
        "event": "digest",
        "digest": [m.get("json", {}).get("alert", {}) for m in held],
        "at": iso(now),
        "text": f"{subject}\n{text}",
    }
    return {"subject": f"[edgekit] {subject}", "text": text, "json": doc}


def test_message(channel: str, now: datetime, link_base: str | None) -> dict[str, Any]:
    """What ``edgekit alerts test`` sends."""
    text = f"This is a test from edgekit at {_clock(now)}: alerts reach you through channel {channel}."
    link = link_for(link_base, None)
    if link:
        text += f"\n\nOpen the dashboard: {link}"
    subject = "Test alert"
    doc = {
        "schema": ALERT_SCHEMA,
        "schema_version": ALERT_SCHEMA_VERSION,
        "event": "test",
        "at": iso(now),
        "text": f"{subject}\n{text}",
    }
    return {"subject": f"[edgekit] {subject}", "text": text, "json": doc}
