"""Proof of the QEMU runner's path on a real PowerPC guest, without any RTEMS toolchain.

The guest (sample_iocs/ppc_guest) is a ppc64el Linux built from Debian packages.
It boots under qemu-system-ppc64 like an IOC on a board: DHCP from QEMU's user
network, ``epics/<hostname>/st.cmd`` and its database over QEMU's TFTP server,
``iocRun: All initialization complete`` and the ``<hostname>> `` prompt on the
console, Channel Access through ``hostfwd`` on 127.0.0.1.
"""

from __future__ import annotations

import functools

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "sample_iocs" / "ppc_guest" / "build_guest.py"
QEMU = "qemu-system-ppc64"
READY_LINE = "iocRun: All initialization complete"
BOOT_TIMEOUT_S = 180.0  # TCG only; about 10 s on a 2-core machine
GUEST_NAME = "ppcguest1"


# -- the guest build ---------------------------------------------------------------------------


@dataclass
class GuestBuild:
    folder: Path
    manifest: dict[str, Any]
    first_run_s: float
    cached_run_s: float


def run_build(out: Path) -> float:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(BUILD_SCRIPT), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        pytest.fail(f"build_guest.py failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    log.info("build_guest.py: %.2f s\n%s", elapsed, result.stderr)
    return elapsed


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> GuestBuild:
    missing = [tool for tool in (QEMU, "apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (Debian with qemu-system-ppc installed)")
    out = tmp_path_factory.mktemp("guest")
    first = run_build(out)
    cached = run_build(out)
    manifest = json.loads((out / "manifest.json").read_text())
    log.info(
        "guest build: first run %.2f s (%s), cached run %.2f s",
        first,
        f"built in {manifest['build_seconds']} s",
        cached,
    )
    return GuestBuild(out, manifest, first, cached)


def test_build_outputs_match_manifest_and_rerun_is_cached(
    guest: GuestBuild, record_property: Callable[[str, object], None]
) -> None:
    record_property("build_first_run_s", round(guest.first_run_s, 2))
    record_property("build_cached_run_s", round(guest.cached_run_s, 2))
    record_property("build_seconds_when_built", guest.manifest["build_seconds"])
    for name in ("vmlinux", "initrd.cpio"):
        data = (guest.folder / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == guest.manifest["outputs"][name]["sha256"]
    assert (guest.folder / "vmlinux").read_bytes()[:4] == b"\x7fELF"
    assert (guest.folder / "initrd.cpio").read_bytes()[:6] == b"070701"
    assert re.fullmatch(r"6\.1\.0-\d+-powerpc64le", guest.manifest["kernel"]["release"])
    assert guest.manifest["caproto"] == "1.3.0"
    assert guest.cached_run_s < 1.5, "an unchanged rebuild must come from the cache"


# -- booting it --------------------------------------------------------------------------------


def free_port() -> int:
    """A port free for TCP and UDP on 127.0.0.1: CA needs the same number for both."""
    for _ in range(50):
        with socket.socket() as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port on 127.0.0.1")


class QemuGuest:
    """qemu-system-ppc64 in its own process group, its console collected in the background."""

    def __init__(self, command: list[str]) -> None:
        self.command = command
        self.process: subprocess.Popen[bytes] | None = None
        self._chunks: list[str] = []
        self._lock = threading.Lock()

    def __enter__(self) -> QemuGuest:
        self.process = subprocess.Popen(
            self.command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        while True:
            data = os.read(self.process.stdout.fileno(), 65536)
            if not data:
                return
            with self._lock:
                self._chunks.append(data.decode("latin-1"))

    @property
    def console(self) -> str:
        with self._lock:
            return "".join(self._chunks).replace("\r\n", "\n")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.console.splitlines()[-lines:])

    def wait_for(self, pattern: str, start: int = 0, timeout: float = 20.0) -> re.Match[str]:
        """Wait for a regex in the console after ``start``; fail fast if QEMU exited."""
        assert self.process is not None
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.console, start)
            if match:
                return match
            if self.process.poll() is not None:
                time.sleep(0.2)
                pytest.fail(
                    f"QEMU exited ({self.process.returncode}) before {pattern!r}; console:\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"no {pattern!r} on the console within {timeout:.0f} s; console:\n{self.tail()}")
            time.sleep(0.05)

    def send(self, line: str) -> int:
        """Type a line on the console; returns the console offset to search from."""
        assert self.process is not None and self.process.stdin is not None
        offset = len(self.console)
        self.process.stdin.write(line.encode() + b"\n")
        self.process.stdin.flush()
        return offset

    def stop(self) -> None:
        """Terminate the whole process group; safe to call twice."""
        if self.process is None:
            return
        pgid = self.process.pid
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        if self.process.stdin is not None:
            self.process.stdin.close()

    def group_alive(self) -> bool:
        assert self.process is not None
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return False
        return True


def qemu_command(guest: GuestBuild, tftp_root: Path, name: str, port: int) -> list[str]:
    netdev = (
        f"user,id=n0,hostname={name},tftp={tftp_root},"
        f"hostfwd=tcp:127.0.0.1:{port}-:{port},hostfwd=udp:127.0.0.1:{port}-:{port}"
    )
    return [
        QEMU,
        "-M",
        "pseries,usb=off,x-vof=on,cap-cfpc=broken,cap-sbbc=broken,cap-ibs=broken,cap-ccf-assist=off",
        "-vga",
        "none",
        "-cpu",
        "power9",
        "-m",
        "512",
        "-smp",
        "1",
        "-nographic",
        "-no-reboot",
        "-kernel",
        str(guest.folder / "vmlinux"),
        "-initrd",
        str(guest.folder / "initrd.cpio"),
        "-append",
        "console=hvc0 quiet",
        "-netdev",
        netdev,
        "-device",
        "virtio-net-pci,netdev=n0",
    ]


def write_tftp_root(root: Path, name: str, port: int) -> None:
    folder = root / "epics" / name
    (folder / "db").mkdir(parents=True)
    (folder / "st.cmd").write_text(
        f'epicsEnvSet("EPICS_CA_SERVER_PORT","{port}")\n'
        "# startup files come over TFTP from the runner's folder\n"
        'epicsEnvSet("PREFIX","PPC:")\n'
        'dbLoadRecords("db/guest.db","P=$(PREFIX)")\n'
        "iocInit\n"
    )
    (folder / "db" / "guest.db").write_text(
        'record(ao, "$(P)setpoint") {\n'
        '    field(VAL, "1.5") field(PREC, "2") field(EGU, "V")\n'
        '    field(DRVH, "10") field(DRVL, "-10")\n'
        '    field(HIHI, "8") field(HHSV, "MAJOR")\n'
        "}\n"
        'record(calc, "$(P)double") {\n'
        '    field(INPA, "$(P)setpoint CP")\n'
        '    field(CALC, "A*2+1")\n'
        "}\n"
        'record(stringout, "$(P)message") { field(VAL, "hello from ppc64le") }\n'
    )


def wait_value(read: Callable[..., Any], pv: str, expected: float, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        value = list(read(pv, timeout=5).data)
        if value == [expected]:
            return
        assert time.monotonic() < deadline, f"{pv} is {value}, expected {expected}"
        time.sleep(0.1)


@pytest.fixture
def booted(
    guest: GuestBuild, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[QemuGuest, int, float]]:
    port = free_port()
    tftp_root = tmp_path / "tftp"
    write_tftp_root(tftp_root, GUEST_NAME, port)
    command = qemu_command(guest, tftp_root, GUEST_NAME, port)
    log.info("QEMU command: %s", " ".join(command))
    monkeypatch.setenv("EPICS_CA_ADDR_LIST", f"127.0.0.1:{port}")
    monkeypatch.setenv("EPICS_CA_AUTO_ADDR_LIST", "NO")
    started = time.monotonic()
    with QemuGuest(command) as qemu:
        qemu.wait_for(rf"^{re.escape(READY_LINE)}$", timeout=BOOT_TIMEOUT_S)
        boot_to_ready = time.monotonic() - started
        qemu.wait_for(rf"^{GUEST_NAME}> ")
        yield qemu, port, boot_to_ready
    assert qemu.process is not None and qemu.process.returncode is not None
    assert not qemu.group_alive(), "a process of QEMU's group survived"


def test_guest_boots_from_tftp_and_serves_ca(
    booted: tuple[QemuGuest, int, float], record_property: Callable[[str, object], None]
) -> None:
    from caproto import AlarmSeverity, AlarmStatus, ChannelType
    from caproto.sync import client

    # repeater=False: the sync client would otherwise spawn a CA repeater that outlives the test.
    read = functools.partial(client.read, repeater=False)
    write = functools.partial(client.write, repeater=False)

    qemu, port, boot_to_ready = booted
    console = qemu.console
    assert re.search(
        rf"guest-init: \[[\d.]+ s\] ip 10.0.2.15 hostname {GUEST_NAME} tftp 10.0.2.2", console
    ), console
    assert 'dbLoadRecords("db/guest.db","P=$(PREFIX)")' in console

    started = time.monotonic()
    assert list(read("PPC:setpoint", timeout=10).data) == [1.5]
    first_answer = time.monotonic() - started
    record_property("boot_to_ready_s", round(boot_to_ready, 2))
    record_property("ready_to_first_ca_answer_s", round(first_answer, 2))
    log.info("boot to %r: %.1f s; first CA answer %.2f s later", READY_LINE, boot_to_ready, first_answer)

    write("PPC:setpoint", 4, notify=True, timeout=10)
    wait_value(read, "PPC:double", 9.0)

    write("PPC:setpoint", 9, notify=True, timeout=10)
    reading = read("PPC:setpoint", data_type=ChannelType.TIME_DOUBLE, timeout=10)
    assert (reading.metadata.status, reading.metadata.severity) == (
        AlarmStatus.HIHI,
        AlarmSeverity.MAJOR_ALARM,
    )
    wait_value(read, "PPC:double", 19.0)
    write("PPC:setpoint", 50, notify=True, timeout=10)
    assert list(read("PPC:setpoint.VAL", timeout=10).data) == [10.0]  # DRVH clamps

    assert read("PPC:message", timeout=10).data == [b"hello from ppc64le"]
    write("PPC:message", "written by the host", notify=True, timeout=10)
    assert read("PPC:message", timeout=10).data == [b"written by the host"]

    # The console: the guest's terminal echoes what is typed, then the output, then the prompt.
    start = qemu.send("dbgf PPC:double")
    match = qemu.wait_for(r"^(DBF_DOUBLE:.*)\n" + re.escape(f"{GUEST_NAME}> "), start)
    assert match.group(1) == "DBF_DOUBLE:         21        "
    start = qemu.send("dbpf PPC:setpoint 2")
    qemu.wait_for(r"^DBF_DOUBLE: +2 *$", start)
    wait_value(read, "PPC:double", 5.0)
    start = qemu.send("bogus 1")
    qemu.wait_for(r"^Command bogus not found\.$", start)

    qemu.stop()
    assert qemu.process is not None and qemu.process.returncode is not None
    assert not qemu.group_alive()
    ours = [pid for pid in os.listdir("/proc") if pid.isdigit() and _cmdline_has(pid, str(port))]
    assert ours == [], f"QEMU processes for port {port} still running: {ours}"


def _cmdline_has(pid: str, text: str) -> bool:
    try:
        cmdline = Path("/proc", pid, "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return QEMU in cmdline and f"hostfwd=tcp:127.0.0.1:{text}-" in cmdline
