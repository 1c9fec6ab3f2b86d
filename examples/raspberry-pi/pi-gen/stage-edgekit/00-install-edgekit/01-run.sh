#!/bin/bash -e
# Install the edgekit agent into the image: the venv, the unit (enabled), and the device config
# dropped into files/ at build time, so the device comes up provisioned. pi-gen runs this on the
# build host; on_chroot runs install.sh inside the image (under qemu for a foreign arch).
# shellcheck disable=SC2154 # ROOTFS_DIR and on_chroot come from pi-gen's build.sh
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
files=$here/files
for needed in install.sh edgekit-agent.service agent.toml; do
	if [ ! -f "$files/$needed" ]; then
		echo "stage-edgekit: files/$needed is missing; see examples/raspberry-pi/README.md (Embedding in an image)" >&2
		exit 1
	fi
done

install -d -m 0755 "${ROOTFS_DIR}/tmp/edgekit-install"
cp "$files"/* "${ROOTFS_DIR}/tmp/edgekit-install/"
chmod 0600 "${ROOTFS_DIR}/tmp/edgekit-install/agent.toml"

# A wheel of edgekit in files/ is installed as it is; without one, pip takes edgekit from the index.
source_arg=""
for wheel in "$files"/edgekit-*.whl; do
	[ -f "$wheel" ] && source_arg="--source /tmp/edgekit-install/$(basename "$wheel")"
done

on_chroot <<CHROOT
bash /tmp/edgekit-install/install.sh --config /tmp/edgekit-install/agent.toml ${source_arg}
rm -rf /tmp/edgekit-install
CHROOT
