"""The exact QEMU command lines, the TFTP layout and the CA port the runner gives the IOC."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_epics_multiarch.errors import ConfigError
from pytest_epics_multiarch.runners.profiles import (
    TftpLayout,
    check_qemu_section,
    get_profile,
    inject_ca_port,
    profile_names,
    resolve_qemu,
)

NET = "user,id=n0,hostname=ioc1,tftp=/t,hostfwd=tcp:127.0.0.1:5999-:5999,hostfwd=udp:127.0.0.1:5999-:5999"


def test_qemuprep_command_line() -> None:
    argv = get_profile("qemuprep").command(
        kernel=Path("/p/ioc.boot"), port=5999, hostname="ioc1", tftp_root=Path("/t"), bios=Path("/p/rom.bin")
    )
    assert argv == [
        "qemu-system-ppc", "-M", "40p", "-cpu", "604", "-m", "128",
        "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot",
        "-bios", "/p/rom.bin", "-kernel", "/p/ioc.boot",
        "-netdev", NET, "-device", "ne2k_isa,iobase=0x300,irq=9,netdev=n0",
    ]  # fmt: skip
    # 40p: no -append (QEMU 7.2 aborts) and no -nodefaults (the fake ROM reads the NVRAM).
    assert "-append" not in argv and "-nodefaults" not in argv and "restrict=on" not in " ".join(argv)


def test_qemuprep_needs_firmware() -> None:
    with pytest.raises(ConfigError, match="needs a firmware"):
        get_profile("qemuprep").command(kernel=Path("/k"), port=1, hostname="h", tftp_root=None)


def test_pc686_command_line() -> None:
    argv = get_profile("pc686-qemu").command(
        kernel=Path("/p/test.exe"), port=5999, hostname="ioc1", tftp_root=Path("/t")
    )
    assert argv == [
        "qemu-system-i386", "-M", "pc", "-m", "64",
        "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot",
        "-kernel", "/p/test.exe", "-append", "--console=/dev/com1",
        "-netdev", NET, "-device", "e1000,netdev=n0",
    ]  # fmt: skip


def test_pseries_command_line_with_qmp() -> None:
    argv = get_profile("pseries").command(
        kernel=Path("/p/vmlinux"),
        initrd=Path("/p/initrd.cpio"),
        port=5999,
        hostname="ioc1",
        tftp_root=Path("/t"),
        qmp_fd=7,
    )
    assert argv == [
        "qemu-system-ppc64", "-M",
        "pseries,usb=off,x-vof=on,cap-cfpc=broken,cap-sbbc=broken,cap-ibs=broken,cap-ccf-assist=off",
        "-cpu", "power9", "-m", "512",
        "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot",
        "-chardev", "socket,id=qmp,fd=7", "-mon", "chardev=qmp,mode=control",
        "-kernel", "/p/vmlinux", "-initrd", "/p/initrd.cpio", "-append", "console=hvc0 quiet",
        "-netdev", NET, "-device", "virtio-net-pci,netdev=n0", "-vga", "none", "-smp", "1",
    ]  # fmt: skip


def test_custom_profile() -> None:
    profile = get_profile(
        "custom",
        {"binary": "qemu-system-ppc", "machine": "mvme3100", "nic": "eTSEC,netdev={netdev}", "memory": 256,
         "extra": ["-s"]},
    )  # fmt: skip
    argv = profile.command(kernel=Path("/k"), port=7, hostname="h", tftp_root=None)
    assert argv[:3] == ["qemu-system-ppc", "-M", "mvme3100"] and "256" in argv
    assert argv[-3:] == ["-device", "eTSEC,netdev=n0", "-s"]
    with pytest.raises(ConfigError, match="needs binary, machine, nic"):
        get_profile("custom", {})


def test_unknown_profile_names_the_ones_that_exist() -> None:
    with pytest.raises(ConfigError) as info:
        get_profile("mvme5500")
    assert "qemuprep, pc686-qemu, pseries, custom" in str(info.value)
    assert profile_names() == ["qemuprep", "pc686-qemu", "pseries", "custom"]


def test_port_goes_before_the_startup_script() -> None:
    text = inject_ca_port('dbLoadRecords("db/x.db")\niocInit\n', 6123)
    assert text.splitlines()[0] == 'epicsEnvSet("EPICS_CA_SERVER_PORT","6123")'
    assert text.index("EPICS_CA_SERVER_PORT") < text.index("iocInit")


def test_tftp_layout_is_what_rtems_reads() -> None:
    layout = TftpLayout(Path("/t"), "ioc1")
    # RTEMS IOCs open /TFTP/BOOTP_HOST:epics/<hostname>/st.cmd, the hostname QEMU's DHCP gives.
    assert layout.st_cmd == Path("/t/epics/ioc1/st.cmd")


def test_defaults_follow_the_epics_containers_layout() -> None:
    settings, profile = resolve_qemu(
        default_profile="qemuprep", epics_arch="RTEMS-qemuprep", section={}, labels={},
        startup="/epics/ioc/config/st.cmd", workdir="/epics/ioc", where="cfg",
    )  # fmt: skip
    assert profile.name == "qemuprep"
    assert settings.payload_paths() == {
        "kernel": "/epics/ioc/bin/RTEMS-qemuprep/ioc.boot",
        "initrd": None,
        "bios": "/epics/ioc/bin/RTEMS-qemuprep/qemu_fakerom.bin",
        "assets": "/epics/ioc",
        "startup": "/epics/ioc/config/st.cmd",
    }
    assert settings.serve_startup and settings.hostname == "ioc"


def test_config_then_labels_override() -> None:
    settings, profile = resolve_qemu(
        default_profile="qemuprep",
        epics_arch="RTEMS-qemuprep",
        section={"kernel": "/cfg/ioc.boot", "hostname": "cfg", "memory": 256},
        labels={"kernel": "/label/ioc.boot", "serve_startup": "false", "ca_port": "6000"},
        startup=None, workdir=None, where="cfg",
    )  # fmt: skip
    assert settings.kernel == "/label/ioc.boot" and settings.hostname == "cfg"
    assert settings.serve_startup is False and settings.ca_port == 6000
    assert profile.memory == "256"
    # Startup files compiled in: nothing to serve, so nothing to extract but the boot files.
    assert settings.payload_paths()["startup"] is None and settings.payload_paths()["assets"] is None


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"kernal": "/x"}, "unknown key qemu.kernal"),
        ({"serve_startup": "no"}, "qemu.serve_startup has the wrong type"),
        ({"ca_port": True}, "qemu.ca_port has the wrong type"),
        ({"profile": "mvme5500"}, "unknown QEMU profile 'mvme5500'"),
    ],
)
def test_bad_qemu_sections(section: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_qemu_section(section, "cfg.yaml: targets.rtems/powerpc")
