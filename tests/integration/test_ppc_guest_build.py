"""The PowerPC test guest's build: real outputs from Debian packages, cached by its inputs.

The guest (sample_iocs/ppc_guest) is a ppc64el Linux built from Debian packages; booting it
through the plugin's QEMU runner is tested in test_qemu_ioc.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "sample_iocs" / "ppc_guest" / "build_guest.py"
QEMU = "qemu-system-ppc64"
READY_LINE = "iocRun: All initialization complete"
BOOT_TIMEOUT_S = 180.0  # TCG only; about 10 s on a 2-core machine
GUEST_NAME = "ppcguest1"


# -- the guest build ---------------------------------------------------------------------------


@dataclass
class GuestBuild:
    folder: Path
    manifest: dict[str, Any]
    first_run_s: float
    cached_run_s: float


def run_build(out: Path) -> float:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(BUILD_SCRIPT), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        pytest.fail(f"build_guest.py failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    log.info("build_guest.py: %.2f s\n%s", elapsed, result.stderr)
    return elapsed


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> GuestBuild:
    missing = [tool for tool in (QEMU, "apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (Debian with qemu-system-ppc installed)")
    out = tmp_path_factory.mktemp("guest")
    first = run_build(out)
    manifest = json.loads((out / "manifest.json").read_text())
    inode = (out / "vmlinux").stat().st_ino
    cached = run_build(out)
    assert json.loads((out / "manifest.json").read_text()) == manifest
    manifest["_rerun_same_inode"] = (out / "vmlinux").stat().st_ino == inode
    log.info(
        "guest build: first run %.2f s (%s), cached run %.2f s",
        first,
        f"built in {manifest['build_seconds']} s",
        cached,
    )
    return GuestBuild(out, manifest, first, cached)


def test_build_outputs_match_manifest_and_rerun_is_cached(
    guest: GuestBuild, record_property: Callable[[str, object], None]
) -> None:
    record_property("build_first_run_s", round(guest.first_run_s, 2))
    record_property("build_cached_run_s", round(guest.cached_run_s, 2))
    record_property("build_seconds_when_built", guest.manifest["build_seconds"])
    for name in ("vmlinux", "initrd.cpio"):
        data = (guest.folder / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == guest.manifest["outputs"][name]["sha256"]
    assert (guest.folder / "vmlinux").read_bytes()[:4] == b"\x7fELF"
    assert (guest.folder / "initrd.cpio").read_bytes()[:6] == b"070701"
    assert re.fullmatch(r"6\.1\.0-\d+-powerpc64le", guest.manifest["kernel"]["release"])
    assert guest.manifest["caproto"] == "1.3.0"
    # An unchanged rebuild comes from the cache: the same manifest, the same (hard-linked) file.
    assert guest.manifest["_rerun_same_inode"]
