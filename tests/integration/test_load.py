"""Load: many IOCs one after another, and many at once, leave nothing behind and never share a port.

Nothing here is timed: the assertions are on what is left (containers, docker-proxy processes,
ports, file descriptors, threads) and on which IOC answered, never on how long it took.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import threading
from pathlib import Path

import docker
import pytest

from pytest_epics_multiarch.engine import LABEL_CA_PORT, LABEL_SESSION
from pytest_epics_multiarch.session import EpicsSession
from pytest_epics_multiarch.settings import Settings

from .conftest import SAMPLE

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.usefixtures("subprocess_env")]

CYCLES = 50


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def port_is_free(port: int) -> bool:
    """Whether ``port`` can be bound on 127.0.0.1 for TCP and UDP again."""
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def test_fifty_start_stop_cycles_leave_nothing_behind(tmp_path: Path) -> None:
    session = EpicsSession(Settings(arch=("linux/amd64",)), work_dir=tmp_path, progress=lambda m: None)
    config = session.config_for(SAMPLE / "tests")
    target = config.target("linux/amd64")
    client = docker.from_env()
    mine = {"label": f"{LABEL_SESSION}={session.owner.session}"}
    ports: list[int] = []
    try:
        image = session.image(config, target)
        for cycle in range(CYCLES):
            ioc = session.start_ioc(config, target, image)
            ports.append(ioc.ca_address[1])
            # The client reaches this cycle's IOC, not an earlier one that lingers.
            ioc.ca.put("SAMPLE:MESSAGE", f"cycle {cycle}")
            assert ioc.ca.get("SAMPLE:MESSAGE") == f"cycle {cycle}"
            session.iocs.release(ioc)
            assert not ioc.is_running()
            if cycle == 0:
                gc.collect()
                fds, threads = open_fds(), threading.active_count()
        assert session.iocs.live() == []
        # What remains is the spare started after the last hand-out (--epics-spare-iocs 1), never
        # a released IOC; the session's end removes it too.
        session.iocs.wait_for_spares(60)
        left = client.containers.list(all=True, filters=mine)
        spares = [spare.ca_address[1] for spare in session.iocs.spare_iocs()]
        assert len(spares) == 1 and [int(c.labels[LABEL_CA_PORT]) for c in left] == spares
        ports += spares  # its port must be freed as well
    finally:
        session.close()
    assert client.containers.list(all=True, filters=mine) == []
    proxies = subprocess.run(["pgrep", "-af", "docker-proxy"], capture_output=True, text=True).stdout
    assert not [port for port in ports if f"-host-port {port} " in proxies]
    assert all(port_is_free(port) for port in ports)
    # What the test process holds does not grow with the number of IOCs it started and stopped.
    gc.collect()
    assert open_fds() <= fds + 5, os.listdir("/proc/self/fd")
    assert threading.active_count() <= threads + 2, threading.enumerate()


#: Four modules, one per xdist worker (--dist loadfile), each with two IOCs: eight at once. Each
#: waits until all eight are up before it checks, and until all have checked before it ends.
EIGHT_AT_ONCE = """
import json
import os
import time
from pathlib import Path

import docker

from pytest_epics_multiarch.engine import LABEL_CA_PORT

FOLDER = Path(os.environ["EIGHT_AT_ONCE"])


def wait_for(pattern, count):
    deadline = time.monotonic() + 120
    while len(list(FOLDER.glob(pattern))) < count:
        assert time.monotonic() < deadline, f"only {len(list(FOLDER.glob(pattern)))} of {count} {pattern}"
        time.sleep(0.1)


def test_two_iocs_among_eight(ioc, ioc_factory, worker_id):
    other = ioc_factory()
    name = Path(__file__).stem
    mine = {ioc.ca_address[1]: f"{name} first", other.ca_address[1]: f"{name} second"}
    for each in (ioc, other):
        each.ca.put("SAMPLE:MESSAGE", mine[each.ca_address[1]])
    (FOLDER / f"{name}.up").write_text(json.dumps({"worker": worker_id, "ports": list(mine)}))
    wait_for("*.up", 8 // 2)
    # All eight run now: each still holds what was put into it, through its own port.
    for each in (ioc, other):
        assert each.ca.get("SAMPLE:MESSAGE") == mine[each.ca_address[1]]
    client = docker.from_env()
    for port in mine:
        (container,) = client.containers.list(filters={"label": f"{LABEL_CA_PORT}={port}"})
        host = container.attrs["HostConfig"]
        assert host["Privileged"] is False
        assert host["NetworkMode"] == "bridge"
        assert not host.get("CapAdd") and not host.get("Devices") and not host.get("Binds")
        assert host.get("PidMode", "") == "" and host.get("IpcMode") != "host"
        assert set(host["PortBindings"]) == {f"{port}/tcp", f"{port}/udp"}
        assert all(b["HostIp"] == "127.0.0.1" for v in host["PortBindings"].values() for b in v)
    (FOLDER / f"{name}.checked").touch()
    wait_for("*.checked", 8 // 2)
"""


def test_eight_iocs_at_once_under_four_workers_never_collide(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_leftover_containers: None
) -> None:
    folder = tmp_path / "eight"
    folder.mkdir()
    monkeypatch.setenv("EIGHT_AT_ONCE", str(folder))
    (pytester.path / "epics-multiarch.yaml").write_text(
        (SAMPLE / "epics-multiarch.yaml").read_text().replace("context: .", f"context: {SAMPLE}")
    )
    pytester.makepyfile(**{f"test_group_{n}": EIGHT_AT_ONCE for n in range(4)})
    result = pytester.runpytest_subprocess(
        "-n", "4", "--dist", "loadfile", "--arch=linux/amd64", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["linux/amd64 *passed *4 *0 *0 *0"])
    ups = [json.loads(p.read_text()) for p in folder.glob("*.up")]
    assert len({up["worker"] for up in ups}) == 4
    ports = [port for up in ups for port in up["ports"]]
    assert len(ports) == 8 and len(set(ports)) == 8
