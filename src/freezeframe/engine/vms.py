"""Registering VMs that a hypervisor already knows: libvirt domains by name, UUID or id.

Owns turning a libvirt domain into a :class:`~freezeframe.models.VmConfig` (resolved to its
UUID, which survives renames and restarts) and ``vm import``: every running domain of a
connection registered at once, with its agent setting read from the domain (an agent channel
is what ``hw_qemu_guest_agent=yes`` adds) and its policy from ``<freezeframe:policy>`` in the
domain's metadata when there is one. The libvirt module is loaded lazily: without
python3-libvirt these raise DependencyError naming the package.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from freezeframe.catalog import Catalog
from freezeframe.errors import AlreadyExistsError, UsageError
from freezeframe.hypervisor import load_driver
from freezeframe.models import VM_NAME_RE, QuiescePolicy, VmConfig

__all__ = ["ImportAction", "ImportResult", "import_libvirt", "libvirt_vm"]


class ImportAction(enum.StrEnum):
    """What ``vm import`` did with one domain (stable codes for ``--json``)."""

    ADDED = "added"
    REPLACED = "replaced"
    EXISTS = "exists"  # registered already (use --replace)
    NOT_RUNNING = "not-running"
    BAD_NAME = "bad-name"  # a domain name freezeframe cannot use as a VM name


@dataclass(frozen=True, slots=True)
class ImportResult:
    domain: str
    uuid: str
    action: ImportAction
    vm: VmConfig | None = None
    detail: str = ""


async def libvirt_vm(
    name: str,
    domain: str,
    uri: str,
    *,
    agent: bool = True,
    quiesce: QuiescePolicy = QuiescePolicy.PREFERRED,
    freeze_timeout: float = 10.0,
    agent_log_path: str | None = None,
    exclude_mounts: tuple[str, ...] = (),
) -> VmConfig:
    """The registration of libvirt domain ``domain`` (name, UUID or id) on ``uri`` as VM
    ``name``, resolved to the domain's UUID (it need not be running). Raises
    HypervisorUnavailableError (libvirtd unreachable, no such domain), DependencyError
    (python3-libvirt missing), UsageError (bad values)."""
    load_driver("libvirt")
    from freezeframe.hypervisor import libvirt as lv

    found = await lv.list_domains(uri, domain)
    cfg = VmConfig(
        name=name,
        driver="libvirt",
        connect_uri=uri,
        domain=found[0].uuid,
        agent=agent,
        quiesce=quiesce,
        freeze_timeout=freeze_timeout,
        agent_log_path=agent_log_path,
        exclude_mounts=exclude_mounts,
    )
    problems = cfg.problems()
    if problems:
        raise UsageError("; ".join(problems))
    return cfg


async def import_libvirt(
    catalog: Catalog, uri: str, *, replace: bool = False
) -> list[ImportResult]:
    """Register every running domain of ``uri`` under its own name. A domain already
    registered under another name (by its UUID: a lab VM's domain) is left alone, and one
    registered under its own name too unless ``replace`` (a lab VM never is). Raises as
    :func:`libvirt_vm`; per-domain outcomes are in the results."""
    load_driver("libvirt")
    from freezeframe.hypervisor import libvirt as lv

    vms = await catalog.list_vms()
    known = {v.name: v for v in vms}
    #: Domains registered already, under any name (a lab VM's domain is ff-lab-NAME).
    by_uuid = {v.domain: v for v in vms if v.driver == "libvirt" and v.domain}
    out: list[ImportResult] = []
    for d in await lv.list_domains(uri):
        if not d.running:
            out.append(ImportResult(d.name, d.uuid, ImportAction.NOT_RUNNING))
            continue
        if not VM_NAME_RE.fullmatch(d.name):
            out.append(ImportResult(d.name, d.uuid, ImportAction.BAD_NAME, detail=d.name))
            continue
        same = by_uuid.get(d.uuid)
        if same is not None and same.name != d.name:
            detail = f"registered as {same.name}" + (" (lab VM)" if same.lab else "")
            out.append(ImportResult(d.name, d.uuid, ImportAction.EXISTS, same, detail))
            continue
        old = known.get(d.name)
        if old is not None and (not replace or old.lab):
            out.append(
                ImportResult(d.name, d.uuid, ImportAction.EXISTS, old, "lab VM" if old.lab else "")
            )
            continue
        pol = d.policy
        cfg = VmConfig(
            name=d.name,
            driver="libvirt",
            connect_uri=uri,
            domain=d.uuid,
            agent=pol.agent if pol and pol.agent is not None else d.agent_channel,
            quiesce=pol.quiesce if pol and pol.quiesce else QuiescePolicy.PREFERRED,
            freeze_timeout=pol.freeze_timeout if pol and pol.freeze_timeout else 10.0,
        )
        try:
            await catalog.add_vm(cfg, replace=old is not None)
        except AlreadyExistsError:  # registered meanwhile by another process
            out.append(ImportResult(d.name, d.uuid, ImportAction.EXISTS, cfg))
            continue
        action = ImportAction.REPLACED if old is not None else ImportAction.ADDED
        out.append(ImportResult(d.name, d.uuid, action, cfg))
    return out
