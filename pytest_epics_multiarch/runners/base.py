"""The interface every IOC runner implements, and the CA port each IOC gets."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from ..console import Console
from ..errors import IocError


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


READY_TEXT = "iocRun: All initialization complete"


def wait_until_ready(
    *,
    console: Console,
    deadline: float,
    is_running: Callable[[], bool],
    probe: Callable[[tuple[str, int]], None] | None,
    address: tuple[str, int],
    fail: Callable[[str, str | None], Exception],
    fatal: Sequence[str] = (),
) -> None:
    """Wait for ``iocRun`` on the console, then for the readiness probe to pass.

    Every poll first checks that the IOC still runs, so a crash fails at once; ``fatal`` console
    texts (an RTEMS exception, a kernel panic) fail at once too. ``fail(what, seen)`` makes the
    error, which the runner enriches with its log tail.
    """
    alternatives = "|".join(re.escape(text) for text in (READY_TEXT, *fatal))
    try:
        match = console.expect(
            alternatives, max(deadline - time.monotonic(), 0.1), alive=is_running, what=READY_TEXT
        )
    except IocError as exc:
        raise fail("the IOC did not reach iocRun", exc.seen) from None
    if match.group(0) != READY_TEXT:
        raise fail("the IOC died while starting", f"the console printed {match.group(0)!r}")
    if probe is None:
        return
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not is_running():
            raise fail("the IOC exited after iocRun", None)
        try:
            probe(address)
            return
        except Exception as exc:  # the probe raises CA errors until the PV answers
            last = exc
            time.sleep(0.1)
    raise fail(
        "the readiness PV did not answer over Channel Access",
        str(last).splitlines()[0] if last else None,
    )
