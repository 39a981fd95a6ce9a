#!/usr/bin/env python3
"""Build the PowerPC (ppc64el) Linux test guest from Debian packages only.

    python3 sample_iocs/ppc_guest/build_guest.py --out DIR

DIR receives ``vmlinux``, ``initrd.cpio`` (uncompressed newc) and
``manifest.json`` (package versions, sha256 of the outputs, how to boot it).
The guest boots under ``qemu-system-ppc64 -M pseries``, takes its address and
hostname from QEMU's DHCP, fetches ``epics/<hostname>/st.cmd`` from QEMU's
TFTP server and runs it with ``miniioc`` (guest/miniioc), which serves the
records over Channel Access with caproto's server.

How it is made: the ppc64el packages are fetched with ``apt-get download`` and
unpacked with ``dpkg-deb`` (never installed); caproto's pure-Python wheel is
fetched with ``pip download``; the guest's Python modules are compiled to
``.pyc`` with a host Python 3.11 of the same bytecode version (or, failing
that, the guest's own Python under qemu-user in a chroot); the initramfs is
written by this script.

Everything is cached under ``~/.cache/pytest-epics-multiarch/ppc-guest``
(``--cache-dir``): the packages, the wheel, and each built guest under a key
made of the package versions and the guest's own source files. A run whose
inputs did not change only links (or copies) the cached files into DIR.

Needs: Debian (apt-get, dpkg-deb), root the first time when the ppc64el
architecture is not yet configured (``dpkg --add-architecture ppc64el`` and
``apt-get update`` are run then), pip for the wheel.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("build_guest")

# Bump when the layout of the guest or of the cache changes in a way the
# source hash below does not see.
FORMAT_VERSION = 1

ARCH = "ppc64el"
KERNEL_METAPACKAGE = "linux-image-powerpc64le"
PACKAGES = (
    "busybox-static",
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "libc6",
    "libssl3",
    "libexpat1",
    "zlib1g",
    "libffi8",
    "libbz2-1.0",
    "liblzma5",
    "libuuid1",
    "libcrypt1",
    "libgcc-s1",
)
CAPROTO_VERSION = "1.3.0"
# Network drivers, in the order /init loads them (the package has no modules.dep).
KERNEL_MODULES = (
    "virtio_ring",
    "virtio",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "ibmveth",
)
GUEST_PYTHON = "python3.11"

HERE = Path(__file__).resolve().parent
GUEST_SOURCES = HERE / "guest"
OUTPUT_FILES = ("vmlinux", "initrd.cpio", "manifest.json")
KEEP_BUILDS = 2

# What the guest does not need at run time (documentation, tests, iconv tables), and
# Python's ssl module: asyncio imports it when present, which costs a quarter of a
# second of every boot under emulation and loads libssl, for nothing CA uses.
PRUNE = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/lintian",
    "usr/share/initramfs-tools",
    "usr/share/binfmts",
    "usr/lib/binfmt.d",
    "usr/lib/powerpc64le-linux-gnu/gconv",
    "usr/lib/python3.11/test",
    "usr/lib/python3.11/pydoc_data",
    "usr/lib/python3.11/lib2to3",
    "usr/lib/python3.11/idlelib",
    "usr/lib/python3.11/tkinter",
    "usr/lib/python3.11/turtledemo",
    "usr/lib/python3.11/ensurepip",
    "usr/lib/python3.11/ssl.py",
    "usr/lib/python3.11/lib-dynload/_ssl.*.so",
)
CAPROTO_PRUNE = ("tests", "ioc_examples", "examples", "benchmarking", "docs", "curio", "trio")

# How to boot the result; written into the manifest for the runner.
BOOT = {
    "qemu": "qemu-system-ppc64",
    "machine": "pseries,usb=off,x-vof=on,cap-cfpc=broken,cap-sbbc=broken,cap-ibs=broken,cap-ccf-assist=off",
    "cpu": "power9",
    "memory_mb": 512,
    "nic": "virtio-net-pci",
    "console": "hvc0",
    "append": "console=hvc0 quiet",
    "startup_file": "epics/{hostname}/st.cmd",
    "ready_line": "iocRun: All initialization complete",
    "prompt": "{hostname}> ",
}


class BuildError(RuntimeError):
    """The guest cannot be built; the message says what was tried and a hint."""


# -- small helpers ------------------------------------------------------------------------


def run(command: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a command, raising BuildError with its output when it fails."""
    log.debug("$ %s", " ".join(command))
    try:
        result = subprocess.run(list(command), capture_output=True, text=True, **kwargs)
    except FileNotFoundError as exc:
        raise BuildError(f"{command[0]} not found: {exc}") from None
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
        raise BuildError(f"`{' '.join(command)}` failed (exit {result.returncode}):\n{tail}")
    return result


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pytest-epics-multiarch" / "ppc-guest"


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Serialise builds between processes (pytest-xdist workers, parallel CI jobs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# -- package resolution ----------------------------------------------------------------


@dataclass
class Resolved:
    """The exact package versions a build uses."""

    versions: dict[str, str]  # package name -> version, kernel image included
    kernel_package: str
    kernel_release: str

    def to_json(self) -> dict[str, Any]:
        return {
            "versions": self.versions,
            "kernel_package": self.kernel_package,
            "kernel_release": self.kernel_release,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Resolved:
        return cls(dict(data["versions"]), data["kernel_package"], data["kernel_release"])


def apt_lists_fingerprint() -> str:
    """Changes whenever `apt-get update` brings new package lists (cheap: stat only)."""
    lists = Path("/var/lib/apt/lists")
    entries = []
    if lists.is_dir():
        for entry in sorted(lists.iterdir()):
            if "Packages" in entry.name or entry.name.endswith("Release"):
                info = entry.stat()
                entries.append(f"{entry.name}:{info.st_size}:{info.st_mtime_ns}")
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


def ensure_foreign_arch() -> bool:
    """Make apt know ppc64el packages; returns True when it had to update the lists."""
    archs = run(["dpkg", "--print-foreign-architectures"]).stdout.split()
    if ARCH in archs:
        return False
    if os.geteuid() != 0:
        raise BuildError(
            f"dpkg has no {ARCH} architecture and this is not root.\n"
            f"Hint: sudo dpkg --add-architecture {ARCH} && sudo apt-get update"
        )
    log.info("adding the %s architecture to dpkg and updating apt's lists", ARCH)
    run(["dpkg", "--add-architecture", ARCH])
    apt_update()
    return True


def apt_update() -> None:
    if os.geteuid() != 0:
        raise BuildError(f"apt has no {ARCH} package lists.\nHint: sudo apt-get update")
    log.info("apt-get update")
    run(["apt-get", "update", "-q"])


def parse_apt_show(text: str) -> list[dict[str, str]]:
    """Paragraphs of `apt-cache show` as dicts (continuation lines dropped)."""
    paragraphs: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if current:
                paragraphs.append(current)
                current = {}
            continue
        if line[0].isspace():
            continue
        key, _, value = line.partition(":")
        current[key.strip()] = value.strip()
    if current:
        paragraphs.append(current)
    return paragraphs


def resolve_with_apt() -> Resolved:
    names = [KERNEL_METAPACKAGE, *PACKAGES]
    command = ["apt-cache", "show", "--no-all-versions", *[f"{n}:{ARCH}" for n in names]]
    try:
        output = run(command).stdout
    except BuildError:
        apt_update()
        output = run(command).stdout
    found = {p["Package"]: p for p in parse_apt_show(output) if p.get("Architecture") == ARCH}
    missing = [name for name in names if name not in found]
    if missing:
        raise BuildError(f"apt knows no {ARCH} package {', '.join(missing)}.\nHint: apt-get update")
    depends = found[KERNEL_METAPACKAGE].get("Depends", "")
    match = re.search(r"(linux-image-(\d[\w.+~-]*-powerpc64le))\s*\(=\s*([^)\s]+)\)", depends)
    if not match:
        raise BuildError(f"cannot find the kernel image in {KERNEL_METAPACKAGE}'s Depends: {depends!r}")
    kernel_package, kernel_release, kernel_version = match.groups()
    versions = {name: found[name]["Version"] for name in PACKAGES}
    versions[kernel_package] = kernel_version
    return Resolved(versions, kernel_package, kernel_release)


def resolve(cache: Path) -> Resolved:
    """Versions apt would download now; cached while apt's lists stay the same."""
    ensure_foreign_arch()
    fingerprint = apt_lists_fingerprint()
    memo = cache / "resolved.json"
    with contextlib.suppress(OSError, ValueError, KeyError):
        data = json.loads(memo.read_text())
        if data["fingerprint"] == fingerprint:
            return Resolved.from_json(data["resolved"])
    log.info("resolving package versions with apt-cache")
    resolved = resolve_with_apt()
    # `apt-get update` may have run inside resolve_with_apt: fingerprint again.
    fingerprint = apt_lists_fingerprint()
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_suffix(".tmp")
    tmp.write_text(json.dumps({"fingerprint": fingerprint, "resolved": resolved.to_json()}, indent=1))
    tmp.replace(memo)
    return resolved


def sources_digest() -> str:
    """Hash of everything of ours that ends up in or shapes the guest."""
    digest = hashlib.sha256(f"format {FORMAT_VERSION}\n".encode())
    files = [Path(__file__).resolve()]
    files += sorted(
        p
        for p in GUEST_SOURCES.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    )
    for path in files:
        digest.update(str(path.relative_to(HERE)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def build_key(resolved: Resolved) -> str:
    digest = hashlib.sha256()
    for name, version in sorted(resolved.versions.items()):
        digest.update(f"{name}={version}\n".encode())
    digest.update(f"caproto={CAPROTO_VERSION}\n".encode())
    digest.update(sources_digest().encode())
    return digest.hexdigest()[:20]


# -- downloads ----------------------------------------------------------------------------


def deb_filename(name: str, version: str) -> str:
    # apt-get download names files like this, with the epoch's ':' escaped.
    return f"{name}_{version.replace(':', '%3a')}_{ARCH}.deb"


def download_debs(resolved: Resolved, debs: Path) -> dict[str, Path]:
    debs.mkdir(parents=True, exist_ok=True)
    paths = {name: debs / deb_filename(name, v) for name, v in resolved.versions.items()}
    wanted = [f"{name}:{ARCH}={resolved.versions[name]}" for name, path in paths.items() if not path.exists()]
    if wanted:
        log.info("downloading %d %s packages with apt-get", len(wanted), ARCH)
        run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", *wanted], cwd=debs)
    for name, path in paths.items():
        if not path.exists():
            raise BuildError(f"apt-get download did not produce {path.name} for {name}")
    return paths


def download_caproto(wheels: Path) -> Path:
    wheels.mkdir(parents=True, exist_ok=True)
    wheel = wheels / f"caproto-{CAPROTO_VERSION}-py3-none-any.whl"
    if wheel.exists():
        return wheel
    log.info("downloading caproto %s with pip", CAPROTO_VERSION)
    pips = [[sys.executable, "-m", "pip"]]
    pips += [[p] for p in ("pip3", "pip") if shutil.which(p)]
    errors = []
    for pip in pips:
        try:
            run(
                [
                    *pip,
                    "download",
                    "--disable-pip-version-check",
                    "-q",
                    "--no-deps",
                    "--only-binary=:all:",
                    "-d",
                    str(wheels),
                    f"caproto=={CAPROTO_VERSION}",
                ]
            )
        except BuildError as exc:
            errors.append(str(exc).splitlines()[-1])
            continue
        if wheel.exists():
            return wheel
    raise BuildError(
        "could not download caproto's wheel with pip: "
        + "; ".join(errors)
        + "\nHint: install pip for this Python, or put "
        + wheel.name
        + f" into {wheels}"
    )


# -- assembling the root filesystem ------------------------------------------------------------


def extract_kernel(deb: Path, release: str, vmlinux: Path, modules_dir: Path) -> None:
    """Take vmlinux and the network modules out of the kernel package (stream, no full unpack)."""
    wanted = {f"{name}.ko": name for name in KERNEL_MODULES}
    vmlinux_member = f"./boot/vmlinux-{release}"
    modules_dir.mkdir(parents=True, exist_ok=True)
    found = set()
    process = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    assert process.stdout is not None
    try:
        with tarfile.open(fileobj=process.stdout, mode="r|") as archive:
            for member in archive:
                base = os.path.basename(member.name)
                if member.name == vmlinux_member:
                    target = vmlinux
                elif base in wanted and f"/lib/modules/{release}/" in member.name:
                    target = modules_dir / base
                else:
                    continue
                source = archive.extractfile(member)
                assert source is not None
                with target.open("wb") as out:
                    shutil.copyfileobj(source, out, 1 << 20)
                found.add(base if target != vmlinux else "vmlinux")
    finally:
        process.stdout.close()
        process.wait()
    missing = ({"vmlinux"} | set(wanted)) - found
    if missing:
        raise BuildError(f"{deb.name} lacks {', '.join(sorted(missing))}")


def unpack_debs(debs: Sequence[Path], root: Path) -> None:
    for deb in debs:
        run(["dpkg-deb", "-x", str(deb), str(root)])


def install_caproto(wheel: Path, site: Path) -> None:
    site.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    for name in CAPROTO_PRUNE:
        shutil.rmtree(site / "caproto" / name, ignore_errors=True)


def install_guest_files(root: Path, site: Path) -> None:
    shutil.copy2(GUEST_SOURCES / "init", root / "init")
    (root / "etc").mkdir(exist_ok=True)
    shutil.copy2(GUEST_SOURCES / "udhcpc.script", root / "etc" / "udhcpc.script")
    for path in (root / "init", root / "etc" / "udhcpc.script"):
        path.chmod(0o755)
    shutil.copytree(
        GUEST_SOURCES / "miniioc", site / "miniioc", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )


def prune(root: Path) -> None:
    for pattern in PRUNE:
        for target in root.glob(pattern):
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()


# -- byte-compiling the guest's Python -------------------------------------------------------

_PROBE = (
    "import importlib.util, sys; "
    "print(importlib.util.MAGIC_NUMBER.hex(), sys.implementation.cache_tag, "
    "sys.version.split()[0])"
)

_COMPILE = """
import compileall, py_compile, sys
ok = True
for source, ddir in zip(sys.argv[1::2], sys.argv[2::2]):
    ok &= bool(compileall.compile_dir(
        source, ddir=ddir, quiet=1, workers=1,
        invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH))
sys.exit(0 if ok else 1)
"""


def guest_magic(root: Path) -> str:
    text = (root / "usr/lib/python3.11/importlib/_bootstrap_external.py").read_text()
    match = re.search(r"MAGIC_NUMBER = \((\d+)\)\.to_bytes\(2, 'little'\) \+ b'\\r\\n'", text)
    if not match:
        raise BuildError("cannot read the guest Python's bytecode magic number")
    return (int(match.group(1)).to_bytes(2, "little") + b"\r\n").hex()


def find_host_python(magic: str) -> tuple[str, str] | None:
    """A host Python whose bytecode the guest's Python loads: (path, version)."""
    candidates = ["/usr/bin/python3.11", sys.executable, shutil.which(GUEST_PYTHON) or ""]
    for candidate in dict.fromkeys(c for c in candidates if c and os.path.exists(c)):
        try:
            probe = run([candidate, "-c", _PROBE], timeout=30).stdout.split()
        except (BuildError, subprocess.TimeoutExpired):
            continue
        if len(probe) == 3 and probe[0] == magic and probe[1] == "cpython-311":
            return candidate, probe[2]
    return None


def compile_python(root: Path) -> str:
    """Write .pyc files next to the guest's modules; returns how it was done."""
    trees = ["usr/lib/python3.11", "usr/lib/python3/dist-packages"]
    magic = guest_magic(root)
    host = find_host_python(magic)
    if host is not None:
        python, version = host
        args = []
        for tree in trees:
            args += [str(root / tree), "/" + tree]
        log.info("compiling the guest's Python with %s (%s)", python, version)
        try:
            run([python, "-c", _COMPILE, *args])
        except BuildError as exc:
            # A handful of stdlib modules may not compile; the rest are still written.
            log.warning("some modules did not compile: %s", str(exc).splitlines()[-1])
        return f"host {python} ({version})"
    return compile_in_qemu_user(root, trees)


def compile_in_qemu_user(root: Path, trees: Sequence[str]) -> str:
    """No host Python 3.11: run the guest's own Python under qemu-user in a chroot."""
    qemu = shutil.which("qemu-ppc64le-static")
    if qemu is None or os.geteuid() != 0:
        raise BuildError(
            "no host Python with the guest's bytecode version (3.11) and no way to run the "
            "guest's Python (needs root and qemu-ppc64le-static).\n"
            "Hint: apt-get install python3.11-minimal, or apt-get install qemu-user-static"
        )
    log.info("compiling the guest's Python under qemu-user (no host Python 3.11)")
    helper = root / "qemu-ppc64le-static"
    shutil.copy2(qemu, helper)
    try:
        args = []
        for tree in trees:
            args += ["/" + tree, "/" + tree]
        run(
            ["chroot", str(root), "/qemu-ppc64le-static", f"/usr/bin/{GUEST_PYTHON}", "-c", _COMPILE, *args],
            timeout=1800,
        )
    finally:
        helper.unlink()
    return "guest python3.11 under qemu-ppc64le-static"


# -- initramfs -----------------------------------------------------------------------------


class CpioWriter:
    """Writes the "newc" cpio format the kernel unpacks as initramfs.

    Owners are root, times are fixed and entries sorted, so the same tree
    always gives the same bytes.
    """

    MTIME = 0

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.inode = 1

    def _header(
        self, name: str, mode: int, size: int, nlink: int = 1, rdev: tuple[int, int] = (0, 0)
    ) -> None:
        encoded = name.encode() + b"\0"
        fields = (self.inode, mode, 0, 0, nlink, self.MTIME, size, 0, 0, rdev[0], rdev[1], len(encoded), 0)
        self.inode += 1
        self.out.write(b"070701" + b"".join(b"%08X" % value for value in fields))
        self.out.write(encoded)
        self._pad(110 + len(encoded))

    def _pad(self, length: int) -> None:
        self.out.write(b"\0" * (-length % 4))

    def directory(self, name: str, mode: int = 0o755) -> None:
        self._header(name, stat.S_IFDIR | mode, 0, nlink=2)

    def file(self, name: str, path: Path, mode: int) -> None:
        size = path.stat().st_size
        self._header(name, stat.S_IFREG | mode, size)
        with path.open("rb") as handle:
            shutil.copyfileobj(handle, self.out, 1 << 20)
        self._pad(size)

    def symlink(self, name: str, target: str) -> None:
        data = target.encode()
        self._header(name, stat.S_IFLNK | 0o777, len(data))
        self.out.write(data)
        self._pad(len(data))

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._header(name, stat.S_IFCHR | mode, 0, rdev=(major, minor))

    def tree(self, root: Path) -> None:
        for directory, dirnames, filenames in os.walk(root):
            dirnames.sort()
            base = Path(directory)
            for name in sorted(dirnames + filenames):
                path = base / name
                relative = path.relative_to(root).as_posix()
                info = path.lstat()
                permissions = stat.S_IMODE(info.st_mode)
                if stat.S_ISLNK(info.st_mode):
                    self.symlink(relative, os.readlink(path))
                elif stat.S_ISDIR(info.st_mode):
                    self.directory(relative, permissions)
                elif stat.S_ISREG(info.st_mode):
                    self.file(relative, path, permissions)

    def trailer(self) -> None:
        self._header("TRAILER!!!", 0, 0, nlink=1)


def write_initramfs(root: Path, target: Path) -> None:
    with target.open("wb") as out:
        writer = CpioWriter(out)
        # The kernel opens /dev/console for /init before anything is mounted.
        (root / "dev").mkdir(exist_ok=True)
        writer.tree(root)
        writer.char_device("dev/console", 5, 1)
        writer.trailer()


# -- the build -----------------------------------------------------------------------------


def build(resolved: Resolved, cache: Path, destination: Path, key: str) -> dict[str, Any]:
    started = time.monotonic()
    debs = download_debs(resolved, cache / "debs")
    wheel = download_caproto(cache / "wheels")
    work = Path(tempfile.mkdtemp(prefix="build-", dir=cache))
    work.chmod(0o755)
    try:
        root = work / "rootfs"
        root.mkdir()
        vmlinux = work / "vmlinux"
        kernel_errors: list[BaseException] = []

        def kernel_job() -> None:
            try:
                extract_kernel(
                    debs[resolved.kernel_package],
                    resolved.kernel_release,
                    vmlinux,
                    root / "lib" / "modules" / "guest",
                )
            except BaseException as exc:
                kernel_errors.append(exc)

        # The kernel package is the slow one to decompress: do it alongside the rest.
        kernel_thread = threading.Thread(target=kernel_job, name="kernel")
        kernel_thread.start()
        log.info("unpacking %d packages", len(PACKAGES))
        unpack_debs([debs[name] for name in PACKAGES], root)
        prune(root)
        site = root / "usr" / "lib" / "python3" / "dist-packages"
        install_caproto(wheel, site)
        install_guest_files(root, site)
        compiled_with = compile_python(root)
        kernel_thread.join()
        if kernel_errors:
            raise kernel_errors[0]
        log.info("writing the initramfs")
        write_initramfs(root, work / "initrd.cpio")
        shutil.rmtree(root)

        outputs = {}
        for name in ("vmlinux", "initrd.cpio"):
            path = work / name
            outputs[name] = {"sha256": sha256_file(path), "size": path.stat().st_size}
        manifest = {
            "schema": 1,
            "key": key,
            "arch": ARCH,
            "kernel": {
                "package": resolved.kernel_package,
                "version": resolved.versions[resolved.kernel_package],
                "release": resolved.kernel_release,
            },
            "packages": dict(sorted(resolved.versions.items())),
            "caproto": CAPROTO_VERSION,
            "pyc_compiled_with": compiled_with,
            "outputs": outputs,
            "boot": BOOT,
            "build_seconds": round(time.monotonic() - started, 1),
            "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if destination.exists():
            shutil.rmtree(destination)
        work.rename(destination)
        return manifest
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def remove_old_builds(cache: Path, keep: Path) -> None:
    builds = sorted(
        (p for p in cache.glob("guest-*") if p.is_dir() and p != keep),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for old in builds[KEEP_BUILDS - 1 :]:
        log.info("removing old build %s", old.name)
        shutil.rmtree(old, ignore_errors=True)


def publish(source: Path, out: Path) -> None:
    """Hard-link the cached files into ``out`` (copy when on another filesystem)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUT_FILES:
        src, dst = source / name, out / name
        if dst.exists() or dst.is_symlink():
            with contextlib.suppress(OSError):
                if os.path.samefile(src, dst):
                    continue
            dst.unlink()
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


def is_complete(entry: Path) -> bool:
    return all((entry / name).is_file() for name in OUTPUT_FILES)


def ensure_guest(out: Path, cache: Path | None = None, force: bool = False) -> dict[str, Any]:
    """Build the guest unless a cached build with the same inputs exists; put it in ``out``."""
    cache = (cache or default_cache_dir()).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    resolved = resolve(cache)
    key = build_key(resolved)
    entry = cache / f"guest-{key}"
    if force or not is_complete(entry):
        with file_lock(cache / ".lock"):
            if force or not is_complete(entry):
                log.info("building guest %s (kernel %s)", key, resolved.kernel_release)
                manifest = build(resolved, cache, entry, key)
                log.info("built in %.1f s", manifest["build_seconds"])
                remove_old_builds(cache, entry)
    else:
        log.info("using cached guest %s", key)
    os.utime(entry)
    publish(entry, out)
    return dict(json.loads((out / "manifest.json").read_text()))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for the outputs")
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help=f"cache folder (default: {default_cache_dir()})"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("-v", "--verbose", action="store_true", help="show commands run")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        stream=sys.stderr,
        format="build_guest: %(message)s",
    )
    started = time.monotonic()
    try:
        ensure_guest(args.out, args.cache_dir, args.force)
    except BuildError as exc:
        log.error("%s", exc)
        return 1
    log.info("guest ready in %s (%.2f s)", args.out, time.monotonic() - started)
    print(args.out / "manifest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
