"""The emulated path for real: the sample's PowerPC guest target booted through the QEMU runner.

The guest is a ppc64el Linux built from Debian packages (no RTEMS toolchain is reachable from
these machines); its image goes through exactly what an RTEMS qemuprep image goes through:
payload out of the runtime image, startup files over QEMU's TFTP with the CA port injected,
boot, console readiness, Channel Access from the host over hostfwd, iocsh on the console.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_epics_multiarch.errors import IocStartError
from pytest_epics_multiarch.session import EpicsSession
from pytest_epics_multiarch.settings import Settings

from .conftest import SAMPLE

GUEST = "linux/ppc64le"

pytestmark = [
    pytest.mark.docker,
    pytest.mark.qemu,
    pytest.mark.slow,
    pytest.mark.usefixtures("subprocess_env"),
]


def qemu_processes(under: Path) -> list[str]:
    """QEMU processes whose command line names a path under ``under`` (this test's files)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "qemu-system" in text and str(under) in text:
            found.append(f"{cmdline.parent.name}: {text[:200]}")
    return found


@pytest.fixture
def no_leftover_qemu(tmp_path: Path, pytester: pytest.Pytester) -> Iterator[None]:
    """Fails the test when a QEMU it started (its files are under the test's folders) survives."""
    yield
    left = qemu_processes(tmp_path) + qemu_processes(pytester.path)
    assert not left, f"QEMU processes left behind: {left}"


def test_sample_tests_pass_on_the_powerpc_guest(
    pytester: pytest.Pytester, no_leftover_qemu: None, no_leftover_containers: None
) -> None:
    result = pytester.runpytest_subprocess(str(SAMPLE), f"--arch={GUEST}", "-v", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(
        [
            f"*test_doubled_follows_setpoint?{GUEST}? PASSED*",
            f"*test_iocsh_shows_the_value?{GUEST}? PASSED*",
            f"*test_each_client_reads_its_own_ioc?{GUEST}? PASSED*",
            f"{GUEST}*passed*",
        ]
    )
    assert result.ret == 0, result.stdout.str()


def test_boot_get_put_console_and_stop(tmp_path: Path, no_leftover_qemu: None) -> None:
    # A log folder this deep would put a control socket file past the 108-byte limit of a UNIX
    # socket path; QEMU's control socket is a socket pair it inherits, so the depth does not matter.
    work = tmp_path / ("a-deep-log-folder-" * 6)
    assert len(str(work / "ioc-linux-ppc64le-1" / "qmp.sock")) > 108
    session = EpicsSession(Settings(arch=(GUEST,)), work_dir=work, progress=lambda m: None)
    config = session.config_for(SAMPLE / "tests")
    target = config.target(GUEST)
    try:
        ioc = session.start_ioc(config, target, session.image(config, target))
        host, port = ioc.ca_address
        assert host == "127.0.0.1"
        assert f"hostfwd=tcp:127.0.0.1:{port}-:{port}" in " ".join(ioc.runner.argv)  # type: ignore[attr-defined]
        assert "iocRun: All initialization complete" in ioc.logs()
        ioc.ca.put("SAMPLE:SETPOINT", 21.5)
        assert ioc.ca.wait_for("SAMPLE:DOUBLED", 43.0, timeout=10) == 43.0
        assert "21.5" in ioc.iocsh("dbgf SAMPLE:SETPOINT")
        assert list(work.glob("ioc-*/tftp/epics/*/st.cmd"))
    finally:
        session.close()
    # The TFTP folder with the served st.cmd goes with the IOC.
    assert not list(work.glob("ioc-*/tftp"))
    # QEMU was asked to quit over its control socket, not signalled.
    (console,) = work.glob("ioc-*.log")
    assert "terminating on signal" not in console.read_text(errors="replace")


def test_a_guest_that_never_gets_ready_times_out_clearly(tmp_path: Path, no_leftover_qemu: None) -> None:
    # A startup script without iocInit: the guest boots and waits at its prompt forever.
    session = EpicsSession(
        Settings(arch=(GUEST,), start_timeout=30.0), work_dir=tmp_path, progress=lambda m: None
    )
    config = session.config_for(SAMPLE / "tests")
    target = config.target(GUEST)
    never = {**config.qemu[GUEST], "startup": "/epics/ioc/db/sample.db"}
    config = dataclasses.replace(config, qemu={**config.qemu, GUEST: never})
    try:
        with pytest.raises(IocStartError) as info:
            session.start_ioc(config, target, session.image(config, target))
    finally:
        session.close()
    text = str(info.value)
    assert text.startswith(f"[{GUEST}] the IOC did not reach iocRun")
    assert "no match within 30 s" in text
    assert "last" in text and "| " in text  # the console tail
    assert "Hint:" in text and "boot_timeout" in text
