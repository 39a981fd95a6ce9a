"""IOC start-up, side by side in one run: the plugin against what the engine itself allows.

    .venv/bin/python benchmarks/ioc_startup.py [--repeat 5] [--skip-qemu] [--engine podman]

Measures, each REPEAT times, with the median and the spread (min-max):

- plugin, cold: asking the session for an IOC of the sample's linux image until the first PV
  read answers, with no spare (``--epics-spare-iocs 0``; what the first IOC of a session costs);
- plugin, spare: the same when a spare is ready (``--epics-spare-iocs 1``, the default: every
  IOC after a configuration's first, once the test before it ran longer than a start-up);
- raw: ``docker run`` (SDK, same flags, against the engine measured) plus a Channel Access
  polling loop until a PV answers;
- testcontainers: ``DockerContainer`` with its default log wait for ``iocRun``, then a CA read;
- floor: the engine's own start time to the ``iocRun`` line, from the container's log
  timestamps (no client involved);
- rebuild: ``--epics-image-policy=auto`` and ``build`` for an unchanged variant;
- qemu: the PowerPC guest's boot to ready through the QEMU runner (unless --skip-qemu).

``--engine podman`` measures all of it on Podman (the session's own service when none runs).
It prints the ratios. Targets (see the README): plugin <= 1.2x the floor (met with a spare, not
cold), unchanged rebuild
< 2 s. Needs what ``make setup`` provides. Everything it starts is removed before it exits.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")


from pytest_epics_multiarch.ca import make_ca_client
from pytest_epics_multiarch.engine import Owner
from pytest_epics_multiarch.runners.base import READY_TEXT, free_port
from pytest_epics_multiarch.session import EpicsSession
from pytest_epics_multiarch.settings import Settings

REPO = Path(__file__).resolve().parents[1]
SAMPLE_TESTS = REPO / "sample_iocs" / "sample_ioc" / "tests"
PV = "SAMPLE:SETPOINT"
COMMAND = ["softIoc", "-D", "/epics/epics-base/dbd/softIoc.dbd", "/epics/ioc/config/st.cmd"]


def first_answer(port: int, deadline_s: float = 30.0) -> None:
    """Poll one PV over CA until it answers (the way a careful test would wait)."""
    client = make_ca_client("caproto", "127.0.0.1", port, timeout=0.5)
    deadline = time.monotonic() + deadline_s
    try:
        while True:
            try:
                client.get(PV, timeout=0.5)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
    finally:
        client.close()


def run_kwargs(port: int, labels: dict[str, str], engine_options: dict[str, object]) -> dict[str, object]:
    """What the plugin's container runner asks for, plus the engine's own needs (flavors.py)."""
    return {
        **engine_options,
        "command": COMMAND,
        "environment": {"EPICS_CA_SERVER_PORT": str(port)},
        "ports": {f"{port}/tcp": ("127.0.0.1", port), f"{port}/udp": ("127.0.0.1", port)},
        "init": True,
        "stdin_open": True,
        "tty": True,
        "working_dir": "/epics/ioc",
        "labels": labels,
    }


def parse_docker_time(text: str) -> datetime:
    """An engine's RFC 3339 time with nanoseconds (datetime takes microseconds)."""
    text = text.strip()
    zone = "+00:00"
    if text.endswith("Z"):
        text = text[:-1]
    elif len(text) > 6 and text[-6] in "+-" and text[-3] == ":":
        text, zone = text[:-6], text[-6:]
    head, _, frac = text.partition(".")
    return datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}{zone}")


class Bench:
    def __init__(self, work: Path, labels: dict[str, str], engine: str) -> None:
        self.work = work
        self.labels = labels
        self.engine_choice = engine
        self.session = self._session(spares=0)
        engine_now = self.session.engine()
        self.engine_name = engine_now.kind
        self.engine_url = engine_now.url
        self.client = engine_now.client
        self.engine_options = engine_now.flavor.container_options()
        if engine_now.service is not None:
            # The later sessions (rebuilds) use this session's Podman service rather than each
            # starting one (about 2 s, which every pytest session without a running service pays once).
            os.environ["CONTAINER_HOST"] = engine_now.url
        self.config = self.session.config_for(SAMPLE_TESTS)
        self.target = self.config.target("linux/amd64")
        self.image = self.session.image(self.config, self.target)

    def _session(self, spares: int) -> EpicsSession:
        settings = Settings(arch=("linux/amd64",), spare_iocs=spares, engine=self.engine_choice)
        return EpicsSession(settings, work_dir=self.work, progress=lambda m: None)

    def plugin(self, session: EpicsSession | None = None) -> float:
        session = session or self.session
        started = time.monotonic()
        ioc = session.start_ioc(self.config, self.target, self.image)
        ioc.ca.get(PV)
        seconds = time.monotonic() - started
        session.iocs.release(ioc, force=True)
        return seconds

    def plugin_spare(self, repeat: int) -> list[float]:
        """Asking for an IOC while a spare is ready: a session's first IOC starts cold (not
        measured), then each measured ask is served by the spare started after the one before."""
        session = self._session(spares=1)
        try:
            session.iocs.release(session.start_ioc(self.config, self.target, self.image), force=True)
            values = []
            for _ in range(repeat):
                if not session.iocs.wait_for_spares(60):
                    raise TimeoutError("the spare IOC did not start within 60 s")
                values.append(self.plugin(session))
            return values
        finally:
            session.close()

    def raw(self) -> float:
        port = free_port()
        started = time.monotonic()
        kwargs = run_kwargs(port, self.labels, self.engine_options)
        container = self.client.containers.run(self.image.ref, detach=True, **kwargs)
        try:
            first_answer(port)
            return time.monotonic() - started
        finally:
            container.remove(force=True)

    def testcontainers(self) -> float:
        from testcontainers.core.container import DockerContainer
        from testcontainers.core.wait_strategies import LogMessageWaitStrategy

        port = free_port()
        kwargs = run_kwargs(port, self.labels, self.engine_options)
        ports = kwargs.pop("ports")
        command = kwargs.pop("command")
        environment = kwargs.pop("environment")
        started = time.monotonic()
        container = DockerContainer(
            self.image.ref,
            command=command,  # type: ignore[arg-type]
            env=environment,  # type: ignore[arg-type]
            docker_client_kw={"environment": {**os.environ, "DOCKER_HOST": self.engine_url}},
            **kwargs,
        )
        container.ports.update(ports)  # type: ignore[arg-type]
        container.waiting_for(LogMessageWaitStrategy(READY_TEXT))
        container.start()
        try:
            first_answer(port)
            return time.monotonic() - started
        finally:
            container.stop()

    def floor(self) -> float:
        """Container start (State.StartedAt) to the iocRun line, by the engine's clock."""
        return self._floors()[0]

    def engine_floor(self) -> float:
        """Container creation to the iocRun line: the floor plus the engine's create and start."""
        return self._floors()[1]

    def _floors(self) -> tuple[float, float]:
        port = free_port()
        kwargs = run_kwargs(port, self.labels, self.engine_options)
        container = self.client.containers.run(self.image.ref, detach=True, **kwargs)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                line = next((line for line in self._timestamped_log(container) if READY_TEXT in line), None)
                if line:
                    container.reload()
                    created = parse_docker_time(container.attrs["Created"])
                    started = parse_docker_time(container.attrs["State"]["StartedAt"])
                    ready = parse_docker_time(line.split(" ", 1)[0])
                    return (ready - started).total_seconds(), (ready - created).total_seconds()
                time.sleep(0.02)
            raise TimeoutError("no iocRun line")
        finally:
            container.remove(force=True)

    def _timestamped_log(self, container: Any) -> list[str]:
        """The container's output lines, each starting with the engine's RFC 3339 time."""
        if self.engine_name == "podman":
            # Podman 4.3's API gives whole seconds (2026-12-04T17:06:28Z); its k8s-file log
            # (the engine's LogPath, readable here as root) has nanoseconds.
            container.reload()
            return Path(container.attrs["LogPath"]).read_text(errors="replace").splitlines()
        return str(container.logs(timestamps=True).decode(errors="replace")).splitlines()

    def rebuild(self, policy: str) -> float:
        session = EpicsSession(
            Settings(arch=("linux/amd64",), image_policy=policy, engine=self.engine_choice),
            work_dir=self.work,
            progress=lambda m: None,
        )
        started = time.monotonic()
        session.image(self.config, self.target)
        seconds = time.monotonic() - started
        session.close()
        return seconds

    def qemu(self) -> float:
        target = self.config.target("linux/ppc64le")
        image = self.session.image(self.config, target)
        started = time.monotonic()
        ioc = self.session.start_ioc(self.config, target, image)
        ioc.ca.get(PV)
        seconds = time.monotonic() - started
        self.session.iocs.release(ioc, force=True)
        return seconds

    def close(self) -> None:
        self.session.close()  # closes the engine's client too


def measure(name: str, fn: Callable[[], float], repeat: int) -> list[float]:
    return report(name, [fn() for _ in range(repeat)])


def report(name: str, values: list[float]) -> list[float]:
    print(
        f"{name:<24} median {statistics.median(values):6.2f} s   spread {min(values):.2f}-{max(values):.2f} s"
        f"   ({', '.join(f'{v:.2f}' for v in values)})",
        flush=True,
    )
    return values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--skip-qemu", action="store_true")
    parser.add_argument("--engine", choices=("docker", "podman"), default="docker")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    labels = Owner.current().labels()
    with tempfile.TemporaryDirectory(prefix="epics-multiarch-bench-") as work:
        bench = Bench(Path(work), labels, args.engine)
        raw = f"raw {bench.engine_name} run + CA poll"
        try:
            print(
                f"image {bench.image.ref}; engine {bench.session.engine().describe()}; "
                f"{os.cpu_count()} cores; {args.repeat} repetitions\n",
                flush=True,
            )
            results = {
                "floor": measure("floor: start to iocRun", bench.floor, args.repeat),
                "engine": measure("floor: create to iocRun", bench.engine_floor, args.repeat),
                "plugin": measure("plugin, cold", bench.plugin, args.repeat),
                "spare": report("plugin, spare ready", bench.plugin_spare(args.repeat)),
                "raw": measure(raw, bench.raw, args.repeat),
                "testcontainers": measure("testcontainers log wait", bench.testcontainers, args.repeat),
                "auto": measure("rebuild, policy auto", lambda: bench.rebuild("auto"), args.repeat),
                "build": measure("rebuild, policy build", lambda: bench.rebuild("build"), args.repeat),
            }
            if not args.skip_qemu:
                results["qemu"] = measure("qemu guest boot to PV", bench.qemu, args.repeat)
        finally:
            bench.close()
    med = {name: statistics.median(values) for name, values in results.items()}
    print()
    print(f"plugin, spare / floor    {med['spare'] / med['floor']:.2f}x   (target <= 1.2x)")
    print(f"plugin, cold / floor     {med['plugin'] / med['floor']:.2f}x   (target <= 1.2x)")
    print(f"plugin, cold / create-to-iocRun {med['plugin'] / med['engine']:.2f}x")
    print(f"plugin, cold / raw {args.engine} run  {med['plugin'] / med['raw']:.2f}x")
    print(f"plugin, cold / testcontainers  {med['plugin'] / med['testcontainers']:.2f}x")
    print(f"unchanged rebuild (auto) {med['auto']:.2f} s   (target < 2 s)")
    cache = "BuildKit cache" if args.engine == "docker" else "podman build --layers=false: no cache"
    print(f"unchanged rebuild (build, {cache}) {med['build']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
