"""The RTEMS path without an engine or QEMU: payload out of an image, TFTP layout, stop."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import pytest

from pytest_epics_multiarch.errors import ImageError, IocStartError
from pytest_epics_multiarch.payload import Payload, extract_payload, label_overrides
from pytest_epics_multiarch.runners.profiles import QemuSettings, get_profile
from pytest_epics_multiarch.runners.qemu import QemuIoc


def tar_of(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class FakeContainer:
    """get_archive like the engine: a tar whose names start at the path's last component."""

    def __init__(self, image: dict[str, bytes]) -> None:
        self.image = image
        self.removed = False

    def get_archive(self, path: str) -> tuple[list[bytes], dict[str, Any]]:
        import docker.errors

        base = path.rsplit("/", 1)[0]
        chosen = {
            name[len(base) + 1 :]: data
            for name, data in self.image.items()
            if name == path or name.startswith(path + "/")
        }
        if not chosen:
            raise docker.errors.NotFound("no such file")
        return [tar_of(chosen)], {}

    def remove(self, force: bool = False) -> None:
        self.removed = True


class FakeEngine:
    def __init__(self, image: dict[str, bytes]) -> None:
        self.container = FakeContainer(image)
        self.created_with: dict[str, Any] = {}
        self.client = self

    @property
    def containers(self) -> FakeEngine:
        return self

    def create(self, image: str, **kwargs: Any) -> FakeContainer:
        self.created_with = {"image": image, **kwargs}
        return self.container


RTEMS_IMAGE = {
    "/epics/ioc/bin/RTEMS-qemuprep/ioc.boot": b"\x7fPReP boot image",
    "/epics/ioc/bin/RTEMS-qemuprep/qemu_fakerom.bin": b"rom",
    "/epics/ioc/config/st.cmd": b'dbLoadRecords("db/x.db","P=X:")\niocInit\n',
    "/epics/ioc/db/x.db": b'record(ao, "$(P)A") {}\n',
}


def rtems_settings(**changes: Any) -> QemuSettings:
    base = dict(
        profile="qemuprep",
        kernel="/epics/ioc/bin/RTEMS-qemuprep/ioc.boot",
        bios="/epics/ioc/bin/RTEMS-qemuprep/qemu_fakerom.bin",
        assets="/epics/ioc",
        startup="/epics/ioc/config/st.cmd",
        hostname="myioc",
    )
    base.update(changes)
    return QemuSettings(**base)


def test_payload_comes_out_of_a_created_container(tmp_path: Path) -> None:
    engine = FakeEngine(RTEMS_IMAGE)
    payload = extract_payload(
        engine,  # type: ignore[arg-type]
        "ioc-rtems-qemuprep-runtime:1",
        rtems_settings().payload_paths(),
        tmp_path,
        target="rtems/powerpc",
        labels={"owner": "me"},
    )
    assert payload.kernel.read_bytes() == b"\x7fPReP boot image"
    assert payload.bios is not None and payload.bios.read_bytes() == b"rom"
    assert payload.startup is not None and payload.startup.read_text().endswith("iocInit\n")
    assert payload.assets is not None and (payload.assets / "db" / "x.db").is_file()
    # Never run: created with a command that is never started, labelled, and removed.
    assert engine.created_with["command"] == ["/payload-not-run"]
    assert engine.created_with["labels"] == {"owner": "me"}
    assert engine.container.removed


def test_missing_payload_names_the_path_and_the_fix(tmp_path: Path) -> None:
    engine = FakeEngine({"/epics/ioc/config/st.cmd": b"iocInit\n"})
    with pytest.raises(ImageError) as info:
        extract_payload(
            engine, "img", {"kernel": "/boot/ioc.boot"}, tmp_path, target="rtems/powerpc", labels={}
        )  # type: ignore[arg-type]
    text = str(info.value)
    assert "[rtems/powerpc] img has no kernel at /boot/ioc.boot" in text and "qemu.kernel" in text
    assert engine.container.removed


def test_label_overrides() -> None:
    labels = {"io.github.pytest-epics-multiarch.qemu.kernel": "/k", "other": "x"}
    assert label_overrides(labels) == {"kernel": "/k"}


def make_runner(tmp_path: Path, settings: QemuSettings) -> QemuIoc:
    payload = extract_payload(
        FakeEngine(RTEMS_IMAGE),
        "img",
        settings.payload_paths(),
        tmp_path / "payload",
        target="rtems/powerpc",
        labels={},  # type: ignore[arg-type]
    )
    return QemuIoc(
        target="rtems/powerpc",
        profile=get_profile("qemuprep"),
        payload=payload,
        settings=settings,
        work_dir=tmp_path / "work",
        start_timeout=10,
    )


def test_tftp_layout_serves_st_cmd_with_the_port_and_the_files_beside_it(tmp_path: Path) -> None:
    runner = make_runner(tmp_path, rtems_settings())
    (tmp_path / "work").mkdir()
    layout = runner.layout_tftp(6123)
    assert layout is not None
    assert layout.st_cmd == tmp_path / "work" / "tftp" / "epics" / "myioc" / "st.cmd"
    assert layout.st_cmd.read_text().splitlines() == [
        'epicsEnvSet("EPICS_CA_SERVER_PORT","6123")',
        'dbLoadRecords("db/x.db","P=X:")',
        "iocInit",
    ]
    assert (layout.folder / "db" / "x.db").read_text().startswith("record(ao")
    # The payload's own st.cmd is untouched (the layout hard-links the assets).
    assert not runner.payload.startup.read_text().startswith("epicsEnvSet")  # type: ignore[union-attr]
    # A relaunch (e.g. another port) lays the folder out anew.
    assert (
        runner.layout_tftp(6124).st_cmd.read_text().startswith('epicsEnvSet("EPICS_CA_SERVER_PORT","6124")')
    )  # type: ignore[union-attr]


def test_compiled_in_startup_serves_nothing(tmp_path: Path) -> None:
    runner = make_runner(tmp_path, rtems_settings(serve_startup=False, ca_port=5064))
    assert runner.layout_tftp(5064) is None


def test_missing_qemu_binary_is_a_clear_error(tmp_path: Path) -> None:
    runner = make_runner(tmp_path, rtems_settings())
    runner.profile = get_profile("custom", {"binary": "qemu-system-nonexistent", "machine": "m", "nic": "n"})
    with pytest.raises(IocStartError) as info:
        runner.start()
    assert "qemu-system-nonexistent is not installed" in str(info.value) and "Hint: install QEMU" in str(
        info.value
    )
    runner.stop()
    runner.stop()  # idempotent


def test_payload_dataclass_roles() -> None:
    payload = Payload(Path("/r"), Path("/r/k"), None, None, None, None)
    assert payload.kernel == Path("/r/k") and payload.initrd is None
