#!/usr/bin/env bash
# Set up everything (scripts/setup.sh) and show the main job on the built-in lab VM:
# boot a 2-disk guest (ext4 + xfs, a writer workload, the real qemu-ga), ask `doctor`, take a
# quiesced snapshot (--quiesce required) and verify it offline, take a second one (a chain),
# show the record; then the same guest as a libvirt domain (libvirtd started by
# scripts/libvirtd.sh if it is not running): doctor, a quiesced snapshot through libvirt's API,
# `virsh domblklist` naming the new overlays; then stop everything it started.
# KEEP=1 leaves the VMs (and libvirtd) running for you to play with.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
name=${DEMO_VM:-demo}

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
lvname="${name}-lv"
cleanup() {
  [[ ${KEEP:-0} == 1 ]] && return
  freezeframe lab down "$name" --purge >/dev/null 2>&1 || true
  freezeframe lab down "$lvname" --purge >/dev/null 2>&1 || true
  bash scripts/libvirtd.sh stop >/dev/null 2>&1 || true   # only what this demo started
}
trap cleanup EXIT

step "freezeframe lab up $name --disks ext4,xfs   (first run builds the guest: ~1 min)"
freezeframe lab down "$name" --purge >/dev/null 2>&1 || true
freezeframe lab up "$name" --disks ext4,xfs
step "freezeframe doctor $name"
freezeframe doctor "$name"
step "freezeframe snapshot create $name --quiesce required --verify"
freezeframe snapshot create "$name" --quiesce required --verify
step "freezeframe snapshot create $name --quiesce off   (crash-consistent, for contrast)"
freezeframe snapshot create "$name" --quiesce off --verify || echo "(exit $? = weaker than asked / not verified consistent, as expected)"
step "freezeframe snapshot list $name"
freezeframe snapshot list "$name"

step "bash scripts/libvirtd.sh start   (virtlogd + libvirtd, only if not running: no systemd here)"
bash scripts/libvirtd.sh start
step "freezeframe lab up $lvname --libvirt --disks ext4,xfs   (a transient libvirt domain)"
freezeframe lab down "$lvname" --purge >/dev/null 2>&1 || true
freezeframe lab up "$lvname" --libvirt --disks ext4,xfs
step "freezeframe doctor $lvname"
freezeframe doctor "$lvname"
step "virsh domblklist ff-lab-$lvname   (before)"
virsh -c qemu:///system domblklist "ff-lab-$lvname"
step "freezeframe snapshot create $lvname --quiesce required --verify   (through libvirt's API)"
freezeframe snapshot create "$lvname" --quiesce required --verify
step "virsh domblklist ff-lab-$lvname   (after: libvirt switched the disks itself)"
virsh -c qemu:///system domblklist "ff-lab-$lvname"
if [[ ${KEEP:-0} == 1 ]]; then
  echo; echo "VMs $name and $lvname keep running; stop them with:"
  echo "  .venv/bin/freezeframe lab down $name --purge; .venv/bin/freezeframe lab down $lvname --purge"
  echo "  bash scripts/libvirtd.sh stop   (stops libvirtd only if this demo started it)"
fi
