"""Manifests and indexes as the registry serves them, and picking an index's entry by platform.

An index (OCI image index or Docker manifest list) lists image manifests, each with the platform
it is for. Registries hold indexes whose entries carry platforms the engine refuses
(``rtems/powerpc/runtime``); :func:`find_entry` picks such an entry without the engine.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ImageError
from .reference import Platform, Reference

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
IMAGE_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
#: What the client asks manifests for, indexes first (as the engine does).
MANIFEST_ACCEPT = ", ".join((*INDEX_TYPES, *IMAGE_TYPES))

#: BuildKit's provenance/SBOM entries: ``unknown/unknown`` platforms, not images to run.
_ATTESTATION = "vnd.docker.reference.type"


@dataclass(frozen=True)
class Descriptor:
    """A reference to a blob or manifest by digest: an index entry, a config or a layer."""

    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any, *, where: str) -> Descriptor:
        if not isinstance(data, dict) or not isinstance(data.get("digest"), str):
            raise ImageError(f"{where}: a descriptor without a digest", seen=json.dumps(data)[:200])
        annotations = data.get("annotations")
        return cls(
            media_type=str(data.get("mediaType", "")),
            digest=data["digest"],
            size=int(data.get("size", -1)),
            platform=Platform.from_json(data.get("platform")),
            annotations=dict(annotations) if isinstance(annotations, dict) else {},
        )

    @property
    def is_attestation(self) -> bool:
        return _ATTESTATION in self.annotations


@dataclass(frozen=True)
class Manifest:
    """One manifest as fetched: an index, or an image manifest (config + layers)."""

    #: The reference it was fetched by (a tag, or the digest of an index entry).
    ref: Reference
    media_type: str
    digest: str
    data: Mapping[str, Any]
    #: How errors name it, e.g. "127.0.0.1:5055/x:1.0 (entry rtems/powerpc/runtime)".
    origin: str = ""

    @classmethod
    def parse(cls, ref: Reference, body: bytes, content_type: str, *, origin: str = "") -> Manifest:
        where = origin or str(ref)
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise ImageError(f"{where}: the registry's manifest is not JSON", seen=str(exc)) from None
        if not isinstance(data, dict):
            raise ImageError(f"{where}: the registry's manifest is not a JSON object")
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if ref.is_digest and ref.tag_or_digest.startswith("sha256:") and ref.tag_or_digest != digest:
            raise ImageError(
                f"{where}: the manifest the registry sent does not match its digest",
                seen=f"asked for {ref.tag_or_digest}, the content hashes to {digest}",
            )
        # The header may carry parameters ("; charset=utf-8"); the body's own field is the truth.
        media_type = str(data.get("mediaType") or content_type.split(";")[0].strip())
        if not media_type and "manifests" in data:
            media_type = OCI_INDEX  # an OCI index may leave mediaType out
        elif not media_type and "layers" in data:
            media_type = OCI_MANIFEST
        if media_type not in (*INDEX_TYPES, *IMAGE_TYPES):
            raise ImageError(
                f"{where}: the registry sent a manifest of type {media_type or 'unknown'}",
                seen="expected one of " + ", ".join((*INDEX_TYPES, *IMAGE_TYPES)),
                hint="schema 1 manifests are not supported; push the image again with a current docker",
            )
        return cls(ref, media_type, digest, data, origin or str(ref))

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    @property
    def entries(self) -> list[Descriptor]:
        """An index's entries (none for an image manifest)."""
        items = self.data.get("manifests") if self.is_index else None
        return [Descriptor.from_json(item, where=self.origin) for item in items or []]

    @property
    def config(self) -> Descriptor:
        return Descriptor.from_json(self.data.get("config"), where=f"{self.origin}: config")

    @property
    def layers(self) -> list[Descriptor]:
        items = self.data.get("layers")
        if not isinstance(items, list):
            raise ImageError(f"{self.origin}: the image manifest has no layers list")
        return [Descriptor.from_json(item, where=f"{self.origin}: layer") for item in items]

    def describe_entries(self) -> str:
        """What an index holds, for error messages: "linux/amd64, rtems/powerpc/runtime"."""
        names = [str(entry.platform or "no platform") for entry in self.entries if not entry.is_attestation]
        return ", ".join(names) or "no entries"


def find_entry(
    index: Manifest,
    platform: str | Platform,
    variant_hint: str | None = None,
    *,
    target: str | None = None,
) -> Descriptor:
    """The entry of ``index`` for ``platform`` (``os/architecture[/variant]``).

    A platform with a variant matches only entries with that variant. Without one, an entry
    whose variant is ``variant_hint`` (the image stage: ``runtime``, ``developer``) is chosen,
    else an entry without a variant; with no hint, the only entry for the os/architecture.
    """
    wanted = platform if isinstance(platform, Platform) else Platform.parse(platform)
    if not index.is_index:
        raise ImageError(
            f"{index.origin} is an image manifest, not an index",
            target=target,
            seen=f"media type {index.media_type}",
            hint="pull it as it is: only an index has entries to choose from",
        )
    entries = [entry for entry in index.entries if not entry.is_attestation]
    same = [
        entry
        for entry in entries
        if entry.platform is not None
        and (entry.platform.os, entry.platform.architecture) == (wanted.os, wanted.architecture)
    ]
    hint = variant_hint.lower() if variant_hint else None
    if wanted.variant is not None:
        chosen = [entry for entry in same if _variant(entry) == wanted.variant]
        asked = str(wanted)
    elif hint is not None:
        chosen = [entry for entry in same if _variant(entry) == hint] or [
            entry for entry in same if _variant(entry) is None
        ]
        asked = f"{wanted}/{hint} (or {wanted})"
    else:
        chosen = same
        asked = str(wanted)
    if len(chosen) == 1:
        return chosen[0]
    holds = index.describe_entries()
    if not chosen:
        raise ImageError(
            f"index {index.origin} has {holds}; no {asked}",
            target=target,
            seen="its entries: " + ", ".join(_short(entry) for entry in entries),
            hint="set the target's index platform (os/architecture[/variant]) to one of the entries",
        )
    raise ImageError(
        f"index {index.origin} has {holds}; {len(chosen)} entries match {asked}",
        target=target,
        seen="matching: " + ", ".join(_short(entry) for entry in chosen),
        hint="name the variant in the target's index platform, e.g. " + _example(chosen),
    )


def _short(entry: Descriptor) -> str:
    return f"{entry.platform or 'no platform'} {entry.digest[:19]}"


def _variant(entry: Descriptor) -> str | None:
    return entry.platform.variant if entry.platform is not None else None


def _example(entries: Sequence[Descriptor]) -> str:
    for entry in entries:
        if entry.platform is not None and entry.platform.variant:
            return str(entry.platform)
    return "os/architecture/variant"
