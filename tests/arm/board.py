"""An emulated ARM board for the ARM lane (`make test-arm`): a Debian tree built with mmdebstrap
and run through qemu-user (binfmt_misc), driven from the host.

    python tests/arm/board.py check   # exit 0 when this machine can run the lane, else say why
    python tests/arm/board.py build   # build (or reuse) the cached tree and the arm64 wheels

The tree is Debian bookworm arm64 (the base of Raspberry Pi OS 64-bit: Python 3.11) with what
`examples/raspberry-pi/install.sh` needs (python3, python3-venv) and systemd (for
`systemd-nspawn --boot`). It is cached under ``~/.cache/edgekit/arm64-bookworm/<key>/`` (outside
the clone; ``EDGEKIT_ARM_CACHE`` moves it) where the key is a
hash of everything that goes in (suite, architecture, mirror, packages, options); a build is
written beside and renamed into place, so an interrupted one is never used. The wheels of
``edgekit[agent]``'s dependencies for arm64 / CPython 3.11 are fetched beside it (keyed by
pyproject.toml), so the tests install offline, as a board behind a firewall would.

Each test session runs on a copy of the tree. Commands run in it with ``unshare --mount`` +
``chroot`` (no systemd, no network namespace: the host's 127.0.0.1 is the board's), with its own
/proc, a Raspberry Pi 4's ``/proc/cpuinfo`` bound over it (``cpuinfo-pi4.txt``) and
``QEMU_CPU=cortex-a72`` (the Pi 4's core): see ``Board`` for why.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CPUINFO_PI4 = HERE / "cpuinfo-pi4.txt"
# Outside the clone, so a fresh clone on the same machine (CI) reuses the ~5 min tree build; the
# keys below make sharing it safe. EDGEKIT_ARM_CACHE moves it.
CACHE = Path(
    os.environ.get("EDGEKIT_ARM_CACHE")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgekit" / "arm64-bookworm"
)

SUITE = "bookworm"
ARCH = "arm64"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = ("python3", "python3-venv", "systemd", "systemd-sysv")
MMDEBSTRAP_OPTIONS = (
    "--variant=apt",
    # Nothing a board test reads; fewer files to unpack under emulation.
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
    '--aptopt=Acquire::Languages "none"',
    # No recommends: ca-certificates alone (one process per certificate) took minutes under qemu.
    '--aptopt=APT::Install-Recommends "false"',
)
PYTHON_VERSION = "3.11"  # bookworm's python3
WHEEL_PLATFORMS = tuple(
    f"manylinux{tag}_aarch64"
    for tag in ("2014", "_2_17", "_2_24", "_2_27", "_2_28", "_2_31", "_2_34", "_2_36")
)
QEMU_BINFMT = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")


def tree_key() -> str:
    recipe = {
        "suite": SUITE,
        "arch": ARCH,
        "mirror": MIRROR,
        "packages": PACKAGES,
        "options": MMDEBSTRAP_OPTIONS,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def wheels_key() -> str:
    recipe = {"pyproject": (REPO / "pyproject.toml").read_text(), "platforms": WHEEL_PLATFORMS}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def tree_dir() -> Path:
    return CACHE / f"tree-{tree_key()}"


def wheels_dir() -> Path:
    return CACHE / f"wheels-{wheels_key()}"


def missing() -> str | None:
    """Why this machine cannot run the lane, or None when it can."""
    if sys.platform != "linux":
        return "the ARM lane needs Linux (binfmt_misc, unshare, chroot)"
    if os.geteuid() != 0:
        return "the ARM lane needs root (mmdebstrap into a directory, chroot, mounts); run it as root"
    for tool, package in (
        ("mmdebstrap", "mmdebstrap"),
        ("unshare", "util-linux"),
        ("nsenter", "util-linux"),
        ("chroot", "coreutils"),
        ("systemd-nspawn", "systemd-container"),
    ):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install {package})"
    if not QEMU_BINFMT.exists():
        return (
            "no qemu-aarch64 binfmt_misc handler: apt-get install qemu-user-static binfmt-support, "
            "and mount binfmt_misc (mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc; "
            "update-binfmts --enable qemu-aarch64)"
        )
    text = QEMU_BINFMT.read_text()
    if not text.startswith("enabled"):
        return "the qemu-aarch64 binfmt_misc handler is disabled (update-binfmts --enable qemu-aarch64)"
    flags = next(
        (line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("flags:")), ""
    )
    if "F" not in flags:
        return (
            "the qemu-aarch64 binfmt_misc handler lacks the F flag (qemu must be preloaded to run "
            "inside a chroot): install Debian's qemu-user-static, not qemu-user-binfmt"
        )
    return None


def _log(message: str) -> None:
    print(f"arm-lane: {message}", file=sys.stderr, flush=True)


@contextmanager
def _cache_lock() -> Iterator[None]:
    """One builder at a time: clones on one machine share the cache."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build_tree() -> Path:
    """The cached tree, built first when missing (a few minutes: dpkg runs under emulation)."""
    with _cache_lock():
        return _build_tree()


def _build_tree() -> Path:
    target = tree_dir()
    if (target / ".complete").exists():
        return target / "root"
    for stale in CACHE.glob("tree-*"):  # older recipes, and builds that were cut off
        shutil.rmtree(stale, ignore_errors=True)
    partial = CACHE / f"tree-{tree_key()}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    _log(f"building Debian {SUITE} {ARCH} in {target} (mmdebstrap, dpkg under qemu)")
    start = time.monotonic()
    subprocess.run(
        [
            "mmdebstrap",
            "--quiet",
            f"--arch={ARCH}",
            f"--include={','.join(PACKAGES)}",
            *MMDEBSTRAP_OPTIONS,
            SUITE,
            str(partial / "root"),
            MIRROR,
        ],
        check=True,
    )
    (partial / ".complete").write_text(f"{time.monotonic() - start:.0f} s\n")
    partial.rename(target)
    _log(f"tree built in {time.monotonic() - start:.0f} s")
    return target / "root"


def fetch_wheels() -> Path:
    """The arm64 / CPython 3.11 wheels of edgekit[agent]'s dependencies (edgekit itself excluded:
    the tests build it from the current sources)."""
    with _cache_lock():
        return _fetch_wheels()


def _fetch_wheels() -> Path:
    target = wheels_dir()
    if (target / ".complete").exists():
        return target
    for stale in CACHE.glob("wheels-*"):
        shutil.rmtree(stale, ignore_errors=True)
    work = CACHE / "wheels.partial"
    shutil.rmtree(work, ignore_errors=True)
    (work / "self").mkdir(parents=True)
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(
        [*pip, "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(work / "self"), str(REPO)],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    (wheel,) = (work / "self").glob("edgekit-*.whl")
    platforms = [arg for platform in WHEEL_PLATFORMS for arg in ("--platform", platform)]
    subprocess.run(
        [
            *(*pip, "download", "--quiet", "--only-binary=:all:", *platforms),
            *("--python-version", PYTHON_VERSION, "--implementation", "cp", "-d", str(work)),
            f"{wheel}[agent]",
        ],
        check=True,
    )
    shutil.rmtree(work / "self")
    for own in work.glob("edgekit-*.whl"):
        own.unlink()
    (work / ".complete").touch()
    work.rename(target)
    return target


# Mounts made in a private mount namespace, so they vanish with the command.
_ENTER = r"""
set -e
root=$1 cpuinfo=$2 host=$3; shift 3
mount -t proc proc "$root/proc"
mount --bind "$cpuinfo" "$root/proc/cpuinfo"
mount --rbind /dev "$root/dev"
mount -t tmpfs tmpfs "$root/tmp"
mkdir -p "$root/host"
mount --bind "$host" "$root/host"
exec chroot "$root" "$@"
"""


@dataclass
class Board:
    """A copy of the tree to run commands in, as if on a Raspberry Pi 4 (64-bit OS).

    Two facts measured when the lane was built make the emulation faithful: LiteRT segfaults at
    model load unless /proc/cpuinfo describes an ARM CPU (qemu-user shows the host's), so a
    Pi 4's is bound over it; and with qemu's default CPU (``max``) LiteRT's int8 results were
    wrong, so the Pi 4's core is named (cortex-a72; a Pi 5 is cortex-a76). Timings under
    emulation mean nothing: this proves behaviour, not speed.

    ``host`` is a host directory seen as /host on the board (bundles in, results out).
    """

    root: Path
    host: Path
    cpu: str = "cortex-a72"
    cpuinfo: Path = CPUINFO_PI4
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def copy_of(cls, tree: Path, where: Path) -> Board:
        root = where / "root"
        subprocess.run(["cp", "-a", "--reflink=auto", str(tree), str(root)], check=True)
        host = where / "host"
        host.mkdir()
        return cls(root, host)

    def command(self, args: Sequence[str]) -> list[str]:
        return [
            *("unshare", "--mount", "--propagation", "private", "--fork", "--kill-child"),
            *("bash", "-c", _ENTER, "enter", str(self.root), str(self.cpuinfo), str(self.host)),
            *args,
        ]

    def environment(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        return {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "QEMU_CPU": self.cpu,
            **self.env,
            **(extra or {}),
        }

    def run(
        self, *args: str, env: Mapping[str, str] | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """Run a command on the board to completion; the caller checks the outcome."""
        return subprocess.run(
            self.command(args),
            env=self.environment(env),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def popen(self, *args: str, log: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start a long-running command on the board, its output to ``log``."""
        with log.open("wb") as out:
            return subprocess.Popen(
                self.command(args), env=self.environment(env), stdout=out, stderr=subprocess.STDOUT
            )

    def python(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """The agent's venv python (after install.sh) on the board."""
        return self.run("/opt/edgekit/bin/python", *args, timeout=timeout)


@dataclass(frozen=True)
class Installed:
    """The board after examples/raspberry-pi/install.sh ran on it."""

    board: Board
    result: subprocess.CompletedProcess[str]  # install.sh's


def main(argv: list[str]) -> int:
    if argv[1:] == ["check"]:
        reason = missing()
        if reason:
            print(reason)
            return 1
        return 0
    if argv[1:] == ["build"]:
        reason = missing()
        if reason:
            print(f"cannot build the ARM tree: {reason}", file=sys.stderr)
            return 1
        print(build_tree())
        print(fetch_wheels())
        return 0
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
