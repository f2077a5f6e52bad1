#!/usr/bin/env bash
# Set up freezeframe on a fresh Debian 12 machine (as root): the Debian packages the lab VM,
# the snapshot engine, the offline checks and the libvirt driver need (libvirtd is started by
# scripts/libvirtd.sh, not here), and a virtual environment in .venv created
# from Debian's /usr/bin/python3 with --system-site-packages (so python3-libvirt / python3-rbd
# import later). Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

DEB_PACKAGES=(
  qemu-system-x86 qemu-utils qemu-guest-agent qemu-block-extra
  busybox-static e2fsprogs xfsprogs dosfstools kmod cpio fuse3 util-linux mount
  python3 python3-venv python3-libvirt
  libvirt-daemon-system libvirt-clients libvirt-daemon-driver-qemu
  # the throw-away lab Ceph (`freezeframe lab ceph`) and the rbd backend (librbd/librados;
  # QEMU's rbd driver is in qemu-block-extra)
  ceph-mon ceph-osd ceph-mgr ceph-common python3-rbd python3-rados
  # the dashboard's browser test (Playwright drives Debian's /usr/bin/chromium)
  chromium fonts-dejavu-core
  # the catalog on PostgreSQL: the driver, and the server the tests start (tests/conftest.py,
  # scripts/postgres.sh); initdb/pg_ctl run from /usr/lib/postgresql/15/bin, no cluster is used
  python3-psycopg postgresql
)

missing=()
for p in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "setup: missing Debian packages: ${missing[*]} (run as root)" >&2
    exit 3
  fi
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The lab VM fetches Debian's kernel package with apt-get download: it needs the APT lists.
if [[ $(id -u) -eq 0 ]] && ! apt-cache show --no-all-versions linux-image-amd64 >/dev/null 2>&1; then
  echo "setup: apt-get update (the lab VM needs the linux-image-amd64 package lists)"
  apt-get update -qq
fi

if [[ ! -x .venv/bin/python ]]; then
  /usr/bin/python3 -m venv --system-site-packages .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
stamp=.venv/.freezeframe-installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
  .venv/bin/python -m pip install -q -e '.[dev,browser]'
  touch "$stamp"
fi
echo "setup: ok ($(.venv/bin/freezeframe --version 2>/dev/null || echo freezeframe))"
