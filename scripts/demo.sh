#!/usr/bin/env bash
# Set up everything (scripts/setup.sh) and show the main job on the built-in lab VM:
# boot a 2-disk guest (ext4 + xfs, a writer workload, the real qemu-ga), ask `doctor`, take a
# quiesced snapshot (--quiesce required) and verify it offline, take a second one (a chain),
# show the record, then stop the VM. KEEP=1 leaves the VM running for you to play with.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
name=${DEMO_VM:-demo}

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
cleanup() { [[ ${KEEP:-0} == 1 ]] || freezeframe lab down "$name" --purge >/dev/null 2>&1 || true; }
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
if [[ ${KEEP:-0} == 1 ]]; then
  echo; echo "VM $name keeps running; stop it with: .venv/bin/freezeframe lab down $name --purge"
fi
