#!/usr/bin/env bash
# Set up everything (scripts/setup.sh) and show the main job on the built-in lab VM:
# boot a 2-disk guest (ext4 + xfs, a writer workload, the real qemu-ga), ask `doctor`, take a
# quiesced snapshot (--quiesce required) and verify it offline, take a second one (a chain),
# show the record; then the same guest as a libvirt domain (libvirtd started by
# scripts/libvirtd.sh if it is not running): doctor, a quiesced snapshot through libvirt's API,
# `virsh domblklist` naming the new overlays; then `freezeframe serve` (the REST API and the
# dashboard) on 127.0.0.1:${DEMO_PORT:-8787} (any free port if that one is taken), its URL, the
# file holding its token and one API call; then stop everything it started.
# KEEP=1 leaves the VMs, the server (and libvirtd) running for you to play with.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
name=${DEMO_VM:-demo}

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
lvname="${name}-lv"
serve_pid=
serve_log=$(mktemp /tmp/ff-demo-serve.XXXXXX)
cleanup() {
  [[ ${KEEP:-0} == 1 ]] && return
  if [[ -n $serve_pid ]]; then   # SIGTERM: it lets running snapshots finish, then exits
    kill -TERM "$serve_pid" 2>/dev/null || true
    wait "$serve_pid" 2>/dev/null || true
  fi
  rm -f "$serve_log"
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

# The lifecycle: export the first snapshot, delete the second by a live merge while the guest
# writes, restore the first (the lab VM restarts on it).
ids=($(freezeframe snapshot list "$name" --json | python3 -c 'import json,sys; print(*[s["id"] for s in json.load(sys.stdin)])'))
export_dir="$(mktemp -d)/export"
step "freezeframe snapshot export ${ids[0]} --to $export_dir   (standalone images + metadata.json)"
freezeframe snapshot export "${ids[0]}" --to "$export_dir"
step "freezeframe snapshot delete ${ids[1]}   (a live block-commit while the guest writes)"
freezeframe snapshot delete "${ids[1]}"
step "freezeframe snapshot restore ${ids[0]} --yes   (new overlays on the snapshot; the VM restarts)"
freezeframe snapshot restore "${ids[0]}" --yes
step "freezeframe vm images $name"
freezeframe vm images "$name"
rm -rf "$(dirname "$export_dir")"

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
# Starts `freezeframe serve --listen ADDR` in the background; 0 once it listens (its start line
# in $serve_log), 1 if it exited first.
start_serve() {
  freezeframe serve --listen "$1" >/dev/null 2>"$serve_log" &
  serve_pid=$!
  for _ in $(seq 100); do
    grep -q "listening on" "$serve_log" && return 0
    kill -0 "$serve_pid" 2>/dev/null || { wait "$serve_pid" || true; serve_pid=; return 1; }
    sleep 0.1
  done
  return 1
}
step "freezeframe serve --listen 127.0.0.1:${DEMO_PORT:-8787}   (REST API + dashboard)"
start_serve "127.0.0.1:${DEMO_PORT:-8787}" || start_serve "127.0.0.1:0" || {
  cat "$serve_log"; exit 1; }
line=$(grep -m1 "listening on" "$serve_log")
url=$(sed -E 's/.*listening on ([^ ]+) .*/\1/' <<<"$line")
token_file=$(sed -E 's/.*\(API token in (.*)\)$/\1/' <<<"$line")
echo "dashboard and API: $url   (pid $serve_pid)"
echo "token file:        $token_file   (log in to the dashboard with its content)"
step "curl -H \"Authorization: Bearer \$(cat $token_file)\" '${url}v1/vms/$name/snapshots?limit=2'"
curl -sS --max-time 10 -H "Authorization: Bearer $(cat "$token_file")" \
  "${url}v1/vms/$name/snapshots?limit=2"
echo

if [[ ${KEEP:-0} == 1 ]]; then
  echo; echo "freezeframe serve keeps running at $url: stop it with  kill $serve_pid"
  echo "VMs $name and $lvname keep running; stop them with:"
  echo "  .venv/bin/freezeframe lab down $name --purge; .venv/bin/freezeframe lab down $lvname --purge"
  echo "  bash scripts/libvirtd.sh stop   (stops libvirtd only if this demo started it)"
fi
