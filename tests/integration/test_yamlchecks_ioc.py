"""YAML checks against the real sample IOC: a right file passes, a wrong one says why, the
IOC shell works, and files with the same configuration share one IOC (with Python tests too).

Each test runs pytest in a subprocess, in a scratch folder, with the sample's config file.
"""

from __future__ import annotations

from pathlib import Path

import docker
import pytest

from pytest_epics_multiarch.engine import Owner
from pytest_epics_multiarch.session import EpicsSession
from pytest_epics_multiarch.settings import Settings

from .conftest import SAMPLE

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("subprocess_env", "no_leftover_containers")]

CONFIG = SAMPLE / "epics-multiarch.yaml"

RIGHT = """
checks:
  setpoint drives the calc:
    - put: {pv: "SAMPLE:SETPOINT", value: 12.5}
    - wait_for: {pv: "SAMPLE:DOUBLED", equals: 25.0, timeout: 5}
    - get: {pv: "SAMPLE:DOUBLED", approx: 25.0, tolerance: 0.01}
  enum by name:
    - put: {pv: "SAMPLE:MODE", value: Auto}
    - get: {pv: "SAMPLE:MODE", equals: Auto}
    - get: {pv: "SAMPLE:MODE", one_of: [1, 2]}
  alarms:
    - put: {pv: "SAMPLE:TEMPERATURE", value: 95}
    - alarm: {pv: "SAMPLE:TEMPERATURE", severity: MAJOR, status: HIHI}
  readonly:
    - put: {pv: "SAMPLE:READONLY", value: 7, refused: true, equals: 42}
    - absent: {pv: "SAMPLE:NO_SUCH_RECORD", timeout: 0.5}
  shell:
    - put: {pv: "SAMPLE:SETPOINT", value: 33.25}
    - iocsh: {command: "dbgf SAMPLE:SETPOINT", contains: "33.25", matches: "^DBF_DOUBLE"}
"""


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(
        "--arch=linux/amd64", f"--epics-config={CONFIG}", "-p", "no:cacheprovider", "-v", *args
    )


def test_a_right_file_passes(pytester: pytest.Pytester) -> None:
    pytester.makefile(".ioc.yaml", test_right=RIGHT)
    result = run(pytester)
    result.stdout.fnmatch_lines(
        [
            "*test_right.ioc.yaml::setpoint drives the calc?linux/amd64? PASSED*",
            "*test_right.ioc.yaml::enum by name?linux/amd64? PASSED*",
            "*test_right.ioc.yaml::alarms?linux/amd64? PASSED*",
            "*test_right.ioc.yaml::readonly?linux/amd64? PASSED*",
            "*test_right.ioc.yaml::shell?linux/amd64? PASSED*",
            "linux/amd64*passed*5*0*0*0",
        ]
    )
    assert result.ret == 0, result.stdout.str()


def test_a_wrong_file_fails_naming_file_check_pv_expected_and_got(pytester: pytest.Pytester) -> None:
    pytester.makefile(
        ".ioc.yaml",
        test_wrong="""
checks:
  doubled is wrong:
    - put: {pv: "SAMPLE:SETPOINT", value: 12.5}
    - wait_for: {pv: "SAMPLE:DOUBLED", equals: 26.0, timeout: 1}
  shell is wrong:
    - iocsh: {command: "dbgf SAMPLE:SETPOINT", contains: "99.5"}
""".lstrip("\n"),
    )
    result = run(pytester)
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            "*_ doubled is wrong?linux/amd64? _*",
            "test_wrong.ioc.yaml:4: wait_for SAMPLE:DOUBLED: expected 26.0 within 1 s, got 25.0 (the last value read)",
            '  check:    "doubled is wrong" (line 2), step 2 of 2: wait_for SAMPLE:DOUBLED',
            "  target:   linux/amd64",
            "  PV:       SAMPLE:DOUBLED",
            "  expected: 26.0 within 1 s",
            "  got:      25.0 (the last value read)",
            "  IOC log (last * lines):",
            "    | iocRun: All initialization complete",
            "*- IOC log linux/amd64 -*",
            "*_ shell is wrong?linux/amd64? _*",
            "test_wrong.ioc.yaml:6: iocsh 'dbgf SAMPLE:SETPOINT': expected output containing '99.5', "
            "got DBF_DOUBLE:*12.5",
        ]
    )


def test_files_with_the_same_configuration_share_one_ioc(pytester: pytest.Pytester) -> None:
    """A put in the first file is read back in the second and by a Python test; a file with
    other ``ioc:`` settings gets its own IOC, still at the start-up value."""
    pytester.makefile(
        ".ioc.yaml",
        test_a='checks:\n  writes:\n    - put: {pv: "SAMPLE:MESSAGE", value: "from file a"}\n',
        test_b='checks:\n  reads:\n    - get: {pv: "SAMPLE:MESSAGE", equals: "from file a"}\n',
        test_c="ioc:\n  environment: {YAMLCHECKS_OWN_IOC: '1'}\n"
        'checks:\n  own ioc:\n    - get: {pv: "SAMPLE:MESSAGE", equals: hello}\n',
    )
    pytester.makepyfile(
        test_d="""
        def test_python_test_reads_it(ca):
            assert ca.get("SAMPLE:MESSAGE") == "from file a"
        """
    )
    result = run(pytester, "--epics-ioc-scope=session")
    result.stdout.fnmatch_lines(
        [
            "*test_a.ioc.yaml::writes?linux/amd64? PASSED*",
            "*test_b.ioc.yaml::reads?linux/amd64? PASSED*",
            "*test_c.ioc.yaml::own ioc?linux/amd64? PASSED*",
            "*test_d.py::test_python_test_reads_it?linux/amd64? PASSED*",
        ]
    )
    assert result.ret == 0, result.stdout.str()


def test_an_ioc_image_override_runs_that_image(pytester: pytest.Pytester, tmp_path: Path) -> None:
    """``ioc.image`` runs a local image under another name, with no build (and a name that
    exists nowhere fails the check with the name and the file)."""
    session = EpicsSession(Settings(arch=("linux/amd64",)), work_dir=tmp_path, progress=lambda m: None)
    config = session.config_for(SAMPLE / "tests")
    built = session.image(config, config.target("linux/amd64"))
    session.close()
    repo, _ = built.ref.rsplit(":", 1)
    tag = f"yamlchecks{Owner.current().session}"
    client = docker.from_env()
    client.images.get(built.ref).tag(repo, tag)
    try:
        template = repo.replace("sample-ioc-runtime", "sample-ioc{image_ext}-runtime")
        pytester.makefile(
            ".ioc.yaml",
            test_image=f"ioc:\n  image: {template}:{tag}\n"
            'checks:\n  runs:\n    - get: {pv: "SAMPLE:MESSAGE", equals: hello}\n',
            test_missing=f"ioc:\n  image: {repo}:{tag}-missing\n"
            'checks:\n  runs:\n    - get: {pv: "SAMPLE:MESSAGE", equals: hello}\n',
        )
        result = run(pytester)
    finally:
        client.images.remove(f"{repo}:{tag}")
        client.close()
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*test_image.ioc.yaml::runs?linux/amd64? PASSED*",
            f"*[[]linux/amd64[]] could not pull {repo}:{tag}-missing, the ioc.image of test_missing.ioc.yaml*",
        ]
    )


@pytest.mark.qemu
@pytest.mark.slow
def test_the_sample_file_runs_on_the_powerpc_guest(pytester: pytest.Pytester) -> None:
    """The same file on an emulated target: iocsh through QEMU's serial console."""
    client = docker.from_env()
    try:
        client.images.get("pytest-epics-multiarch/ppc64le-guest:latest")
    except docker.errors.ImageNotFound:
        pytest.skip("the PowerPC test guest image is missing (make setup builds it)")
    finally:
        client.close()
    result = pytester.runpytest_subprocess(
        str(SAMPLE / "tests" / "test_sample.ioc.yaml"), "--arch=linux/ppc64le", "-p", "no:cacheprovider", "-v"
    )
    result.stdout.fnmatch_lines(
        [
            "*test_sample.ioc.yaml::the IOC shell shows the value?linux/ppc64le? PASSED*",
            "linux/ppc64le*passed*7*0*0*0",
        ]
    )
    assert result.ret == 0, result.stdout.str()
