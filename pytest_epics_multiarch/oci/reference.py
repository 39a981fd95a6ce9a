"""Image references and platforms, read the way Docker reads them."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import NamedTuple

from ..errors import ImageError

#: What ``docker pull debian`` means: the registry and the namespace of single names.
DOCKER_HUB = "docker.io"
_HUB_ALIASES = ("index.docker.io", "registry-1.docker.io")
#: The host that serves Docker Hub's registry API, and the key ``docker login`` writes.
DOCKER_HUB_API = "registry-1.docker.io"
DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST_RE = re.compile(r"^[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}$")
_HOST_RE = re.compile(
    r"^(?:(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*"
    r"|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?$"
)


class Reference(NamedTuple):
    """``registry/repository`` and a tag or a ``sha256:`` digest; unpacks as a 3-tuple."""

    registry: str
    repository: str
    tag_or_digest: str

    @property
    def is_digest(self) -> bool:
        return ":" in self.tag_or_digest

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.registry, self.repository, digest)

    def __str__(self) -> str:
        sep = "@" if self.is_digest else ":"
        return f"{self.registry}/{self.repository}{sep}{self.tag_or_digest}"


def parse_reference(ref: str) -> Reference:
    """Split an image reference with Docker's rules.

    ``debian`` is ``docker.io/library/debian:latest``; the first part names a registry only
    when it has a ``.`` or a ``:`` (a port) or is ``localhost``; a digest wins over a tag.
    """
    text = ref.strip()
    if not text:
        raise ImageError("an empty image reference", hint="write registry/repository:tag")
    name, _, digest = text.partition("@")
    if digest and not _DIGEST_RE.match(digest):
        raise ImageError(f"image reference {ref!r} has a malformed digest {digest!r}")
    tag = ""
    last_slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > last_slash:
        name, tag = name[:colon], name[colon + 1 :]
        if not _TAG_RE.match(tag):
            raise ImageError(f"image reference {ref!r} has a malformed tag {tag!r}")
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        registry, repository = first, rest
    else:
        registry, repository = DOCKER_HUB, name
    if registry in _HUB_ALIASES:
        registry = DOCKER_HUB
    if not _HOST_RE.match(registry):
        raise ImageError(f"image reference {ref!r} has a malformed registry {registry!r}")
    if registry == DOCKER_HUB and "/" not in repository:
        repository = "library/" + repository
    if not _PATH_RE.match(repository):
        why = "must be lowercase" if repository != repository.lower() else "is malformed"
        raise ImageError(f"image reference {ref!r}: repository name {repository!r} {why}")
    return Reference(registry, repository, digest or tag or "latest")


def registry_host(registry: str) -> str:
    """The host name of a registry (``[::1]:5000`` -> ``::1``)."""
    if registry.startswith("["):
        return registry[1:].split("]", 1)[0]
    return registry.rsplit(":", 1)[0] if registry.count(":") == 1 else registry


def is_loopback(registry: str) -> bool:
    """127.0.0.0/8, ::1 and localhost: registries the engine talks plain HTTP to by default."""
    host = registry_host(registry)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


#: Other names of architectures, as the engine normalises them.
_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "ppc": "powerpc"}


@dataclass(frozen=True)
class Platform:
    """``os/architecture[/variant]``: an index entry's platform, or what a target asks for."""

    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.strip().lower().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ImageError(
                f"platform {text!r} is not os/architecture[/variant]",
                hint="e.g. rtems/powerpc or rtems/powerpc/runtime",
            )
        arch = _ARCH_ALIASES.get(parts[1], parts[1])
        return cls(parts[0], arch, parts[2] if len(parts) == 3 else None)

    @classmethod
    def from_json(cls, data: object) -> Platform | None:
        """The ``platform`` object of an index entry (None when it has none)."""
        if not isinstance(data, dict):
            return None
        os_name, arch = str(data.get("os", "")).lower(), str(data.get("architecture", "")).lower()
        variant = data.get("variant")
        return cls(os_name, _ARCH_ALIASES.get(arch, arch), str(variant).lower() if variant else None)

    def __str__(self) -> str:
        return "/".join(part for part in (self.os, self.architecture, self.variant) if part)
