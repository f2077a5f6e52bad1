"""Building the lab guest once and caching it: the Debian kernel, its modules, the initramfs.

Owns the build cache (``$FREEZEFRAME_CACHE``, else ``<state dir>/cache``) and the up-front
check of the host packages the lab needs (:data:`HOST_FILES`, :data:`HOST_PROGRAMS`).

- Kernel: the real package name is read from the ``linux-image-amd64`` metapackage's
  Depends, fetched with ``apt-get download`` and unpacked with ``dpkg -x`` into a scratch
  directory (nothing is installed on the host). ``depmod -b`` indexes it and
  ``modprobe --show-depends`` resolves :data:`GUEST_MODULES` with their dependencies in load
  order. Kept: ``vmlinuz``, its uncompressed ELF ``vmlinux`` (booted through the PVH entry
  when the kernel has ``CONFIG_PVH``: about 2 s faster under TCG), those ``.ko`` files and
  their order (``modules.list``), under ``kernel-<kver>_<debian version>-<layout hash>/``.
  The metapackage resolution (``apt-cache``, ~0.5 s) is remembered in ``kernel-resolve.json``
  until the APT lists change.
- Initramfs: busybox-static, the host's ``qemu-ga`` (Debian's qemu-guest-agent) with the
  shared libraries ``ldd`` reports (and the dynamic loader), the modules, and the guest
  scripts of ``freezeframe/lab/guest``; written as an uncompressed newc cpio named by a hash of
  kernel version + qemu-ga version + guest scripts.

Concurrent builders (several test sessions sharing one cache) serialise on ``cache/.lock``;
every artefact appears by an atomic rename, so a reader never sees half a file.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import lzma
import os
import re
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from freezeframe import paths
from freezeframe._tools import require, run
from freezeframe.errors import DependencyError, LabError, ToolError
from freezeframe.lab._cpio import CpioWriter
from freezeframe.lab._util import atomic_write, file_lock

__all__ = [
    "GUEST_DIR",
    "GUEST_MODULES",
    "HOST_FILES",
    "HOST_PROGRAMS",
    "MKFS_PROGRAMS",
    "BootArtifacts",
    "cache_dir",
    "check_dependencies",
    "ensure_artifacts",
]

log = logging.getLogger(__name__)

#: Files the guest is built from -> the Debian package that ships them.
HOST_FILES: dict[str, str] = {
    "/usr/sbin/qemu-ga": "qemu-guest-agent",
    "/bin/busybox": "busybox-static",
}
#: Programs the lab runs on the host -> the Debian package that ships them.
HOST_PROGRAMS: dict[str, str] = {
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "apt-get": "apt",
    "apt-cache": "apt",
    "dpkg": "dpkg",
    "dpkg-query": "dpkg",
    "depmod": "kmod",
    "modprobe": "kmod",
    "ldd": "libc-bin",
}
#: Filesystem -> (mkfs program, Debian package).
MKFS_PROGRAMS: dict[str, tuple[str, str]] = {
    "ext4": ("mkfs.ext4", "e2fsprogs"),
    "xfs": ("mkfs.xfs", "xfsprogs"),
    "vfat": ("mkfs.vfat", "dosfstools"),
}
#: Kernel modules the guest loads (their dependencies are resolved, not listed).
GUEST_MODULES: tuple[str, ...] = (
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "ext4",
    "xfs",
    "fat",
    "vfat",
    "nls_cp437",
    "nls_ascii",
    "nls_iso8859-1",
)
#: The guest scripts (``init``, ``ffwork``) shipped in the package.
GUEST_DIR = Path(__file__).with_name("guest")
#: Bump when the initramfs layout changes in a way the other key parts do not show.
_LAYOUT = "1"
#: Bump when what is kept of the kernel package changes (part of the kernel directory's name).
_KERNEL_LAYOUT = "2"
_META = "linux-image-amd64"
_DEP_RE = re.compile(r"(linux-image-(\d[\w.+~-]*-amd64))(?:\s*\(\s*=\s*([^)\s]+)\s*\))?")
_QGA = "/usr/sbin/qemu-ga"


@dataclass(frozen=True, slots=True)
class BootArtifacts:
    """What QEMU boots: the kernel image, the initramfs, and the kernel release."""

    kernel: Path
    initrd: Path
    kver: str


def cache_dir() -> Path:
    """``$FREEZEFRAME_CACHE`` if set, else ``<state dir>/cache`` (not created)."""
    env = os.environ.get("FREEZEFRAME_CACHE")
    return Path(env) if env else paths.state_dir() / "cache"


def check_dependencies(fstypes: tuple[str, ...] = ()) -> None:
    """Check up front that every host file and program the lab needs is there.

    Raises DependencyError naming the Debian package of the first missing one.
    """
    for file, package in HOST_FILES.items():
        if not os.access(file, os.X_OK):
            raise DependencyError(f"{file} is missing", package=package)
    programs = dict(HOST_PROGRAMS)
    for fstype in fstypes:
        program, package = MKFS_PROGRAMS[fstype]
        programs[program] = package
    for program, package in programs.items():
        require(program, package)


def _modules_hash() -> str:
    parts = (_KERNEL_LAYOUT, *GUEST_MODULES)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:8]


def _guest_scripts() -> dict[str, bytes]:
    scripts = {p.name: p.read_bytes() for p in sorted(GUEST_DIR.iterdir()) if p.is_file()}
    for needed in ("init", "ffwork"):
        if needed not in scripts:
            raise LabError(f"guest script {GUEST_DIR / needed} is missing (broken install?)")
    return scripts


def _apt_stamp() -> str:
    parts = []
    for path in ("/var/lib/apt/lists", "/var/cache/apt/pkgcache.bin", "/etc/apt/sources.list.d"):
        try:
            parts.append(f"{path}:{os.stat(path).st_mtime_ns}")
        except OSError:
            parts.append(f"{path}:-")
    return "|".join(parts)


def _remembered_resolution(cache: Path, stamp: str) -> tuple[str, str, str | None] | None:
    try:
        doc = json.loads((cache / "kernel-resolve.json").read_text())
        if doc["stamp"] == stamp:
            return str(doc["package"]), str(doc["kver"]), doc["version"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


async def _resolve_kernel_package(cache: Path) -> tuple[str, str, str | None]:
    """(package, kernel release, Debian version or None) of the current amd64 kernel."""
    stamp = _apt_stamp()
    remembered = _remembered_resolution(cache, stamp)
    if remembered:
        return remembered
    found = await _ask_apt()
    package, kver, version = found
    doc = {"stamp": stamp, "package": package, "kver": kver, "version": version}
    atomic_write(cache / "kernel-resolve.json", json.dumps(doc).encode())
    return found


async def _ask_apt() -> tuple[str, str, str | None]:
    res = await run(
        "apt-cache", "show", "--no-all-versions", _META, check=False, timeout=60, what="apt-cache"
    )
    for line in res.out.splitlines():
        if line.startswith(("Depends:", "Pre-Depends:")):
            m = _DEP_RE.search(line)
            if m:
                return m.group(1), m.group(2), m.group(3)
    raise LabError(
        f"cannot resolve the kernel package from {_META}'s Depends "
        f"(apt-cache: {res.err.strip() or 'no Depends'})",
        hint="run apt-get update",
    )


def _cached_kernels(cache: Path) -> list[Path]:
    found = [d for d in cache.glob("kernel-*") if (d / "complete").is_file()]
    return sorted(found, key=lambda d: d.stat().st_mtime, reverse=True)


async def _fetch_kernel(cache: Path, package: str, kver: str, version: str | None) -> Path:
    """Download, unpack and trim the kernel package into the cache; return its directory."""
    dest = cache / f"kernel-{kver}_{version or 'any'}-{_modules_hash()}"
    if (dest / "complete").is_file():
        return dest
    log.info("lab: fetching kernel package %s %s", package, version or "")
    scratch = Path(tempfile.mkdtemp(prefix=".kernel-", dir=cache))
    try:
        spec = f"{package}={version}" if version else package
        await run(
            "apt-get",
            "download",
            "-q",
            "-o",
            "APT::Sandbox::User=root",
            spec,
            cwd=str(scratch),
            timeout=600,
            what=f"apt-get download {spec}",
        )
        debs = _list_debs(scratch)
        if len(debs) != 1:
            raise LabError(f"apt-get download {spec} left {len(debs)} .deb files")
        root = scratch / "root"
        await run("dpkg", "-x", str(debs[0]), str(root), timeout=300, what="dpkg -x kernel")
        debs[0].unlink()
        vmlinuz = root / "boot" / f"vmlinuz-{kver}"
        moddir = root / "lib" / "modules" / kver
        if not vmlinuz.is_file() or not moddir.is_dir():
            raise LabError(f"{package} has no boot/vmlinuz-{kver} or lib/modules/{kver}")
        await run("depmod", "-b", str(root), kver, timeout=120, what="depmod")
        order: list[str] = []
        for module in GUEST_MODULES:
            res = await run(
                "modprobe",
                "--show-depends",
                "-d",
                str(root),
                "-S",
                kver,
                module,
                timeout=60,
                what=f"modprobe --show-depends {module}",
            )
            for line in res.out.splitlines():
                words = line.split()
                if len(words) >= 2 and words[0] == "insmod":
                    rel = str(Path(words[1]).relative_to(moddir))
                    if rel not in order:
                        order.append(rel)
                elif words and words[0] != "builtin":
                    raise LabError(f"unexpected modprobe output for {module}: {line!r}")
        staged = scratch / "kernel"
        (staged / "modules").mkdir(parents=True)
        shutil.copyfile(vmlinuz, staged / "vmlinuz")
        config = root / "boot" / f"config-{kver}"
        if config.is_file() and "\nCONFIG_PVH=y\n" in config.read_text(errors="replace"):
            await asyncio.to_thread(_extract_vmlinux, vmlinuz, staged / "vmlinux")
        for rel in order:
            target = staged / "modules" / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(moddir / rel, target)
        (staged / "modules.list").write_text("".join(f"{rel}\n" for rel in order))
        (staged / "kver").write_text(kver + "\n")
        (staged / "complete").write_text(f"{package} {version or ''}\n")
        os.replace(staged, dest)
        log.info("lab: kernel %s cached with %d modules", kver, len(order))
        return dest
    except (ToolError, OSError, ValueError) as exc:
        raise LabError(f"building the lab kernel from {package} failed: {exc}") from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _extract_vmlinux(bzimage: Path, dest: Path) -> None:
    """Write the uncompressed ELF kernel inside ``bzimage`` (xz or gzip) to ``dest``.

    QEMU boots such an ELF through its PVH entry point, skipping the bzImage's real-mode
    setup and self-decompression, which take about 2 s under TCG. Leaves ``dest`` absent if
    the payload is in another format (the bzImage is used then).
    """
    data = bzimage.read_bytes()
    for magic, fmt in ((b"\xfd7zXZ\x00", "xz"), (b"\x1f\x8b\x08", "gzip")):
        offset = data.find(magic)
        if offset < 0:
            continue
        try:
            if fmt == "xz":
                elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[offset:])
            else:
                elf = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data[offset:])
        except (lzma.LZMAError, zlib.error):
            continue
        if elf[:4] == b"\x7fELF":
            dest.write_bytes(elf)
            return
    log.info("lab: no xz/gzip ELF payload in %s; booting the bzImage", bzimage.name)


def _prune(cache: Path, keep: set[str]) -> None:
    """Remove superseded kernels and initramfs images (a running QEMU has loaded its own)."""
    for entry in cache.iterdir():
        if entry.name in keep or not entry.name.startswith(("kernel-", "initramfs-")):
            continue
        if entry.name.endswith(".json"):
            continue
        log.info("lab: pruning %s from the build cache", entry.name)
        if entry.is_symlink() or entry.is_file():
            entry.unlink(missing_ok=True)
        else:
            shutil.rmtree(entry, ignore_errors=True)


def _list_debs(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.deb"))


def _file_hash(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


async def _libraries(binary: str) -> list[str]:
    """Absolute paths of the shared libraries (and the loader) ``binary`` needs, per ldd."""
    res = await run("ldd", binary, timeout=30, what=f"ldd {binary}")
    libs: list[str] = []
    for line in res.out.splitlines():
        line = line.strip()
        if "=>" in line:
            target = line.split("=>", 1)[1].split("(")[0].strip()
            if target == "not found" or not target:
                raise LabError(f"{binary} needs a library that is not installed: {line}")
            libs.append(target)
        elif line.startswith("/"):
            libs.append(line.split("(")[0].strip())
    if not any("ld-linux" in lib for lib in libs):
        raise LabError(f"ldd {binary} reported no dynamic loader")
    return libs


async def _qga_version() -> str:
    res = await run(
        "dpkg-query", "-W", "-f", "${Version}", "qemu-guest-agent", check=False, what="dpkg-query"
    )
    if res.returncode == 0 and res.out.strip():
        return res.out.strip()
    # Not installed through dpkg: key on the binary itself.
    return _file_hash("/usr/sbin/qemu-ga")


def _write_initramfs(
    kdir: Path, kver: str, dest: Path, scripts: dict[str, bytes], qga: str, libs: list[str]
) -> None:
    buf = io.BytesIO()
    cpio = CpioWriter(buf)
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "run", "mnt", "root"):
        cpio.dir(d)
    cpio.dir("tmp", 0o1777)
    cpio.dir("dev")
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, 0o666)
    cpio.dir("var/log")
    cpio.symlink("var/run", "/run")
    cpio.dir("etc/qemu")
    cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    cpio.file("etc/group", b"root:x:0:\n")
    cpio.file("bin/busybox", Path("/bin/busybox").read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("init", scripts["init"], 0o755)
    for name, data in scripts.items():
        if name != "init":
            cpio.file(f"etc/fflab/{name}", data, 0o755)
    cpio.file("usr/sbin/qemu-ga", Path(qga).read_bytes(), 0o755)
    for lib in libs:
        cpio.file(lib, Path(lib).read_bytes(), 0o755)
    order = (kdir / "modules.list").read_text().split()
    for rel in order:
        cpio.file(f"lib/modules/{kver}/{rel}", (kdir / "modules" / rel).read_bytes())
    cpio.file("etc/fflab/modules", "".join(f"{kver}/{rel}\n" for rel in order).encode())
    cpio.close()
    atomic_write(dest, buf.getvalue())
    log.info("lab: initramfs %s built (%d KiB)", dest.name, len(buf.getvalue()) >> 10)


async def ensure_artifacts() -> BootArtifacts:
    """Return the cached kernel + initramfs, building whatever is missing.

    Raises LabError if the kernel cannot be resolved, fetched or unpacked or the initramfs
    cannot be written; DependencyError if a host program is missing.
    """
    cache = paths.ensure_dir(cache_dir())
    async with file_lock(cache / ".lock", timeout=900, what="the lab build cache"):
        try:
            package, kver, version = await _resolve_kernel_package(cache)
            kdir = await _fetch_kernel(cache, package, kver, version)
        except LabError:
            cached = _cached_kernels(cache)
            if not cached:
                raise
            kdir = cached[0]
            kver = (kdir / "kver").read_text().strip()
            log.warning("lab: cannot resolve the kernel package; using cached %s", kdir.name)
        scripts = _guest_scripts()
        key = hashlib.sha256()
        for part in (_LAYOUT, kdir.name, await _qga_version()):
            key.update(part.encode() + b"\0")
        for name, data in scripts.items():
            key.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
        initrd = cache / f"initramfs-{kver}-{key.hexdigest()[:16]}.cpio"
        if not initrd.is_file():
            try:
                libs = await _libraries(_QGA)
                await asyncio.to_thread(_write_initramfs, kdir, kver, initrd, scripts, _QGA, libs)
                _prune(cache, keep={initrd.name, kdir.name})
            except OSError as exc:
                raise LabError(f"building the lab initramfs failed: {exc}") from exc
        vmlinux = kdir / "vmlinux"
        kernel = vmlinux if vmlinux.is_file() else kdir / "vmlinuz"
        return BootArtifacts(kernel=kernel, initrd=initrd, kver=kver)
