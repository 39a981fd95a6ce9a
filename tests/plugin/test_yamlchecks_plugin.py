"""YAML checks as users meet them through pytest: collection, ids per target, the targets
filter, collection errors, skips, failure reports and IOC sharing.

A conftest swaps the session's image and IOC for fakes, so none of this needs an engine; the
real IOC is in tests/integration/test_yamlchecks_ioc.py.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

CONFIG = "schema: 1\nimage: {name: sample}\n"

#: Replaces the session's image and shared IOCs with fakes: PVs in a dict, a canned shell.
FAKE_CONFTEST = """
import pytest

from pytest_epics_multiarch.errors import CATimeoutError, IocStartError
from pytest_epics_multiarch.images import ImageResult
from pytest_epics_multiarch.stash import session_key


class FakeCA:
    def __init__(self):
        self.values = {"SAMPLE:SETPOINT": 0.0, "SAMPLE:DOUBLED": 0.0, "SAMPLE:MESSAGE": "hello"}

    def get(self, pv, *, timeout=None, as_string=False):
        if pv not in self.values:
            raise CATimeoutError(f"could not get {pv!r}", target="fake", seen="no reply to the search")
        return self.values[pv]

    def put(self, pv, value, *, timeout=None):
        self.values[pv] = value
        if pv == "SAMPLE:SETPOINT":
            self.values["SAMPLE:DOUBLED"] = 2 * value

    def exists(self, pv, *, timeout=1.0):
        return pv in self.values


class FakeIoc:
    def __init__(self, target, number):
        self.target = target
        self.ca = FakeCA()
        self.number = number

    def logs(self):
        return f"iocInit\\niocRun: All initialization complete (fake IOC {self.number})\\n"

    def iocsh(self, command, timeout=10.0):
        if command.startswith("dbgf "):
            return f"DBF_DOUBLE:         {self.ca.values[command.split()[1]]}\\n"
        return ""


STARTS = []


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    session = config.stash[session_key]
    iocs = {}

    def image(project, target):
        return ImageResult("reg/sample-runtime:dev", target, "local", 0.0, "sha256:1", "sha256:1")

    def shared_ioc(project, target, image, spec=None):
        spec = spec or project.ioc_for(target)
        key = (project.where, target.name, image.ref, repr(spec))
        if key not in iocs:
            env = ",".join(f"{k}={v}" for k, v in spec.environment.items())
            STARTS.append(f"{target.name} {image.ref} startup={spec.startup} env={env}")
            if "FAIL_TO_START" in spec.environment:
                raise IocStartError("the IOC did not reach iocRun", target=target.name, seen="exit code 1")
            iocs[key] = FakeIoc(target, len(STARTS))
        return iocs[key]

    session.image = image
    session.shared_ioc = shared_ioc


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"FAKE IOC STARTS: {len(STARTS)}")
    for line in STARTS:
        terminalreporter.write_line(f"FAKE IOC START: {line}")
"""

GOOD = """
checks:
  setpoint drives the calc:
    - put: {pv: "SAMPLE:SETPOINT", value: 12.5}
    - wait_for: {pv: "SAMPLE:DOUBLED", equals: 25.0, timeout: 1}
  shell:
    - iocsh: {command: "dbgf SAMPLE:SETPOINT", contains: "12.5"}
"""


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makefile(".yaml", **{"epics-multiarch": CONFIG})
    return pytester


@pytest.fixture
def faked(project: pytest.Pytester) -> pytest.Pytester:
    project.makeconftest(FAKE_CONFTEST)
    return project


def write_checks(pytester: pytest.Pytester, name: str, text: str) -> None:
    pytester.makefile(".ioc.yaml", **{name: text.lstrip("\n")})


def test_one_item_per_check_per_target_without_an_engine(project: pytest.Pytester) -> None:
    write_checks(project, "test_sample", GOOD)
    project.makefile(".yaml", **{"sample": "checks: {}\n", "test_other": "not: collected\n"})
    result = project.runpytest("--collect-only", "-q", "--arch=linux/amd64,rtems/powerpc")
    result.stdout.fnmatch_lines(
        [
            "test_sample.ioc.yaml::setpoint drives the calc[linux/amd64]",
            "test_sample.ioc.yaml::shell[linux/amd64]",
            "test_sample.ioc.yaml::setpoint drives the calc[rtems/powerpc]",
            "test_sample.ioc.yaml::shell[rtems/powerpc]",
            "4 tests collected*",
        ]
    )
    assert result.ret == pytest.ExitCode.OK


def test_a_right_file_passes_and_counts_in_the_matrix_and_junit(faked: pytest.Pytester) -> None:
    write_checks(faked, "test_sample", GOOD)
    result = faked.runpytest(
        "-v", "--arch=linux/amd64", "--junitxml=out.xml", "--epics-report=r.json", "-o", "junit_family=xunit1"
    )
    result.stdout.fnmatch_lines(
        [
            "*test_sample.ioc.yaml::setpoint drives the calc?linux/amd64? PASSED*",
            "*test_sample.ioc.yaml::shell?linux/amd64? PASSED*",
            "*epics-multiarch target matrix*",
            "linux/amd64*passed*2*0*0*0",
        ]
    )
    result.stdout.fnmatch_lines(["FAKE IOC STARTS: 1"])
    assert result.ret == pytest.ExitCode.OK
    cases = ET.parse(faked.path / "out.xml").getroot().iter("testcase")
    found = {
        case.get("name"): (case.get("line"), [(p.get("name"), p.get("value")) for p in case.iter("property")])
        for case in cases
    }
    # reportinfo points at the check's line (0-based in JUnit, as pytest reports it).
    assert found == {
        "setpoint drives the calc[linux/amd64]": ("1", [("target", "linux/amd64")]),
        "shell[linux/amd64]": ("4", [("target", "linux/amd64")]),
    }
    linux = json.loads((faked.path / "r.json").read_text())["targets"]["linux/amd64"]
    assert linux["status"] == "passed" and linux["passed"] == 2


def test_a_wrong_file_fails_naming_file_check_target_pv_expected_got_and_log(faked: pytest.Pytester) -> None:
    write_checks(
        faked,
        "test_wrong",
        """
checks:
  doubled is wrong:
    - put: {pv: "SAMPLE:SETPOINT", value: 12.5}
    - wait_for: {pv: "SAMPLE:DOUBLED", equals: 26.0, timeout: 0.2}
""",
    )
    result = faked.runpytest("--arch=linux/amd64", "--epics-report=r.json")
    result.assert_outcomes(failed=1)
    headline = (
        "test_wrong.ioc.yaml:4: wait_for SAMPLE:DOUBLED: expected 26.0 within 0.2 s, "
        "got 25.0 (the last value read)"
    )
    result.stdout.fnmatch_lines(
        [
            "*_ doubled is wrong?linux/amd64? _*",
            headline,
            "  file:     test_wrong.ioc.yaml, line 4",
            '  check:    "doubled is wrong" (line 2), step 2 of 2: wait_for SAMPLE:DOUBLED',
            "  target:   linux/amd64",
            "  PV:       SAMPLE:DOUBLED",
            "  expected: 26.0 within 0.2 s",
            "  got:      25.0 (the last value read)",
            "  IOC log (last 2 lines):",
            "    | iocInit",
            "    | iocRun: All initialization complete (fake IOC 1)",
            headline,
            "*- IOC log linux/amd64 -*",
            "FAILED test_wrong.ioc.yaml::doubled is wrong?linux/amd64? - test_wrong.ioc.y*",
        ]
    )
    assert "Traceback" not in result.stdout.str()
    failures = json.loads((faked.path / "r.json").read_text())["targets"]["linux/amd64"]["failures"]
    assert failures == [{"test": "test_wrong.ioc.yaml::doubled is wrong[linux/amd64]", "reason": headline}]


def test_a_malformed_file_fails_collection_with_file_and_line(project: pytest.Pytester) -> None:
    write_checks(project, "test_good", GOOD)
    write_checks(
        project,
        "test_bad",
        """
checks:
  setpoint:
    - put: {pv: "SAMPLE:SETPOINT", value: 12.5}
    - get: {pv: "SAMPLE:DOUBLED", expect: 25.0}
""",
    )
    result = project.runpytest("--arch=linux/amd64")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(
        [
            "*ERROR collecting test_bad.ioc.yaml*",
            "test_bad.ioc.yaml:4: check \"setpoint\", step 2 (get): unknown key 'expect'; expected one of: "
            "pv, as_string, timeout, tolerance, equals, approx, matches, one_of",
            "*Interrupted: 1 error during collection*",
        ]
    )
    assert "Traceback" not in result.stdout.str()


def test_invalid_yaml_fails_collection_with_the_line(project: pytest.Pytester) -> None:
    write_checks(project, "test_broken", "checks:\n  c:\n    - get: {pv: X\n    - sleep: 1\n")
    result = project.runpytest("--arch=linux/amd64")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["test_broken.ioc.yaml:4: not valid YAML: *"])


def test_targets_filter_runs_only_the_named_targets(project: pytest.Pytester) -> None:
    write_checks(project, "test_rtems", "targets: [rtems/powerpc]\n" + GOOD)
    result = project.runpytest("--collect-only", "-q", "--arch=linux/amd64,rtems/powerpc")
    result.stdout.fnmatch_lines(["test_rtems.ioc.yaml::setpoint drives the calc[rtems/powerpc]", "2 tests*"])
    assert "[linux/amd64]" not in result.stdout.str()


def test_targets_filter_that_excludes_every_selected_target_skips_with_the_reason(
    project: pytest.Pytester,
) -> None:
    write_checks(project, "test_rtems", "targets: [rtems/powerpc]\n" + GOOD)
    result = project.runpytest("-rs", "--arch=linux/amd64")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(["*this file runs on rtems/powerpc; the selected targets are linux/amd64*"])


def test_targets_filter_with_an_unknown_target_fails_collection(project: pytest.Pytester) -> None:
    write_checks(project, "test_typo", "targets: [linux/amd46]\n" + GOOD)
    result = project.runpytest("--arch=linux/amd64")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(
        ["test_typo.ioc.yaml:1: targets: unknown target 'linux/amd46'; expected one of: linux/amd64, *"]
    )


def test_build_only_targets_skip(project: pytest.Pytester) -> None:
    write_checks(project, "test_sample", GOOD)
    result = project.runpytest("-rs", "--arch=rtems/powerpc/beatnik")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(
        ["*[[]rtems/powerpc/beatnik[]] build-only target: no QEMU model boots BSP beatnik*"]
    )


def test_no_engine_skips_like_python_tests(project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{project.path}/no-engine.sock")
    write_checks(project, "test_sample", GOOD)
    result = project.runpytest("-rs", "--arch=linux/amd64")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(["*no Docker engine answers*"])


def test_files_with_the_same_configuration_share_one_ioc_with_python_tests(faked: pytest.Pytester) -> None:
    write_checks(faked, "test_a", 'checks:\n  put:\n    - put: {pv: "SAMPLE:MESSAGE", value: from a}\n')
    write_checks(faked, "test_b", 'checks:\n  get:\n    - get: {pv: "SAMPLE:MESSAGE", equals: from a}\n')
    write_checks(
        faked,
        "test_c",
        "ioc:\n  environment: {B: 2, A: 1}\n  startup: /other.cmd\n"
        'checks:\n  own ioc:\n    - get: {pv: "SAMPLE:MESSAGE", equals: hello}\n',
    )
    write_checks(
        faked,
        "test_d",
        "ioc:\n  environment: {A: 1, B: 2}\n  startup: /other.cmd\n"
        'checks:\n  shares with c:\n    - get: {pv: "SAMPLE:MESSAGE", equals: hello}\n',
    )
    faked.makepyfile(
        test_e='def test_python_reads_it(ca):\n    assert ca.get("SAMPLE:MESSAGE") == "from a"\n'
    )
    result = faked.runpytest("-v", "--arch=linux/amd64", "--epics-ioc-scope=session")
    result.assert_outcomes(passed=5)
    result.stdout.fnmatch_lines(
        [
            "FAKE IOC STARTS: 2",
            "FAKE IOC START: linux/amd64 reg/sample-runtime:dev startup=None env=",
            "FAKE IOC START: linux/amd64 reg/sample-runtime:dev startup=/other.cmd env=A=1,B=2",
        ]
    )


def test_an_ioc_that_fails_to_start_is_tried_once(faked: pytest.Pytester) -> None:
    write_checks(faked, "test_a", "ioc:\n  environment: {FAIL_TO_START: 1}\n" + GOOD)
    result = faked.runpytest("--arch=linux/amd64")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(["*[[]linux/amd64[]] the IOC did not reach iocRun*", "FAKE IOC STARTS: 1"])


IMAGE_ENGINE = """

class FakeEngine:
    def pull(self, ref, platform):
        import docker.errors
        raise docker.errors.APIError(f"pull access denied for {ref.rsplit(':', 1)[0]}")

    def describe(self):
        return "fake engine"

    def image_id(self, ref):
        return "sha256:local" if ref.startswith("local/") else None


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session):
    session.config.stash[session_key].engine = FakeEngine
"""


def test_ioc_image_override_per_target_local_or_pulled(faked: pytest.Pytester) -> None:
    faked.makeconftest(FAKE_CONFTEST + IMAGE_ENGINE)
    write_checks(faked, "test_local", 'ioc:\n  image: "local/ioc{image_ext}:1"\n' + GOOD)
    write_checks(faked, "test_missing", 'ioc:\n  image: "127.0.0.1:5055/none:1"\n' + GOOD)
    result = faked.runpytest("--arch=linux/amd64,rtems/powerpc")
    result.assert_outcomes(passed=4, errors=4)
    result.stdout.fnmatch_lines(
        [
            "*[[]linux/amd64[]] could not pull 127.0.0.1:5055/none:1, the ioc.image of test_missing.ioc.y*",
            "*seen: pull access denied for 127.0.0.1:5055/none*",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "FAKE IOC START: linux/amd64 local/ioc:1 *",
            "FAKE IOC START: rtems/powerpc local/ioc-rtems-qemuprep:1 *",
        ]
    )
