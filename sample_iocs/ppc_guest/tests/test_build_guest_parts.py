"""Host tests of build_guest.py's pure parts (no apt, no downloads)."""

from __future__ import annotations

import io
import stat
from pathlib import Path

import build_guest
import pytest


def read_newc(data: bytes) -> list[tuple[str, int, bytes, tuple[int, int]]]:
    """Parse a newc archive: (name, mode, data, (rdevmajor, rdevminor)) per entry."""
    entries = []
    offset = 0
    while True:
        assert data[offset : offset + 6] == b"070701", f"bad magic at {offset}"
        fields = [int(data[offset + 6 + 8 * i : offset + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rdev = fields[1], fields[6], (fields[9], fields[10])
        namesize = fields[11]
        name_start = offset + 110
        name = data[name_start : name_start + namesize - 1].decode()
        data_start = name_start + namesize + (-(110 + namesize) % 4)
        if name == "TRAILER!!!":
            return entries
        entries.append((name, mode, data[data_start : data_start + size], rdev))
        offset = data_start + size + (-size % 4)


def test_cpio_writer_round_trip(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "busybox").write_bytes(b"\x7fELF" + b"x" * 5)
    (root / "bin" / "busybox").chmod(0o755)
    (root / "bin" / "sh").symlink_to("busybox")
    (root / "init").write_text("#!/bin/busybox sh\n")
    buffer = io.BytesIO()
    writer = build_guest.CpioWriter(buffer)
    writer.tree(root)
    writer.char_device("dev/console", 5, 1)
    writer.trailer()
    entries = {name: (mode, data, rdev) for name, mode, data, rdev in read_newc(buffer.getvalue())}
    # Sorted, each folder before what it holds.
    assert list(entries) == ["bin", "init", "bin/busybox", "bin/sh", "dev/console"]
    assert stat.S_ISDIR(entries["bin"][0])
    assert entries["bin/busybox"][0] == stat.S_IFREG | 0o755
    assert entries["bin/busybox"][1] == b"\x7fELF" + b"x" * 5
    assert stat.S_ISLNK(entries["bin/sh"][0]) and entries["bin/sh"][1] == b"busybox"
    assert entries["dev/console"][0] == stat.S_IFCHR | 0o600
    assert entries["dev/console"][2] == (5, 1)
    assert len(buffer.getvalue()) % 4 == 0


def test_cpio_output_is_reproducible(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "a").write_text("same")
    outputs = []
    for _ in range(2):
        (root / "a").touch()  # a new mtime must not change the archive
        target = tmp_path / "out.cpio"
        build_guest.write_initramfs(root, target)
        outputs.append(target.read_bytes())
    assert outputs[0] == outputs[1]


def test_parse_apt_show_and_kernel_dependency() -> None:
    text = (
        "Package: linux-image-powerpc64le\nVersion: 6.1.192-3\nArchitecture: ppc64el\n"
        "Depends: linux-image-6.1.0-57-powerpc64le (= 6.1.192-3)\nDescription: x\n more\n\n"
        "Package: busybox-static\nVersion: 1:1.35.0-4\nArchitecture: ppc64el\n"
    )
    paragraphs = build_guest.parse_apt_show(text)
    assert [p["Package"] for p in paragraphs] == ["linux-image-powerpc64le", "busybox-static"]
    assert paragraphs[1]["Version"] == "1:1.35.0-4"


def test_deb_filename_escapes_epoch() -> None:
    assert build_guest.deb_filename("zlib1g", "1:1.2.13.dfsg-1") == "zlib1g_1%3a1.2.13.dfsg-1_ppc64el.deb"


def test_build_key_depends_on_versions() -> None:
    versions: dict[str, str] = {"libc6": "2.36-9", "busybox-static": "1:1.35.0-4"}
    first = build_guest.build_key(build_guest.Resolved(dict(versions), "k", "r"))
    versions["libc6"] = "2.36-10"
    second = build_guest.build_key(build_guest.Resolved(dict(versions), "k", "r"))
    assert first != second
    assert first == build_guest.build_key(
        build_guest.Resolved({"libc6": "2.36-9", "busybox-static": "1:1.35.0-4"}, "k", "r")
    )


def test_sources_digest_sees_guest_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    guest = tmp_path / "guest"
    (guest / "miniioc").mkdir(parents=True)
    (guest / "init").write_text("one")
    monkeypatch.setattr(build_guest, "GUEST_SOURCES", guest)
    monkeypatch.setattr(build_guest, "HERE", tmp_path)
    monkeypatch.setattr(build_guest, "__file__", str(tmp_path / "build_guest.py"))
    (tmp_path / "build_guest.py").write_text("builder")
    before = build_guest.sources_digest()
    (guest / "miniioc" / "__pycache__").mkdir()
    (guest / "miniioc" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"ignored")
    assert build_guest.sources_digest() == before
    (guest / "init").write_text("two")
    assert build_guest.sources_digest() != before
