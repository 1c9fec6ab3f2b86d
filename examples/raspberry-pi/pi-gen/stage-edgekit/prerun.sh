#!/bin/bash -e
# pi-gen runs this before the stage: start from the previous stage's root filesystem.
# shellcheck disable=SC2154 # ROOTFS_DIR and copy_previous come from pi-gen's build.sh
if [ ! -d "${ROOTFS_DIR}" ]; then
	copy_previous
fi
