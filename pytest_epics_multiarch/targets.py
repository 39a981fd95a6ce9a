"""The registry of targets: ``os/arch[/variant]`` names and what each one means.

A target is *what the IOC runs on* (Linux soft IOC on amd64, RTEMS on a PowerPC board), not the
platform the container engine sees. Every variant of the image is a linux/amd64 image: the RTEMS
one carries cross-compiled PowerPC code, so passing ``rtems/powerpc`` to the engine as a platform
ends in "operating system is not supported". The engine platform is therefore a separate
attribute, and it must always be a Linux platform.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import ConfigError

#: The engine platform every built-in target builds and runs as (the build host's).
HOST_PLATFORM = "linux/amd64"

#: RTEMS PowerPC BSPs that QEMU can boot, mapped to the runner profile that boots them.
#: qemuprep is RTEMS 5's motorola_powerpc variant made for QEMU's PReP machine (40p).
EMULATED_BSPS: Mapping[str, str] = {"qemuprep": "qemuprep"}

#: Well-known BSPs without a QEMU model (MVME5500/6100 = beatnik, what Diamond deploys).
#: They are build-only targets; any other well-formed BSP name is accepted as build-only too.
BUILD_ONLY_BSPS = ("beatnik", "mvme5500", "mvme6100", "mvme3100", "mvme2100", "mvme2307")

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*(/[a-z0-9][a-z0-9_.-]*){1,2}$")

RUNNERS = ("container", "qemu", "none")


@dataclass(frozen=True)
class Target:
    """One build-and-test target of the image matrix."""

    name: str
    epics_arch: str
    image_ext: str = ""
    #: Value of the ``TARGET_ARCHITECTURE`` build arg (epics-containers' first convention).
    target_architecture: str = "linux"
    #: The platform the *engine* builds and runs the image as; always Linux.
    platform: str = HOST_PLATFORM
    #: ``container`` (Linux soft IOC), ``qemu`` (boot under an emulator) or ``none`` (build only).
    runner: str = "container"
    #: The QEMU board profile for ``runner == "qemu"``.
    qemu_profile: str | None = None
    #: Extra build args for this target, on top of the conventional ones.
    build_args: Mapping[str, str] = field(default_factory=dict)
    description: str = ""
    #: The platform of this target's entry in a registry index published with custom platforms
    #: (``rtems/powerpc`` + the stage as variant); default: ``os/arch``.
    index_platform: str | None = None

    @property
    def os(self) -> str:
        return self.name.split("/")[0]

    @property
    def arch(self) -> str:
        return self.name.split("/")[1]

    @property
    def variant(self) -> str | None:
        parts = self.name.split("/")
        return parts[2] if len(parts) > 2 else None

    @property
    def registry_platform(self) -> str:
        return self.index_platform or f"{self.os}/{self.arch}"

    @property
    def can_run(self) -> bool:
        """False for build-only targets: their boot tests skip."""
        return self.runner != "none"

    def conventional_build_args(self) -> dict[str, str]:
        """The build args that switch a multi-target Dockerfile to this target.

        Both conventions found in the field are passed: ``TARGET_ARCHITECTURE=linux|rtems`` and
        ``EPICS_TARGET_ARCH`` with ``IMAGE_EXT`` (the epics-containers image-name suffix).
        A Dockerfile ignores the ones it doesn't declare.
        """
        args = {
            "TARGET_ARCHITECTURE": self.target_architecture,
            "EPICS_TARGET_ARCH": self.epics_arch,
            "IMAGE_EXT": self.image_ext,
        }
        args.update(self.build_args)
        return args

    def __str__(self) -> str:
        return self.name


def _rtems_powerpc(bsp: str) -> Target:
    profile = EMULATED_BSPS.get(bsp)
    name = "rtems/powerpc" if bsp == "qemuprep" else f"rtems/powerpc/{bsp}"
    return Target(
        name=name,
        epics_arch=f"RTEMS-{bsp}",
        image_ext=f"-rtems-{bsp}",
        target_architecture="rtems",
        runner="qemu" if profile else "none",
        qemu_profile=profile,
        description=(
            f"RTEMS PowerPC, BSP {bsp}, booted under QEMU ({profile})"
            if profile
            else f"RTEMS PowerPC, BSP {bsp} (build only: no QEMU model of this board)"
        ),
    )


def builtin_targets() -> dict[str, Target]:
    """The targets every project has without configuration."""
    targets = {
        "linux/amd64": Target(
            name="linux/amd64",
            epics_arch="linux-x86_64",
            description="Linux soft IOC in a container",
        )
    }
    for bsp in ("qemuprep", *BUILD_ONLY_BSPS):
        target = _rtems_powerpc(bsp)
        targets[target.name] = target
    # rtems/powerpc/qemuprep is the explicit spelling of rtems/powerpc.
    targets["rtems/powerpc/qemuprep"] = replace(targets["rtems/powerpc"], name="rtems/powerpc/qemuprep")
    return targets


_TARGET_KEYS = {
    "epics_arch": str,
    "image_ext": str,
    "target_architecture": str,
    "platform": str,
    "runner": str,
    "qemu_profile": str,
    "build_args": dict,
    "description": str,
    "index_platform": str,
}


def check_name(name: str) -> None:
    """Raise ConfigError unless ``name`` has the ``os/arch[/variant]`` form."""
    if not _NAME_RE.match(name):
        raise ConfigError(
            f"malformed target name {name!r}",
            hint="targets are named os/arch[/variant], like linux/amd64 or rtems/powerpc/beatnik",
        )


def define_target(name: str, attrs: Mapping[str, Any], base: Target | None, where: str) -> Target:
    """Build a target from config attributes, overriding ``base`` when it is a built-in."""
    check_name(name)
    values: dict[str, Any] = {}
    for key, value in attrs.items():
        expected = _TARGET_KEYS.get(key)
        if expected is None:
            raise ConfigError(
                f"{where}: unknown key {key!r} for target {name}",
                hint="valid keys: " + ", ".join(sorted(_TARGET_KEYS)),
            )
        if value is not None and not isinstance(value, expected):
            raise ConfigError(
                f"{where}: {key} of target {name} must be a {expected.__name__}, not {type(value).__name__}"
            )
        values[key] = value
    if "build_args" in values:
        values["build_args"] = {str(k): str(v) for k, v in (values["build_args"] or {}).items()}
        if base is not None:
            values["build_args"] = {**base.build_args, **values["build_args"]}
    if base is None:
        if "epics_arch" not in values:
            raise ConfigError(
                f"{where}: new target {name} needs an epics_arch",
                hint="e.g. epics_arch: linux-aarch64",
            )
        target = Target(name=name, **values)
    else:
        target = replace(base, name=name, **values)
    if target.runner not in RUNNERS:
        raise ConfigError(
            f"{where}: runner of target {name} is {target.runner!r}",
            hint="valid runners: " + ", ".join(RUNNERS),
        )
    if target.runner == "qemu" and not target.qemu_profile:
        raise ConfigError(f"{where}: target {name} runs under qemu but names no qemu_profile")
    if not target.platform.startswith("linux/"):
        # The engine refuses non-Linux image platforms ("operating system is not supported").
        raise ConfigError(
            f"{where}: platform of target {name} is {target.platform!r}",
            seen="the container engine only builds and runs Linux platforms",
            hint="keep platform a linux/... value; the target name carries the IOC's OS",
        )
    return target


class TargetRegistry:
    """Built-in targets plus the ones a config file adds or overrides."""

    def __init__(self, targets: Mapping[str, Target] | None = None) -> None:
        self._targets: dict[str, Target] = dict(targets if targets is not None else builtin_targets())
        self._configured: list[str] = []

    @classmethod
    def with_overrides(cls, overrides: Mapping[str, Mapping[str, Any]], where: str) -> TargetRegistry:
        registry = cls()
        for name, attrs in overrides.items():
            base = registry._targets.get(name) or registry._bsp_target(name)
            registry._targets[name] = define_target(name, attrs, base, where)
            registry._configured.append(name)
        return registry

    @staticmethod
    def _bsp_target(name: str) -> Target | None:
        """Any well-formed ``rtems/powerpc/<bsp>`` names a BSP, build-only unless emulated."""
        return _rtems_powerpc(name.split("/")[2]) if _is_rtems_bsp(name) else None

    def names(self) -> list[str]:
        return sorted(self._targets)

    def __contains__(self, name: object) -> bool:
        return name in self._targets

    def get_or_none(self, name: str) -> Target | None:
        return self._targets.get(name) or self._bsp_target(name)

    def get(self, name: str) -> Target:
        target = self._targets.get(name) or self._bsp_target(name)
        if target is None:
            raise ConfigError(
                f"unknown target {name!r}",
                hint="valid targets: " + ", ".join(self.names()),
            )
        return target

    def resolve(self, names: Iterable[str]) -> list[Target]:
        """Targets for a list of names.

        ``all`` expands to the built-in emulated targets (linux/amd64, rtems/powerpc) plus every
        target the config file defines; other build-only BSPs are named one by one.
        """
        result: list[Target] = []
        for name in names:
            chosen = (
                [self.get(n) for n in ("linux/amd64", "rtems/powerpc", *self._configured)]
                if name == "all"
                else [self.get(name)]
            )
            result.extend(t for t in chosen if t not in result)
        return result


def validate_names(names: Iterable[str], known: Iterable[str]) -> None:
    """Usage check of ``--arch`` values against every known target name."""
    known_sorted = sorted(set(known))
    for name in names:
        if name == "all":
            continue
        if not _NAME_RE.match(name):
            raise ConfigError(
                f"malformed target name {name!r} (targets are os/arch[/variant])",
                hint="valid targets: " + ", ".join(known_sorted) + ", all",
            )
        if name not in known_sorted and not _is_rtems_bsp(name):
            raise ConfigError(
                f"unknown target {name!r}",
                hint="valid targets: " + ", ".join(known_sorted) + ", all",
            )


def _is_rtems_bsp(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 3 and parts[:2] == ["rtems", "powerpc"]
