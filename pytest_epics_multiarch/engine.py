"""The container engine: connection, ownership labels, leftover sweeping, and the BuildKit CLI.

Every container the plugin starts carries labels that name the session and the process that
owns it (pid, host, and the process start time so that a reused pid is not mistaken for the
owner). A later session removes a labelled container only when its owner is dead and it was
not kept on purpose; containers without our labels are never touched.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import urllib.parse
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

# Ryuk (testcontainers' reaper) is pulled from Docker Hub, which these machines can't reach, and
# the plugin cleans up itself: disable it before testcontainers is imported anywhere.
os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")

import docker
import docker.auth
import docker.errors
import requests

from .errors import EngineError, ImageError
from .flavors import DOCKER_SOCKET, Flavor, PodmanService, connect, find_podman_build

log = logging.getLogger("pytest_epics_multiarch.engine")

LABEL_PREFIX = "io.github.pytest-epics-multiarch"
LABEL_SESSION = f"{LABEL_PREFIX}.session"
LABEL_OWNER_PID = f"{LABEL_PREFIX}.owner-pid"
LABEL_OWNER_START = f"{LABEL_PREFIX}.owner-start"
LABEL_OWNER_HOST = f"{LABEL_PREFIX}.owner-host"
LABEL_KEEP = f"{LABEL_PREFIX}.keep"
LABEL_TARGET = f"{LABEL_PREFIX}.target"
LABEL_CA_PORT = f"{LABEL_PREFIX}.ca-port"
LABEL_INPUTS = f"{LABEL_PREFIX}.inputs"


def process_start_ticks(pid: int) -> str:
    """The start time of ``pid`` in clock ticks since boot ("" when unknown or gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else ""


@dataclass(frozen=True)
class Owner:
    """The process that owns the containers of a session."""

    session: str
    pid: int
    start: str
    host: str

    @classmethod
    def current(cls, session: str | None = None) -> Owner:
        pid = os.getpid()
        return cls(
            session=session or uuid.uuid4().hex[:12],
            pid=pid,
            start=process_start_ticks(pid),
            host=socket.gethostname(),
        )

    def labels(self, *, keep: bool = False, **extra: str) -> dict[str, str]:
        labels = {
            LABEL_SESSION: self.session,
            LABEL_OWNER_PID: str(self.pid),
            LABEL_OWNER_START: self.start,
            LABEL_OWNER_HOST: self.host,
        }
        if keep:
            labels[LABEL_KEEP] = "true"
        labels.update(extra)
        return labels


def owner_is_alive(labels: dict[str, str], host: str) -> bool:
    """Whether the process named by a container's labels still runs (unknown counts as alive)."""
    if labels.get(LABEL_OWNER_HOST) != host:
        return True  # another machine's container (shared engine): not ours to judge
    try:
        pid = int(labels.get(LABEL_OWNER_PID, ""))
    except ValueError:
        return True
    start = process_start_ticks(pid)
    if not start:
        return False
    recorded = labels.get(LABEL_OWNER_START, "")
    return not recorded or recorded == start


class Engine:
    """A connected container engine: the SDK client plus what the plugin asks of it.

    Docker or Podman: both serve the Docker-compatible API; :mod:`.flavors` holds the differences.
    """

    def __init__(
        self,
        client: docker.DockerClient,
        url: str = "",
        flavor: Flavor | None = None,
        service: PodmanService | None = None,
    ) -> None:
        self.client = client
        self.url = url or os.environ.get("DOCKER_HOST", DOCKER_SOCKET)
        self.flavor = flavor or Flavor("docker", rootless=False)
        #: A Podman service the plugin started for this session (stopped by close()).
        self.service = service

    @classmethod
    def connect(cls, timeout: float = 10.0, choice: str = "auto") -> Engine:
        """The engine ``choice`` names (docker, podman or auto); see :func:`.flavors.connect`."""
        connection = connect(choice, timeout)
        return cls(connection.client, connection.url, connection.flavor, connection.service)

    @property
    def kind(self) -> str:
        return self.flavor.kind

    def close(self) -> None:
        """Close the client; stop the Podman service if this session started it."""
        self.client.close()
        if self.service is not None:
            self.service.stop()
            self.service = None

    @cached_property
    def version(self) -> str:
        if self.flavor.version != "?":
            return self.flavor.version  # read when connecting
        try:
            info: dict[str, Any] = self.client.version()
            return str(info.get("Version", "?"))
        except docker.errors.APIError:
            return "?"

    def describe(self) -> str:
        rootless = " (rootless)" if self.flavor.rootless else ""
        started = ", started for this session" if self.service is not None else ""
        return f"{self.kind} {self.version}{rootless} at {self.url}{started}"

    def image_id(self, ref: str) -> str | None:
        """The local image id of ``ref``, or None when the engine has no such image."""
        try:
            return str(self.client.images.get(ref).id)
        except docker.errors.ImageNotFound:
            return None
        except docker.errors.APIError as exc:
            # Not a valid image name at all: Docker says "invalid reference format", Podman
            # (a 500) "normalizing name ...: repository name must be lowercase".
            if any(text in str(exc).lower() for text in ("invalid reference", "normalizing name")):
                return None
            raise

    def pull(self, ref: str, platform: str) -> None:
        """Pull ``ref`` for ``platform``; APIError carries what the engine or registry said.

        Reads the progress stream itself: the SDK's ``images.pull`` drops its errors, so a
        refused pull surfaces as ImageNotFound, or silently leaves a stale local image in place.
        """
        with _stream_errors_as_api_errors():
            registry = registry_of(ref)
            query = self.flavor.registry_query(registry)
            if self.kind == "podman":
                # Podman's Docker-compatible pull ignores tlsVerify (seen with podman 4.3.1); its
                # own endpoint takes it, with the platform in parts.
                os_name, arch, variant = [*platform.split("/"), "", ""][:3]
                params = {"reference": ref, "os": os_name, "arch": arch, "variant": variant, **query}
                self._post_stream("/libpod/images/pull", params, registry)
                return
            name, _, digest = ref.partition("@")
            repo, tag = (name, digest) if digest else split_ref(ref)
            lines = self.client.api.pull(repo, tag=tag, platform=platform, stream=True, decode=True)
            raise_stream_error(lines)

    def push(self, ref: str) -> None:
        """Push the local image ``ref`` to its registry; APIError carries what went wrong."""
        with _stream_errors_as_api_errors():
            registry = registry_of(ref)
            repo, tag = split_ref(ref)
            query = self.flavor.registry_query(registry)
            if query:
                # The SDK's push takes no extra query; Podman's compatible push takes tlsVerify.
                path = f"/images/{urllib.parse.quote(repo, safe='')}/push"
                self._post_stream(path, {"tag": tag, **query}, registry)
                return
            raise_stream_error(self.client.images.push(repo, tag=tag, stream=True, decode=True))

    def _post_stream(self, path: str, params: dict[str, str], registry: str) -> None:
        """POST to the engine's API with the registry's credentials; fail on an error line."""
        api = self.client.api
        headers = {}
        auth_header = docker.auth.get_config_header(api, registry)
        if auth_header:
            headers["X-Registry-Auth"] = auth_header
        url = f"{api.base_url}/v{api.api_version}{path}"
        # No read timeout, as the SDK's own pull: a large layer can keep the stream quiet a while.
        with api.post(url, params=params, headers=headers, stream=True, timeout=None) as response:
            if response.status_code >= 400:
                try:
                    explanation = str(response.json().get("message") or response.text)
                except ValueError:
                    explanation = response.text
                raise docker.errors.APIError(explanation, response=response, explanation=explanation)
            raise_stream_error(_json_lines(response.iter_lines()))

    def sweep_leftovers(self, host: str) -> list[str]:
        """Remove containers of dead sessions on this host; return their names."""
        removed: list[str] = []
        try:
            containers = self.client.containers.list(all=True, filters={"label": LABEL_SESSION})
        except docker.errors.APIError as exc:
            log.warning("could not list leftover containers: %s", exc)
            return removed
        for container in containers:
            labels = container.labels or {}
            if labels.get(LABEL_KEEP) == "true" or owner_is_alive(labels, host):
                continue
            try:
                container.remove(force=True)
                removed.append(str(container.name))
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as exc:
                log.warning("could not remove leftover container %s: %s", container.name, exc)
        return removed


def split_ref(ref: str) -> tuple[str, str]:
    """``host:port/repo:tag`` -> (``host:port/repo``, ``tag``); the tag defaults to latest."""
    last = ref.rsplit("/", 1)[-1]
    if ":" in last:
        repo, tag = ref.rsplit(":", 1)
        return repo, tag
    return ref, "latest"


def registry_of(ref: str) -> str:
    """The registry part of an image reference (docker.io for Docker Hub; "" if malformed)."""
    from .oci.reference import parse_reference  # here: the oci package imports this module

    try:
        return parse_reference(ref).registry
    except ImageError:  # the engine then says what is wrong with the name
        return ""


@contextlib.contextmanager
def _stream_errors_as_api_errors() -> Iterator[None]:
    """A broken connection to the engine fails a pull or push like the engine's own errors."""
    try:
        yield
    except requests.RequestException as exc:
        message = f"the connection to the engine broke off: {exc}"
        raise docker.errors.APIError(message, explanation=message) from exc


def _json_lines(lines: Iterable[bytes]) -> Iterator[Any]:
    """The JSON objects of a progress stream; a line that is not JSON is passed on as text."""
    for line in lines:
        if line.strip():
            try:
                yield json.loads(line)
            except ValueError:
                yield {"stream": line.decode(errors="replace")}


def raise_stream_error(lines: Iterable[Any]) -> None:
    """Read a pull or push progress stream to its end; raise APIError on its first error line."""
    for line in lines:
        if isinstance(line, dict) and line.get("error"):
            message = str(line["error"])
            raise docker.errors.APIError(message, explanation=message)


class Builder(Protocol):
    """A command line that builds images into the engine (BuildKit's docker CLI, podman build)."""

    def argv(self) -> list[str]: ...

    def env(self) -> dict[str, str]: ...

    def describe(self) -> str: ...


def find_builder(engine: Engine, docker_cli: str | None = None) -> Builder:
    """How to build for ``engine``: ``podman build`` for Podman, a BuildKit docker CLI for Docker."""
    if engine.kind == "podman":
        return find_podman_build(engine.url, engine.flavor)
    return find_build_cli(docker_cli)


@dataclass(frozen=True)
class BuildCli:
    """A docker CLI that builds with BuildKit: ``buildx build --load``, or 20.10's built-in."""

    executable: str
    buildx: bool
    version: str

    def argv(self) -> list[str]:
        build = [self.executable, "buildx", "build", "--load"] if self.buildx else [self.executable, "build"]
        return [*build, "--progress=plain"]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if not self.buildx:
            # Docker CLIs before 23.0 build with BuildKit themselves when asked this way.
            env["DOCKER_BUILDKIT"] = "1"
        return env

    def describe(self) -> str:
        how = "buildx" if self.buildx else "DOCKER_BUILDKIT=1"
        return f"{self.executable} {self.version} ({how})"


def _run(argv: list[str]) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None


def _candidates(preferred: str | None) -> list[str]:
    if preferred:
        return [preferred]
    found: list[str] = []
    for folder in [*os.environ.get("PATH", "").split(os.pathsep), "/usr/bin", "/usr/local/bin"]:
        path = Path(folder) / "docker"
        if path.is_file() and os.access(path, os.X_OK):
            real = str(path.resolve())
            if real not in found:
                found.append(real)
    return found


def find_build_cli(preferred: str | None = None) -> BuildCli:
    """The first docker CLI here that builds with BuildKit (buildx preferred)."""
    tried: list[str] = []
    for exe in _candidates(preferred):
        if not shutil.which(exe):
            tried.append(f"{exe}: not found")
            continue
        buildx = _run([exe, "buildx", "version"])
        version_run = _run([exe, "version", "--format", "{{.Client.Version}}"])
        version = version_run.stdout.strip() if version_run is not None else "?"
        if buildx is not None and buildx.returncode == 0:
            return BuildCli(exe, True, version)
        major = re.match(r"(\d+)\.", version)
        if major and int(major.group(1)) < 23:
            return BuildCli(exe, False, version)
        tried.append(f"{exe} {version}: no buildx plugin, and 23.0+ needs buildx for BuildKit")
    raise EngineError(
        "no docker CLI here builds with BuildKit",
        seen="; ".join(tried) or "no docker CLI on PATH",
        hint="install the buildx plugin for your docker CLI, or Debian's docker.io (its 20.10 "
        "CLI at /usr/bin/docker builds with DOCKER_BUILDKIT=1); choose one with --epics-docker-cli",
    )
