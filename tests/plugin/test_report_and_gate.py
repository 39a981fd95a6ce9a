"""The matrix, the JSON report and --epics-gate as users see them (no engine needed)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

TESTS = """
import pytest

def test_ok(ioc_target):
    pass

@pytest.mark.arch("linux/amd64")
def test_linux_only(ioc_target):
    pass

def test_rtems_is_missing_a_toolchain(ioc_target):
    if ioc_target.name == "rtems/powerpc":
        pytest.skip("RTEMS toolchain image missing")
"""


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makefile(".yaml", **{"epics-multiarch": "schema: 1\nimage: {name: sample}\n"})
    pytester.makepyfile(test_t=TESTS)
    return pytester


def test_matrix_and_report(project: pytest.Pytester) -> None:
    result = project.runpytest("--arch=linux/amd64,rtems/powerpc", "--epics-report=out/r.json")
    result.assert_outcomes(passed=4, skipped=1)
    result.stdout.fnmatch_lines(
        [
            "*epics-multiarch target matrix*",
            "target*status*image*start*passed*failed*skipped*errors",
            "linux/amd64*passed*3*0*0*0",
            "rtems/powerpc*passed*1*0*1*0",
            "*report written to*r.json",
        ]
    )
    assert result.ret == 0  # without --epics-gate skips stay skips
    data = json.loads((project.path / "out" / "r.json").read_text())
    assert data["gate"] == "pass"
    assert data["targets"]["linux/amd64"]["passed"] == 3
    assert data["targets"]["rtems/powerpc"]["skipped"] == 1


def test_gate_fails_a_target_that_only_skipped(project: pytest.Pytester) -> None:
    project.makepyfile(
        test_t="import pytest\n\ndef test_x(ioc_target):\n    if ioc_target.name == 'rtems/powerpc':\n"
        "        pytest.skip('RTEMS toolchain image missing')\n"
    )
    result = project.runpytest("--arch=linux/amd64,rtems/powerpc", "--epics-gate", "--epics-report=r.json")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        [
            "*epics-multiarch release gate*",
            "linux/amd64: pass",
            "rtems/powerpc: FAIL: skipped: RTEMS toolchain image missing",
        ]
    )
    data = json.loads((project.path / "r.json").read_text())
    assert data["gate"] == "fail" and data["targets"]["rtems/powerpc"]["status"] == "skipped"


def test_gate_passes_when_every_target_passes(project: pytest.Pytester) -> None:
    result = project.runpytest("--arch=linux/amd64", "--epics-gate")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["linux/amd64: pass"])


def test_gate_fails_a_selected_target_that_ran_no_test(project: pytest.Pytester) -> None:
    result = project.runpytest("--arch=linux/amd64,rtems/powerpc/beatnik", "--epics-gate", "-k", "linux_only")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["rtems/powerpc/beatnik: FAIL: ran no test"])


def test_gate_fails_on_a_failure(project: pytest.Pytester) -> None:
    project.makepyfile(test_f="def test_bad(ioc_target):\n    assert ioc_target.name != 'linux/amd64'\n")
    result = project.runpytest("--arch=linux/amd64", "--epics-gate", "--epics-report=r.json", "test_f.py")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["linux/amd64: FAIL: 1 failed, 0 errors"])
    failure = json.loads((project.path / "r.json").read_text())["targets"]["linux/amd64"]["failures"][0]
    assert failure["test"] == "test_f.py::test_bad[linux/amd64]" and "assert" in failure["reason"]


def test_xdist_matrix_and_report_are_whole(project: pytest.Pytester) -> None:
    result = project.runpytest_subprocess(
        "-n", "2", "--arch=linux/amd64,rtems/powerpc", "--epics-report=r.json", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(passed=4, skipped=1)
    result.stdout.fnmatch_lines(["linux/amd64*passed*3*0*0*0", "rtems/powerpc*passed*1*0*1*0"])
    data = json.loads((project.path / "r.json").read_text())
    assert data["targets"]["linux/amd64"]["passed"] == 3 and data["targets"]["rtems/powerpc"]["skipped"] == 1


def test_merge_reports_runs_as_a_module(project: pytest.Pytester) -> None:
    """The gate job of the documented CI workflow: one report per target job, then a merge."""
    assert project.runpytest("--arch=linux/amd64", "--epics-report=linux.json").ret == 0
    assert project.runpytest("--arch=rtems/powerpc", "--epics-report=rtems.json").ret == 0
    merged = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest_epics_multiarch",
            "merge-reports",
            "linux.json",
            "rtems.json",
            "-o",
            "all.json",
        ],
        cwd=project.path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert merged.returncode == 0, merged.stdout + merged.stderr
    assert json.loads((project.path / "all.json").read_text())["gate"] == "pass"
