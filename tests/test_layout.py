"""The package layout design.md promises: one-way imports, light devices, Python 3.9."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("tensorflow", "keras", "edgekit.converters", "edgekit.fleet", "sklearn", "PIL")


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    return set(result.stdout.split())


@pytest.mark.parametrize(
    "statement",
    [
        "import edgekit.agent",
        "import edgekit.agent.cli",
        "import edgekit, edgekit.bundle, edgekit.trust, edgekit.runtime",
        "import edgekit.cli",
    ],
)
def test_device_and_sdk_imports_load_no_heavy_module(statement):
    loaded = _loaded_after(statement)
    heavy = sorted(m for m in loaded if m.split(".")[0] in HEAVY or m.startswith(HEAVY))
    assert not heavy, f"{statement} loaded {heavy[:5]}"


def test_only_the_mqtt_package_may_import_paho():
    """Within it, only the client and the paho subclasses; addresses, topic matching and packet
    framing are paho-free."""
    allowed = {REPO / "sdk" / "mqtt" / "client.py", REPO / "sdk" / "mqtt" / "_paho.py"}
    offenders = []
    for path in (REPO / "sdk").rglob("*.py"):
        text = path.read_text()
        if ("import paho" in text or "from paho" in text) and path not in allowed:
            offenders.append(str(path.relative_to(REPO)))
    for folder in ("agent", "converters", "fleet"):
        offenders += [
            str(p.relative_to(REPO)) for p in (REPO / folder).rglob("*.py") if "paho" in p.read_text()
        ]
    assert not offenders


def test_packages_import_each_other_one_way():
    """sdk imports none of agent/converters/fleet at module level; agent imports only the sdk."""
    rules = {
        "sdk": ("edgekit.agent", "edgekit.converters", "edgekit.fleet"),
        "agent": ("edgekit.converters", "edgekit.fleet", "tensorflow", "keras"),
        "fleet": ("edgekit.agent", "edgekit.converters", "tensorflow"),
    }
    offenders = []
    for folder, banned in rules.items():
        for path in (REPO / folder).rglob("*.py"):
            for line in path.read_text().splitlines():
                stripped = line.strip()
                if line.startswith(("import ", "from ")) and any(
                    stripped.startswith((f"import {b}", f"from {b}")) for b in banned
                ):
                    offenders.append(f"{path.relative_to(REPO)}: {stripped}")
    assert not offenders


def _python39() -> str | None:
    candidates = [os.environ.get("EDGEKIT_PY39", ""), shutil.which("python3.9") or ""]
    candidates += sorted(str(p) for p in Path.home().glob(".pyenv/versions/3.9*/bin/python3.9"))
    for candidate in candidates:
        if candidate and subprocess.run([candidate, "-V"], capture_output=True, check=False).returncode == 0:
            return candidate
    return None


def test_sdk_and_agent_compile_and_import_on_python_39(tmp_path):
    """Devices run older Pythons: every sdk/agent module must import under 3.9.

    The modules are laid out as the installed package would be and imported by a 3.9
    interpreter with the sdk's light dependencies from `make py39` (.venv-py39).
    """
    venv_python = REPO / ".venv-py39" / "bin" / "python"
    if not venv_python.exists():
        python39 = _python39()
        assert python39 is not None, "no Python 3.9 found; set EDGEKIT_PY39 to one"
        pytest.fail("run `make py39` (part of `make test`) to build .venv-py39 for this check")
    tree = tmp_path / "site"
    shutil.copytree(REPO / "sdk", tree / "edgekit")
    shutil.copytree(REPO / "agent", tree / "edgekit" / "agent")
    modules = [
        ".".join(("edgekit", *p.relative_to(tree / "edgekit").with_suffix("").parts)).replace(".__init__", "")
        for p in sorted((tree / "edgekit").rglob("*.py"))
    ]
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\nprint(sys.version)"
    result = subprocess.run(
        [str(venv_python), "-c", code, *modules],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(tree)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("3.9.")
