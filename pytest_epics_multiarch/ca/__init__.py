"""Channel Access clients bound to one IOC's address.

Tests start IOCs (in containers or under QEMU) that each publish their own CA port N on
127.0.0.1, and two IOCs of the same image serve the same PV names at the same time. A client
made by :func:`make_ca_client` therefore searches ``host:N`` and nothing else, whatever
``EPICS_CA_ADDR_LIST``, ``EPICS_CA_AUTO_ADDR_LIST``, ``EPICS_CA_NAME_SERVERS`` or
``EPICS_CA_SERVER_PORT`` say in the process environment, which the whole test process shares.

Two backends sit behind one :class:`CAClient` interface, each module saying how it stays bound:
``caproto`` (default, :mod:`.caproto_backend`), caproto's threading client with a broadcaster
that only searches the one address; ``pyepics`` (:mod:`.libca_backend`), libca as pyepics ships
it, with a context of its own created while the environment names only that IOC. What they
share is in :mod:`.base` (the API over four primitives, monitors, errors) and :mod:`.values`
(DBR types, encoding, decoding, comparison).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any, Protocol

from .base import Monitor
from .caproto_backend import CaprotoClient
from .libca_backend import LIBCA_ENVIRONMENT_LOCK, PYEPICS_HINT, PyepicsClient, require_pyepics
from .values import ALARM_SEVERITIES, ALARM_STATUSES

__all__ = [
    "ALARM_SEVERITIES",
    "ALARM_STATUSES",
    "BACKENDS",
    "LIBCA_ENVIRONMENT_LOCK",
    "PYEPICS_HINT",
    "CAClient",
    "CaprotoClient",
    "Monitor",
    "PyepicsClient",
    "make_ca_client",
]

#: Backend names accepted by :func:`make_ca_client`, the default first.
BACKENDS = ("caproto", "pyepics")


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
        require_pyepics(target)
        return PyepicsClient(host, ip, port, timeout=timeout, target=target)
    return CaprotoClient(host, ip, port, timeout=timeout, target=target)
