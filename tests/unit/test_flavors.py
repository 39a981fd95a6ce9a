"""Docker and Podman differences, without an engine: identification, options, builds, choice."""

from __future__ import annotations

import os
from pathlib import Path

import docker.errors
import pytest
import requests

from pytest_epics_multiarch import engine as engine_module
from pytest_epics_multiarch import flavors
from pytest_epics_multiarch.engine import BuildCli, Engine, find_builder, raise_stream_error, registry_of
from pytest_epics_multiarch.errors import EngineError, EngineUnavailable
from pytest_epics_multiarch.flavors import Flavor, PodmanBuild

PODMAN_VERSION = {
    "Version": "4.3.1",
    "Components": [{"Name": "Podman Engine", "Version": "4.3.1"}, {"Name": "Conmon"}],
}
DOCKER_VERSION = {"Version": "20.10.24", "Components": [{"Name": "Engine"}, {"Name": "containerd"}]}


def test_the_engine_is_identified_by_what_it_says_of_itself() -> None:
    assert flavors.kind_of(PODMAN_VERSION) == "podman"
    assert flavors.kind_of(DOCKER_VERSION) == "docker"
    assert flavors.kind_of({}) == "docker"
    assert flavors.is_rootless({"SecurityOptions": ["name=seccomp,profile=default", "name=rootless"]})
    assert not flavors.is_rootless({"SecurityOptions": ["name=seccomp,profile=default"]})


def test_only_rootful_podman_gets_explicit_ulimits() -> None:
    [nofile, nproc] = Flavor("podman", rootless=False).container_options()["ulimits"]
    assert (nofile.name, nofile.soft, nofile.hard) == ("nofile", 1024, 1024)
    assert (nproc.name, nproc.soft, nproc.hard) == ("nproc", 1000, 1000)
    assert Flavor("podman", rootless=False).build_flags() == [
        "--layers=false",
        "--ulimit=nofile=1024:1024",
        "--ulimit=nproc=1000:1000",
    ]
    assert Flavor("podman", rootless=True).container_options() == {}
    assert Flavor("podman", rootless=True).build_flags() == ["--layers=false"]
    assert Flavor("docker", rootless=False).build_flags() == []
    assert Flavor("docker", rootless=False).container_options() == {}


def test_podman_start_errors_get_a_podman_hint() -> None:
    podman = Flavor("podman", rootless=False)
    assert "catatonit" in (podman.start_error_hint('container create: "catatonit" not found in $PATH') or "")
    assert "containers.conf" in (podman.start_error_hint("error setting rlimit type 7") or "")
    assert podman.start_error_hint("no such image") is None
    assert Flavor("docker", rootless=False).start_error_hint("catatonit") is None


@pytest.mark.parametrize(
    ("kind", "registry", "query"),
    [
        ("podman", "127.0.0.1:5055", {"tlsVerify": "false"}),
        ("podman", "127.3.4.5:5000", {"tlsVerify": "false"}),
        ("podman", "localhost:5000", {"tlsVerify": "false"}),
        ("podman", "[::1]:5000", {"tlsVerify": "false"}),
        ("podman", "registry.example.org", {}),
        ("podman", "docker.io", {}),
        ("docker", "127.0.0.1:5055", {}),  # Docker assumes it by itself
    ],
)
def test_podman_is_told_that_loopback_registries_speak_plain_http(
    kind: str, registry: str, query: dict[str, str]
) -> None:
    assert Flavor(kind, rootless=False).registry_query(registry) == query


def test_podmans_refusal_of_plain_http_gets_a_registries_conf_hint() -> None:
    message = 'pinging container registry reg.example:5000: Get "https://reg.example:5000/v2/": http: server gave HTTP response to HTTPS client'
    assert "registries.conf" in (Flavor("podman", rootless=False).registry_error_hint(message) or "")
    assert Flavor("podman", rootless=False).registry_error_hint("manifest unknown") is None
    assert Flavor("docker", rootless=False).registry_error_hint(message) is None


def test_podman_builds_remotely_against_the_engines_socket() -> None:
    build = PodmanBuild(
        "/usr/bin/podman", "unix:///tmp/x/podman.sock", ("--ulimit=nofile=1024:1024",), "4.3.1"
    )
    assert build.argv() == [
        "/usr/bin/podman",
        "--url",
        "unix:///tmp/x/podman.sock",
        "build",
        "--ulimit=nofile=1024:1024",
    ]
    assert "remote" in build.describe() and "4.3.1" in build.describe()


def test_docker_builds_show_plain_progress() -> None:
    assert BuildCli("/usr/bin/docker", False, "20.10.24").argv() == [
        "/usr/bin/docker",
        "build",
        "--progress=plain",
    ]
    assert BuildCli("docker", True, "28.0").argv()[:4] == ["docker", "buildx", "build", "--load"]


def test_the_builder_follows_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeClient:
        def close(self) -> None:
            pass

    monkeypatch.setattr(flavors.shutil, "which", lambda name: f"/usr/bin/{name}")
    podman = Engine(FakeClient(), "unix:///p.sock", Flavor("podman", rootless=False))  # type: ignore[arg-type]
    builder = find_builder(podman)
    assert isinstance(builder, PodmanBuild) and builder.url == "unix:///p.sock"
    monkeypatch.setattr(flavors.shutil, "which", lambda name: None)
    with pytest.raises(EngineError, match="no podman command"):
        find_builder(podman)


def test_podman_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONTAINER_HOST", "unix:///somewhere/podman.sock")
    assert flavors.podman_sockets() == ["unix:///somewhere/podman.sock"]
    monkeypatch.delenv("CONTAINER_HOST")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert flavors.podman_sockets() == ["unix:///run/podman/podman.sock"]
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert flavors.podman_sockets() == ["unix:///run/user/1000/podman/podman.sock"]


@pytest.fixture
def no_engine_here(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """Every socket is dead; records attempts to start a Podman service instead of starting one."""
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    monkeypatch.setenv("CONTAINER_HOST", f"unix://{tmp_path}/no-podman.sock")
    monkeypatch.setattr(flavors, "DOCKER_SOCKET", f"unix://{tmp_path}/no-docker.sock")
    started: list[str] = []

    def fake_start(executable: str, timeout: float = 15.0) -> flavors.PodmanService:
        started.append(executable)
        raise EngineUnavailable("the Podman service started for this session did not answer")

    monkeypatch.setattr(flavors.PodmanService, "start", staticmethod(fake_start))
    monkeypatch.setattr(flavors.shutil, "which", lambda name: "/usr/bin/podman" if name == "podman" else None)
    return started


def test_auto_tries_docker_then_podman_then_a_service(no_engine_here: list[str]) -> None:
    with pytest.raises(EngineUnavailable, match="did not answer") as info:
        flavors.connect("auto", timeout=1)
    assert no_engine_here == ["/usr/bin/podman"]
    # The error says every socket tried before the service, not only the service.
    seen = info.value.seen or ""
    assert "no-docker.sock" in seen and "no-podman.sock" in seen, seen


def test_an_explicit_docker_host_is_the_only_engine_auto_tries(
    no_engine_here: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/dead.sock")
    with pytest.raises(EngineUnavailable) as info:
        flavors.connect("auto", timeout=1)
    assert info.value.what == "no Docker engine answers" and "dead.sock" in (info.value.seen or "")
    assert no_engine_here == []


def test_docker_never_falls_back_to_podman(no_engine_here: list[str]) -> None:
    with pytest.raises(EngineUnavailable) as info:
        flavors.connect("docker", timeout=1)
    assert info.value.what == "no Docker engine answers" and "start dockerd" in (info.value.hint or "")
    assert no_engine_here == []


def test_podman_without_the_podman_command_says_how_to_install_it(
    no_engine_here: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(flavors.shutil, "which", lambda name: None)
    with pytest.raises(EngineUnavailable) as info:
        flavors.connect("podman", timeout=1)
    assert info.value.what == "no Podman engine answers"
    assert "no-podman.sock" in (info.value.seen or "") and "no podman command" in (info.value.seen or "")
    assert "apt-get install podman" in (info.value.hint or "")


def test_an_unknown_engine_is_refused() -> None:
    with pytest.raises(EngineError, match="unknown engine 'containerd'"):
        flavors.connect("containerd")


def test_socket_folders_of_dead_sessions_are_swept(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(flavors.tempfile, "gettempdir", lambda: str(tmp_path))
    alive = tmp_path / f"{flavors.SERVICE_FOLDER_PREFIX}{os.getpid()}-abc"
    dead = tmp_path / f"{flavors.SERVICE_FOLDER_PREFIX}999999999-abc"
    other = tmp_path / "pytest-epics-multiarch-podman-notapid-x"
    for folder in (alive, dead, other):
        folder.mkdir()
    assert flavors.sweep_service_folders() == [dead]
    assert alive.exists() and other.exists() and not dead.exists()


def test_a_pull_or_push_stream_fails_on_its_first_error_line() -> None:
    stream = [
        {"status": "Pulling"},
        {"stream": "Copying blob\n"},
        {"error": "manifest unknown"},
        {"status": "x"},
    ]
    with pytest.raises(docker.errors.APIError, match="manifest unknown"):
        raise_stream_error(iter(stream))
    raise_stream_error(iter([{"status": "done"}, {"images": ["abc"], "id": "abc"}]))  # no error: returns


def test_the_registry_of_a_reference() -> None:
    assert registry_of("127.0.0.1:5055/a/b:dev") == "127.0.0.1:5055"
    assert registry_of("debian:bookworm") == "docker.io"
    assert registry_of("UPPER/Case::") == ""  # malformed: the engine says what is wrong


def test_a_broken_engine_connection_fails_a_pull_like_an_engine_error() -> None:
    class Broken(Engine):
        def __init__(self) -> None:
            super().__init__(client=None, flavor=Flavor("podman", rootless=False))  # type: ignore[arg-type]

        def _post_stream(self, path: str, params: dict[str, str], registry: str) -> None:
            raise requests.ReadTimeout("read timed out")

    with pytest.raises(docker.errors.APIError, match="the connection to the engine broke off: read timed out"):
        Broken().pull("127.0.0.1:5055/a/b:1", "linux/amd64")


def test_progress_lines_that_are_not_json_pass_as_text() -> None:
    lines = [b'{"stream": "Copying blob"}', b"", b"plain text", b'{"error": "denied"}']
    assert list(engine_module._json_lines(lines)) == [
        {"stream": "Copying blob"},
        {"stream": "plain text"},
        {"error": "denied"},
    ]
