"""The ``pyepics`` backend: libca, as shipped (and located) by pyepics, through ctypes.

libca reads its configuration from the environment, in two places: the context
(``EPICS_CA_SERVER_PORT``, ``EPICS_CA_NAME_SERVERS``) when it is created, and the UDP search
machinery (``EPICS_CA_ADDR_LIST``, ``EPICS_CA_AUTO_ADDR_LIST``) when the context makes its
first channel. Each client owns a worker thread that, under a process-wide lock, sets those
variables to name only its IOC, creates a fresh preemptive-callback context, creates and
clears one throw-away channel (forcing the search list to be built), and puts the environment
back. Every later libca call is marshalled to that thread, which stays attached to the
context; callbacks arrive on libca's own threads and only hand data over.
"""

from __future__ import annotations

import atexit
import ctypes
import importlib
import os
import queue
import struct
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import CAError
from . import libca
from .base import (
    MONITOR_MASK,
    PUT_COMPLETION,
    READ_ANSWER,
    BoundClient,
    NoReply,
    Refused,
    no_answer,
    no_search_reply,
)
from .values import DBR_STS_STRING, ChannelInfo

PYEPICS_HINT = "pip install pytest-epics-multiarch[pyepics]"

T = TypeVar("T")

#: Held while a libca context is created with the CA variables in ``os.environ`` set to one
#: IOC's address (and restored after). Other code that changes those variables while libca
#: clients may be starting can hold it too.
LIBCA_ENVIRONMENT_LOCK = threading.Lock()


def require_pyepics(target: str | None) -> None:
    """Raise a CAError with :data:`PYEPICS_HINT` when pyepics cannot be imported."""
    try:
        importlib.import_module("epics.ca")
    except ImportError as exc:
        raise CAError(
            "the pyepics Channel Access backend needs pyepics, which is not installed",
            target=target,
            seen=f"ImportError: {exc}",
            hint=PYEPICS_HINT,
        ) from None


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
                raise NoReply("the client was closed")
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
        lib = libca.load()
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
            if status != libca.ECA_NORMAL:
                raise RuntimeError(f"ca_context_create: {libca.message(status)}")
            primer = ctypes.c_void_p()
            status = lib.ca_create_channel(
                b"pytest-epics-multiarch:search-list-primer",
                libca.CONNECTION_CALLBACK(),  # NULL: no connection callback
                None,
                0,
                ctypes.byref(primer),
            )
            if status != libca.ECA_NORMAL:
                lib.ca_context_destroy()
                raise RuntimeError(f"ca_create_channel: {libca.message(status)}")
            lib.ca_clear_channel(primer)


@dataclass
class _LibcaChannel:
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


class PyepicsClient(BoundClient):
    """libca (as pyepics ships it) with a context of its own (see the module docstring).

    Every libca call runs on the client's :class:`_LibcaThread`, the one thread attached to
    the context; callers wait on events that libca's callback threads set. Closing destroys
    the context, which closes its channels, subscriptions and sockets.
    """

    backend = "pyepics"

    def __init__(self, host: str, ip: str, port: int, *, timeout: float, target: str | None) -> None:
        super().__init__(host, port, timeout=timeout, target=target)
        self._channels: dict[str, _LibcaChannel] = {}
        self._channels_lock = threading.Lock()
        try:
            self._lib = libca.load()
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
                libca.unregister_handler(old.token)
            channel: _LibcaChannel = self._thread.call(lambda: self._create_channel(pv))
            self._channels[pv] = channel
            return channel

    def _create_channel(self, pv: str) -> _LibcaChannel:
        channel = _LibcaChannel(0, 0, threading.Event())

        def on_connection(args: libca.ConnectionArgs) -> None:
            if args.op == libca.CA_OP_CONN_UP:
                channel.ever_connected = True
                channel.connected.set()
            else:
                channel.connected.clear()

        channel.token = libca.register_handler(on_connection)
        chid = ctypes.c_void_p()
        status = self._lib.ca_create_channel(
            pv.encode(), libca.ON_CONNECTION, ctypes.c_void_p(channel.token), 0, ctypes.byref(chid)
        )
        if status != libca.ECA_NORMAL:
            libca.unregister_handler(channel.token)
            raise NoReply(f"libca refused to create the channel: {libca.message(status)}")
        self._lib.ca_flush_io()
        channel.chid = int(chid.value or 0)
        return channel

    def _connect(self, pv: str, timeout: float) -> ChannelInfo:
        channel = self._channel(pv)
        if not channel.connected.wait(timeout):
            raise NoReply(no_search_reply(timeout))

        def describe() -> ChannelInfo:
            lib = self._lib
            return ChannelInfo(
                native_type=int(lib.ca_field_type(channel.chid)),
                count=int(lib.ca_element_count(channel.chid)),
                writable=bool(lib.ca_write_access(channel.chid)),
                handle=channel,
            )

        info = self._thread.call(describe)
        if info.native_type < 0:  # TYPENOTCONN: it dropped in between
            raise NoReply("the channel disconnected while connecting")
        return info

    # I/O --------------------------------------------------------------------------------

    def _request(
        self,
        issue: Callable[[int], int],
        decode: Callable[[libca.EventArgs], Any],
        awaited: str,
        timeout: float,
    ) -> Any:
        """Issue one callback request on the context's thread and wait for its answer."""
        done = threading.Event()
        answer: list[Any] = []

        def on_answer(args: libca.EventArgs) -> None:
            if args.status != libca.ECA_NORMAL:
                answer.append(Refused(libca.message(args.status)))
            else:
                answer.append(decode(args))
            done.set()

        token = libca.register_handler(on_answer)
        try:

            def send() -> int:
                status = issue(token)
                if status == libca.ECA_NORMAL:
                    self._lib.ca_flush_io()
                return int(status)

            status = self._thread.call(send)
            if status != libca.ECA_NORMAL:
                raise Refused(libca.message(status))
            if not done.wait(timeout):
                raise NoReply(no_answer(awaited, timeout))
        finally:
            libca.unregister_handler(token)
        result = answer[0]
        if isinstance(result, Refused):
            raise result
        return result

    def _read(self, info: ChannelInfo, dbr_type: int, timeout: float) -> Sequence[Any]:
        chid = info.handle.chid

        def issue(token: int) -> int:
            return int(
                self._lib.ca_array_get_callback(dbr_type, 0, chid, libca.ON_EVENT, ctypes.c_void_p(token))
            )

        def decode(args: libca.EventArgs) -> list[Any]:
            return libca.event_elements(args, dbr_type)

        result: list[Any] = self._request(issue, decode, READ_ANSWER, timeout)
        return result

    def _read_alarm(self, info: ChannelInfo, timeout: float) -> tuple[int, int]:
        chid = info.handle.chid

        def issue(token: int) -> int:
            return int(
                self._lib.ca_array_get_callback(
                    DBR_STS_STRING, 1, chid, libca.ON_EVENT, ctypes.c_void_p(token)
                )
            )

        def decode(args: libca.EventArgs) -> tuple[int, int]:
            # Every DBR_STS_* begins with two dbr_short_t: status, severity.
            if not args.dbr:
                raise Refused("libca delivered no data")
            status, severity = struct.unpack("=hh", ctypes.string_at(args.dbr, 4))
            return int(status), int(severity)

        result: tuple[int, int] = self._request(issue, decode, READ_ANSWER, timeout)
        return result

    def _write(self, info: ChannelInfo, dbr_type: int, elements: list[Any], timeout: float) -> None:
        chid = info.handle.chid
        buffer = libca.put_buffer(dbr_type, elements)

        def issue(token: int) -> int:
            # libca copies the value into its send queue before returning.
            return int(
                self._lib.ca_array_put_callback(
                    dbr_type,
                    len(elements),
                    chid,
                    ctypes.cast(buffer, ctypes.c_void_p),
                    libca.ON_EVENT,
                    ctypes.c_void_p(token),
                )
            )

        self._request(issue, lambda args: None, PUT_COMPLETION, timeout)

    def _subscribe(
        self, info: ChannelInfo, dbr_type: int, sink: Callable[[Sequence[Any]], None]
    ) -> Callable[[], None]:
        chid = info.handle.chid

        def on_update(args: libca.EventArgs) -> None:
            if args.status == libca.ECA_NORMAL:
                sink(libca.event_elements(args, dbr_type))

        token = libca.register_handler(on_update)

        def create() -> int:
            event_id = ctypes.c_void_p()
            status = self._lib.ca_create_subscription(
                dbr_type, 0, chid, MONITOR_MASK, libca.ON_EVENT, ctypes.c_void_p(token),
                ctypes.byref(event_id),
            )  # fmt: skip
            if status != libca.ECA_NORMAL:
                raise Refused(f"ca_create_subscription: {libca.message(status)}")
            self._lib.ca_flush_io()
            return int(event_id.value or 0)

        try:
            event_id = self._thread.call(create)
        except BaseException:
            libca.unregister_handler(token)
            raise

        def cancel() -> None:
            try:
                if self._thread.running:
                    self._thread.call(lambda: self._lib.ca_clear_subscription(event_id))
            finally:
                libca.unregister_handler(token)

        return cancel

    def _shutdown(self) -> None:
        _live_libca_clients.discard(self)
        self._thread.stop()  # ca_context_destroy clears the channels with the context
        with self._channels_lock:
            for channel in self._channels.values():
                libca.unregister_handler(channel.token)
            self._channels.clear()
