"""Text output of the database test commands (``dbgf``, ``dbpf``, ``dbl``, ``dbpr``).

``dbgf`` output follows EPICS base's dbTest.c: the type label and each value
are placed on 10-column tab stops of an 80-column line buffer, so
``dbgf ao`` prints ``DBF_DOUBLE:         3`` followed by the padding spaces
that EPICS also prints. Enumerated fields are printed as strings
(``DBF_STRING: "On"``), doubles with ``%.12g``, integers as
``5 = 0x5``, arrays as ``DBF_LONG[3]:`` and one value per tab stop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .database import Database
from .records import Record

MAXLINE = 80
TAB_SIZE = 10


class TabBuffer:
    """dbTest.c's message buffer: pieces padded to tab stops, flushed at 80 columns."""

    def __init__(self, tab_size: int = TAB_SIZE) -> None:
        self.tab_size = tab_size
        self.lines: list[str] = []
        self._line = ""

    def add(self, message: str) -> None:
        message = message[:MAXLINE]
        if len(self._line) + len(message) > MAXLINE:
            self.flush()
        self._line += message
        # Pad to the next tab stop beyond the text, always moving at least one column.
        stop = (len(self._line) // self.tab_size + 1) * self.tab_size
        self._line = self._line.ljust(min(stop, MAXLINE))

    def flush(self) -> None:
        if self._line:
            self.lines.append(self._line)
        self._line = ""

    def text(self) -> str:
        self.flush()
        return "".join(line + "\n" for line in self.lines)


def format_dbgf(dbf: str, value: Any) -> str:
    """Format one field like EPICS's dbgf: label, then values on tab stops."""
    if dbf == "ENUM":
        dbf, values = "STRING", [value]
    elif isinstance(value, (list, tuple)):
        values = list(value)
    else:
        values = [value]
    buffer = TabBuffer()
    if not values:
        return ""
    if dbf == "CHAR" and len(values) > 1:
        # Character arrays are printed as one string up to the first NUL.
        raw = bytes(v & 0xFF for v in values)
        text = raw.split(b"\x00", 1)[0].decode("latin-1")
        buffer.add(f"DBF_CHAR[{len(values)}]: ")
        chunk_size = MAXLINE - 5
        for start in range(0, len(text), chunk_size):
            more = " +" if start + chunk_size < len(text) else ""
            buffer.add(f'"{text[start : start + chunk_size]}"{more}')
        return buffer.text()
    label = f"DBF_{dbf}: " if len(values) == 1 else f"DBF_{dbf}[{len(values)}]: "
    buffer.add(label)
    for item in values:
        buffer.add(_format_value(dbf, item))
    return buffer.text()


def _format_value(dbf: str, value: Any) -> str:
    if dbf == "STRING":
        return '"' + _escape(str(value)) + '"'
    if dbf in ("DOUBLE", "FLOAT"):
        return _format_g(float(value), 12 if dbf == "DOUBLE" else 6)
    number = int(value)
    if dbf == "CHAR":
        char = chr(number & 0xFF)
        if char.isprintable() and number < 128:
            return f"{number} = 0x{number & 0xFF:x} = '{char}'"
        return f"{number} = 0x{number & 0xFF:x}"
    if dbf in ("LONG", "SHORT"):
        bits = 32 if dbf == "LONG" else 16
        return f"{number} = 0x{number & ((1 << bits) - 1):x}"
    return f"{number} = 0x{number:x}"


def _format_g(value: float, digits: int) -> str:
    if value != value:
        return "nan"
    if value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}g}"


def _escape(text: str) -> str:
    escapes = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\\": "\\\\", '"': '\\"', "'": "\\'"}
    out = []
    for char in text:
        if char in escapes:
            out.append(escapes[char])
        elif char.isprintable():
            out.append(char)
        else:
            out.append(f"\\x{ord(char):02x}")
    return "".join(out)


def dbgf(db: Database, pvname: str) -> str:
    try:
        record, field = db.resolve(pvname)
        dbf, value = record.get_field(field)
    except KeyError:
        return f"PV '{pvname}' not found\n"
    return format_dbgf(dbf, value)


def dbl(db: Database, record_type: str = "") -> str:
    """Record names, one a line, grouped by record type as EPICS orders them."""
    if record_type in ("", "*"):
        record_type = ""
    types = sorted({record.rtype for record in db.records.values()})
    if record_type:
        if record_type not in types:
            return "No record type\n"
        types = [record_type]
    lines = [record.name for rtype in types for record in db.records.values() if record.rtype == rtype]
    return "".join(name + "\n" for name in lines)


def dbpr(record: Record, fields: Sequence[str] = ()) -> str:
    """A short dbpr: NAME, RTYP, VAL, STAT, SEVR and the fields set in the database."""
    buffer = TabBuffer(tab_size=20)
    names = ["NAME", "RTYP", "VAL", "SEVR", "STAT", "UDF"]
    names += [name for name in sorted(record.fields) if name not in names]
    for name in list(fields) or names:
        try:
            dbf, value = record.get_field(name)
        except KeyError:
            continue
        if isinstance(value, (list, tuple)):
            value = " ".join(str(v) for v in value)
        elif dbf in ("DOUBLE", "FLOAT"):
            value = _format_g(float(value), 12)
        buffer.add(f"{name:<4}: {value}")
    return buffer.text()
