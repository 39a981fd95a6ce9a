"""Options, their twins, precedence and the messages for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_epics_multiarch.errors import ConfigError
from pytest_epics_multiarch.settings import OPTIONS, resolve


def _resolve(cli=None, env=None, ini=None, cfg=None):  # type: ignore[no-untyped-def]
    ini = ini or {}
    return resolve(cli or {}, env or {}, lambda name: ini.get(name, ""), cfg or {}, config_where="cfg.yaml")


def test_every_option_has_its_twins() -> None:
    for option in OPTIONS:
        if option.name == "arch":
            assert (option.flag, option.ini, option.env) == ("--arch", "epics_arch", "EPICS_MULTIARCH_ARCH")
        else:
            assert option.flag == "--epics-" + option.name.replace("_", "-")
            assert option.ini == "epics_" + option.name
            assert option.env == "EPICS_MULTIARCH_" + option.name.upper()


def test_defaults() -> None:
    settings = _resolve()
    assert settings.arch == ()
    assert settings.image_policy == "auto"
    assert settings.keep_iocs is False and settings.gate is False
    assert settings.ca_client == "caproto" and settings.ioc_scope == "module"
    assert settings.sources["image_policy"] == "default"


def test_precedence_cli_env_ini_config() -> None:
    all_four = _resolve(
        cli={"epics_image_policy": "build"},
        env={"EPICS_MULTIARCH_IMAGE_POLICY": "pull"},
        ini={"epics_image_policy": "auto"},
        cfg={"image_policy": "pull"},
    )
    assert all_four.image_policy == "build" and all_four.sources["image_policy"] == "--epics-image-policy"
    no_cli = _resolve(
        env={"EPICS_MULTIARCH_IMAGE_POLICY": "pull"},
        ini={"epics_image_policy": "build"},
        cfg={"image_policy": "build"},
    )
    assert no_cli.image_policy == "pull"
    only_ini_cfg = _resolve(ini={"epics_image_policy": "build"}, cfg={"image_policy": "pull"})
    assert only_ini_cfg.image_policy == "build"
    only_cfg = _resolve(cfg={"image_policy": "pull"})
    assert only_cfg.image_policy == "pull" and "cfg.yaml" in only_cfg.sources["image_policy"]


def test_arch_is_repeatable_and_comma_separated() -> None:
    assert _resolve(cli={"epics_arch": ["linux/amd64,rtems/powerpc", "linux/amd64"]}).arch == (
        "linux/amd64",
        "rtems/powerpc",
    )
    assert _resolve(env={"EPICS_MULTIARCH_ARCH": "rtems/powerpc, linux/amd64"}).arch == (
        "rtems/powerpc",
        "linux/amd64",
    )
    assert _resolve(cfg={"arch": ["linux/amd64"]}).arch == ("linux/amd64",)


@pytest.mark.parametrize(
    ("kwargs", "where"),
    [
        ({"cli": {"epics_image_policy": "sometimes"}}, "--epics-image-policy"),
        ({"env": {"EPICS_MULTIARCH_GATE": "maybe"}}, "environment EPICS_MULTIARCH_GATE"),
        ({"ini": {"epics_ca_client": "libca"}}, "ini epics_ca_client"),
        ({"cfg": {"build_timeout": -3}}, "cfg.yaml: options.build_timeout"),
        ({"cli": {"epics_engine": "containerd"}}, "--epics-engine"),
        ({"env": {"EPICS_MULTIARCH_SPARE_IOCS": "-1"}}, "environment EPICS_MULTIARCH_SPARE_IOCS"),
        ({"cfg": {"spare_iocs": "two"}}, "cfg.yaml: options.spare_iocs"),
    ],
)
def test_bad_values_name_their_source(kwargs: dict[str, dict[str, object]], where: str) -> None:
    with pytest.raises(ConfigError) as info:
        _resolve(**kwargs)
    assert where in str(info.value) and "Hint: expected" in str(info.value)


def test_unknown_config_option_is_rejected() -> None:
    with pytest.raises(ConfigError, match="unknown key options.imagepolicy"):
        _resolve(cfg={"imagepolicy": "pull"})


def test_engine_and_spare_iocs() -> None:
    assert (_resolve().engine, _resolve().spare_iocs) == ("auto", 1)
    settings = _resolve(env={"EPICS_MULTIARCH_ENGINE": "Podman"}, cfg={"spare_iocs": 0})
    assert (settings.engine, settings.spare_iocs) == ("podman", 0)
    assert _resolve(cli={"epics_spare_iocs": "3"}, cfg={"spare_iocs": 0}).spare_iocs == 3


def test_bool_env_values() -> None:
    assert _resolve(env={"EPICS_MULTIARCH_KEEP_IOCS": "yes"}).keep_iocs is True
    assert _resolve(env={"EPICS_MULTIARCH_GATE": "0"}, cfg={"gate": True}).gate is False


def test_paths_are_relative_to_their_source() -> None:
    settings = resolve(
        {}, {}, lambda name: "out/r.json" if name == "epics_report" else "", {}, ini_dir=Path("/proj")
    )
    assert settings.report == Path("/proj/out/r.json")
