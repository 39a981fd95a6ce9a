"""A read-only client of the registry HTTP API (distribution v2 / OCI distribution).

It fetches manifests and indexes with the media types the engine accepts, and streams blobs,
checking every byte against its digest. Authentication is what the engine does: a ``401`` with
``WWW-Authenticate: Bearer realm=...,service=...,scope=...`` is answered with a token from the
realm (asked with the user's docker credentials, or anonymously), ``Basic`` with the
credentials themselves. Loopback registries (127.0.0.0/8, ::1, localhost) are spoken to over
plain HTTP, as the engine does by default; every other registry over HTTPS.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import json
import logging
import re
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import ImageError
from .credentials import AuthSource, Credentials, docker_config_path, load_credentials
from .manifest import IMAGE_TYPES, MANIFEST_ACCEPT, Descriptor, Manifest, find_entry
from .reference import DOCKER_HUB, DOCKER_HUB_API, Platform, Reference, is_loopback, parse_reference

log = logging.getLogger("pytest_epics_multiarch.oci")

USER_AGENT = f"pytest-epics-multiarch/{__version__}"
#: Registries refuse manifests over 4 MiB; an image config is far smaller.
MAX_DOCUMENT = 4 * 1024 * 1024
_CHALLENGE_RE = re.compile(r'(\w+)\s*=\s*(?:"([^"]*)"|([^\s,]+))')


@dataclass(frozen=True)
class Resolved:
    """What a reference is for one platform: the index entry (if any) and its image."""

    ref: Reference
    #: The index the reference named, or None when it named an image manifest.
    index: Manifest | None
    entry: Descriptor | None
    manifest: Manifest
    #: The image config (``os``, ``architecture``, ``config.Labels``, ...).
    config: Mapping[str, Any]

    @property
    def config_os(self) -> str:
        return str(self.config.get("os", ""))

    @property
    def engine_can_pull(self) -> bool:
        """Whether the engine can pull this image by digest (:attr:`engine_ref`).

        The engine refuses an image whose config names an OS other than Linux ("operating
        system is not supported"), however it is asked. An index entry is matched by platform
        only when pulled by tag: an entry annotated ``rtems/powerpc/runtime`` or
        ``linux/amd64/runtime`` whose config says linux pulls by digest.
        """
        return self.config_os in ("linux", "")

    @property
    def engine_ref(self) -> str:
        """The image by digest, which the engine pulls without matching platforms."""
        return f"{self.ref.registry}/{self.ref.repository}@{self.manifest.digest}"

    def labels(self) -> dict[str, str]:
        labels = (self.config.get("config") or {}).get("Labels") or {}
        return {str(key): str(value) for key, value in labels.items()}


class RegistryClient:
    """Reads manifests and blobs of one registry (``ghcr.io``, ``127.0.0.1:5055``, ``docker.io``)."""

    def __init__(
        self,
        registry: str,
        *,
        auth_from: AuthSource = None,
        timeout: float = 30.0,
        scheme: str | None = None,
    ) -> None:
        self.registry = registry
        self.host = DOCKER_HUB_API if registry == DOCKER_HUB else registry
        self.scheme = scheme or ("http" if is_loopback(registry) else "https")
        self.timeout = timeout
        self._auth_from = auth_from
        self._credentials: Credentials | None = None
        self._credentials_loaded = False
        #: Bearer tokens by scope, and whether the registry asked for Basic.
        self._tokens: dict[str, str] = {}
        self._basic = False
        handlers: list[urllib.request.BaseHandler] = [
            urllib.request.HTTPSHandler(context=_ssl_context(registry))
        ]
        if is_loopback(registry):
            handlers.append(urllib.request.ProxyHandler({}))  # a proxy can't reach our loopback
        self._opener = urllib.request.build_opener(*handlers)

    @classmethod
    def for_reference(cls, ref: str | Reference, **kwargs: Any) -> RegistryClient:
        reference = ref if isinstance(ref, Reference) else parse_reference(ref)
        return cls(reference.registry, **kwargs)

    def __repr__(self) -> str:
        return f"RegistryClient({self.scheme}://{self.host})"

    # -- what callers ask -----------------------------------------------------------------

    def get_manifest(self, ref: Reference, *, origin: str = "") -> Manifest:
        """The index or image manifest ``ref`` names (by tag or digest)."""
        self._check_registry(ref)
        what = f"manifest {origin or ref}"
        path = f"/v2/{ref.repository}/manifests/{urllib.parse.quote(ref.tag_or_digest, safe=':')}"
        with self._open(path, ref.repository, what, accept=MANIFEST_ACCEPT) as response:
            body = _read_limited(response, MAX_DOCUMENT, what)
            content_type = response.headers.get("Content-Type", "")
        return Manifest.parse(ref, body, content_type, origin=origin)

    def image_config(self, manifest: Manifest) -> dict[str, Any]:
        """The image config blob of an image manifest, as JSON."""
        descriptor = manifest.config
        what = f"config {descriptor.digest} of {manifest.origin}"
        with self.open_blob(manifest.ref, descriptor, what=what) as blob:
            data = blob.read(MAX_DOCUMENT + 1)
            if len(data) > MAX_DOCUMENT:
                raise ImageError(f"{what} is larger than {MAX_DOCUMENT} bytes")
            blob.finish()
        try:
            config = json.loads(data)
        except ValueError as exc:
            raise ImageError(f"{what} is not JSON", seen=str(exc)) from None
        return config if isinstance(config, dict) else {}

    @contextlib.contextmanager
    def open_blob(self, ref: Reference, descriptor: Descriptor, *, what: str = "") -> Iterator[BlobStream]:
        """A blob as a stream; reading it to the end (or ``finish()``) checks its digest."""
        self._check_registry(ref)
        what = what or f"blob {descriptor.digest} of {ref}"
        path = f"/v2/{ref.repository}/blobs/{descriptor.digest}"
        with self._open(path, ref.repository, what) as response:
            yield BlobStream(response, descriptor, what)

    def resolve(
        self,
        ref: str | Reference,
        platform: str | Platform,
        variant_hint: str | None = None,
        *,
        target: str | None = None,
    ) -> Resolved:
        """The image ``ref`` holds for ``platform``: through its index when it names one."""
        reference = ref if isinstance(ref, Reference) else parse_reference(ref)
        top = self.get_manifest(reference)
        if not top.is_index:
            return Resolved(reference, None, None, top, self.image_config(top))
        entry = find_entry(top, platform, variant_hint, target=target)
        if entry.media_type and entry.media_type not in IMAGE_TYPES:
            raise ImageError(
                f"entry {entry.platform} of index {reference} is a {entry.media_type}, not an image manifest",
                target=target,
                seen=f"the index has {top.describe_entries()}",
            )
        origin = f"{reference} (entry {entry.platform})"
        manifest = self.get_manifest(reference.with_digest(entry.digest), origin=origin)
        return Resolved(reference, top, entry, manifest, self.image_config(manifest))

    # -- HTTP and authentication ----------------------------------------------------------

    def credentials(self) -> Credentials | None:
        if not self._credentials_loaded:
            self._credentials = load_credentials(self.registry, self._auth_from)
            self._credentials_loaded = True
        return self._credentials

    def _check_registry(self, ref: Reference) -> None:
        if ref.registry != self.registry:
            raise ImageError(f"{ref} is not on registry {self.registry}", hint="use a client per registry")

    def _authorization(self, scope: str) -> str | None:
        if scope in self._tokens:
            return self._tokens[scope]
        credentials = self.credentials()
        if self._basic and credentials is not None and credentials.password:
            return credentials.basic()
        return None

    def _open(
        self, path: str, repository: str, what: str, *, accept: str | None = None
    ) -> http.client.HTTPResponse:
        url = f"{self.scheme}://{self.host}{path}"
        scope = f"repository:{repository}:pull"
        for attempt in (1, 2):
            request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
            if accept:
                request.add_header("Accept", accept)
            authorization = self._authorization(scope)
            if authorization:
                # Unredirected: blob downloads redirect to storage that must not see it.
                request.add_unredirected_header("Authorization", authorization)
            try:
                response: http.client.HTTPResponse = self._opener.open(request, timeout=self.timeout)
            except urllib.error.HTTPError as exc:
                with exc:
                    if exc.code == 401 and attempt == 1 and self._answer_challenge(exc, scope, what):
                        continue
                    raise self._http_error(exc, what) from None
            except (urllib.error.URLError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                raise ImageError(
                    f"could not reach registry {self.registry} for {what}",
                    seen=self._scrub(f"{url}: {reason}"),
                    hint="is the registry running, and the registry part of the image name right?",
                ) from None
            log.debug("GET %s: %s", url, response.status)
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    def _answer_challenge(self, exc: urllib.error.HTTPError, scope: str, what: str) -> bool:
        """Get what the 401 asks for; False when there is nothing more to offer."""
        for header in exc.headers.get_all("WWW-Authenticate") or []:
            kind, _, rest = header.strip().partition(" ")
            params = {
                m.group(1).lower(): m.group(2) or m.group(3) or "" for m in _CHALLENGE_RE.finditer(rest)
            }
            if kind.lower() == "bearer":
                self._tokens[scope] = "Bearer " + self._fetch_token(params, scope, what)
                return True
            if kind.lower() == "basic":
                credentials = self.credentials()
                if credentials is None or not credentials.password or self._basic:
                    return False
                self._basic = True
                return True
        return False

    def _fetch_token(self, params: Mapping[str, str], scope: str, what: str) -> str:
        realm = params.get("realm", "")
        parts = urllib.parse.urlsplit(realm)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ImageError(
                f"registry {self.registry} asked for a token from an unusable realm",
                seen=f"{what}: realm {realm!r}",
            )
        credentials = self.credentials()
        if credentials is not None and parts.scheme == "http" and not is_loopback(parts.netloc):
            raise ImageError(
                f"registry {self.registry} wants credentials sent to {realm} over plain HTTP; refused",
                seen=f"{what}: credentials from {credentials.source}",
            )
        query = {"scope": params.get("scope") or scope}
        if params.get("service"):
            query["service"] = params["service"]
        if credentials is not None and credentials.identity_token:
            form = {**query, "grant_type": "refresh_token", "client_id": "pytest-epics-multiarch"}
            form["refresh_token"] = credentials.identity_token
            request = urllib.request.Request(
                realm, data=urllib.parse.urlencode(form).encode(), headers={"User-Agent": USER_AGENT}
            )
        else:
            separator = "&" if parts.query else "?"
            request = urllib.request.Request(
                realm + separator + urllib.parse.urlencode(query), headers={"User-Agent": USER_AGENT}
            )
            if credentials is not None and credentials.password:
                request.add_unredirected_header("Authorization", credentials.basic())
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                answer = json.loads(_read_limited(response, MAX_DOCUMENT, "token"))
        except urllib.error.HTTPError as exc:
            with exc:
                raise self._http_error(exc, f"a token for {what} from {parts.netloc}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise ImageError(
                f"could not get a token from {parts.netloc} for registry {self.registry}",
                seen=self._scrub(f"{what}: {getattr(exc, 'reason', exc)}"),
            ) from None
        token = (answer.get("token") or answer.get("access_token")) if isinstance(answer, dict) else None
        if not isinstance(token, str) or not token:
            raise ImageError(f"the token server {parts.netloc} answered without a token", seen=what)
        return token

    def _http_error(self, exc: urllib.error.HTTPError, what: str) -> ImageError:
        try:
            body = exc.read(16384)
        except OSError:
            body = b""
        seen = f"HTTP {exc.code} {exc.reason}"
        detail = _registry_errors(body)
        if detail:
            seen += f": {detail}"
        credentials = self.credentials() if exc.code in (401, 403) else None
        if exc.code in (401, 403):
            where = (
                f"credentials from {credentials.source}"
                if credentials is not None
                else f"no credentials for {self.registry} in {docker_config_path(self._auth_from)}"
            )
            return ImageError(
                f"registry {self.registry} refused access to {what}",
                seen=self._scrub(f"{seen}; {where}"),
                hint=f"docker login {self.registry} (or set DOCKER_CONFIG to the config that has access)",
            )
        if exc.code == 404:
            return ImageError(
                f"registry {self.registry} has no {what}",
                seen=self._scrub(seen),
                hint="check the repository and tag (pushed to this registry?)",
            )
        return ImageError(f"registry {self.registry} failed on {what}", seen=self._scrub(seen))

    def _scrub(self, text: str) -> str:
        """No secret leaves in an error, whatever a server echoed."""
        secrets = list(self._tokens.values())
        if self._credentials is not None:
            secrets += self._credentials.secrets()
        for secret in secrets:
            text = text.replace(secret, "***")
            text = text.replace(secret.removeprefix("Bearer "), "***")
        return text


class BlobStream(io.RawIOBase):
    """A blob's bytes from the registry, hashed on the way; a mismatch raises at the end."""

    def __init__(self, response: http.client.HTTPResponse, descriptor: Descriptor, what: str) -> None:
        super().__init__()
        algorithm, _, self._expected = descriptor.digest.partition(":")
        if algorithm not in ("sha256", "sha512"):
            raise ImageError(f"{what}: unsupported digest algorithm {algorithm!r}")
        self._hash = hashlib.new(algorithm)
        self._response = response
        self._size = descriptor.size
        self._what = what
        self._count = 0
        self._checked = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count = self._response.readinto(buffer)
        if count:
            self._hash.update(memoryview(buffer)[:count])
            self._count += count
        else:
            self._check()
        return count

    def finish(self) -> None:
        """Read what is left and check the digest (a tar reader may stop before the end)."""
        chunk = bytearray(1 << 16)
        while self.readinto(chunk):
            pass

    def _check(self) -> None:
        if self._checked:
            return
        self._checked = True
        if self._size >= 0 and self._count != self._size:
            raise ImageError(
                f"{self._what}: the registry sent {self._count} bytes, the manifest says {self._size}"
            )
        if self._hash.hexdigest() != self._expected:
            raise ImageError(f"{self._what}: the content does not match its digest")


def _read_limited(response: http.client.HTTPResponse, limit: int, what: str) -> bytes:
    body = response.read(limit + 1)
    if len(body) > limit:
        raise ImageError(f"{what}: larger than {limit} bytes")
    return body


def _registry_errors(body: bytes) -> str:
    """The ``errors`` of a registry's JSON answer: "MANIFEST_UNKNOWN: manifest unknown"."""
    try:
        data = json.loads(body)
    except ValueError:
        return body[:200].decode(errors="replace").strip()
    if not isinstance(data, dict):
        return ""
    texts = []
    for error in data.get("errors") or []:
        if isinstance(error, dict):
            texts.append(": ".join(str(error[key]) for key in ("code", "message") if error.get(key)))
    if not texts and isinstance(data.get("details"), str):
        texts.append(data["details"])
    return "; ".join(texts)[:300]


def _ssl_context(registry: str) -> ssl.SSLContext:
    """System CAs plus the registry's own, where the engine reads it (``certs.d``)."""
    context = ssl.create_default_context()
    ca = Path("/etc/docker/certs.d") / registry / "ca.crt"
    if ca.is_file():
        context.load_verify_locations(cafile=str(ca))
    return context
