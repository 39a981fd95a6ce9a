"""Containers the plugin owns: kept on request, swept when their owner died, others untouched."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from pytest_epics_multiarch.engine import LABEL_KEEP, LABEL_SESSION, Engine, Owner

from .conftest import BASE_IMAGE, SAMPLE

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("subprocess_env")]


@pytest.fixture
def client() -> Iterator[docker.DockerClient]:
    client = docker.from_env()
    yield client
    client.close()


def dead_owner() -> Owner:
    """The identity of a process that has exited (its pid is free or reused)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return Owner(session="deadbeef0000", pid=proc.pid, start="1", host=Owner.current().host)


def idle_container(client: docker.DockerClient, labels: dict[str, str]) -> docker.models.containers.Container:
    return client.containers.create(BASE_IMAGE, command=["sleep", "60"], labels=labels)


def test_sweep_removes_only_dead_sessions_leftovers(client: docker.DockerClient) -> None:
    dead = idle_container(client, dead_owner().labels())
    kept = idle_container(client, dead_owner().labels(keep=True))
    alive = idle_container(client, Owner.current().labels())
    foreign = idle_container(client, {"someone.else": "yes"})
    try:
        removed = Engine(client).sweep_leftovers(Owner.current().host)
        names = {c.name for c in client.containers.list(all=True)}
        assert dead.name in removed and dead.name not in names
        assert {kept.name, alive.name, foreign.name} <= names
    finally:
        for container in (dead, kept, alive, foreign):
            try:
                container.remove(force=True)
            except docker.errors.NotFound:
                pass


def test_keep_iocs_leaves_the_ioc_running_and_says_how_to_reach_it(
    pytester: pytest.Pytester, client: docker.DockerClient
) -> None:
    before = {c.id for c in client.containers.list(all=True, filters={"label": LABEL_KEEP})}
    result = pytester.runpytest_subprocess(
        str(SAMPLE / "tests" / "test_sample_ioc.py"),
        "--arch=linux/amd64",
        "--epics-keep-iocs",
        "-k",
        "message",
        "-p",
        "no:cacheprovider",
    )
    kept = [c for c in client.containers.list(all=True, filters={"label": LABEL_KEEP}) if c.id not in before]
    try:
        assert result.ret == 0, result.stdout.str()
        assert len(kept) == 1 and kept[0].status == "running"
        port = kept[0].labels["io.github.pytest-epics-multiarch.ca-port"]
        result.stdout.fnmatch_lines(
            [
                f"kept IOC: linux/amd64: {kept[0].name} serves CA on 127.0.0.1:{port}*docker rm -f {kept[0].name}"
            ]
        )
        # The next session's sweep leaves a kept IOC alone, although its owner has exited.
        Engine(client).sweep_leftovers(Owner.current().host)
        kept[0].reload()
        assert kept[0].status == "running"
    finally:
        for container in kept:
            container.remove(force=True)


def test_session_labels_every_container(tmp_path: Path, client: docker.DockerClient) -> None:
    from pytest_epics_multiarch.session import EpicsSession
    from pytest_epics_multiarch.settings import Settings

    session = EpicsSession(Settings(arch=("linux/amd64",)), work_dir=tmp_path, progress=lambda m: None)
    config = session.config_for(SAMPLE / "tests")
    target = config.target("linux/amd64")
    try:
        session.start_ioc(config, target, session.image(config, target))
        session.iocs.wait_for_spares(60)
        mine = client.containers.list(filters={"label": f"{LABEL_SESSION}={session.owner.session}"})
        assert len(mine) == 2  # the IOC and the spare started after it (--epics-spare-iocs 1)
        for container in mine:
            labels = container.labels
            assert labels["io.github.pytest-epics-multiarch.owner-pid"] == str(session.owner.pid)
            assert labels["io.github.pytest-epics-multiarch.target"] == "linux/amd64"
    finally:
        session.close()
    assert not client.containers.list(all=True, filters={"label": f"{LABEL_SESSION}={session.owner.session}"})
