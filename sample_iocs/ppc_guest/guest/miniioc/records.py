"""An in-memory record database that behaves like a small EPICS soft IOC.

Record types: ai, ao, bi, bo, longin, longout, mbbi, mbbo, stringin,
stringout, waveform, calc. What is modelled, following EPICS base's record
support closely enough for tests to see the same values and alarms:

- ``VAL`` with the type EPICS gives it (DBF_DOUBLE, DBF_LONG, DBF_ENUM,
  DBF_STRING, arrays by ``FTVL``/``NELM``); ``UDF`` until a value is defined
- processing on put, ``PINI``, periodic ``SCAN`` ("1 second" ...), ``FLNK``,
  input links with ``PP``/``CP``/``CPP`` and ``MS``/``MSS``/``MSI``, output
  links (``OUT``) with ``PP``
- ``DRVH``/``DRVL`` clamping of outputs, ``HIHI``/``HIGH``/``LOW``/``LOLO``
  with ``HHSV``/``HSV``/``LSV``/``LLSV``, state severities of bi/bo/mbbi/mbbo
- ``DISP``: puts from outside (CA, ``dbpf``) to any field but ``DISP`` itself
  are refused (:class:`PutDisabled`), as ``dbPutField`` does
- the common fields of each type (``DESC``, ``EGU``, ``PREC``, ``NORD``...)
  with their EPICS field types and defaults, for ``dbgf`` and field PVs

Not modelled: device support other than soft channel, hysteresis, deadbands,
simulation mode, asynchronous processing, links to other IOCs.

How records trigger each other is :mod:`miniioc.database`'s business; nothing
here or there knows about Channel Access: the server adapter asks
:meth:`Database.take_posted` which records changed after each operation.
"""

from __future__ import annotations

import math
import operator
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from .calc import VARIABLES, CalcError, compile_calc
from .dbparse import RecordDef

if TYPE_CHECKING:
    from .database import Database

STATUS_NAMES = (
    "NO_ALARM",
    "READ",
    "WRITE",
    "HIHI",
    "HIGH",
    "LOLO",
    "LOW",
    "STATE",
    "COS",
    "COMM",
    "TIMEOUT",
    "HWLIMIT",
    "CALC",
    "SCAN",
    "LINK",
    "SOFT",
    "BAD_SUB",
    "UDF",
    "DISABLE",
    "SIMM",
    "READ_ACCESS",
    "WRITE_ACCESS",
)
SEVERITY_NAMES = ("NO_ALARM", "MINOR", "MAJOR", "INVALID")

NO_ALARM = 0
MINOR = 1
MAJOR = 2
INVALID = 3
STAT = {name: index for index, name in enumerate(STATUS_NAMES)}

MAX_STRING_SIZE = 40  # DBR_STRING holds 39 characters and a terminating NUL
MBB_PREFIXES = (
    "ZR",
    "ON",
    "TW",
    "TH",
    "FR",
    "FV",
    "SX",
    "SV",
    "EI",
    "NI",
    "TE",
    "EL",
    "TV",
    "TT",
    "FT",
    "FF",
)

# Fields besides VAL, with their DBF type (as EPICS's .dbd files declare it) and the value a
# record has when the database does not set them. ENUM stands for EPICS's DBF_MENU too.
FieldSpec = tuple[str, Any]
_COMMON_FIELDS: dict[str, FieldSpec] = {
    "DESC": ("STRING", ""),
    "DISP": ("UCHAR", 0),
    "TPRO": ("UCHAR", 0),
    "FLNK": ("STRING", ""),
}
_DISPLAY_FIELDS: dict[str, FieldSpec] = {
    "PREC": ("SHORT", 0),
    "EGU": ("STRING", ""),
    "HOPR": ("DOUBLE", 0.0),
    "LOPR": ("DOUBLE", 0.0),
}
_ALARM_FIELDS: dict[str, FieldSpec] = {
    **{name: ("DOUBLE", 0.0) for name in ("HIHI", "HIGH", "LOW", "LOLO", "HYST")},
    **{name: ("ENUM", "NO_ALARM") for name in ("HHSV", "HSV", "LSV", "LLSV")},
}
#: Fields a client may read but not write here: what the record computes, and what miniioc
#: reads only at iocInit (links, SCAN, PINI), where writing would silently change nothing.
READ_ONLY_FIELDS = frozenset(
    {"NAME", "RTYP", "SEVR", "STAT", "UDF", "NORD", "NELM", "FTVL", "SCAN", "PINI", "DTYP"}
    | {"INP", "OUT", "FLNK"}
    | {"INP" + letter for letter in VARIABLES}
)

_LINK_MODIFIERS = {"NPP", "PP", "CA", "CP", "CPP", "NMS", "MS", "MSS", "MSI"}
_FIELD_NAME = re.compile(r"^[A-Z][A-Z0-9]{0,3}$")
_PERIOD = re.compile(r"^\s*(\d*\.?\d+)\s*(second|seconds|sec|s)?\s*$", re.IGNORECASE)


class DatabaseError(Exception):
    """A record definition or operation that the database refuses, with EPICS-like text."""


class PutDisabled(DatabaseError):
    """A put to a record with ``DISP`` set (EPICS's ``S_db_putDisabled``)."""


@dataclass
class Link:
    """An input or output link field, parsed once at ``iocInit``."""

    text: str
    constant: Any | None = None
    record_name: str = ""
    field: str = "VAL"
    process: str = "NPP"  # NPP, PP, CP or CPP
    severity: str = "NMS"  # NMS, MS, MSS or MSI
    target: Record | None = None

    @property
    def is_db(self) -> bool:
        return bool(self.record_name)


def parse_link(text: str) -> Link | None:
    """Parse ``"REC.FIELD PP MS"``, a numeric constant or ``{const: ...}``; None when empty."""
    text = text.strip()
    if not text:
        return None
    const = re.match(r'^\{\s*"?const"?\s*:\s*(.*?)\s*\}$', text)
    if const:
        raw = const.group(1).strip()
        if raw.startswith('"') and raw.endswith('"'):
            return Link(text, constant=raw[1:-1])
        return Link(text, constant=_number_or_text(raw))
    number = _number_or_none(text)
    if number is not None:
        return Link(text, constant=number)
    if text[0] in "@#":
        # A hardware address: soft channel support has no use for it.
        return Link(text)
    words = text.split()
    name = words[0]
    for prefix in ("ca://", "pva://"):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    link = Link(text)
    for word in words[1:]:
        modifier = word.upper()
        if modifier not in _LINK_MODIFIERS:
            raise DatabaseError(f"Bad link modifier {word!r} in link {text!r}")
        if modifier in ("NPP", "PP", "CP", "CPP"):
            link.process = modifier
        elif modifier in ("NMS", "MS", "MSS", "MSI"):
            link.severity = modifier
    record_name, field = split_field(name)
    link.record_name = record_name
    link.field = field
    return link


def split_field(pvname: str) -> tuple[str, str]:
    """Split ``REC.FIELD`` into its parts; a name without a field means VAL."""
    base, dot, field = pvname.rpartition(".")
    if dot and _FIELD_NAME.match(field):
        return base, field
    if dot and field == "":
        return base, "VAL"
    return pvname, "VAL"


def _number_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return float(int(text, 0))
    except ValueError:
        return None


def _number_or_text(text: str) -> Any:
    number = _number_or_none(text)
    return text if number is None else number


def _severity(text: str) -> int:
    text = text.strip().upper()
    if not text:
        return NO_ALARM
    if text in SEVERITY_NAMES:
        return SEVERITY_NAMES.index(text)
    if text.isdigit() and int(text) < len(SEVERITY_NAMES):
        return int(text)
    raise DatabaseError(f"Bad alarm severity {text!r}")


def _typed(dbf: str, raw: str, field: str) -> Any:
    """A field's text from the database as a value of its DBF type."""
    if dbf == "STRING":
        return raw
    if dbf == "ENUM":
        # The severity menus: a name or its index.
        return SEVERITY_NAMES[_severity(raw)]
    number = _number_or_none(raw.strip()) if raw.strip() else 0.0
    if number is None:
        raise DatabaseError(f'Can\'t read field {field} "{raw}": not a number')
    if dbf in ("DOUBLE", "FLOAT"):
        return number
    return int(number) if not math.isnan(number) else 0


def format_number(value: float) -> str:
    """Format a double the way EPICS converts it to a string when no PREC applies."""
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Inf" if value > 0 else "-Inf"
    return f"{value:.12g}"


class Record:
    """Common state of every record: name, raw fields, VAL, alarms, links."""

    rtype: ClassVar[str] = ""
    dbf: ClassVar[str] = "DOUBLE"  # DBF type of VAL, as dbgf prints it
    input_links: ClassVar[tuple[str, ...]] = ()
    output_links: ClassVar[tuple[str, ...]] = ()
    #: The record type's fields besides VAL and the computed ones: DBF type and default.
    field_specs: ClassVar[dict[str, FieldSpec]] = _COMMON_FIELDS

    def __init__(self, definition: RecordDef) -> None:
        self.name = definition.name
        self.fields: dict[str, str] = dict(definition.fields)
        self.infos = dict(definition.infos)
        self.aliases: list[str] = list(definition.aliases)
        self.source = definition.source
        self.links: dict[str, Link] = {}
        self.active = False
        self.timestamp = time.time()
        self.value: Any = self.initial_value()
        self.udf = "VAL" not in self.fields
        self.status = STAT["UDF"] if self.udf else NO_ALARM
        self.severity = self.udf_severity if self.udf else NO_ALARM
        self._new_status = NO_ALARM
        self._new_severity = NO_ALARM

    # -- configuration helpers --------------------------------------------------------

    def text(self, field: str, default: str = "") -> str:
        return self.fields.get(field, default)

    def number(self, field: str, default: float = 0.0) -> float:
        raw = self.fields.get(field, "").strip()
        if not raw:
            return default
        value = _number_or_none(raw)
        if value is None:
            raise DatabaseError(f'Can\'t set "{self.name}.{field}" to "{raw}": not a number')
        return value

    @property
    def udf_severity(self) -> int:
        return _severity(self.fields.get("UDFS", "INVALID"))

    @property
    def scan(self) -> str:
        return self.fields.get("SCAN", "Passive").strip() or "Passive"

    @property
    def is_passive(self) -> bool:
        return self.scan.lower() == "passive"

    @property
    def scan_period(self) -> float | None:
        """Seconds between periodic scans, or None for Passive/Event/I/O Intr."""
        match = _PERIOD.match(self.scan)
        return float(match.group(1)) if match else None

    @property
    def pini(self) -> bool:
        return self.fields.get("PINI", "NO").strip().upper() in ("YES", "1", "RUN", "RUNNING")

    @property
    def disp(self) -> bool:
        """DISP set: puts from outside the record's links are refused."""
        return self.number("DISP") != 0

    # -- values -----------------------------------------------------------------------

    def initial_value(self) -> Any:
        raw = self.fields.get("VAL")
        return self.convert(raw) if raw not in (None, "") else self.zero()

    def zero(self) -> Any:
        return 0.0

    def convert(self, value: Any) -> Any:
        """Convert a put value (number, string, list) to this record's VAL type."""
        return to_float(value)

    def as_number(self) -> float:
        """VAL as a number, for calc inputs and links."""
        value = self.value
        if isinstance(value, str):
            return _number_or_none(value) or 0.0
        if isinstance(value, list):
            return float(value[0]) if value else 0.0
        return float(value)

    # -- fields other than VAL -------------------------------------------------------

    def get_field(self, field: str) -> tuple[str, Any]:
        """(DBF type name, value) of a field, for dbgf, links and field PVs; KeyError if none."""
        if field == "VAL":
            return self.dbf, self.value
        if field == "SEVR":
            return "ENUM", SEVERITY_NAMES[self.severity]
        if field == "STAT":
            return "ENUM", STATUS_NAMES[self.status]
        if field == "UDF":
            return "UCHAR", int(self.udf)
        if field == "NAME":
            return "STRING", self.name
        if field == "RTYP":
            return "STRING", self.rtype
        spec = self.field_specs.get(field)
        if field in self.fields:
            raw = self.fields[field]
            if spec is not None:
                return spec[0], _typed(spec[0], raw, field)
            number = _number_or_none(raw)
            if number is not None:
                return "DOUBLE", number
            return "STRING", raw
        if spec is not None:
            return spec
        if field in self.input_links + self.output_links:
            return "STRING", ""
        if field in ("SCAN", "PINI", "DTYP"):
            return "STRING", {"SCAN": self.scan, "PINI": "NO", "DTYP": "Soft Channel"}[field]
        raise KeyError(field)

    def field_choices(self, field: str) -> tuple[str, ...]:
        """The choices of an ENUM field other than VAL (severity and status menus)."""
        if field == "STAT":
            return STATUS_NAMES
        return SEVERITY_NAMES

    def put_field(self, field: str, value: Any) -> bool:
        """Store a put; returns True when the record should be processed afterwards."""
        if field == "VAL":
            self.value = self.convert(value)
            self.udf = False
            return True
        if field in ("SEVR", "STAT", "NAME", "RTYP", "UDF"):
            raise DatabaseError(f"{self.name}.{field} is read-only here")
        self.fields[field] = to_text(value)
        return False

    # -- processing ---------------------------------------------------------------

    def process(self, db: Database) -> None:
        """Record-specific work; subclasses read inputs, compute, write outputs."""

    def raise_alarm(self, status: int, severity: int) -> None:
        """Like recGblSetSevr: the highest severity raised while processing wins."""
        if severity > self._new_severity:
            self._new_status = status
            self._new_severity = severity

    def check_alarms(self) -> None:
        """Raise the alarms that follow from the new value (subclasses add limits)."""
        if self.udf:
            self.raise_alarm(STAT["UDF"], self.udf_severity)

    def finish_processing(self) -> None:
        self.check_alarms()
        self.status, self.severity = self._new_status, self._new_severity
        self._new_status = self._new_severity = NO_ALARM
        self.timestamp = time.time()


class _LimitAlarmMixin(Record):
    """HIHI/HIGH/LOW/LOLO checks as in aiRecord.c's checkAlarms (without hysteresis)."""

    field_specs: ClassVar[dict[str, FieldSpec]] = {**_COMMON_FIELDS, **_DISPLAY_FIELDS, **_ALARM_FIELDS}

    def check_alarms(self) -> None:
        if self.udf:
            self.raise_alarm(STAT["UDF"], self.udf_severity)
            return
        value = self.as_number()
        checks: tuple[tuple[str, str, Callable[[float, float], bool]], ...] = (
            ("HIHI", "HHSV", operator.ge),
            ("LOLO", "LLSV", operator.le),
            ("HIGH", "HSV", operator.ge),
            ("LOW", "LSV", operator.le),
        )
        for limit_field, severity_field, crossed in checks:
            severity = _severity(self.fields.get(severity_field, ""))
            if severity and crossed(value, self.number(limit_field)):
                self.raise_alarm(STAT[limit_field], severity)
                return


class AiRecord(_LimitAlarmMixin):
    rtype = "ai"
    input_links = ("INP",)

    def process(self, db: Database) -> None:
        db.read_input(self, "INP")


class AoRecord(_LimitAlarmMixin):
    rtype = "ao"
    output_links = ("OUT",)
    field_specs: ClassVar[dict[str, FieldSpec]] = {
        **_LimitAlarmMixin.field_specs,
        "DRVH": ("DOUBLE", 0.0),
        "DRVL": ("DOUBLE", 0.0),
    }

    def process(self, db: Database) -> None:
        self.value = self.clamp(self.value)
        db.write_output(self, "OUT")

    def clamp(self, value: Any) -> Any:
        high, low = self.number("DRVH"), self.number("DRVL")
        if high > low:
            return type(value)(min(max(value, low), high))
        return value


# longin/longout: the display and alarm limits are LONG, and there is no PREC.
_LONG_LIMITS: dict[str, FieldSpec] = {
    **{name: ("LONG", 0) for name in ("HOPR", "LOPR", "HIHI", "HIGH", "LOW", "LOLO", "HYST")},
    "EGU": ("STRING", ""),
}


class LonginRecord(AiRecord):
    rtype = "longin"
    dbf = "LONG"
    field_specs: ClassVar[dict[str, FieldSpec]] = {**_COMMON_FIELDS, **_ALARM_FIELDS, **_LONG_LIMITS}

    def zero(self) -> Any:
        return 0

    def convert(self, value: Any) -> Any:
        return to_long(value)


class LongoutRecord(AoRecord):
    rtype = "longout"
    dbf = "LONG"
    field_specs: ClassVar[dict[str, FieldSpec]] = {
        **_COMMON_FIELDS,
        **_ALARM_FIELDS,
        **_LONG_LIMITS,
        "DRVH": ("LONG", 0),
        "DRVL": ("LONG", 0),
    }

    def zero(self) -> Any:
        return 0

    def convert(self, value: Any) -> Any:
        return to_long(value)


class EnumRecord(Record):
    """bi/bo/mbbi/mbbo: VAL is a state index with a name and a severity per state."""

    dbf = "ENUM"
    max_states = 2

    def zero(self) -> Any:
        return 0

    def state_names(self) -> list[str]:
        raise NotImplementedError

    def state_severity(self, index: int) -> int:
        raise NotImplementedError

    def enum_strings(self) -> list[str]:
        """Names served to CA clients: undefined states show as their number."""
        names = self.state_names()
        return [name or str(index) for index, name in enumerate(names)]

    def enum_strings_for(self, index: int) -> list[str]:
        """:meth:`enum_strings`, extended with numbers so that ``index`` has a name."""
        strings = self.enum_strings()
        while len(strings) <= index:
            strings.append(str(len(strings)))
        return strings

    def convert(self, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            names = self.state_names()
            if text in names and text:
                return names.index(text)
            number = _number_or_none(text)
            if number is None:
                raise DatabaseError(f"{text!r} is not a state of {self.name}")
            value = number
        index = int(to_float(value))
        if not 0 <= index < self.max_states:
            raise DatabaseError(f"state {index} out of range for {self.name}")
        return index

    def get_field(self, field: str) -> tuple[str, Any]:
        if field == "VAL":
            return self.dbf, self.state_text()
        return super().get_field(field)

    def state_text(self) -> str:
        names = self.state_names()
        index = int(self.value)
        if index < len(names) and names[index]:
            return names[index]
        return str(index) if self.max_states > 2 else ""

    def check_alarms(self) -> None:
        if self.udf:
            self.raise_alarm(STAT["UDF"], self.udf_severity)
            return
        self.raise_alarm(STAT["STATE"], self.state_severity(self.value))


class _BinaryMixin(EnumRecord):
    field_specs: ClassVar[dict[str, FieldSpec]] = {
        **_COMMON_FIELDS,
        "ZNAM": ("STRING", ""),
        "ONAM": ("STRING", ""),
        **{name: ("ENUM", "NO_ALARM") for name in ("ZSV", "OSV", "COSV")},
    }

    def state_names(self) -> list[str]:
        return [self.text("ZNAM"), self.text("ONAM")]

    def state_severity(self, index: int) -> int:
        return _severity(self.text("ZSV" if index == 0 else "OSV"))

    def enum_strings(self) -> list[str]:
        names = self.state_names()
        # EPICS serves no state strings when neither name is set.
        return names if any(names) else ["0", "1"]


class _MultiBitMixin(EnumRecord):
    max_states = 16
    field_specs: ClassVar[dict[str, FieldSpec]] = {
        **_COMMON_FIELDS,
        **{prefix + "ST": ("STRING", "") for prefix in MBB_PREFIXES},
        **{prefix + "VL": ("ULONG", 0) for prefix in MBB_PREFIXES},
        **{prefix + "SV": ("ENUM", "NO_ALARM") for prefix in MBB_PREFIXES},
        "UNSV": ("ENUM", "NO_ALARM"),
        "COSV": ("ENUM", "NO_ALARM"),
        "NOBT": ("SHORT", 0),
    }

    def state_names(self) -> list[str]:
        names = [self.text(prefix + "ST") for prefix in MBB_PREFIXES]
        while names and not names[-1]:
            names.pop()
        return names

    def state_severity(self, index: int) -> int:
        if index >= len(self.state_names()) or not self.state_names()[index]:
            return _severity(self.text("UNSV"))
        return _severity(self.text(MBB_PREFIXES[index] + "SV"))

    def enum_strings(self) -> list[str]:
        return super().enum_strings() or ["0"]


class BiRecord(_BinaryMixin):
    rtype = "bi"
    input_links = ("INP",)

    def process(self, db: Database) -> None:
        db.read_input(self, "INP")


class BoRecord(_BinaryMixin):
    rtype = "bo"
    output_links = ("OUT",)

    def process(self, db: Database) -> None:
        db.write_output(self, "OUT")


class MbbiRecord(_MultiBitMixin):
    rtype = "mbbi"
    input_links = ("INP",)

    def process(self, db: Database) -> None:
        db.read_input(self, "INP")


class MbboRecord(_MultiBitMixin):
    rtype = "mbbo"
    output_links = ("OUT",)

    def process(self, db: Database) -> None:
        db.write_output(self, "OUT")


class StringinRecord(Record):
    rtype = "stringin"
    dbf = "STRING"
    input_links: ClassVar[tuple[str, ...]] = ("INP",)

    def zero(self) -> Any:
        return ""

    def convert(self, value: Any) -> Any:
        return to_text(value)[: MAX_STRING_SIZE - 1]

    def process(self, db: Database) -> None:
        db.read_input(self, "INP")


class StringoutRecord(StringinRecord):
    rtype = "stringout"
    input_links = ()
    output_links = ("OUT",)

    def process(self, db: Database) -> None:
        db.write_output(self, "OUT")


# FTVL menu entry -> (DBF name, element converter)
_FTVL: dict[str, tuple[str, Any]] = {
    "DOUBLE": ("DOUBLE", float),
    "FLOAT": ("FLOAT", float),
    "LONG": ("LONG", int),
    "ULONG": ("ULONG", int),
    "SHORT": ("SHORT", int),
    "USHORT": ("USHORT", int),
    "CHAR": ("CHAR", int),
    "UCHAR": ("UCHAR", int),
}


class WaveformRecord(Record):
    """An array; VAL holds NORD elements of FTVL (at most NELM)."""

    rtype = "waveform"
    input_links = ("INP",)
    field_specs: ClassVar[dict[str, FieldSpec]] = {**_COMMON_FIELDS, **_DISPLAY_FIELDS}

    def __init__(self, definition: RecordDef) -> None:
        ftvl = definition.fields.get("FTVL", "DOUBLE").strip().upper() or "DOUBLE"
        if ftvl not in _FTVL:
            raise DatabaseError(
                f"{definition.name}: FTVL {ftvl!r} is not supported here (supported: {', '.join(_FTVL)})"
            )
        self.ftvl = ftvl
        self.nelm = max(1, int(to_float(definition.fields.get("NELM", "1") or "1")))
        super().__init__(definition)
        self.udf = not self.value

    @property
    def dbf(self) -> str:  # type: ignore[override]
        return _FTVL[self.ftvl][0]

    def zero(self) -> Any:
        return []

    def convert(self, value: Any) -> Any:
        element = _FTVL[self.ftvl][1]
        if isinstance(value, (bytes, bytearray)):
            items: list[Any] = list(value)
        elif isinstance(value, str):
            if self.ftvl in ("CHAR", "UCHAR"):
                items = list(value.encode("latin-1"))
                if items and len(items) < self.nelm:
                    items.append(0)  # keep the C string's terminator, as dbpf does
            else:
                items = value.replace(",", " ").split()
        elif isinstance(value, (list, tuple)) or hasattr(value, "__iter__"):
            items = list(value)
        else:
            items = [value]
        return [element(to_float(item)) for item in items[: self.nelm]]

    def get_field(self, field: str) -> tuple[str, Any]:
        if field == "NORD":
            return "ULONG", len(self.value)
        if field == "NELM":
            return "ULONG", self.nelm
        return super().get_field(field)

    def process(self, db: Database) -> None:
        db.read_input(self, "INP")

    def check_alarms(self) -> None:
        if self.udf:
            self.raise_alarm(STAT["UDF"], self.udf_severity)


class CalcRecord(_LimitAlarmMixin):
    """VAL = CALC evaluated over A..L, which come from INPA..INPL."""

    rtype = "calc"
    input_links = tuple("INP" + letter for letter in VARIABLES)
    field_specs: ClassVar[dict[str, FieldSpec]] = {**_LimitAlarmMixin.field_specs, "CALC": ("STRING", "0")}

    def __init__(self, definition: RecordDef) -> None:
        super().__init__(definition)
        expression = self.fields.get("CALC", "0") or "0"
        try:
            self.expression = compile_calc(expression)
        except CalcError as exc:
            raise DatabaseError(f"{self.name}: Illegal CALC field {expression!r}: {exc}") from None
        self.inputs: dict[str, float] = {}
        for letter in VARIABLES:
            self.inputs[letter] = self.number(letter)

    def put_field(self, field: str, value: Any) -> bool:
        if field in VARIABLES:
            self.inputs[field] = to_float(value)
            return True
        if field == "CALC":
            text = to_text(value)
            try:
                self.expression = compile_calc(text)
            except CalcError as exc:
                raise DatabaseError(f"{self.name}: Illegal CALC field {text!r}: {exc}") from None
            self.fields["CALC"] = text
            return False
        return super().put_field(field, value)

    def get_field(self, field: str) -> tuple[str, Any]:
        if field in VARIABLES:
            return "DOUBLE", self.inputs[field]
        return super().get_field(field)

    def process(self, db: Database) -> None:
        for letter in VARIABLES:
            value = db.read_link_value(self, "INP" + letter)
            if value is not None:
                self.inputs[letter] = to_float(value)
        env = dict(self.inputs)
        env["VAL"] = self.value
        try:
            self.value = float(self.expression(env))
        except (ArithmeticError, ValueError):
            self.raise_alarm(STAT["CALC"], INVALID)
            return
        self.udf = math.isnan(self.value)


RECORD_TYPES: dict[str, type[Record]] = {
    cls.rtype: cls
    for cls in (
        AiRecord,
        AoRecord,
        BiRecord,
        BoRecord,
        LonginRecord,
        LongoutRecord,
        MbbiRecord,
        MbboRecord,
        StringinRecord,
        StringoutRecord,
        WaveformRecord,
        CalcRecord,
    )
}


def to_float(value: Any) -> float:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else 0.0
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    text = str(value).strip()
    if not text:
        return 0.0
    number = _number_or_none(text)
    if number is None:
        raise DatabaseError(f"{text!r} is not a number")
    return number


def to_long(value: Any) -> int:
    number = to_float(value)
    if math.isnan(number):
        return 0
    # C conversion truncates toward zero; clamp to the 32-bit range of DBF_LONG.
    return int(max(-(2**31), min(2**31 - 1, number)))


def to_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else ""
    if isinstance(value, bytes):
        return value.decode("latin-1").rstrip("\x00")
    if isinstance(value, float):
        return format_number(value)
    return str(value)
