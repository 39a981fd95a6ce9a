"""Serve a :class:`~miniioc.records.Database` over Channel Access with caproto.

The server runs caproto's asyncio server in a thread of its own; the shell
keeps the main thread (and the console). Every database operation after
``iocInit`` runs on the server's event loop (:meth:`CaRuntime.call`), so
puts from CA clients, console commands and periodic scans never overlap, and
each is followed by publishing the records it changed.

Each record is served as ``NAME`` and ``NAME.VAL`` (and its aliases); its
other fields (``NAME.NORD``, ``NAME.DISP``, ``NAME.EGU``...) as PVs of their
EPICS type when a client first searches for them, so the boot does not pay for
fields nobody reads. A put that the database refuses (``DISP`` set, a bad enum
string) answers the put-callback with ``ECA_PUTFAIL`` and leaves the value, as
an EPICS IOC does. The server binds 0.0.0.0 on ``EPICS_CA_SERVER_PORT``, which
caproto reads from the environment when the server starts, after the startup
script's ``epicsEnvSet`` lines.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, Callable, TypeVar

from caproto import (
    AccessRights,
    CAStatus,
    ChannelAlarm,
    ChannelByte,
    ChannelData,
    ChannelDouble,
    ChannelEnum,
    ChannelFloat,
    ChannelInteger,
    ChannelShort,
    ChannelString,
    SkipWrite,
)

from .database import Database
from .iocsh import Runtime
from .records import (
    MAX_STRING_SIZE,
    READ_ONLY_FIELDS,
    AoRecord,
    DatabaseError,
    EnumRecord,
    Record,
    WaveformRecord,
)

T = TypeVar("T")
log = logging.getLogger("miniioc")


def _import_server_context() -> Any:
    """caproto's asyncio server ``Context``, without what the guest never uses.

    ``caproto.server`` and ``caproto.asyncio`` import, in their ``__init__``,
    the pvproperty machinery, generated record classes and the CA client; the
    server context needs none of them, and under QEMU's emulation they take
    about two seconds of every boot. Registering the two packages unexecuted
    (same ``__path__``, so their submodules import as usual) skips that. If
    caproto's layout ever makes this fail, the plain import is used.
    """
    stubbed = []
    try:
        for name in ("caproto.server", "caproto.asyncio"):
            if name in sys.modules:
                continue
            spec = importlib.util.find_spec(name)
            if spec is None:
                raise ImportError(name)
            package = importlib.util.module_from_spec(spec)
            sys.modules[name] = package
            stubbed.append(name)
        from caproto.server.typing import AsyncLibraryLayer

        server_package = sys.modules["caproto.server"]
        if not hasattr(server_package, "AsyncLibraryLayer"):
            server_package.AsyncLibraryLayer = AsyncLibraryLayer  # type: ignore[attr-defined]
        from caproto.asyncio.server import Context

        return Context
    except Exception:
        for name in list(sys.modules):
            if any(name == s or name.startswith(s + ".") for s in stubbed):
                del sys.modules[name]
        from caproto.asyncio.server import Context

        return Context


Context = _import_server_context()


class _PutRefused(Exception):
    """The database refused a put from a client (see :meth:`_RecordChannel.auth_write`)."""


class _RecordChannel:
    """Mixed into caproto's channel classes: a CA put becomes a database put."""

    runtime: CaRuntime
    record: Record
    field: str = "VAL"
    read_only: bool = False

    async def verify_value(self, value: Any) -> Any:
        await self.runtime.handle_put(self.record, self.field, value)
        # handle_put already stored and published the processed value.
        return SkipWrite

    async def auth_write(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().auth_write(*args, **kwargs)  # type: ignore[misc]
        except _PutRefused:
            # rsrv answers a refused put-callback with ECA_PUTFAIL, not with an error message.
            return CAStatus.ECA_PUTFAIL

    def check_access(self, hostname: str, username: str) -> AccessRights:
        if self.read_only:
            return AccessRights.READ
        return AccessRights.READ | AccessRights.WRITE

    def get_field(self, field: str) -> ChannelData:
        """``REC.FIELD``: caproto's server asks the record's channel for names it does not know."""
        return self.runtime.field_channel(self.record, field)


def _channel_class(base: type[ChannelData]) -> type[ChannelData]:
    return type("Record" + base.__name__, (_RecordChannel, base), {})


_DOUBLE = _channel_class(ChannelDouble)
_FLOAT = _channel_class(ChannelFloat)
_INTEGER = _channel_class(ChannelInteger)
_SHORT = _channel_class(ChannelShort)
_BYTE = _channel_class(ChannelByte)
_ENUM = _channel_class(ChannelEnum)
_STRING = _channel_class(ChannelString)

_ARRAY_CLASSES: dict[str, type[ChannelData]] = {
    "DOUBLE": _DOUBLE,
    "FLOAT": _FLOAT,
    "LONG": _INTEGER,
    "ULONG": _INTEGER,
    "SHORT": _SHORT,
    "USHORT": _SHORT,
    "CHAR": _BYTE,
    "UCHAR": _BYTE,
}


class _LongMenuChannel(_ENUM):  # type: ignore[misc, valid-type]
    """An ENUM field with more than CA's 16 choices (STAT has 22), like an EPICS menu field.

    Values and DBR_STRING reads use every choice; DBR_GR/CTRL_ENUM carry the first 16 strings,
    all that fit, as EPICS's own server sends them.
    """

    @staticmethod
    def _validate_enum_strings(enum_strings: Sequence[str]) -> tuple[str, ...]:
        return tuple(enum_strings)

    def _read_metadata(self, dbr_metadata: Any) -> Any:
        if hasattr(dbr_metadata, "no_str"):
            strings = [text.encode(self.string_encoding) for text in self.enum_strings[:16]]
            dbr_metadata.enum_strings = strings
            return ChannelData._read_metadata(self, dbr_metadata)
        return super()._read_metadata(dbr_metadata)


# The CA type a scalar field is served as, by its DBF type: EPICS's mapping (dbAccess's
# mapDBFToDBR), e.g. DBF_ULONG (a waveform's NORD) is DBR_DOUBLE, DBF_UCHAR (DISP) DBR_CHAR.
_FIELD_CLASSES: dict[str, type[ChannelData]] = {
    "DOUBLE": _DOUBLE,
    "FLOAT": _FLOAT,
    "ULONG": _DOUBLE,
    "LONG": _INTEGER,
    "USHORT": _INTEGER,
    "SHORT": _SHORT,
    "CHAR": _BYTE,
    "UCHAR": _BYTE,
    "ENUM": _ENUM,
    "STRING": _STRING,
}


def channel_value(record: Record) -> Any:
    """The record's VAL in the form caproto's channel classes take."""
    if isinstance(record, EnumRecord):
        return record.enum_strings_for(record.value)[record.value]
    if isinstance(record, WaveformRecord) and record.ftvl in ("CHAR", "UCHAR"):
        return bytes(v & 0xFF for v in record.value)
    return record.value


def make_channel(record: Record, runtime: CaRuntime) -> ChannelData:
    common: dict[str, Any] = dict(
        value=channel_value(record),
        alarm=ChannelAlarm(status=record.status, severity=record.severity),
        timestamp=record.timestamp,
        reported_record_type=record.rtype,
    )
    channel: ChannelData
    if isinstance(record, EnumRecord):
        channel = _ENUM(enum_strings=record.enum_strings_for(record.value), **common)
    elif record.dbf == "STRING":
        channel = _STRING(**common)
    elif isinstance(record, WaveformRecord):
        cls = _ARRAY_CLASSES[record.ftvl]
        channel = cls(max_length=record.nelm, **common)
    else:
        cls = _DOUBLE if record.dbf == "DOUBLE" else _INTEGER
        cast: Callable[[float], Any] = float if record.dbf == "DOUBLE" else int
        extra: dict[str, Any] = dict(
            units=record.text("EGU"),
            upper_disp_limit=cast(record.number("HOPR")),
            lower_disp_limit=cast(record.number("LOPR")),
            upper_alarm_limit=cast(record.number("HIHI")),
            upper_warning_limit=cast(record.number("HIGH")),
            lower_warning_limit=cast(record.number("LOW")),
            lower_alarm_limit=cast(record.number("LOLO")),
        )
        high, low = record.number("HOPR"), record.number("LOPR")
        if isinstance(record, AoRecord) and record.number("DRVH") > record.number("DRVL"):
            high, low = record.number("DRVH"), record.number("DRVL")
        extra.update(upper_ctrl_limit=cast(high), lower_ctrl_limit=cast(low))
        if record.dbf == "DOUBLE":
            extra["precision"] = int(record.number("PREC"))
        channel = cls(**extra, **common)
    channel.runtime = runtime
    channel.record = record
    return channel


def field_value(dbf: str, value: Any) -> Any:
    """A field's value (from :meth:`Record.get_field`) in the form its channel class takes."""
    if dbf == "STRING":
        return str(value)[: MAX_STRING_SIZE - 1]
    if dbf == "ENUM":
        return str(value)
    if _FIELD_CLASSES[dbf] in (_DOUBLE, _FLOAT):
        return float(value)
    return int(value)


def make_field_channel(record: Record, field: str, runtime: CaRuntime) -> ChannelData:
    """A channel for ``REC.FIELD`` other than VAL; KeyError when the record has no such field."""
    try:
        dbf, value = record.get_field(field)
    except DatabaseError:
        raise KeyError(field) from None  # a field whose text is not of its type: not served
    if isinstance(value, (list, tuple)) or dbf not in _FIELD_CLASSES:
        raise KeyError(field)
    cls = _FIELD_CLASSES[dbf]
    common: dict[str, Any] = dict(
        value=field_value(dbf, value),
        # Every field of a record carries the record's alarm, as in EPICS.
        alarm=ChannelAlarm(status=record.status, severity=record.severity),
        timestamp=record.timestamp,
        reported_record_type=record.rtype,
    )
    if dbf == "ENUM":
        choices = record.field_choices(field)
        cls = _LongMenuChannel if len(choices) > 16 else cls
        channel = cls(enum_strings=list(choices), **common)
    elif cls is _BYTE:
        # A one-byte field: 0 is a value here, not a string terminator to strip.
        channel = cls(strip_null_terminator=False, **common)
    else:
        channel = cls(**common)
    channel.runtime = runtime
    channel.record = record
    channel.field = field
    channel.read_only = field in READ_ONLY_FIELDS
    return channel


class CaRuntime(Runtime):
    """Runs the database behind caproto's asyncio server."""

    def __init__(self, interfaces: Sequence[str] = ("0.0.0.0",), timeout: float = 120.0) -> None:
        self.interfaces = list(interfaces)
        self.timeout = timeout
        self.channels: dict[str, ChannelData] = {}
        #: Field channels made so far, by record name and field.
        self.field_channels: dict[str, dict[str, ChannelData]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._main_task: asyncio.Task[Any] | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    # -- Runtime interface ------------------------------------------------------------

    def start(self, db: Database) -> None:
        self.db = db
        db.take_posted()
        pvdb: dict[str, ChannelData] = {}
        for record in db.records.values():
            channel = make_channel(record, self)
            self.channels[record.name] = channel
            for name in [record.name, *record.aliases]:
                pvdb[name] = channel
                pvdb[name + ".VAL"] = channel
        self._thread = threading.Thread(target=self._thread_main, args=(pvdb,), daemon=True, name="ca-server")
        self._thread.start()
        if not self._ready.wait(self.timeout):
            raise DatabaseError(f"CA server did not start within {self.timeout:.0f} s")
        if self._error is not None:
            raise DatabaseError(f"CA server failed to start: {self._error!r}")

    def field_channel(self, record: Record, field: str) -> ChannelData:
        """The channel of ``REC.FIELD``, made the first time a client asks (on the event loop)."""
        if field == "VAL":
            return self.channels[record.name]
        fields = self.field_channels.setdefault(record.name, {})
        channel = fields.get(field)
        if channel is None:
            try:
                channel = make_field_channel(record, field, self)
            except KeyError:
                raise
            except Exception:
                # caproto answers a whole batch of searches at once: one bad field must not
                # stop the others from being found.
                log.exception("cannot serve %s.%s", record.name, field)
                raise KeyError(field) from None
            fields[field] = channel
        return channel

    def call(self, operation: Callable[[], T]) -> T:
        if self._loop is None:
            return operation()
        future = asyncio.run_coroutine_threadsafe(self._apply(operation), self._loop)
        return future.result()

    def stop(self) -> None:
        loop, task = self._loop, self._main_task
        if loop is not None and task is not None and not loop.is_closed():
            loop.call_soon_threadsafe(task.cancel)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def wait(self) -> None:
        """Block until the server stops (the console went away, the IOC keeps serving)."""
        if self._thread is not None:
            self._thread.join()

    # -- event loop side ----------------------------------------------------------------

    def _thread_main(self, pvdb: dict[str, ChannelData]) -> None:
        try:
            asyncio.run(self._serve(pvdb))
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()

    async def _serve(self, pvdb: dict[str, ChannelData]) -> None:
        self._loop = asyncio.get_running_loop()
        self._main_task = asyncio.current_task()
        context = Context(pvdb, interfaces=self.interfaces)
        try:
            await context.run(startup_hook=self._started)
        except asyncio.CancelledError:
            pass

    async def _started(self, async_lib: Any) -> None:
        for period, records in sorted(self.db.periodic_groups().items()):
            asyncio.get_running_loop().create_task(self._scan(period, records))
        self._ready.set()

    async def _scan(self, period: float, records: list[Record]) -> None:
        next_time = time.monotonic()
        while True:
            next_time += period
            await asyncio.sleep(max(0.0, next_time - time.monotonic()))
            for record in records:
                try:
                    self.db.process(record)
                except Exception:
                    log.exception("processing %s failed", record.name)
            await self.publish(self.db.take_posted())

    async def _apply(self, operation: Callable[[], T]) -> T:
        try:
            return operation()
        finally:
            await self.publish(self.db.take_posted())

    async def handle_put(self, record: Record, field: str, value: Any) -> None:
        if isinstance(value, (bytes, bytearray)) and field != "VAL":
            value = list(value)  # a CHAR field (DISP...) arrives as bytes
        try:
            self.db.put_record(record, field, value)
        except DatabaseError as exc:
            log.debug("put to %s.%s refused: %s", record.name, field, exc)
            await self.publish(self.db.take_posted())
            raise _PutRefused(str(exc)) from None
        await self.publish(self.db.take_posted())

    async def publish(self, records: list[Record]) -> None:
        for record in records:
            channel = self.channels.get(record.name)
            if channel is None:
                continue
            if isinstance(record, EnumRecord):
                strings = record.enum_strings_for(record.value)
                if tuple(strings) != tuple(channel.enum_strings):
                    await channel.write_metadata(enum_strings=strings, publish=False)
            await channel.write(
                channel_value(record),
                verify_value=False,
                status=record.status,
                severity=record.severity,
                timestamp=record.timestamp,
            )
            for field, field_channel in self.field_channels.get(record.name, {}).items():
                await self._publish_field(record, field, field_channel)

    async def _publish_field(self, record: Record, field: str, channel: ChannelData) -> None:
        try:
            dbf, value = record.get_field(field)
        except (KeyError, DatabaseError):
            return
        value = field_value(dbf, value)
        alarm = channel.alarm
        if value == channel.value and (alarm.status, alarm.severity) == (record.status, record.severity):
            return  # EPICS posts a field's monitor when the field changes
        await channel.write(
            value,
            verify_value=False,
            status=record.status,
            severity=record.severity,
            timestamp=record.timestamp,
        )
