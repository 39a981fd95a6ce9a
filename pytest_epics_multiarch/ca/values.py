"""Channel Access values: DBR type codes, what is sent for a Python value and what comes back.

Pure functions, the same for both backends: which DBR type to read, how raw elements decode to
Python values, which type and elements a value is written as (refusing what cannot go, before
anything is sent), how ``wait_for`` compares values, and the alarm names.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# DBR type codes, the same numbers in caproto's ChannelType and in libca.
DBR_STRING, DBR_SHORT, DBR_FLOAT, DBR_ENUM, DBR_CHAR, DBR_LONG, DBR_DOUBLE = range(7)
DBR_STS_STRING = 7
MAX_STRING_SIZE = 40  # MAX_STRING_SIZE: 39 characters and the NUL
_INTEGER_RANGES = {
    DBR_SHORT: (-(2**15), 2**15 - 1),
    DBR_ENUM: (0, 2**16 - 1),
    DBR_CHAR: (0, 2**8 - 1),
    DBR_LONG: (-(2**31), 2**31 - 1),
}
_FLOAT_REL_TOL = 1e-6
_FLOAT_ABS_TOL = 1e-9

#: EPICS alarm severity names, indexed by severity (``epicsAlarmSeverityStrings``).
ALARM_SEVERITIES = ("NO_ALARM", "MINOR", "MAJOR", "INVALID")

#: EPICS alarm status (condition) names, indexed by status (``epicsAlarmConditionStrings``).
ALARM_STATUSES = (
    "NO_ALARM", "READ", "WRITE", "HIHI", "HIGH", "LOLO", "LOW", "STATE", "COS", "COMM",
    "TIMEOUT", "HWLIMIT", "CALC", "SCAN", "LINK", "SOFT", "BAD_SUB", "UDF", "DISABLE", "SIMM",
    "READ_ACCESS", "WRITE_ACCESS",
)  # fmt: skip


class Unsendable(Exception):
    """The value cannot be written to the PV; the text (``not sent: ...``) says why."""


@dataclass(frozen=True)
class ChannelInfo:
    """A connected channel as the shared code needs it."""

    native_type: int
    count: int
    writable: bool
    handle: Any  # the backend's own channel object


def until_nul(raw: Any) -> str:
    """A C string (``str`` or bytes) as text, up to its first NUL."""
    if isinstance(raw, str):
        return raw.split("\0", 1)[0]
    data = bytes(raw).split(b"\0", 1)[0]
    return data.decode("utf-8", errors="replace")


def read_type(info: ChannelInfo, as_string: bool) -> int:
    """The DBR type to read the channel as (see :meth:`CAClient.get`)."""
    if not as_string:
        return info.native_type
    if info.native_type == DBR_CHAR and info.count > 1:
        return DBR_CHAR  # a char waveform holds text; DBR_STRING would give one string per byte
    return DBR_STRING


def decode(elements: Sequence[Any], dbr_type: int, info: ChannelInfo, as_string: bool) -> Any:
    """Raw elements of ``dbr_type`` as Python values (see :meth:`CAClient.get`)."""
    if as_string and dbr_type == DBR_CHAR:
        return until_nul(bytes(int(e) & 0xFF for e in elements))
    items: list[Any]
    if dbr_type == DBR_STRING:
        items = [until_nul(e) for e in elements]
    else:
        kind = float if dbr_type in (DBR_FLOAT, DBR_DOUBLE) else int
        items = [kind(e) for e in elements]
    if info.count == 1:
        return items[0] if items else None
    return items


def encode(value: Any, info: ChannelInfo) -> tuple[int, list[Any]]:
    """The DBR type and elements to send for ``value``; :class:`Unsendable` if it cannot go."""
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        value = value.tolist()
    if isinstance(value, (str, bytes, bytearray)):
        raw = _encode_text(value)
        if info.native_type == DBR_CHAR and info.count > 1:
            if len(raw) >= info.count:
                raise Unsendable(
                    f"not sent: {len(raw)} bytes and the NUL do not fit the char waveform "
                    f"of {info.count} elements"
                )
            return DBR_CHAR, [*raw, 0]
        items: list[Any] = [value]
    elif isinstance(value, (list, tuple)):
        items = list(value)
        if not items:
            raise Unsendable("not sent: an empty sequence")
        if len(items) > info.count:
            raise Unsendable(f"not sent: {len(items)} elements, the PV holds at most {info.count}")
    else:
        items = [value]

    texts = [isinstance(item, (str, bytes, bytearray)) for item in items]
    if all(texts):
        return DBR_STRING, [_checked_string(item) for item in items]
    if any(texts):
        raise Unsendable("not sent: a mix of strings and numbers")
    for item in items:
        if isinstance(item, bool):
            continue
        if not isinstance(item, (int, float)):
            raise Unsendable(f"not sent: {type(item).__name__} is not a CA value type")
    numbers = [int(item) if isinstance(item, bool) else item for item in items]

    native = info.native_type
    if native == DBR_STRING:
        # The IOC parses the text, as it would from caput.
        return DBR_STRING, [_checked_string(str(item)) for item in numbers]
    if native in (DBR_FLOAT, DBR_DOUBLE) or not all(float(n).is_integer() for n in numbers):
        # A fraction for an integer field: let the IOC convert it, as it would any DOUBLE.
        return DBR_DOUBLE, [float(n) for n in numbers]
    if native not in _INTEGER_RANGES:
        return DBR_DOUBLE, [float(n) for n in numbers]
    low, high = _INTEGER_RANGES[native]
    ints = [int(n) for n in numbers]
    for n in ints:
        if not low <= n <= high:
            raise Unsendable(f"not sent: {n} is outside the PV's native range {low}..{high}")
    return native, ints


def _encode_text(value: str | bytes | bytearray) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def _checked_string(item: str | bytes | bytearray) -> bytes:
    raw = _encode_text(item)
    if len(raw) >= MAX_STRING_SIZE:
        raise Unsendable(f"not sent: {len(raw)} bytes, a DBR_STRING holds at most {MAX_STRING_SIZE - 1}")
    return raw


def matches(actual: Any, expected: Any) -> bool:
    """Equality for wait_for: floats within a small tolerance, sequences element-wise."""
    if isinstance(expected, (list, tuple)):
        return (
            isinstance(actual, (list, tuple))
            and len(actual) == len(expected)
            and all(matches(a, e) for a, e in zip(actual, expected))
        )
    numbers = (int, float)
    if (
        isinstance(expected, numbers)
        and isinstance(actual, numbers)
        and (isinstance(expected, float) or isinstance(actual, float))
    ):
        return math.isclose(actual, expected, rel_tol=_FLOAT_REL_TOL, abs_tol=_FLOAT_ABS_TOL)
    return bool(actual == expected)


def alarm_names(status: int, severity: int) -> tuple[str, str]:
    """(severity, status) names for the numbers; unknown numbers as ``SEVERITY_n``/``STATUS_n``."""
    sev = ALARM_SEVERITIES[severity] if 0 <= severity < len(ALARM_SEVERITIES) else None
    stat = ALARM_STATUSES[status] if 0 <= status < len(ALARM_STATUSES) else None
    return (sev or f"SEVERITY_{severity}", stat or f"STATUS_{status}")
