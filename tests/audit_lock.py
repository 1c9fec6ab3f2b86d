"""The dependency lock and its audit (`make lock`, `make audit`).

    python tests/audit_lock.py lock REPORT.json requirements.lock   # from `pip install --dry-run --report`
    python tests/audit_lock.py check AUDIT.json                     # pip-audit's JSON output

``check`` fails on any known vulnerability that is not in ``IGNORED`` (each with its reason),
and on any dependency pip-audit could not look up, unless ``AUDIT_ALLOW_UNREACHABLE=1``: then
it says loudly how many went unaudited and why, and passes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

#: Known vulnerabilities we accept, by id, with the reason. Empty: none is accepted.
IGNORED: dict[str, str] = {}


def lock(report: Path, out: Path) -> int:
    doc = json.loads(report.read_text())
    pins = sorted(
        (
            f"{item['metadata']['name']}=={item['metadata']['version']}"
            for item in doc["install"]
            if item["metadata"]["name"].lower() != "edgekit"
        ),
        key=str.lower,
    )
    header = (
        "# Every dependency of edgekit[all,dev], resolved and pinned by `make lock`; `make setup`\n"
        "# installs within these pins and `make audit` checks them against PyPI's vulnerability data.\n"
    )
    out.write_text(header + "\n".join(pins) + "\n")
    print(f"{out}: {len(pins)} pinned dependencies")
    return 0


def check(audit: Path) -> int:
    doc = json.loads(audit.read_text())
    found, skipped, audited = [], [], 0
    for dep in doc.get("dependencies", []):
        if "skip_reason" in dep:
            skipped.append(f"{dep['name']} ({dep['skip_reason']})")
            continue
        audited += 1
        for vuln in dep.get("vulns", []):
            if vuln["id"] in IGNORED or set(vuln.get("aliases", [])) & set(IGNORED):
                print(f"ignored {vuln['id']} in {dep['name']} {dep['version']}: {IGNORED.get(vuln['id'])}")
                continue
            fixed = ", ".join(vuln.get("fix_versions", [])) or "no fix yet"
            found.append(f"{dep['name']} {dep['version']}: {vuln['id']} (fixed in {fixed})")
    for line in found:
        print(f"VULNERABLE {line}")
    print(f"audited {audited} dependencies: {len(found)} known vulnerabilities; {len(skipped)} not looked up")
    if found:
        print("bump the pin in pyproject.toml and run `make lock`, or add the id to IGNORED with a reason")
        return 1
    if skipped:
        print(f"could not audit: {skipped[0]}{' ...' if len(skipped) > 1 else ''}")
        print(
            "the vulnerability data was unreachable (pip-audit asks pypi.org/pypi/NAME/VERSION/json, "
            "or api.osv.dev with -s osv)"
        )
        if os.environ.get("AUDIT_ALLOW_UNREACHABLE") == "1":
            print("AUDIT_ALLOW_UNREACHABLE=1: passing without that data")
            return 0
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "lock":
        sys.exit(lock(Path(sys.argv[2]), Path(sys.argv[3])))
    if len(sys.argv) == 3 and sys.argv[1] == "check":
        sys.exit(check(Path(sys.argv[2])))
    sys.exit(__doc__)
