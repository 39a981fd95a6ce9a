"""Docker and Podman: where each one listens, how it builds, and what its containers need.

Everything that differs between the two engines lives here; the rest of the plugin talks to the
Docker-compatible API that both serve, through the docker SDK.

- Where: Docker at ``DOCKER_HOST`` or /var/run/docker.sock. Podman at ``CONTAINER_HOST``, its
  rootless socket ``$XDG_RUNTIME_DIR/podman/podman.sock``, or its rootful /run/podman/podman.sock;
  Podman has no daemon by default, so when no socket answers and the ``podman`` command exists,
  the plugin runs ``podman system service`` for the session on a socket of its own.
- Build: Docker through a BuildKit CLI (engine.find_build_cli); Podman through ``podman --url
  SOCKET build`` (remote mode: the image lands in the engine that runs the IOCs, whatever user
  owns it). Buildah sets TARGETPLATFORM/TARGETARCH as BuildKit does, and builds only the stages
  the target stage needs (checked with the sample Dockerfile and Debian's podman 4.3).
- Run: rootful Podman gets explicit, low ulimits; see ROOTFUL_PODMAN_ULIMITS.
- Which engine answered is read from its version (Podman names its "Podman Engine" component),
  not assumed from the choice: podman-docker serves Podman on Docker's socket.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.types
from docker.constants import MINIMUM_DOCKER_API_VERSION

from .errors import EngineError, EngineUnavailable, tail_lines

log = logging.getLogger("pytest_epics_multiarch.flavors")

DOCKER_SOCKET = "unix:///var/run/docker.sock"
PODMAN_ROOTFUL_SOCKET = "unix:///run/podman/podman.sock"
KINDS = ("docker", "podman")

#: Debian's podman 4.3 running as root here fails every container in runc ("error setting rlimit
#: type 6/7: operation not permitted") with its default nofile/nproc limits, or with nproc at the
#: host's limit; these explicit lower ones work (ENVIRONMENT.md, "Podman"; checked again with
#: podman run and podman build). An IOC needs far fewer: one descriptor per CA client, a few dozen
#: threads. Rootless Podman inherits the user's limits and needs none of this.
ROOTFUL_PODMAN_ULIMITS = (("nofile", 1024, 1024), ("nproc", 1000, 1000))


def rootless_podman_socket() -> str:
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.geteuid()}"
    return f"unix://{runtime}/podman/podman.sock"


def podman_sockets() -> list[str]:
    """Where a running Podman service would listen, most specific first."""
    if os.environ.get("CONTAINER_HOST"):
        return [os.environ["CONTAINER_HOST"]]
    return [PODMAN_ROOTFUL_SOCKET] if os.geteuid() == 0 else [rootless_podman_socket()]


def kind_of(version: dict[str, Any]) -> str:
    """ "podman" or "docker", from what the engine's /version says about itself."""
    names = " ".join(str(part.get("Name", "")) for part in version.get("Components") or [])
    return "podman" if "podman" in names.lower() else "docker"


def is_rootless(info: dict[str, Any]) -> bool:
    """Whether the engine runs without root (both list "name=rootless" among security options)."""
    return any("rootless" in str(option) for option in info.get("SecurityOptions") or [])


@dataclass(frozen=True)
class Flavor:
    """What one engine needs from the plugin beyond the common API."""

    kind: str
    rootless: bool
    #: The engine's version, as its /version says ("?" when unknown).
    version: str = "?"

    def container_options(self) -> dict[str, Any]:
        """Extra keyword arguments for creating an IOC container."""
        if self.kind == "podman" and not self.rootless:
            return {
                "ulimits": [
                    docker.types.Ulimit(name=name, soft=soft, hard=hard)
                    for name, soft, hard in ROOTFUL_PODMAN_ULIMITS
                ]
            }
        return {}

    def build_flags(self) -> list[str]:
        if self.kind != "podman":
            return []
        # No layer cache: buildah reuses a cached `ENV X=${ARG}` step built with another value
        # of the ARG (buildah issues #5095, #5501), so after a linux build the next target's
        # build ran with TARGET_ARCHITECTURE=linux (seen with the sample and podman 4.3). That
        # is exactly the epics-containers shape. The plugin's inputs label still skips
        # unchanged variants under --epics-image-policy=auto.
        flags = ["--layers=false"]
        if not self.rootless:
            flags += [f"--ulimit={name}={soft}:{hard}" for name, soft, hard in ROOTFUL_PODMAN_ULIMITS]
        return flags

    def registry_query(self, registry: str) -> dict[str, str]:
        """Query parameters that a pull from or push to ``registry`` needs on this engine.

        Docker talks plain HTTP to a registry on 127.0.0.0/8 without being told (dockerd's
        documentation, "Insecure registries": local registries in that range are marked
        insecure automatically); Podman only to registries that registries.conf marks insecure,
        or when the request says tlsVerify=false. The plugin says so for loopback registries, so
        a registry on this machine works alike on both engines; others keep Podman's default.
        """
        from .oci.reference import is_loopback  # here: the oci package imports the engine

        if self.kind == "podman" and is_loopback(registry):
            return {"tlsVerify": "false"}
        return {}

    def start_error_hint(self, message: str) -> str | None:
        """A hint for an engine-specific reason a container did not start, if we know one."""
        text = message.lower()
        if self.kind == "podman" and ("catatonit" in text or "init binary" in text or "init_path" in text):
            return "containers run with --init, which Podman serves with catatonit: apt-get install catatonit"
        if self.kind == "podman" and "rlimit" in text:
            return "Podman could not apply the container's ulimits; set default_ulimits in containers.conf"
        return None

    def registry_error_hint(self, message: str) -> str | None:
        """A hint for an engine-specific reason a pull or push failed, if we know one."""
        if self.kind == "podman" and "http response to https client" in message.lower():
            return (
                "the registry speaks plain HTTP, which Podman uses only for registries that "
                'registries.conf marks insecure: [[registry]] location="HOST:PORT" insecure=true'
            )
        return None


@dataclass(frozen=True)
class PodmanBuild:
    """``podman build`` in remote mode, against the socket the IOCs run from."""

    executable: str
    url: str
    flags: tuple[str, ...] = ()
    version: str = "?"

    def argv(self) -> list[str]:
        return [self.executable, "--url", self.url, "build", *self.flags]

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def describe(self) -> str:
        return f"{self.executable} {self.version} build (remote, {self.url})"


def find_podman_build(url: str, flavor: Flavor) -> PodmanBuild:
    exe = shutil.which("podman")
    if exe is None:
        raise EngineError(
            "the engine is Podman, but there is no podman command to build with",
            seen=f"Podman answers at {url}; no podman on PATH",
            hint="install podman (Debian: apt-get install podman), or use --epics-image-policy=pull",
        )
    try:
        version = subprocess.run(
            [exe, "--version"], capture_output=True, text=True, timeout=20, check=False
        ).stdout.split()[-1:]
    except (OSError, subprocess.TimeoutExpired):
        version = []
    return PodmanBuild(exe, url, tuple(flavor.build_flags()), version[0] if version else "?")


# -- a Podman service of the session's own ---------------------------------------------------


def _die_with_parent_hook() -> Callable[[], None]:
    """A ``preexec_fn`` asking the kernel to SIGTERM the child when pytest dies, even by SIGKILL.

    prctl(2) PR_SET_PDEATHSIG. libc is looked up here, in the parent: loading a library between
    fork and exec can deadlock when other threads held the loader's lock at the fork. The
    signal comes when the *thread* that forked ends; the plugin connects from the main thread.
    """
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def hook() -> None:  # pragma: no cover - runs in the child between fork and exec
        pr_set_pdeathsig = 1
        prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


@dataclass
class PodmanService:
    """``podman system service`` on a private socket, for one session; ``stop()`` ends it."""

    process: subprocess.Popen[bytes]
    folder: Path
    url: str
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.folder / "podman-service.log"

    @classmethod
    def start(cls, executable: str, timeout: float = 15.0) -> PodmanService:
        sweep_service_folders()
        # The owner's pid in the name: a later session removes the folder if its owner died.
        folder = Path(tempfile.mkdtemp(prefix=f"{SERVICE_FOLDER_PREFIX}{os.getpid()}-"))
        url = f"unix://{folder}/podman.sock"
        log_file = open(folder / "podman-service.log", "wb")  # the child writes it
        try:
            # --time=0: never exit on idle (a long build keeps no API call open); we stop it.
            process = subprocess.Popen(
                [executable, "system", "service", "--time=0", url],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches pytest, which stops the service itself
                preexec_fn=_die_with_parent_hook(),
            )
        except OSError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise EngineUnavailable(
                "could not start a Podman service", seen=f"{executable}: {exc}", hint="is podman installed?"
            ) from exc
        finally:
            log_file.close()
        service = cls(process, folder, url)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    break
                if (folder / "podman.sock").exists() and _answers(url):
                    log.info("started a Podman service for this session at %s (pid %d)", url, process.pid)
                    return service
                time.sleep(0.1)
        except BaseException:  # Ctrl-C while waiting: the service goes too
            service.stop()
            raise
        text = service.log_text()
        service.stop()
        raise EngineUnavailable(
            "the Podman service started for this session did not answer",
            seen=f"{executable} system service {url}: "
            + (
                f"exited with {process.returncode}"
                if process.returncode is not None
                else f"no answer in {timeout:.0f} s"
            ),
            tail=tail_lines(text, 10),
            hint="run 'podman system service --time=0' yourself and set CONTAINER_HOST to its socket",
        )

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        shutil.rmtree(self.folder, ignore_errors=True)


SERVICE_FOLDER_PREFIX = "pytest-epics-multiarch-podman-"


def sweep_service_folders() -> list[Path]:
    """Remove the socket folders of sessions that died without stopping their Podman service.

    Their service died with them (PR_SET_PDEATHSIG); the folder, holding its socket and log,
    stays behind. A folder is removed only when the pid in its name is no longer running.
    """
    removed: list[Path] = []
    for folder in Path(tempfile.gettempdir()).glob(SERVICE_FOLDER_PREFIX + "*-*"):
        pid_text = folder.name[len(SERVICE_FOLDER_PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit() or Path(f"/proc/{pid_text}").exists():
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _answers(url: str, timeout: float = 3.0) -> bool:
    try:
        client = docker.DockerClient(base_url=url, timeout=int(max(1, timeout)))
    except Exception:  # bad URL, missing socket: the SDK raises several types
        return False
    try:
        return bool(client.ping())
    except Exception:
        return False
    finally:
        client.close()


@dataclass
class Connection:
    """An engine that answered: its client, where, what it is, and the service we started."""

    client: docker.DockerClient
    url: str
    flavor: Flavor
    service: PodmanService | None = None


def _open(url: str, timeout: float) -> tuple[docker.DockerClient, Flavor]:
    """A client of the engine at ``url`` that answered, and which engine it is.

    One /version call, unversioned (the engine answers with its own API version), tells both
    which engine this is and what API version to speak. A client left to find that out asks
    /version itself, and Podman 4.3 takes about 0.5 s to answer each time.
    """
    probe = docker.DockerClient(base_url=url, timeout=int(timeout), version=MINIMUM_DOCKER_API_VERSION)
    try:
        answer = probe.api.get(f"{probe.api.base_url}/version", timeout=timeout)
        answer.raise_for_status()
        version: dict[str, Any] = answer.json()
    finally:
        probe.close()
    api_version = str(version.get("ApiVersion") or "auto")
    client = docker.DockerClient(base_url=url, timeout=int(timeout), version=api_version)
    try:
        return client, _identify(client, version)
    except BaseException:
        client.close()
        raise


def connect(choice: str = "auto", timeout: float = 10.0) -> Connection:
    """The engine ``choice`` names (docker, podman or auto), connected and identified.

    auto: an explicit DOCKER_HOST is the user's choice of engine and the only one tried;
    otherwise Docker's socket, then Podman's, then a Podman service started for the session.
    """
    if choice not in (*KINDS, "auto"):
        raise EngineError(f"unknown engine {choice!r}", hint="use docker, podman or auto")
    docker_host = os.environ.get("DOCKER_HOST")
    urls: list[str] = []
    if choice in ("docker", "auto"):
        urls.append(docker_host or DOCKER_SOCKET)
    if choice == "podman" or (choice == "auto" and not docker_host):
        urls += [url for url in podman_sockets() if url not in urls]
    tried: list[str] = []
    for url in urls:
        try:
            client, flavor = _open(url, timeout)
        except Exception as exc:  # the SDK raises several unrelated types here
            tried.append(f"{url}: {exc}")
            continue
        return Connection(client, url, flavor)
    podman = shutil.which("podman")
    if podman and (choice == "podman" or (choice == "auto" and not docker_host)):
        try:
            service = PodmanService.start(podman)
        except EngineUnavailable as exc:
            # Say what was tried before the service too (Docker's socket, Podman's).
            exc.seen = "; ".join([*tried, exc.seen or ""]).strip("; ")
            raise
        try:
            client, flavor = _open(service.url, timeout)
        except BaseException:
            service.stop()
            raise
        return Connection(client, service.url, flavor, service)
    if podman is None and choice == "podman":
        tried.append("no podman command to start a service with")
    if choice == "podman":
        what, hint = (
            "no Podman engine answers",
            "install podman (Debian: apt-get install podman catatonit), or start "
            "'podman system service' and set CONTAINER_HOST to its socket",
        )
    elif choice == "docker" or docker_host:
        what, hint = (
            "no Docker engine answers",
            "start dockerd (Debian: apt-get install docker.io && dockerd &), "
            "or point DOCKER_HOST at a running engine",
        )
    else:
        what, hint = (
            "no container engine answers",
            "start dockerd (Debian: apt-get install docker.io && dockerd &) or install podman, "
            "or point DOCKER_HOST at a running engine",
        )
    raise EngineUnavailable(what, seen="; ".join(tried), hint=hint)


def _identify(client: docker.DockerClient, version: dict[str, Any]) -> Flavor:
    """The engine's flavor, from its /version answer and its /info."""
    try:
        rootless = is_rootless(client.info())
    except docker.errors.APIError:
        rootless = False
    return Flavor(kind_of(version), rootless, str(version.get("Version") or "?"))
