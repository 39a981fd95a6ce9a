"""Faults: IOCs that die mid-test, signals and crashes of pytest itself, sessions side by side.

Whatever happens, no container or QEMU process of a session outlives it for long: a killed IOC
fails only its own target's tests (with its log), an interrupted session removes everything it
started, a crashed one is swept by the next session, and nothing is ever removed that the
session did not start itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import pytest

from pytest_epics_multiarch.engine import LABEL_CA_PORT, LABEL_KEEP, Owner
from pytest_epics_multiarch.errors import CAError
from pytest_epics_multiarch.runners import qemu as qemu_runner
from pytest_epics_multiarch.session import EpicsSession
from pytest_epics_multiarch.settings import Settings

from .conftest import BASE_IMAGE, SAMPLE, orphaned_containers, remove_images_tagged, sample_config_with_tag

GUEST = "linux/ppc64le"
BOTH = f"--arch=linux/amd64,{GUEST}"

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("subprocess_env")]


def write_sample_config(folder: Path) -> Path:
    """The sample's config, building from the sample's folder."""
    path = folder / "epics-multiarch.yaml"
    path.write_text((SAMPLE / "epics-multiarch.yaml").read_text().replace("context: .", f"context: {SAMPLE}"))
    return path


#: Finds an IOC's container or QEMU process from its CA port (the test's view, no private API).
FIND_IOC = """
import json, os, signal
from pathlib import Path

import docker

from pytest_epics_multiarch.engine import LABEL_CA_PORT


def qemu_pid(port):
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "qemu-system" in text.split(" ", 1)[0] and f"hostfwd=tcp:127.0.0.1:{port}-" in text:
            return int(cmdline.parent.name)
    raise LookupError(f"no QEMU forwards port {port}")


def container_id(port):
    client = docker.from_env()
    (container,) = client.containers.list(filters={"label": f"{LABEL_CA_PORT}={port}"})
    return container.id


def describe(ioc):
    port = ioc.ca_address[1]
    if ioc.target.runner == "qemu":
        return {"target": ioc.target.name, "port": port, "qemu_pid": qemu_pid(port)}
    return {"target": ioc.target.name, "port": port, "container": container_id(port)}


def kill(ioc):
    found = describe(ioc)
    if "qemu_pid" in found:
        os.kill(found["qemu_pid"], signal.SIGKILL)
    else:
        docker.from_env().containers.get(found["container"]).kill()
"""


def qemu_alive(pid: int) -> bool:
    """Whether ``pid`` is a running (not zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def container_exists(client: docker.DockerClient, container_id: str) -> bool:
    try:
        client.containers.get(container_id)
        return True
    except docker.errors.NotFound:
        return False


def wait_until(condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.1)


@pytest.fixture
def client() -> Iterator[docker.DockerClient]:
    client = docker.from_env()
    yield client
    client.close()


def qemu_processes_under(*folders: Path) -> list[str]:
    """Running QEMU processes whose command line names a path under ``folders`` (a test's own)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        text = " ".join(argv)
        mine = any(str(folder) in text for folder in folders)
        if Path(argv[0]).name.startswith("qemu-system") and mine and qemu_alive(int(cmdline.parent.name)):
            found.append(f"{cmdline.parent.name}: {text[:120]}")
    return found


@pytest.fixture
def no_leftover_qemu(tmp_path: Path, pytester: pytest.Pytester) -> Iterator[None]:
    """Fails the test when a QEMU it started survives it.

    The runs under test keep their files under the test's folders (``--epics-log-dir``), so their
    QEMU command lines name them; other sessions' emulators on this machine don't count.
    """
    yield
    left = qemu_processes_under(tmp_path, pytester.path)
    assert not left, f"QEMU processes left behind: {left}"


# -- an IOC killed mid-test ----------------------------------------------------------------------

KILLED_MODULE = (
    FIND_IOC
    + """

import time

KILL = "{target}"


def test_1_reads(ca):
    assert ca.get("SAMPLE:MESSAGE") == "hello"


def test_2_killed_mid_test(ioc, ca):
    if ioc.target.name == KILL:
        kill(ioc)
        while ioc.is_running():
            time.sleep(0.05)
        time.sleep(0.5)  # the client saw the connection go (a put in flight: see the test below)
    ca.put("SAMPLE:SETPOINT", 3.0, timeout=1)
    assert ca.get("SAMPLE:SETPOINT", timeout=1) == 3.0


def test_3_after(ca):
    assert ca.get("SAMPLE:MESSAGE", timeout=1) == "hello"
"""
)


@pytest.mark.qemu
@pytest.mark.slow
def test_a_killed_container_or_qemu_fails_its_targets_tests_with_the_log_and_the_other_target_runs(
    pytester: pytest.Pytester, tmp_path: Path, no_leftover_containers: None, no_leftover_qemu: None
) -> None:
    write_sample_config(pytester.path)
    pytester.makepyfile(
        test_kill_container=KILLED_MODULE.replace("{target}", "linux/amd64"),
        test_kill_qemu=KILLED_MODULE.replace("{target}", GUEST),
    )
    # Session-scoped IOCs: the second module gets a fresh IOC for the target the first one killed,
    # and the same QEMU for the other (one boot for the whole run).
    result = pytester.runpytest_subprocess(
        BOTH, "--epics-ioc-scope=session", f"--epics-log-dir={tmp_path}/logs", "-rA", "-p", "no:cacheprovider"
    )
    # Each module kills one target's IOC in test 2: tests 2 and 3 fail there, and only there.
    result.assert_outcomes(passed=8, failed=4)
    out = result.stdout.str()
    for module, killed, other in (("container", "linux/amd64", GUEST), ("qemu", GUEST, "linux/amd64")):
        for test in ("test_2_killed_mid_test", "test_3_after"):
            assert f"FAILED test_kill_{module}.py::{test}[{killed}]" in out
            assert f"PASSED test_kill_{module}.py::{test}[{other}]" in out
    # Each failure carries the killed IOC's log: up to iocRun, then nothing.
    for target in ("linux/amd64", GUEST):
        sections = out.split(f" IOC log {target} ")[1:]
        assert len(sections) == 2, out
        assert all("iocRun: All initialization complete" in text for text in sections)
    result.stdout.fnmatch_lines(
        ["linux/amd64 *failed *up to date *4 *2 *0 *0", f"{GUEST} *failed *up to date *4 *2 *0 *0"]
    )


@pytest.mark.parametrize(
    "backend",
    [
        "caproto",
        "pyepics",
    ],
)
def test_an_ioc_that_dies_during_a_put_fails_the_put_with_a_ca_error(tmp_path: Path, backend: str) -> None:
    session = EpicsSession(
        Settings(arch=("linux/amd64",), ca_client=backend), work_dir=tmp_path, progress=lambda m: None
    )
    config = session.config_for(SAMPLE / "tests")
    target = config.target("linux/amd64")
    # A put to A processes the record, whose output waits ODLY seconds: the put completes only then.
    db = 'record(calcout, "SLOW:PUT") {\n field(CALC, "A")\n field(ODLY, "30")\n}\n'
    command = [
        "sh",
        "-c",
        f"printf '%s' '{db}' > /tmp/slow.db && exec softIoc -D /epics/epics-base/dbd/softIoc.dbd -d /tmp/slow.db",
    ]
    spec = dataclasses.replace(config.ioc_for(target), command=command, ready_pv="SLOW:PUT")
    try:
        ioc = session.start_ioc(config, target, session.image(config, target), spec)
        client = docker.from_env()
        (container,) = client.containers.list(filters={"label": f"{LABEL_CA_PORT}={ioc.ca_address[1]}"})
        killer = threading.Timer(1.0, container.kill)
        killer.start()
        started = time.monotonic()
        with pytest.raises(CAError) as info:
            ioc.ca.put("SLOW:PUT.A", 1, timeout=20)
        killer.join()
        assert time.monotonic() - started < 20  # it noticed the IOC went, rather than timing out
        assert str(info.value).startswith("[linux/amd64] could not put 1 to 'SLOW:PUT.A'")
    finally:
        session.close()


# -- signals and crashes of pytest ---------------------------------------------------------------

HOLD_MODULE = (
    FIND_IOC
    + '''

import time


def test_hold(ioc):
    """Reports where this target's IOC runs; the last target to get there waits for a signal."""
    folder = Path(os.environ["HOLD_MARKERS"])
    found = describe(ioc)
    (folder / (ioc.target.name.replace("/", "-") + ".json")).write_text(json.dumps(found))
    if len(list(folder.glob("*.json"))) == 2:
        time.sleep(300)
'''
)


@dataclasses.dataclass
class HeldRun:
    """A pytest run in its own process group that holds a container IOC and a QEMU IOC."""

    proc: subprocess.Popen[bytes]
    output: Path
    container: str = ""
    container_port: int = 0
    qemu: int = 0

    def out(self) -> str:
        return self.output.read_text(errors="replace")


@pytest.fixture
def held_run(pytester: pytest.Pytester, tmp_path: Path) -> Iterator[HeldRun]:
    write_sample_config(pytester.path)
    pytester.makepyfile(test_hold=HOLD_MODULE)
    markers = tmp_path / "markers"
    markers.mkdir()
    output = tmp_path / "out.txt"
    command = [
        sys.executable,
        "-m",
        "pytest",
        BOTH,
        "--epics-ioc-scope=session",
        f"--epics-log-dir={tmp_path}/logs",
    ]
    command += ["-p", "no:cacheprovider"]
    with open(output, "wb") as out:
        proc = subprocess.Popen(
            command,
            cwd=pytester.path,
            env={**os.environ, "HOLD_MARKERS": str(markers)},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    run = HeldRun(proc, output)
    try:
        deadline = time.monotonic() + 120
        while len(list(markers.glob("*.json"))) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, (
                "the IOCs did not start:\n" + run.out()
            )
            time.sleep(0.2)
        time.sleep(0.2)  # the second marker is written whole
        for path in markers.glob("*.json"):
            found = json.loads(path.read_text())
            if "qemu_pid" in found:
                run.qemu = int(found["qemu_pid"])
            else:
                run.container, run.container_port = str(found["container"]), int(found["port"])
        yield run
    finally:
        # Whatever the test did: the run ends, and so does anything of it the test left running.
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if run.qemu and qemu_alive(run.qemu):
            os.killpg(run.qemu, signal.SIGKILL)
        if run.container:
            with contextlib.suppress(docker.errors.NotFound):
                docker.from_env().containers.get(run.container).remove(force=True)


def listening_addresses(pid: int | None = None, port: int | None = None) -> list[str]:
    """Listening TCP and bound UDP sockets ("tcp 127.0.0.1:N") of one process or on one port."""
    lines = subprocess.run(["ss", "-H", "-lntup"], capture_output=True, text=True).stdout.splitlines()
    found = []
    for line in lines:
        fields = line.split()
        if (pid is not None and f"pid={pid}," in line) or (
            port is not None and fields[4].endswith(f":{port}")
        ):
            found.append(f"{fields[0]} {fields[4]}")
    return found


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_pytest_removes_every_container_and_qemu_of_the_session(
    held_run: HeldRun,
    client: docker.DockerClient,
    no_leftover_containers: None,
    no_leftover_qemu: None,
    signum: signal.Signals,
) -> None:
    assert container_exists(client, held_run.container) and qemu_alive(held_run.qemu)
    # While they run, the CA ports are on the loopback address only: the container's (docker-proxy)
    # and QEMU's forwards. (QEMU's user network also opens an ephemeral 0.0.0.0 UDP socket for
    # what the guest sends out, its CA beacons: NAT, not a published port.)
    published = listening_addresses(port=held_run.container_port)
    qemu_sockets = listening_addresses(pid=held_run.qemu)
    qemu_tcp = [a for a in qemu_sockets if a.startswith("tcp ")]
    assert published and all(a.split()[1].startswith("127.0.0.1:") for a in published), published
    assert qemu_tcp and all(a.split()[1].startswith("127.0.0.1:") for a in qemu_tcp), qemu_sockets
    # As a terminal (Ctrl-C) or a CI runner cancelling a job does: the whole process group.
    os.killpg(held_run.proc.pid, signum)
    code = held_run.proc.wait(timeout=60)
    assert code == pytest.ExitCode.INTERRUPTED, held_run.out()
    assert "KeyboardInterrupt" in held_run.out()
    assert not container_exists(client, held_run.container), held_run.out()
    wait_until(lambda: not qemu_alive(held_run.qemu), 5, "QEMU gone")


@pytest.mark.qemu
@pytest.mark.slow
def test_a_crashed_sessions_iocs_are_swept_by_the_next_session(
    pytester: pytest.Pytester,
    tmp_path: Path,
    held_run: HeldRun,
    client: docker.DockerClient,
    no_leftover_containers: None,
    no_leftover_qemu: None,
) -> None:
    os.killpg(held_run.proc.pid, signal.SIGKILL)  # no cleanup at all: a crash
    held_run.proc.wait(timeout=10)
    # The crash left both behind (QEMU runs in a session of its own).
    assert container_exists(client, held_run.container) and qemu_alive(held_run.qemu)
    (pytester.path / "test_hold.py").unlink()
    pytester.makepyfile(test_next="def test_next(ca):\n    assert ca.get('SAMPLE:MESSAGE') == 'hello'\n")
    result = pytester.runpytest_subprocess(
        BOTH, f"--epics-log-dir={tmp_path}/logs2", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*removed * leftover IOC container(s) of dead sessions*"])
    assert not container_exists(client, held_run.container)
    wait_until(lambda: not qemu_alive(held_run.qemu), 5, "the crashed session's QEMU swept")


# -- sweeping QEMU leftovers: only dead owners', never kept ones ---------------------------------


def stamped_process(labels: dict[str, str]) -> subprocess.Popen[bytes]:
    """A stand-in for a QEMU IOC: its own process group, stamped as the runner stamps QEMU."""
    return subprocess.Popen(
        ["sleep", "60"], env={**os.environ, qemu_runner.OWNER_ENV: json.dumps(labels)}, start_new_session=True
    )


def dead_owner(keep: bool = False) -> dict[str, str]:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return Owner(session="deadbeef0000", pid=proc.pid, start="1", host=socket.gethostname()).labels(keep=keep)


def test_the_qemu_sweep_kills_only_dead_sessions_unkept_emulators() -> None:
    dead = stamped_process(dead_owner())
    kept = stamped_process(dead_owner(keep=True))
    alive = stamped_process(Owner.current().labels())
    other_host = stamped_process({**dead_owner(), "io.github.pytest-epics-multiarch.owner-host": "elsewhere"})
    foreign = subprocess.Popen(["sleep", "60"], start_new_session=True)
    processes = (dead, kept, alive, other_host, foreign)
    try:
        killed = qemu_runner.sweep_leftovers(socket.gethostname())
        assert killed == [f"QEMU pid {dead.pid}"]
        assert dead.wait(timeout=5) == -signal.SIGKILL
        assert all(p.poll() is None for p in processes[1:])
    finally:
        for proc in processes:
            proc.kill()
            proc.wait()


def test_a_kept_qemu_ioc_is_stamped_as_kept(tmp_path: Path) -> None:
    session = EpicsSession(
        Settings(arch=(GUEST,), keep_iocs=True), work_dir=tmp_path, progress=lambda m: None
    )
    config = session.config_for(SAMPLE / "tests")
    target = config.target(GUEST)
    try:
        image = session.image(config, target)
        # The runner as the session makes it (not started: the stamp is decided here).
        runner = session._make_runner(
            config, target, image, config.ioc_for(target), lambda a: None, tmp_path / "x.log"
        )
        assert runner.labels.get(LABEL_KEEP) == "true"  # type: ignore[attr-defined]
    finally:
        session.close()


# -- sessions side by side -----------------------------------------------------------------------


@pytest.mark.slow
def test_parallel_sessions_and_xdist_workers_leave_each_others_iocs_alone(
    tmp_path: Path, client: docker.DockerClient, no_leftover_containers: None
) -> None:
    # This process's own session holds an IOC for the whole test.
    mine = EpicsSession(Settings(arch=("linux/amd64",)), work_dir=tmp_path / "mine", progress=lambda m: None)
    config = mine.config_for(SAMPLE / "tests")
    target = config.target("linux/amd64")
    try:
        ioc = mine.start_ioc(config, target, mine.image(config, target))
        ioc.ca.put("SAMPLE:MESSAGE", "still mine")
        # Two more sessions at once, one of them with two xdist workers; each sweeps at its start.
        common = [
            sys.executable,
            "-m",
            "pytest",
            str(SAMPLE / "tests"),
            "--arch=linux/amd64",
            "-p",
            "no:cacheprovider",
        ]
        runs = [
            subprocess.Popen([*common, "-n", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT),
            subprocess.Popen(
                [*common, "--epics-ioc-scope=function", "-k", "counter or message or mode"],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            ),
        ]
        outputs = [run.communicate(timeout=180)[0].decode(errors="replace") for run in runs]
        for run, out in zip(runs, outputs):
            assert run.returncode == 0, out
        assert ioc.is_running()
        assert ioc.ca.get("SAMPLE:MESSAGE") == "still mine"
    finally:
        mine.close()
    assert not orphaned_containers()


@pytest.mark.slow
def test_a_session_never_removes_images_or_containers_it_did_not_create(
    pytester: pytest.Pytester, tmp_path: Path, client: docker.DockerClient
) -> None:
    uniq = Owner.current().session
    # Someone else's image and containers, one of them from the very image the session runs.
    (tmp_path / "Dockerfile").write_text(f"FROM {BASE_IMAGE}\nLABEL purpose=unrelated\n")
    unrelated, _ = client.images.build(
        path=str(tmp_path), tag=f"epics-multiarch-test-unrelated:{uniq}", rm=True
    )
    tag = f"foreign{uniq}"
    config = sample_config_with_tag(tmp_path, tag)
    sample_runtime = f"127.0.0.1:5055/epics-multiarch-samples/sample-ioc-runtime:{tag}"
    theirs = []
    try:
        theirs.append(client.containers.run(unrelated.id, ["sleep", "300"], detach=True, init=True))
        theirs.append(client.containers.create(unrelated.id, ["true"], labels={"someone.else": "yes"}))
        base_before = client.images.get(BASE_IMAGE).id
        result = pytester.runpytest_subprocess(
            str(SAMPLE / "tests" / "test_two_iocs.py"),
            "--arch=linux/amd64",
            f"--epics-config={config}",
            "--epics-image-policy=build",
            "-p",
            "no:cacheprovider",
        )
        result.assert_outcomes(passed=1)
        # Its own image now exists; run an unlabelled container of it and go again.
        theirs.append(client.containers.run(sample_runtime, ["sleep", "300"], detach=True, init=True))
        again = pytester.runpytest_subprocess(
            str(SAMPLE / "tests" / "test_two_iocs.py"),
            "--arch=linux/amd64",
            f"--epics-config={config}",
            "--epics-image-policy=build",
            "-p",
            "no:cacheprovider",
        )
        again.assert_outcomes(passed=1)
        assert client.images.get(unrelated.id).id == unrelated.id
        assert client.images.get(BASE_IMAGE).id == base_before
        assert client.images.get(sample_runtime)  # rebuilt or kept, never removed
        for container in theirs:
            container.reload()  # NotFound if a session removed it
        assert [c.status for c in theirs] == ["running", "created", "running"]
    finally:
        for container in theirs:
            container.remove(force=True)
        remove_images_tagged(tag)
        client.images.remove(unrelated.id, force=True)
