"""The interface every IOC runner implements, what runners share, and each IOC's CA port."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

from ..console import Console
from ..errors import IocError, IocStartError, tail_lines


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

ReadyProbe = Callable[[tuple[str, int]], None]


class ConsoleRunner:
    """What the runners share: context management, the console, readiness, start errors.

    Subclasses start the IOC and attach ``self._console`` in ``start()``, then call
    ``_wait_ready()``; they say how the IOC ended (``_exit_description``) and how to stop it.
    """

    #: Shown in start errors after the log tail.
    start_hint = "read the IOC log above"

    def __init__(
        self,
        *,
        target: str,
        name: str,
        start_timeout: float,
        log_path: Path | None,
        ready_probe: ReadyProbe | None,
    ) -> None:
        self.target = target
        self.name = name
        self.start_timeout = start_timeout
        self.log_path = log_path
        #: Called with the CA address after iocRun; raises until the readiness PV answers.
        self.ready_probe = ready_probe
        self.ca_address: tuple[str, int] = ("127.0.0.1", 0)
        self.start_seconds = 0.0
        self._console: Console | None = None
        self._stopped = False

    def __enter__(self: _R) -> _R:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        raise NotImplementedError

    def _note(self, line: str) -> None:
        """Append a line of the runner's own to the console log: what it starts, what went wrong.

        Written before the console is attached, so every attempt leaves a log, even one that
        fails before the IOC printed anything.
        """
        if self.log_path is not None:
            with open(self.log_path, "a") as log_file:
                log_file.write(line + "\n")

    def stop(self) -> None:
        raise NotImplementedError

    def is_running(self) -> bool:
        raise NotImplementedError

    def logs(self) -> str:
        return self._console.text() if self._console else ""

    def iocsh(self, command: str, timeout: float = 10.0) -> str:
        return self._require_console().run(command, timeout, alive=self.is_running)

    def _require_console(self) -> Console:
        if self._console is None:
            raise IocError(f"{self.name} has no console (not started)", target=self.target)
        return self._console

    def _exit_description(self) -> str | None:
        """How the IOC ended ("exited with code 3"), or None while it runs."""
        return None

    def _wait_ready(self, started: float, fatal: Sequence[str] = ()) -> None:
        """Wait for ``iocRun`` on the console, then for the readiness probe to pass.

        Every poll first checks that the IOC still runs, so a crash fails at once; ``fatal``
        console texts (an RTEMS exception, a kernel panic) fail at once too.
        """
        deadline = started + self.start_timeout
        console = self._require_console()
        alternatives = "|".join(re.escape(text) for text in (READY_TEXT, *fatal))
        try:
            match = console.expect(
                alternatives, max(deadline - time.monotonic(), 0.1), alive=self.is_running, what=READY_TEXT
            )
        except IocError as exc:
            # Say the configured time, not what was left of it when the console was attached.
            seen = exc.seen if console.closed or not self.is_running() else None
            raise self._start_error(
                "the IOC did not reach iocRun", seen or f"no match within {self.start_timeout:.0f} s"
            ) from None
        if match.group(0) != READY_TEXT:
            raise self._start_error("the IOC died while starting", f"the console printed {match.group(0)!r}")
        if self.ready_probe is None:
            return
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not self.is_running():
                raise self._start_error("the IOC exited after iocRun", None)
            try:
                self.ready_probe(self.ca_address)
                return
            except Exception as exc:  # the probe raises CA errors until the PV answers
                last = exc
                time.sleep(0.1)
        raise self._start_error(
            "the readiness PV did not answer over Channel Access",
            str(last).splitlines()[0] if last else None,
        )

    def _start_error(self, what: str, seen: str | None) -> IocStartError:
        return IocStartError(
            f"{what} ({self.name})",
            target=self.target,
            seen=self._exit_description() or seen,
            tail=tail_lines(self.logs(), 25),
            hint=self.start_hint,
        )


_R = TypeVar("_R", bound=ConsoleRunner)
