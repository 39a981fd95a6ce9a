"""Podman as the engine, for real: Debian's podman builds the sample and runs its IOC.

The same sample tests run on both engines; the header says which engine answered. What is
specific to Podman is checked on the container itself (rootful ulimits, catatonit as init,
ports on loopback), and a session leaves no container, no service process and no socket folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_epics_multiarch import flavors
from pytest_epics_multiarch.engine import LABEL_OWNER_PID, LABEL_SESSION, Engine, Owner
from pytest_epics_multiarch.session import EpicsSession
from pytest_epics_multiarch.settings import Settings

from .conftest import BASE_IMAGE, SAMPLE, message_test_args, sample_config_with_tag

pytestmark = [pytest.mark.podman, pytest.mark.slow, pytest.mark.usefixtures("subprocess_env")]


def podman_containers(session: str | None = None) -> list[dict[str, object]]:
    """The plugin's containers in podman's store (all sessions, or one), read with the CLI."""
    label = f"{LABEL_SESSION}={session}" if session else LABEL_SESSION
    out = subprocess.run(
        ["podman", "ps", "-a", "--filter", f"label={label}", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return list(json.loads(out or "[]"))


def service_processes() -> list[str]:
    """Command lines of running podman services on one of the plugin's socket folders."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = " ".join(part.decode(errors="replace") for part in argv)
        if "system service" in text and flavors.SERVICE_FOLDER_PREFIX in text:
            found.append(text)
    return found


def service_folders() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob(flavors.SERVICE_FOLDER_PREFIX + "*"))


@pytest.fixture
def nothing_left_in_podman() -> Iterator[None]:
    before_containers = {str(c["Id"]) for c in podman_containers()}
    before_services = set(service_processes())
    yield
    left = [c for c in podman_containers() if str(c["Id"]) not in before_containers]
    assert not left, f"podman containers left behind: {[c['Names'] for c in left]}"
    assert set(service_processes()) <= before_services, "a podman service of the plugin still runs"


@pytest.mark.parametrize("engine", ["podman", "docker"])
def test_the_sample_passes_on_both_engines(
    pytester: pytest.Pytester, tmp_path: Path, engine: str, nothing_left_in_podman: None
) -> None:
    report = tmp_path / "report.json"
    folders = service_folders()
    result = pytester.runpytest_subprocess(
        str(SAMPLE),
        "--arch=linux/amd64,linux/ppc64le",  # a container target and a QEMU one
        f"--epics-engine={engine}",
        "-v",
        "-p",
        "no:cacheprovider",
        f"--epics-report={report}",
    )
    assert result.ret == 0, result.stdout.str()
    # The header names the engine that answered, not just the one asked for.
    result.stdout.fnmatch_lines(
        [f"epics-multiarch: engine {engine} *", "linux/amd64*passed*", "linux/ppc64le*passed*"]
    )
    if engine == "podman":
        result.stdout.fnmatch_lines(["epics-multiarch: engine podman 4.* started for this session"])
    targets = json.loads(report.read_text())["targets"]
    for name in ("linux/amd64", "linux/ppc64le"):
        row = targets[name]
        assert row["status"] == "passed" and row["passed"] >= 20 and row["failed"] == 0, (name, row)
    assert service_folders() <= folders, "the session's podman socket folder was left behind"


@pytest.fixture
def podman_session(tmp_path: Path) -> Iterator[EpicsSession]:
    settings = Settings(engine="podman", log_dir=tmp_path / "logs", spare_iocs=0)
    session = EpicsSession(settings, progress=lambda message: None, owner=Owner.current())
    try:
        yield session
    finally:
        session.close()


def test_podman_containers_are_confined_like_docker_ones(
    nothing_left_in_podman: None, podman_session: EpicsSession
) -> None:
    """Rootful podman here needs explicit ulimits; --init runs catatonit; ports stay on loopback."""
    config = podman_session.config_for(SAMPLE / "tests")
    target = config.target("linux/amd64")
    image = podman_session.image(config, target)
    ioc = podman_session.start_ioc(config, target, image)
    engine = podman_session.engine()
    assert engine.kind == "podman" and engine.service is not None
    labels = {LABEL_SESSION: podman_session.owner.session}
    [container] = engine.client.containers.list(filters={"label": f"{LABEL_SESSION}={labels[LABEL_SESSION]}"})
    host = container.attrs["HostConfig"]
    assert host["Init"] is True and not host.get("Privileged")
    assert host["NetworkMode"] in ("bridge", "default")
    bindings = [b for port in host["PortBindings"].values() for b in port]
    assert bindings and all(b["HostIp"] == "127.0.0.1" for b in bindings)
    limits = {u["Name"].removeprefix("RLIMIT_").lower(): u["Soft"] for u in host.get("Ulimits") or []}
    assert limits.get("nofile") == 1024 and limits.get("nproc") == 1000, host.get("Ulimits")
    # PID 1 is podman's init (catatonit); the IOC runs under it and answers CA and iocsh.
    # (podman 4.3's compat /top answers with an empty body: ask its CLI.)
    top = subprocess.run(
        ["podman", "top", container.id, "pid", "args"], capture_output=True, text=True, timeout=60, check=True
    ).stdout.splitlines()
    pid_one = [line for line in top if line.split()[:1] == ["1"]]
    assert pid_one and "podman-init" in pid_one[0], top
    assert any("softIoc" in line for line in top), top
    assert ioc.ca.get("SAMPLE:SETPOINT") is not None
    assert "SAMPLE:SETPOINT" in ioc.iocsh("dbl")  # the shell answers through podman's attach
    podman_session.iocs.release(ioc)


def podman_refs_tagged(tag: str) -> list[str]:
    out = subprocess.run(
        ["podman", "images", "--format", "{{.Repository}}:{{.Tag}}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return [ref for ref in out.split() if ref.endswith(":" + tag)]


def test_push_then_pull_through_the_local_registry_without_registries_conf(
    pytester: pytest.Pytester, tmp_path: Path, nothing_left_in_podman: None
) -> None:
    """Podman speaks plain HTTP to 127.0.0.1 only when told; the plugin tells it, as Docker assumes."""
    tag = f"podmanpp{Owner.current().session}"
    config = sample_config_with_tag(tmp_path, tag)
    args = message_test_args(config, "--epics-engine=podman")
    try:
        pushed = pytester.runpytest_subprocess(*args, "--epics-image-policy=build", "--epics-push")
        assert pushed.ret == 0, pushed.stdout.str()
        pushed.stdout.fnmatch_lines(["*pushing 127.0.0.1:*sample-ioc-runtime:" + tag + "*"])
        refs = podman_refs_tagged(tag)
        assert len(refs) == 2, refs  # developer and runtime
        subprocess.run(["podman", "rmi", *refs], capture_output=True, timeout=120, check=True)
        # The problem is real: podman's own pull, with registries.conf as it stands, wants HTTPS.
        runtime = next(ref for ref in refs if "runtime" in ref)
        plain = subprocess.run(["podman", "pull", runtime], capture_output=True, text=True, timeout=120)
        assert plain.returncode != 0 and "HTTP response to HTTPS client" in plain.stderr, plain.stderr
        pulled = pytester.runpytest_subprocess(*args, "--epics-image-policy=pull")
        assert pulled.ret == 0, pulled.stdout.str()
        pulled.stdout.fnmatch_lines(["*pulled 127.0.0.1:*sample-ioc-runtime:" + tag + "*"])
    finally:
        leftover = podman_refs_tagged(tag)
        if leftover:
            subprocess.run(["podman", "rmi", *leftover], capture_output=True, timeout=120, check=False)


def test_auto_falls_back_to_podman_when_docker_does_not_answer(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    monkeypatch.delenv("CONTAINER_HOST", raising=False)
    monkeypatch.setattr(flavors, "DOCKER_SOCKET", f"unix://{tmp_path}/no-docker.sock")
    engine = Engine.connect(choice="auto")
    try:
        assert engine.kind == "podman"
        assert engine.service is not None and "started for this session" in engine.describe()
        folder = engine.service.folder
    finally:
        engine.close()
    assert not folder.exists()


def test_a_killed_session_leaves_no_service_and_the_next_one_sweeps_the_rest(
    tmp_path: Path, nothing_left_in_podman: None
) -> None:
    """SIGKILL gives pytest no chance to clean up: the kernel stops the service (PDEATHSIG),
    and the next session removes the dead session's socket folder and container."""
    (tmp_path / "test_hang.py").write_text(
        "import time\ndef test_hangs(ioc):\n    print('IOC-UP', flush=True)\n    time.sleep(600)\n"
    )
    (tmp_path / "epics-multiarch.yaml").write_text(
        (SAMPLE / "epics-multiarch.yaml").read_text().replace("context: .", f"context: {SAMPLE}")
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            str(tmp_path),
            "-s",
            "-p",
            "no:cacheprovider",
            "--epics-engine=podman",
            "--epics-spare-iocs=0",
            "--arch=linux/amd64",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 300
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "IOC-UP" in line or time.monotonic() > deadline:
                break
        assert any("IOC-UP" in line for line in seen), "".join(seen)
        mine = [
            f for f in service_folders() if f.name.startswith(f"{flavors.SERVICE_FOLDER_PREFIX}{proc.pid}-")
        ]
        assert len(mine) == 1
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 20
    while any(str(mine[0]) in cmd for cmd in service_processes()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(str(mine[0]) in cmd for cmd in service_processes()), "the service outlived pytest"
    leftovers = [
        c for c in podman_containers() if (c.get("Labels") or {}).get(LABEL_OWNER_PID) == str(proc.pid)
    ]
    assert mine[0].exists() and leftovers, "expected the killed session's leftovers"
    # The next session sweeps the container (its owner is dead) and the socket folder.
    engine = Engine.connect(choice="podman")
    try:
        swept = engine.sweep_leftovers(Owner.current().host)
    finally:
        engine.close()
    assert {str(c["Names"][0]) for c in leftovers} <= set(swept) and not mine[0].exists()


# The sample's shape, cut down: a stage that sets ENV from build args, and a stage built on it.
ENV_FROM_ARGS = """\
ARG BASE_IMAGE
FROM ${BASE_IMAGE} AS environment
ARG TARGET_ARCHITECTURE
ARG EPICS_TARGET_ARCH
ENV TARGET_ARCHITECTURE=${TARGET_ARCHITECTURE} EPICS_TARGET_ARCH=${EPICS_TARGET_ARCH}
WORKDIR /epics

FROM environment AS runtime
RUN echo "$EPICS_TARGET_ARCH" > /epics/target
"""


def podman_env(ref: str) -> dict[str, str]:
    out = subprocess.run(
        ["podman", "image", "inspect", "--format", "{{json .Config.Env}}", ref],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return dict(item.split("=", 1) for item in json.loads(out))


def test_each_target_gets_its_own_environment_despite_buildahs_cache(
    tmp_path: Path, nothing_left_in_podman: None
) -> None:
    """The epics-containers shape (ENV from build args, one Dockerfile) built for two targets.

    Podman 4.3's own layer cache hands the second target the first one's ENV step (buildah
    #5095): shown here with a plain `podman build`. The plugin's builds come out right.
    """
    tag = f"t{os.getpid()}"
    (tmp_path / "Dockerfile").write_text(ENV_FROM_ARGS)
    (tmp_path / "epics-multiarch.yaml").write_text(
        "schema: 1\n"
        f"image: {{name: pem-envtest, registry: '', tag: {tag}}}\n"
        "build: {context: ., dockerfile: Dockerfile, stages: [runtime], "
        f"args: {{BASE_IMAGE: '{BASE_IMAGE}'}}}}\n"
    )
    refs: list[str] = []
    try:
        # The problem: plain podman builds, one per target, with its default layer cache.
        for arch in ("linux-x86_64", "RTEMS-beatnik"):
            ref = f"pem-envtest-plain-{arch.lower()}:{tag}"
            refs.append(ref)
            subprocess.run(
                [
                    "podman",
                    "build",
                    *[f"--ulimit={n}={s}:{h}" for n, s, h in flavors.ROOTFUL_PODMAN_ULIMITS],
                    "--build-arg",
                    f"BASE_IMAGE={BASE_IMAGE}",
                    "--build-arg",
                    f"EPICS_TARGET_ARCH={arch}",
                    "--tag",
                    ref,
                    str(tmp_path),
                ],
                capture_output=True,
                text=True,
                timeout=300,
                check=True,
            )
        assert podman_env(refs[1])["EPICS_TARGET_ARCH"] == "linux-x86_64", "buildah's cache bug is gone?"
        # The plugin: the same Dockerfile for linux/amd64 and an RTEMS target, one after another.
        session = EpicsSession(
            Settings(engine="podman", image_policy="build", log_dir=tmp_path / "logs"),
            progress=lambda message: None,
        )
        try:
            config = session.config_for(tmp_path)
            for name, arch in (("linux/amd64", "linux-x86_64"), ("rtems/powerpc/beatnik", "RTEMS-beatnik")):
                image = session.image(config, config.target(name))
                refs.append(image.ref)
                env = podman_env(image.ref)
                assert (env["EPICS_TARGET_ARCH"], env["TARGET_ARCHITECTURE"]) == (arch, name.split("/")[0])
        finally:
            session.close()
    finally:
        subprocess.run(["podman", "rmi", "--force", *refs], capture_output=True, timeout=120, check=False)
