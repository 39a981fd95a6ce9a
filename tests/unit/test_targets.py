"""The target registry: names, conventions, engine platform, config overrides."""

from __future__ import annotations

import pytest

from pytest_epics_multiarch.errors import ConfigError
from pytest_epics_multiarch.targets import HOST_PLATFORM, TargetRegistry, validate_names


def test_linux_amd64_is_a_container_target() -> None:
    target = TargetRegistry().get("linux/amd64")
    assert (target.os, target.arch, target.variant) == ("linux", "amd64", None)
    assert target.runner == "container"
    assert target.conventional_build_args() == {
        "TARGET_ARCHITECTURE": "linux",
        "EPICS_TARGET_ARCH": "linux-x86_64",
        "IMAGE_EXT": "",
    }


def test_rtems_powerpc_is_qemuprep_and_built_as_a_linux_image() -> None:
    target = TargetRegistry().get("rtems/powerpc")
    assert target.epics_arch == "RTEMS-qemuprep"
    assert target.qemu_profile == "qemuprep"
    assert target.runner == "qemu"
    # Never the custom OS: the engine refuses it ("operating system is not supported").
    assert target.platform == HOST_PLATFORM == "linux/amd64"
    assert target.conventional_build_args() == {
        "TARGET_ARCHITECTURE": "rtems",
        "EPICS_TARGET_ARCH": "RTEMS-qemuprep",
        "IMAGE_EXT": "-rtems-qemuprep",
    }


def test_beatnik_is_build_only() -> None:
    target = TargetRegistry().get("rtems/powerpc/beatnik")
    assert target.epics_arch == "RTEMS-beatnik"
    assert target.image_ext == "-rtems-beatnik"
    assert not target.can_run
    assert target.platform == "linux/amd64"


def test_any_wellformed_bsp_resolves_as_build_only() -> None:
    target = TargetRegistry().get("rtems/powerpc/mvme9999")
    assert target.epics_arch == "RTEMS-mvme9999" and not target.can_run


def test_unknown_target_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as info:
        TargetRegistry().get("windows/amd64")
    assert "linux/amd64" in str(info.value) and "rtems/powerpc" in str(info.value)


@pytest.mark.parametrize("name", ["nonsense", "Linux/AMD64", "linux/", "a/b/c/d", ""])
def test_malformed_names_are_rejected(name: str) -> None:
    with pytest.raises(ConfigError, match="malformed|unknown"):
        validate_names([name], TargetRegistry().names())


def test_unknown_wellformed_name_is_rejected_with_the_valid_list() -> None:
    with pytest.raises(ConfigError) as info:
        validate_names(["linux/sparc"], TargetRegistry().names())
    assert "valid targets:" in str(info.value) and "linux/amd64" in str(info.value)


def test_config_adds_a_target_and_overrides_a_builtin() -> None:
    registry = TargetRegistry.with_overrides(
        {
            "linux/arm64": {"epics_arch": "linux-aarch64", "platform": "linux/arm64"},
            "rtems/powerpc": {"build_args": {"RTEMS_VERSION": "5"}, "image_ext": "-rtems"},
        },
        "cfg.yaml",
    )
    assert registry.get("linux/arm64").epics_arch == "linux-aarch64"
    rtems = registry.get("rtems/powerpc")
    assert rtems.image_ext == "-rtems" and rtems.conventional_build_args()["RTEMS_VERSION"] == "5"
    assert rtems.qemu_profile == "qemuprep"  # untouched attributes stay
    names = [t.name for t in registry.resolve(["all"])]
    assert names == ["linux/amd64", "rtems/powerpc", "linux/arm64"]


def test_config_cannot_make_the_engine_platform_non_linux() -> None:
    with pytest.raises(ConfigError, match="platform of target rtems/powerpc"):
        TargetRegistry.with_overrides({"rtems/powerpc": {"platform": "rtems/powerpc"}}, "cfg.yaml")


@pytest.mark.parametrize(
    ("attrs", "message"),
    [
        ({"bogus": 1}, "unknown key 'bogus'"),
        ({"epics_arch": 3}, "must be a str"),
        ({}, "needs an epics_arch"),
        ({"epics_arch": "x", "runner": "vm"}, "runner of target"),
        ({"epics_arch": "x", "runner": "qemu"}, "names no qemu_profile"),
    ],
)
def test_bad_target_definitions_name_file_and_key(attrs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        TargetRegistry.with_overrides({"linux/riscv64": attrs}, "cfg.yaml")
    assert "cfg.yaml" in str(info.value)


def test_resolve_keeps_order_and_drops_duplicates() -> None:
    names = [t.name for t in TargetRegistry().resolve(["rtems/powerpc", "linux/amd64", "rtems/powerpc"])]
    assert names == ["rtems/powerpc", "linux/amd64"]
