"""YAML checks without an IOC: the parser (every step, every error with file and line), the
runner against a fake IOC, and the failure text."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pytest_epics_multiarch.config import IocSpec
from pytest_epics_multiarch.errors import CAPutError, CATimeoutError
from pytest_epics_multiarch.yamlchecks import CheckFileError, StepFailed, load_check_file, parse_check_file
from pytest_epics_multiarch.yamlchecks.model import (
    AbsentStep,
    AlarmStep,
    Check,
    Expectation,
    GetStep,
    IocOverrides,
    IocshStep,
    PutStep,
    SleepStep,
    WaitForStep,
)
from pytest_epics_multiarch.yamlchecks.nodes import ioc_spec_for
from pytest_epics_multiarch.yamlchecks.runner import format_failure, run_check, satisfies

WHERE = "tests/test_x.ioc.yaml"


def parse(text: str) -> Any:
    return parse_check_file(textwrap.dedent(text).lstrip("\n"), WHERE)


# -- the parser: a valid file ---------------------------------------------------------------------

FULL = """
targets: [linux/amd64, rtems/powerpc]
ioc:
  image: "reg/ioc{image_ext}-runtime:1"
  startup: /epics/ioc/config/other.cmd
  environment: {EPICS_CA_MAX_ARRAY_BYTES: 1000000, MODE: "1.50"}
checks:
  every step:
    - get: {pv: "P:A", equals: 25.0}
    - get: {pv: "P:A", approx: 25.0, tolerance: 0.01}
    - get: {pv: "P:MSG", matches: "^hel+o$"}
    - get: {pv: "P:MODE", one_of: [On, Auto]}
    - get: {pv: "P:MODE", equals: 2, as_string: false, timeout: 2}
    - get: P:PLAIN
    - put: {pv: "P:SP", value: 12.5}
    - put: {pv: "P:SP", value: 500, equals: 100, timeout: 3}
    - put: {pv: "P:RO", value: 7, refused: true, equals: 42}
    - put: {pv: "P:WAVE", value: [1.5, 2.5]}
    - wait_for: {pv: "P:B", equals: 25.0, timeout: 5}
    - wait_for: {pv: "P:MODE", equals: Off}
    - alarm: {pv: "P:T", severity: major, status: HIHI}
    - alarm: {pv: "P:T", severity: NO_ALARM}
    - absent: {pv: "P:GONE", timeout: 0.5}
    - absent: P:GONE2
    - iocsh: {command: "dbgf P:SP", contains: "12.5", matches: "DBF_\\\\w+"}
    - iocsh: {command: dbl, contains: [P:A, P:B]}
    - iocsh: "dbpr P:SP"
    - sleep: 0.5
  second:
    - sleep: 0
"""


def test_a_file_with_every_step_kind() -> None:
    spec = parse(FULL)
    assert spec.where == WHERE
    assert spec.targets == ("linux/amd64", "rtems/powerpc") and spec.targets_line == 1
    assert spec.ioc == IocOverrides(
        image="reg/ioc{image_ext}-runtime:1",
        startup="/epics/ioc/config/other.cmd",
        environment={"EPICS_CA_MAX_ARRAY_BYTES": "1000000", "MODE": "1.50"},
    )
    assert [c.name for c in spec.checks] == ["every step", "second"]
    check = spec.checks[0]
    assert check.line == 7
    assert check.steps == (
        GetStep(8, "P:A", Expectation("equals", 25.0)),
        GetStep(9, "P:A", Expectation("approx", 25.0, 0.01)),
        GetStep(10, "P:MSG", Expectation("matches", "^hel+o$")),
        GetStep(11, "P:MODE", Expectation("one_of", ("On", "Auto"))),
        GetStep(12, "P:MODE", Expectation("equals", 2), as_string=False, timeout=2.0),
        GetStep(13, "P:PLAIN"),
        PutStep(14, "P:SP", 12.5),
        PutStep(15, "P:SP", 500, expect=Expectation("equals", 100), timeout=3.0),
        PutStep(16, "P:RO", 7, refused=True, expect=Expectation("equals", 42)),
        PutStep(17, "P:WAVE", [1.5, 2.5]),
        WaitForStep(18, "P:B", Expectation("equals", 25.0), timeout=5.0),
        WaitForStep(19, "P:MODE", Expectation("equals", "Off")),
        AlarmStep(20, "P:T", severity="MAJOR", status="HIHI"),
        AlarmStep(21, "P:T", severity="NO_ALARM"),
        AbsentStep(22, "P:GONE", 0.5),
        AbsentStep(23, "P:GONE2", 1.0),
        IocshStep(24, "dbgf P:SP", ("12.5",), "DBF_\\w+"),
        IocshStep(25, "dbl", ("P:A", "P:B")),
        IocshStep(26, "dbpr P:SP"),
        SleepStep(27, 0.5),
    )
    assert spec.checks[1].steps == (SleepStep(29, 0.0),)


def test_optional_sections_and_comma_separated_targets(tmp_path: Path) -> None:
    path = tmp_path / "test_a.ioc.yaml"
    path.write_text("targets: linux/amd64, rtems/powerpc\nchecks:\n  c:\n    - get: X\n")
    spec = load_check_file(path)
    assert spec.where == str(path) and spec.targets == ("linux/amd64", "rtems/powerpc")
    assert parse("checks:\n  c:\n    - get: X\n").targets is None
    assert parse("checks:\n  c:\n    - get: X\n").ioc == IocOverrides()


def test_values_are_read_as_ioc_authors_mean_them() -> None:
    spec = parse(
        """
        checks:
          c:
            - put: {pv: 1:30, value: Off}
            - get: {pv: "P:X", one_of: [yes, No, 1:30, 0x10, "7"]}
            - iocsh: {command: "dbgf X", contains: 1.50}
        """
    )
    put, get, iocsh = spec.checks[0].steps
    assert put == PutStep(3, "1:30", "Off")
    assert get.expect == Expectation("one_of", ("yes", "No", "1:30", 16, "7"))
    assert iocsh.contains == ("1.50",)


def test_string_expectations_read_the_string_form() -> None:
    assert Expectation("equals", "Auto").wants_string
    assert Expectation("matches", "^1").wants_string
    assert Expectation("one_of", (1, "On")).wants_string
    assert not Expectation("equals", 2).wants_string
    assert not Expectation("approx", [1.0, 2.0]).wants_string


# -- the parser: every error names file and line ------------------------------------------------


@pytest.mark.parametrize(
    "text, line, message",
    [
        ("checks: [1, 2\nfoo: 3\n", 2, "not valid YAML: expected ',' or ']'"),
        ("", 1, "the file is empty; expected a mapping with checks:"),
        ("- get: X\n", 1, "expected a mapping with checks:, got a list"),
        ("targets: [linux/amd64]\n", 1, "missing key 'checks'"),
        ("checks: {}\ncheck: 1\n", 2, "unknown key 'check'; expected one of: targets, ioc, checks"),
        ("checks: {}\n", 1, "checks: expected at least one check"),
        ("checks: [get: X]\n", 1, "checks: expected a mapping of check names to lists of steps, got a list"),
        ("checks:\n  c: []\n", 2, 'check "c": expected at least one step'),
        ("checks:\n  c:\n    get: X\n", 3, 'check "c": expected a list of steps, got a mapping'),
        ("checks:\n  c:\n    - get: X\n  c:\n    - get: Y\n", 4, "duplicate key 'c' (first on line 3)"),
        ("checks:\n  a::b:\n    - get: X\n", 2, "'a::b' is not a usable check name"),
        (
            "checks:\n  c:\n    - get:\n      pv: X\n",
            3,
            'check "c", step 1: expected one of get, put, wait_for, alarm, absent, iocsh, sleep with its '
            "settings, got the keys get, pv; indent the settings under get:",
        ),
        ("checks:\n  c:\n    - fetch: X\n", 3, "unknown step 'fetch'; expected one of: get, put, wait_for"),
        ("checks:\n  c:\n    - X\n", 3, 'check "c", step 1: expected one of get, put, wait_for'),
        ("checks:\n  c:\n    - X\n", 3, "sleep with its settings, got 'X'"),
        ("checks:\n  c:\n    - {}\n", 3, "sleep with its settings, got nothing"),
        (
            "checks:\n  c:\n    - get: X\n    - get: {pv: X, expect: 3}\n",
            4,
            "check \"c\", step 2 (get): unknown key 'expect'; expected one of: pv, as_string, timeout, "
            "tolerance, equals, approx, matches, one_of",
        ),
        ("checks:\n  c:\n    - get: {equals: 3}\n", 3, "step 1 (get): missing key 'pv'"),
        ("checks:\n  c:\n    - get: {pv: [A, B]}\n", 3, "step 1 (get).pv: expected a PV name, got a list"),
        ("checks:\n  c:\n    - get:\n", 3, "expected a PV name, got nothing"),
        ("checks:\n  c:\n    - put: {pv: X}\n", 3, "step 1 (put): missing key 'value'"),
        ("checks:\n  c:\n    - put: X\n", 3, "step 1 (put): expected a mapping with pv: and value:, got 'X'"),
        ("checks:\n  c:\n    - put: {pv: X, value: true}\n", 3, "true is ambiguous for a PV: write 1 or 0"),
        ("checks:\n  c:\n    - put: {pv: X, value: {a: 1}}\n", 3, "expected a value (a number, text"),
        ("checks:\n  c:\n    - put: {pv: X, value: 1, refused: 1}\n", 3, "refused: expected true or false"),
        (
            "checks:\n  c:\n    - wait_for: {pv: X, timeout: 5}\n",
            3,
            "expected one of equals, approx, matches",
        ),
        (
            "checks:\n  c:\n    - get: {pv: X,\n        equals: 1,\n        approx: 1}\n",
            5,
            "expected one of equals, approx, matches, one_of, not several",
        ),
        ("checks:\n  c:\n    - get: {pv: X, equals: 1, tolerance: 1}\n", 3, "tolerance goes with approx:"),
        ("checks:\n  c:\n    - get: {pv: X, approx: high}\n", 3, "approx: expected a number (or a list"),
        ("checks:\n  c:\n    - get: {pv: X, approx: 1, tolerance: -1}\n", 3, "expected a tolerance"),
        ("checks:\n  c:\n    - get: {pv: X, matches: '('}\n", 3, "not a valid regular expression"),
        ("checks:\n  c:\n    - get: {pv: X, one_of: []}\n", 3, "one_of: expected a list of at least one"),
        ("checks:\n  c:\n    - get: {pv: X, as_string: yes please}\n", 3, "expected true or false"),
        ("checks:\n  c:\n    - get: {pv: X, timeout: 0}\n", 3, "timeout: expected seconds (a positive"),
        ("checks:\n  c:\n    - get: {pv: X, timeout: soon}\n", 3, "timeout: expected seconds"),
        ("checks:\n  c:\n    - alarm: {pv: X}\n", 3, "expected severity: (e.g. MAJOR) or status:"),
        ("checks:\n  c:\n    - alarm: {pv: X, severity: BAD}\n", 3, "unknown alarm severity 'BAD'; expected"),
        ("checks:\n  c:\n    - alarm: {pv: X, status: HOT}\n", 3, "unknown alarm status 'HOT'"),
        ("checks:\n  c:\n    - absent: {pv: X, timeout: -1}\n", 3, "timeout: expected seconds"),
        ("checks:\n  c:\n    - iocsh: {contains: x}\n", 3, "step 1 (iocsh): missing key 'command'"),
        ("checks:\n  c:\n    - iocsh: {command: dbl, matches: '['}\n", 3, "not a valid regular expression"),
        ("checks:\n  c:\n    - get: {pv: X, equals: !celsius 20}\n", 3, "unsupported YAML tag !celsius"),
        ("checks:\n  c:\n    - sleep: -1\n", 3, "step 1 (sleep): expected seconds (a number, 0 or more)"),
        (
            "checks:\n  c:\n    - sleep: {seconds: 1}\n",
            3,
            "expected seconds (a number, 0 or more), got a mapping",
        ),
        ("targets: all\nchecks:\n  c:\n    - get: X\n", 1, "'all' is not a filter"),
        ("targets: {linux/amd64: 1}\nchecks:\n  c:\n    - get: X\n", 1, "targets: expected a list of target"),
        ("targets: []\nchecks:\n  c:\n    - get: X\n", 1, "expected at least one target name"),
        (
            "ioc:\n  command: [x]\nchecks:\n  c:\n    - get: X\n",
            2,
            "unknown key 'command'; expected one of: image",
        ),
        ("ioc:\n  image: 'x{tag}'\nchecks:\n  c:\n    - get: X\n", 2, "unknown placeholder {tag}"),
        ("ioc:\n  environment: [A]\nchecks:\n  c:\n    - get: X\n", 2, "ioc.environment: expected a mapping"),
        ("ioc:\n  environment: {A: [1]}\nchecks:\n  c:\n    - get: X\n", 2, "ioc.environment.A: expected a"),
        ("checks:\n  c:\n    - get: X\n---\nchecks: {}\n", 4, "not valid YAML: but found another document"),
    ],
)
def test_errors_name_file_line_and_what_was_expected(text: str, line: int, message: str) -> None:
    with pytest.raises(CheckFileError) as excinfo:
        parse_check_file(text, WHERE)
    error = excinfo.value
    assert error.where == WHERE and error.line == line, str(error)
    assert str(error).startswith(f"{WHERE}:{line}: "), str(error)
    assert message in str(error)


def test_an_unreadable_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CheckFileError, match=r"test_gone.ioc.yaml:1: cannot read the file"):
        load_check_file(tmp_path / "test_gone.ioc.yaml")


# -- IOC overrides --------------------------------------------------------------------------------


def test_ioc_overrides_merge_the_environment_and_keep_equal_specs() -> None:
    base = IocSpec(startup="/st.cmd", environment={"B": "2", "A": "1"})
    assert ioc_spec_for(base, IocOverrides()) is base
    assert ioc_spec_for(base, IocOverrides(environment={"A": "1"})) is base
    spec = ioc_spec_for(base, IocOverrides(startup="/other.cmd", environment={"C": "3", "A": "9"}))
    assert spec.startup == "/other.cmd"
    assert list(spec.environment.items()) == [("A", "9"), ("B", "2"), ("C", "3")]
    # The same overrides in another order make the same spec: the same shared IOC.
    again = ioc_spec_for(base, IocOverrides(startup="/other.cmd", environment={"A": "9", "C": "3"}))
    assert repr(again) == repr(spec)


# -- the runner against a fake IOC ----------------------------------------------------------------


class FakeCA:
    """PV values in a dict; ``as_string`` reads from ``strings`` when the PV has one."""

    def __init__(self, values: dict[str, Any], strings: dict[str, str] | None = None) -> None:
        self.values = values
        self.strings = strings or {}
        self.alarms: dict[str, tuple[str, str]] = {}
        self.readonly: set[str] = set()
        self.calls: list[tuple[Any, ...]] = []
        self.on_get: Callable[[str], None] | None = None

    def get(self, pv: str, *, timeout: float | None = None, as_string: bool = False) -> Any:
        self.calls.append(("get", pv, as_string))
        if self.on_get:
            self.on_get(pv)
        if pv not in self.values:
            raise CATimeoutError(f"could not get {pv!r}", target="linux/amd64", seen="no reply to the search")
        if as_string:
            return self.strings.get(pv, str(self.values[pv]))
        return self.values[pv]

    def put(self, pv: str, value: Any, *, timeout: float | None = None) -> None:
        self.calls.append(("put", pv, value))
        if pv in self.readonly:
            raise CAPutError(f"could not put {value!r} to {pv!r}", target="linux/amd64", seen="refused")
        self.values[pv] = min(value, 100) if isinstance(value, (int, float)) else value

    def alarm(self, pv: str, *, timeout: float | None = None) -> tuple[str, str]:
        return self.alarms.get(pv, ("NO_ALARM", "NO_ALARM"))

    def exists(self, pv: str, *, timeout: float = 1.0) -> bool:
        self.calls.append(("exists", pv, timeout))
        return pv in self.values


class FakeIoc:
    def __init__(self, ca: FakeCA, shell: dict[str, str] | None = None) -> None:
        self.ca = ca
        self.shell = shell or {}

    def iocsh(self, command: str, timeout: float = 10.0) -> str:
        return self.shell.get(command, f"{command}: command not found\n")


def run(text: str, ioc: FakeIoc, **kwargs: Any) -> None:
    spec = parse(text)
    for check in spec.checks:
        run_check(check, ioc, **kwargs)


def failure(text: str, ioc: FakeIoc, **kwargs: Any) -> StepFailed:
    with pytest.raises(StepFailed) as excinfo:
        run(text, ioc, **kwargs)
    return excinfo.value


def test_steps_pass_against_an_ioc_that_is_right() -> None:
    ca = FakeCA({"P:A": 25.004, "P:MSG": "hello", "P:MODE": 2, "P:RO": 42.0}, {"P:MODE": "Auto"})
    ca.readonly.add("P:RO")
    ca.alarms["P:T"] = ("MAJOR", "HIHI")
    slept: list[float] = []
    ioc = FakeIoc(ca, {"dbgf P:SP": "DBF_DOUBLE:         33.25\n"})
    run(
        """
        checks:
          c:
            - get: {pv: "P:A", approx: 25.0, tolerance: 0.01}
            - get: {pv: "P:MSG", matches: "^hel+o$"}
            - get: {pv: "P:MODE", equals: Auto}
            - get: {pv: "P:MODE", one_of: [1, 2]}
            - put: {pv: "P:SP", value: 500, equals: 100}
            - put: {pv: "P:RO", value: 7, refused: true, equals: 42}
            - wait_for: {pv: "P:SP", equals: 100, timeout: 1}
            - alarm: {pv: "P:T", severity: MAJOR, status: HIHI}
            - absent: P:GONE
            - iocsh: {command: "dbgf P:SP", contains: "33.25", matches: "^DBF_DOUBLE"}
            - sleep: 0.25
        """,
        ioc,
        sleep=slept.append,
    )
    assert ("get", "P:MODE", True) in ca.calls and ("get", "P:MODE", False) in ca.calls
    assert ("exists", "P:GONE", 1.0) in ca.calls
    assert slept == [0.25]


@pytest.mark.parametrize(
    "step, number, expected, got",
    [
        ('get: {pv: "P:A", equals: 26}', 1, "26", "25.0"),
        ('get: {pv: "P:A", approx: 25.5, tolerance: 0.1}', 1, "25.5 ± 0.1", "25.0"),
        ('get: {pv: "P:MSG", matches: "^bye"}', 1, "a match for /^bye/", "'hello'"),
        ('get: {pv: "P:MSG", one_of: [hi, bye]}', 1, "one of 'hi', 'bye'", "'hello'"),
        ('get: "P:NOPE"', 1, "a value", "[linux/amd64] could not get 'P:NOPE'"),
        ('put: {pv: "P:SP", value: 500, equals: 500}', 1, "500 read back", "100"),
        ('put: {pv: "P:SP", value: 1, refused: true}', 1, "the IOC to refuse the put", "the put completed"),
        ('put: {pv: "P:RO", value: 1}', 1, "the put to complete", "[linux/amd64] could not put 1"),
        ('alarm: {pv: "P:A", severity: MAJOR}', 1, "severity MAJOR", "severity NO_ALARM, status NO_ALARM"),
        ('absent: "P:A"', 1, "no such PV (no reply within 1 s)", "the PV connected"),
        ('iocsh: {command: "dbl", contains: "P:A"}', 1, "output containing 'P:A'", "dbl: command not found"),
        ('iocsh: {command: "dbl", matches: "^P:"}', 1, "output matching /^P:/", "dbl: command not found"),
    ],
)
def test_a_failing_step_says_expected_and_got(step: str, number: int, expected: str, got: str) -> None:
    ca = FakeCA({"P:A": 25.0, "P:MSG": "hello", "P:RO": 42.0})
    ca.readonly.add("P:RO")
    exc = failure(f"checks:\n  c:\n    - {step}\n", FakeIoc(ca))
    assert exc.number == number
    assert exc.expected == expected
    assert exc.got.startswith(got), exc.got


def test_wait_for_polls_until_the_value_arrives_or_the_timeout() -> None:
    now = [0.0]
    reads = iter([1.0, 2.0, 25.0])
    ca = FakeCA({"P:B": 0.0})

    def next_value(pv: str) -> None:
        ca.values[pv] = next(reads, ca.values[pv])

    ca.on_get = next_value

    def sleep(seconds: float) -> None:
        now[0] += seconds

    text = 'checks:\n  c:\n    - wait_for: {pv: "P:B", equals: 25.0, timeout: 1}\n'
    run(text, FakeIoc(ca), sleep=sleep, clock=lambda: now[0])
    assert now[0] == pytest.approx(0.1)  # two polls of 50 ms

    exc = failure(text.replace("25.0", "26.0"), FakeIoc(ca), sleep=sleep, clock=lambda: now[0])
    assert exc.expected == "26.0 within 1 s"
    assert exc.got == "25.0 (the last value read)"


def test_wait_for_keeps_waiting_through_a_pv_that_does_not_answer() -> None:
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    text = 'checks:\n  c:\n    - wait_for: {pv: "P:GONE", equals: 1, timeout: 0.2}\n'
    exc = failure(text, FakeIoc(FakeCA({})), sleep=sleep, clock=lambda: now[0])
    assert exc.got == "no answer (no reply to the search)"
    assert now[0] == pytest.approx(0.2)


def test_the_first_failing_step_stops_the_check() -> None:
    ca = FakeCA({"P:A": 1.0})
    exc = failure(
        'checks:\n  c:\n    - get: "P:A"\n    - get: {pv: "P:A", equals: 2}\n    - put: {pv: X, value: 1}\n',
        FakeIoc(ca),
    )
    assert exc.number == 2 and exc.step.line == 4
    assert ("put", "X", 1) not in ca.calls


@pytest.mark.parametrize(
    "expect, actual, ok",
    [
        (Expectation("equals", 25), 25.0, True),
        (Expectation("equals", [1.5, 2.5]), [1.5, 2.5], True),
        (Expectation("equals", [1.5, 2.5]), [1.5, 2.5, 0.0], False),
        (Expectation("approx", 1.0), 1.0000001, True),
        (Expectation("approx", 1.0), "1.0", False),
        (Expectation("approx", [1.0, 2.0], 0.1), [1.05, 1.95], True),
        (Expectation("approx", 1.0, 0.1), [1.0], False),
        (Expectation("matches", r"1\.5 2"), [1.5, 2.5], True),
        (Expectation("one_of", ("On", "Auto")), "Auto", True),
        (Expectation("one_of", ("On", "Auto")), "Off", False),
    ],
)
def test_satisfies(expect: Expectation, actual: Any, ok: bool) -> None:
    assert satisfies(expect, actual) is ok


def test_the_failure_text_names_file_check_step_target_pv_expected_got_and_log() -> None:
    spec = parse(
        'checks:\n  doubled:\n    - put: {pv: "P:SP", value: 1}\n    - get: {pv: "P:B", equals: 26}\n'
    )
    exc = failure(
        'checks:\n  doubled:\n    - put: {pv: "P:SP", value: 1}\n    - get: {pv: "P:B", equals: 26}\n',
        FakeIoc(FakeCA({"P:B": 25.0})),
    )
    text = format_failure(
        exc,
        where=WHERE,
        check=spec.checks[0],
        target="linux/amd64",
        log_tail=["iocRun: All initialization complete"],
    )
    headline = f"{WHERE}:4: get P:B: expected 26, got 25.0"
    assert text.splitlines() == [
        headline,
        f"  file:     {WHERE}, line 4",
        '  check:    "doubled" (line 2), step 2 of 2: get P:B',
        "  target:   linux/amd64",
        "  PV:       P:B",
        "  expected: 26",
        "  got:      25.0",
        "  IOC log (last 1 lines):",
        "    | iocRun: All initialization complete",
        headline,
    ]


def test_multi_line_output_is_indented_under_got() -> None:
    check = Check("shell", 2, (IocshStep(3, "dbl", ("P:Z",)),))
    exc = StepFailed(check.steps[0], expected="output containing 'P:Z'", got="P:A\nP:B")
    exc.number = 1
    lines = format_failure(exc, where=WHERE, check=check, target="linux/ppc64le").splitlines()
    assert "  PV:" not in "\n".join(lines)
    assert lines[-3:] == [
        "  got:      P:A",
        "            P:B",
        f"{WHERE}:3: iocsh 'dbl': expected output containing 'P:Z', got P:A",
    ]
