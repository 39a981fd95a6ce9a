"""Emulated IOCs: boot a payload under QEMU, serve its startup files over TFTP, drive its console.

QEMU runs in its own process group with the serial console on stdio. The runner lays out the
TFTP folder the IOC reads (``epics/<hostname>/st.cmd`` plus the files it loads), moving the CA
server to a free port N with ``epicsEnvSet`` before ``iocInit``, and forwards N (TCP and UDP)
from 127.0.0.1. Stopping escalates: QMP ``quit``, then SIGTERM, then SIGKILL to the group.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from ..console import Console
from ..engine import LABEL_KEEP, Owner, owner_is_alive
from ..errors import IocStartError
from ..payload import Payload
from .base import ConsoleRunner, ReadyProbe, free_port
from .profiles import QemuProfile, QemuSettings, TftpLayout, fatal_patterns, inject_ca_port

log = logging.getLogger("pytest_epics_multiarch.runners.qemu")

#: What QEMU prints when a hostfwd port was taken between choosing it and binding it.
_PORT_TAKEN = "Could not set up host forwarding rule"

#: Stamps each QEMU process with its owner's labels (JSON), as labels stamp a container. QEMU
#: runs in a session of its own, so it outlives a session that crashed (SIGKILL, OOM): without
#: the stamp nothing could tell that emulator from a live session's, and it ran forever.
OWNER_ENV = "PYTEST_EPICS_MULTIARCH_OWNER"

_sweep_lock = threading.Lock()
_swept = False


class QemuIoc(ConsoleRunner):
    """One emulated IOC: ``start()`` returns once it serves Channel Access."""

    def __init__(
        self,
        *,
        target: str,
        profile: QemuProfile,
        payload: Payload,
        settings: QemuSettings,
        work_dir: Path,
        start_timeout: float,
        log_path: Path | None = None,
        ready_probe: ReadyProbe | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(
            target=target,
            name=f"qemu {profile.name} ({payload.kernel.name})",
            start_timeout=start_timeout,
            log_path=log_path,
            ready_probe=ready_probe,
        )
        self.profile = profile
        self.payload = payload
        self.settings = settings
        self.work_dir = work_dir
        self.start_hint = (
            f"read the console above; the command line is at the top of the console log ({log_path}); "
            "raise qemu.boot_timeout if the boot is just slow"
        )
        self.argv: list[str] = []
        #: This end of QEMU's control (QMP) socket pair (see QemuProfile.command).
        self._qmp: socket.socket | None = None
        self._process: subprocess.Popen[bytes] | None = None
        #: The owner's labels (with keep=true for --epics-keep-iocs), stamped on the process.
        self.labels = dict(labels) if labels is not None else Owner.current().labels()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        started = time.monotonic()
        if shutil.which(self.profile.binary) is None:
            raise IocStartError(
                f"{self.profile.binary} is not installed",
                target=self.target,
                seen=f"QEMU profile {self.profile.name} boots with {self.profile.binary}",
                hint="install QEMU (Debian: apt-get install qemu-system-ppc qemu-system-data)",
            )
        self.work_dir.mkdir(parents=True, exist_ok=True)
        _sweep_once()
        for attempt in range(5):
            port = free_port() if self.settings.serve_startup else self.settings.ca_port
            self._launch(port)
            try:
                self._wait_ready(started, fatal=fatal_patterns())
                break
            except IocStartError:
                if _PORT_TAKEN in self.logs() and self.settings.serve_startup and attempt < 4:
                    log.info("%s: port %d was taken meanwhile, trying another", self.target, port)
                    self._kill()
                    continue
                raise
        self.start_seconds = time.monotonic() - started

    def layout_tftp(self, port: int) -> TftpLayout | None:
        """The TFTP root the IOC reads its startup files from (None when they are built in)."""
        if not self.settings.serve_startup:
            return None
        layout = TftpLayout(self.work_dir / "tftp", self.settings.hostname)
        if layout.root.exists():
            shutil.rmtree(layout.root)
        layout.folder.parent.mkdir(parents=True)
        if self.payload.assets is not None and self.payload.assets.is_dir():
            # Hard links: the assets may be large (a kernel beside them) and are never written.
            shutil.copytree(self.payload.assets, layout.folder, copy_function=_link_or_copy)
        else:
            layout.folder.mkdir()
        if self.payload.startup is None:
            raise IocStartError(
                "no startup script to serve",
                target=self.target,
                hint="set ioc.startup (or qemu.startup) to the st.cmd path inside the image, or "
                "qemu.serve_startup: false when the startup files are compiled into the boot image",
            )
        text = self.payload.startup.read_text()
        if layout.st_cmd.exists():
            layout.st_cmd.unlink()  # a hard link into the payload: never write through it
        layout.st_cmd.write_text(inject_ca_port(text, port))
        return layout

    def _launch(self, port: int) -> None:
        self._kill()
        self.ca_address = ("127.0.0.1", port)
        layout = self.layout_tftp(port)
        self._qmp, qemu_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.argv = self.profile.command(
            kernel=self.payload.kernel,
            port=port,
            hostname=self.settings.hostname,
            tftp_root=layout.root if layout else None,
            bios=self.payload.bios,
            initrd=self.payload.initrd,
            qmp_fd=qemu_end.fileno(),
        )
        log.info("%s: %s", self.target, " ".join(self.argv))
        self._note("$ " + " ".join(self.argv))
        try:
            process = subprocess.Popen(
                self.argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                cwd=self.work_dir,
                env={**os.environ, OWNER_ENV: json.dumps(self.labels)},
                start_new_session=True,  # its own process group: stop() signals QEMU and anything it spawned
                pass_fds=(qemu_end.fileno(),),
            )
        except BaseException:
            self._qmp.close()
            self._qmp = None
            raise
        finally:
            qemu_end.close()  # QEMU holds its own copy now
        self._process = process
        assert process.stdout is not None and process.stdin is not None
        stdout_fd, stdin = process.stdout.fileno(), process.stdin

        def write(data: bytes) -> None:
            stdin.write(data)
            stdin.flush()

        self._console = Console(
            lambda: os.read(stdout_fd, 65536),
            write,
            name=self.name,
            target=self.target,
            log_path=self.log_path,
        )

    def _exit_description(self) -> str | None:
        code = self._process.poll() if self._process else None
        return f"QEMU exited with code {code}" if code is not None else None

    def stop(self) -> None:
        """Stop QEMU and everything in its process group; safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        self._kill()
        shutil.rmtree(self.work_dir / "tftp", ignore_errors=True)

    def _kill(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            self._quit_via_qmp()
            if not _wait(process, 2.0):
                _signal_group(process.pid, signal.SIGTERM)
                if not _wait(process, 3.0):
                    _signal_group(process.pid, signal.SIGKILL)
                    _wait(process, 5.0)
        if process is not None:
            _signal_group(process.pid, signal.SIGKILL)  # stragglers of the group, if any
            for stream in (process.stdin, process.stdout):
                try:
                    if stream is not None:
                        stream.close()
                except OSError:
                    pass
        qmp, self._qmp = self._qmp, None
        if qmp is not None:
            qmp.close()
        if self._console is not None:
            self._console.close()

    def _quit_via_qmp(self) -> None:
        sock = self._qmp
        if sock is None:
            return
        try:
            sock.settimeout(1.0)
            sock.recv(4096)  # the greeting
            for command in ({"execute": "qmp_capabilities"}, {"execute": "quit"}):
                sock.sendall(json.dumps(command).encode() + b"\n")
                sock.recv(4096)
        except OSError:
            pass  # SIGTERM follows

    # -- what tests use ----------------------------------------------------------------------

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def reach_hint(self) -> str:
        host, port = self.ca_address
        pid = self._process.pid if self._process else "?"
        return (
            f"{self.target}: QEMU pid {pid} serves CA on {host}:{port} "
            f"(EPICS_CA_ADDR_LIST={host}:{port} EPICS_CA_AUTO_ADDR_LIST=NO caget ...); "
            f"stop: kill -- -{pid}"
        )


def owner_stamp(pid: str) -> dict[str, str] | None:
    """The owner labels stamped on process ``pid``, or None (not one of ours, or unreadable)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    prefix = OWNER_ENV.encode() + b"="
    for entry in environ.split(b"\0"):
        if entry.startswith(prefix):
            try:
                labels = json.loads(entry[len(prefix) :])
            except ValueError:
                return None
            return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else None
    return None


def sweep_leftovers(host: str) -> list[str]:
    """Kill the QEMU IOCs of dead sessions on this host (kept ones excepted); return them.

    The counterpart of the engine's container sweep: only processes stamped by this plugin, whose
    owner process has ended, and that lead their own process group (as QEMU IOCs are started).
    """
    killed: list[str] = []
    for entry in Path("/proc").glob("[0-9]*"):
        labels = owner_stamp(entry.name)
        if labels is None or labels.get(LABEL_KEEP) == "true" or owner_is_alive(labels, host):
            continue
        pid = int(entry.name)
        try:
            if os.getpgid(pid) != pid:
                continue
        except ProcessLookupError:
            continue
        _signal_group(pid, signal.SIGKILL)
        killed.append(f"QEMU pid {pid}")
    return killed


def _sweep_once() -> None:
    """Sweep leftover QEMU IOCs before this process boots its first one."""
    global _swept
    with _sweep_lock:
        if _swept:
            return
        _swept = True
        killed = sweep_leftovers(socket.gethostname())
    if killed:
        log.info("removed leftover QEMU IOC(s) of dead sessions: %s", ", ".join(killed))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _wait(process: subprocess.Popen[bytes], timeout: float) -> bool:
    try:
        process.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
