"""Linux soft IOCs in containers.

testcontainers owns the container's life (create, start, remove); the docker SDK does what it
doesn't: attaching to the IOC's tty for its shell and watching the container's state. The CA
server listens on a port N chosen here; the container publishes N/tcp and N/udp on 127.0.0.1
only, with the same number inside, because a CA search reply tells the client which TCP port to
connect to (see ENVIRONMENT notes in the README).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import docker.errors
from testcontainers.core.container import DockerContainer

from ..console import Console
from ..engine import LABEL_CA_PORT, LABEL_TARGET, Engine
from ..errors import IocError, IocStartError
from .base import ConsoleRunner, ReadyProbe, free_port

log = logging.getLogger("pytest_epics_multiarch.runners.container")

#: Docker's messages when a published port was taken between choosing it and binding it.
_PORT_TAKEN = ("port is already allocated", "address already in use")


class ContainerIoc(ConsoleRunner):
    """One soft IOC in a container: ``start()`` returns once it serves Channel Access."""

    # The readiness PV is named in the config too: when it never answers after iocRun, a wrong
    # ioc.ready_pv is likelier than a slow IOC, and the hint said nothing of it.
    start_hint = (
        "read the IOC log above; if the IOC is just slow, raise ioc.start_timeout in epics-multiarch.yaml; "
        "if it reached iocRun, check that ioc.ready_pv names one of its records"
    )

    def __init__(
        self,
        engine: Engine,
        image: str,
        *,
        target: str,
        labels: Mapping[str, str],
        command: Sequence[str] | None = None,
        environment: Mapping[str, str] | None = None,
        workdir: str | None = None,
        start_timeout: float = 60.0,
        log_path: Path | None = None,
        ready_probe: ReadyProbe | None = None,
    ) -> None:
        super().__init__(
            target=target,
            name=f"container of {image}",
            start_timeout=start_timeout,
            log_path=log_path,
            ready_probe=ready_probe,
        )
        self.engine = engine
        self.image = image
        self.labels = dict(labels)
        self.command = list(command) if command else None
        self.environment = dict(environment or {})
        self.workdir = workdir
        self._tc: DockerContainer | None = None
        self._socket: Any = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        started = time.monotonic()
        for attempt in range(5):
            port = free_port()
            try:
                self._create_and_start(port)
                break
            except docker.errors.APIError as exc:
                self._remove_container()
                self._note(f"# the start failed: {getattr(exc, 'explanation', None) or exc}")
                port_taken = any(text in str(exc) for text in _PORT_TAKEN)
                if port_taken and attempt < 4:
                    log.info("%s: port %d was taken meanwhile, trying another", self.target, port)
                    continue
                raise IocStartError(
                    f"could not start a container of {self.image}",
                    target=self.target,
                    seen=str(getattr(exc, "explanation", None) or exc),
                    # The image and the config are not to blame when every port tried was taken.
                    hint=f"{attempt + 1} free ports in a row were taken before the container could "
                    "publish them: something on this machine is grabbing ports quickly (see ss -ltnup)"
                    if port_taken
                    else self.engine.flavor.start_error_hint(str(exc))
                    or "check the image's command and the ioc: section of epics-multiarch.yaml",
                ) from exc
        self._attach_console()
        self._wait_ready(started)
        self.start_seconds = time.monotonic() - started

    def _create_and_start(self, port: int) -> None:
        environment = {**self.environment, "EPICS_CA_SERVER_PORT": str(port)}
        labels = {**self.labels, LABEL_CA_PORT: str(port), LABEL_TARGET: self.target}
        kwargs: dict[str, Any] = {
            "labels": labels,
            # An init process forwards SIGTERM: softIoc as PID 1 ignores it and stops take 10 s.
            "init": True,
            # iocsh exits at end of input: keep stdin open on a tty so the shell stays up.
            "stdin_open": True,
            "tty": True,
            # The default bridge, never the host network.
            "network_mode": "bridge",
            "privileged": False,
        }
        if self.workdir:
            kwargs["working_dir"] = self.workdir
        kwargs.update(self.engine.flavor.container_options())  # e.g. rootful Podman's ulimits
        # testcontainers makes its own client from the environment: point it at our engine, and
        # name the API version the engine's client settled on. Else the new client asks the
        # engine's /version first, which took Podman 4.3 about 0.5 s of every start here.
        client_kw = {
            "environment": {**os.environ, "DOCKER_HOST": self.engine.url},
            "version": self.engine.client.api.api_version,
        }
        # testcontainers passes the command straight to the SDK, which takes a list as well.
        tc = DockerContainer(
            self.image,
            docker_client_kw=client_kw,
            command=self.command,  # type: ignore[arg-type]
            env=environment,
            **kwargs,
        )
        # with_bind_ports can't name a host IP; the ports mapping can: loopback only.
        tc.ports[f"{port}/tcp"] = ("127.0.0.1", port)  # type: ignore[assignment]
        tc.ports[f"{port}/udp"] = ("127.0.0.1", port)  # type: ignore[assignment]
        self._tc = tc
        self.ca_address = ("127.0.0.1", port)
        command = " ".join(self.command) if self.command else "the image's command"
        self._note(f"$ {self.engine.kind} run {self.image}: {command}; CA on 127.0.0.1:{port}")
        tc.start()
        container = tc.get_wrapped_container()
        self.name = f"container {container.name} ({self.image})"
        log.info("%s: started %s, CA on 127.0.0.1:%d", self.target, self.name, port)

    def _attach_console(self) -> None:
        container = self._container()
        # logs=1 replays what the IOC printed before we attached, so the console sees it all.
        sock = self.engine.client.api.attach_socket(
            container.id, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1, "logs": 1}
        )
        raw = getattr(sock, "_sock", sock)
        self._socket = sock
        self._console = Console(
            lambda: raw.recv(65536),
            raw.sendall,
            name=self.name,
            target=self.target,
            log_path=self.log_path,
        )

    def _exit_description(self) -> str | None:
        state = self._state()
        if state.get("Status") == "exited":
            return f"the container exited with code {state.get('ExitCode')}"
        return None

    def stop(self) -> None:
        """Remove the container; safe to call twice, and after a failed start."""
        if self._stopped:
            return
        self._stopped = True
        if self._socket is not None:
            try:
                self._socket.close()
            except OSError:
                pass
        self._remove_container()
        if self._console is not None:
            self._console.close()

    def _remove_container(self) -> None:
        tc, self._tc = self._tc, None
        if tc is None:
            return
        try:
            tc.stop()
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            log.warning("%s: could not remove %s: %s", self.target, self.name, exc)

    # -- what tests use ----------------------------------------------------------------------

    def _container(self) -> Any:
        if self._tc is None:
            raise IocError(f"{self.name} is not running", target=self.target)
        return self._tc.get_wrapped_container()

    def _state(self) -> dict[str, Any]:
        try:
            container = self._container()
            container.reload()
            return dict(container.attrs.get("State") or {})
        except (docker.errors.NotFound, IocError):
            return {"Status": "removed"}

    def is_running(self) -> bool:
        return self._state().get("Status") == "running"

    def logs(self) -> str:
        if self._tc is None:
            return self._console.text() if self._console else ""
        try:
            return str(self._container().logs().decode("utf-8", errors="replace")).replace("\r", "")
        except docker.errors.APIError:
            return self._console.text() if self._console else ""

    def reach_hint(self) -> str:
        host, port = self.ca_address
        container = self._container()
        return (
            f"{self.target}: {container.name} serves CA on {host}:{port} "
            f"(EPICS_CA_ADDR_LIST={host}:{port} EPICS_CA_AUTO_ADDR_LIST=NO caget ...); "
            f"shell: {self.engine.kind} attach {container.name}; "
            f"remove: {self.engine.kind} rm -f {container.name}"
        )
