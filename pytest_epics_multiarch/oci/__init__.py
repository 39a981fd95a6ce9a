"""Images straight from a registry, for what the engine refuses to pull.

Registries hold OCI indexes (and Docker manifest lists) whose entries carry platforms such as
``rtems/powerpc/runtime`` beside ``linux/amd64``; the engine refuses such an entry ("operating
system is not supported" when the image config names the OS too, "no matching manifest" for a
platform without the entry's variant). This package reads the index from the registry itself,
picks the entry by platform, and takes files out of the entry's layer blobs; an RTEMS runtime
image's boot image and startup files never need the engine. Only the standard library is used.

    client = RegistryClient.for_reference(ref)                 # auth from the docker config
    resolved = client.resolve(ref, "rtems/powerpc", "runtime") # the index entry and its image
    if not resolved.engine_can_pull:
        payload = payload_from_layers(client, resolved.manifest, paths, dest, target=name)
"""

from .credentials import Credentials, docker_config_path, load_credentials
from .layers import extract_from_layers, payload_from_layers
from .manifest import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Manifest,
    find_entry,
)
from .reference import Platform, Reference, is_loopback, parse_reference
from .registry import BlobStream, RegistryClient, Resolved

__all__ = [
    "DOCKER_LIST",
    "DOCKER_MANIFEST",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "BlobStream",
    "Credentials",
    "Descriptor",
    "Manifest",
    "Platform",
    "Reference",
    "RegistryClient",
    "Resolved",
    "docker_config_path",
    "extract_from_layers",
    "find_entry",
    "is_loopback",
    "load_credentials",
    "parse_reference",
    "payload_from_layers",
]
