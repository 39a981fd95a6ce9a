"""What a ``test_*.ioc.yaml`` file holds, once parsed: checks made of typed steps.

:mod:`.parser` makes these from YAML; :mod:`.runner` runs them against an IOC.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union


class CheckFileError(Exception):
    """A malformed check file: the file, the line, where in the file, and what was expected."""

    def __init__(self, where: str, line: int, path: str, message: str) -> None:
        self.where = where
        self.line = line
        self.path = path
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        at = f"{self.path}: " if self.path else ""
        return f"{self.where}:{self.line}: {at}{self.message}"


# -- what a file holds ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Expectation:
    """What a value must be: ``equals``, ``approx`` (``tolerance``), ``matches`` or ``one_of``."""

    kind: str
    expected: Any
    tolerance: float | None = None

    @property
    def wants_string(self) -> bool:
        """Compare with the IOC's string form (a regex, or a state name like ``Auto``)."""
        if self.kind == "matches":
            return True
        if self.kind == "one_of":
            return any(isinstance(item, str) for item in self.expected)
        return isinstance(self.expected, str)

    def describe(self) -> str:
        if self.kind == "approx":
            spread = f"{self.tolerance:g}" if self.tolerance is not None else "1e-06 relative"
            return f"{self.expected!r} ± {spread}"
        if self.kind == "matches":
            return f"a match for /{self.expected}/"
        if self.kind == "one_of":
            return "one of " + ", ".join(repr(item) for item in self.expected)
        return repr(self.expected)


@dataclass(frozen=True)
class GetStep:
    line: int
    pv: str
    expect: Expectation | None = None
    as_string: bool | None = None
    timeout: float | None = None
    kind: ClassVar[str] = "get"


@dataclass(frozen=True)
class PutStep:
    line: int
    pv: str
    value: Any
    refused: bool = False
    expect: Expectation | None = None
    as_string: bool | None = None
    timeout: float | None = None
    kind: ClassVar[str] = "put"


@dataclass(frozen=True)
class WaitForStep:
    line: int
    pv: str
    expect: Expectation
    as_string: bool | None = None
    timeout: float = 10.0
    kind: ClassVar[str] = "wait_for"


@dataclass(frozen=True)
class AlarmStep:
    line: int
    pv: str
    severity: str | None = None
    status: str | None = None
    timeout: float | None = None
    kind: ClassVar[str] = "alarm"


@dataclass(frozen=True)
class AbsentStep:
    line: int
    pv: str
    timeout: float = 1.0
    kind: ClassVar[str] = "absent"


@dataclass(frozen=True)
class IocshStep:
    line: int
    command: str
    contains: tuple[str, ...] = ()
    matches: str | None = None
    timeout: float = 10.0
    kind: ClassVar[str] = "iocsh"


@dataclass(frozen=True)
class SleepStep:
    line: int
    seconds: float
    kind: ClassVar[str] = "sleep"


Step = Union[GetStep, PutStep, WaitForStep, AlarmStep, AbsentStep, IocshStep, SleepStep]


def describe_step(step: Step) -> str:
    """One line naming what a step does, for failures (``put 12.5 to SAMPLE:SETPOINT``)."""
    if isinstance(step, PutStep):
        return f"put {step.value!r} to {step.pv}"
    if isinstance(step, IocshStep):
        return f"iocsh {step.command!r}"
    if isinstance(step, SleepStep):
        return f"sleep {step.seconds:g} s"
    return f"{step.kind} {step.pv}"


@dataclass(frozen=True)
class Check:
    name: str
    line: int
    steps: tuple[Step, ...]


@dataclass(frozen=True)
class IocOverrides:
    """The file's ``ioc:`` section: what differs from the config file's IOC."""

    image: str | None = None
    startup: str | None = None
    environment: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckFile:
    where: str
    checks: tuple[Check, ...]
    #: Run only on these targets (None: every selected target).
    targets: tuple[str, ...] | None = None
    targets_line: int = 0
    ioc: IocOverrides = IocOverrides()
