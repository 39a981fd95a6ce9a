"""Taking an emulated IOC's boot payload out of its runtime image, without running the image.

An RTEMS runtime image is a linux/amd64 image that only *carries* the IOC: the boot image, the
firmware it may need, and the startup files. They are copied out of a created (never started)
container with the engine's archive API, once per image per session.
"""

from __future__ import annotations

import io
import logging
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import docker.errors

from .engine import LABEL_PREFIX, Engine
from .errors import ImageError

log = logging.getLogger("pytest_epics_multiarch.payload")

#: Image labels that override the config's payload paths, e.g. ``...qemu.kernel=/boot/ioc.boot``.
LABEL_QEMU = f"{LABEL_PREFIX}.qemu."


@dataclass(frozen=True)
class Payload:
    """Host paths of what was extracted (None for what the target doesn't use)."""

    root: Path
    kernel: Path
    initrd: Path | None
    bios: Path | None
    assets: Path | None
    startup: Path | None


def label_overrides(labels: Mapping[str, str]) -> dict[str, str]:
    """The ``qemu.*`` labels of an image, without the prefix."""
    return {key[len(LABEL_QEMU) :]: value for key, value in labels.items() if key.startswith(LABEL_QEMU)}


def _host_path(root: Path, image_path: str) -> Path:
    return root / PurePosixPath(image_path).relative_to("/")


def extract_payload(
    engine: Engine,
    image: str,
    paths: Mapping[str, str | None],
    dest: Path,
    *,
    target: str,
    labels: Mapping[str, str],
) -> Payload:
    """Copy ``paths`` (kernel, initrd, bios, assets, startup: paths in the image) to ``dest``."""
    wanted = {role: path for role, path in paths.items() if path}
    for role, path in wanted.items():
        if not path.startswith("/"):
            raise ImageError(
                f"payload path {role}={path!r} must be absolute (a path inside {image})", target=target
            )
    try:
        # A command that never runs: create only, so images without a shell work too.
        container = engine.client.containers.create(image, command=["/payload-not-run"], labels=dict(labels))
    except docker.errors.APIError as exc:
        raise ImageError(
            f"could not open {image} to take its boot payload", target=target, seen=str(exc)
        ) from exc
    # A path inside another wanted folder (the kernel in the IOC folder) comes out with it.
    folders = set(wanted.values())
    try:
        for role, path in sorted(wanted.items(), key=lambda item: len(item[1])):  # folders first
            if any(path.startswith(folder.rstrip("/") + "/") for folder in folders):
                if _host_path(dest, path).exists():
                    continue
            _copy_out(container, path, dest, role=role, image=image, target=target)
    finally:
        try:
            container.remove(force=True)
        except docker.errors.APIError as exc:
            log.warning("could not remove payload container of %s: %s", image, exc)

    def host(role: str) -> Path | None:
        path = wanted.get(role)
        return _host_path(dest, path) if path else None

    kernel = host("kernel")
    assert kernel is not None
    return Payload(dest, kernel, host("initrd"), host("bios"), host("assets"), host("startup"))


class _ChunkReader(io.RawIOBase):
    """A readable file over the engine's archive stream (an iterator of byte chunks)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            try:
                self._pending = next(self._chunks)
            except StopIteration:
                return 0
        count = min(len(buffer), len(self._pending))
        buffer[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count


def _copy_out(container: object, path: str, dest: Path, *, role: str, image: str, target: str) -> None:
    try:
        stream, _stat = container.get_archive(path)  # type: ignore[attr-defined]
    except docker.errors.NotFound:
        raise ImageError(
            f"{image} has no {role} at {path}",
            target=target,
            seen=f"the image has nothing at {path}",
            hint=f"set qemu.{role} for this target in epics-multiarch.yaml, or the image label "
            f"{LABEL_QEMU}{role}",
        ) from None
    parent = _host_path(dest, str(PurePosixPath(path).parent))
    parent.mkdir(parents=True, exist_ok=True)
    # Streamed ("r|"): a boot payload can be large (a kernel and an initramfs of ~100 MB).
    with tarfile.open(fileobj=io.BufferedReader(_ChunkReader(stream)), mode="r|") as archive:
        # The archive's names are relative to the path's parent; the "data" filter refuses links
        # that leave it (Python 3.12, backported to 3.9.17+/3.10.12+/3.11.4+).
        if hasattr(tarfile, "data_filter"):
            archive.extractall(parent, filter="data")
        else:  # pragma: no cover - old Pythons
            archive.extractall(parent)
