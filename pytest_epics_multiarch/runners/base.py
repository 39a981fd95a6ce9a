"""The interface every IOC runner implements, and the CA port each IOC gets."""

from __future__ import annotations

import socket
from typing import Protocol


class IocRunner(Protocol):
    """A started IOC. ``start()`` returns once it is ready; ``stop()`` may be called twice."""

    #: e.g. "container sample-ioc-runtime:dev (a1b2c3)" or "qemu 40p (pid 1234)"
    name: str
    #: Where its Channel Access server answers (always a loopback address).
    ca_address: tuple[str, int]

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def is_running(self) -> bool: ...

    def logs(self) -> str: ...

    def iocsh(self, command: str, timeout: float = 10.0) -> str: ...

    def reach_hint(self) -> str:
        """How a person reaches this IOC when it is kept running after the session."""
        ...


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for both TCP and UDP on ``host`` (CA needs the same number for both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((host, port))
                except OSError:
                    continue
                return port
    raise OSError(f"no port free for both TCP and UDP on {host}")
