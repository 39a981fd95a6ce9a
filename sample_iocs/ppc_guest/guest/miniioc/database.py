"""The records of one IOC, the links between them and how processing spreads.

Processing follows EPICS's order: a record processes (reading its input
links, processing passive sources first for ``PP``), raises its alarms, posts
its value, runs its forward link; records with ``CP``/``CPP`` input links to it
are queued and processed after that chain, once each per top-level operation
(so a loop of CP links cannot spin forever).
"""

from __future__ import annotations

from collections import deque
from typing import Any

from .calc import VARIABLES
from .dbparse import DbContents, RecordDef
from .records import (
    INVALID,
    NO_ALARM,
    RECORD_TYPES,
    STAT,
    CalcRecord,
    DatabaseError,
    PutDisabled,
    Record,
    parse_link,
    split_field,
    to_float,
)


class Database:
    """The records of one IOC, the links between them and how processing spreads."""

    def __init__(self) -> None:
        self.records: dict[str, Record] = {}
        self.alias_of: dict[str, str] = {}
        self.initialized = False
        self._posted: list[Record] = []
        self._cp_dependents: dict[str, list[Record]] = {}
        self._queue: deque[Record] = deque()
        self._seen: set[str] = set()

    # -- loading ----------------------------------------------------------------------

    def load(self, contents: DbContents) -> None:
        if self.initialized:
            raise DatabaseError("Records cannot be loaded after iocInit")
        for definition in contents.records:
            self._add(definition)
        for record_name, alias in contents.aliases:
            self._add_alias(record_name, alias)

    def _add(self, definition: RecordDef) -> None:
        existing = self.find_record(definition.name)
        if existing is not None:
            if definition.rtype not in ("*", existing.rtype):
                raise DatabaseError(
                    f'Record "{definition.name}" of type "{existing.rtype}" redefined '
                    f'with new type "{definition.rtype}" ({definition.source})'
                )
            merged = RecordDef(
                rtype=existing.rtype,
                name=existing.name,
                fields={**existing.fields, **definition.fields},
                infos={**existing.infos, **definition.infos},
                aliases=existing.aliases + definition.aliases,
                source=existing.source,
            )
            record = self._create(merged)
            self.records[existing.name] = record
        else:
            if definition.rtype == "*":
                raise DatabaseError(
                    f'Record "{definition.name}" not found for record(*, ...) ({definition.source})'
                )
            record = self._create(definition)
            self.records[record.name] = record
        for alias in definition.aliases:
            self._add_alias(record.name, alias)

    @staticmethod
    def _create(definition: RecordDef) -> Record:
        cls = RECORD_TYPES.get(definition.rtype)
        if cls is None:
            raise DatabaseError(
                f'Record "{definition.name}" is of unknown type "{definition.rtype}" '
                f"({definition.source}); supported: {', '.join(sorted(RECORD_TYPES))}"
            )
        try:
            return cls(definition)
        except DatabaseError as exc:
            if definition.name in str(exc):
                raise
            raise DatabaseError(f'Record "{definition.name}" ({definition.source}): {exc}') from None

    def _add_alias(self, record_name: str, alias: str) -> None:
        record = self.find_record(record_name)
        if record is None:
            raise DatabaseError(f'Alias "{alias}" refers to unknown record "{record_name}"')
        if alias in self.records or alias in self.alias_of:
            raise DatabaseError(f'Alias "{alias}" already exists')
        self.alias_of[alias] = record.name
        if alias not in record.aliases:
            record.aliases.append(alias)

    # -- lookup -----------------------------------------------------------------------

    def find_record(self, name: str) -> Record | None:
        return self.records.get(self.alias_of.get(name, name))

    def resolve(self, pvname: str) -> tuple[Record, str]:
        """Find ``REC`` or ``REC.FIELD``; KeyError when there is no such record."""
        record = self.find_record(pvname)
        if record is not None:
            return record, "VAL"
        base, field = split_field(pvname)
        record = self.find_record(base)
        if record is None:
            raise KeyError(pvname)
        return record, field

    # -- iocInit --------------------------------------------------------------------

    def initialize(self) -> list[str]:
        """Resolve links and process PINI records; returns warnings for the console."""
        warnings: list[str] = []
        for record in self.records.values():
            for field in record.input_links + record.output_links + ("FLNK",):
                try:
                    link = parse_link(record.fields.get(field, ""))
                except DatabaseError as exc:
                    # Like iocInit, report a bad link and go on with the rest.
                    warnings.append(f"{record.name}.{field}: {exc}")
                    continue
                if link is None:
                    continue
                record.links[field] = link
                if not link.is_db:
                    continue
                link.target = self.find_record(link.record_name)
                if link.target is None:
                    warnings.append(
                        f"{record.name}.{field}: no record {link.record_name!r} in this IOC "
                        "(links to other IOCs are not supported)"
                    )
                    continue
                if link.process in ("CP", "CPP") and field in record.input_links:
                    if link.target is record:
                        warnings.append(f"{record.name}.{field}: CP link to itself ignored")
                        continue
                    self._cp_dependents.setdefault(link.target.name, []).append(record)
            for field in record.input_links:
                link = record.links.get(field)
                if link is not None and link.constant is not None and field == "INP":
                    # A constant input initialises VAL, as soft channel support does.
                    try:
                        record.value = record.convert(link.constant)
                        record.udf = False
                        record.status = record.severity = NO_ALARM
                    except DatabaseError as exc:
                        warnings.append(f"{record.name}.INP: {exc}")
            if isinstance(record, CalcRecord):
                for letter in VARIABLES:
                    link = record.links.get("INP" + letter)
                    if link is not None and link.constant is not None:
                        record.inputs[letter] = to_float(link.constant)
        self.initialized = True
        for record in self.records.values():
            if record.pini:
                self.process(record)
        return warnings

    def periodic_groups(self) -> dict[float, list[Record]]:
        groups: dict[float, list[Record]] = {}
        for record in self.records.values():
            period = record.scan_period
            if period is not None and period > 0:
                groups.setdefault(period, []).append(record)
        return groups

    # -- operations -------------------------------------------------------------------

    def put(self, pvname: str, value: Any) -> Record:
        """dbPutField: store the value, then process when the field asks for it."""
        record, field = self.resolve(pvname)
        self.put_record(record, field, value)
        return record

    def put_record(self, record: Record, field: str, value: Any) -> None:
        """dbPutField on a found record: what Channel Access and ``dbpf`` write through.

        DISP refuses every such put but one to DISP itself; links write with ``put_field``
        and are not affected, as in EPICS (dbPut does not look at DISP).
        """
        if record.disp and field != "DISP":
            raise PutDisabled(f"{record.name}.{field}: Put disabled (DISP is set)")
        should_process = record.put_field(field, value)
        if should_process and self.initialized:
            self.process(record)
        else:
            self._post(record)

    def process(self, record: Record) -> None:
        """Process a record and everything it triggers (forward links, CP links)."""
        top_level = not self._queue and not self._seen
        self._queue.append(record)
        if not top_level:
            return
        try:
            while self._queue:
                current = self._queue.popleft()
                if current.name in self._seen:
                    continue
                self._process_one(current)
        finally:
            self._queue.clear()
            self._seen.clear()

    def _process_one(self, record: Record) -> None:
        if record.active:
            return
        self._seen.add(record.name)
        record.active = True
        try:
            record.process(self)
            record.finish_processing()
            self._post(record)
            forward = record.links.get("FLNK")
            if forward is not None and forward.target is not None and forward.target.is_passive:
                self._process_one(forward.target)
        finally:
            record.active = False
        for dependent in self._cp_dependents.get(record.name, ()):
            link_modes = [
                link.process
                for link in dependent.links.values()
                if link.target is record and link.process in ("CP", "CPP")
            ]
            if "CP" in link_modes or dependent.is_passive:
                self._queue.append(dependent)

    def _post(self, record: Record) -> None:
        if record not in self._posted:
            self._posted.append(record)

    def take_posted(self) -> list[Record]:
        """Records whose value or alarm may have changed since the last call."""
        posted, self._posted = self._posted, []
        return posted

    # -- links ------------------------------------------------------------------------

    def read_link_value(self, record: Record, field: str) -> Any | None:
        """Fetch a link's value (processing a passive source for PP); None if no value."""
        link = record.links.get(field)
        if link is None or not link.is_db:
            return None
        source = link.target
        if source is None:
            record.raise_alarm(STAT["LINK"], INVALID)
            return None
        if link.process == "PP" and source.is_passive and source is not record:
            self._process_one(source)
        if link.severity == "MS" and source.severity:
            record.raise_alarm(STAT["LINK"], source.severity)
        elif link.severity == "MSS":
            record.raise_alarm(source.status, source.severity)
        elif link.severity == "MSI" and source.severity == INVALID:
            record.raise_alarm(STAT["LINK"], INVALID)
        if link.field == "VAL":
            return source.value
        try:
            return source.get_field(link.field)[1]
        except KeyError:
            record.raise_alarm(STAT["LINK"], INVALID)
            return None

    def read_input(self, record: Record, field: str) -> None:
        value = self.read_link_value(record, field)
        if value is None:
            return
        try:
            record.value = record.convert(value)
        except DatabaseError:
            record.raise_alarm(STAT["LINK"], INVALID)
            return
        record.udf = False

    def write_output(self, record: Record, field: str) -> None:
        link = record.links.get(field)
        if link is None or not link.is_db:
            return
        target = link.target
        if target is None:
            record.raise_alarm(STAT["LINK"], INVALID)
            return
        try:
            should_process = target.put_field(link.field, record.value)
        except DatabaseError:
            record.raise_alarm(STAT["LINK"], INVALID)
            return
        if should_process and link.process == "PP" and target.is_passive:
            self._process_one(target)
        else:
            self._post(target)
