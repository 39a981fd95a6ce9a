"""Running the steps of one check against one IOC, and saying plainly why a step failed.

Works on anything with ``.ca`` and ``.iocsh()`` (an :class:`~pytest_epics_multiarch.ioc.Ioc`, or
a fake in unit tests); pytest is only needed for :func:`pytest.approx`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import pytest

from ..ca import CAClient
from ..ca.values import matches as values_match
from ..errors import CAPutError, CATimeoutError, EpicsMultiarchError
from .model import (
    AbsentStep,
    AlarmStep,
    Check,
    Expectation,
    GetStep,
    IocshStep,
    PutStep,
    SleepStep,
    Step,
    WaitForStep,
    describe_step,
)

#: How often ``wait_for`` reads the PV again.
POLL_INTERVAL = 0.05


class CheckTarget(Protocol):
    """What a check needs of an IOC."""

    @property
    def ca(self) -> CAClient: ...

    def iocsh(self, command: str, timeout: float = 10.0) -> str: ...


class StepFailed(Exception):
    """A step saw something else than the file expects."""

    def __init__(self, step: Step, *, expected: str, got: str, pv: str | None = None) -> None:
        self.step = step
        self.pv = pv if pv is not None else getattr(step, "pv", None)
        self.expected = expected
        self.got = got
        #: 1-based position of the step in its check (set by :func:`run_check`).
        self.number = 0
        super().__init__(f"{describe_step(step)}: expected {expected}, got {got}")


def satisfies(expect: Expectation, actual: Any) -> bool:
    """Whether ``actual`` (as read over CA) meets ``expect``."""
    if expect.kind == "matches":
        return re.search(str(expect.expected), _as_text(actual)) is not None
    if expect.kind == "one_of":
        return any(values_match(actual, item) for item in expect.expected)
    if expect.kind == "approx":
        if isinstance(expect.expected, list) != isinstance(actual, (list, tuple)):
            return False
        if isinstance(actual, (str, bool)):
            return False
        if expect.tolerance is None:
            return bool(actual == pytest.approx(expect.expected))
        return bool(actual == pytest.approx(expect.expected, abs=expect.tolerance))
    return values_match(actual, expect.expected)


def _as_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(str(item) for item in value)
    return str(value)


def _as_string(step: GetStep | PutStep | WaitForStep) -> bool:
    if step.as_string is not None:
        return step.as_string
    return step.expect.wants_string if step.expect is not None else False


def run_check(
    check: Check,
    ioc: CheckTarget,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Run the steps in order; the first that fails raises :class:`StepFailed`."""
    for number, step in enumerate(check.steps, 1):
        try:
            run_step(step, ioc, sleep=sleep, clock=clock)
        except StepFailed as exc:
            exc.number = number
            raise
        except EpicsMultiarchError as exc:
            # A PV that doesn't connect, a refused put, an iocsh timeout: the error says why.
            failure = StepFailed(step, expected=_expected_of(step), got=exc.render())
            failure.number = number
            raise failure from exc


def _expected_of(step: Step) -> str:
    if isinstance(step, (GetStep, PutStep)) and step.expect is not None:
        return step.expect.describe()
    if isinstance(step, WaitForStep):
        return f"{step.expect.describe()} within {step.timeout:g} s"
    if isinstance(step, PutStep):
        return "the IOC to refuse the put" if step.refused else "the put to complete"
    if isinstance(step, IocshStep):
        return "the command to run"
    return "a value"


def run_step(
    step: Step,
    ioc: CheckTarget,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    if isinstance(step, SleepStep):
        sleep(step.seconds)
    elif isinstance(step, GetStep):
        value = ioc.ca.get(step.pv, timeout=step.timeout, as_string=_as_string(step))
        if step.expect is not None and not satisfies(step.expect, value):
            raise StepFailed(step, expected=step.expect.describe(), got=repr(value))
    elif isinstance(step, PutStep):
        _put(step, ioc)
    elif isinstance(step, WaitForStep):
        _wait_for(step, ioc, sleep, clock)
    elif isinstance(step, AlarmStep):
        severity, status = ioc.ca.alarm(step.pv, timeout=step.timeout)
        wrong = (step.severity is not None and severity != step.severity) or (
            step.status is not None and status != step.status
        )
        if wrong:
            wanted = [f"{k} {v}" for k, v in (("severity", step.severity), ("status", step.status)) if v]
            raise StepFailed(step, expected=", ".join(wanted), got=f"severity {severity}, status {status}")
    elif isinstance(step, AbsentStep):
        if ioc.ca.exists(step.pv, timeout=step.timeout):
            raise StepFailed(
                step, expected=f"no such PV (no reply within {step.timeout:g} s)", got="the PV connected"
            )
    else:
        _iocsh(step, ioc)


def _put(step: PutStep, ioc: CheckTarget) -> None:
    try:
        ioc.ca.put(step.pv, step.value, timeout=step.timeout)
    except CAPutError as exc:
        if not step.refused:
            raise
        refusal: CAPutError | None = exc
    else:
        refusal = None
    if step.refused and refusal is None:
        raise StepFailed(step, expected="the IOC to refuse the put", got="the put completed")
    if step.expect is not None:
        value = ioc.ca.get(step.pv, timeout=step.timeout, as_string=_as_string(step))
        if not satisfies(step.expect, value):
            raise StepFailed(step, expected=f"{step.expect.describe()} read back", got=repr(value))


def _wait_for(
    step: WaitForStep, ioc: CheckTarget, sleep: Callable[[float], None], clock: Callable[[], float]
) -> None:
    """Read the PV until it meets the expectation or the timeout passes (monotonic deadline)."""
    as_string = _as_string(step)
    deadline = clock() + step.timeout
    last: str | None = None
    while True:
        remaining = deadline - clock()
        try:
            value = ioc.ca.get(step.pv, timeout=max(min(remaining, 1.0), 0.05), as_string=as_string)
        except CATimeoutError as exc:
            last = f"no answer ({exc.seen or exc.what})"
        else:
            if satisfies(step.expect, value):
                return
            last = f"{value!r} (the last value read)"
        if clock() >= deadline:
            break
        sleep(min(POLL_INTERVAL, max(deadline - clock(), 0.0)))
    raise StepFailed(step, expected=_expected_of(step), got=last or "no value")


def _iocsh(step: IocshStep, ioc: CheckTarget) -> None:
    output = ioc.iocsh(step.command, step.timeout)
    missing = [text for text in step.contains if text not in output]
    wanted: list[str] = [f"output containing {text!r}" for text in step.contains]
    if step.matches is not None:
        wanted.append(f"output matching /{step.matches}/")
    mismatch = step.matches is not None and re.search(step.matches, output, re.MULTILINE) is None
    if missing or mismatch:
        got = output.rstrip() or "(no output)"
        raise StepFailed(step, pv=None, expected=" and ".join(wanted), got=got)


def headline(failure: StepFailed, where: str) -> str:
    """One line: file and line of the step, what it did, expected, got (the first line of it)."""
    got = (failure.got.splitlines() or [""])[0]
    if len(got) > 160:
        got = got[:157] + "..."
    return (
        f"{where}:{failure.step.line}: {describe_step(failure.step)}: expected {failure.expected}, got {got}"
    )


def format_failure(
    failure: StepFailed, *, where: str, check: Check, target: str, log_tail: Sequence[str] = ()
) -> str:
    """The text of a failed check: file, check, step, target, PV, expected, got, the log's tail.

    It starts and ends with :func:`headline`, as pytest's own tracebacks do: the short test
    summary shows the first line and the target matrix the last.
    """
    step = failure.step
    summary = headline(failure, where)
    lines = [
        summary,
        f"  file:     {where}, line {step.line}",
        f'  check:    "{check.name}" (line {check.line}), step {failure.number} of {len(check.steps)}: '
        + describe_step(step),
        f"  target:   {target}",
    ]
    if failure.pv:
        lines.append(f"  PV:       {failure.pv}")
    lines.append(f"  expected: {failure.expected}")
    got = failure.got.splitlines() or [""]
    lines.append(f"  got:      {got[0]}")
    lines.extend(f"            {line}" for line in got[1:])
    if log_tail:
        lines.append(f"  IOC log (last {len(log_tail)} lines):")
        lines.extend(f"    | {line}" for line in log_tail)
    lines.append(summary)
    return "\n".join(lines)
