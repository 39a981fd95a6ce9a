"""miniioc on the host, serving Channel Access on 127.0.0.1 (the guest's program, no QEMU)."""

from __future__ import annotations

import functools
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

caproto_client = pytest.importorskip("caproto.sync.client")
from caproto import AlarmSeverity, AlarmStatus, CaprotoTimeoutError, ChannelType  # noqa: E402

GUEST = Path(__file__).resolve().parents[1] / "guest"


def free_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 (CA uses the same number for both)."""
    for _ in range(50):
        with socket.socket() as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return int(port)
    raise RuntimeError("no free port")


class Console:
    """Collects a process's output in the background; waits for text with a deadline."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process
        self.chunks: list[str] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        while True:
            data = os.read(self.process.stdout.fileno(), 4096)
            if not data:
                return
            with self.lock:
                self.chunks.append(data.decode("latin-1"))

    @property
    def text(self) -> str:
        with self.lock:
            return "".join(self.chunks).replace("\r\n", "\n")

    def wait_for(self, pattern: str, start: int = 0, timeout: float = 20.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            match = re.compile(pattern, re.MULTILINE).search(self.text, start)
            if match:
                return match
            if self.process.poll() is not None:
                time.sleep(0.2)
                pytest.fail(f"exited ({self.process.returncode}) before {pattern!r}:\n{self.text}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {pattern!r} within {timeout} s; output:\n{self.text[-3000:]}")
            time.sleep(0.05)

    def send(self, line: str) -> int:
        """Send a command; returns the output offset to search from."""
        offset = len(self.text)
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        self.process.stdin.flush()
        return offset


@pytest.fixture
def ioc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Console]:
    port = free_port()
    (tmp_path / "st.cmd").write_text(
        f'epicsEnvSet("EPICS_CA_SERVER_PORT","{port}")\ndbLoadRecords("test.db","P=H:")\niocInit\n'
    )
    (tmp_path / "test.db").write_text(
        'record(ao, "$(P)ao") { field(VAL, "1") field(DRVH, "10") field(DRVL, "-10")\n'
        '  field(HIHI, "8") field(HHSV, "MAJOR") field(PREC, "3") field(EGU, "mm") }\n'
        'record(calc, "$(P)calc") { field(INPA, "$(P)ao CP") field(CALC, "A*2+1") }\n'
        'record(stringout, "$(P)so") { field(VAL, "hello") }\n'
        'record(mbbo, "$(P)mode") { field(ZRST, "Off") field(ONST, "On") field(TWST, "Auto") }\n'
        'record(waveform, "$(P)wf") { field(NELM, "4") field(FTVL, "DOUBLE") }\n'
        'record(calc, "$(P)count") { field(SCAN, ".2 second") field(INPA, "$(P)count") field(CALC, "A+1") }\n'
        'record(ao, "$(P)ro") { field(VAL, "42") field(DISP, "1") }\n'
        'record(ai, "$(P)udf") {}\n'
    )
    env = dict(
        os.environ,
        PYTHONPATH=str(GUEST),
        EPICS_CAS_AUTO_BEACON_ADDR_LIST="NO",
        EPICS_CAS_BEACON_ADDR_LIST="127.0.0.1",
    )
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "miniioc",
            "--root",
            str(tmp_path),
            "--hostname",
            "hostioc",
            "--interface",
            "127.0.0.1",
            "st.cmd",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        console = Console(process)
        console.wait_for(r"^iocRun: All initialization complete$")
        console.wait_for(r"hostioc> ")
        monkeypatch.setenv("EPICS_CA_ADDR_LIST", f"127.0.0.1:{port}")
        monkeypatch.setenv("EPICS_CA_AUTO_ADDR_LIST", "NO")
        yield console
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


def test_ca_get_put_follow_and_alarms(ioc: Console) -> None:
    # repeater=False: the sync client would otherwise spawn a CA repeater that outlives the test.
    read = functools.partial(caproto_client.read, repeater=False)
    write = functools.partial(caproto_client.write, repeater=False)
    assert list(read("H:ao", timeout=5).data) == [1.0]
    write("H:ao", 4, notify=True, timeout=5)
    assert list(read("H:calc").data) == [9.0]
    write("H:ao.VAL", 50, notify=True)
    reading = read("H:ao", data_type=ChannelType.CTRL_DOUBLE)
    assert list(reading.data) == [10.0]  # clamped to DRVH
    assert reading.metadata.status == AlarmStatus.HIHI
    assert reading.metadata.severity == AlarmSeverity.MAJOR_ALARM
    assert (reading.metadata.precision, reading.metadata.units) == (3, b"mm")
    assert (reading.metadata.upper_ctrl_limit, reading.metadata.lower_ctrl_limit) == (10, -10)
    assert list(read("H:calc").data) == [21.0]
    assert read("H:so").data == [b"hello"]
    write("H:so", "world", notify=True)
    assert read("H:so").data == [b"world"]
    write("H:mode", "Auto", notify=True)
    assert read("H:mode", data_type=ChannelType.STRING).data == [b"Auto"]
    write("H:wf", [1.5, 2.5], notify=True)
    assert list(read("H:wf").data) == [1.5, 2.5]
    first = read("H:count").data[0]
    time.sleep(0.5)
    assert read("H:count").data[0] >= first + 1  # the periodic scan runs


def test_console_commands_reach_ca(ioc: Console) -> None:
    start = ioc.send("dbpf H:ao 2")
    ioc.wait_for(r"DBF_DOUBLE:\s+2\s*$", start)
    assert list(caproto_client.read("H:calc", timeout=5, repeater=False).data) == [5.0]
    # Without a terminal nothing echoes the command: the output follows the prompt.
    start = ioc.send("dbgf H:calc")
    ioc.wait_for(r"hostioc> $", start)
    assert ioc.text[start:] == "DBF_DOUBLE:         5         \nhostioc> "
    start = ioc.send("frobnicate")
    ioc.wait_for(r"hostioc> $", start)
    assert ioc.text[start:] == "Command frobnicate not found.\nhostioc> "
    ioc.send("exit")
    assert ioc.process.wait(timeout=10) == 0


def put_status(pv: str, value: object) -> str:
    """The name of the status a put-callback completed with (ECA_NORMAL, ECA_PUTFAIL...)."""
    response = caproto_client.write(pv, value, notify=True, timeout=5, repeater=False)
    return str(response.status.name)


def test_disp_refuses_ca_puts_except_to_disp_itself(ioc: Console) -> None:
    read = functools.partial(caproto_client.read, repeater=False, timeout=5)
    write = put_status
    # As an EPICS IOC answers a put-callback that dbPutField refused: ECA_PUTFAIL, value kept.
    assert write("H:ro", 7) == "ECA_PUTFAIL"
    assert list(read("H:ro").data) == [42.0]
    assert write("H:ro.EGU", "mm") == "ECA_PUTFAIL"
    assert write("H:ro.DISP", [0]) == "ECA_NORMAL"  # a list: caproto's client needs one for CHAR
    assert write("H:ro", 7) == "ECA_NORMAL"
    assert list(read("H:ro").data) == [7.0]
    assert write("H:ro.DISP", [1]) == "ECA_NORMAL"
    assert write("H:ro", 8) == "ECA_PUTFAIL"
    assert list(read("H:ro").data) == [7.0]
    # A refused put is the client's business: nothing about it on the IOC's console.
    assert "H:ro" not in ioc.text and "Invalid write" not in ioc.text
    start = ioc.send("dbgf H:ro.DISP")
    ioc.wait_for(r"DBF_UCHAR:\s+1 = 0x1", start)


def test_fields_are_pvs_of_their_epics_type(ioc: Console) -> None:
    read = functools.partial(caproto_client.read, repeater=False, timeout=5)
    write = functools.partial(caproto_client.write, repeater=False, timeout=5, notify=True)
    write("H:wf", [1.5, 2.5, 3.5])
    # EPICS serves DBF_ULONG (NORD) as DBR_DOUBLE, DBF_UCHAR (DISP) as DBR_CHAR.
    nord = read("H:wf.NORD")
    assert (nord.data_type, list(nord.data)) == (ChannelType.DOUBLE, [3.0])
    assert (read("H:ro.DISP").data_type, list(read("H:ro.DISP").data)) == (ChannelType.CHAR, [1])
    assert list(read("H:ao.DISP").data) == [0]
    prec = read("H:ao.PREC")
    assert (prec.data_type, list(prec.data)) == (ChannelType.INT, [3])
    assert read("H:ao.EGU").data == [b"mm"]
    assert read("H:ao.HHSV", data_type=ChannelType.STRING).data == [b"MAJOR"]
    # STAT's menu has 22 choices, more than a CA enum carries; its string form has them all.
    assert read("H:udf.STAT", data_type=ChannelType.STRING).data == [b"UDF"]
    assert read("H:udf.SEVR", data_type=ChannelType.STRING).data == [b"INVALID"]
    # A field PV follows its record.
    assert read("H:ao.SEVR", data_type=ChannelType.STRING).data == [b"NO_ALARM"]
    write("H:ao", 9)
    assert read("H:ao.SEVR", data_type=ChannelType.STRING).data == [b"MAJOR"]
    write("H:wf", [1.0])
    assert list(read("H:wf.NORD").data) == [1.0]
    # Writable fields change the record; computed ones are read-only.
    write("H:ao.DRVH", 5)
    write("H:ao", 9)
    assert list(read("H:ao").data) == [5.0]
    with pytest.raises(Exception, match="(?i)access|write"):
        put_status("H:wf.NORD", 2)  # the client sees read-only access
    with pytest.raises(CaprotoTimeoutError):
        read("H:ao.NOPE", timeout=1)


@pytest.mark.parametrize("failing", ["", "caproto.asyncio"])
def test_server_context_import_with_and_without_the_shortcut(failing: str) -> None:
    """caserver skips caproto's heavy package __init__s, and falls back to the plain import."""
    code = (
        "import importlib.util as u, sys\n"
        "original = u.find_spec\n"
        f"u.find_spec = lambda n, *a: None if n == {failing!r} else original(n, *a)\n"
        "import miniioc.caserver as c\n"
        "print(c.Context.__module__, 'caproto.server.records' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(os.environ, PYTHONPATH=str(GUEST)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout
    heavy_loaded = "True" if failing else "False"
    assert result.stdout.split() == ["caproto.asyncio.server", heavy_loaded]
