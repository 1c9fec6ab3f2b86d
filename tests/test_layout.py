"""The package layout design.md promises: one-way imports, light devices, Python 3.9."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

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


@pytest.mark.parametrize("statement", ["import edgekit.agent", "import edgekit.agent.cli"])
def test_the_device_side_loads_nothing_of_the_workstation(statement):
    loaded = _loaded_after(statement)
    banned = (*WORKSTATION, "pygments", "markdown_it")
    found = sorted(m for m in loaded if any(m == b or m.startswith(b + ".") for b in banned))
    assert not found, f"{statement} loaded {found[:8]}"


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


#: The workstation: what a device never imports (nor installs, with `pip install edgekit[agent]`).
WORKSTATION = (
    "edgekit.cli",
    "edgekit.converters",
    "edgekit.fleet",
    "edgekit.broker",
    "edgekit.provision",
    "typer",
    "click",
    "rich",
    "tensorflow",
    "keras",
)
#: Directory -> (its package, the modules it must not import, at any depth of its code).
RULES = {
    "sdk": ("edgekit", ("edgekit.agent", "edgekit.converters", "edgekit.fleet")),
    "agent": ("edgekit.agent", WORKSTATION),
    "fleet": ("edgekit.fleet", ("edgekit.agent", "edgekit.converters", "tensorflow")),
}


def _imports(path: Path, package: str) -> Iterator[tuple[int, str]]:
    """Every module ``path`` imports, anywhere in it (inside functions too), made absolute."""
    parts = package.split(".") + list(path.relative_to(REPO / path.relative_to(REPO).parts[0]).parts[:-1])
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = parts[: len(parts) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield node.lineno, base
            for alias in node.names:  # `from edgekit import cli` imports edgekit.cli
                yield node.lineno, f"{base}.{alias.name}"


def _offenders(folder: str, package: str, banned: tuple[str, ...]) -> list[str]:
    found = []
    for path in sorted((REPO / folder).rglob("*.py")):
        if folder == "sdk" and path.parent.name == "cli":
            continue  # the workstation's command may use the device side (`fleet simulate` runs agents)
        for line, module in _imports(path, package):
            if any(module == b or module.startswith(b + ".") for b in banned):
                found.append(f"{path.relative_to(REPO)}:{line}: {module}")
    return found


def test_packages_import_each_other_one_way():
    """sdk imports none of agent/converters/fleet; the agent none of the workstation; fleet not
    the agent; checked on every import statement of the code, also those inside functions."""
    offenders = [
        o for folder, (package, banned) in RULES.items() for o in _offenders(folder, package, banned)
    ]
    assert not offenders


def test_the_layout_check_sees_imports_inside_functions_and_relative_ones(tmp_path, monkeypatch):
    fake = tmp_path / "agent"
    fake.mkdir()
    (fake / "x.py").write_text("def f():\n    from ..cli import _app\n    import typer\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert _offenders("agent", "edgekit.agent", WORKSTATION) == [
        "agent/x.py:2: edgekit.cli",
        "agent/x.py:2: edgekit.cli._app",
        "agent/x.py:3: typer",
    ]


def test_a_device_install_brings_nothing_of_the_workstation():
    """`pip install edgekit[agent]` (and [agent-tflite]): the core dependencies and those extras
    name no command-line framework; the workstation's command is the `cli` extra."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    device = project["dependencies"] + extras["agent"] + extras["agent-tflite"]
    names = {re.split(r"[\s\[<>=!~;]", spec, maxsplit=1)[0].lower() for spec in device}
    assert not names & {"typer", "click", "rich", "pygments", "markdown-it-py", "edgekit"}
    assert {"typer", "click", "rich"} <= {re.split(r"[\s<>=]", s, maxsplit=1)[0] for s in extras["cli"]}


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
