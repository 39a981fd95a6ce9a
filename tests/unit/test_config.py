"""The config file: discovery, defaults, ${VAR} expansion and error messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_epics_multiarch.config import (
    ConfigCache,
    expand_env,
    find_config,
    find_configs_below,
    load_config,
)
from pytest_epics_multiarch.errors import ConfigError

FULL = """
schema: 1
image:
  name: ioc-sample
  registry: "${TEST_REGISTRY:-127.0.0.1:5055}/epics"
  tag: "2024.1"
build:
  context: .
  dockerfile: Dockerfile
  stages: [developer, runtime]
  args:
    BASE_IMAGE: base:1
default_targets: [linux/amd64, rtems/powerpc]
targets:
  rtems/powerpc:
    build_args: {RTEMS_DEVELOPER_IMAGE: rtems-dev:5}
    requires:
      - image: rtems-dev:5
        hint: load the RTEMS toolchain image
    ioc:
      start_timeout: 120
ioc:
  startup: /epics/ioc/config/st.cmd
  command: [softIoc, -D, x.dbd, "{startup}"]
  environment: {A: 1}
  ready_pv: "X:READY"
options:
  image_policy: pull
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "epics-multiarch.yaml"
    path.write_text(text)
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    return path


def test_full_example_loads(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, FULL), environ={})
    assert cfg.image is not None
    assert cfg.image.registry == "127.0.0.1:5055/epics" and cfg.image.tag == "2024.1"
    assert cfg.build.context == tmp_path.resolve()
    assert cfg.build.dockerfile == tmp_path.resolve() / "Dockerfile"
    assert cfg.build.run_stage == "runtime" and cfg.build.args == {"BASE_IMAGE": "base:1"}
    assert cfg.default_targets == ("linux/amd64", "rtems/powerpc")
    rtems = cfg.target("rtems/powerpc")
    assert rtems.build_args == {"RTEMS_DEVELOPER_IMAGE": "rtems-dev:5"}
    assert [r.image for r in cfg.requires_for(rtems)] == ["rtems-dev:5"]
    assert cfg.ioc_for(rtems).start_timeout == 120
    assert cfg.ioc_for(rtems).ready_pv == "X:READY"  # inherited from the top-level ioc:
    linux = cfg.target("linux/amd64")
    assert cfg.ioc_for(linux).start_timeout == 60
    assert cfg.ioc.environment == {"A": "1"}
    assert cfg.options == {"image_policy": "pull"}


def test_env_expansion() -> None:
    assert expand_env("${X:-d}/a", {}) == "d/a"
    assert expand_env("${X:-d}/a", {"X": "r"}) == "r/a"
    assert expand_env("${X}", {}) == ""
    assert expand_env("$X stays", {"X": "r"}) == "$X stays"


def test_registry_from_environment(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, FULL), environ={"TEST_REGISTRY": "127.0.0.1:6000"})
    assert cfg.image is not None and cfg.image.registry == "127.0.0.1:6000/epics"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("schema: 2\n", "schema is 2"),
        ("image: {name: x}\n", "schema is None"),
        ("schema: 1\nimage: [a]\n", "image must be a mapping"),
        ("schema: 1\nimage: {name: x, colour: red}\n", "unknown key image.colour"),
        ("schema: 1\nioc: {start_timeout: fast}\n", "ioc.start_timeout must be int or float"),
        ("schema: 1\nioc: {start_timeout: true}\n", "ioc.start_timeout must be int or float"),
        ("schema: 1\nioc: {start_timeout: -1}\n", "must be a positive number"),
        ("schema: 1\nbuild: {stages: [a, b], run_stage: c}\n", "build.run_stage is 'c'"),
        ("schema: 1\ndefault_targets: [linux/sparc]\n", "names unknown target 'linux/sparc'"),
        (
            "schema: 1\ntargets: {rtems/powerpc: {requires: [{hint: x}]}}\n",
            "requires\\[0\\].image is required",
        ),
        ("schema: 1\nimage: {name: x, template: '{name}-{arch}'}\n", "unknown placeholder {arch}"),
        ("schema: 1\nioc: {environment: {A: [1]}}\n", "ioc.environment.A must be a string"),
        ("schema: 1\n  bad: [indent\n", "not valid YAML"),
    ],
)
def test_errors_name_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path, environ={})
    assert str(path) in str(info.value)


def test_discovery_finds_nearest_parent(tmp_path: Path) -> None:
    root = write(tmp_path, "schema: 1\n")
    inner = tmp_path / "iocs" / "a"
    inner.mkdir(parents=True)
    (inner / "tests").mkdir()
    nearer = inner / "epics-multiarch.yaml"
    nearer.write_text("schema: 1\n")
    assert find_config(inner / "tests" / "test_x.py") == nearer
    assert find_config(tmp_path / "iocs") == root
    assert set(find_configs_below(tmp_path)) == {root, nearer}


def test_cache_loads_each_file_once(tmp_path: Path) -> None:
    write(tmp_path, FULL)
    calls: list[Path] = []

    def loader(path: Path):  # type: ignore[no-untyped-def]
        calls.append(path)
        return load_config(path, environ={})

    cache = ConfigCache(None, loader)
    first = cache.for_path(tmp_path / "test_a.py")
    second = cache.for_path(tmp_path / "test_b.py")
    assert first is second and len(calls) == 1


def test_no_config_gives_defaults(tmp_path: Path) -> None:
    cfg = ConfigCache(None).for_path(tmp_path / "nowhere" / "test_x.py")
    assert cfg.path is None and cfg.image is None
