"""The Linux soft-IOC path for real: BuildKit builds of the sample, a real engine, real CA.

These run the plugin the way users do (a pytest subprocess in the sample IOC's folder) and
check what users would see: outcomes, the matrix, the report, and that nothing is left behind.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import docker
import pytest

from pytest_epics_multiarch.engine import LABEL_CA_PORT, LABEL_SESSION, Owner
from pytest_epics_multiarch.session import EpicsSession
from pytest_epics_multiarch.settings import Settings

from .conftest import BASE_IMAGE, SAMPLE, message_test_args, remove_images_tagged, sample_config_with_tag

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.usefixtures("subprocess_env")]


@pytest.mark.parametrize("ca_client", ["caproto", "pyepics"])
def test_sample_passes_on_linux_and_leaves_nothing(
    pytester: pytest.Pytester,
    no_leftover_containers: None,
    tmp_path: Path,
    ca_client: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("EPICS_MULTIARCH_LOG_DIR")  # the default: a temporary folder
    report = tmp_path / "report.json"
    temp_dirs = set(Path(tempfile.gettempdir()).glob("pytest-epics-multiarch-[!l]*"))
    result = pytester.runpytest_subprocess(
        str(SAMPLE),
        "--arch=linux/amd64",
        f"--epics-ca-client={ca_client}",
        "-v",
        "-p",
        "no:cacheprovider",
        f"--epics-report={report}",
    )
    result.stdout.fnmatch_lines(
        [
            "*test_doubled_follows_setpoint?linux/amd64? PASSED*",
            "*test_each_client_reads_its_own_ioc?linux/amd64? PASSED*",
            "*epics-multiarch target matrix*",
            "linux/amd64*passed*",
        ]
    )
    assert result.ret == 0, result.stdout.str()
    data = json.loads(report.read_text())
    linux = data["targets"]["linux/amd64"]
    assert data["gate"] == "pass" and linux["status"] == "passed" and linux["failed"] == 0
    assert linux["image"].endswith("sample-ioc-runtime:dev") and linux["digest"].startswith("sha256:")
    # A passing run removes its temporary logs folder.
    assert set(Path(tempfile.gettempdir()).glob("pytest-epics-multiarch-[!l]*")) == temp_dirs


def test_ca_ports_are_published_on_loopback_only(tmp_path: Path) -> None:
    session = EpicsSession(Settings(arch=("linux/amd64",)), work_dir=tmp_path, progress=lambda m: None)
    config = session.config_for(SAMPLE / "tests")
    target = config.target("linux/amd64")
    ioc = session.start_ioc(config, target, session.image(config, target))
    try:
        client = docker.from_env()
        # The IOC's container and the spare started after it (--epics-spare-iocs, default 1):
        # every container of the session publishes its own port, on loopback only.
        session.iocs.wait_for_spares(60)
        containers = client.containers.list(filters={"label": f"{LABEL_SESSION}={session.owner.session}"})
        assert len(containers) == 2
        ports = {int(c.labels[LABEL_CA_PORT]) for c in containers}
        assert ioc.ca_address[1] in ports and len(ports) == 2
        for container in containers:
            bindings = container.attrs["HostConfig"]["PortBindings"]
            port = int(container.labels[LABEL_CA_PORT])
            assert set(bindings) == {f"{port}/tcp", f"{port}/udp"}
            assert all(
                b["HostIp"] == "127.0.0.1" and b["HostPort"] == str(port)
                for v in bindings.values()
                for b in v
            )
            assert container.attrs["HostConfig"]["Privileged"] is False
            assert container.attrs["HostConfig"]["NetworkMode"] == "bridge"
            assert container.attrs["HostConfig"]["Init"] is True
        assert ioc.ca.get("SAMPLE:MESSAGE") == "hello"
        assert "DBF_DOUBLE" in ioc.iocsh("dbgf SAMPLE:SETPOINT")
    finally:
        session.close()
    assert not client.containers.list(all=True, filters={"label": f"{LABEL_SESSION}={session.owner.session}"})


def test_push_then_pull_through_the_local_registry(pytester: pytest.Pytester, tmp_path: Path) -> None:
    """--epics-push publishes to the sample's 127.0.0.1 registry; policy pull gets it back."""
    tag = f"pushpull{Owner.current().session}"
    config = sample_config_with_tag(tmp_path, tag)
    args = message_test_args(config)
    try:
        pushed = pytester.runpytest_subprocess(*args, "--epics-image-policy=build", "--epics-push")
        pushed.stdout.fnmatch_lines(["*pushing *sample-ioc-runtime:" + tag + "*"])
        assert pushed.ret == 0, pushed.stdout.str()
        assert len(remove_images_tagged(tag)) == 2  # developer and runtime, now only in the registry
        pulled = pytester.runpytest_subprocess(*args, "--epics-image-policy=pull")
        pulled.stdout.fnmatch_lines(["*pulled *sample-ioc-runtime:" + tag + "*"])
        assert pulled.ret == 0, pulled.stdout.str()
    finally:
        remove_images_tagged(tag)


def test_xdist_builds_each_variant_once(
    pytester: pytest.Pytester, tmp_path: Path, no_leftover_containers: None
) -> None:
    tag = f"xdist{Owner.current().session}"
    config = sample_config_with_tag(tmp_path, tag)
    logs = tmp_path / "logs"
    try:
        result = pytester.runpytest_subprocess(
            str(SAMPLE / "tests"),
            "-n",
            "2",
            "--arch=linux/amd64",
            f"--epics-config={config}",
            "--epics-image-policy=build",
            f"--epics-log-dir={logs}",
            "-p",
            "no:cacheprovider",
        )
        result.assert_outcomes(passed=22)
        result.stdout.fnmatch_lines(["linux/amd64*passed*22*0*0*0"])
        # Each worker logs the builds it ran (in its own subfolder): two stages, built once in all.
        builds = sorted(p.name for p in logs.rglob("build-*.log"))
        assert len(builds) == 2, builds
    finally:
        remove_images_tagged(tag)


def test_a_failing_build_fails_only_its_target(
    pytester: pytest.Pytester, no_leftover_containers: None
) -> None:
    pytester.makefile(
        ".yaml",
        **{
            "epics-multiarch": f"""
schema: 1
image: {{name: broken-on-rtems, tag: t}}
build: {{stages: [runtime], args: {{BASE_IMAGE: "{BASE_IMAGE}"}}}}
"""
        },
    )
    (pytester.path / "Dockerfile").write_text(
        "ARG BASE_IMAGE\nFROM ${BASE_IMAGE} AS runtime\nARG TARGET_ARCHITECTURE\n"
        'RUN echo "building for $TARGET_ARCHITECTURE" && test "$TARGET_ARCHITECTURE" = linux\n'
    )
    pytester.makepyfile(
        test_img="def test_image(ioc_image):\n    assert ioc_image.how in ('built', 'up to date')\n"
    )
    result = pytester.runpytest_subprocess(
        "--arch=linux/amd64,rtems/powerpc/beatnik", "-v", "-p", "no:cacheprovider"
    )
    result.stdout.fnmatch_lines(
        [
            "*test_image?linux/amd64? PASSED*",
            "*test_image?rtems/powerpc/beatnik? ERROR*",
            "*[[]rtems/powerpc/beatnik[]] building broken-on-rtems-rtems-beatnik-runtime:t (stage runtime) failed*",
            "*building for rtems*",
            "*Hint: run the build by hand*",
        ]
    )
    client = docker.from_env()
    for ref in ("broken-on-rtems-runtime:t",):
        client.images.remove(ref)


def test_an_ioc_that_exits_fails_fast_with_its_log(
    pytester: pytest.Pytester, no_leftover_containers: None
) -> None:
    config = (SAMPLE / "epics-multiarch.yaml").read_text().replace("context: .", f"context: {SAMPLE}")
    config = config.replace(
        'command: ["softIoc", "-D", "/epics/epics-base/dbd/softIoc.dbd", "{startup}"]',
        'command: ["sh", "-c", "echo the IOC gives up; exit 3"]',
    )
    assert "gives up" in config
    pytester.makefile(".yaml", **{"epics-multiarch": config})
    pytester.makepyfile(test_x="def test_x(ioc):\n    pass\n")
    result = pytester.runpytest_subprocess("--arch=linux/amd64", "-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "*[[]linux/amd64[]] the IOC did not reach iocRun*",
            "*exited with code 3*",
            "*the IOC gives up*",
            "*Hint:*",
        ]
    )
    assert "seconds" not in result.stdout.str().split("the IOC did not reach iocRun")[1][:200]


def test_gate_over_the_sample_matrix(pytester: pytest.Pytester, tmp_path: Path) -> None:
    """rtems/powerpc can't run here (no RTEMS toolchain image): the gate says so; linux alone passes."""
    report = tmp_path / "r.json"
    both = pytester.runpytest_subprocess(
        str(SAMPLE),
        "--arch=linux/amd64,rtems/powerpc",
        "--epics-gate",
        f"--epics-report={report}",
        "-p",
        "no:cacheprovider",
    )
    assert both.ret == pytest.ExitCode.TESTS_FAILED, both.stdout.str()
    both.stdout.fnmatch_lines(["linux/amd64: pass", "rtems/powerpc: FAIL: skipped: *needs image*"])
    data = json.loads(report.read_text())
    assert data["gate"] == "fail"
    assert data["targets"]["linux/amd64"]["status"] == "passed"
    rtems = data["targets"]["rtems/powerpc"]
    assert (
        rtems["status"] == "skipped"
        and rtems["passed"] == 0
        and "needs image epics-rtems5" in rtems["reason"]
    )
    linux_only = pytester.runpytest_subprocess(
        str(SAMPLE), "--arch=linux/amd64", "--epics-gate", "-p", "no:cacheprovider"
    )
    assert linux_only.ret == 0, linux_only.stdout.str()


def test_a_build_only_bsp_skips_its_ioc_tests_naming_the_profiles(pytester: pytest.Pytester) -> None:
    tag = f"buildonly{Owner.current().session}"
    pytester.makefile(
        ".yaml",
        **{
            "epics-multiarch": f'schema: 1\nimage: {{name: build-only, tag: {tag}}}\nbuild: {{stages: [runtime], args: {{BASE_IMAGE: "{BASE_IMAGE}"}}}}\n'
        },
    )
    (pytester.path / "Dockerfile").write_text("ARG BASE_IMAGE\nFROM ${BASE_IMAGE} AS runtime\n")
    pytester.makepyfile(
        test_b=f"def test_image(ioc_image):\n    assert ioc_image.ref.endswith('-rtems-beatnik-runtime:{tag}')\n\n"
        "def test_boot(ioc):\n    pass\n"
    )
    try:
        result = pytester.runpytest_subprocess(
            "--arch=rtems/powerpc/beatnik", "-rs", "-p", "no:cacheprovider"
        )
        result.assert_outcomes(passed=1, skipped=1)
        result.stdout.fnmatch_lines(
            [
                "*[[]rtems/powerpc/beatnik[]] build-only target: no QEMU model boots BSP beatnik (QEMU profiles: qemuprep, pc686-qemu, pseries, custom)*"
            ]
        )
        gated = pytester.runpytest_subprocess(
            "--arch=rtems/powerpc/beatnik", "--epics-gate", "-p", "no:cacheprovider"
        )
        assert gated.ret == pytest.ExitCode.TESTS_FAILED
    finally:
        remove_images_tagged(tag)
