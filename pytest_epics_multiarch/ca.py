"""Channel Access clients bound to one IOC's address.

Tests start IOCs (in containers or under QEMU) that each publish their own CA port N on
127.0.0.1, and two IOCs of the same image serve the same PV names at the same time. A client
made by :func:`make_ca_client` therefore searches ``host:N`` and nothing else, whatever
``EPICS_CA_ADDR_LIST``, ``EPICS_CA_AUTO_ADDR_LIST``, ``EPICS_CA_NAME_SERVERS`` or
``EPICS_CA_SERVER_PORT`` say in the process environment, which the whole test process shares.

Two backends sit behind one :class:`CAClient` interface:

``caproto`` (default)
    caproto's threading client. Its ``SharedBroadcaster`` asks ``ca.get_client_address_list()``,
    that is ``os.environ``, every time it sends a search. A subclass (``BoundBroadcaster`` in
    ``_caproto_classes``) overrides ``send`` to aim every datagram at the one address, drops
    datagrams from any other host in ``received``, and pins each search reply to the bound
    host, so the TCP circuit can only go there; it never registers with a CA repeater. The
    environment is neither read for addresses nor written.

``pyepics``
    libca, as shipped (and located) by pyepics. libca reads its configuration from the
    environment, in two places: the context (``EPICS_CA_SERVER_PORT``,
    ``EPICS_CA_NAME_SERVERS``) when it is created, and the UDP search machinery
    (``EPICS_CA_ADDR_LIST``, ``EPICS_CA_AUTO_ADDR_LIST``) when the context makes its first
    channel. Each client owns a worker thread that, under a process-wide lock, sets those
    variables to name only its IOC, creates a fresh preemptive-callback context, creates and
    clears one throw-away channel (forcing the search list to be built), and puts the
    environment back. Every later libca call is marshalled to that thread, which stays attached
    to the context; callbacks arrive on libca's own threads and only hand data over.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import importlib
import itertools
import logging
import math
import os
import queue
import socket
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, TypeVar

from .errors import CAError, CAPutError, CATimeoutError

log = logging.getLogger("pytest_epics_multiarch.ca")

#: Backend names accepted by :func:`make_ca_client`, the default first.
BACKENDS = ("caproto", "pyepics")

PYEPICS_HINT = "pip install pytest-epics-multiarch[pyepics]"

#: EPICS alarm severity names, indexed by severity (``epicsAlarmSeverityStrings``).
ALARM_SEVERITIES = ("NO_ALARM", "MINOR", "MAJOR", "INVALID")

#: EPICS alarm status (condition) names, indexed by status (``epicsAlarmConditionStrings``).
ALARM_STATUSES = (
    "NO_ALARM", "READ", "WRITE", "HIHI", "HIGH", "LOLO", "LOW", "STATE", "COS", "COMM",
    "TIMEOUT", "HWLIMIT", "CALC", "SCAN", "LINK", "SOFT", "BAD_SUB", "UDF", "DISABLE", "SIMM",
    "READ_ACCESS", "WRITE_ACCESS",
)  # fmt: skip

# DBR type codes, the same numbers in caproto's ChannelType and in libca.
_STRING, _SHORT, _FLOAT, _ENUM, _CHAR, _LONG, _DOUBLE = range(7)
_STS_STRING = 7
_STRING_SIZE = 40  # MAX_STRING_SIZE: 39 characters and the NUL
_INTEGER_RANGES = {
    _SHORT: (-(2**15), 2**15 - 1),
    _ENUM: (0, 2**16 - 1),
    _CHAR: (0, 2**8 - 1),
    _LONG: (-(2**31), 2**31 - 1),
}
_MONITOR_MASK = 1 | 4  # DBE_VALUE | DBE_ALARM
_FLOAT_REL_TOL = 1e-6
_FLOAT_ABS_TOL = 1e-9

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# The interface


class CAClient(Protocol):
    """A Channel Access client that talks to one IOC's address only."""

    address: tuple[str, int]

    def get(self, pv: str, *, timeout: float | None = None, as_string: bool = False) -> Any:
        """The PV's value: a Python scalar for one element, a list for arrays.

        ``as_string=True`` asks the IOC for its own string form (the state name of an enum);
        a char waveform then reads as the text it holds.
        """
        ...

    def put(self, pv: str, value: Any, *, timeout: float | None = None) -> None:
        """Write ``value`` and wait for the IOC to report completion; CAPutError if refused."""
        ...

    def wait_for(self, pv: str, expected: Any | Callable[[Any], bool], *, timeout: float = 10.0) -> Any:
        """Wait until the PV equals ``expected`` (or the predicate holds); return the value."""
        ...

    def monitor(self, pv: str) -> Monitor:
        """Subscribe to the PV's value and alarm changes."""
        ...

    def alarm(self, pv: str, *, timeout: float | None = None) -> tuple[str, str]:
        """(severity, status) names, e.g. ``("MAJOR", "HIHI")``."""
        ...

    def exists(self, pv: str, *, timeout: float = 1.0) -> bool:
        """True when the PV connects within ``timeout``."""
        ...

    def close(self) -> None:
        """Release sockets, threads and contexts (idempotent)."""
        ...


class Monitor:
    """Updates of one PV (value or alarm changes), queued as they arrive.

    The first update is the value at subscription time. Use as a context manager, or call
    :meth:`close`; closing the client closes its monitors too.
    """

    def __init__(self, pv: str, owner: _BoundClient) -> None:
        self.pv = pv
        self._owner = owner
        self._updates: queue.Queue[Any] = queue.Queue()
        self._received = 0
        self._cancel: Callable[[], None] | None = None
        self._closed = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Monitor {self.pv!r} at {self._owner.where} {state}, {self._received} updates>"

    def __enter__(self) -> Monitor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def next(self, timeout: float = 5.0) -> Any:
        """The next update, waiting up to ``timeout`` seconds; CATimeoutError if none came."""
        try:
            return self._updates.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            pass
        if self._closed:
            seen = f"the monitor was closed after {self._received} update(s)"
        else:
            seen = f"timeout: {self._received} update(s) received before, none pending"
        raise self._owner.error(
            CATimeoutError,
            f"no update of {self.pv!r} within {timeout:g} s",
            seen=seen,
            hint="a monitor posts only when the value or alarm changes (deadbands apply); "
            "its first update is the value at subscription time",
        )

    def drain(self) -> list[Any]:
        """Every update received and not yet taken, oldest first (without waiting)."""
        values: list[Any] = []
        while True:
            try:
                values.append(self._updates.get_nowait())
            except queue.Empty:
                return values

    def close(self) -> None:
        """Cancel the subscription (idempotent). Updates already queued stay readable."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            cancel, self._cancel = self._cancel, None
        try:
            if cancel is not None:
                cancel()
        finally:
            self._owner._forget_monitor(self)

    # Backend side -----------------------------------------------------------------------

    def _attach(self, cancel: Callable[[], None]) -> None:
        with self._lock:
            if not self._closed:
                self._cancel = cancel
                return
        cancel()

    def _deliver(self, value: Any) -> None:
        # Called on the backend's callback threads.
        self._received += 1
        self._updates.put(value)


# --------------------------------------------------------------------------------------------
# What both backends share: values, errors, waiting


class _NoReply(Exception):
    """Nothing (or not the awaited answer) came back in time; the text says what."""


class _Refused(Exception):
    """The IOC, or the client library, answered with an error; the text says what."""


@dataclass(frozen=True)
class _ChannelInfo:
    """A connected channel as the shared code needs it."""

    native_type: int
    count: int
    writable: bool
    handle: Any  # the backend's own channel object


def _number_kind(dbr_type: int) -> type:
    return float if dbr_type in (_FLOAT, _DOUBLE) else int


def _text(raw: Any) -> str:
    if isinstance(raw, str):
        return raw.split("\0", 1)[0]
    data = bytes(raw).split(b"\0", 1)[0]
    return data.decode("utf-8", errors="replace")


def _decode(elements: Sequence[Any], dbr_type: int, info: _ChannelInfo, as_string: bool) -> Any:
    """Raw elements of ``dbr_type`` as Python values (see :meth:`CAClient.get`)."""
    if as_string and dbr_type == _CHAR:
        return _text(bytes(int(e) & 0xFF for e in elements))
    items: list[Any]
    if dbr_type == _STRING:
        items = [_text(e) for e in elements]
    else:
        kind = _number_kind(dbr_type)
        items = [kind(e) for e in elements]
    if info.count == 1:
        return items[0] if items else None
    return items


def _read_type(info: _ChannelInfo, as_string: bool) -> int:
    if not as_string:
        return info.native_type
    if info.native_type == _CHAR and info.count > 1:
        return _CHAR  # a char waveform holds text; DBR_STRING would give one string per byte
    return _STRING


def _encode_text(value: str | bytes | bytearray) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def _encode(value: Any, info: _ChannelInfo) -> tuple[int, list[Any]]:
    """The DBR type and elements to send for ``value``; ``_Refused`` if it cannot go."""
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        value = value.tolist()
    if isinstance(value, (str, bytes, bytearray)):
        raw = _encode_text(value)
        if info.native_type == _CHAR and info.count > 1:
            if len(raw) >= info.count:
                raise _Refused(
                    f"not sent: {len(raw)} bytes and the NUL do not fit the char waveform "
                    f"of {info.count} elements"
                )
            return _CHAR, [*raw, 0]
        items: list[Any] = [value]
    elif isinstance(value, (list, tuple)):
        items = list(value)
        if not items:
            raise _Refused("not sent: an empty sequence")
        if len(items) > info.count:
            raise _Refused(f"not sent: {len(items)} elements, the PV holds at most {info.count}")
    else:
        items = [value]

    texts = [isinstance(item, (str, bytes, bytearray)) for item in items]
    if all(texts):
        return _STRING, [_checked_string(item) for item in items]
    if any(texts):
        raise _Refused("not sent: a mix of strings and numbers")
    for item in items:
        if isinstance(item, bool):
            continue
        if not isinstance(item, (int, float)):
            raise _Refused(f"not sent: {type(item).__name__} is not a CA value type")
    numbers = [int(item) if isinstance(item, bool) else item for item in items]

    native = info.native_type
    if native == _STRING:
        # The IOC parses the text, as it would from caput.
        return _STRING, [_checked_string(str(item)) for item in numbers]
    if native in (_FLOAT, _DOUBLE) or not all(float(n).is_integer() for n in numbers):
        # A fraction for an integer field: let the IOC convert it, as it would any DOUBLE.
        return _DOUBLE, [float(n) for n in numbers]
    if native not in _INTEGER_RANGES:
        return _DOUBLE, [float(n) for n in numbers]
    low, high = _INTEGER_RANGES[native]
    ints = [int(n) for n in numbers]
    for n in ints:
        if not low <= n <= high:
            raise _Refused(f"not sent: {n} is outside the PV's native range {low}..{high}")
    return native, ints


def _checked_string(item: str | bytes | bytearray) -> bytes:
    raw = _encode_text(item)
    if len(raw) >= _STRING_SIZE:
        raise _Refused(f"not sent: {len(raw)} bytes, a DBR_STRING holds at most {_STRING_SIZE - 1}")
    return raw


def _matches(actual: Any, expected: Any) -> bool:
    """Equality for wait_for: floats within a small tolerance, sequences element-wise."""
    if isinstance(expected, (list, tuple)):
        return (
            isinstance(actual, (list, tuple))
            and len(actual) == len(expected)
            and all(_matches(a, e) for a, e in zip(actual, expected))
        )
    numbers = (int, float)
    if (
        isinstance(expected, numbers)
        and isinstance(actual, numbers)
        and (isinstance(expected, float) or isinstance(actual, float))
    ):
        return math.isclose(actual, expected, rel_tol=_FLOAT_REL_TOL, abs_tol=_FLOAT_ABS_TOL)
    return bool(actual == expected)


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _alarm_names(status: int, severity: int) -> tuple[str, str]:
    sev = ALARM_SEVERITIES[severity] if 0 <= severity < len(ALARM_SEVERITIES) else None
    stat = ALARM_STATUSES[status] if 0 <= status < len(ALARM_STATUSES) else None
    return (sev or f"SEVERITY_{severity}", stat or f"STATUS_{status}")


_READ_ANSWER = "an answer to the read"
_PUT_COMPLETION = "the put's completion"


def _no_answer(awaited: str, timeout: float) -> str:
    return f"connected, but no {awaited} within {timeout:.3g} s"


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.0)


class _BoundClient:
    """The public API over four backend primitives: connect, read, write, subscribe."""

    backend = ""

    def __init__(self, host: str, ip: str, port: int, *, timeout: float, target: str | None) -> None:
        self.address = (host, port)
        self.timeout = timeout
        self.target = target
        self._ip = ip
        self._closed = False
        self._close_lock = threading.Lock()
        self._monitors: set[Monitor] = set()
        self._monitors_lock = threading.Lock()

    @property
    def where(self) -> str:
        """``host:port``, the only address this client talks to."""
        return f"{self.address[0]}:{self.address[1]}"

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<{type(self).__name__} {self.where}{state}>"

    def __enter__(self) -> _BoundClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # Errors -----------------------------------------------------------------------------

    @property
    def connect_hint(self) -> str:
        host, port = self.address
        return (
            f"is the IOC running and its CA port {port} published on {host}? "
            f"This client searches {host}:{port} only, never EPICS_CA_ADDR_LIST."
        )

    def error(self, cls: type[CAError], what: str, *, seen: str, hint: str | None = None) -> CAError:
        """An error naming the address and backend, for this client's target."""
        return cls(
            f"{what} (IOC at {self.where}, {self.backend} client)",
            target=self.target,
            seen=seen,
            hint=hint or self.connect_hint,
        )

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise self.error(
                CAError,
                what,
                seen="the client is closed",
                hint="the IOC was stopped or the client closed; make a new client",
            )

    def _connected(self, pv: str, what: str, timeout: float) -> _ChannelInfo:
        self._check_open(what)
        try:
            return self._connect(pv, timeout)
        except _NoReply as exc:
            raise self.error(CATimeoutError, what, seen=f"not connected: {exc}") from None

    def _timeout(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    # Public API -------------------------------------------------------------------------

    def get(self, pv: str, *, timeout: float | None = None, as_string: bool = False) -> Any:
        """The PV's value: a Python scalar for one element, a list for arrays.

        Numbers come back as ``float`` or ``int`` by the PV's native type, DBR_STRING as
        ``str``. ``as_string=True`` asks the IOC for its own string form (for an enum, the
        state name); a char waveform then reads as the text it holds.
        """
        deadline = time.monotonic() + self._timeout(timeout)
        what = f"could not get {pv!r}"
        info = self._connected(pv, what, _left(deadline))
        dbr_type = _read_type(info, as_string)
        try:
            elements = self._read(info, dbr_type, _left(deadline))
        except _NoReply as exc:
            raise self.error(CATimeoutError, what, seen=f"timeout: {exc}") from None
        except _Refused as exc:
            raise self.error(
                CAError,
                what,
                seen=f"rejected: {exc}",
                hint="the IOC refused the read: check the PV's read access (ASG)",
            ) from None
        return _decode(elements, dbr_type, info, as_string)

    def put(self, pv: str, value: Any, *, timeout: float | None = None) -> None:
        """Write ``value`` and wait until the IOC reports the put complete (put-callback).

        Strings go as DBR_STRING (the IOC converts them: enum state names, numbers), or as
        text into a char waveform; numbers in the PV's native type (DOUBLE for fractions).
        A refusal (no write access, a bad enum string, a server error) raises
        :class:`CAPutError` with what the IOC said.
        """
        deadline = time.monotonic() + self._timeout(timeout)
        what = f"could not put {_short_repr(value)} to {pv!r}"
        info = self._connected(pv, what, _left(deadline))
        if not info.writable:
            raise self.error(
                CAPutError,
                what,
                seen="rejected: the IOC grants this client read-only access (not sent)",
                hint="the PV is read-only for this client: check its access security (ASG)",
            )
        try:
            dbr_type, elements = _encode(value, info)
        except _Refused as exc:
            raise self.error(
                CAPutError,
                what,
                seen=str(exc),
                hint=f"the PV holds {info.count} element(s) of DBR type {info.native_type}; "
                "strings are at most 39 bytes",
            ) from None
        try:
            self._write(info, dbr_type, elements, _left(deadline))
        except _NoReply as exc:
            raise self.error(CATimeoutError, what, seen=f"timeout: {exc}") from None
        except _Refused as exc:
            raise self.error(
                CAPutError,
                what,
                seen=f"rejected: {exc}",
                hint="the IOC refused the value: check the PV's type, limits, enum states and "
                "access security, and the IOC's log",
            ) from None

    def alarm(self, pv: str, *, timeout: float | None = None) -> tuple[str, str]:
        """(severity, status) names, e.g. ``("NO_ALARM", "NO_ALARM")`` or ``("MAJOR", "HIHI")``."""
        deadline = time.monotonic() + self._timeout(timeout)
        what = f"could not read the alarm state of {pv!r}"
        info = self._connected(pv, what, _left(deadline))
        try:
            status, severity = self._read_alarm(info, _left(deadline))
        except _NoReply as exc:
            raise self.error(CATimeoutError, what, seen=f"timeout: {exc}") from None
        except _Refused as exc:
            raise self.error(CAError, what, seen=f"rejected: {exc}") from None
        return _alarm_names(status, severity)

    def exists(self, pv: str, *, timeout: float = 1.0) -> bool:
        """True when the PV connects within ``timeout`` seconds."""
        self._check_open(f"could not look for {pv!r}")
        try:
            self._connect(pv, timeout)
        except _NoReply:
            return False
        return True

    def monitor(self, pv: str) -> Monitor:
        """Subscribe to the PV's value and alarm changes (waits for the connection first)."""
        return self._open_monitor(pv, as_string=False, timeout=self.timeout)

    def wait_for(self, pv: str, expected: Any | Callable[[Any], bool], *, timeout: float = 10.0) -> Any:
        """Wait until the PV equals ``expected``, or the predicate returns true; return the value.

        Floats compare within a small relative tolerance, sequences element by element. A
        ``str`` expected value is compared with the IOC's string form (so an enum can be
        awaited by its state name). Raises CATimeoutError with the last value seen.
        """
        deadline = time.monotonic() + timeout
        if callable(expected):
            predicate: Callable[[Any], bool] = expected
            wanted = f"satisfy {getattr(expected, '__name__', repr(expected))}"
        else:
            predicate = functools.partial(_flipped_matches, expected)
            wanted = f"reach {_short_repr(expected)}"
        as_string = isinstance(expected, str)
        what = f"{pv!r} did not {wanted} within {timeout:g} s"
        last: list[Any] = []
        with self._open_monitor(pv, as_string=as_string, timeout=timeout, what=what) as updates:
            while True:
                remaining = _left(deadline)
                if remaining <= 0.0:
                    break
                try:
                    value = updates.next(timeout=min(remaining, 0.5))
                except CATimeoutError:
                    # Deadbands (MDEL) can hide a change from the monitor: read it directly.
                    try:
                        value = self.get(
                            pv, timeout=max(min(_left(deadline), 1.0), 0.05), as_string=as_string
                        )
                    except CATimeoutError:
                        continue  # disconnected for now: keep waiting
                last[:] = [value]
                if predicate(value):
                    return value
        seen = f"last value seen: {_short_repr(last[0])}" if last else "no value received"
        raise self.error(
            CATimeoutError,
            what,
            seen=seen,
            hint="the IOC answers but the value never matched: check the expected value, "
            "the records' processing (SCAN, links) and the IOC's log",
        )

    def close(self) -> None:
        """Close the monitors, then release sockets, threads and contexts (idempotent)."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        with self._monitors_lock:
            monitors = list(self._monitors)
        for monitor in monitors:
            try:
                monitor.close()
            except Exception:
                log.debug("closing %r failed", monitor, exc_info=True)
        self._shutdown()

    # Shared machinery -------------------------------------------------------------------

    def _open_monitor(self, pv: str, *, as_string: bool, timeout: float, what: str | None = None) -> Monitor:
        what = what or f"could not monitor {pv!r}"
        info = self._connected(pv, what, timeout)
        dbr_type = _read_type(info, as_string)
        monitor = Monitor(pv, self)

        def deliver(elements: Sequence[Any]) -> None:
            monitor._deliver(_decode(elements, dbr_type, info, as_string))

        with self._monitors_lock:
            self._monitors.add(monitor)
        try:
            monitor._attach(self._subscribe(info, dbr_type, deliver))
        except _Refused as exc:
            monitor.close()
            raise self.error(CAError, what, seen=f"rejected: {exc}") from None
        except BaseException:
            monitor.close()
            raise
        return monitor

    def _forget_monitor(self, monitor: Monitor) -> None:
        """Called by a closing monitor."""
        with self._monitors_lock:
            self._monitors.discard(monitor)

    # Backend primitives -----------------------------------------------------------------

    def _connect(self, pv: str, timeout: float) -> _ChannelInfo:
        """The connected channel; ``_NoReply`` saying why not within ``timeout``."""
        raise NotImplementedError

    def _read(self, info: _ChannelInfo, dbr_type: int, timeout: float) -> Sequence[Any]:
        raise NotImplementedError

    def _read_alarm(self, info: _ChannelInfo, timeout: float) -> tuple[int, int]:
        """(status, severity) numbers."""
        raise NotImplementedError

    def _write(self, info: _ChannelInfo, dbr_type: int, elements: list[Any], timeout: float) -> None:
        raise NotImplementedError

    def _subscribe(
        self, info: _ChannelInfo, dbr_type: int, sink: Callable[[Sequence[Any]], None]
    ) -> Callable[[], None]:
        """Start a DBE_VALUE|DBE_ALARM subscription feeding ``sink``; return its cancel."""
        raise NotImplementedError

    def _shutdown(self) -> None:
        raise NotImplementedError


def _flipped_matches(expected: Any, actual: Any) -> bool:
    return _matches(actual, expected)


# --------------------------------------------------------------------------------------------
# caproto backend


@functools.cache
def _caproto() -> Any:
    """caproto, imported on first use (it pulls in numpy: keep plugin start-up quick)."""
    return importlib.import_module("caproto")


@functools.cache
def _caproto_classes() -> tuple[type, type]:
    """The bound broadcaster and context classes (see the module docstring)."""
    from caproto.threading.client import (  # type: ignore[import-untyped]
        Context,
        SharedBroadcaster,
        VirtualCircuitManager,
    )

    ca = _caproto()

    class BoundBroadcaster(SharedBroadcaster):  # type: ignore[misc]
        """A SharedBroadcaster that searches one address and listens to that host only.

        caproto sends each search datagram to ``ca.get_client_address_list()``, which it
        rebuilds from ``os.environ`` every time; ``send`` is the single place datagrams leave,
        so overriding it is enough to stop the environment from choosing where they go.
        """

        def __init__(self, ip: str, port: int) -> None:
            # Set before SharedBroadcaster.__init__, which starts threads that send.
            self.bound_ip = ip
            self.bound_port = port
            super().__init__(registration_retry_time=None)

        def _register(self) -> None:
            # caproto registers with a CA repeater (at its guess of the local address) to
            # hear beacons. A bound client needs none (circuit echoes detect a dead IOC) and
            # must not talk to any other address, so only let searching start.
            self._searching_enabled.set()

        def send(self, *commands: Any) -> None:
            payload = self.broadcaster.send(*commands)
            sock = self.udp_sock
            if sock is None:
                return
            try:
                sock.sendto(payload, (self.bound_ip, self.bound_port))
            except OSError as exc:
                # caproto raises here, which would end its search-retry thread.
                log.debug("search to %s:%d failed: %s", self.bound_ip, self.bound_port, exc)

        def received(self, bytes_recv: bytes, address: tuple[str, int] | None) -> int:
            if not bytes_recv or address is None:
                return 0  # the socket is being removed
            if address[0] != self.bound_ip:
                log.debug("ignoring a datagram from %s:%d", *address)
                return 0
            commands = [self._pinned(c) for c in self.broadcaster.recv(bytes_recv, address)]
            if commands:
                self.command_bundle_queue.put(commands)
            return 0

        def disconnect(self, *, wait: bool = True) -> None:
            # Close the socket now, but do not join caproto's threads: they poll their stop
            # flag every 0.5 s, the search-retry thread only after its back-off (up to 5 s),
            # so a joined close() would take that long. Waking the retry thread lets them
            # all end within about half a second by themselves (they are daemons).
            super().disconnect(wait=False)
            self.search_now()

        def _pinned(self, command: Any) -> Any:
            # A search reply may name another address for the TCP circuit (a server bound to
            # its own interface, e.g. a guest's 10.0.2.15): connect to the bound host instead,
            # on the port the reply gives (the IOC's, published as the same number).
            if isinstance(command, ca.SearchResponse):
                return ca.SearchResponse(command.port, self.bound_ip, command.cid, command.version)
            return command

    class FailingIoCircuitManager(VirtualCircuitManager):  # type: ignore[misc]
        """Wakes a waiting read or put when the server answers it with an ErrorResponse.

        caproto's threading client does not match ErrorResponse to the pending request, so a
        put that the server refuses (e.g. caproto's own server when a putter raises) would
        only time out. The response is handed to the waiter, which reports it.
        """

        __slots__ = ()

        def _process_command(self, command: Any) -> None:
            super()._process_command(command)
            if isinstance(command, ca.ErrorResponse):
                request = command.original_request
                if request.command in (ca.ReadNotifyRequest.ID, ca.WriteNotifyRequest.ID):
                    ioid_info = self.ioids.pop(request.parameter2, None)
                    if ioid_info is not None:
                        ioid_info["response"] = command
                        event = ioid_info.get("event")
                        if event is not None:
                            event.set()

    class BoundContext(Context):  # type: ignore[misc]
        """A caproto Context whose circuits report server errors to the waiting call."""

        def __init__(self, broadcaster: Any, timeout: float) -> None:
            self._bound_circuit_lock = threading.RLock()
            super().__init__(broadcaster, timeout=timeout)

        def get_circuit_manager(self, address: tuple[str, int], priority: int) -> Any:
            with self._bound_circuit_lock:
                manager = self.circuit_managers.get((address, priority))
                if manager is None or manager.dead.is_set():
                    circuit = ca.VirtualCircuit(
                        our_role=ca.CLIENT,
                        address=address,
                        priority=priority,
                        protocol_version=self.broadcaster.server_protocol_versions[address],
                    )
                    manager = FailingIoCircuitManager(self, circuit, self.selector)
                    self.circuit_managers[(address, priority)] = manager
                return manager

    return BoundBroadcaster, BoundContext


def _caproto_elements(response: Any) -> list[Any]:
    data = response.data
    if hasattr(data, "tolist"):
        return list(data.tolist())
    return list(data)


def _caproto_refusal(response: Any) -> str | None:
    """What an ErrorResponse (or a failed completion) said; None for success."""
    ca = _caproto()
    if isinstance(response, ca.ErrorResponse):
        code = getattr(response.status, "value", response.status)  # CAStatus or CAStatusCode
        message = _text(response.error_message).strip()
        text = f"{code.name} ({code.description})"
        return f"{text}: {message}" if message else text
    status = getattr(response, "status", None)
    code = getattr(status, "value", status)
    if code is not None and not code.success:
        return f"{code.name} ({code.description})"
    return None


class _CaprotoSubscription:
    """One callback on a caproto subscription, kept alive until cancelled.

    caproto holds callbacks by weak reference only; the bound ``cancel`` method the monitor
    keeps holds this object, and so the callback.
    """

    def __init__(self, subscription: Any, sink: Callable[[Sequence[Any]], None], pv: str) -> None:
        self._subscription = subscription
        self._sink = sink
        self._pv = pv
        self._token = subscription.add_callback(self._on_update)

    def _on_update(self, sub: Any, response: Any) -> None:
        try:
            self._sink(_caproto_elements(response))
        except Exception:
            log.exception("a monitor update of %s could not be decoded", self._pv)

    def cancel(self) -> None:
        self._subscription.remove_callback(self._token)


class CaprotoClient(_BoundClient):
    """The caproto threading client, bound to one address (see the module docstring)."""

    backend = "caproto"

    def __init__(self, host: str, ip: str, port: int, *, timeout: float, target: str | None) -> None:
        super().__init__(host, ip, port, timeout=timeout, target=target)
        broadcaster_class, context_class = _caproto_classes()
        self._broadcaster = broadcaster_class(ip, port)
        try:
            self._context = context_class(self._broadcaster, timeout)
        except BaseException:
            self._broadcaster.disconnect(wait=False)
            raise

    def _connect(self, pv: str, timeout: float) -> _ChannelInfo:
        ca = _caproto()
        (handle,) = self._context.get_pvs(pv, timeout=timeout)
        deadline = time.monotonic() + timeout
        while not handle.connected:
            # Restart caproto's search back-off every quarter second: an IOC that is still
            # starting (a readiness poll) is found soon after it answers. The searches go to
            # the one bound address only.
            self._broadcaster.search_now()
            try:
                handle.wait_for_connection(timeout=min(_left(deadline), 0.25))
            except ca.CaprotoTimeoutError:
                if _left(deadline) > 0.0:
                    continue
                if handle.circuit_ready.is_set():
                    raise _NoReply(
                        f"the IOC answered the search but the channel did not connect within {timeout:.3g} s"
                    ) from None
                raise _NoReply(f"no reply to the search within {timeout:.3g} s") from None
        channel = handle.channel
        rights = handle.access_rights or 0
        return _ChannelInfo(
            native_type=int(channel.native_data_type),
            count=int(channel.native_data_count),
            writable=bool(rights & ca.AccessRights.WRITE),
            handle=handle,
        )

    def _io(self, call: Callable[[], T], awaited: str, timeout: float) -> T:
        try:
            return call()
        except _caproto().CaprotoTimeoutError:
            raise _NoReply(_no_answer(awaited, timeout)) from None

    def _read(self, info: _ChannelInfo, dbr_type: int, timeout: float) -> Sequence[Any]:
        ca = _caproto()
        response = self._io(
            lambda: info.handle.read(data_type=ca.ChannelType(dbr_type), timeout=timeout),
            _READ_ANSWER,
            timeout,
        )
        refusal = _caproto_refusal(response)
        if refusal:
            raise _Refused(refusal)
        return _caproto_elements(response)

    def _read_alarm(self, info: _ChannelInfo, timeout: float) -> tuple[int, int]:
        ca = _caproto()
        response = self._io(
            lambda: info.handle.read(data_type=ca.ChannelType(_STS_STRING), timeout=timeout),
            _READ_ANSWER,
            timeout,
        )
        refusal = _caproto_refusal(response)
        if refusal:
            raise _Refused(refusal)
        return int(response.metadata.status), int(response.metadata.severity)

    def _write(self, info: _ChannelInfo, dbr_type: int, elements: list[Any], timeout: float) -> None:
        ca = _caproto()
        response = self._io(
            lambda: info.handle.write(
                elements,
                data_type=ca.ChannelType(dbr_type),
                data_count=len(elements),
                wait=True,
                notify=True,
                timeout=timeout,
            ),
            _PUT_COMPLETION,
            timeout,
        )
        refusal = _caproto_refusal(response)
        if refusal:
            raise _Refused(refusal)

    def _subscribe(
        self, info: _ChannelInfo, dbr_type: int, sink: Callable[[Sequence[Any]], None]
    ) -> Callable[[], None]:
        ca = _caproto()
        subscription = info.handle.subscribe(data_type=ca.ChannelType(dbr_type), mask=_MONITOR_MASK)
        return _CaprotoSubscription(subscription, sink, info.handle.name).cancel

    def _shutdown(self) -> None:
        # Stop the two selector threads first (each polls every 0.1 s): a socket closed under
        # a running select makes caproto log a spurious "Bad file descriptor" error.
        selectors = (self._context.selector, self._broadcaster.selector)
        for selector in selectors:
            selector.stop()
        for selector in selectors:
            selector.thread.join(timeout=1.0)
        # Sockets and circuits close here; caproto's other threads end by themselves shortly.
        self._context.disconnect(wait=False)


# --------------------------------------------------------------------------------------------
# pyepics (libca) backend

#: Held while a libca context is created with the CA variables in ``os.environ`` set to one
#: IOC's address (and restored after). Other code that changes those variables while libca
#: clients may be starting can hold it too.
LIBCA_ENVIRONMENT_LOCK = threading.Lock()

_CA_NORMAL = 1  # ECA_NORMAL
_CA_OP_CONN_UP = 6
_CHANNEL_CTYPES: dict[int, Any] = {
    _SHORT: ctypes.c_int16,
    _FLOAT: ctypes.c_float,
    _ENUM: ctypes.c_uint16,
    _CHAR: ctypes.c_uint8,
    _LONG: ctypes.c_int32,
    _DOUBLE: ctypes.c_double,
}


class _EventArgs(ctypes.Structure):
    """``struct event_handler_args`` (db_access.h / cadef.h)."""

    _fields_ = [
        ("usr", ctypes.c_void_p),
        ("chid", ctypes.c_void_p),
        ("type", ctypes.c_long),
        ("count", ctypes.c_long),
        ("dbr", ctypes.c_void_p),
        ("status", ctypes.c_int),
    ]


class _ConnectionArgs(ctypes.Structure):
    """``struct connection_handler_args``."""

    _fields_ = [("chid", ctypes.c_void_p), ("op", ctypes.c_long)]


_EVENT_CALLBACK = ctypes.CFUNCTYPE(None, _EventArgs)
_CONNECTION_CALLBACK = ctypes.CFUNCTYPE(None, _ConnectionArgs)

# libca gets an integer token as its user argument, never a Python object: a callback that
# arrives after its waiter gave up finds no handler and is dropped, with nothing dangling.
_handlers: dict[int, Callable[[Any], None]] = {}
_handlers_lock = threading.Lock()
_tokens = itertools.count(1)


def _register_handler(handler: Callable[[Any], None]) -> int:
    token = next(_tokens)
    with _handlers_lock:
        _handlers[token] = handler
    return token


def _unregister_handler(token: int) -> None:
    with _handlers_lock:
        _handlers.pop(token, None)


def _dispatch(token: int | None, args: Any) -> None:
    with _handlers_lock:
        handler = _handlers.get(token or 0)
    if handler is None:
        return
    try:
        handler(args)
    except Exception:  # an exception must not cross back into libca
        log.exception("libca callback failed")


def _on_event(args: _EventArgs) -> None:
    _dispatch(args.usr, args)


def _on_connection(args: _ConnectionArgs) -> None:
    _dispatch(_libca().ca_puser(args.chid), args)


_ON_EVENT = _EVENT_CALLBACK(_on_event)
_ON_CONNECTION = _CONNECTION_CALLBACK(_on_connection)


def _import_pyepics_ca(target: str | None) -> Any:
    try:
        return importlib.import_module("epics.ca")
    except ImportError as exc:
        raise CAError(
            "the pyepics Channel Access backend needs pyepics, which is not installed",
            target=target,
            seen=f"ImportError: {exc}",
            hint=PYEPICS_HINT,
        ) from None


@functools.cache
def _libca() -> Any:
    """libca as pyepics ships it, with the prototypes this module uses.

    The library is opened through its own ctypes handle: pyepics's module state (its
    initial context, channel caches, atexit clean-up) is left untouched.
    """
    epics_ca = importlib.import_module("epics.ca")
    lib = ctypes.CDLL(str(epics_ca.find_libca()))
    prototypes: dict[str, tuple[Any, list[Any]]] = {
        "ca_context_create": (ctypes.c_int, [ctypes.c_int]),
        "ca_context_destroy": (None, []),
        "ca_create_channel": (
            ctypes.c_int,
            [ctypes.c_char_p, _CONNECTION_CALLBACK, ctypes.c_void_p, ctypes.c_int,
             ctypes.POINTER(ctypes.c_void_p)],
        ),
        "ca_clear_channel": (ctypes.c_int, [ctypes.c_void_p]),
        "ca_puser": (ctypes.c_void_p, [ctypes.c_void_p]),
        "ca_field_type": (ctypes.c_short, [ctypes.c_void_p]),
        "ca_element_count": (ctypes.c_ulong, [ctypes.c_void_p]),
        "ca_write_access": (ctypes.c_uint, [ctypes.c_void_p]),
        "ca_array_get_callback": (
            ctypes.c_int,
            [ctypes.c_long, ctypes.c_ulong, ctypes.c_void_p, _EVENT_CALLBACK, ctypes.c_void_p],
        ),
        "ca_array_put_callback": (
            ctypes.c_int,
            [ctypes.c_long, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_void_p, _EVENT_CALLBACK,
             ctypes.c_void_p],
        ),
        "ca_create_subscription": (
            ctypes.c_int,
            [ctypes.c_long, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_long, _EVENT_CALLBACK,
             ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)],
        ),
        "ca_clear_subscription": (ctypes.c_int, [ctypes.c_void_p]),
        "ca_flush_io": (ctypes.c_int, []),
        "ca_message": (ctypes.c_char_p, [ctypes.c_long]),
    }  # fmt: skip
    for name, (restype, argtypes) in prototypes.items():
        function = getattr(lib, name)
        function.restype = restype
        function.argtypes = argtypes
    return lib


def _ca_message(status: int) -> str:
    raw = _libca().ca_message(status)
    return raw.decode(errors="replace") if raw else f"CA status {status}"


def _elements_at(address: int | None, dbr_type: int, count: int) -> list[Any]:
    """Copy ``count`` elements of ``dbr_type`` out of a libca buffer (host byte order)."""
    if not address or count <= 0:
        return []
    if dbr_type == _STRING:
        raw = ctypes.string_at(address, _STRING_SIZE * count)
        return [raw[i * _STRING_SIZE : (i + 1) * _STRING_SIZE] for i in range(count)]
    array_type = _CHANNEL_CTYPES[dbr_type] * count
    return list(array_type.from_address(address))


def _put_buffer(dbr_type: int, elements: list[Any]) -> Any:
    if dbr_type == _STRING:
        buffer = ctypes.create_string_buffer(_STRING_SIZE * len(elements))
        for i, raw in enumerate(elements):
            ctypes.memmove(ctypes.addressof(buffer) + i * _STRING_SIZE, raw, len(raw))
        return buffer
    return (_CHANNEL_CTYPES[dbr_type] * len(elements))(*elements)


@contextmanager
def _environment(values: dict[str, str | None]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}

    def apply(settings: dict[str, str | None]) -> None:
        for name, value in settings.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    apply(values)
    try:
        yield
    finally:
        apply(saved)


class _LibcaThread:
    """One thread that owns a libca context and runs every call made on it, in order."""

    def __init__(self, ip: str, port: int) -> None:
        self._ip = ip
        self._port = port
        self._calls: queue.Queue[tuple[Callable[[], Any], Future[Any]] | None] = queue.Queue()
        self._started: Future[None] = Future()
        self._stopping = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"libca-{ip}:{port}", daemon=True)
        self._thread.start()
        self._started.result()

    @property
    def running(self) -> bool:
        return not self._stopping and self._thread.is_alive()

    def call(self, function: Callable[[], T]) -> T:
        """Run ``function`` on the context's thread and return its result."""
        future: Future[T] = Future()
        with self._lock:
            # Nothing is queued after the stop marker, so every queued call gets an answer.
            if not self.running:
                raise _NoReply("the client was closed")
            self._calls.put((function, future))
        return future.result()

    def stop(self) -> None:
        """Destroy the context (closing its channels and sockets) and end the thread."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            self._calls.put(None)
        self._thread.join()

    def _run(self) -> None:
        lib = _libca()
        try:
            self._create_context(lib)
        except BaseException as exc:
            self._started.set_exception(exc)
            return
        self._started.set_result(None)
        try:
            while True:
                item = self._calls.get()
                if item is None:
                    break
                function, future = item
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(function())
                    except BaseException as exc:
                        future.set_exception(exc)
        finally:
            lib.ca_context_destroy()

    def _create_context(self, lib: Any) -> None:
        # libca reads EPICS_CA_SERVER_PORT and EPICS_CA_NAME_SERVERS when the context is
        # created (cac::cac), EPICS_CA_ADDR_LIST and EPICS_CA_AUTO_ADDR_LIST when its first
        # channel is (udpiiu::udpiiu, built lazily in cac::createChannel). Both happen here,
        # with the environment naming only this IOC; other threads' contexts are unaffected.
        bound = {
            "EPICS_CA_ADDR_LIST": f"{self._ip}:{self._port}",
            "EPICS_CA_AUTO_ADDR_LIST": "NO",
            "EPICS_CA_NAME_SERVERS": None,
            "EPICS_CA_SERVER_PORT": str(self._port),
        }
        with LIBCA_ENVIRONMENT_LOCK, _environment(bound):
            status = lib.ca_context_create(1)  # preemptive callbacks: no polling needed
            if status != _CA_NORMAL:
                raise RuntimeError(f"ca_context_create: {_ca_message(status)}")
            primer = ctypes.c_void_p()
            status = lib.ca_create_channel(
                b"pytest-epics-multiarch:search-list-primer",
                _CONNECTION_CALLBACK(),  # NULL: no connection callback
                None,
                0,
                ctypes.byref(primer),
            )
            if status != _CA_NORMAL:
                lib.ca_context_destroy()
                raise RuntimeError(f"ca_create_channel: {_ca_message(status)}")
            lib.ca_clear_channel(primer)


@dataclass
class _LibcaChannel:
    name: str
    chid: int
    token: int
    connected: threading.Event
    ever_connected: bool = False


_live_libca_clients: weakref.WeakSet[PyepicsClient] = weakref.WeakSet()


@atexit.register
def _close_libca_clients() -> None:
    # libca threads must not call back into a finalising interpreter.
    for client in list(_live_libca_clients):
        try:
            client.close()
        except Exception:
            pass


class PyepicsClient(_BoundClient):
    """libca (as pyepics ships it) with a context of its own (see the module docstring).

    Every libca call runs on the client's :class:`_LibcaThread`, the one thread attached to
    the context; callers wait on events that libca's callback threads set. Closing destroys
    the context, which closes its channels, subscriptions and sockets.
    """

    backend = "pyepics"

    def __init__(self, host: str, ip: str, port: int, *, timeout: float, target: str | None) -> None:
        super().__init__(host, ip, port, timeout=timeout, target=target)
        self._channels: dict[str, _LibcaChannel] = {}
        self._channels_lock = threading.Lock()
        try:
            self._lib = _libca()
            self._thread = _LibcaThread(ip, port)
        except Exception as exc:
            raise CAError(
                "could not create a libca context for the pyepics backend",
                target=target,
                seen=f"{type(exc).__name__}: {exc}",
                hint=f"is pyepics's libca usable on this machine? ({PYEPICS_HINT})",
            ) from exc
        _live_libca_clients.add(self)

    # Channels ---------------------------------------------------------------------------

    def _channel(self, pv: str) -> _LibcaChannel:
        with self._channels_lock:
            old = self._channels.get(pv)
            if old is not None and (old.ever_connected or old.connected.is_set()):
                return old  # libca reconnects a channel that dropped by itself
            if old is not None:
                # Never connected: libca has backed its searches off by now. A new channel
                # is searched for at the fastest rate again, which readiness polls rely on.
                self._thread.call(lambda: self._lib.ca_clear_channel(old.chid))
                _unregister_handler(old.token)
            channel: _LibcaChannel = self._thread.call(lambda: self._create_channel(pv))
            self._channels[pv] = channel
            return channel

    def _create_channel(self, pv: str) -> _LibcaChannel:
        channel = _LibcaChannel(pv, 0, 0, threading.Event())

        def on_connection(args: _ConnectionArgs) -> None:
            if args.op == _CA_OP_CONN_UP:
                channel.ever_connected = True
                channel.connected.set()
            else:
                channel.connected.clear()

        channel.token = _register_handler(on_connection)
        chid = ctypes.c_void_p()
        status = self._lib.ca_create_channel(
            pv.encode(), _ON_CONNECTION, ctypes.c_void_p(channel.token), 0, ctypes.byref(chid)
        )
        if status != _CA_NORMAL:
            _unregister_handler(channel.token)
            raise _NoReply(f"libca refused to create the channel: {_ca_message(status)}")
        self._lib.ca_flush_io()
        channel.chid = int(chid.value or 0)
        return channel

    def _connect(self, pv: str, timeout: float) -> _ChannelInfo:
        channel = self._channel(pv)
        if not channel.connected.wait(timeout):
            raise _NoReply(f"no reply to the search within {timeout:.3g} s")

        def describe() -> _ChannelInfo:
            lib = self._lib
            return _ChannelInfo(
                native_type=int(lib.ca_field_type(channel.chid)),
                count=int(lib.ca_element_count(channel.chid)),
                writable=bool(lib.ca_write_access(channel.chid)),
                handle=channel,
            )

        info = self._thread.call(describe)
        if info.native_type < 0:  # TYPENOTCONN: it dropped in between
            raise _NoReply("the channel disconnected while connecting")
        return info

    # I/O --------------------------------------------------------------------------------

    def _request(
        self,
        issue: Callable[[int], int],
        decode: Callable[[_EventArgs], Any],
        awaited: str,
        timeout: float,
    ) -> Any:
        """Issue one callback request on the context's thread and wait for its answer."""
        done = threading.Event()
        answer: list[Any] = []

        def on_answer(args: _EventArgs) -> None:
            if args.status != _CA_NORMAL:
                answer.append(_Refused(_ca_message(args.status)))
            else:
                answer.append(decode(args))
            done.set()

        token = _register_handler(on_answer)
        try:

            def send() -> int:
                status = issue(token)
                if status == _CA_NORMAL:
                    self._lib.ca_flush_io()
                return int(status)

            status = self._thread.call(send)
            if status != _CA_NORMAL:
                raise _Refused(_ca_message(status))
            if not done.wait(timeout):
                raise _NoReply(_no_answer(awaited, timeout))
        finally:
            _unregister_handler(token)
        result = answer[0]
        if isinstance(result, _Refused):
            raise result
        return result

    def _read(self, info: _ChannelInfo, dbr_type: int, timeout: float) -> Sequence[Any]:
        chid = info.handle.chid

        def issue(token: int) -> int:
            return int(self._lib.ca_array_get_callback(dbr_type, 0, chid, _ON_EVENT, ctypes.c_void_p(token)))

        def decode(args: _EventArgs) -> list[Any]:
            return _elements_at(args.dbr, dbr_type, int(args.count))

        result: list[Any] = self._request(issue, decode, _READ_ANSWER, timeout)
        return result

    def _read_alarm(self, info: _ChannelInfo, timeout: float) -> tuple[int, int]:
        chid = info.handle.chid

        def issue(token: int) -> int:
            return int(
                self._lib.ca_array_get_callback(_STS_STRING, 1, chid, _ON_EVENT, ctypes.c_void_p(token))
            )

        def decode(args: _EventArgs) -> tuple[int, int]:
            # Every DBR_STS_* begins with two dbr_short_t: status, severity.
            if not args.dbr:
                raise _Refused("libca delivered no data")
            status, severity = struct.unpack("=hh", ctypes.string_at(args.dbr, 4))
            return int(status), int(severity)

        result: tuple[int, int] = self._request(issue, decode, _READ_ANSWER, timeout)
        return result

    def _write(self, info: _ChannelInfo, dbr_type: int, elements: list[Any], timeout: float) -> None:
        chid = info.handle.chid
        buffer = _put_buffer(dbr_type, elements)

        def issue(token: int) -> int:
            # libca copies the value into its send queue before returning.
            return int(
                self._lib.ca_array_put_callback(
                    dbr_type,
                    len(elements),
                    chid,
                    ctypes.cast(buffer, ctypes.c_void_p),
                    _ON_EVENT,
                    ctypes.c_void_p(token),
                )
            )

        self._request(issue, lambda args: None, _PUT_COMPLETION, timeout)

    def _subscribe(
        self, info: _ChannelInfo, dbr_type: int, sink: Callable[[Sequence[Any]], None]
    ) -> Callable[[], None]:
        chid = info.handle.chid

        def on_update(args: _EventArgs) -> None:
            if args.status == _CA_NORMAL:
                sink(_elements_at(args.dbr, dbr_type, int(args.count)))

        token = _register_handler(on_update)

        def create() -> int:
            event_id = ctypes.c_void_p()
            status = self._lib.ca_create_subscription(
                dbr_type, 0, chid, _MONITOR_MASK, _ON_EVENT, ctypes.c_void_p(token),
                ctypes.byref(event_id),
            )  # fmt: skip
            if status != _CA_NORMAL:
                raise _Refused(f"ca_create_subscription: {_ca_message(status)}")
            self._lib.ca_flush_io()
            return int(event_id.value or 0)

        try:
            event_id = self._thread.call(create)
        except BaseException:
            _unregister_handler(token)
            raise

        def cancel() -> None:
            try:
                if self._thread.running:
                    self._thread.call(lambda: self._lib.ca_clear_subscription(event_id))
            finally:
                _unregister_handler(token)

        return cancel

    def _shutdown(self) -> None:
        _live_libca_clients.discard(self)
        self._thread.stop()  # ca_context_destroy clears the channels with the context
        with self._channels_lock:
            for channel in self._channels.values():
                _unregister_handler(channel.token)
            self._channels.clear()


# --------------------------------------------------------------------------------------------
# Factory


def _ipv4(host: str) -> str:
    try:
        socket.inet_aton(host)
        return host
    except OSError:
        return socket.gethostbyname(host)


def make_ca_client(
    backend: str,
    host: str,
    port: int,
    *,
    timeout: float = 5.0,
    target: str | None = None,
) -> CAClient:
    """A Channel Access client that searches ``host:port`` and nothing else.

    ``backend`` is ``"caproto"`` (the threading client) or ``"pyepics"`` (libca); ``timeout``
    is the default for get, put and alarm; ``target`` (e.g. ``"linux/amd64"``) heads every
    error the client raises.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown Channel Access backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if not 0 < port < 65536:
        raise ValueError(f"CA port {port} is not a port number (1-65535)")
    if timeout <= 0:
        raise ValueError(f"CA timeout must be positive, got {timeout}")
    ip = _ipv4(host)
    if backend == "pyepics":
        _import_pyepics_ca(target)
        return PyepicsClient(host, ip, port, timeout=timeout, target=target)
    return CaprotoClient(host, ip, port, timeout=timeout, target=target)
