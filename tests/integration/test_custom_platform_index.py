"""Images already published the first way, tested without rebuilding or re-publishing them.

One registry index holds the sample's linux/amd64 runtime image and, under the custom platform
``rtems/powerpc/runtime``, an emulated IOC's runtime image (here the PowerPC guest's, its config
saying ``os: rtems`` as such images do). The engine refuses that entry; the plugin reads the
index itself, takes the boot payload out of the layer blobs and boots it, while the linux entry
still pulls through the engine and runs as a container.
"""

from __future__ import annotations

import hashlib
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from pytest_epics_multiarch.session import EpicsSession
from pytest_epics_multiarch.settings import Settings

from .conftest import SAMPLE
from .test_oci_index import (
    REGISTRY,
    RTEMS_RUNTIME,
    engine_pull,
    get_manifest,
    put_index,
    remove_local,
    republish_for_rtems,
)

pytestmark = [
    pytest.mark.docker,
    pytest.mark.qemu,
    pytest.mark.slow,
    pytest.mark.usefixtures("subprocess_env"),
]


@pytest.fixture(scope="module")
def index_repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``REGISTRY/cpi-<hex>/sample``, whose tag ``1.0`` is the mixed index."""
    client = docker.from_env()
    session = EpicsSession(Settings(), work_dir=tmp_path_factory.mktemp("build"), progress=lambda m: None)
    config = session.config_for(SAMPLE / "tests")
    repo = f"{REGISTRY}/cpi-{uuid.uuid4().hex[:10]}/sample"
    name = repo.split("/", 1)[1]
    try:
        for target, tag in (("linux/amd64", "linux"), ("linux/ppc64le", "guest")):
            image = session.image(config, config.target(target))
            client.images.get(image.ref).tag(repo, tag)
            for line in client.images.push(repo, tag=tag, stream=True, decode=True):
                assert not line.get("error"), line
        linux, body = get_manifest(name, "linux")
        linux["digest"] = "sha256:" + hashlib.sha256(body).hexdigest()
        rtems = republish_for_rtems(name, "guest", "guest-as-rtems")
        put_index(name, "1.0", [(linux, {"os": "linux", "architecture": "amd64"}), (rtems, RTEMS_RUNTIME)])
        remove_local(client, repo)
        yield repo
    finally:
        session.close()
        remove_local(client, repo)
        client.close()


def write_config(folder: Path, repo: str) -> Path:
    registry, name = repo.rsplit("/", 1)
    config = folder / "epics-multiarch.yaml"
    config.write_text(
        f"""schema: 1
image:
  registry: "{registry}"
  name: {name}
  tag: "1.0"
  template: "{{registry}}/{{name}}:{{tag}}"   # one index for every target
targets:
  rtems/powerpc:
    qemu:
      profile: pseries
      kernel: /epics/ioc/bin/linux-ppc64le/vmlinux
      initrd: /epics/ioc/bin/linux-ppc64le/initrd.cpio
      hostname: sample
      boot_timeout: 120
ioc:
  workdir: /epics/ioc
  startup: /epics/ioc/config/st.cmd
  command: ["softIoc", "-D", "/epics/epics-base/dbd/softIoc.dbd", "{{startup}}"]
  ready_pv: "SAMPLE:SETPOINT"
"""
    )
    return config


def test_the_engine_refuses_the_rtems_entry(index_repo: str) -> None:
    client = docker.from_env()
    try:
        error, _ = engine_pull(client, index_repo, "1.0", "rtems/powerpc/runtime")
        assert error is not None and "operating system is not supported" in error
    finally:
        remove_local(client, index_repo)
        client.close()


def remove_from_podman(repo: str) -> None:
    out = subprocess.run(
        ["podman", "images", "--format", "{{.Repository}}:{{.Tag}}"], capture_output=True, text=True, timeout=60
    ).stdout
    refs = [ref for ref in out.split() if ref.startswith(repo + ":")]
    digests = subprocess.run(
        ["podman", "images", "--filter", f"reference={repo}", "--format", "{{.ID}}"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.split()
    if refs or digests:
        subprocess.run(["podman", "rmi", *refs, *digests], capture_output=True, timeout=120, check=False)


@pytest.mark.parametrize("engine", ["docker", pytest.param("podman", marks=pytest.mark.podman)])
def test_both_entries_of_the_index_pass_the_sample_tests(
    index_repo: str, pytester: pytest.Pytester, tmp_path: Path, no_leftover_containers: None, engine: str
) -> None:
    config = write_config(tmp_path, index_repo)
    try:
        result = pytester.runpytest_subprocess(
            str(SAMPLE / "tests" / "test_sample_ioc.py"),
            "--arch=linux/amd64,rtems/powerpc",
            f"--epics-engine={engine}",
            f"--epics-config={config}",
            "--epics-image-policy=pull",
            "-k",
            "doubled or message or iocsh",
            "-v",
            "-p",
            "no:cacheprovider",
        )
        result.stdout.fnmatch_lines(
            [
                "*linux/amd64: pulled *sample:1.0*",
                "*test_doubled_follows_setpoint?linux/amd64? PASSED*",
                "*rtems/powerpc: reading *sample:1.0 (rtems/powerpc/runtime) from the registry, not the engine*",
                "*test_doubled_follows_setpoint?rtems/powerpc? PASSED*",
                "*test_iocsh_shows_the_value?rtems/powerpc? PASSED*",
            ]
        )
        assert result.ret == 0, result.stdout.str()
    finally:
        if engine == "podman":
            remove_from_podman(index_repo)
        else:
            client = docker.from_env()
            remove_local(client, index_repo)
            client.close()
