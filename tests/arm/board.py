"""An emulated ARM board for the ARM lane (`make test-arm`): a Debian tree built with mmdebstrap
and run through qemu-user (binfmt_misc), driven from the host.

    python tests/arm/board.py check   # exit 0 when this machine can run the lane, else say why
    python tests/arm/board.py build   # build (or reuse) the cached trees and their wheels

The tree is Debian bookworm arm64 (the base of Raspberry Pi OS 64-bit: Python 3.11) with what
`examples/raspberry-pi/install.sh` needs (python3, python3-venv) and systemd (for
`systemd-nspawn --boot`). It is cached under ``~/.cache/edgekit/arm64-bookworm/<key>/`` (outside
the clone; ``EDGEKIT_ARM_CACHE`` moves it) where the key is a
hash of everything that goes in (suite, architecture, mirror, packages, options); a build is
written beside and renamed into place, so an interrupted one is never used. The wheels of
``edgekit[agent]``'s dependencies for arm64 / CPython 3.11 are fetched beside it (keyed by
pyproject.toml), so the tests install offline, as a board behind a firewall would.

The 32-bit board (``ARMHF``) is Debian bullseye armhf with Python 3.9 and Debian's numpy and
cryptography, cached the same way under ``~/.cache/edgekit/armhf-bullseye/``, with the armv7l
wheels of tflite-runtime 2.11.0 (and the two newer ones it shows cannot run there) and of
edgekit's pure-Python and orjson dependencies.

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
# A Raspberry Pi 5's (Cortex-A76: dot product, fp16), for the lane's Pi 5 run (QEMU_CPU=cortex-a76).
CPUINFO_PI5 = HERE / "cpuinfo-pi5.txt"
# A Raspberry Pi 3's on the 32-bit OS (armv7l kernel), for the armhf board.
CPUINFO_PI3_ARMV7 = HERE / "cpuinfo-pi3-armv7.txt"
# Outside the clone, so a fresh clone on the same machine (CI) reuses the ~5 min tree build; the
# keys below make sharing it safe. EDGEKIT_ARM_CACHE moves it.
CACHE = Path(
    os.environ.get("EDGEKIT_ARM_CACHE")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgekit" / "arm64-bookworm"
)

MIRROR = "http://deb.debian.org/debian"
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


@dataclass(frozen=True)
class Recipe:
    """A Debian tree for one emulated board, cached in ``cache`` (keyed by everything that goes
    in), and the wheels its tests install offline, fetched beside it."""

    cache: Path
    suite: str
    arch: str
    packages: tuple[str, ...]
    qemu: str  # the binfmt_misc handler: qemu-aarch64, qemu-arm
    python_version: str  # the suite's python3
    wheel_platforms: tuple[str, ...]
    #: What the wheels are, each fetched without its dependencies; empty: edgekit[agent] and all
    #: its dependencies (arm64).
    wheel_requirements: tuple[str, ...] = ()

    def tree_key(self) -> str:
        recipe = {
            "suite": self.suite,
            "arch": self.arch,
            "mirror": MIRROR,
            "packages": self.packages,
            "options": MMDEBSTRAP_OPTIONS,
        }
        return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]

    def wheels_key(self) -> str:
        recipe: dict[str, object] = {
            "pyproject": (REPO / "pyproject.toml").read_text(),
            "platforms": self.wheel_platforms,
        }
        if self.wheel_requirements:  # (absent for arm64: its cached wheels keep their key)
            recipe["requirements"] = self.wheel_requirements
        return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]

    def tree_dir(self) -> Path:
        return self.cache / f"tree-{self.tree_key()}"

    def wheels_dir(self) -> Path:
        return self.cache / f"wheels-{self.wheels_key()}"

    @property
    def binfmt(self) -> Path:
        return Path("/proc/sys/fs/binfmt_misc") / self.qemu


ARM64 = Recipe(
    cache=CACHE,
    suite="bookworm",
    arch="arm64",
    packages=("python3", "python3-venv", "systemd", "systemd-sysv"),
    qemu="qemu-aarch64",
    python_version="3.11",  # bookworm's python3
    wheel_platforms=tuple(
        f"manylinux{tag}_aarch64"
        for tag in ("2014", "_2_17", "_2_24", "_2_27", "_2_28", "_2_31", "_2_34", "_2_36")
    ),
)

#: The 32-bit board: Debian bullseye armhf (Raspberry Pi OS 32-bit "Legacy" is bullseye; Python
#: 3.9, the only 32-bit Python with a tflite-runtime wheel on the index besides 3.10) with
#: Debian's numpy (1.19.5) and cryptography (3.3.2), of which the index has no armv7l wheels,
#: and tflite-runtime 2.11.0, the newest armv7l wheel that runs with them. Cached beside the
#: arm64 tree (``EDGEKIT_ARM_CACHE`` moves both: this one goes to its sibling ``armhf-bullseye``).
ARMHF_TFLITE = "tflite-runtime==2.11.0"
#: The two newer armv7l wheels, which cannot run there (the lane shows why): 2.12.0 needs a
#: newer libstdc++ than bullseye's (GLIBCXX_3.4.29), 2.13.0 numpy's C API 0xe (Debian's 1.19.5 is 0xd).
ARMHF_TFLITE_NEWER = ("tflite-runtime==2.12.0", "tflite-runtime==2.13.0")
ARMHF = Recipe(
    cache=CACHE.with_name("armhf-bullseye"),
    suite="bullseye",
    arch="armhf",
    packages=("python3", "python3-venv", "python3-numpy", "python3-cryptography"),
    qemu="qemu-arm",
    python_version="3.9",
    wheel_platforms=(
        "linux_armv7l",
        "manylinux2014_armv7l",
        "manylinux_2_17_armv7l",
        "manylinux_2_31_armv7l",
    ),
    wheel_requirements=(
        ARMHF_TFLITE,
        *ARMHF_TFLITE_NEWER,
        # edgekit's other dependencies on a 3.9 device (tuf and securesystemslib are 3.10+ only).
        "paho-mqtt>=2.2,<2.3",
        "orjson>=3.9",
        "tomli>=2.0",
    ),
)

# The arm64 names the lane started with.
SUITE, ARCH, PACKAGES, PYTHON_VERSION = ARM64.suite, ARM64.arch, ARM64.packages, ARM64.python_version
WHEEL_PLATFORMS = ARM64.wheel_platforms
QEMU_BINFMT = ARM64.binfmt


def tree_key() -> str:
    return ARM64.tree_key()


def wheels_key() -> str:
    return ARM64.wheels_key()


def tree_dir() -> Path:
    return ARM64.tree_dir()


def wheels_dir() -> Path:
    return ARM64.wheels_dir()


def missing(recipe: Recipe = ARM64) -> str | None:
    """Why this machine cannot run the lane's ``recipe`` board, or None when it can."""
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
    qemu = recipe.qemu
    if not recipe.binfmt.exists():
        return (
            f"no {qemu} binfmt_misc handler: apt-get install qemu-user-static binfmt-support, "
            "and mount binfmt_misc (mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc; "
            f"update-binfmts --enable {qemu})"
        )
    text = recipe.binfmt.read_text()
    if not text.startswith("enabled"):
        return f"the {qemu} binfmt_misc handler is disabled (update-binfmts --enable {qemu})"
    flags = next(
        (line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("flags:")), ""
    )
    if "F" not in flags:
        return (
            f"the {qemu} binfmt_misc handler lacks the F flag (qemu must be preloaded to run "
            "inside a chroot): install Debian's qemu-user-static, not qemu-user-binfmt"
        )
    return None


def _log(message: str) -> None:
    print(f"arm-lane: {message}", file=sys.stderr, flush=True)


@contextmanager
def _cache_lock(cache: Path) -> Iterator[None]:
    """One builder at a time: clones on one machine share the cache."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build_tree(recipe: Recipe = ARM64) -> Path:
    """The cached tree, built first when missing (a few minutes: dpkg runs under emulation)."""
    with _cache_lock(recipe.cache):
        return _build_tree(recipe)


def _build_tree(recipe: Recipe) -> Path:
    target = recipe.tree_dir()
    if (target / ".complete").exists():
        return target / "root"
    for stale in recipe.cache.glob("tree-*"):  # older recipes, and builds that were cut off
        shutil.rmtree(stale, ignore_errors=True)
    partial = recipe.cache / f"tree-{recipe.tree_key()}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    _log(f"building Debian {recipe.suite} {recipe.arch} in {target} (mmdebstrap, dpkg under qemu)")
    start = time.monotonic()
    subprocess.run(
        [
            "mmdebstrap",
            "--quiet",
            f"--arch={recipe.arch}",
            f"--include={','.join(recipe.packages)}",
            *MMDEBSTRAP_OPTIONS,
            recipe.suite,
            str(partial / "root"),
            MIRROR,
        ],
        check=True,
    )
    (partial / ".complete").write_text(f"{time.monotonic() - start:.0f} s\n")
    partial.rename(target)
    _log(f"tree built in {time.monotonic() - start:.0f} s")
    return target / "root"


def fetch_wheels(recipe: Recipe = ARM64) -> Path:
    """The wheels the board's tests install offline (edgekit itself excluded: the tests build it
    from the current sources). arm64: edgekit[agent]'s dependencies for CPython 3.11; armhf: the
    recipe's ``wheel_requirements`` for CPython 3.9, without dependencies (numpy and
    cryptography are Debian's)."""
    with _cache_lock(recipe.cache):
        return _fetch_wheels(recipe)


def _fetch_wheels(recipe: Recipe) -> Path:
    target = recipe.wheels_dir()
    if (target / ".complete").exists():
        return target
    for stale in recipe.cache.glob("wheels-*"):
        shutil.rmtree(stale, ignore_errors=True)
    work = recipe.cache / "wheels.partial"
    shutil.rmtree(work, ignore_errors=True)
    (work / "self").mkdir(parents=True)
    pip = [sys.executable, "-m", "pip"]
    platforms = [arg for platform in recipe.wheel_platforms for arg in ("--platform", platform)]
    download = [
        *(*pip, "download", "--quiet", "--only-binary=:all:", *platforms),
        *("--python-version", recipe.python_version, "--implementation", "cp", "-d", str(work)),
    ]
    if recipe.wheel_requirements:
        for requirement in recipe.wheel_requirements:  # one by one: two tflite-runtime versions
            subprocess.run([*download, "--no-deps", requirement], check=True)
    else:
        subprocess.run(
            [
                *pip,
                "wheel",
                "--quiet",
                "--no-deps",
                "--no-build-isolation",
                "-w",
                str(work / "self"),
                str(REPO),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        (wheel,) = (work / "self").glob("edgekit-*.whl")
        subprocess.run([*download, f"{wheel}[agent]"], check=True)
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
        reason = missing(ARMHF)
        if reason:  # the armhf tests say SKIPPED with the reason
            print(f"not building the armhf tree: {reason}", file=sys.stderr)
            return 0
        print(build_tree(ARMHF))
        print(fetch_wheels(ARMHF))
        return 0
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
