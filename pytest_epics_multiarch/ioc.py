"""The IOC handle tests use, and the pool that starts and stops IOCs for a session.

An :class:`Ioc` is what the ``ioc`` fixture hands out whatever runs it: ``.target``, ``.logs()``,
``.iocsh()``, ``.stop()`` and ``.ca``, a Channel Access client bound to this IOC's address only.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .ca import CAClient, make_ca_client
from .config import IocSpec, ProjectConfig
from .errors import IocError, IocStartError
from .images import ImageResult
from .runners.base import IocRunner, ReadyProbe
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


RunnerFactory = Callable[[ProjectConfig, Target, ImageResult, IocSpec, ReadyProbe, Path], IocRunner]

#: IOCs under one key are interchangeable: the config file, the target, the image and the
#: ``ioc:`` settings (the identity :meth:`EpicsSession.shared_ioc` shares IOCs by).
IocKey = tuple[str, str, str, str]


def ioc_key(config: ProjectConfig, target: Target, image: ImageResult, spec: IocSpec) -> IocKey:
    return (config.where, target.name, image.ref, repr(spec))


class _Spare:
    """An IOC started ahead of time, in a daemon thread of its own.

    ``after`` is the spare of the same key started before it: starts of one key run one after
    the other, so N spares never compete for the CPU with each other (only with the tests).
    """

    def __init__(self, ioc: Ioc, after: _Spare | None) -> None:
        self.ioc = ioc
        self.after = after
        self.error: BaseException | None = None
        #: Set when the start has ended, however (ready, failed, or cancelled before it began).
        self.done = threading.Event()
        self._cancelled = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"epics-spare {ioc.target.name}", daemon=True)

    def _run(self) -> None:
        try:
            if self.after is not None:
                self.after.done.wait()
                self.after = None  # else each spare keeps every one before it alive
            if self._cancelled.is_set():
                return  # the session ended before this one began: nothing was started
            self.ioc.runner.start()
        except BaseException as exc:
            self.error = exc
            log.info(
                "%s: a spare IOC failed to start, discarded (%s)",
                self.ioc.target.name,
                str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
            )
            try:
                self.ioc.stop()
            except Exception as stop_exc:
                log.debug(
                    "%s: could not stop the failed spare %s: %s", self.ioc.target.name, self.ioc, stop_exc
                )
        finally:
            self.done.set()

    def cancel(self) -> None:
        """A spare whose start has not begun yet never starts."""
        self._cancelled.set()

    def join(self) -> None:
        """Wait until the start has ended (a thread never started has nothing to wait for)."""
        try:
            self.thread.join()
        except RuntimeError:
            pass  # interrupted between being listed and being started: it never ran


class IocPool:
    """Starts IOCs through their target's runner and stops every one it started.

    With ``spares`` > 0 it keeps up to that many *spare* IOCs per :data:`IocKey`, started in the
    background (container targets only: a QEMU boot is CPU-heavy and would slow the test that
    runs meanwhile), so that asking for an IOC costs the handover, not the start. The first IOC
    of a key starts in the caller, as without spares, and its spares start after it; a spare is
    handed out only once it is ready and still running, else it is discarded and a fresh IOC
    starts in the caller, which reports errors as usual. Spares are not ``live()`` until handed
    out, are never kept (``keep``) and never outlive :meth:`stop_all`.
    """

    def __init__(
        self,
        runner_factory: RunnerFactory,
        *,
        ca_backend: str,
        keep: bool,
        log_dir: Callable[[], Path],
        spares: int = 0,
    ) -> None:
        self._runner_factory = runner_factory
        self.ca_backend = ca_backend
        self.keep = keep
        self.log_dir = log_dir
        self.spares = max(0, spares)
        self._live: list[Ioc] = []
        self._spares: dict[IocKey, list[_Spare]] = {}
        self._closed = False
        self._count = 0
        self._lock = threading.Lock()
        #: Per target, the seconds each IOC asked for kept its asker waiting: the start-up of an
        #: IOC started in the caller, the handover (plus any wait for a spare still starting) of a
        #: spare. The matrix shows the largest, so it stays the worst wait a test had (a cold
        #: start, when the run had one), never a spare's background start-up nobody waited for.
        self.start_seconds: dict[str, list[float]] = {}

    def start(
        self,
        config: ProjectConfig,
        target: Target,
        image: ImageResult,
        spec: IocSpec | None = None,
        *,
        replenish: bool = True,
    ) -> Ioc:
        """Start an IOC of ``image``; ``spec`` overrides the config's ``ioc:`` for this one.

        Hands out a ready spare of the same configuration when there is one; then, unless
        ``replenish`` is False (an IOC shared for the session: a spare would idle), tops the
        spares up in the background.
        """
        spec = spec or config.ioc_for(target)
        key = ioc_key(config, target, image, spec)
        asked = time.monotonic()
        ioc = self._take_spare(key)
        if ioc is not None:
            seconds = time.monotonic() - asked
        else:
            waited = time.monotonic() - asked  # on spares that turned out unusable
            ioc = self._new_ioc(config, target, image, spec)
            with self._lock:
                self._live.append(ioc)
            try:
                ioc.runner.start()
            except BaseException:
                self.release(ioc, force=True)
                raise
            seconds = waited + float(getattr(ioc.runner, "start_seconds", 0.0))
        with self._lock:
            self.start_seconds.setdefault(target.name, []).append(seconds)
        if replenish:
            self._replenish(key, config, target, image, spec)
        return ioc

    def _new_ioc(self, config: ProjectConfig, target: Target, image: ImageResult, spec: IocSpec) -> Ioc:
        """An IOC not started yet, with its own log file and readiness probe."""
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
        return ioc

    # -- spares ----------------------------------------------------------------------------------

    def _take_spare(self, key: IocKey) -> Ioc | None:
        """A spare of ``key`` that is ready and running, now live; None when there is none.

        A spare still starting is waited for (it is further along than a fresh start would be).
        It stays listed while waited for, so an interrupt leaves it to :meth:`stop_all`.
        """
        while True:
            with self._lock:
                waiting = self._spares.get(key)
                if not waiting:
                    return None
                spare = next((s for s in waiting if s.done.is_set()), waiting[0])
            spare.done.wait()
            with self._lock:
                waiting = self._spares.get(key, [])
                if spare not in waiting:
                    continue  # taken or stopped meanwhile
                waiting.remove(spare)
                self._live.append(spare.ioc)  # from here on release() and stop_all() own it
            if spare.error is None and spare.ioc.is_running():
                log.debug("%s: handing out the spare %s", spare.ioc.target.name, spare.ioc)
                return spare.ioc
            if spare.error is None:
                log.info("%s: the spare %s is no longer running, discarded", spare.ioc.target.name, spare.ioc)
            try:
                self.release(spare.ioc, force=True)
            except Exception as exc:
                log.debug(
                    "%s: could not stop the discarded spare %s: %s", spare.ioc.target.name, spare.ioc, exc
                )

    def _replenish(
        self, key: IocKey, config: ProjectConfig, target: Target, image: ImageResult, spec: IocSpec
    ) -> None:
        """Start spares of ``key`` in the background until there are ``spares`` of them."""
        if self.spares == 0 or target.runner != "container":
            return
        while True:
            with self._lock:
                if self._closed or len(self._spares.get(key, ())) >= self.spares:
                    return
            try:
                ioc = self._new_ioc(config, target, image, spec)
            except Exception as exc:  # a spare is an optimisation: the test goes on without it
                log.info("%s: no spare IOC: %s", target.name, str(exc).splitlines()[0] if str(exc) else exc)
                return
            with self._lock:
                if self._closed:
                    return
                waiting = self._spares.setdefault(key, [])
                spare = _Spare(ioc, waiting[-1] if waiting else None)
                # Listed before its thread starts: stop_all() sees every spare that may run.
                waiting.append(spare)
            spare.thread.start()

    def spare_iocs(self) -> list[Ioc]:
        """The spares held now (ready or still starting): not handed out, not ``live()``."""
        with self._lock:
            return [spare.ioc for waiting in self._spares.values() for spare in waiting]

    def wait_for_spares(self, timeout: float | None = None) -> bool:
        """Wait until every spare held has finished starting; False when ``timeout`` ran out."""
        with self._lock:
            spares = [spare for waiting in self._spares.values() for spare in waiting]
        deadline = None if timeout is None else time.monotonic() + timeout
        for spare in spares:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            if not spare.done.wait(left):
                return False
        return True

    # -- stopping --------------------------------------------------------------------------------

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
        """Stop every IOC still running (kept ones excepted); return how to reach kept ones.

        Spares go first, whatever ``keep`` says: those still starting are waited for, then
        stopped. After this the pool starts no more spares.
        """
        with self._lock:
            self._closed = True
            spares = [spare for waiting in self._spares.values() for spare in waiting]
            self._spares.clear()
        for spare in spares:
            spare.cancel()
        for spare in spares:
            spare.join()
            try:
                spare.ioc.stop()
            except Exception as exc:  # cleanup goes on for the others
                log.warning("could not stop the spare %s: %s", spare.ioc, exc)
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


__all__ = ["Ioc", "IocKey", "IocPool", "IocStartError", "first_record", "ioc_key"]
