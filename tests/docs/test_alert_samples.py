"""The message samples of docs/alerts.md are generated from the message code; they must match
the code that is committed, and cover every rule."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from edgekit.fleet.alerts import RULES

REPO = Path(__file__).resolve().parents[2]


def test_the_committed_alert_samples_match_the_message_code():
    result = subprocess.run(
        [sys.executable, str(REPO / "docs" / "gen_alert_samples.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr  # stale: run `make docs` and commit the result


def test_every_rule_has_a_sample_and_the_rollout_links_to_the_dashboard():
    sys.path.insert(0, str(REPO / "docs"))
    try:
        import gen_alert_samples
    finally:
        sys.path.remove(str(REPO / "docs"))
    assert {rule for _, rule, *_ in gen_alert_samples.SAMPLES} == set(RULES)
    text = (REPO / "docs" / "alerts.md").read_text()
    aborted = text.split("#### rollout aborted", 1)[1].split("#### ", 1)[0]
    assert "Open the dashboard: http://shop-laptop:8765/\n" in aborted
    assert '"schema": "edgekit.alert"' in text and "Subject: [edgekit] Digest: 3 more alert messages" in text
