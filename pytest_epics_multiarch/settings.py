"""Session settings: the command-line options, their ini and environment twins, and precedence.

Every option ``--epics-<name>`` has the ini twin ``epics_<name>`` and the environment twin
``EPICS_MULTIARCH_<NAME>`` (``--arch``: ``epics_arch``, ``EPICS_MULTIARCH_ARCH``); the config
file's ``options:`` mapping is the lowest source. One description serves all of them.
Precedence: command line > environment > ini > config file > default. Values are parsed once,
and a bad value is reported with the place it came from.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

from .errors import ConfigError


@dataclass(frozen=True)
class Option:
    name: str
    help: str
    kind: str  # "bool" | "choice" | "path" | "str" | "arch" | "float" | "count"
    default: Any = None
    choices: tuple[str, ...] = ()
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--arch" if self.name == "arch" else "--epics-" + self.name.replace("_", "-")

    @property
    def ini(self) -> str:
        return "epics_" + self.name

    @property
    def env(self) -> str:
        return "EPICS_MULTIARCH_" + self.name.upper()

    @property
    def dest(self) -> str:
        return "epics_" + self.name


OPTIONS: tuple[Option, ...] = (
    Option(
        "arch",
        "target to test, os/arch[/variant] (repeatable, comma-separated, or 'all'); "
        "default: the config file's default_targets, else linux/amd64",
        "arch",
        metavar="NAME",
    ),
    Option(
        "config",
        "path of epics-multiarch.yaml (default: nearest to the tests)",
        "path",
        metavar="PATH",
    ),
    Option(
        "image_policy",
        "how images are obtained: build, pull, or auto (an up-to-date local image, else build "
        "when a Dockerfile is configured, else pull); default: auto",
        "choice",
        default="auto",
        choices=("build", "pull", "auto"),
    ),
    Option("push", "push built images to the configured registry", "bool", default=False),
    Option(
        "keep_iocs",
        "leave IOCs running after the session and print how to reach them",
        "bool",
        default=False,
    ),
    Option("report", "write the target matrix as JSON to PATH", "path", metavar="PATH"),
    Option(
        "gate",
        "release gate: fail the run when any selected target failed, errored, was skipped or ran no test",
        "bool",
        default=False,
    ),
    Option(
        "ca_client",
        "Channel Access client library: caproto or pyepics; default: caproto",
        "choice",
        default="caproto",
        choices=("caproto", "pyepics"),
    ),
    Option(
        "ioc_scope",
        "how long one IOC lives: module (one per target per test module, the default), "
        "function (a fresh IOC per test), or session (one per target and configuration for the "
        "whole run, shared with YAML checks)",
        "choice",
        default="module",
        choices=("module", "function", "session"),
    ),
    Option(
        "engine",
        "container engine: docker, podman, or auto (Docker when it answers, else Podman); "
        "default: auto",
        "choice",
        default="auto",
        choices=("docker", "podman", "auto"),
    ),
    Option(
        "spare_iocs",
        "IOCs per configuration started ahead, in the background, so that the next test's IOC "
        "is ready when asked for (container targets; none beside an IOC shared for the session "
        "or with --epics-keep-iocs; 0 turns it off); default: 1",
        "count",
        default=1,
        metavar="N",
    ),
    Option(
        "docker_cli",
        "docker CLI used for BuildKit builds (default: one with buildx, else a pre-23 CLI with "
        "DOCKER_BUILDKIT=1)",
        "str",
        metavar="PATH",
    ),
    Option(
        "log_dir",
        "folder for build logs and IOC consoles (default: a temporary folder, removed after a "
        "passing run and kept after a failing one)",
        "path",
        metavar="PATH",
    ),
    Option("build_timeout", "seconds one image build may take; default: 1800", "float", default=1800.0),
    Option(
        "start_timeout",
        "seconds an IOC may take to become ready (default: the config file's ioc.start_timeout, else 60)",
        "float",
    ),
)

OPTIONS_BY_NAME = {option.name: option for option in OPTIONS}


@dataclass(frozen=True)
class Settings:
    arch: tuple[str, ...] = ()
    config: Path | None = None
    image_policy: str = "auto"
    push: bool = False
    keep_iocs: bool = False
    report: Path | None = None
    gate: bool = False
    ca_client: str = "caproto"
    ioc_scope: str = "module"
    engine: str = "auto"
    spare_iocs: int = 1
    docker_cli: str | None = None
    log_dir: Path | None = None
    build_timeout: float = 1800.0
    start_timeout: float | None = None
    #: Where each value came from ("--arch", "EPICS_MULTIARCH_ARCH", "ini epics_arch", ...).
    sources: Mapping[str, str] = field(default_factory=dict)


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("epics-multiarch", "EPICS IOC image tests across targets")
    for option in OPTIONS:
        help_text = f"{option.help} [ini: {option.ini}, env: {option.env}]"
        if option.kind == "bool":
            group.addoption(option.flag, action="store_true", default=None, dest=option.dest, help=help_text)
        elif option.kind == "arch":
            group.addoption(
                option.flag,
                action="append",
                default=None,
                dest=option.dest,
                metavar=option.metavar,
                help=help_text,
            )
        else:
            group.addoption(
                option.flag,
                action="store",
                default=None,
                dest=option.dest,
                metavar=option.metavar or _metavar(option),
                choices=None,  # checked by resolve() so that every source gets the same message
                help=help_text,
            )
        parser.addini(option.ini, option.help, type="string", default="")


def _metavar(option: Option) -> str:
    if option.choices:
        return "{" + ",".join(option.choices) + "}"
    if option.kind == "float":
        return "SECONDS"
    return "N" if option.kind == "count" else option.name.upper()


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _parse(option: Option, value: Any, source: str, base_dir: Path | None) -> Any:
    def bad(expected: str) -> ConfigError:
        return ConfigError(
            f"{source}: invalid value {value!r} for {option.flag}",
            hint=f"expected {expected}",
        )

    if option.kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise bad("true or false")
    if option.kind == "arch":
        items = value if isinstance(value, (list, tuple)) else re.split(r"[,\s]+", str(value))
        names: list[str] = []
        for item in items:
            for part in str(item).split(","):
                part = part.strip()
                if part and part not in names:
                    names.append(part)
        return tuple(names)
    if option.kind == "choice":
        text = str(value).strip().lower()
        if text not in option.choices:
            raise bad("one of " + ", ".join(option.choices))
        return text
    if option.kind == "path":
        path = Path(str(value)).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        return path
    if option.kind == "float":
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise bad("a number of seconds") from None
        if number <= 0:
            raise bad("a positive number of seconds")
        return number
    if option.kind == "count":
        try:
            count = int(str(value).strip())
        except ValueError:
            raise bad("a whole number (0 or more)") from None
        if count < 0:
            raise bad("a whole number (0 or more)")
        return count
    return str(value)


def resolve(
    cli: Mapping[str, Any],
    environ: Mapping[str, str],
    ini: Callable[[str], str],
    config_options: Mapping[str, Any],
    *,
    config_where: str = "config file",
    cwd: Path | None = None,
    ini_dir: Path | None = None,
    config_dir: Path | None = None,
) -> Settings:
    """Settings from the four sources, the first that has a value winning."""
    unknown = sorted(set(config_options) - set(OPTIONS_BY_NAME))
    if unknown:
        raise ConfigError(
            f"{config_where}: unknown key options.{unknown[0]}",
            hint="valid options: " + ", ".join(o.name for o in OPTIONS),
        )
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for option in OPTIONS:
        candidates = (
            (cli.get(option.dest), option.flag, cwd),
            (environ.get(option.env) or None, f"environment {option.env}", cwd),
            (ini(option.ini) or None, f"ini {option.ini}", ini_dir),
            (config_options.get(option.name), f"{config_where}: options.{option.name}", config_dir),
        )
        for value, source, base_dir in candidates:
            if value is not None:
                values[option.name] = _parse(option, value, source, base_dir)
                sources[option.name] = source
                break
        else:
            if option.default is not None:
                values[option.name] = option.default
                sources[option.name] = "default"
    return Settings(**values, sources=sources)
