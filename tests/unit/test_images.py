"""Image naming and the build-inputs digest that decides 'up to date'."""

from __future__ import annotations

from pathlib import Path

from pytest_epics_multiarch.config import ImageSpec
from pytest_epics_multiarch.images import build_inputs_digest, image_ref, split_ref
from pytest_epics_multiarch.targets import TargetRegistry

REG = TargetRegistry()


def test_epics_containers_naming_convention() -> None:
    spec = ImageSpec(name="ioc-adsimdetector", registry="ghcr.io/epics-containers", tag="2024.4.1")
    assert image_ref(spec, REG.get("linux/amd64"), "runtime") == (
        "ghcr.io/epics-containers/ioc-adsimdetector-runtime:2024.4.1"
    )
    assert image_ref(spec, REG.get("rtems/powerpc/beatnik"), "developer") == (
        "ghcr.io/epics-containers/ioc-adsimdetector-rtems-beatnik-developer:2024.4.1"
    )


def test_empty_registry_gives_a_local_name() -> None:
    spec = ImageSpec(name="sample", tag="dev")
    assert image_ref(spec, REG.get("rtems/powerpc"), "runtime") == "sample-rtems-qemuprep-runtime:dev"


def test_custom_template() -> None:
    spec = ImageSpec(
        name="sample", registry="r", tag="1", template="{registry}/{name}:{tag}-{epics_arch}-{stage}"
    )
    assert image_ref(spec, REG.get("linux/amd64"), "runtime") == "r/sample:1-linux-x86_64-runtime"


def test_split_ref_handles_registry_ports() -> None:
    assert split_ref("127.0.0.1:5055/a/b-runtime:dev") == ("127.0.0.1:5055/a/b-runtime", "dev")
    assert split_ref("127.0.0.1:5055/a/b") == ("127.0.0.1:5055/a/b", "latest")


def _digest(ctx: Path, **overrides: object) -> str:
    args = overrides.get("args", {"A": "1"})
    return build_inputs_digest(
        ctx,
        ctx / "Dockerfile",
        args,
        str(overrides.get("stage", "runtime")),
        "linux/amd64",  # type: ignore[arg-type]
        overrides.get("base", {}),  # type: ignore[arg-type]
    )


def test_digest_changes_with_every_input(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text("FROM x\n")
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "a.db").write_text("record(ao, X) {}\n")
    first = _digest(tmp_path)
    assert _digest(tmp_path) == first
    assert _digest(tmp_path, args={"A": "2"}) != first
    assert _digest(tmp_path, stage="developer") != first
    assert _digest(tmp_path, base={"x": "sha256:1"}) != first
    (tmp_path / "db" / "a.db").write_text("record(ao, Y) {}\n")
    assert _digest(tmp_path) != first


def test_dockerignored_files_do_not_count(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text("FROM x\n")
    (tmp_path / ".dockerignore").write_text("scratch/\n*.log\n")
    first = _digest(tmp_path)
    (tmp_path / "scratch").mkdir()
    (tmp_path / "scratch" / "junk").write_text("1")
    (tmp_path / "build.log").write_text("1")
    assert _digest(tmp_path) == first
    (tmp_path / "kept.txt").write_text("1")
    assert _digest(tmp_path) != first
