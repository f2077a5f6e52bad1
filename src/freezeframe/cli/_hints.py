"""The CLI's words for a remedy: :class:`~freezeframe.errors.Remedy` -> a command line.

The engine, the catalog and the service say what helps as data (an action, a VM, parameters);
this is the one place that spells it as ``freezeframe`` syntax. The API renders the same
remedies as its endpoints.
"""

from __future__ import annotations

from freezeframe.errors import Action, Remedy

__all__ = ["command", "render"]

_BASE = {
    Action.RECOVER: "freezeframe recover",
    Action.DOCTOR: "freezeframe doctor",
    Action.LIST_VMS: "freezeframe vm list",
    Action.LIST_SNAPSHOTS: "freezeframe snapshot list",
    Action.SHOW_SNAPSHOT: "freezeframe snapshot show",
    Action.VERIFY: "freezeframe snapshot verify",
    Action.LIST_IMAGES: "freezeframe vm images",
    Action.ADD_VM: "freezeframe vm add",
    Action.REMOVE_VM: "freezeframe vm remove",
    Action.IMPORT_LIBVIRT: "freezeframe vm import --libvirt",
    Action.LAB_UP: "freezeframe lab up",
    Action.LAB_DOWN: "freezeframe lab down",
}

#: Actions whose VM is a required argument (shown as ``VM`` when the remedy names none).
_NEEDS_VM = {
    Action.DOCTOR,
    Action.ADD_VM,
    Action.REMOVE_VM,
    Action.LAB_UP,
    Action.LAB_DOWN,
    Action.LIST_IMAGES,
}
#: Actions whose first argument is a parameter, not the VM (``snapshot show ID``).
_POSITIONAL = {Action.SHOW_SNAPSHOT: "id", Action.VERIFY: "id"}


#: Actions that are options of ``snapshot create VM``: the option each parameter becomes.
_CREATE_OPTIONS = {
    Action.EXCLUDE_DISK: ("disk", "--exclude-disk"),
    Action.EXCLUDE_MOUNT: ("mount", "--exclude-mount"),
    Action.SET_QUIESCE: ("quiesce", "--quiesce"),
}


def command(remedy: Remedy) -> str:
    """The command line of ``remedy`` (``freezeframe recover web1``); for FORCE the option."""
    if remedy.action is Action.FORCE:
        return "--force"
    if remedy.action in _CREATE_OPTIONS:
        param, option = _CREATE_OPTIONS[remedy.action]
        values = [v for v in remedy.params.get(param, "").split(",") if v] or ["VALUE"]
        opts = " ".join(f"{option} {v}" for v in values)
        return f"freezeframe snapshot create {remedy.vm or 'VM'} {opts}"
    words = [_BASE[remedy.action]]
    params = dict(remedy.params)
    if remedy.action in _POSITIONAL:
        words.append(params.pop(_POSITIONAL[remedy.action], "ID"))
    elif remedy.vm is not None:
        words.append(remedy.vm)
    elif remedy.action in _NEEDS_VM:
        words.append("VM")
    for name, value in params.items():
        words.append(f"--{name}" if value == "yes" else f"--{name} {value}")
    return " ".join(words)


def render(remedy: Remedy) -> str:
    """``remedy`` as the CLI says it: ``see `freezeframe vm list``` for a listing, ``add
    --force`` to repeat by force, ``run `freezeframe recover web1``` otherwise."""
    if remedy.action is Action.FORCE:
        return "add --force"
    listing = (Action.LIST_VMS, Action.LIST_SNAPSHOTS, Action.LIST_IMAGES, Action.SHOW_SNAPSHOT)
    verb = "see" if remedy.action in listing else "run"
    return f"{verb} `{command(remedy)}`"
