"""The built-in lab VM: a real Debian kernel with busybox, the real qemu-guest-agent and a
writer workload on qcow2 data disks, booted under QEMU for tests, benchmarks and demos.

Public API (the CLI ``freezeframe lab`` is a thin layer over it):

- ``await lab_up(name, *, disks=("ext4", "xfs"), disk_size="256M", agent=None,
  accel="auto", timeout=60.0, adopt=False, driver=None) -> LabVm`` (``driver``: ``qmp``, the
  default, or ``libvirt``: a transient libvirt domain)
- ``await lab_down(name, *, purge=False) -> None``
- ``lab_list() -> list[LabVm]``, ``lab_status(name) -> LabVm``
- :class:`LabVm`, :class:`LabDisk`; the workload helpers are in :mod:`freezeframe.lab.workload`.
- Checking a request before anything starts: ``parse_disks("ext4,xfs")``, ``parse_size("256M")``,
  ``validate_timeout(60.0)`` (each raises UsageError); ``libvirt_agent_address(uuid, uri)``, the
  agent address a lab VM on libvirt is registered with.
- The throw-away single-node Ceph (``freezeframe lab ceph``): ``await ceph_up(*, paxos=None,
  mgr=None, port=None, timeout=60.0) -> CephLab``, ``await ceph_down(*, purge=False) ->
  CephDown``, ``ceph_status() -> CephLab`` (``_ceph``).

Internals: ``_build`` (kernel, modules, initramfs, cache), ``_disks`` (qcow2 data disks),
``_qemu`` (command line, accelerator probe, stopping by PID), ``_libvirt`` (the transient
libvirt domain: XML, create / destroy, permissions), ``_vm`` (lifecycle), the guest scripts in
``guest/``.
"""

from __future__ import annotations

from freezeframe.lab._build import cache_dir
from freezeframe.lab._ceph import POOL as LAB_CEPH_POOL
from freezeframe.lab._ceph import CephDown, CephLab, ceph_down, ceph_status, ceph_up
from freezeframe.lab._model import (
    FILESYSTEMS,
    LabDisk,
    LabVm,
    libvirt_agent_address,
    parse_disks,
    parse_size,
    validate_timeout,
)
from freezeframe.lab._vm import lab_down, lab_list, lab_status, lab_up, set_boot_images

__all__ = [
    "FILESYSTEMS",
    "LAB_CEPH_POOL",
    "CephDown",
    "CephLab",
    "LabDisk",
    "LabVm",
    "cache_dir",
    "ceph_down",
    "ceph_status",
    "ceph_up",
    "lab_down",
    "lab_list",
    "lab_status",
    "lab_up",
    "libvirt_agent_address",
    "parse_disks",
    "parse_size",
    "set_boot_images",
    "validate_timeout",
]
