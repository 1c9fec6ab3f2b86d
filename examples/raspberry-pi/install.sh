#!/usr/bin/env bash
# Install the edgekit device agent: a venv in /opt/edgekit, the config in /etc/edgekit/agent.toml,
# state in /var/lib/edgekit, and the systemd unit edgekit-agent.service. Safe to run again: it
# upgrades the agent, replaces the config only when given one, and restarts only what changed.
set -euo pipefail

usage() {
	cat <<'EOF'
Usage: sudo ./install.sh [--config DEVICE.toml] [options]

Installs the edgekit agent into a venv (LiteRT runtime: edgekit[agent]; where LiteRT has no
wheel it tries tflite-runtime: edgekit[agent-tflite], which has wheels for x86-64 only: 32-bit
armv7 boards have no TFLite runtime on the package index, see README.md), the config, and the
systemd unit edgekit-agent.service, then enables and starts it.

Options:
  --config FILE           agent config written by `edgekit device add` on the workstation;
                          copied to /etc/edgekit/agent.toml (mode 0600) with the TLS files it
                          names. Without it an existing /etc/edgekit/agent.toml is kept.
  --source SPEC           what pip installs: a wheel, a checkout, or a requirement such as
                          "edgekit==0.1.0" (default: this checkout if the script sits in one,
                          else "edgekit" from the package index)
  --prefix DIR            the venv (default /opt/edgekit)
  --python PYTHON         interpreter for the venv, 3.9 or newer (default python3)
  --system-site-packages  let the venv see apt's Python packages (python3-picamera2 on a Pi,
                          JetPack's OpenCV on a Jetson)
  --root DIR              install under DIR as if it were / (also: DESTDIR=DIR); systemctl is
                          told with --root and nothing is started. Paths in the unit point into
                          DIR so the tree can be checked in place (CI). For a device image use
                          the pi-gen stage, which runs this script inside the image.
  --no-start              install and enable, but do not start or restart the service
  -h, --help              this help

pip honours its usual environment, e.g. PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR for an offline install.
EOF
}

say() { printf '==> %s\n' "$*"; }
warn() { printf 'install.sh: warning: %s\n' "$*" >&2; }
die() {
	printf 'install.sh: error: %s\n' "$*" >&2
	exit 2
}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=${DESTDIR:-}
prefix=/opt/edgekit
config=""
source_spec=""
python=python3
system_site=0
start=1

need_value() {
	if [ $# -lt 2 ] || [ -z "$2" ]; then die "$1 needs a value (see --help)"; fi
}
while [ $# -gt 0 ]; do
	case "$1" in
	-h | --help)
		usage
		exit 0
		;;
	--config | --source | --prefix | --python | --root)
		need_value "$@"
		case "$1" in
		--config) config=$2 ;;
		--source) source_spec=$2 ;;
		--prefix) prefix=$2 ;;
		--python) python=$2 ;;
		--root) root=$2 ;;
		esac
		shift 2
		;;
	--config=* | --source=* | --prefix=* | --python=* | --root=*)
		value=${1#*=}
		[ -n "$value" ] || die "${1%%=*} needs a value (see --help)"
		case "$1" in
		--config=*) config=$value ;;
		--source=*) source_spec=$value ;;
		--prefix=*) prefix=$value ;;
		--python=*) python=$value ;;
		--root=*) root=$value ;;
		esac
		shift
		;;
	--system-site-packages)
		system_site=1
		shift
		;;
	--no-start)
		start=0
		shift
		;;
	*) die "unknown option '$1' (see --help)" ;;
	esac
done

case "$prefix" in
/*) ;;
*) die "--prefix must be an absolute path, not '$prefix'" ;;
esac
if [ -n "$root" ]; then
	mkdir -p "$root"
	root=$(cd "$root" && pwd)
	[ "$root" != / ] || root=""
fi
if [ -z "$root" ] && [ "$(id -u)" -ne 0 ]; then
	die "run as root (sudo $0 ...), or install into a directory with --root DIR"
fi
if [ -n "$config" ]; then
	[ -f "$config" ] || die "no config file '$config'; write one on the workstation with: edgekit device add DEVICE --fleet FLEET -o DEVICE.toml"
	config=$(cd "$(dirname "$config")" && pwd)/$(basename "$config")
fi

command -v "$python" >/dev/null 2>&1 || die "no '$python' on PATH; install Python 3.9+ (sudo apt-get install python3 python3-venv)"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 9))' ||
	die "$("$python" -V 2>&1) is too old; the agent needs Python 3.9 or newer (--python PYTHON)"
"$python" -c 'import ensurepip, venv' 2>/dev/null ||
	die "$python cannot create venvs; install python3-venv (sudo apt-get install python3-venv)"

if [ -z "$source_spec" ]; then
	if grep -qs '^name = "edgekit"' "$here/../../pyproject.toml"; then
		source_spec=$(cd "$here/../.." && pwd)
	else
		source_spec=edgekit
	fi
elif [ -e "$source_spec" ]; then
	source_spec=$(cd "$(dirname "$source_spec")" && pwd)/$(basename "$source_spec")
fi

venv=$root$prefix
etc=$root/etc/edgekit
unit_dir=$root/etc/systemd/system
unit=edgekit-agent.service

# -- the venv and the agent -------------------------------------------------------------------
if [ -x "$venv/bin/python" ]; then
	say "reusing the venv in $venv"
else
	say "creating a venv in $venv ($("$python" -V 2>&1))"
	venv_args=()
	[ "$system_site" -eq 0 ] || venv_args+=(--system-site-packages)
	mkdir -p "$(dirname "$venv")"
	"$python" -m venv "${venv_args[@]}" "$venv"
fi
pip=("$venv/bin/python" -m pip install --upgrade --disable-pip-version-check)
say "installing ${source_spec}[agent] (LiteRT runtime)"
if ! "${pip[@]}" "${source_spec}[agent]"; then
	warn "edgekit[agent] did not install (LiteRT has no wheel for $(uname -m) and $("$venv/bin/python" -V 2>&1)?); trying tflite-runtime"
	say "installing ${source_spec}[agent-tflite] (tflite-runtime, numpy<2)"
	"${pip[@]}" "${source_spec}[agent-tflite]" ||
		die "neither edgekit[agent] nor edgekit[agent-tflite] installed; see pip's messages above"
fi
runtime=$("$venv/bin/python" -c 'from edgekit.runtime import available_runtimes as a; print(" ".join(a()) or "none")')
[ "$runtime" != none ] || die "the agent installed but no TFLite runtime imports; see docs/agent.md"
say "agent $("$venv/bin/edgekit-agent" --version) with runtime(s): $runtime"
mkdir -p "$root/usr/local/bin"
ln -sfn "$venv/bin/edgekit-agent" "$root/usr/local/bin/edgekit-agent"

# -- the config -------------------------------------------------------------------------------
# `edgekit device add --tls` names its TLS files relative to the config: they travel with it.
tls_files() { sed -n 's/^[[:space:]]*\(ca\|cert\|key\)[[:space:]]*=[[:space:]]*"\([^"/]*\)".*/\2/p' "$1"; }

install -d -m 0755 "$etc"
changed=0
if [ -n "$config" ]; then
	check=$("$venv/bin/python" - "$config" <<'EOF'
import sys
from edgekit.agent import AgentConfig
from edgekit.errors import EdgekitError
try:
    config = AgentConfig.load(sys.argv[1])
except EdgekitError as exc:
    print(f"error: {exc}")
else:
    print(f"{config.device} {config.fleet} {config.state_dir}")
EOF
	)
	case "$check" in error:*) die "${check#error: }" ;; esac
	read -r device fleet state_dir <<<"$check"
	[ "$state_dir" = /var/lib/edgekit ] ||
		warn "the config keeps state in $state_dir; the unit grants the agent /var/lib/edgekit only (edgekit device add --state-dir)"
	if cmp -s "$config" "$etc/agent.toml"; then
		say "config for $device (fleet $fleet) is already in $etc/agent.toml"
	else
		say "config for $device (fleet $fleet) -> $etc/agent.toml (mode 0600)"
		install -m 0600 "$config" "$etc/agent.toml"
		changed=1
	fi
	while IFS= read -r name; do
		[ -n "$name" ] || continue
		[ -f "$(dirname "$config")/$name" ] || die "the config names $name, which is not beside it in $(dirname "$config")"
		cmp -s "$(dirname "$config")/$name" "$etc/$name" || changed=1
		install -m 0600 "$(dirname "$config")/$name" "$etc/$name"
	done < <(tls_files "$config")
elif [ -f "$etc/agent.toml" ]; then
	say "keeping the config in $etc/agent.toml"
else
	warn "no config yet: copy one (edgekit device add) to $etc/agent.toml, then: sudo systemctl enable --now $unit"
fi

# -- the systemd unit -------------------------------------------------------------------------
install -d -m 0755 "$unit_dir"
rendered=$(sed -e "s|/opt/edgekit/|$venv/|g" -e "s|/etc/edgekit/|$etc/|g" "$here/$unit")
if [ "$rendered" != "$(cat "$unit_dir/$unit" 2>/dev/null || true)" ]; then
	say "unit -> $unit_dir/$unit"
	printf '%s\n' "$rendered" >"$unit_dir/$unit"
	chmod 0644 "$unit_dir/$unit"
	changed=1
fi
# TLS files reach the service as credentials too, beside agent.toml, so relative names resolve.
dropin=$unit_dir/$unit.d/tls.conf
credentials=""
if [ -f "$etc/agent.toml" ]; then
	while IFS= read -r name; do
		[ -n "$name" ] && credentials="${credentials}LoadCredential=$name:$etc/$name"$'\n'
	done < <(tls_files "$etc/agent.toml")
fi
if [ -n "$credentials" ]; then
	text=$(printf '# Written by install.sh: the TLS files agent.toml names.\n[Service]\n%s' "$credentials")
	if [ "$text" != "$(cat "$dropin" 2>/dev/null || true)" ]; then
		install -d -m 0755 "$(dirname "$dropin")"
		printf '%s\n' "$text" >"$dropin"
		changed=1
	fi
elif [ -f "$dropin" ]; then
	rm -f "$dropin"
	changed=1
fi

if [ -n "$root" ]; then
	# Without systemd managing it, the state directory is ours to make.
	install -d -m 0700 "$root/var/lib/edgekit"
	if command -v systemctl >/dev/null 2>&1 && [ -f "$etc/agent.toml" ]; then
		systemctl --root="$root" enable "$unit" >/dev/null 2>&1 || warn "systemctl --root could not enable $unit"
	fi
	say "installed under $root (nothing started)"
	exit 0
fi
if ! command -v systemctl >/dev/null 2>&1; then
	install -d -m 0700 /var/lib/edgekit
	warn "no systemd here: run the agent yourself: $venv/bin/edgekit-agent run --config /etc/edgekit/agent.toml"
	exit 0
fi
[ -f "$etc/agent.toml" ] || exit 0
running=0
[ -d /run/systemd/system ] && running=1 # not in a chroot (pi-gen) or a container without systemd
[ "$running" -eq 0 ] || systemctl daemon-reload
systemctl enable "$unit"
if [ "$running" -eq 1 ] && [ "$start" -eq 1 ]; then
	if [ "$changed" -eq 1 ]; then
		say "restarting $unit"
		systemctl restart "$unit"
	else
		systemctl start "$unit"
	fi
	say "done: check with  edgekit-agent status --config /etc/edgekit/agent.toml  and  journalctl -u $unit -f"
else
	say "done: $unit is enabled and starts at the next boot"
fi
