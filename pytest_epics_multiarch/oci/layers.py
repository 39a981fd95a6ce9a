"""Taking files out of an image's layer blobs, without the engine.

The layers are applied in order, as the engine would, but only for the wanted paths: a file in
a later layer replaces the one below it, a whiteout (``.wh.<name>``) deletes what the layers
below hold at ``<name>``, an opaque whiteout (``.wh..wh..opq``) everything below in its folder.
Files are staged while the layers stream past and written under ``dest`` at the end, mirroring
their paths in the image; nothing written can point or lead outside ``dest``.
"""

from __future__ import annotations

import gzip
import io
import itertools
import logging
import os
import posixpath
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import ImageError
from ..payload import LABEL_QEMU, Payload
from .manifest import Descriptor, Manifest
from .registry import BlobStream, RegistryClient

log = logging.getLogger("pytest_epics_multiarch.oci")

_OPAQUE = ".wh..wh..opq"
_WHITEOUT = ".wh."


@dataclass
class _Node:
    kind: str  # "dir", "file" or "symlink"
    layer: int
    mode: int
    data: Path | None = None  # the staged content of a file
    link: str = ""


class _Tree:
    """The wanted part of the image's file system, as the layers applied so far leave it."""

    def __init__(self, wanted: list[PurePosixPath]) -> None:
        self.wanted = wanted
        self.nodes: dict[PurePosixPath, _Node] = {}
        #: Symlinks on the way to a wanted path (for the error when nothing is there).
        self.links_above: dict[PurePosixPath, str] = {}

    def is_wanted(self, path: PurePosixPath) -> bool:
        return any(path == want or want in path.parents for want in self.wanted)

    def has(self, path: PurePosixPath) -> bool:
        return any(key == path or path in key.parents for key in self.nodes)

    def get(self, path: PurePosixPath) -> _Node | None:
        return self.nodes.get(path)

    def put(self, path: PurePosixPath, node: _Node) -> None:
        for parent in path.parents:
            if parent in self.nodes and self.nodes[parent].kind != "dir":
                self._drop(parent)  # a file below becomes the folder this entry implies
        old = self.nodes.get(path)
        if node.kind != "dir":
            self.remove(path, below_layer=node.layer + 1)  # a file or link replaces a folder
        elif old is not None and old.kind != "dir":
            self._drop(path)
        self.nodes[path] = node

    def remove(self, path: PurePosixPath, *, below_layer: int) -> None:
        """Drop what layers below ``below_layer`` hold at ``path`` and under it."""
        for key in [key for key in self.nodes if key == path or path in key.parents]:
            if self.nodes[key].layer < below_layer:
                self._drop(key)

    def remove_children(self, folder: PurePosixPath, *, below_layer: int) -> None:
        for key in [key for key in self.nodes if folder in key.parents]:
            if self.nodes[key].layer < below_layer:
                self._drop(key)

    def _drop(self, key: PurePosixPath) -> None:
        node = self.nodes.pop(key)
        if node.data is not None:
            node.data.unlink(missing_ok=True)


def extract_from_layers(
    client: RegistryClient,
    manifest: Manifest,
    paths: Mapping[str, str],
    dest: Path,
    *,
    target: str | None = None,
) -> dict[str, Path]:
    """Write the files at ``paths`` (role -> absolute path in the image) under ``dest``.

    Returns role -> host path (``dest`` + the image path). A path may name a file or a folder;
    a role whose path the image doesn't have raises :class:`ImageError`.
    """
    wanted = {role: _wanted_path(role, path, manifest, target) for role, path in paths.items()}
    dest.mkdir(parents=True, exist_ok=True)
    tree = _Tree(list(wanted.values()))
    staging = Path(tempfile.mkdtemp(prefix=".oci-layers-", dir=dest))
    try:
        layers = manifest.layers
        for number, layer in enumerate(layers, 1):
            what = f"layer {number}/{len(layers)} ({layer.digest}) of {manifest.origin}"
            _check_layer_type(layer, what, target)
            with client.open_blob(manifest.ref, layer, what=what) as blob:
                _apply_layer(blob, tree, number, staging, what, target)
            log.debug("applied %s", what)
        missing = {role: path for role, path in wanted.items() if not tree.has(path)}
        if missing:
            raise _missing_error(missing, tree, manifest, len(layers), target)
        _materialize(tree, dest, manifest, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {role: dest.joinpath(*path.parts) for role, path in wanted.items()}


def payload_from_layers(
    client: RegistryClient,
    manifest: Manifest,
    paths: Mapping[str, str | None],
    dest: Path,
    *,
    target: str | None = None,
) -> Payload:
    """:func:`extract_from_layers` for a QEMU payload: the same :class:`Payload` as the engine's."""
    wanted = {role: path for role, path in paths.items() if path}
    if "kernel" not in wanted:
        raise ImageError(f"no kernel path to take out of {manifest.origin}", target=target)
    files = extract_from_layers(client, manifest, wanted, dest, target=target)
    return Payload(
        dest,
        files["kernel"],
        files.get("initrd"),
        files.get("bios"),
        files.get("assets"),
        files.get("startup"),
    )


def _wanted_path(role: str, path: str, manifest: Manifest, target: str | None) -> PurePosixPath:
    pure = PurePosixPath(path)
    if not pure.is_absolute() or ".." in pure.parts or pure == PurePosixPath("/"):
        raise ImageError(
            f"payload path {role}={path!r} must be an absolute path below / in {manifest.origin}",
            target=target,
        )
    return pure.relative_to("/")


def _check_layer_type(layer: Descriptor, what: str, target: str | None) -> None:
    media = layer.media_type
    if "zstd" in media:
        raise ImageError(
            f"{what} is compressed with zstd, which this Python cannot read",
            target=target,
            seen=media,
            hint="push the image with gzip layers (buildx: --output compression=gzip)",
        )
    if "foreign" in media or "nondistributable" in media:
        raise ImageError(f"{what} is a non-distributable layer the registry doesn't hold", target=target)


def _member_path(name: str, what: str, target: str | None) -> PurePosixPath | None:
    """A member's path relative to the image root; None for the root itself."""
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise ImageError(
            f"{what} has an entry that leaves the image's root: {name!r}; refused", target=target
        )
    return PurePosixPath(*parts) if parts else None


def _apply_layer(
    blob: BlobStream, tree: _Tree, number: int, staging: Path, what: str, target: str | None
) -> None:
    counter = itertools.count()
    buffered = io.BufferedReader(blob, 1 << 20)
    try:
        # "r|*": a stream, gzip or not (Docker and OCI layers are either).
        with tarfile.open(fileobj=buffered, mode="r|*") as archive:
            for member in archive:
                path = _member_path(member.name, what, target)
                if path is None:
                    continue
                if path.name == _OPAQUE:
                    tree.remove_children(path.parent, below_layer=number)
                    continue
                if path.name.startswith(_WHITEOUT):
                    tree.remove(path.parent / path.name[len(_WHITEOUT) :], below_layer=number)
                    continue
                if not tree.is_wanted(path):
                    if any(path in want.parents for want in tree.wanted):
                        if member.issym():
                            tree.links_above[path] = member.linkname
                        else:
                            tree.links_above.pop(path, None)
                    continue
                if member.isdir():
                    tree.put(path, _Node("dir", number, member.mode))
                elif member.isreg():
                    staged = staging / f"{number}-{next(counter)}"
                    source = archive.extractfile(member)
                    assert source is not None
                    with source, open(staged, "wb") as out:
                        shutil.copyfileobj(source, out, 1 << 20)
                    tree.put(path, _Node("file", number, member.mode, staged))
                elif member.issym():
                    tree.put(path, _Node("symlink", number, member.mode, link=member.linkname))
                elif member.islnk():
                    staged = staging / f"{number}-{next(counter)}"
                    tree.put(path, _hard_link(tree, path, member, number, staged, what, target))
                else:
                    log.debug("%s: skipping /%s (a device or fifo)", what, path)
        blob.finish()  # the digest covers the whole blob, also what follows the tar's end
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise ImageError(f"{what} is not a readable tar", target=target, seen=str(exc)) from None


def _hard_link(
    tree: _Tree,
    path: PurePosixPath,
    member: tarfile.TarInfo,
    number: int,
    staged: Path,
    what: str,
    target: str | None,
) -> _Node:
    source_path = _member_path(member.linkname, what, target)
    source = tree.get(source_path) if source_path is not None else None
    if source is None or source.kind != "file" or source.data is None:
        raise ImageError(
            f"{what}: /{path} is a hard link to /{source_path}, which is not among the paths taken out",
            target=target,
            hint="take out a folder that holds both",
        )
    shutil.copyfile(source.data, staged)
    return _Node("file", number, source.mode, staged)


def _materialize(tree: _Tree, dest: Path, manifest: Manifest, target: str | None) -> None:
    root = dest.resolve()
    links = []
    for key in sorted(tree.nodes, key=lambda key: len(key.parts)):  # folders before their files
        node = tree.nodes[key]
        host = _make_parents(dest, key, manifest, target)
        if node.kind == "symlink":
            links.append((key, node, host))  # last, so no file is written through one
            continue
        if node.kind == "dir":
            if host.is_symlink() or (host.exists() and not host.is_dir()):
                host.unlink()
            host.mkdir(exist_ok=True)
            continue
        _clear(host)
        assert node.data is not None
        os.replace(node.data, host)
        # Owner read/write so the folder can be removed later; never setuid.
        os.chmod(host, (node.mode & 0o777) | 0o600)
    for key, node, host in links:
        _make_parents(dest, key, manifest, target)
        _clear(host)
        os.symlink(_contained_link(key, node.link, dest), host)
    for key, node, host in links:
        if not _inside(Path(os.path.realpath(host)), root):
            host.unlink()
            raise ImageError(
                f"refused the symlink /{key} -> {node.link} of {manifest.origin}: it leads outside {dest}",
                target=target,
            )


def _make_parents(dest: Path, key: PurePosixPath, manifest: Manifest, target: str | None) -> Path:
    """Create the folders of ``key`` below ``dest``, never through a symlink already there."""
    folder = dest
    for part in key.parent.parts:
        folder = folder / part
        if folder.is_symlink():
            raise ImageError(
                f"refused to write /{key} of {manifest.origin}: {folder} is a symlink, which could "
                f"lead outside {dest}",
                target=target,
                hint="take the payload out into an empty folder",
            )
        if not folder.is_dir():
            _clear(folder)
            folder.mkdir()
    return dest.joinpath(*key.parts)


def _contained_link(key: PurePosixPath, link: str, dest: Path) -> str:
    """The link's target inside ``dest``, resolved the way the image's root resolves it.

    An absolute link names a path in the image, and ``..`` stops at the image's root.
    """
    base = "/" + "/".join(key.parent.parts)
    resolved = posixpath.normpath(posixpath.join(base, link)).lstrip("/")
    return os.path.relpath(
        dest.joinpath(*PurePosixPath(resolved or ".").parts), dest.joinpath(*key.parent.parts)
    )


def _clear(host: Path) -> None:
    if host.is_symlink() or host.is_file():
        host.unlink()
    elif host.is_dir():
        shutil.rmtree(host)


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _missing_error(
    missing: Mapping[str, PurePosixPath], tree: _Tree, manifest: Manifest, layers: int, target: str | None
) -> ImageError:
    role, path = next(iter(missing.items()))
    seen = f"its {layers} layers have nothing at /{path}"
    for link, points_to in tree.links_above.items():
        if link in path.parents:
            seen += f"; /{link} is a symlink to {points_to}: name the path it points to"
    others = ", ".join(f"{other}=/{where}" for other, where in list(missing.items())[1:])
    if others:
        seen += f" (nor at {others})"
    return ImageError(
        f"{manifest.origin} has no {role} at /{path}",
        target=target,
        seen=seen,
        hint=f"set qemu.{role} for this target in epics-multiarch.yaml, or the image label "
        f"{LABEL_QEMU}{role}",
    )
