"""Bad input meets a clear error (the target, what was tried, what was seen, a hint), and nothing
of the failed attempt stays behind.

Covered elsewhere: unknown or malformed --arch and a missing --epics-config
(tests/plugin/test_options.py), a failing build per target and an IOC that exits at start
(test_linux_ioc.py), a missing qemu binary (tests/unit/test_payload_and_tftp.py), a QEMU guest
that never gets ready (test_qemu_ioc.py), refused puts and missing PVs against fake servers
(tests/unit/test_ca.py). Here the same kinds of mistakes go through the real engine and a real IOC.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

import pytest_epics_multiarch.runners.container as container_runner
from pytest_epics_multiarch.engine import LABEL_SESSION, Owner
from pytest_epics_multiarch.errors import IocStartError
from pytest_epics_multiarch.runners.base import free_port
from pytest_epics_multiarch.session import EpicsSession
from pytest_epics_multiarch.settings import Settings

from .conftest import SAMPLE, remove_images_tagged, sample_config_with_tag

pytestmark = [pytest.mark.usefixtures("subprocess_env")]

SAMPLE_COMMAND = 'command: ["softIoc", "-D", "/epics/epics-base/dbd/softIoc.dbd", "{startup}"]'
TARGET_TEST = "def test_target(ioc_target):\n    pass\n"


def write_sample_config(folder: Path, *replacements: tuple[str, str]) -> Path:
    """The sample's config, building from the sample's folder, with ``replacements`` made."""
    text = (SAMPLE / "epics-multiarch.yaml").read_text().replace("context: .", f"context: {SAMPLE}")
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new)
    path = folder / "epics-multiarch.yaml"
    path.write_text(text)
    return path


def session_containers(session: EpicsSession) -> list[str]:
    client = docker.from_env()
    try:
        found = client.containers.list(
            all=True, filters={"label": f"{LABEL_SESSION}={session.owner.session}"}
        )
        return [str(c.name) for c in found]
    finally:
        client.close()


def proxies_for(port: int) -> list[str]:
    """docker-proxy processes publishing ``port``: one left behind would hold the port forever."""
    found = subprocess.run(["pgrep", "-af", "docker-proxy"], capture_output=True, text=True).stdout
    return [line for line in found.splitlines() if f"-host-port {port} " in line]


# -- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["environment", "ini"])
def test_a_missing_config_named_by_a_twin_is_a_usage_error(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, source: str
) -> None:
    pytester.makepyfile(test_t=TARGET_TEST)
    if source == "environment":
        monkeypatch.setenv("EPICS_MULTIARCH_CONFIG", "nope.yaml")
        where = "EPICS_MULTIARCH_CONFIG"
    else:
        pytester.makeini("[pytest]\nepics_config = nope.yaml\n")
        where = "epics_config"
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str()
    result.stderr.fnmatch_lines([f"*{where}*no such file*nope.yaml*"])


@pytest.mark.docker
def test_a_missing_dockerfile_fails_the_target_naming_path_key_and_fix(
    pytester: pytest.Pytester, no_leftover_containers: None
) -> None:
    write_sample_config(pytester.path, ("dockerfile: Dockerfile", "dockerfile: Dockerfile.gone"))
    pytester.makepyfile(test_i="def test_image(ioc_image):\n    pass\n\ndef test_ioc(ioc):\n    pass\n")
    result = pytester.runpytest_subprocess("--arch=linux/amd64", "-p", "no:cacheprovider")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(
        [
            f"[[]linux/amd64[]] Dockerfile {SAMPLE}/Dockerfile.gone does not exist",
            f"  seen: {pytester.path}/epics-multiarch.yaml: build.dockerfile",
            "  Hint: build.context is relative to the config file, build.dockerfile to the context",
        ]
    )


# -- images --------------------------------------------------------------------------------------


@pytest.mark.docker
@pytest.mark.parametrize("policy", ["auto", "pull"])
def test_an_image_neither_local_nor_in_the_registry_fails_its_target_and_the_gate(
    pytester: pytest.Pytester, tmp_path: Path, no_leftover_containers: None, policy: str
) -> None:
    name = f"not-pushed-{Owner.current().session}"
    pytester.makefile(
        ".yaml",
        **{
            "epics-multiarch": f"schema: 1\nimage: {{name: {name}, registry: '127.0.0.1:5055/nowhere', tag: t1}}\n"
        },
    )
    pytester.makepyfile(test_i="def test_image(ioc_image):\n    pass\n")
    report = tmp_path / "report.json"
    result = pytester.runpytest_subprocess(
        "--arch=linux/amd64",
        f"--epics-image-policy={policy}",
        "--epics-gate",
        f"--epics-report={report}",
        "-p",
        "no:cacheprovider",
    )
    result.assert_outcomes(errors=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    ref = f"127.0.0.1:5055/nowhere/{name}-runtime:t1"
    result.stdout.fnmatch_lines(
        [
            f"[[]linux/amd64[]] could not pull {ref}",
            "  seen: registry 127.0.0.1:5055: *",
            "  Hint: check the image name, tag and registry in epics-multiarch.yaml*",
            f"linux/amd64: [[]linux/amd64[]] could not pull {ref}",  # under the matrix
            "linux/amd64: FAIL: 0 failed, 1 errors",
        ]
    )
    assert json.loads(report.read_text())["targets"]["linux/amd64"]["status"] == "error"
    client = docker.from_env()
    assert not [tag for image in client.images.list() for tag in image.tags if name in tag]


def test_the_report_names_a_setup_error_by_its_first_line(pytester: pytest.Pytester, tmp_path: Path) -> None:
    pytester.makepyfile(test_i="def test_image(ioc_image):\n    pass\n")  # no config: no image
    report = tmp_path / "report.json"
    result = pytester.runpytest_subprocess(
        "--arch=linux/amd64", f"--epics-report={report}", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(errors=1)
    (failure,) = json.loads(report.read_text())["targets"]["linux/amd64"]["failures"]
    assert failure["reason"] == "[linux/amd64] no image is configured"


# -- no engine -----------------------------------------------------------------------------------


@pytest.fixture
def no_engine(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> str:
    """DOCKER_HOST (for the subprocess) names a socket nothing listens on."""
    host = f"unix://{pytester.path}/no-engine.sock"
    monkeypatch.setenv("DOCKER_HOST", host)
    write_sample_config(pytester.path)
    pytester.makepyfile(
        test_e="def test_image(ioc_image):\n    pass\n\ndef test_ca(ca):\n    pass\n\ndef test_plain():\n    pass\n"
    )
    return host


def test_no_engine_skips_the_targets_tests_with_the_reason(pytester: pytest.Pytester, no_engine: str) -> None:
    result = pytester.runpytest_subprocess("--arch=linux/amd64", "-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=2)
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(
        [
            f"epics-multiarch: no engine ({no_engine}: *",
            "SKIPPED [[]1[]] test_e.py:1: [[]linux/amd64[]] no Docker engine answers",
            f"  seen: {no_engine}: *",
            "  Hint: start dockerd *, or point DOCKER_HOST at a running engine",
            "SKIPPED [[]1[]] test_e.py:4: [[]linux/amd64[]] no Docker engine answers",
        ]
    )


def test_no_engine_fails_the_gate(pytester: pytest.Pytester, no_engine: str) -> None:
    result = pytester.runpytest_subprocess("--arch=linux/amd64", "--epics-gate", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=2)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        ["*epics-multiarch release gate*", "linux/amd64: FAIL: *no Docker engine answers*"]
    )


# -- IOCs that don't get ready -------------------------------------------------------------------


@pytest.mark.docker
def test_an_ioc_that_never_reaches_iocrun_times_out_with_its_log(
    pytester: pytest.Pytester, no_leftover_containers: None
) -> None:
    write_sample_config(
        pytester.path,
        (
            SAMPLE_COMMAND,
            'command: ["sh", "-c", "echo waiting for hardware that never answers; exec sleep 600"]',
        ),
    )
    pytester.makepyfile(test_x="def test_x(ioc):\n    pass\n")
    result = pytester.runpytest_subprocess(
        "--arch=linux/amd64", "--epics-start-timeout=3", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "[[]linux/amd64[]] the IOC did not reach iocRun (container * (*sample-ioc-runtime:dev))",
            "  seen: *no match within 3 s*",
            "    | waiting for hardware that never answers",
            "  Hint: *raise ioc.start_timeout*",
        ]
    )


@pytest.mark.docker
def test_an_ioc_whose_readiness_pv_never_answers_times_out_naming_the_pv(
    pytester: pytest.Pytester, no_leftover_containers: None
) -> None:
    write_sample_config(pytester.path, ('ready_pv: "SAMPLE:SETPOINT"', 'ready_pv: "SAMPLE:NO_SUCH_RECORD"'))
    pytester.makepyfile(test_x="def test_x(ioc):\n    pass\n")
    result = pytester.runpytest_subprocess(
        "--arch=linux/amd64", "--epics-start-timeout=4", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "[[]linux/amd64[]] the readiness PV did not answer over Channel Access (container *)",
            "  seen: *'SAMPLE:NO_SUCH_RECORD'*",
            "    | iocRun: All initialization complete",
            "  Hint: *ioc.ready_pv*",
        ]
    )


# -- Channel Access against the real IOC ---------------------------------------------------------

CA_MISTAKES = """
from pytest_epics_multiarch.errors import CAPutError


def test_missing_pv(ca):
    ca.get("SAMPLE:NO_SUCH_PV", timeout=2)


def test_refused_put(ca):
    ca.put("SAMPLE:READONLY", 7)


def test_refusal_can_be_expected(ca):
    try:
        ca.put("SAMPLE:READONLY", 7)
    except CAPutError:
        pass
    assert ca.get("SAMPLE:READONLY") == 42.0
"""


@pytest.mark.docker
@pytest.mark.parametrize("ca_client", ["caproto", "pyepics"])
def test_a_missing_pv_and_a_refused_put_fail_naming_target_pv_and_ioc(
    pytester: pytest.Pytester, no_leftover_containers: None, ca_client: str
) -> None:
    write_sample_config(pytester.path)
    pytester.makepyfile(test_ca_mistakes=CA_MISTAKES)
    result = pytester.runpytest_subprocess(
        "--arch=linux/amd64", f"--epics-ca-client={ca_client}", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(
        [
            f"E * [[]linux/amd64[]] could not get 'SAMPLE:NO_SUCH_PV' (IOC at 127.0.0.1:*, {ca_client} client)",
            "E *seen: not connected: *",
            "E *Hint: *",
            "*- IOC log linux/amd64 -*",
            "*iocRun: All initialization complete*",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            f"E *CAPutError: [[]linux/amd64[]] * 'SAMPLE:READONLY' (IOC at 127.0.0.1:*, {ca_client} client)",
            "E *seen: *",
        ]
    )


# -- the CA port is taken ------------------------------------------------------------------------


@pytest.fixture
def session(tmp_path: Path) -> Iterator[EpicsSession]:
    # No spare IOCs: these tests steer the runner's port choices, and a spare started in the
    # background would both take those choices and serve the next start without choosing a port.
    settings = Settings(arch=("linux/amd64",), spare_iocs=0)
    epics = EpicsSession(settings, work_dir=tmp_path, progress=lambda m: None)
    yield epics
    epics.close()
    assert session_containers(epics) == []


def start_sample(epics: EpicsSession):  # type: ignore[no-untyped-def]
    config = epics.config_for(SAMPLE / "tests")
    target = config.target("linux/amd64")
    return epics.start_ioc(config, target, epics.image(config, target))


def hold_port(port: int, protocols: str) -> list[socket.socket]:
    """Bind ``port`` on 127.0.0.1 from this (non-docker) process."""
    held = []
    if "tcp" in protocols:
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.bind(("127.0.0.1", port))
        tcp.listen()
        held.append(tcp)
    if "udp" in protocols:
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", port))
        held.append(udp)
    return held


def collide_first(monkeypatch: pytest.MonkeyPatch, taken: int, times: int = 1) -> None:
    """The runner's next ``times`` port choices are ``taken``; later ones are really free."""
    choices = iter([taken] * times)
    monkeypatch.setattr(container_runner, "free_port", lambda: next(choices, None) or free_port())


@pytest.mark.docker
@pytest.mark.parametrize("protocols", ["tcp", "udp", "tcp+udp"])
def test_a_ca_port_taken_by_another_process_is_skipped(
    session: EpicsSession, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, protocols: str
) -> None:
    taken = free_port()
    held = hold_port(taken, protocols)
    try:
        collide_first(monkeypatch, taken)
        with caplog.at_level("INFO", logger="pytest_epics_multiarch.runners.container"):
            ioc = start_sample(session)
        # Docker could not publish the port ("address already in use"): the runner took another.
        assert f"linux/amd64: port {taken} was taken meanwhile, trying another" in caplog.text
        host, port = ioc.ca_address
        assert (host, port) != ("127.0.0.1", taken)
        assert ioc.ca.get("SAMPLE:MESSAGE") == "hello"
        assert len(session_containers(session)) == 1  # the failed attempt's container went
        assert proxies_for(taken) == []
    finally:
        for sock in held:
            sock.close()


@pytest.mark.docker
def test_a_ca_port_taken_by_another_ioc_is_skipped(
    session: EpicsSession, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    first = start_sample(session)
    taken = first.ca_address[1]
    collide_first(monkeypatch, taken)
    with caplog.at_level("INFO", logger="pytest_epics_multiarch.runners.container"):
        second = start_sample(session)
    # Docker's own allocator refused it ("port is already allocated").
    assert f"port {taken} was taken meanwhile" in caplog.text
    assert second.ca_address[1] != taken
    first.ca.put("SAMPLE:MESSAGE", "first")
    second.ca.put("SAMPLE:MESSAGE", "second")
    assert (first.ca.get("SAMPLE:MESSAGE"), second.ca.get("SAMPLE:MESSAGE")) == ("first", "second")
    assert len(session_containers(session)) == 2


@pytest.mark.docker
def test_when_every_port_tried_is_taken_the_error_says_so(
    session: EpicsSession, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    taken = free_port()
    held = hold_port(taken, "tcp+udp")
    try:
        collide_first(monkeypatch, taken, times=5)
        with pytest.raises(IocStartError) as info:
            start_sample(session)
    finally:
        for sock in held:
            sock.close()
    text = str(info.value)
    assert text.startswith("[linux/amd64] could not start a container of ")
    assert re.search(rf"seen: .*127\.0\.0\.1:{taken}.*address already in use", text), text
    assert "Hint: 5 free ports in a row were taken" in text
    # The IOC's log says what was tried each time, though no console was ever attached.
    (log_file,) = tmp_path.glob("ioc-linux-amd64-*.log")
    logged = log_file.read_text()
    assert logged.count("$ docker run 127.0.0.1:5055/epics-multiarch-samples/sample-ioc-runtime:dev") == 5, logged
    assert logged.count("# the start failed: ") == 5 and "address already in use" in logged, logged
    assert session_containers(session) == []
    assert proxies_for(taken) == []


# -- registry credentials never show -------------------------------------------------------------


@pytest.mark.docker
@pytest.mark.slow
def test_registry_credentials_appear_in_no_output_report_or_log(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = f"s3cret-{Owner.current().session}"
    auth = base64.b64encode(f"epics-user:{secret}".encode()).decode()
    docker_config = tmp_path / "docker-config"
    docker_config.mkdir()
    (docker_config / "config.json").write_text(json.dumps({"auths": {"127.0.0.1:5055": {"auth": auth}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(docker_config))
    tag = f"creds{Owner.current().session}"
    config = sample_config_with_tag(tmp_path, tag)
    # A failing test too: its captured (debug) log goes into the report and the logs are kept.
    pytester.makepyfile(
        test_push="def test_reads(ca):\n    assert ca.get('SAMPLE:MESSAGE') == 'hello'\n\n"
        "def test_fails(ca):\n    assert ca.get('SAMPLE:MESSAGE') == 'bye'\n"
    )
    outputs: list[str] = []
    try:
        for policy in ("build", "pull"):
            logs, junit, report = (
                tmp_path / f"logs-{policy}",
                tmp_path / f"{policy}.xml",
                tmp_path / f"{policy}.json",
            )
            extra = ["--epics-push"] if policy == "build" else []
            result = pytester.runpytest_subprocess(
                "--arch=linux/amd64",
                f"--epics-config={config}",
                f"--epics-image-policy={policy}",
                *extra,
                f"--epics-log-dir={logs}",
                f"--junitxml={junit}",
                f"--epics-report={report}",
                "--log-level=DEBUG",
                "-o",
                "log_cli=true",
                "--log-cli-level=DEBUG",
                "-vv",
                "-p",
                "no:cacheprovider",
            )
            result.assert_outcomes(passed=1, failed=1)
            # The credentials were in play: the docker SDK found them for the registry (debug log).
            result.stdout.fnmatch_lines(["*Found entry (registry='127.0.0.1:5055', username='epics-user')*"])
            result.stdout.fnmatch_lines(
                ["*pushing *:" + tag if policy == "build" else "*pulled *:" + tag + "*"]
            )
            outputs += [result.stdout.str(), result.stderr.str(), junit.read_text(), report.read_text()]
            outputs += [p.read_text(errors="replace") for p in logs.rglob("*") if p.is_file()]
            if policy == "build":
                assert len(remove_images_tagged(tag)) == 2  # so the second run pulls
        for text in outputs:
            assert secret not in text and auth not in text
    finally:
        remove_images_tagged(tag)
