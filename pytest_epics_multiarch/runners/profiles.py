"""QEMU board profiles: the command line that boots each kind of emulated IOC.

Facts behind the command lines (checked on Debian's QEMU 7.2):
- qemuprep (RTEMS 5 BSP motorola_powerpc/qemuprep) boots on the PReP machine ``40p`` with a
  604 CPU and RTEMS's ``qemu_fakerom.bin`` as firmware; the kernel is the raw PReP boot image.
  ``-append`` must not be given there (QEMU 7.2 aborts on overlapping ROM regions), nor
  ``-nodefaults`` (it drops the NVRAM the fake ROM reads).
- pc686-qemu is what EPICS base's own CI boots RTEMS tests on (qemu-system-i386, e1000 NIC,
  ``--console=/dev/com1``).
- pseries boots a ppc64el Linux kernel; ``x-vof=on`` (QEMU's small firmware instead of SLOF)
  saves about 6 s per boot, and the ``cap-*`` settings keep TCG from warning on every boot.
QEMU user networking forwards the IOC's CA port (TCP and UDP, same number on both sides) on
127.0.0.1 and serves the startup files from its built-in TFTP server; ``hostname=`` is what the
guest's BOOTP/DHCP answer names it, and RTEMS IOCs read ``epics/<hostname>/st.cmd``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..targets import Target


@dataclass(frozen=True)
class QemuProfile:
    name: str
    binary: str
    machine: str
    cpu: str | None
    memory: str
    #: The NIC as a -device, with ``{netdev}`` standing for the user-network id.
    nic: str
    #: Whether the board takes a kernel command line (``-append``).
    takes_append: bool = False
    #: Whether the kernel needs an initrd (``-initrd``) from the payload.
    takes_initrd: bool = False
    #: Whether the firmware (``-bios``) comes from the payload or the config.
    needs_bios: bool = False
    append: str = ""
    extra: tuple[str, ...] = ()
    description: str = ""

    def command(
        self,
        *,
        kernel: Path,
        port: int,
        hostname: str,
        tftp_root: Path | None,
        bios: Path | None = None,
        initrd: Path | None = None,
        qmp_fd: int | None = None,
    ) -> list[str]:
        """The full argv; the console is the first serial port on stdio.

        ``qmp_fd`` is QEMU's end of a connected socket pair for its control protocol (QMP),
        passed down to the process: no socket file (whose path a deep log folder could push past
        the 108-byte limit) and no name another local user could connect to.
        """
        netdev = f"user,id=n0,hostname={hostname}"
        if tftp_root is not None:
            netdev += f",tftp={tftp_root}"
        # Only loopback on the host side: nothing outside this machine reaches the IOC.
        netdev += f",hostfwd=tcp:127.0.0.1:{port}-:{port},hostfwd=udp:127.0.0.1:{port}-:{port}"
        argv = [self.binary, "-M", self.machine]
        if self.cpu:
            argv += ["-cpu", self.cpu]
        argv += ["-m", self.memory, "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot"]
        if qmp_fd is not None:
            # A socket chardev over an inherited, connected fd (QEMU's chardev option fd=; checked
            # with QEMU 7.2 and a socketpair): QMP greets on it at once and waits for commands.
            argv += ["-chardev", f"socket,id=qmp,fd={qmp_fd}", "-mon", "chardev=qmp,mode=control"]
        if self.needs_bios:
            if bios is None:
                raise ConfigError(f"QEMU profile {self.name} needs a firmware file (bios)")
            argv += ["-bios", str(bios)]
        argv += ["-kernel", str(kernel)]
        if self.takes_initrd and initrd is not None:
            argv += ["-initrd", str(initrd)]
        if self.takes_append and self.append:
            argv += ["-append", self.append]
        argv += ["-netdev", netdev, "-device", self.nic.format(netdev="n0")]
        argv += list(self.extra)
        return argv


PROFILES: Mapping[str, QemuProfile] = {
    "qemuprep": QemuProfile(
        name="qemuprep",
        binary="qemu-system-ppc",
        machine="40p",
        cpu="604",
        memory="128",
        nic="ne2k_isa,iobase=0x300,irq=9,netdev={netdev}",
        needs_bios=True,
        description="RTEMS 5 motorola_powerpc/qemuprep on the PReP 40p",
    ),
    "pc686-qemu": QemuProfile(
        name="pc686-qemu",
        binary="qemu-system-i386",
        machine="pc",
        cpu=None,
        memory="64",
        nic="e1000,netdev={netdev}",
        takes_append=True,
        append="--console=/dev/com1",
        description="RTEMS pc686 (i386), as EPICS base's CI boots it",
    ),
    "pseries": QemuProfile(
        name="pseries",
        binary="qemu-system-ppc64",
        machine="pseries,usb=off,x-vof=on,cap-cfpc=broken,cap-sbbc=broken,cap-ibs=broken,cap-ccf-assist=off",
        cpu="power9",
        memory="512",
        nic="virtio-net-pci,netdev={netdev}",
        takes_append=True,
        takes_initrd=True,
        append="console=hvc0 quiet",
        extra=("-vga", "none", "-smp", "1"),
        description="ppc64el Linux guest on the pSeries machine",
    ),
}

_CUSTOM_KEYS: Mapping[str, Any] = {
    "binary": str,
    "machine": str,
    "cpu": str,
    "memory": (str, int),
    "nic": str,
    "append": str,
    "extra": list,
    "needs_bios": bool,
    "takes_initrd": bool,
}


def profile_names() -> list[str]:
    return [*PROFILES, "custom"]


def get_profile(name: str, custom: Mapping[str, Any] | None = None, where: str = "") -> QemuProfile:
    """A built-in profile, optionally with fields overridden; ``custom`` builds one from scratch."""
    custom = dict(custom or {})
    for key, value in custom.items():
        kind = _CUSTOM_KEYS.get(key)
        if kind is None:
            raise ConfigError(
                f"{where}: unknown QEMU profile setting {key!r}",
                hint="settings: " + ", ".join(sorted(_CUSTOM_KEYS)),
            )
        if not isinstance(value, kind):
            raise ConfigError(f"{where}: QEMU setting {key} has the wrong type ({type(value).__name__})")
    if name == "custom":
        missing = [key for key in ("binary", "machine", "nic") if key not in custom]
        if missing:
            raise ConfigError(
                f"{where}: the custom QEMU profile needs {', '.join(missing)}",
                hint="e.g. qemu: {profile: custom, binary: qemu-system-ppc, machine: mvme3100, "
                "nic: 'eTSEC,netdev={netdev}'}",
            )
        base = QemuProfile(name="custom", binary="", machine="", cpu=None, memory="128", nic="")
    elif name in PROFILES:
        base = PROFILES[name]
    else:
        raise ConfigError(
            f"{where}: unknown QEMU profile {name!r}",
            hint="profiles: " + ", ".join(profile_names()),
        )
    changes: dict[str, Any] = {k: v for k, v in custom.items() if k != "extra"}
    if "memory" in changes:
        changes["memory"] = str(changes["memory"])
    if "append" in changes:
        changes["takes_append"] = True
    if "extra" in custom:
        changes["extra"] = tuple(str(x) for x in custom["extra"])
    return replace(base, **changes)


def build_only_reason(target: Target) -> str:
    """Why a build-only target's IOC tests skip (the "[target]" prefix marks a target-level skip)."""
    return (
        f"[{target.name}] build-only target: no QEMU model boots BSP {target.variant or target.arch} "
        f"(QEMU profiles: {', '.join(profile_names())}); boot tests run on an emulated BSP "
        "build of the same Dockerfile (e.g. rtems/powerpc)"
    )


def inject_ca_port(st_cmd: str, port: int) -> str:
    """Prepend the CA port to a served st.cmd: ``epicsEnvSet`` must come before ``iocInit``."""
    return f'epicsEnvSet("EPICS_CA_SERVER_PORT","{port}")\n' + st_cmd


@dataclass(frozen=True)
class TftpLayout:
    """Where an RTEMS IOC looks for its startup files on the TFTP server."""

    root: Path
    hostname: str

    @property
    def folder(self) -> Path:
        return self.root / "epics" / self.hostname

    @property
    def st_cmd(self) -> Path:
        return self.folder / "st.cmd"


@dataclass(frozen=True)
class QemuSettings:
    """A target's ``qemu:`` section, resolved against the image's labels."""

    profile: str
    #: Paths inside the run-stage image.
    kernel: str
    initrd: str | None = None
    bios: str | None = None
    #: The folder whose files the IOC loads (db/, dbd/ ...), served over TFTP.
    assets: str | None = None
    #: The startup script inside the image; served as epics/<hostname>/st.cmd.
    startup: str | None = None
    #: False when the startup files are compiled into the boot image.
    serve_startup: bool = True
    hostname: str = "ioc"
    #: The CA port when it is fixed at build time (serve_startup false).
    ca_port: int = 5064
    boot_timeout: float = 120.0

    def payload_paths(self) -> dict[str, str | None]:
        """What to take out of the image: the startup files only when they are served."""
        served = self.serve_startup
        return {
            "kernel": self.kernel,
            "initrd": self.initrd,
            "bios": self.bios,
            "assets": self.assets if served else None,
            "startup": self.startup if served else None,
        }


def fatal_patterns() -> Sequence[str]:
    """Console text that means the guest died (RTEMS fatal errors, Linux panics)."""
    return ("RTEMS_FATAL_SOURCE_EXCEPTION", "*** FATAL ***", "Kernel panic", "fatal exception")


_SETTING_KINDS: Mapping[str, Any] = {
    "profile": str,
    "kernel": str,
    "initrd": str,
    "bios": str,
    "assets": str,
    "startup": str,
    "serve_startup": bool,
    "hostname": str,
    "ca_port": int,
    "boot_timeout": (int, float),
}

QEMU_KEYS = tuple(sorted({*_SETTING_KINDS, *_CUSTOM_KEYS}))


def check_qemu_section(section: Mapping[str, Any], where: str) -> None:
    """Validate a target's ``qemu:`` mapping when the config file is loaded."""
    for key, value in section.items():
        kind = _SETTING_KINDS.get(key) or _CUSTOM_KEYS.get(key)
        if kind is None:
            raise ConfigError(f"{where}: unknown key qemu.{key}", hint="valid keys: " + ", ".join(QEMU_KEYS))
        if isinstance(value, bool) and kind is not bool:
            kind_ok = False
        else:
            kind_ok = isinstance(value, kind)
        if not kind_ok:
            raise ConfigError(f"{where}: qemu.{key} has the wrong type ({type(value).__name__}: {value!r})")
    if "profile" in section:
        get_profile(str(section["profile"]), {k: v for k, v in section.items() if k in _CUSTOM_KEYS}, where)


def resolve_qemu(
    *,
    default_profile: str | None,
    epics_arch: str,
    section: Mapping[str, Any],
    labels: Mapping[str, str],
    startup: str | None,
    workdir: str | None,
    where: str,
) -> tuple[QemuSettings, QemuProfile]:
    """The settings of one emulated target: defaults < config ``qemu:`` < image labels."""
    merged: dict[str, Any] = dict(section)
    for key, value in labels.items():
        kind = _SETTING_KINDS.get(key) or _CUSTOM_KEYS.get(key)
        if kind is bool:
            merged[key] = value.strip().lower() in ("1", "true", "yes")
        elif kind is int:
            merged[key] = int(value)
        elif kind == (int, float):
            merged[key] = float(value)
        elif kind is list:
            merged[key] = value.split()
        elif kind is not None:
            merged[key] = value
    profile_name = str(merged.get("profile") or default_profile or "")
    if not profile_name:
        raise ConfigError(
            f"{where}: no QEMU profile for {epics_arch}", hint="profiles: " + ", ".join(profile_names())
        )
    profile = get_profile(profile_name, {k: v for k, v in merged.items() if k in _CUSTOM_KEYS}, where)
    # Defaults follow the epics-containers layout: the IOC folder /epics/ioc with config/st.cmd,
    # and the target's build products under bin/<EPICS arch>/.
    ioc_dir = workdir or "/epics/ioc"
    bin_dir = f"{ioc_dir}/bin/{epics_arch}"
    startup_path = str(merged.get("startup") or startup or f"{ioc_dir}/config/st.cmd")
    settings = QemuSettings(
        profile=profile_name,
        kernel=str(merged.get("kernel") or f"{bin_dir}/ioc.boot"),
        initrd=merged.get("initrd") or (f"{bin_dir}/initrd.cpio" if profile.takes_initrd else None),
        bios=merged.get("bios") or (f"{bin_dir}/qemu_fakerom.bin" if profile.needs_bios else None),
        assets=str(merged.get("assets") or ioc_dir),
        startup=startup_path,
        serve_startup=bool(merged.get("serve_startup", True)),
        hostname=str(merged.get("hostname") or "ioc"),
        ca_port=int(merged.get("ca_port", 5064)),
        boot_timeout=float(merged.get("boot_timeout", 120.0)),
    )
    return settings, profile
