#!/usr/bin/env bash
# The libvirt daemons that `lab up --libvirt`, the libvirt driver's tests and the demo need, on a
# machine without systemd (as root):
#
#   bash scripts/libvirtd.sh start    # start virtlogd and libvirtd unless they run already
#   bash scripts/libvirtd.sh stop     # stop what `start` started (by PID), nothing else
#   bash scripts/libvirtd.sh status   # what runs, what `start` started, does qemu:///system answer
#
# `start` runs `virtlogd -d` and `libvirtd -d` only when that daemon is not running, waits until
# `virsh -c qemu:///system version` answers (at most FF_LIBVIRTD_WAIT seconds, default 30) and
# appends "NAME PID" of each daemon it started to the state file (FF_LIBVIRTD_STATE, default
# /run/freezeframe-libvirtd.pids). `stop` sends SIGTERM (SIGKILL after 10 s) to those PIDs only,
# each checked to still be that daemon, then empties the state file; daemons it did not start are
# left running. Several callers may share a state file (a lock serialises them); a test session
# passes a state file of its own so that it stops only what it started.
#
# Without udev, /dev/kvm stays root:root 0600: libvirt then finds KVM "not available now" for
# its QEMU user (libvirt-qemu) and probes QEMU's capabilities again on every domain start (about
# a minute each instead of ~0.5 s). `start` gives /dev/kvm what Debian's udev rule gives it,
# root:kvm 0660 (the QEMU user is in group kvm); the lab still probes whether KVM really works.
#
# Exit status: 0 done (status: libvirtd answers), 1 failed (status: libvirtd does not answer),
# 2 usage.
set -euo pipefail

STATE=${FF_LIBVIRTD_STATE:-/run/freezeframe-libvirtd.pids}
WAIT=${FF_LIBVIRTD_WAIT:-30}
URI=qemu:///system
DAEMONS=(virtlogd libvirtd)

say() { echo "libvirtd.sh: $*" >&2; }

# Whether PID $2 is the daemon $1: /proc/PID/comm is its name and it is not a zombie.
is_daemon() {
  local name=$1 pid=$2 comm state
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
  state=$(awk '/^State:/ {print $2}' "/proc/$pid/status" 2>/dev/null) || return 1
  [[ $comm == "$name" && $state != Z && $state != X ]]
}

# The PID of the running daemon $1 (its pid file, else the oldest process of that name), or
# nothing.
running_pid() {
  local name=$1 pid
  pid=$(cat "/run/$name.pid" 2>/dev/null || true)
  if is_daemon "$name" "$pid"; then
    echo "$pid"
    return
  fi
  pid=$(pgrep -o -x "$name" || true)
  if [[ -n $pid ]] && is_daemon "$name" "$pid"; then echo "$pid"; fi
}

answers() { timeout 10 virsh -c "$URI" version >/dev/null 2>&1; }

# /dev/kvm as Debian's udev rule leaves it (see the header).
kvm_device_mode() {
  [[ -c /dev/kvm ]] && getent group kvm >/dev/null || return 0
  if [[ $(stat -c '%G' /dev/kvm) != kvm || $(( 0$(stat -c '%a' /dev/kvm) & 060 )) -ne 48 ]]; then
    chgrp kvm /dev/kvm && chmod 0660 /dev/kvm && say "/dev/kvm set to root:kvm 0660 (as udev would)"
  fi
}

start() {
  local name pid deadline
  command -v libvirtd >/dev/null && command -v virtlogd >/dev/null || {
    say "libvirtd/virtlogd not installed (apt-get install -y --no-install-recommends libvirt-daemon-system libvirt-clients libvirt-daemon-driver-qemu)"
    exit 1
  }
  kvm_device_mode
  for name in "${DAEMONS[@]}"; do
    pid=$(running_pid "$name")
    if [[ -n $pid ]]; then
      say "$name already runs (pid $pid): left alone"
      continue
    fi
    "$name" -d 9>&- # the daemon must not inherit (and so hold) the lock
    deadline=$((SECONDS + WAIT))
    until pid=$(running_pid "$name") && [[ -n $pid ]]; do
      if ((SECONDS > deadline)); then say "$name did not start within ${WAIT}s"; exit 1; fi
      sleep 0.1
    done
    echo "$name $pid" >>"$STATE"
    say "$name started (pid $pid)"
  done
  deadline=$((SECONDS + WAIT))
  until answers; do
    if ((SECONDS > deadline)); then say "$URI does not answer after ${WAIT}s"; exit 1; fi
    sleep 0.2
  done
}

stop_pid() {
  local name=$1 pid=$2 i
  is_daemon "$name" "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    is_daemon "$name" "$pid" || { say "$name (pid $pid) stopped"; return 0; }
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  say "$name (pid $pid) killed after 10 s"
}

stop() {
  local name pid lines=() i
  [[ -s $STATE ]] || { say "nothing to stop: $STATE lists no daemon this script started"; return 0; }
  mapfile -t lines <"$STATE"
  # libvirtd before virtlogd: the reverse of the start order.
  for ((i = ${#lines[@]} - 1; i >= 0; i--)); do
    read -r name pid <<<"${lines[i]}"
    case $name in virtlogd | libvirtd) stop_pid "$name" "$pid" ;; esac
  done
  : >"$STATE"
}

status() {
  local name pid mine
  for name in "${DAEMONS[@]}"; do
    pid=$(running_pid "$name")
    mine=""
    if [[ -n $pid ]] && grep -qx "$name $pid" "$STATE" 2>/dev/null; then mine=" (started by this script)"; fi
    if [[ -n $pid ]]; then echo "$name: running (pid $pid)$mine"; else echo "$name: not running"; fi
  done
  if answers; then echo "$URI: answers"; else echo "$URI: does not answer"; return 1; fi
}

cmd=${1:-}
case $cmd in
  start | stop | status) ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
if [[ $(id -u) -ne 0 ]]; then
  say "run as root (qemu:///system)"
  exit 1
fi
mkdir -p "$(dirname "$STATE")"
exec 9>>"$STATE.lock"
flock 9
"$cmd"
