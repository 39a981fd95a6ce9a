"""The plugin as users meet it: options, usage errors, parametrization, markers, header."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

TARGET_TEST = """
def test_target(ioc_target):
    print("TARGET", ioc_target.name, ioc_target.epics_arch)
"""


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makefile(".yaml", **{"epics-multiarch": "schema: 1\nimage: {name: sample}\n"})
    pytester.makepyfile(test_t=TARGET_TEST)
    return pytester


def test_help_lists_options_with_their_twins(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(
        [
            "*EPICS IOC image tests across targets*",
            "*--arch=NAME*",
            "*--epics-image-policy={build,pull,auto}*",
            "*EPICS_MULTIARCH_IMAGE_POLICY*",
            "*--epics-keep-iocs*",
            "*--epics-report=PATH*",
            "*--epics-gate*",
        ]
    )


@pytest.mark.parametrize("arch", ["nonsense", "linux/sparc", "Linux/amd64"])
def test_bad_arch_is_a_usage_error_listing_valid_targets(project: pytest.Pytester, arch: str) -> None:
    result = project.runpytest(f"--arch={arch}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{arch}*", "*valid targets: linux/amd64, rtems/powerpc*"])


def test_default_target_is_linux_amd64(project: pytest.Pytester) -> None:
    result = project.runpytest("-v", "-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*test_target?linux/amd64? TARGET linux/amd64 linux-x86_64*"])


def test_each_test_runs_once_per_target(project: pytest.Pytester) -> None:
    result = project.runpytest("-v", "--arch=linux/amd64,rtems/powerpc", "--arch", "rtems/powerpc/beatnik")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(
        [
            "*test_target?linux/amd64? PASSED*",
            "*test_target?rtems/powerpc? PASSED*",
            "*test_target?rtems/powerpc/beatnik? PASSED*",
        ]
    )


def test_environment_and_ini_twins(project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    project.makeini("[pytest]\nepics_arch = rtems/powerpc\n")
    result = project.runpytest("-v")
    result.stdout.fnmatch_lines(["*test_target?rtems/powerpc? PASSED*"])
    monkeypatch.setenv("EPICS_MULTIARCH_ARCH", "linux/amd64")
    result = project.runpytest("-v")  # the environment beats the ini file
    result.stdout.fnmatch_lines(["*test_target?linux/amd64? PASSED*"])
    result = project.runpytest("-v", "--arch=rtems/powerpc/beatnik")  # the command line beats both
    result.stdout.fnmatch_lines(["*test_target?rtems/powerpc/beatnik? PASSED*"])


def test_config_default_targets_and_added_targets(pytester: pytest.Pytester) -> None:
    pytester.makefile(
        ".yaml",
        **{
            "epics-multiarch": """
schema: 1
image: {name: sample}
default_targets: [linux/amd64, linux/arm64]
targets:
  linux/arm64: {epics_arch: linux-aarch64, platform: linux/arm64}
"""
        },
    )
    pytester.makepyfile(test_t=TARGET_TEST)
    result = pytester.runpytest("-v", "-s")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*TARGET linux/arm64 linux-aarch64*"])
    assert pytester.runpytest("--arch=linux/arm64").ret == 0  # config targets are valid --arch names


def test_arch_markers(project: pytest.Pytester) -> None:
    project.makepyfile(
        test_m="""
import pytest

@pytest.mark.arch("rtems/powerpc")
def test_only_rtems(ioc_target):
    assert ioc_target.name == "rtems/powerpc"

@pytest.mark.skip_arch("rtems/powerpc")
def test_not_rtems(ioc_target):
    assert ioc_target.name == "linux/amd64"
"""
    )
    result = project.runpytest("-v", "--arch=linux/amd64,rtems/powerpc", "test_m.py")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        ["*test_only_rtems?rtems/powerpc? PASSED*", "*test_not_rtems?linux/amd64? PASSED*"]
    )


def test_bad_option_value_names_its_source(project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    result = project.runpytest("--epics-image-policy=sometimes")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--epics-image-policy*sometimes*", "*expected one of build, pull, auto*"])
    monkeypatch.setenv("EPICS_MULTIARCH_GATE", "perhaps")
    result = project.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*environment EPICS_MULTIARCH_GATE*"])


def test_bad_config_file_is_a_usage_error_naming_file_and_key(pytester: pytest.Pytester) -> None:
    pytester.makefile(".yaml", **{"epics-multiarch": "schema: 1\nimage: {name: x, colour: red}\n"})
    pytester.makepyfile(test_t=TARGET_TEST)
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*epics-multiarch.yaml: unknown key image.colour*"])


def test_missing_explicit_config(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_t=TARGET_TEST)
    result = pytester.runpytest("--epics-config=nope.yaml")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--epics-config: no such file*nope.yaml*"])


def test_header_names_targets(project: pytest.Pytester) -> None:
    result = project.runpytest("--arch=rtems/powerpc")
    result.stdout.fnmatch_lines(["epics-multiarch: targets rtems/powerpc; images: auto; CA client: caproto"])


def test_target_id_and_junit_property(project: pytest.Pytester) -> None:
    result = project.runpytest("--junitxml=out.xml", "--arch=linux/amd64")
    result.assert_outcomes(passed=1)
    xml = (project.path / "out.xml").read_text()
    assert '<property name="target" value="linux/amd64"' in xml


def test_image_without_config_is_a_clear_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_i="def test_image(ioc_image):\n    pass\n")
    result = pytester.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*[[]linux/amd64[]] no image is configured*", "*Hint: add epics-multiarch.yaml*"]
    )
