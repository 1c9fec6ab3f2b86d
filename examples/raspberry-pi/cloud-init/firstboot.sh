#!/usr/bin/env bash
# First boot: install and provision the edgekit agent from a folder on the boot partition
# (/boot/firmware/edgekit on Raspberry Pi OS Bookworm, /boot/edgekit before it), then remove
# the config from it: the FAT partition is readable by anyone who holds the SD card, and the
# config holds the device's broker password. cloud-init's user-data runs this; so can a
# one-shot unit on images without cloud-init. Safe to run again (it exits if nothing is left).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ ! -f "$here/agent.toml" ]; then
	echo "edgekit firstboot: no agent.toml in $here; nothing to do"
	exit 0
fi
args=(--config "$here/agent.toml")
for wheel in "$here"/edgekit-*.whl; do
	[ -f "$wheel" ] && args+=(--source "$wheel")
done
bash "$here/install.sh" "${args[@]}"
# install.sh copied the config and the TLS files it names to /etc/edgekit (mode 0600).
rm -f "$here/agent.toml" "$here"/*.pem
echo "edgekit firstboot: installed; the config was moved to /etc/edgekit/agent.toml"
