"""An OCI index with a custom-platform entry, on the real registry and the real engine.

Registries hold images published as one index whose entries carry platforms such as
``rtems/powerpc/runtime`` beside ``linux/amd64``. This module publishes such an index (two
images built with BuildKit from the project's base image, pushed by the engine, the index put
with the registry's HTTP API) and shows:

- the engine refuses the rtems entry, with the messages users meet;
- :mod:`pytest_epics_multiarch.oci` finds that entry and takes its payload out of the layer
  blobs byte for byte, honouring the whiteouts of a ``RUN rm`` layer;
- the linux entry of the same index pulls through the engine and runs.

The 20.10 engine cannot store an image built for ``rtems/powerpc`` at all (BuildKit builds it,
then "exporting to image" fails with "operating system is not supported"), so the rtems image
is built as linux/amd64 and published twice: as the engine pushed it (config ``os: linux``, the
platform only in the index), and with its config saying ``rtems/powerpc/runtime``, what a tool
that writes the platform into the image (buildx with a container driver, crane, regctl) pushes.
The engine refuses both when asked for the entry's platform: it keeps layers per requested OS.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest

from pytest_epics_multiarch.engine import find_build_cli
from pytest_epics_multiarch.errors import ImageError
from pytest_epics_multiarch.oci import (
    OCI_INDEX,
    RegistryClient,
    extract_from_layers,
    find_entry,
    parse_reference,
)

from .conftest import BASE_IMAGE

pytestmark = [pytest.mark.docker, pytest.mark.slow]

REGISTRY = os.environ.get("EPICS_MULTIARCH_REGISTRY", "127.0.0.1:5055")
RTEMS_RUNTIME = {"os": "rtems", "architecture": "powerpc", "variant": "runtime"}
KERNEL = "/epics/ioc/bin/RTEMS-qemuprep/ioc.boot"

LINUX_DOCKERFILE = """\
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
COPY marker /epics/marker
CMD ["cat", "/epics/marker"]
"""
# Built on the base like a real runtime image; the RUN layer deletes with whiteouts.
RTEMS_DOCKERFILE = """\
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
COPY ioc/ /epics/ioc/
RUN rm /epics/ioc/config/stale.cmd && rm -r /epics/ioc/old
"""


@dataclass(frozen=True)
class Published:
    repo: str  # 127.0.0.1:5055/oci-test-<hex>
    #: The RTEMS image's files that must come out, by path in the image.
    files: dict[str, bytes]
    marker: str
    linux_id: str
    #: Descriptors of the linux image, the rtems image as the engine pushed it (config os
    #: linux) and as published for rtems (config os rtems).
    linux: dict[str, Any]
    rtems_linux_config: dict[str, Any]
    rtems: dict[str, Any]

    def ref(self, tag: str) -> str:
        return f"{self.repo}:{tag}"

    @property
    def name(self) -> str:
        return self.repo.split("/", 1)[1]


def registry_call(
    method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> Any:
    request = urllib.request.Request(
        f"http://{REGISTRY}{path}", data=body, method=method, headers=headers or {}
    )
    return urllib.request.urlopen(request, timeout=30)


def get_manifest(name: str, tag: str) -> tuple[dict[str, Any], bytes]:
    accept = (
        "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json"
    )
    with registry_call("GET", f"/v2/{name}/manifests/{tag}", headers={"Accept": accept}) as response:
        body = response.read()
        return {"mediaType": response.headers["Content-Type"], "size": len(body)}, body


def put_manifest(name: str, tag: str, media_type: str, body: bytes) -> dict[str, Any]:
    with registry_call("PUT", f"/v2/{name}/manifests/{tag}", body, {"Content-Type": media_type}) as response:
        assert response.status == 201
        digest = response.headers["Docker-Content-Digest"]
    assert digest == "sha256:" + hashlib.sha256(body).hexdigest()
    return {"mediaType": media_type, "digest": digest, "size": len(body)}


def put_blob(name: str, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with registry_call("POST", f"/v2/{name}/blobs/uploads/", b"") as response:
        location = response.headers["Location"]
    if location.startswith("/"):
        location = f"http://{REGISTRY}{location}"
    separator = "&" if "?" in location else "?"
    upload = urllib.request.Request(
        f"{location}{separator}digest={digest}",
        data=data,
        method="PUT",
        headers={"Content-Type": "application/octet-stream"},
    )
    with urllib.request.urlopen(upload, timeout=30) as response:
        assert response.status == 201
    return digest


def republish_for_rtems(name: str, tag: str, new_tag: str) -> dict[str, Any]:
    """The image under ``tag`` again, its config saying rtems/powerpc/runtime: same layers."""
    _, body = get_manifest(name, tag)
    manifest = json.loads(body)
    with registry_call("GET", f"/v2/{name}/blobs/{manifest['config']['digest']}") as response:
        config = json.loads(response.read())
    config.update(RTEMS_RUNTIME)
    config_blob = json.dumps(config).encode()
    manifest["config"].update(digest=put_blob(name, config_blob), size=len(config_blob))
    return put_manifest(name, new_tag, manifest["mediaType"], json.dumps(manifest).encode())


def put_index(name: str, tag: str, entries: list[tuple[dict[str, Any], dict[str, str]]]) -> None:
    manifests = [{**descriptor, "platform": platform} for descriptor, platform in entries]
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}).encode()
    put_manifest(name, tag, OCI_INDEX, body)


def engine_pull(
    client: docker.DockerClient, repo: str, tag: str, platform: str | None
) -> tuple[str | None, list[str]]:
    """(the engine's error or None, the status lines): what ``docker pull`` would print."""
    statuses: list[str] = []
    try:
        for line in client.api.pull(repo, tag=tag, platform=platform, stream=True, decode=True):
            if line.get("error"):
                return str(line["error"]), statuses
            statuses.append(str(line.get("status", "")))
    except docker.errors.APIError as exc:
        return str(exc.explanation), statuses
    return None, statuses


def remove_local(client: docker.DockerClient, repo: str) -> None:
    """Every local tag and digest of ``repo`` (a name this module made up)."""
    for image in client.images.list(all=True):
        refs = [
            ref for ref in (image.tags or []) + (image.attrs.get("RepoDigests") or []) if ref.startswith(repo)
        ]
        for ref in refs:
            try:
                client.images.remove(ref)
            except docker.errors.NotFound:
                pass


def build(tag: str, folder: Path) -> None:
    cli = find_build_cli()
    argv = [
        *cli.argv(),
        "--platform",
        "linux/amd64",
        "--build-arg",
        f"BASE_IMAGE={BASE_IMAGE}",
        "--tag",
        tag,
        str(folder),
    ]
    proc = subprocess.run(argv, env=cli.env(), capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, f"{' '.join(argv)} failed:\n{proc.stdout}\n{proc.stderr}"


def push(client: docker.DockerClient, repo: str, tag: str) -> None:
    for line in client.images.push(repo, tag=tag, stream=True, decode=True):
        assert not line.get("error"), f"push {repo}:{tag}: {line['error']}"


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Published]:
    try:
        registry_call("GET", "/v2/").close()
    except (urllib.error.URLError, OSError) as exc:
        problem = f"no registry answers at http://{REGISTRY}/v2/: {exc} (make setup starts one)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(problem, pytrace=False)
        pytest.skip(problem)
    client = docker.from_env()
    if not client.images.list(name=BASE_IMAGE):
        pytest.fail(f"{BASE_IMAGE} is missing: make setup builds it", pytrace=False)
    repo = f"{REGISTRY}/oci-test-{uuid.uuid4().hex[:12]}"
    name = repo.split("/", 1)[1]
    folder = tmp_path_factory.mktemp("oci-images")
    marker = f"linux runtime entry {uuid.uuid4().hex}\n"
    linux_dir = folder / "linux"
    linux_dir.mkdir()
    (linux_dir / "Dockerfile").write_text(LINUX_DOCKERFILE)
    (linux_dir / "marker").write_text(marker)
    files = {
        KERNEL: os.urandom(300_001),
        "/epics/ioc/bin/RTEMS-qemuprep/qemu_fakerom.bin": os.urandom(4099),
        "/epics/ioc/config/st.cmd": b'epicsEnvSet("IOC","sample")\ndbLoadRecords("db/sample.db")\niocInit\n',
        "/epics/ioc/db/sample.db": b'record(ao, "SAMPLE:SETPOINT") {}\n',
    }
    deleted = {"/epics/ioc/config/stale.cmd": b"removed by RUN rm\n", "/epics/ioc/old/x.db": b"removed\n"}
    rtems_dir = folder / "rtems"
    for path, data in {**files, **deleted}.items():
        host = rtems_dir / "ioc" / path.removeprefix("/epics/ioc/")
        host.parent.mkdir(parents=True, exist_ok=True)
        host.write_bytes(data)
    (rtems_dir / "Dockerfile").write_text(RTEMS_DOCKERFILE)
    try:
        build(f"{repo}:linux", linux_dir)
        build(f"{repo}:rtems-built", rtems_dir)
        linux_id = str(client.images.get(f"{repo}:linux").id)
        push(client, repo, "linux")
        push(client, repo, "rtems-built")
        # Gone from the engine, so the linux entry's pull below is a real pull.
        remove_local(client, repo)
        linux, body = get_manifest(name, "linux")
        linux["digest"] = "sha256:" + hashlib.sha256(body).hexdigest()
        rtems_built, body = get_manifest(name, "rtems-built")
        rtems_built["digest"] = "sha256:" + hashlib.sha256(body).hexdigest()
        rtems = republish_for_rtems(name, "rtems-built", "rtems")
        # The shape: one index, a linux/amd64 entry beside rtems/powerpc/runtime.
        put_index(name, "1.0", [(linux, {"os": "linux", "architecture": "amd64"}), (rtems, RTEMS_RUNTIME)])
        # Platforms as index annotations only: linux/amd64/runtime, and rtems/powerpc/runtime
        # whose image config says linux/amd64.
        put_index(
            name,
            "1.0-variants",
            [
                (linux, {"os": "linux", "architecture": "amd64", "variant": "runtime"}),
                (rtems_built, RTEMS_RUNTIME),
            ],
        )
        yield Published(repo, files, marker, linux_id, linux, rtems_built, rtems)
    finally:
        remove_local(client, repo)
        client.close()


@pytest.fixture
def engine() -> Iterator[docker.DockerClient]:
    client = docker.from_env()
    yield client
    client.close()


@pytest.mark.parametrize("tag", ["1.0", "1.0-variants"])
def test_the_engine_refuses_the_rtems_entry(
    published: Published, engine: docker.DockerClient, tag: str
) -> None:
    remove_local(engine, published.repo)  # a pull that finds the image already stored succeeds
    cli = find_build_cli()
    proc = subprocess.run(
        [cli.executable, "pull", "--platform", "rtems/powerpc/runtime", published.ref(tag)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == "operating system is not supported"
    # The same through the API, and the target's platform without the entry's variant.
    refused = engine_pull(engine, published.repo, tag, "rtems/powerpc/runtime")[0]
    assert refused == "operating system is not supported"
    assert engine_pull(engine, published.repo, tag, "rtems/powerpc")[0] == (
        "no matching manifest for rtems/powerpc in the manifest list entries"
    )
    with pytest.raises(docker.errors.ImageNotFound):
        engine.images.get(published.ref(tag))


def test_an_rtems_config_is_refused_even_by_digest(published: Published, engine: docker.DockerClient) -> None:
    remove_local(engine, published.repo)
    by_digest = engine_pull(engine, published.repo, published.rtems["digest"], None)[0]
    assert by_digest == "operating system is not supported"
    # The image the engine built and pushed (config os linux) pulls by digest, whatever the index says.
    assert engine_pull(engine, published.repo, published.rtems_linux_config["digest"], None)[0] is None
    # ... and then a tag pull for the entry's platform finds nothing to download, and "succeeds".
    assert engine_pull(engine, published.repo, "1.0-variants", "rtems/powerpc/runtime")[0] is None


def test_the_sdk_pull_hides_the_engines_refusal(published: Published, engine: docker.DockerClient) -> None:
    """docker-py's images.pull() drops the stream's error: a caller must read the stream itself."""
    remove_local(engine, published.repo)
    with pytest.raises(docker.errors.ImageNotFound):  # not the engine's message
        engine.images.pull(published.repo, tag="1.0", platform="rtems/powerpc")
    assert engine_pull(engine, published.repo, "1.0", "linux/amd64")[0] is None
    # With the tag present, a refused pull hands back whatever the tag already names.
    stale = engine.images.pull(published.repo, tag="1.0", platform="rtems/powerpc")
    assert stale.id == published.linux_id


@pytest.mark.parametrize(("tag", "config_os"), [("1.0", "rtems"), ("1.0-variants", "linux")])
def test_the_rtems_payload_comes_out_of_the_layers_byte_identical(
    published: Published, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tag: str, config_os: str
) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))
    client = RegistryClient(REGISTRY)
    resolved = client.resolve(published.ref(tag), "rtems/powerpc", "runtime", target="rtems/powerpc")
    assert resolved.entry is not None and str(resolved.entry.platform) == "rtems/powerpc/runtime"
    expected = published.rtems if config_os == "rtems" else published.rtems_linux_config
    assert resolved.manifest.digest == expected["digest"]
    assert (resolved.config_os, resolved.engine_can_pull) == (config_os, config_os == "linux")
    dest = tmp_path / "payload"
    found = extract_from_layers(
        client,
        resolved.manifest,
        {"kernel": KERNEL, "assets": "/epics/ioc", "startup": "/epics/ioc/config/st.cmd"},
        dest,
        target="rtems/powerpc",
    )
    assert found["kernel"].read_bytes() == published.files[KERNEL]
    taken = {
        "/" + str(path.relative_to(dest)): path.read_bytes()
        for path in sorted(dest.rglob("*"))
        if path.is_file()
    }
    # Every file byte for byte, and nothing the RUN rm layer deleted (stale.cmd, old/).
    assert taken == published.files


def test_a_stage_the_index_lacks_names_what_it_has(
    published: Published, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    client = RegistryClient(REGISTRY)
    index = client.get_manifest(parse_reference(published.ref("1.0")))
    with pytest.raises(ImageError) as caught:
        find_entry(index, "rtems/powerpc", "developer", target="rtems/powerpc")
    assert str(caught.value).splitlines()[0] == (
        f"[rtems/powerpc] index {published.ref('1.0')} has linux/amd64, rtems/powerpc/runtime; "
        "no rtems/powerpc/developer (or rtems/powerpc)"
    )


def test_the_linux_entry_pulls_through_the_engine_and_runs(
    published: Published, engine: docker.DockerClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    resolved = RegistryClient(REGISTRY).resolve(published.ref("1.0"), "linux/amd64", "runtime")
    assert resolved.engine_can_pull and resolved.manifest.digest == published.linux["digest"]
    remove_local(engine, published.repo)
    error, statuses = engine_pull(engine, published.repo, "1.0", "linux/amd64")
    assert error is None
    assert f"Status: Downloaded newer image for {published.ref('1.0')}" in statuses
    image = engine.images.pull(published.repo, tag="1.0", platform="linux/amd64")
    assert image.id == published.linux_id
    output = engine.containers.run(published.ref("1.0"), remove=True)
    assert output.decode() == published.marker


def test_what_the_engine_makes_of_variants(published: Published, engine: docker.DockerClient) -> None:
    """A variant in an index entry is matched exactly; a pull by digest matches nothing."""
    tag = "1.0-variants"  # its linux entry is linux/amd64/runtime
    no_match = "no matching manifest for linux/amd64 in the manifest list entries"
    assert engine_pull(engine, published.repo, tag, "linux/amd64")[0] == no_match
    assert engine_pull(engine, published.repo, tag, None)[0] == no_match
    assert engine_pull(engine, published.repo, tag, "linux/amd64/runtime")[0] is None
    assert engine_pull(engine, published.repo, published.linux["digest"], None)[0] is None
    assert engine.images.get(f"{published.repo}@{published.linux['digest']}").id == published.linux_id
