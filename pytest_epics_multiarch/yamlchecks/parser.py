"""The ``test_*.ioc.yaml`` format: parsed from YAML nodes so every error names file and line.

A file states what a booted IOC must show, for IOC authors who don't write Python::

    targets: [linux/amd64, rtems/powerpc]      # optional: run only on these targets
    ioc:                                       # optional: override the config's ioc: section
      environment: {EPICS_CA_MAX_ARRAY_BYTES: "1000000"}
    checks:
      setpoint drives the calc:
        - put: {pv: "SAMPLE:SETPOINT", value: 12.5}
        - wait_for: {pv: "SAMPLE:DOUBLED", equals: 25.0, timeout: 5}

Values are read the way IOC authors mean them: a PV name, a command or a regex is the text as
written (``1:30`` stays text, not YAML 1.1's sexagesimal 90), and an unquoted ``Off``, ``On``,
``Yes`` or ``No`` is the state name, not a boolean.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import SafeConstructor

from ..ca import ALARM_SEVERITIES, ALARM_STATUSES
from .model import (
    AbsentStep,
    AlarmStep,
    Check,
    CheckFile,
    CheckFileError,
    Expectation,
    GetStep,
    IocOverrides,
    IocshStep,
    PutStep,
    SleepStep,
    Step,
    WaitForStep,
)

#: The file names collected as YAML checks.
FILE_GLOB = "test_*.ioc.yaml"

TOP_KEYS = ("targets", "ioc", "checks")
IOC_KEYS = ("image", "startup", "environment")
EXPECTATION_KEYS = ("equals", "approx", "matches", "one_of")
#: Placeholders of ``ioc.image``, filled from each target (``ioc-x{image_ext}-runtime:dev``).
IMAGE_PLACEHOLDERS = ("image_ext", "epics_arch")
STEP_KINDS = ("get", "put", "wait_for", "alarm", "absent", "iocsh", "sleep")

_STEP_KEYS: Mapping[str, tuple[str, ...]] = {
    "get": ("pv", "as_string", "timeout", "tolerance", *EXPECTATION_KEYS),
    "put": ("pv", "value", "timeout", "refused", "as_string", "tolerance", *EXPECTATION_KEYS),
    "wait_for": ("pv", "timeout", "as_string", "tolerance", *EXPECTATION_KEYS),
    "alarm": ("pv", "severity", "status", "timeout"),
    "absent": ("pv", "timeout"),
    "iocsh": ("command", "contains", "matches", "timeout"),
}

_BOOL_TAG = "tag:yaml.org,2002:bool"
_NULL_TAG = "tag:yaml.org,2002:null"
_STR_TAG = "tag:yaml.org,2002:str"
#: YAML 1.1 booleans that are really words (enum state names such as Off/On).
_WORD_BOOLS = {"on", "off", "yes", "no", "y", "n"}


# -- reading nodes --------------------------------------------------------------------------------


class _At:
    """One YAML node with the file name and the key path that lead to it."""

    def __init__(self, node: yaml.Node, where: str, path: str) -> None:
        self.node = node
        self.where = where
        self.path = path

    @property
    def line(self) -> int:
        return int(self.node.start_mark.line) + 1

    def error(self, message: str) -> CheckFileError:
        return CheckFileError(self.where, self.line, self.path, message)

    def child(self, node: yaml.Node, path: str) -> _At:
        return _At(node, self.where, path)

    def shape(self) -> str:
        if isinstance(self.node, yaml.MappingNode):
            return "a mapping"
        if isinstance(self.node, yaml.SequenceNode):
            return "a list"
        if self.node.tag == _NULL_TAG:
            return "nothing"
        return repr(self.node.value)

    def mapping(
        self, allowed: Sequence[str] | None, required: Sequence[str] = (), expected: str = "a mapping"
    ) -> dict[str, _At]:
        """The entries of a mapping node; unknown, duplicate and missing keys are errors."""
        if not isinstance(self.node, yaml.MappingNode):
            raise self.error(f"expected {expected}, got {self.shape()}")
        entries: dict[str, _At] = {}
        for key_node, value_node in self.node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise self.child(key_node, self.path).error("expected a plain key, got a mapping or list")
            key = str(key_node.value)
            key_path = f"{self.path}.{key}" if self.path else key
            if key in entries:
                raise self.child(key_node, key_path).error(
                    f"duplicate key {key!r} (first on line {entries[key].line})"
                )
            if allowed is not None and key not in allowed:
                raise self.child(key_node, self.path).error(
                    f"unknown key {key!r}; expected one of: {', '.join(allowed)}"
                )
            entries[key] = self.child(value_node, key_path)
        for key in required:
            if key not in entries:
                raise self.error(f"missing key {key!r}")
        return entries

    def sequence(self, expected: str = "a list") -> list[_At]:
        if not isinstance(self.node, yaml.SequenceNode):
            raise self.error(f"expected {expected}, got {self.shape()}")
        return [self.child(item, f"{self.path}[{index + 1}]") for index, item in enumerate(self.node.value)]

    def text(self, what: str = "text") -> str:
        """A scalar's text exactly as written (PV names, commands, regexes, environment values)."""
        if not isinstance(self.node, yaml.ScalarNode) or self.node.tag == _NULL_TAG:
            raise self.error(f"expected {what}, got {self.shape()}")
        return str(self.node.value)

    def flag(self) -> bool:
        if not isinstance(self.node, yaml.ScalarNode) or self.node.tag != _BOOL_TAG:
            raise self.error(f"expected true or false, got {self.shape()}")
        return str(self.node.value).lower() in ("true", "yes", "on", "y")

    def number(self, what: str = "a number", *, positive: bool = False) -> float:
        value = self._scalar()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise self.error(f"expected {what}, got {self.shape()}")
        if value < 0 or (positive and value == 0):
            raise self.error(f"expected {what}, got {value!r}")
        return float(value)

    def pv_value(self) -> Any:
        """A value to write or compare: a number, a string, or a list of them (a waveform)."""
        if isinstance(self.node, yaml.SequenceNode):
            return [item.pv_value() for item in self.sequence()]
        if not isinstance(self.node, yaml.ScalarNode) or self.node.tag == _NULL_TAG:
            raise self.error(f"expected a value (a number, text, or a list of them), got {self.shape()}")
        raw = str(self.node.value)
        if self.node.tag == _BOOL_TAG:
            if raw.lower() in _WORD_BOOLS:
                return raw  # YAML 1.1 reads Off/On/Yes/No as booleans; here they are state names
            raise self.error(f"{raw} is ambiguous for a PV: write 1 or 0, or quote it as a string")
        value = self._scalar()
        if isinstance(value, (int, float)) and ":" in raw:
            return raw  # YAML 1.1 sexagesimal (1:30 = 90): keep what was written
        if isinstance(value, (int, float, str)):
            return value
        return raw  # dates, binary...: the text as written

    def _scalar(self) -> Any:
        if not isinstance(self.node, yaml.ScalarNode):
            return None
        if self.node.tag == _STR_TAG:
            return str(self.node.value)
        try:
            return SafeConstructor().construct_object(self.node, deep=True)
        except yaml.YAMLError:
            raise self.error(f"unsupported YAML tag {self.node.tag}; write a plain value") from None


# -- the format -----------------------------------------------------------------------------------


def load_check_file(path: Path, where: str | None = None) -> CheckFile:
    """Read and validate ``path``; ``where`` is how errors name the file (default: the path)."""
    name = where or str(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise CheckFileError(name, 1, "", f"cannot read the file: {exc}") from exc
    return parse_check_file(text, name)


def parse_check_file(text: str, where: str) -> CheckFile:
    """Parse the text of a check file; errors are :class:`CheckFileError` with file and line."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = int(mark.line) + 1 if mark is not None else 1
        problem = exc.problem or exc.context or "cannot be parsed"
        raise CheckFileError(where, line, "", f"not valid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise CheckFileError(where, 1, "", f"not valid YAML: {exc}") from None
    if root is None:
        raise CheckFileError(where, 1, "", "the file is empty; expected a mapping with checks:")
    top = _At(root, where, "").mapping(TOP_KEYS, required=("checks",), expected="a mapping with checks:")
    targets: tuple[str, ...] | None = None
    targets_line = 0
    if "targets" in top:
        targets, targets_line = _targets(top["targets"]), top["targets"].line
    ioc = _ioc(top["ioc"]) if "ioc" in top else IocOverrides()
    return CheckFile(where, _checks(top["checks"]), targets, targets_line, ioc)


def _targets(at: _At) -> tuple[str, ...]:
    items = [at] if isinstance(at.node, yaml.ScalarNode) else at.sequence("a list of target names")
    names: list[str] = []
    for item in items:
        for name in (part.strip() for part in item.text("a target name like linux/amd64").split(",")):
            if name == "all":
                raise item.error("'all' is not a filter: leave targets: out to run on every selected target")
            if name and name not in names:
                names.append(name)
    if not names:
        raise at.error("expected at least one target name like linux/amd64")
    return tuple(names)


def _ioc(at: _At) -> IocOverrides:
    entries = at.mapping(IOC_KEYS)
    environment: dict[str, str] = {}
    if "environment" in entries:
        for key, value in entries["environment"].mapping(None, expected="a mapping of NAME: value").items():
            environment[key] = value.text("a string or number")
    return IocOverrides(
        image=_image_ref(entries["image"]) if "image" in entries else None,
        startup=entries["startup"].text("a path inside the image") if "startup" in entries else None,
        environment=environment,
    )


def _image_ref(at: _At) -> str:
    ref = at.text("an image reference")
    for placeholder in re.findall(r"\{([^}]*)\}", ref):
        if placeholder not in IMAGE_PLACEHOLDERS:
            raise at.error(
                f"unknown placeholder {{{placeholder}}}; expected one of: "
                + ", ".join(f"{{{name}}}" for name in IMAGE_PLACEHOLDERS)
            )
    return ref


def _checks(at: _At) -> tuple[Check, ...]:
    checks: list[Check] = []
    entries = at.mapping(None, expected="a mapping of check names to lists of steps")
    if not entries:
        raise at.error("expected at least one check (a name, then a list of steps)")
    for name, steps_at in entries.items():
        label = f'check "{name}"'
        key_line = _key_line(at, name)
        if not name.strip() or "::" in name or "[" in name:
            raise CheckFileError(
                at.where, key_line, "checks", f"{name!r} is not a usable check name (no '::' or '[')"
            )
        steps_at.path = label
        items = steps_at.sequence("a list of steps")
        if not items:
            raise steps_at.error("expected at least one step")
        steps = tuple(_step(item, f"{label}, step {number}") for number, item in enumerate(items, 1))
        checks.append(Check(name, key_line, steps))
    return tuple(checks)


def _key_line(at: _At, key: str) -> int:
    assert isinstance(at.node, yaml.MappingNode)
    for key_node, _ in at.node.value:
        if key_node.value == key:
            return int(key_node.start_mark.line) + 1
    return at.line


def _step(at: _At, label: str) -> Step:
    at.path = label
    if not isinstance(at.node, yaml.MappingNode) or len(at.node.value) != 1:
        expected = f"expected one of {', '.join(STEP_KINDS)} with its settings"
        if not isinstance(at.node, yaml.MappingNode) or not at.node.value:
            raise at.error(f"{expected}, got {at.shape() if at.node.value else 'nothing'}")
        keys = [str(key.value) for key, _ in at.node.value]
        kinds = [key for key in keys if key in STEP_KINDS]
        hint = f"; indent the settings under {kinds[0]}:" if len(kinds) == 1 else ""
        raise at.error(f"{expected}, got the keys {', '.join(keys)}{hint}")
    kind = str(at.node.value[0][0].value)
    if kind not in STEP_KINDS:
        raise at.error(f"unknown step {kind!r}; expected one of: {', '.join(STEP_KINDS)}")
    body = at.mapping(STEP_KINDS)[kind]
    body.path = f"{label} ({kind})"
    if kind == "sleep":
        return SleepStep(body.line, body.number("seconds (a number, 0 or more)"))
    shorthand = {"get": "pv", "absent": "pv", "iocsh": "command"}
    if isinstance(body.node, yaml.ScalarNode) and kind in shorthand:
        value = body.text("a PV name" if shorthand[kind] == "pv" else "an iocsh command")
        return _build(kind, body, {}, {shorthand[kind]: value})
    entries = body.mapping(_STEP_KEYS[kind], required=_REQUIRED[kind], expected=_EXPECTED[kind])
    return _build(kind, body, entries, {})


_REQUIRED: Mapping[str, tuple[str, ...]] = {
    "get": ("pv",),
    "put": ("pv", "value"),
    "wait_for": ("pv",),
    "alarm": ("pv",),
    "absent": ("pv",),
    "iocsh": ("command",),
}
_EXPECTED: Mapping[str, str] = {
    "get": "a PV name, or a mapping with pv: and what to expect",
    "put": "a mapping with pv: and value:",
    "wait_for": "a mapping with pv:, what to expect and timeout:",
    "alarm": "a mapping with pv: and severity: or status:",
    "absent": "a PV name, or a mapping with pv: and timeout:",
    "iocsh": "a command, or a mapping with command: and contains: or matches:",
}


def _build(kind: str, body: _At, entries: dict[str, _At], given: dict[str, str]) -> Step:
    line = body.line
    pv = given.get("pv") or (entries["pv"].text("a PV name") if "pv" in entries else "")
    timeout = _seconds(entries, "timeout", positive=True)
    if kind in ("get", "put", "wait_for"):
        expect = _expectation(body, entries)
        as_string = entries["as_string"].flag() if "as_string" in entries else None
        if kind == "get":
            return GetStep(line, pv, expect, as_string, timeout)
        if kind == "wait_for":
            if expect is None:
                raise body.error(f"expected one of {', '.join(EXPECTATION_KEYS)}: what to wait for")
            return WaitForStep(line, pv, expect, as_string, timeout if timeout is not None else 10.0)
        refused = entries["refused"].flag() if "refused" in entries else False
        return PutStep(line, pv, entries["value"].pv_value(), refused, expect, as_string, timeout)
    if kind == "alarm":
        severity = _choice(entries, "severity", ALARM_SEVERITIES)
        status = _choice(entries, "status", ALARM_STATUSES)
        if severity is None and status is None:
            raise body.error("expected severity: (e.g. MAJOR) or status: (e.g. HIHI), or both")
        return AlarmStep(line, pv, severity, status, timeout)
    if kind == "absent":
        return AbsentStep(line, pv, timeout if timeout is not None else 1.0)
    command = given.get("command") or entries["command"].text("an iocsh command")
    contains: tuple[str, ...] = ()
    if "contains" in entries:
        at = entries["contains"]
        items = at.sequence() if isinstance(at.node, yaml.SequenceNode) else [at]
        contains = tuple(item.text("text to find in the output") for item in items)
    matches = _regex(entries["matches"]) if "matches" in entries else None
    return IocshStep(line, command, contains, matches, timeout if timeout is not None else 10.0)


def _seconds(
    entries: dict[str, _At], key: str, *, positive: bool = False, what: str = "seconds (a positive number)"
) -> float | None:
    return entries[key].number(what, positive=positive) if key in entries else None


def _choice(entries: dict[str, _At], key: str, names: Sequence[str]) -> str | None:
    if key not in entries:
        return None
    value = entries[key].text(f"an alarm {key}").upper()
    if value not in names:
        raise entries[key].error(f"unknown alarm {key} {value!r}; expected one of: {', '.join(names)}")
    return value


def _regex(at: _At) -> str:
    pattern = at.text("a regular expression")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise at.error(f"not a valid regular expression: {exc}") from None
    return pattern


def _expectation(body: _At, entries: dict[str, _At]) -> Expectation | None:
    given = [key for key in EXPECTATION_KEYS if key in entries]
    if len(given) > 1:
        raise entries[given[1]].error(f"expected one of {', '.join(EXPECTATION_KEYS)}, not several")
    if "tolerance" in entries and given != ["approx"]:
        raise entries["tolerance"].error("tolerance goes with approx:")
    if not given:
        return None
    kind, at = given[0], entries[given[0]]
    if kind == "matches":
        return Expectation(kind, _regex(at))
    if kind == "one_of":
        items = at.sequence("a list of values")
        if not items:
            raise at.error("expected a list of at least one value")
        return Expectation(kind, tuple(item.pv_value() for item in items))
    if kind == "approx":
        value = at.pv_value()
        numbers = value if isinstance(value, list) else [value]
        if not numbers or not all(isinstance(n, (int, float)) for n in numbers):
            raise at.error(f"expected a number (or a list of numbers), got {at.shape()}")
        tolerance = _seconds(entries, "tolerance", what="a tolerance (a number, 0 or more)")
        return Expectation(kind, value, tolerance)
    return Expectation(kind, at.pv_value())
