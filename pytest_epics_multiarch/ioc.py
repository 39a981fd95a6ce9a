"""The IOC handle tests use, and the pool that starts and stops IOCs for a session.

An :class:`Ioc` is what the ``ioc`` fixture hands out whatever runs it: ``.target``, ``.logs()``,
``.iocsh()``, ``.stop()`` and ``.ca``, a Channel Access client bound to this IOC's address only.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .ca import CAClient, make_ca_client
from .config import IocSpec, ProjectConfig
from .errors import IocError, IocStartError
from .images import ImageResult
from .runners.base import IocRunner
from .targets import Target

log = logging.getLogger("pytest_epics_multiarch.ioc")

#: A record name as ``dbl`` prints it (one per line).
_RECORD_RE = re.compile(r"^[A-Za-z0-9_:;<>\[\]{}.$-]+$")


@dataclass
class Ioc:
    """A running IOC of one target."""

    target: Target
    image: ImageResult
    runner: IocRunner
    ca_backend: str = "caproto"
    ca_timeout: float = 5.0
    kept: bool = False
    _ca: CAClient | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def name(self) -> str:
        return self.runner.name

    @property
    def ca_address(self) -> tuple[str, int]:
        """(host, port) where this IOC's Channel Access server answers."""
        return self.runner.ca_address

    @property
    def ca(self) -> CAClient:
        """A Channel Access client that searches this IOC's address and nothing else."""
        with self._lock:
            if self._ca is None:
                host, port = self.runner.ca_address
                self._ca = make_ca_client(
                    self.ca_backend, host, port, timeout=self.ca_timeout, target=self.target.name
                )
            return self._ca

    def logs(self) -> str:
        """Everything the IOC printed so far (console or container log)."""
        return self.runner.logs()

    def iocsh(self, command: str, timeout: float = 10.0) -> str:
        """Run one iocsh command on the IOC's console and return what it printed."""
        return self.runner.iocsh(command, timeout)

    def is_running(self) -> bool:
        return self.runner.is_running()

    def reset_ca(self) -> None:
        """Close the CA client; the next use of ``.ca`` makes a new one (new sockets, new search)."""
        with self._lock:
            ca, self._ca = self._ca, None
        if ca is not None:
            ca.close()

    def stop(self) -> None:
        """Stop the IOC (idempotent). Later CA calls fail."""
        self.reset_ca()
        self.runner.stop()

    def __repr__(self) -> str:
        return f"<Ioc {self.target.name} {self.runner.name}>"


def first_record(dbl_output: str) -> str | None:
    """The first record name in ``dbl`` output (the default readiness PV)."""
    for line in dbl_output.splitlines():
        line = line.strip()
        if line and _RECORD_RE.match(line):
            return line
    return None


RunnerFactory = Callable[
    [ProjectConfig, Target, ImageResult, IocSpec, "Callable[[tuple[str, int]], None]", Path], IocRunner
]


class IocPool:
    """Starts IOCs through their target's runner and stops every one it started."""

    def __init__(
        self,
        runner_factory: RunnerFactory,
        *,
        ca_backend: str,
        keep: bool,
        log_dir: Callable[[], Path],
    ) -> None:
        self._runner_factory = runner_factory
        self.ca_backend = ca_backend
        self.keep = keep
        self.log_dir = log_dir
        self._live: list[Ioc] = []
        self._count = 0
        self._lock = threading.Lock()
        #: Start-up seconds of each IOC per target, for the matrix.
        self.start_seconds: dict[str, list[float]] = {}

    def start(
        self, config: ProjectConfig, target: Target, image: ImageResult, spec: IocSpec | None = None
    ) -> Ioc:
        """Start an IOC of ``image``; ``spec`` overrides the config's ``ioc:`` for this one."""
        spec = spec or config.ioc_for(target)
        with self._lock:
            self._count += 1
            number = self._count
        safe = target.name.replace("/", "-")
        log_path = self.log_dir() / f"ioc-{safe}-{number}.log"
        holder: list[Ioc] = []
        failures = [0]

        def ready_probe(address: tuple[str, int]) -> None:
            ioc = holder[0]
            pv = spec.ready_pv or first_record(ioc.iocsh("dbl", timeout=5.0))
            if pv is None:
                raise IocError("the IOC lists no records (dbl printed none)", target=target.name)
            try:
                ioc.ca.get(pv, timeout=1.0)  # raises a CA error until the PV answers
            except Exception:
                failures[0] += 1
                if failures[0] % 3 == 0:
                    # Seen under heavy parallel load: a client whose first searches went
                    # unanswered never connected. A fresh client (new sockets) searches anew.
                    ioc.reset_ca()
                raise
            log.debug("%s: readiness PV %s answered on %s:%d", target.name, pv, *address)

        runner = self._runner_factory(config, target, image, spec, ready_probe, log_path)
        ioc = Ioc(target, image, runner, ca_backend=self.ca_backend, kept=self.keep)
        holder.append(ioc)
        with self._lock:
            self._live.append(ioc)
        try:
            runner.start()
        except BaseException:
            self.release(ioc, force=True)
            raise
        seconds = float(getattr(runner, "start_seconds", 0.0))
        self.start_seconds.setdefault(target.name, []).append(seconds)
        return ioc

    def release(self, ioc: Ioc, *, force: bool = False) -> None:
        """Stop ``ioc`` unless IOCs are kept (``--epics-keep-iocs``) and it started fine."""
        if self.keep and not force and ioc.runner.is_running():
            return
        with self._lock:
            if ioc in self._live:
                self._live.remove(ioc)
        ioc.stop()

    def live(self) -> list[Ioc]:
        with self._lock:
            return list(self._live)

    def stop_all(self) -> list[str]:
        """Stop every IOC still running (kept ones excepted); return how to reach kept ones."""
        hints: list[str] = []
        with self._lock:
            live = list(self._live)
        for ioc in reversed(live):
            if self.keep and ioc.runner.is_running():
                hints.append(ioc.runner.reach_hint())
                continue
            try:
                self.release(ioc, force=True)
            except Exception as exc:  # cleanup goes on for the others
                log.warning("could not stop %s: %s", ioc, exc)
        return hints


__all__ = ["Ioc", "IocPool", "IocStartError", "first_record"]
