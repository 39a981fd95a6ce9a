"""What both backends share: the public client API over four primitives, monitors, errors.

:class:`BoundClient` implements :class:`~pytest_epics_multiarch.ca.CAClient` (deadlines,
value conversion, waiting, the error texts) on top of what a backend provides: connect, read,
write and subscribe. A backend reports failures to it as :class:`NoReply` (nothing, or not
the awaited answer, came back in time) or :class:`Refused` (the IOC or the client library
answered with an error), and the shared code turns them into the plugin's errors.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import Any

from ..errors import CAError, CAPutError, CATimeoutError
from .values import ChannelInfo, Unsendable, alarm_names, decode, encode, matches, read_type

#: The logger of every module of the package.
log = logging.getLogger("pytest_epics_multiarch.ca")

MONITOR_MASK = 1 | 4  # DBE_VALUE | DBE_ALARM

READ_ANSWER = "an answer to the read"
PUT_COMPLETION = "the put's completion"


class NoReply(Exception):
    """Nothing (or not the awaited answer) came back in time; the text says what."""


class Refused(Exception):
    """The IOC, or the client library, answered with an error; the text says what."""


def no_answer(awaited: str, timeout: float) -> str:
    """The :class:`NoReply` text for a request that went unanswered."""
    return f"connected, but no {awaited} within {timeout:.3g} s"


def no_search_reply(timeout: float) -> str:
    """The :class:`NoReply` text for a channel that no server claimed."""
    return f"no reply to the search within {timeout:.3g} s"


def time_left(deadline: float) -> float:
    """Seconds until the ``time.monotonic()`` deadline, never negative."""
    return max(deadline - time.monotonic(), 0.0)


def _flipped_matches(expected: Any, actual: Any) -> bool:
    return matches(actual, expected)


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Monitor:
    """Updates of one PV (value or alarm changes), queued as they arrive.

    The first update is the value at subscription time. Use as a context manager, or call
    :meth:`close`; closing the client closes its monitors too.
    """

    def __init__(self, pv: str, owner: BoundClient) -> None:
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


class BoundClient:
    """The public API over four backend primitives: connect, read, write, subscribe."""

    backend = ""

    def __init__(self, host: str, port: int, *, timeout: float, target: str | None) -> None:
        self.address = (host, port)
        self.timeout = timeout
        self.target = target
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

    def __enter__(self) -> BoundClient:
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

    @contextmanager
    def _answered(
        self, what: str, *, refused: type[CAError] = CAError, hint: str | None = None
    ) -> Iterator[None]:
        """Report a request's :class:`NoReply` as a timeout, its :class:`Refused` as ``refused``."""
        try:
            yield
        except NoReply as exc:
            raise self.error(CATimeoutError, what, seen=f"timeout: {exc}") from None
        except Refused as exc:
            raise self.error(refused, what, seen=f"rejected: {exc}", hint=hint) from None

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise self.error(
                CAError,
                what,
                seen="the client is closed",
                hint="the IOC was stopped or the client closed; make a new client",
            )

    def _connected(self, pv: str, what: str, timeout: float) -> ChannelInfo:
        self._check_open(what)
        try:
            return self._connect(pv, timeout)
        except NoReply as exc:
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
        info = self._connected(pv, what, time_left(deadline))
        dbr_type = read_type(info, as_string)
        with self._answered(what, hint="the IOC refused the read: check the PV's read access (ASG)"):
            elements = self._read(info, dbr_type, time_left(deadline))
        return decode(elements, dbr_type, info, as_string)

    def put(self, pv: str, value: Any, *, timeout: float | None = None) -> None:
        """Write ``value`` and wait until the IOC reports the put complete (put-callback).

        Strings go as DBR_STRING (the IOC converts them: enum state names, numbers), or as
        text into a char waveform; numbers in the PV's native type (DOUBLE for fractions).
        A refusal (no write access, a bad enum string, a server error) raises
        :class:`CAPutError` with what the IOC said.
        """
        deadline = time.monotonic() + self._timeout(timeout)
        what = f"could not put {_short_repr(value)} to {pv!r}"
        info = self._connected(pv, what, time_left(deadline))
        if not info.writable:
            raise self.error(
                CAPutError,
                what,
                seen="rejected: the IOC grants this client read-only access (not sent)",
                hint="the PV is read-only for this client: check its access security (ASG)",
            )
        try:
            dbr_type, elements = encode(value, info)
        except Unsendable as exc:
            raise self.error(
                CAPutError,
                what,
                seen=str(exc),
                hint=f"the PV holds {info.count} element(s) of DBR type {info.native_type}; "
                "strings are at most 39 bytes",
            ) from None
        with self._answered(
            what,
            refused=CAPutError,
            hint="the IOC refused the value: check the PV's type, limits, enum states and "
            "access security, and the IOC's log",
        ):
            self._write(info, dbr_type, elements, time_left(deadline))

    def alarm(self, pv: str, *, timeout: float | None = None) -> tuple[str, str]:
        """(severity, status) names, e.g. ``("NO_ALARM", "NO_ALARM")`` or ``("MAJOR", "HIHI")``."""
        deadline = time.monotonic() + self._timeout(timeout)
        what = f"could not read the alarm state of {pv!r}"
        info = self._connected(pv, what, time_left(deadline))
        with self._answered(what):
            status, severity = self._read_alarm(info, time_left(deadline))
        return alarm_names(status, severity)

    def exists(self, pv: str, *, timeout: float = 1.0) -> bool:
        """True when the PV connects within ``timeout`` seconds."""
        self._check_open(f"could not look for {pv!r}")
        try:
            self._connect(pv, timeout)
        except NoReply:
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
                remaining = time_left(deadline)
                if remaining <= 0.0:
                    break
                try:
                    value = updates.next(timeout=min(remaining, 0.5))
                except CATimeoutError:
                    # Deadbands (MDEL) can hide a change from the monitor: read it directly.
                    try:
                        value = self.get(
                            pv, timeout=max(min(time_left(deadline), 1.0), 0.05), as_string=as_string
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
        dbr_type = read_type(info, as_string)
        monitor = Monitor(pv, self)

        def deliver(elements: Sequence[Any]) -> None:
            monitor._deliver(decode(elements, dbr_type, info, as_string))

        with self._monitors_lock:
            self._monitors.add(monitor)
        try:
            monitor._attach(self._subscribe(info, dbr_type, deliver))
        except Refused as exc:
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

    def _connect(self, pv: str, timeout: float) -> ChannelInfo:
        """The connected channel; :class:`NoReply` saying why not within ``timeout``."""
        raise NotImplementedError

    def _read(self, info: ChannelInfo, dbr_type: int, timeout: float) -> Sequence[Any]:
        raise NotImplementedError

    def _read_alarm(self, info: ChannelInfo, timeout: float) -> tuple[int, int]:
        """(status, severity) numbers."""
        raise NotImplementedError

    def _write(self, info: ChannelInfo, dbr_type: int, elements: list[Any], timeout: float) -> None:
        raise NotImplementedError

    def _subscribe(
        self, info: ChannelInfo, dbr_type: int, sink: Callable[[Sequence[Any]], None]
    ) -> Callable[[], None]:
        """Start a DBE_VALUE|DBE_ALARM subscription feeding ``sink``; return its cancel."""
        raise NotImplementedError

    def _shutdown(self) -> None:
        raise NotImplementedError
