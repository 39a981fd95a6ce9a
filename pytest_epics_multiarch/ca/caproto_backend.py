"""The ``caproto`` backend: caproto's threading client, bound to one address.

caproto's ``SharedBroadcaster`` asks ``ca.get_client_address_list()``, that is ``os.environ``,
every time it sends a search. A subclass (``BoundBroadcaster`` in :func:`_caproto_classes`)
overrides ``send`` to aim every datagram at the one address, drops datagrams from any other
host in ``received``, and pins each search reply to the bound host, so the TCP circuit can
only go there; it never registers with a CA repeater. The environment is neither read for
addresses nor written.
"""

from __future__ import annotations

import functools
import importlib
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from .base import (
    MONITOR_MASK,
    PUT_COMPLETION,
    READ_ANSWER,
    BoundClient,
    NoReply,
    Refused,
    log,
    no_answer,
    no_search_reply,
    time_left,
)
from .values import DBR_STS_STRING, ChannelInfo, until_nul


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


def _elements(response: Any) -> list[Any]:
    data = response.data
    if hasattr(data, "tolist"):
        return list(data.tolist())
    return list(data)


def _refusal(response: Any) -> str | None:
    """What an ErrorResponse (or a failed completion) said; None for success."""
    ca = _caproto()
    if isinstance(response, ca.ErrorResponse):
        code = getattr(response.status, "value", response.status)  # CAStatus or CAStatusCode
        message = until_nul(response.error_message).strip()
        text = f"{code.name} ({code.description})"
        return f"{text}: {message}" if message else text
    status = getattr(response, "status", None)
    code = getattr(status, "value", status)
    if code is not None and not code.success:
        return f"{code.name} ({code.description})"
    return None


class _Subscription:
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
            self._sink(_elements(response))
        except Exception:
            log.exception("a monitor update of %s could not be decoded", self._pv)

    def cancel(self) -> None:
        self._subscription.remove_callback(self._token)


class CaprotoClient(BoundClient):
    """The caproto threading client, bound to one address (see the module docstring)."""

    backend = "caproto"

    def __init__(self, host: str, ip: str, port: int, *, timeout: float, target: str | None) -> None:
        super().__init__(host, port, timeout=timeout, target=target)
        broadcaster_class, context_class = _caproto_classes()
        self._broadcaster = broadcaster_class(ip, port)
        try:
            self._context = context_class(self._broadcaster, timeout)
        except BaseException:
            self._broadcaster.disconnect(wait=False)
            raise

    def _connect(self, pv: str, timeout: float) -> ChannelInfo:
        ca = _caproto()
        (handle,) = self._context.get_pvs(pv, timeout=timeout)
        deadline = time.monotonic() + timeout
        while not handle.connected:
            # Restart caproto's search back-off every quarter second: an IOC that is still
            # starting (a readiness poll) is found soon after it answers. The searches go to
            # the one bound address only.
            self._broadcaster.search_now()
            try:
                handle.wait_for_connection(timeout=min(time_left(deadline), 0.25))
            except ca.CaprotoTimeoutError:
                if time_left(deadline) > 0.0:
                    continue
                if handle.circuit_ready.is_set():
                    raise NoReply(
                        f"the IOC answered the search but the channel did not connect within {timeout:.3g} s"
                    ) from None
                raise NoReply(no_search_reply(timeout)) from None
        channel = handle.channel
        rights = handle.access_rights or 0
        return ChannelInfo(
            native_type=int(channel.native_data_type),
            count=int(channel.native_data_count),
            writable=bool(rights & ca.AccessRights.WRITE),
            handle=handle,
        )

    def _request(self, call: Callable[[], Any], awaited: str, timeout: float) -> Any:
        """The response of a read or write: :class:`NoReply` if none, :class:`Refused` if an error."""
        try:
            response = call()
        except _caproto().CaprotoTimeoutError:
            raise NoReply(no_answer(awaited, timeout)) from None
        except KeyError:
            # caproto wakes a waiting request when the circuit drops (the IOC died), then looks
            # up a response that never came.
            raise NoReply(f"the IOC closed the connection before {awaited}") from None
        refusal = _refusal(response)
        if refusal:
            raise Refused(refusal)
        return response

    def _read_as(self, info: ChannelInfo, dbr_type: int, timeout: float) -> Any:
        ca = _caproto()
        return self._request(
            lambda: info.handle.read(data_type=ca.ChannelType(dbr_type), timeout=timeout),
            READ_ANSWER,
            timeout,
        )

    def _read(self, info: ChannelInfo, dbr_type: int, timeout: float) -> Sequence[Any]:
        return _elements(self._read_as(info, dbr_type, timeout))

    def _read_alarm(self, info: ChannelInfo, timeout: float) -> tuple[int, int]:
        response = self._read_as(info, DBR_STS_STRING, timeout)
        return int(response.metadata.status), int(response.metadata.severity)

    def _write(self, info: ChannelInfo, dbr_type: int, elements: list[Any], timeout: float) -> None:
        ca = _caproto()
        self._request(
            lambda: info.handle.write(
                elements,
                data_type=ca.ChannelType(dbr_type),
                data_count=len(elements),
                wait=True,
                notify=True,
                timeout=timeout,
            ),
            PUT_COMPLETION,
            timeout,
        )

    def _subscribe(
        self, info: ChannelInfo, dbr_type: int, sink: Callable[[Sequence[Any]], None]
    ) -> Callable[[], None]:
        ca = _caproto()
        subscription = info.handle.subscribe(data_type=ca.ChannelType(dbr_type), mask=MONITOR_MASK)
        return _Subscription(subscription, sink, info.handle.name).cancel

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
