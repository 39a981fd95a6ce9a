"""The bound Channel Access clients, against real caproto servers on 127.0.0.1.

Two servers run in-process (asyncio, each in its own thread) with the same PV names and
different values, each on its own free port and bound to 127.0.0.1 only; their beacons go to
127.0.0.1 too. Every behaviour is checked for both backends.
"""

from __future__ import annotations

import asyncio
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from caproto import AlarmSeverity, AlarmStatus, ChannelType  # type: ignore[import-untyped]
from caproto.asyncio.server import Context  # type: ignore[import-untyped]
from caproto.server import PVGroup, pvproperty  # type: ignore[import-untyped]

from pytest_epics_multiarch import ca
from pytest_epics_multiarch.ca import BACKENDS, PYEPICS_HINT, make_ca_client
from pytest_epics_multiarch.ca.values import matches
from pytest_epics_multiarch.errors import CAError, CAPutError, CATimeoutError

PREFIX = "TEST:"
TARGET = "linux/amd64"


class FakeIoc(PVGroup):  # type: ignore[misc]
    """The PVs both servers serve."""

    ident = pvproperty(value="unset", name="ID", dtype=ChannelType.STRING)  # never written
    string = pvproperty(value="", name="STR", dtype=ChannelType.STRING)
    number = pvproperty(value=0.0, name="NUMBER")  # differs per server, never written
    flt = pvproperty(value=1.5, name="FLT")
    count = pvproperty(value=42, name="INT")
    mode = pvproperty(value="Off", name="MODE", enum_strings=["Off", "On", "Auto"], dtype=ChannelType.ENUM)
    wave = pvproperty(value=[1.0, 2.0, 3.0], name="WAVE")
    text = pvproperty(value="hello waveform", name="TEXT", dtype=ChannelType.CHAR, max_length=64)
    readonly = pvproperty(value=7, name="RO", read_only=True)
    refuses = pvproperty(value=0, name="REFUSES")
    slow = pvproperty(value=0.0, name="SLOW")
    slow_done = pvproperty(value=0.0, name="SLOW_DONE")
    hot = pvproperty(value=99.0, name="HOT", alarm_group="hot")
    ticks = pvproperty(value=0, name="TICKS")

    @refuses.putter  # type: ignore[no-redef, untyped-decorator]
    async def refuses(self, instance: Any, value: Any) -> None:
        raise ValueError("refused by the test IOC")

    @slow.putter  # type: ignore[no-redef, untyped-decorator]
    async def slow(self, instance: Any, value: Any) -> Any:
        # The put completes only after this, so SLOW_DONE must be set when put() returns.
        await asyncio.sleep(0.3)
        await self.slow_done.write(value)
        return value

    @ticks.scan(period=0.05)  # type: ignore[no-redef, untyped-decorator]
    async def ticks(self, instance: Any, async_lib: Any) -> None:
        await instance.write(instance.value + 1)


class OnlyOnB(PVGroup):  # type: ignore[misc]
    """A PV that only server B has: a client bound to A must never find it."""

    only = pvproperty(value=1, name="ONLY_B")


def free_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port: int = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port


class Server:
    """A caproto asyncio server in a thread, on 127.0.0.1:port only."""

    def __init__(self, label: str, number: float, *, only_on_b: bool = False) -> None:
        self.label = label
        self.number = number
        self.only_on_b = only_on_b
        self.port = free_port()
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._task: asyncio.Task[None] | None = None
        self._thread = threading.Thread(target=self._serve, name=f"ca-server-{label}", daemon=True)

    def _serve(self) -> None:
        self._task = self._loop.create_task(self._main())
        try:
            self._loop.run_until_complete(self._task)
        finally:
            self._loop.close()

    async def _main(self) -> None:
        group = FakeIoc(prefix=PREFIX)
        await group.ident.write(self.label)
        await group.number.write(self.number)
        await group.hot.write(99.0, status=AlarmStatus.HIHI, severity=AlarmSeverity.MAJOR_ALARM)
        pvdb = dict(group.pvdb)
        if self.only_on_b:
            pvdb.update(OnlyOnB(prefix=PREFIX).pvdb)
        context = Context(pvdb, interfaces=["127.0.0.1"])
        context.ca_server_port = self.port  # UDP and first TCP port tried

        async def ready(async_lib: Any) -> None:
            self._ready.set()

        await context.run(startup_hook=ready)

    def start(self) -> None:
        # The server reads its beacon list from the environment when it starts: keep
        # beacons on 127.0.0.1 (the default is a broadcast).
        with pytest.MonkeyPatch.context() as env:
            env.setenv("EPICS_CAS_AUTO_BEACON_ADDR_LIST", "NO")
            env.setenv("EPICS_CAS_BEACON_ADDR_LIST", "127.0.0.1")
            self._thread.start()
            deadline = time.monotonic() + 10
            while not self._ready.wait(0.05):
                if not self._thread.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"test CA server {self.label} did not start")

    def stop(self) -> None:
        task = self._task
        if task is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(task.cancel)
        self._thread.join(5)


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[Server, Server]]:
    a = Server("server-A", 1.0)
    b = Server("server-B", 2.0, only_on_b=True)
    a.start()
    try:
        b.start()
        yield a, b
    finally:
        b.stop()
        a.stop()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    if name == "pyepics":
        pytest.importorskip("epics", reason="pyepics is not installed")
    return name


@pytest.fixture
def client(backend: str, servers: tuple[Server, Server]) -> Iterator[ca.CAClient]:
    c = make_ca_client(backend, "127.0.0.1", servers[0].port, timeout=2.0, target=TARGET)
    yield c
    c.close()


def pv(name: str) -> str:
    return PREFIX + name


def assert_names_everything(err: CAError, name: str, port: int) -> None:
    text = str(err)
    assert text.startswith(f"[{TARGET}] ")
    assert repr(name) in text
    assert f"127.0.0.1:{port}" in text
    assert "seen: " in text
    assert "Hint: " in text


# --- get ----------------------------------------------------------------------------------


def test_get_returns_python_values_by_native_type(client: ca.CAClient) -> None:
    assert client.get(pv("ID")) == "server-A"
    value = client.get(pv("NUMBER"))
    assert type(value) is float and value == 1.0
    count = client.get(pv("INT"))
    assert type(count) is int and count == 42
    mode = client.get(pv("MODE"))
    assert type(mode) is int and mode in (0, 1, 2)  # an enum, natively: its index
    wave = client.get(pv("WAVE"))
    assert isinstance(wave, list) and len(wave) == 3 and all(type(v) is float for v in wave)
    assert client.get(pv("TEXT"), as_string=True) == "hello waveform"
    assert client.get(pv("TEXT"))[:5] == list(b"hello")  # a char waveform, natively


def test_get_as_string_is_the_iocs_form(client: ca.CAClient) -> None:
    client.put(pv("MODE"), 2)
    assert client.get(pv("MODE"), as_string=True) == "Auto"
    assert client.get(pv("MODE")) == 2
    assert float(client.get(pv("NUMBER"), as_string=True)) == 1.0


def test_get_of_a_missing_pv_names_pv_address_and_hint(
    client: ca.CAClient, servers: tuple[Server, Server]
) -> None:
    with pytest.raises(CATimeoutError) as info:
        client.get(pv("MISSING"), timeout=0.3)
    assert_names_everything(info.value, pv("MISSING"), servers[0].port)
    assert "not connected" in str(info.value)
    assert f"CA port {servers[0].port} published on 127.0.0.1" in str(info.value)


# --- put ----------------------------------------------------------------------------------


def test_put_waits_for_completion(client: ca.CAClient) -> None:
    value = float(time.monotonic() % 1000)
    started = time.monotonic()
    client.put(pv("SLOW"), value)
    assert time.monotonic() - started >= 0.25
    # The putter sets SLOW_DONE just before it completes the put.
    assert client.get(pv("SLOW_DONE")) == value
    assert client.get(pv("SLOW")) == value


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("FLT", 2.25, 2.25),
        ("INT", 7, 7),
        ("INT", "12", 12),  # a string: the IOC converts it
        ("MODE", "On", 1),  # an enum by its state name
        ("WAVE", [4, 5, 6.5], [4.0, 5.0, 6.5]),
        ("STR", "written", "written"),
    ],
)
def test_put_then_value_reads_back(client: ca.CAClient, name: str, value: Any, expected: Any) -> None:
    client.put(pv(name), value)
    assert client.get(pv(name)) == expected


def test_put_text_into_a_char_waveform(client: ca.CAClient) -> None:
    client.put(pv("TEXT"), "new text")
    assert client.get(pv("TEXT"), as_string=True) == "new text"
    client.put(pv("TEXT"), "hello waveform")


def test_put_refused_by_the_ioc_raises_put_error(client: ca.CAClient, servers: tuple[Server, Server]) -> None:
    with pytest.raises(CAPutError) as info:
        client.put(pv("REFUSES"), 3, timeout=2.0)
    assert_names_everything(info.value, pv("REFUSES"), servers[0].port)
    text = str(info.value)
    assert "could not put 3 to" in text
    assert "rejected: " in text
    assert "write request failed" in text  # what the IOC answered (ECA_PUTFAIL)


def test_put_of_an_unknown_enum_state_raises_put_error(client: ca.CAClient) -> None:
    before = client.get(pv("MODE"))
    with pytest.raises(CAPutError) as info:
        client.put(pv("MODE"), "Bogus", timeout=2.0)
    assert "could not put 'Bogus' to 'TEST:MODE'" in str(info.value)
    assert "seen: rejected: " in str(info.value)
    assert client.get(pv("MODE")) == before


def test_put_to_a_read_only_pv_raises_put_error(client: ca.CAClient) -> None:
    with pytest.raises(CAPutError, match="read-only access") as info:
        client.put(pv("RO"), 1)
    assert "access security" in str(info.value)
    assert client.get(pv("RO")) == 7


def test_put_of_a_too_long_string_is_not_sent(client: ca.CAClient) -> None:
    with pytest.raises(CAPutError, match="not sent: 45 bytes"):
        client.put(pv("STR"), "x" * 45)


# --- wait_for -----------------------------------------------------------------------------


def test_wait_for_a_predicate(client: ca.CAClient) -> None:
    start = client.get(pv("TICKS"))
    value = client.wait_for(pv("TICKS"), lambda v: v >= start + 3, timeout=5.0)
    assert value >= start + 3


def test_wait_for_a_value_set_later(client: ca.CAClient) -> None:
    client.put(pv("FLT"), 0.0)
    timer = threading.Timer(0.2, client.put, args=(pv("FLT"), 0.1 + 0.2))
    timer.start()
    try:
        assert math.isclose(client.wait_for(pv("FLT"), 0.3, timeout=3.0), 0.3)  # tolerance
    finally:
        timer.join()


def test_wait_for_an_enum_state_name(client: ca.CAClient) -> None:
    client.put(pv("MODE"), "Auto")
    assert client.wait_for(pv("MODE"), "Auto", timeout=2.0) == "Auto"


def test_wait_for_timeout_reports_the_last_value(client: ca.CAClient, servers: tuple[Server, Server]) -> None:
    started = time.monotonic()
    with pytest.raises(CATimeoutError) as info:
        client.wait_for(pv("NUMBER"), 999.0, timeout=0.4)
    assert time.monotonic() - started < 2.0
    assert_names_everything(info.value, pv("NUMBER"), servers[0].port)
    assert "did not reach 999.0 within 0.4 s" in str(info.value)
    assert "last value seen: 1.0" in str(info.value)


# --- monitor ------------------------------------------------------------------------------


def test_monitor_receives_updates(client: ca.CAClient) -> None:
    client.put(pv("FLT"), 5.0)
    with client.monitor(pv("FLT")) as updates:
        assert updates.next(2.0) == 5.0  # the value at subscription time
        client.put(pv("FLT"), 6.0)
        client.put(pv("FLT"), 7.0)
        assert updates.next(2.0) == 6.0
        deadline = time.monotonic() + 2.0
        rest: list[Any] = []
        while 7.0 not in rest and time.monotonic() < deadline:
            rest += updates.drain()
            time.sleep(0.02)
        assert rest == [7.0]
        with pytest.raises(CATimeoutError, match=r"no update of 'TEST:FLT' within 0\.1 s"):
            updates.next(0.1)
    updates.close()  # idempotent


def test_monitor_of_a_missing_pv_fails_after_the_client_timeout(
    backend: str, servers: tuple[Server, Server]
) -> None:
    c = make_ca_client(backend, "127.0.0.1", servers[0].port, timeout=0.3)
    try:
        with pytest.raises(CATimeoutError, match="could not monitor 'TEST:MISSING'"):
            c.monitor(pv("MISSING"))
    finally:
        c.close()


def test_closing_the_client_closes_its_monitors(backend: str, servers: tuple[Server, Server]) -> None:
    c = make_ca_client(backend, "127.0.0.1", servers[0].port, timeout=2.0)
    updates = c.monitor(pv("TICKS"))
    updates.next(2.0)
    c.close()
    updates.drain()
    time.sleep(0.2)  # TICKS changes every 0.05 s
    assert updates.drain() == []
    with pytest.raises(CATimeoutError, match="the monitor was closed after"):
        updates.next(0.05)


# --- alarm, exists, close -----------------------------------------------------------------


def test_alarm_severity_and_status(client: ca.CAClient) -> None:
    assert client.alarm(pv("HOT")) == ("MAJOR", "HIHI")
    assert client.alarm(pv("NUMBER")) == ("NO_ALARM", "NO_ALARM")


def test_exists(client: ca.CAClient) -> None:
    assert client.exists(pv("NUMBER"))
    started = time.monotonic()
    assert not client.exists(pv("MISSING"), timeout=0.3)
    assert time.monotonic() - started < 1.5


def test_close_is_idempotent_and_later_calls_fail(backend: str, servers: tuple[Server, Server]) -> None:
    c = make_ca_client(backend, "127.0.0.1", servers[0].port, timeout=2.0, target=TARGET)
    assert c.get(pv("NUMBER")) == 1.0
    c.close()
    c.close()
    with pytest.raises(CAError, match="the client is closed"):
        c.get(pv("NUMBER"))


# --- binding ------------------------------------------------------------------------------


def test_each_client_reads_only_its_own_server(
    backend: str, servers: tuple[Server, Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = servers
    # The process environment points at B: a client bound to A must not follow it.
    for name, value in {
        "EPICS_CA_ADDR_LIST": f"127.0.0.1:{b.port}",
        "EPICS_CA_AUTO_ADDR_LIST": "NO",
        "EPICS_CA_NAME_SERVERS": f"127.0.0.1:{b.port}",
        "EPICS_CA_SERVER_PORT": str(b.port),
    }.items():
        monkeypatch.setenv(name, value)
    client_a = make_ca_client(backend, "127.0.0.1", a.port, timeout=2.0)
    client_b = make_ca_client(backend, "127.0.0.1", b.port, timeout=2.0)
    try:
        assert client_a.address == ("127.0.0.1", a.port)
        assert client_a.get(pv("ID")) == "server-A"
        assert client_b.get(pv("ID")) == "server-B"
        assert client_a.get(pv("NUMBER")) == 1.0
        assert client_b.get(pv("NUMBER")) == 2.0
        assert client_b.exists(pv("ONLY_B"))
        assert not client_a.exists(pv("ONLY_B"), timeout=0.5)
        # Whatever a backend did to build its context, the environment is as it was.
        assert os.environ["EPICS_CA_ADDR_LIST"] == f"127.0.0.1:{b.port}"
        assert os.environ["EPICS_CA_SERVER_PORT"] == str(b.port)
        assert os.environ["EPICS_CA_NAME_SERVERS"] == f"127.0.0.1:{b.port}"
    finally:
        client_a.close()
        client_b.close()


def test_a_client_made_before_the_environment_changes_stays_bound(
    client: ca.CAClient, servers: tuple[Server, Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    # caproto reads EPICS_CA_ADDR_LIST at every search: changing it later must not matter.
    monkeypatch.setenv("EPICS_CA_ADDR_LIST", f"127.0.0.1:{servers[1].port}")
    monkeypatch.setenv("EPICS_CA_AUTO_ADDR_LIST", "NO")
    assert not client.exists(pv("ONLY_B"), timeout=0.5)
    assert client.get(pv("ID")) == "server-A"


# --- factory ------------------------------------------------------------------------------


def test_unknown_backend_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"'pyepcs'.*caproto, pyepics"):
        make_ca_client("pyepcs", "127.0.0.1", 5064)


def test_missing_pyepics_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "epics", None)
    monkeypatch.setitem(sys.modules, "epics.ca", None)
    with pytest.raises(CAError) as info:
        make_ca_client("pyepics", "127.0.0.1", 5064, target=TARGET)
    assert info.value.hint == PYEPICS_HINT
    assert str(info.value).startswith(f"[{TARGET}] ")


# --- value rules --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("actual", "expected", "equal"),
    [
        (0.30000000000000004, 0.3, True),
        (0.1, 0.10000000149011612, True),  # a FLOAT field's 0.1
        (1.0, 1, True),
        (1.01, 1.0, False),
        ([1.0, 2.0], [1, 2.0000000001], True),
        ([1.0, 2.0], [1.0], False),
        ("On", "On", True),
        (1, "1", False),
    ],
)
def test_wait_for_equality(actual: Any, expected: Any, equal: bool) -> None:
    assert matches(actual, expected) is equal
