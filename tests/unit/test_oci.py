"""Reading images from a registry without the engine: references, indexes, layers, auth.

A fake registry (the distribution v2 API's few endpoints) runs on 127.0.0.1 in a thread; it
serves what each test publishes and records the requests it got.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import logging
import os
import stat
import tarfile
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from pytest_epics_multiarch.errors import ImageError
from pytest_epics_multiarch.oci import (
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Manifest,
    Platform,
    Reference,
    RegistryClient,
    extract_from_layers,
    find_entry,
    load_credentials,
    parse_reference,
    payload_from_layers,
)

HEX = "0123456789abcdef" * 4


# -- references and platforms ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("debian", ("docker.io", "library/debian", "latest")),
        ("debian:bookworm", ("docker.io", "library/debian", "bookworm")),
        ("user/repo", ("docker.io", "user/repo", "latest")),
        ("index.docker.io/library/debian:12", ("docker.io", "library/debian", "12")),
        (
            "ghcr.io/epics-containers/ioc-adsimdetector-runtime:2024.4.1",
            ("ghcr.io", "epics-containers/ioc-adsimdetector-runtime", "2024.4.1"),
        ),
        ("127.0.0.1:5055/a/b-rtems-runtime", ("127.0.0.1:5055", "a/b-rtems-runtime", "latest")),
        ("localhost/ioc:1", ("localhost", "ioc", "1")),
        ("localhost:5000/ioc", ("localhost:5000", "ioc", "latest")),
        ("[::1]:5000/ioc:dev", ("[::1]:5000", "ioc", "dev")),
        (f"ioc@sha256:{HEX}", ("docker.io", "library/ioc", f"sha256:{HEX}")),
        (f"r.example:5000/ioc:1.0@sha256:{HEX}", ("r.example:5000", "ioc", f"sha256:{HEX}")),
    ],
)
def test_references_read_as_docker_reads_them(ref: str, expected: tuple[str, str, str]) -> None:
    parsed = parse_reference(ref)
    assert tuple(parsed) == expected
    registry, repository, tag_or_digest = parsed  # unpacks as the 3-tuple it is
    assert (registry, repository, tag_or_digest) == (parsed.registry, parsed.repository, parsed.tag_or_digest)
    assert parse_reference(str(parsed)) == parsed


@pytest.mark.parametrize(
    ("ref", "complaint"),
    [
        ("", "empty"),
        ("ghcr.io/Me/ioc", "must be lowercase"),
        ("ioc:bad tag", "malformed tag"),
        ("ioc@sha256:xyz", "malformed digest"),
    ],
)
def test_malformed_references_say_what_is_wrong(ref: str, complaint: str) -> None:
    with pytest.raises(ImageError, match=complaint):
        parse_reference(ref)


def test_platforms_parse_and_normalise() -> None:
    assert Platform.parse("rtems/powerpc/runtime") == Platform("rtems", "powerpc", "runtime")
    assert Platform.parse("Linux/x86_64") == Platform("linux", "amd64")
    assert str(Platform("linux", "amd64")) == "linux/amd64"
    with pytest.raises(ImageError, match="not os/architecture"):
        Platform.parse("rtems")


def test_loopback_registries_use_http_like_the_engine_and_others_https() -> None:
    assert RegistryClient("127.0.0.1:5055").scheme == "http"
    assert RegistryClient("127.3.2.1:5000").scheme == "http"
    assert RegistryClient("localhost:5000").scheme == "http"
    assert RegistryClient("[::1]:5000").scheme == "http"
    assert RegistryClient("ghcr.io").scheme == "https"
    assert RegistryClient("10.0.0.1:5000").scheme == "https"
    hub = RegistryClient.for_reference("debian")
    assert (hub.registry, hub.host, hub.scheme) == ("docker.io", "registry-1.docker.io", "https")


# -- choosing an index entry ----------------------------------------------------------------


def index_of(*platforms: str | None, attestation: bool = False) -> Manifest:
    entries: list[dict[str, Any]] = []
    for number, name in enumerate(platforms):
        entry: dict[str, Any] = {"mediaType": OCI_MANIFEST, "digest": f"sha256:{number:064x}", "size": 10}
        if name:
            parsed = Platform.parse(name)
            entry["platform"] = {"os": parsed.os, "architecture": parsed.architecture}
            if parsed.variant:
                entry["platform"]["variant"] = parsed.variant
        entries.append(entry)
    if attestation:
        entries.append(
            {
                "mediaType": OCI_MANIFEST,
                "digest": f"sha256:{'e' * 64}",
                "size": 10,
                "platform": {"os": "unknown", "architecture": "unknown"},
                "annotations": {"vnd.docker.reference.type": "attestation-manifest"},
            }
        )
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()
    return Manifest.parse(parse_reference("127.0.0.1:5055/x:tag"), body, OCI_INDEX)


FOUR = ("linux/amd64/runtime", "linux/amd64/developer", "rtems/powerpc/runtime", "rtems/powerpc/developer")


def test_the_stage_picks_the_variant() -> None:
    index = index_of(*FOUR, attestation=True)
    assert find_entry(index, "rtems/powerpc", "runtime").digest == f"sha256:{2:064x}"
    assert find_entry(index, "rtems/powerpc", "developer").digest == f"sha256:{3:064x}"
    assert find_entry(index, "linux/amd64", "runtime").digest == f"sha256:{0:064x}"


def test_a_variant_in_the_platform_must_match_exactly() -> None:
    index = index_of(*FOUR)
    assert find_entry(index, "rtems/powerpc/developer", "runtime").digest == f"sha256:{3:064x}"
    with pytest.raises(ImageError) as caught:
        find_entry(index, "rtems/powerpc/beatnik", target="rtems/powerpc/beatnik")
    assert str(caught.value).splitlines()[0] == (
        "[rtems/powerpc/beatnik] index 127.0.0.1:5055/x:tag has linux/amd64/runtime, "
        "linux/amd64/developer, rtems/powerpc/runtime, rtems/powerpc/developer; no rtems/powerpc/beatnik"
    )


def test_an_entry_without_variant_serves_every_stage() -> None:
    index = index_of("linux/amd64", "rtems/powerpc")
    assert find_entry(index, "rtems/powerpc", "runtime").digest == f"sha256:{1:064x}"
    assert find_entry(index, "rtems/powerpc").digest == f"sha256:{1:064x}"


def test_missing_entry_lists_what_the_index_has_without_attestations() -> None:
    index = index_of("linux/amd64/runtime", "rtems/powerpc/runtime", attestation=True)
    with pytest.raises(ImageError) as caught:
        find_entry(index, "rtems/powerpc", "developer")
    message = str(caught.value)
    assert message.splitlines()[0] == (
        "index 127.0.0.1:5055/x:tag has linux/amd64/runtime, rtems/powerpc/runtime; "
        "no rtems/powerpc/developer (or rtems/powerpc)"
    )
    assert "unknown/unknown" not in message


def test_two_candidates_and_no_hint_is_an_error_naming_both() -> None:
    with pytest.raises(ImageError, match="2 entries match rtems/powerpc") as caught:
        find_entry(index_of(*FOUR), "rtems/powerpc")
    assert "rtems/powerpc/runtime sha256:" in str(caught.value)
    assert "Hint: name the variant in the target's index platform, e.g. rtems/powerpc/runtime" in str(
        caught.value
    )


def test_an_image_manifest_has_no_entries_to_choose() -> None:
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {}, "layers": []}).encode()
    manifest = Manifest.parse(parse_reference("127.0.0.1:5055/x:tag"), body, OCI_MANIFEST)
    with pytest.raises(ImageError, match="is an image manifest, not an index"):
        find_entry(manifest, "rtems/powerpc")


# -- a fake registry ------------------------------------------------------------------------


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class FakeRegistry:
    """What the fake server serves, how it authenticates, and what it was asked."""

    address: str = ""
    manifests: dict[tuple[str, str], tuple[str, bytes]] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    #: None (open), "bearer" (token from /token) or "basic".
    auth: str | None = None
    user: str = "alice"
    password: str = "s3cr3t-pa55word"
    token: str = "tok-4f1a9c2e7b"
    identity_token: str = ""
    #: Echo the Authorization header in error bodies, like a careless server.
    echo_auth: bool = False
    redirect_blobs: bool = False
    corrupt: set[str] = field(default_factory=set)
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)

    def add_blob(self, data: bytes) -> dict[str, Any]:
        digest = digest_of(data)
        self.blobs[digest] = data
        return {"digest": digest, "size": len(data)}

    def add_image(
        self,
        repo: str,
        tag: str,
        layers: list[bytes],
        *,
        config: dict[str, Any] | None = None,
        media_type: str = OCI_MANIFEST,
    ) -> dict[str, Any]:
        config_blob = json.dumps(config or {"os": "linux", "architecture": "amd64"}).encode()
        layer_type = (
            "application/vnd.oci.image.layer.v1.tar+gzip"
            if media_type == OCI_MANIFEST
            else "application/vnd.docker.image.rootfs.diff.tar.gzip"
        )
        body = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": media_type,
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    **self.add_blob(config_blob),
                },
                "layers": [{"mediaType": layer_type, **self.add_blob(layer)} for layer in layers],
            }
        ).encode()
        return self.add_manifest(repo, tag, media_type, body)

    def add_manifest(self, repo: str, tag: str, media_type: str, body: bytes) -> dict[str, Any]:
        digest = digest_of(body)
        self.manifests[(repo, tag)] = self.manifests[(repo, digest)] = (media_type, body)
        return {"mediaType": media_type, "digest": digest, "size": len(body)}

    def add_index(self, repo: str, tag: str, entries: list[tuple[dict[str, Any], dict[str, str]]]) -> None:
        manifests = [{**descriptor, "platform": platform} for descriptor, platform in entries]
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}).encode()
        self.add_manifest(repo, tag, OCI_INDEX, body)

    def seen_authorization(self, prefix: str) -> list[str]:
        return [
            headers.get("Authorization", "") for _, path, headers in self.requests if path.startswith(prefix)
        ]


def make_handler(registry: FakeRegistry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self.send_response(code)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def error(self, code: int, error: str, message: str, headers: dict[str, str] | None = None) -> None:
            if registry.echo_auth:
                message += " (got " + self.headers.get("Authorization", "") + ")"
            body = json.dumps({"errors": [{"code": error, "message": message}]}).encode()
            self.send(code, body, {"Content-Type": "application/json", **(headers or {})})

        def authorized(self, repo: str) -> bool:
            got = self.headers.get("Authorization", "")
            if registry.auth == "bearer" and got != f"Bearer {registry.token}":
                realm = f"http://{registry.address}/token?x=1"
                challenge = f'Bearer realm="{realm}",service="fake-registry",scope="repository:{repo}:pull"'
                self.error(401, "UNAUTHORIZED", "authentication required", {"WWW-Authenticate": challenge})
                return False
            basic = "Basic " + base64.b64encode(f"{registry.user}:{registry.password}".encode()).decode()
            if registry.auth == "basic" and got != basic:
                self.error(401, "UNAUTHORIZED", "login", {"WWW-Authenticate": 'Basic realm="fake"'})
                return False
            return True

        def do_GET(self) -> None:
            registry.requests.append(("GET", self.path, dict(self.headers.items())))
            url = urllib.parse.urlsplit(self.path)
            path = url.path
            if path == "/token":
                self.token(urllib.parse.parse_qs(url.query))
            elif path.startswith("/storage/"):
                # Like S3: a request that carries the registry's Authorization is refused.
                if "Authorization" in self.headers:
                    self.send(400, b"two authorizations")
                else:
                    self.send(200, registry.blobs[path.split("/")[-1]])
            elif "/manifests/" in path:
                repo, ref = path[len("/v2/") :].split("/manifests/")
                if not self.authorized(repo):
                    return
                if (repo, ref) not in registry.manifests:
                    self.error(404, "MANIFEST_UNKNOWN", "manifest unknown")
                    return
                media_type, body = registry.manifests[(repo, ref)]
                self.send(200, body, {"Content-Type": media_type, "Docker-Content-Digest": digest_of(body)})
            elif "/blobs/" in path:
                repo, digest = path[len("/v2/") :].split("/blobs/")
                if not self.authorized(repo):
                    return
                if digest not in registry.blobs:
                    self.error(404, "BLOB_UNKNOWN", "blob unknown")
                elif registry.redirect_blobs:
                    self.send(307, headers={"Location": f"http://{registry.address}/storage/{digest}"})
                else:
                    data = registry.blobs[digest]
                    if digest in registry.corrupt:
                        data = data[:-1] + bytes([data[-1] ^ 1])
                    self.send(200, data, {"Content-Type": "application/octet-stream"})
            else:
                self.send(404)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            form = urllib.parse.parse_qs(self.rfile.read(length).decode())
            registry.requests.append(("POST", self.path, dict(self.headers.items())))
            if form.get("grant_type") == ["refresh_token"] and form.get("refresh_token") == [
                registry.identity_token
            ]:
                self.send(200, json.dumps({"access_token": registry.token}).encode())
            else:
                self.error(401, "DENIED", "bad refresh token")

        def token(self, query: dict[str, list[str]]) -> None:
            assert query.get("x") == ["1"], "the realm's own query is kept"
            assert query.get("service") == ["fake-registry"]
            got = self.headers.get("Authorization")
            basic = "Basic " + base64.b64encode(f"{registry.user}:{registry.password}".encode()).decode()
            if got is not None and got != basic:
                self.error(401, "DENIED", "incorrect username or password")
                return
            self.send(
                200, json.dumps({"token": registry.token}).encode(), {"Content-Type": "application/json"}
            )

    return Handler


@pytest.fixture
def fake() -> Iterator[FakeRegistry]:
    registry = FakeRegistry()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(registry))
    registry.address = f"127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield registry
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def no_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty docker config folder, so the user's own never counts."""
    folder = tmp_path / "docker-config"
    folder.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(folder))
    return folder


def write_config(folder: Path, config: dict[str, Any]) -> Path:
    path = folder / "config.json"
    path.write_text(json.dumps(config))
    return path


def layer(entries: list[tuple[str, bytes | str | None]], *, compress: bool = True) -> bytes:
    """A layer tar: (name, bytes) files, (name, None) folders, (name, "->target") symlinks,
    (name, "=>target") hard links."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, content in entries:
            info = tarfile.TarInfo(name)
            if content is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                archive.addfile(info)
            elif isinstance(content, str) and content.startswith("->"):
                info.type, info.linkname = tarfile.SYMTYPE, content[2:]
                archive.addfile(info)
            elif isinstance(content, str) and content.startswith("=>"):
                info.type, info.linkname = tarfile.LNKTYPE, content[2:]
                archive.addfile(info)
            else:
                assert isinstance(content, bytes)
                info.size, info.mode = len(content), 0o755 if name.endswith(".boot") else 0o644
                archive.addfile(info, io.BytesIO(content))
    data = buffer.getvalue()
    return gzip.compress(data) if compress else data


def files_under(root: Path) -> dict[str, bytes | str]:
    """Every file (its bytes), folder ("dir") and symlink ("-> target") below root."""
    found: dict[str, bytes | str] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                found[rel] = "-> " + os.readlink(path)
            elif path.is_dir():
                found[rel] = "dir"
            else:
                found[rel] = path.read_bytes()
    return found


# -- taking files out of layers -------------------------------------------------------------

BOOT = os.urandom(70_000)


def publish_rtems_image(fake: FakeRegistry) -> None:
    base = layer(
        [
            ("usr/", None),
            ("usr/bin/sh", b"not wanted"),
            ("epics/", None),
            ("epics/ioc/", None),
            ("epics/ioc/bin/RTEMS-qemuprep/ioc.boot", b"old boot image"),
            ("epics/ioc/config/st.cmd", b"old st.cmd\n"),
            ("epics/ioc/config/stale.cmd", b"deleted later\n"),
            ("epics/ioc/old/", None),
            ("epics/ioc/old/x.db", b"deleted later with its folder\n"),
            ("epics/ioc/db/a.db", b"hidden by an opaque whiteout\n"),
        ]
    )
    update = layer(
        [
            ("epics/ioc/bin/RTEMS-qemuprep/ioc.boot", BOOT),
            ("epics/ioc/config/.wh.stale.cmd", b""),
            ("epics/ioc/.wh.old", b""),
            # The same layer's file comes before its folder's opaque marker: it stays.
            ("epics/ioc/db/b.db", b"record(ao, X) {}\n"),
            ("epics/ioc/db/.wh..wh..opq", b""),
            ("epics/ioc/config/st.cmd", b"iocInit\n"),
        ]
    )
    links = layer(
        [
            ("epics/ioc/current", "->/epics/ioc/config"),
            ("epics/ioc/up", "->../../../../../.."),
            ("epics/ioc/config/same.cmd", "=>epics/ioc/config/st.cmd"),
        ],
        compress=False,  # layers may be plain tars
    )
    image = fake.add_image(
        "ioc", "rtems", [base, update, links], config={"os": "rtems", "architecture": "powerpc"}
    )
    linux = fake.add_image("ioc", "linux", [layer([("marker", b"linux\n")])], media_type=DOCKER_MANIFEST)
    fake.add_index(
        "ioc",
        "1.0",
        [
            (linux, {"os": "linux", "architecture": "amd64"}),
            (image, {"os": "rtems", "architecture": "powerpc", "variant": "runtime"}),
        ],
    )


def test_layers_apply_in_order_with_whiteouts(fake: FakeRegistry, no_config: Path, tmp_path: Path) -> None:
    publish_rtems_image(fake)
    client = RegistryClient(fake.address)
    resolved = client.resolve(f"{fake.address}/ioc:1.0", "rtems/powerpc", "runtime", target="rtems/powerpc")
    assert resolved.entry is not None and str(resolved.entry.platform) == "rtems/powerpc/runtime"
    assert (resolved.config_os, resolved.engine_can_pull) == ("rtems", False)
    dest = tmp_path / "payload"
    files = extract_from_layers(
        client,
        resolved.manifest,
        {"kernel": "/epics/ioc/bin/RTEMS-qemuprep/ioc.boot", "assets": "/epics/ioc"},
        dest,
    )
    assert files == {"kernel": dest / "epics/ioc/bin/RTEMS-qemuprep/ioc.boot", "assets": dest / "epics/ioc"}
    assert files_under(dest) == {
        "epics": "dir",
        "epics/ioc": "dir",
        "epics/ioc/bin": "dir",
        "epics/ioc/bin/RTEMS-qemuprep": "dir",
        "epics/ioc/bin/RTEMS-qemuprep/ioc.boot": BOOT,
        "epics/ioc/config": "dir",
        "epics/ioc/config/st.cmd": b"iocInit\n",
        "epics/ioc/config/same.cmd": b"iocInit\n",
        "epics/ioc/db": "dir",
        "epics/ioc/db/b.db": b"record(ao, X) {}\n",
        # An absolute link means the image's path; ".." stops at the image's root.
        "epics/ioc/current": "-> config",
        "epics/ioc/up": "-> ../..",
    }
    assert stat.S_IMODE((dest / "epics/ioc/bin/RTEMS-qemuprep/ioc.boot").stat().st_mode) == 0o755


def test_the_payload_is_the_engines_payload_type(fake: FakeRegistry, no_config: Path, tmp_path: Path) -> None:
    publish_rtems_image(fake)
    client = RegistryClient(fake.address)
    resolved = client.resolve(f"{fake.address}/ioc:1.0", "rtems/powerpc", "runtime")
    payload = payload_from_layers(
        client,
        resolved.manifest,
        {
            "kernel": "/epics/ioc/bin/RTEMS-qemuprep/ioc.boot",
            "initrd": None,
            "bios": None,
            "assets": "/epics/ioc",
            "startup": "/epics/ioc/config/st.cmd",
        },
        tmp_path,
    )
    assert payload.kernel.read_bytes() == BOOT
    assert payload.startup is not None and payload.startup.read_bytes() == b"iocInit\n"
    assert (payload.initrd, payload.bios) == (None, None)


def test_a_path_the_image_lacks_is_named_with_a_hint(
    fake: FakeRegistry, no_config: Path, tmp_path: Path
) -> None:
    fake.add_image("ioc", "linked", [layer([("epics/ioc", "->/opt/ioc"), ("opt/ioc/st.cmd", b"x")])])
    client = RegistryClient(fake.address)
    manifest = client.get_manifest(parse_reference(f"{fake.address}/ioc:linked"))
    with pytest.raises(ImageError) as caught:
        extract_from_layers(
            client, manifest, {"startup": "/epics/ioc/st.cmd"}, tmp_path, target="rtems/powerpc"
        )
    assert str(caught.value) == (
        f"[rtems/powerpc] {fake.address}/ioc:linked has no startup at /epics/ioc/st.cmd\n"
        "  seen: its 1 layers have nothing at /epics/ioc/st.cmd; /epics/ioc is a symlink to /opt/ioc: "
        "name the path it points to\n"
        "  Hint: set qemu.startup for this target in epics-multiarch.yaml, or the image label "
        "io.github.pytest-epics-multiarch.qemu.startup"
    )


def test_entries_that_leave_the_image_root_are_refused(
    fake: FakeRegistry, no_config: Path, tmp_path: Path
) -> None:
    fake.add_image("ioc", "evil", [layer([("epics/ioc/../../../etc/evil", b"x")])])
    client = RegistryClient(fake.address)
    manifest = client.get_manifest(parse_reference(f"{fake.address}/ioc:evil"))
    with pytest.raises(ImageError, match="leaves the image's root"):
        extract_from_layers(client, manifest, {"assets": "/epics/ioc"}, tmp_path / "dest")
    assert not (tmp_path / "etc").exists()


def test_nothing_is_written_through_a_symlink_out_of_dest(
    fake: FakeRegistry, no_config: Path, tmp_path: Path
) -> None:
    fake.add_image("ioc", "ok", [layer([("epics/ioc/st.cmd", b"x")])])
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "epics").symlink_to(outside)
    client = RegistryClient(fake.address)
    manifest = client.get_manifest(parse_reference(f"{fake.address}/ioc:ok"))
    with pytest.raises(ImageError, match="is a symlink, which could lead outside"):
        extract_from_layers(client, manifest, {"assets": "/epics/ioc"}, dest)
    assert list(outside.iterdir()) == []


def test_a_hard_link_to_a_file_not_taken_out_is_an_error(
    fake: FakeRegistry, no_config: Path, tmp_path: Path
) -> None:
    fake.add_image("ioc", "hl", [layer([("usr/lib/x", b"x"), ("epics/ioc/x", "=>usr/lib/x")])])
    client = RegistryClient(fake.address)
    manifest = client.get_manifest(parse_reference(f"{fake.address}/ioc:hl"))
    with pytest.raises(ImageError, match="hard link to /usr/lib/x, which is not among the paths taken out"):
        extract_from_layers(client, manifest, {"assets": "/epics/ioc"}, tmp_path)


def test_a_corrupt_blob_fails_its_digest(fake: FakeRegistry, no_config: Path, tmp_path: Path) -> None:
    # Stored (not gzip), so the flipped bit lands in tar padding and only the digest can tell.
    data = layer([("epics/ioc/st.cmd", b"x")], compress=False)
    fake.add_image("ioc", "bad", [data])
    fake.corrupt.add(digest_of(data))
    client = RegistryClient(fake.address)
    manifest = client.get_manifest(parse_reference(f"{fake.address}/ioc:bad"))
    with pytest.raises(ImageError, match="layer 1/1 .* does not match its digest"):
        extract_from_layers(client, manifest, {"assets": "/epics/ioc"}, tmp_path)


def test_a_manifest_fetched_by_digest_is_checked(fake: FakeRegistry, no_config: Path) -> None:
    descriptor = fake.add_image("ioc", "t", [])
    fake.manifests[("ioc", descriptor["digest"])] = (
        OCI_MANIFEST,
        b'{"mediaType": "%s", "layers": []}' % OCI_MANIFEST.encode(),
    )
    client = RegistryClient(fake.address)
    with pytest.raises(ImageError, match="does not match its digest"):
        client.get_manifest(Reference(fake.address, "ioc", descriptor["digest"]))


def test_registry_errors_name_the_registry_and_reference(fake: FakeRegistry, no_config: Path) -> None:
    client = RegistryClient(fake.address)
    with pytest.raises(ImageError) as caught:
        client.resolve(f"{fake.address}/ioc:nope", "rtems/powerpc")
    assert str(caught.value).splitlines()[:2] == [
        f"registry {fake.address} has no manifest {fake.address}/ioc:nope",
        "  seen: HTTP 404 Not Found: MANIFEST_UNKNOWN: manifest unknown",
    ]


def test_an_unreachable_registry_says_so(no_config: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again when the block ends: nothing listens
    client = RegistryClient(f"127.0.0.1:{port}", timeout=5)
    with pytest.raises(ImageError, match=f"could not reach registry 127.0.0.1:{port} for manifest"):
        client.get_manifest(parse_reference(f"127.0.0.1:{port}/ioc:1"))


# -- authentication -------------------------------------------------------------------------


def test_an_open_registry_gets_no_authorization(fake: FakeRegistry, no_config: Path) -> None:
    publish_rtems_image(fake)
    RegistryClient(fake.address).resolve(f"{fake.address}/ioc:1.0", "rtems/powerpc", "runtime")
    assert set(fake.seen_authorization("/v2/")) == {""}


def test_anonymous_bearer_token_flow(fake: FakeRegistry, no_config: Path) -> None:
    publish_rtems_image(fake)
    fake.auth = "bearer"
    client = RegistryClient(fake.address)
    client.resolve(f"{fake.address}/ioc:1.0", "rtems/powerpc", "runtime")
    token_requests = [path for _, path, _ in fake.requests if path.startswith("/token")]
    assert len(token_requests) == 1, "one token per repository scope"
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(token_requests[0]).query)
    assert query["scope"] == ["repository:ioc:pull"]
    assert fake.seen_authorization("/token") == [""]  # no credentials: asked anonymously
    assert fake.seen_authorization("/v2/")[-1] == f"Bearer {fake.token}"


def test_bearer_token_asked_with_docker_config_credentials(fake: FakeRegistry, no_config: Path) -> None:
    publish_rtems_image(fake)
    fake.auth = "bearer"
    auth = base64.b64encode(f"{fake.user}:{fake.password}".encode()).decode()
    write_config(no_config, {"auths": {fake.address: {"auth": auth}}})
    RegistryClient(fake.address).resolve(f"{fake.address}/ioc:1.0", "rtems/powerpc", "runtime")
    assert fake.seen_authorization("/token") == [f"Basic {auth}"]
    assert {value for value in fake.seen_authorization("/v2/") if value} == {f"Bearer {fake.token}"}


def test_basic_auth_registry_with_an_explicit_config_file(fake: FakeRegistry, tmp_path: Path) -> None:
    publish_rtems_image(fake)
    fake.auth = "basic"
    config = write_config(
        tmp_path,
        {"auths": {f"http://{fake.address}/v2/": {"username": fake.user, "password": fake.password}}},
    )
    RegistryClient(fake.address, auth_from=config).resolve(
        f"{fake.address}/ioc:1.0", "rtems/powerpc", "runtime"
    )
    seen = fake.seen_authorization("/v2/")
    assert seen[0] == ""  # the first request finds out what the registry wants
    assert set(seen[1:]) == {"Basic " + base64.b64encode(f"{fake.user}:{fake.password}".encode()).decode()}


def test_identity_token_is_exchanged_at_the_realm(fake: FakeRegistry, no_config: Path) -> None:
    publish_rtems_image(fake)
    fake.auth, fake.identity_token = "bearer", "idt-77aa99"
    write_config(no_config, {"auths": {fake.address: {"identitytoken": fake.identity_token}}})
    RegistryClient(fake.address).resolve(f"{fake.address}/ioc:1.0", "rtems/powerpc", "runtime")
    assert [method for method, path, _ in fake.requests if path.startswith("/token")] == ["POST"]
    assert fake.seen_authorization("/v2/")[-1] == f"Bearer {fake.token}"


def test_credential_helper_from_the_config(
    fake: FakeRegistry, no_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-fake"
    answer = json.dumps({"Username": fake.user, "Secret": fake.password})
    helper.write_text(
        f"#!/bin/sh\nread server\n[ \"$server\" = '{fake.address}' ] || exit 1\necho '{answer}'\n"
    )
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    write_config(no_config, {"credHelpers": {fake.address: "fake"}})
    credentials = load_credentials(fake.address)
    assert credentials is not None and (credentials.username, credentials.password) == (
        fake.user,
        fake.password,
    )
    assert fake.password not in repr(credentials)
    assert load_credentials("ghcr.io") is None


def test_docker_hub_credentials_use_the_key_docker_login_writes(no_config: Path) -> None:
    auth = base64.b64encode(b"hubuser:hubpass").decode()
    write_config(no_config, {"auths": {"https://index.docker.io/v1/": {"auth": auth}}})
    credentials = load_credentials("docker.io")
    assert credentials is not None and credentials.username == "hubuser"
    assert load_credentials("ghcr.io") is None


def test_blob_redirects_do_not_carry_the_registry_authorization(
    fake: FakeRegistry, no_config: Path, tmp_path: Path
) -> None:
    publish_rtems_image(fake)
    fake.auth, fake.redirect_blobs = "bearer", True
    client = RegistryClient(fake.address)
    resolved = client.resolve(f"{fake.address}/ioc:1.0", "rtems/powerpc", "runtime")
    files = extract_from_layers(
        client, resolved.manifest, {"kernel": "/epics/ioc/bin/RTEMS-qemuprep/ioc.boot"}, tmp_path
    )
    assert files["kernel"].read_bytes() == BOOT
    assert set(fake.seen_authorization("/storage/")) == {""}


def test_credentials_never_appear_in_errors_or_logs(
    fake: FakeRegistry, no_config: Path, caplog: pytest.LogCaptureFixture
) -> None:
    publish_rtems_image(fake)
    fake.auth, fake.echo_auth = "bearer", True
    wrong = "wr0ng-pa55word"
    encoded = base64.b64encode(f"{fake.user}:{wrong}".encode()).decode()
    write_config(no_config, {"auths": {fake.address: {"auth": encoded}}})
    caplog.set_level(logging.DEBUG)
    client = RegistryClient(fake.address)
    with pytest.raises(ImageError) as caught:
        client.resolve(f"{fake.address}/ioc:1.0", "rtems/powerpc", "runtime")
    message = str(caught.value)
    assert message.startswith(
        f"registry {fake.address} refused access to a token for manifest {fake.address}/ioc:1.0"
    )
    assert f"auths.{fake.address} in {no_config / 'config.json'}" in message
    assert f"docker login {fake.address}" in message
    assert "***" in message  # the server echoed the header: scrubbed
    for secret in (wrong, encoded):
        assert secret not in message
        assert secret not in caplog.text
        assert secret not in repr(client.credentials())


def test_the_token_never_appears_in_errors(fake: FakeRegistry, no_config: Path) -> None:
    publish_rtems_image(fake)
    fake.auth, fake.echo_auth = "bearer", True
    client = RegistryClient(fake.address)
    with pytest.raises(ImageError) as caught:
        client.get_manifest(parse_reference(f"{fake.address}/ioc:missing"))
    assert "MANIFEST_UNKNOWN" in str(caught.value)
    assert fake.token not in str(caught.value)


def test_a_malformed_docker_config_is_named_without_its_content(no_config: Path) -> None:
    (no_config / "config.json").write_text('{"auths": {"r": {"auth": "c2VjcmV0OnNlY3JldA=="}}, oops}')
    with pytest.raises(ImageError) as caught:
        load_credentials("r")
    assert f"the docker config {no_config / 'config.json'} is not valid JSON" in str(caught.value)
    assert "c2VjcmV0" not in str(caught.value)
