"""The project config file, ``epics-multiarch.yaml``: discovery, validation and defaults.

The file describes one IOC image repository: how its image is named, built and started, and
which targets it has. Every error names the file, the key and what was expected. String values
may use ``${VAR}`` and ``${VAR:-default}`` to read the environment (e.g. a registry address
that CI sets).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml

from .errors import ConfigError
from .runners.profiles import check_qemu_section
from .targets import Target, TargetRegistry

CONFIG_NAME = "epics-multiarch.yaml"
SCHEMA_VERSION = 1
DEFAULT_TEMPLATE = "{registry}/{name}{image_ext}-{stage}:{tag}"

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

T = TypeVar("T")


@dataclass(frozen=True)
class ImageSpec:
    name: str
    registry: str = ""
    tag: str = "latest"
    template: str = DEFAULT_TEMPLATE


@dataclass(frozen=True)
class BuildSpec:
    #: Absolute build context; None when the project only pulls.
    context: Path | None = None
    dockerfile: Path | None = None
    stages: tuple[str, ...] = ("developer", "runtime")
    #: The stage whose image runs the IOC (or carries the boot payload).
    run_stage: str = "runtime"
    args: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Requirement:
    """An image a target's build needs that the project cannot make (e.g. a toolchain)."""

    image: str
    hint: str = ""


@dataclass(frozen=True)
class IocSpec:
    """How the IOC starts inside its image."""

    #: Command list; ``{startup}`` expands to the startup script. None: the image's own CMD.
    command: tuple[str, ...] | None = None
    startup: str | None = None
    workdir: str | None = None
    environment: Mapping[str, str] = field(default_factory=dict)
    #: A PV that answers once the IOC serves; None: the first record ``dbl`` lists.
    ready_pv: str | None = None
    start_timeout: float = 60.0


@dataclass(frozen=True)
class ProjectConfig:
    """One loaded config file (or the defaults when there is none)."""

    path: Path | None
    image: ImageSpec | None
    build: BuildSpec
    ioc: IocSpec
    registry: TargetRegistry
    default_targets: tuple[str, ...] = ()
    requires: Mapping[str, tuple[Requirement, ...]] = field(default_factory=dict)
    ioc_overrides: Mapping[str, IocSpec] = field(default_factory=dict)
    #: Each emulated target's ``qemu:`` mapping (validated; resolved against image labels later).
    qemu: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: Option defaults (``image_policy: pull``...), the lowest-precedence source of settings.
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return str(self.path) if self.path else "(no epics-multiarch.yaml)"

    def ioc_for(self, target: Target) -> IocSpec:
        return self.ioc_overrides.get(target.name, self.ioc)

    def requires_for(self, target: Target) -> tuple[Requirement, ...]:
        return self.requires.get(target.name, ())

    def target(self, name: str) -> Target:
        return self.registry.get(name)


def default_config() -> ProjectConfig:
    return ProjectConfig(path=None, image=None, build=BuildSpec(), ioc=IocSpec(), registry=TargetRegistry())


def find_config(start: Path) -> Path | None:
    """The nearest ``epics-multiarch.yaml`` in ``start`` (a dir or file) or its parents."""
    here = start if start.is_dir() else start.parent
    for folder in (here, *here.parents):
        candidate = folder / CONFIG_NAME
        if candidate.is_file():
            return candidate
    return None


def find_configs_below(root: Path, limit: int = 200) -> list[Path]:
    """Config files under ``root`` (hidden folders and virtualenvs pruned), for --arch checks."""
    found: list[Path] = []
    if not root.is_dir():
        return found
    for folder, dirs, files in os.walk(root):
        dirs[:] = [
            d for d in dirs if not d.startswith(".") and d not in {"node_modules", "venv", "__pycache__"}
        ]
        if CONFIG_NAME in files:
            found.append(Path(folder) / CONFIG_NAME)
            if len(found) >= limit:
                break
    return found


def expand_env(value: str, environ: Mapping[str, str] | None = None) -> str:
    """Expand ``${VAR}`` and ``${VAR:-default}`` (the default also when VAR is empty)."""
    env = os.environ if environ is None else environ

    def repl(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        got = env.get(name, "")
        return got if got else (default or "")

    return _ENV_RE.sub(repl, value)


def _expand_all(node: Any, environ: Mapping[str, str] | None) -> Any:
    if isinstance(node, str):
        return expand_env(node, environ)
    if isinstance(node, list):
        return [_expand_all(item, environ) for item in node]
    if isinstance(node, dict):
        return {key: _expand_all(value, environ) for key, value in node.items()}
    return node


class _Section:
    """Typed access to one mapping of the file, with errors naming file and key path."""

    def __init__(self, data: Any, where: str, path: str) -> None:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: {path or 'the file'} must be a mapping, not {type(data).__name__}")
        self.data: dict[str, Any] = data
        self.where = where
        self.path = path

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def check_keys(self, allowed: Iterable[str]) -> None:
        allowed = set(allowed)
        for key in self.data:
            if key not in allowed:
                raise ConfigError(
                    f"{self.where}: unknown key {self.key(str(key))}",
                    hint="valid keys here: " + ", ".join(sorted(allowed)),
                )

    def get(self, name: str, kind: type[T] | tuple[type, ...], default: Any = None) -> Any:
        value = self.data.get(name, default)
        if value is None:
            return default
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # YAML's true/false are bools, which Python also counts as ints: reject them for numbers.
        is_bool_for_number = isinstance(value, bool) and bool not in kinds
        if is_bool_for_number or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise ConfigError(
                f"{self.where}: {self.key(name)} must be {names}, not {type(value).__name__} ({value!r})"
            )
        return value

    def section(self, name: str) -> _Section:
        return _Section(self.data.get(name), self.where, self.key(name))

    def str_list(self, name: str) -> tuple[str, ...] | None:
        value = self.get(name, (list, str))
        if value is None:
            return None
        if isinstance(value, str):
            return (value,)
        return tuple(self._scalar_str(name, item) for item in value)

    def str_map(self, name: str) -> dict[str, str]:
        sub = self.section(name)
        return {str(k): sub._scalar_str(str(k), v) for k, v in sub.data.items()}

    def _scalar_str(self, name: str, value: Any) -> str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(
                f"{self.where}: {self.key(name)} must be a string or number, not {type(value).__name__}"
            )
        return str(value)


_TOP_KEYS = ("schema", "image", "build", "default_targets", "targets", "ioc", "options")
_IOC_KEYS = ("command", "startup", "workdir", "environment", "ready_pv", "start_timeout")
_TARGET_EXTRA_KEYS = ("requires", "ioc", "qemu")


def load_config(path: Path, environ: Mapping[str, str] | None = None) -> ProjectConfig:
    """Read and validate one config file."""
    where = str(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {where}", seen=str(exc)) from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML", seen=str(exc).replace("\n", " ")) from exc
    top = _Section(_expand_all(raw, environ), where, "")
    top.check_keys(_TOP_KEYS)
    schema = top.get("schema", int)
    if schema != SCHEMA_VERSION:
        raise ConfigError(
            f"{where}: schema is {schema!r}",
            hint=f"this version of pytest-epics-multiarch reads schema: {SCHEMA_VERSION}",
        )
    base_dir = path.parent.resolve()
    image = _load_image(top.section("image"))
    build = _load_build(top.section("build"), base_dir)
    ioc = _load_ioc(top.section("ioc"), IocSpec())

    target_section = top.section("targets")
    target_attrs: dict[str, dict[str, Any]] = {}
    requires: dict[str, tuple[Requirement, ...]] = {}
    ioc_overrides: dict[str, IocSpec] = {}
    qemu: dict[str, dict[str, Any]] = {}
    for name in target_section.data:
        sub = target_section.section(str(name))
        target_attrs[str(name)] = {k: v for k, v in sub.data.items() if k not in _TARGET_EXTRA_KEYS}
        requires[str(name)] = _load_requires(sub)
        if "ioc" in sub.data:
            ioc_overrides[str(name)] = _load_ioc(sub.section("ioc"), ioc)
        if "qemu" in sub.data:
            qemu_section = sub.section("qemu")
            check_qemu_section(qemu_section.data, f"{where}: targets.{name}")
            qemu[str(name)] = qemu_section.data
    registry = TargetRegistry.with_overrides(target_attrs, where)

    defaults = top.str_list("default_targets") or ()
    for name in defaults:
        if name != "all" and name not in registry and registry.get_or_none(name) is None:
            raise ConfigError(
                f"{where}: default_targets names unknown target {name!r}",
                hint="valid targets: " + ", ".join(registry.names()),
            )
    options = top.section("options").data
    return ProjectConfig(
        path=path.resolve(),
        image=image,
        build=build,
        ioc=ioc,
        registry=registry,
        default_targets=defaults,
        requires=requires,
        ioc_overrides=ioc_overrides,
        qemu=qemu,
        options={str(k): v for k, v in options.items()},
    )


def _load_image(sec: _Section) -> ImageSpec | None:
    if not sec.data:
        return None
    sec.check_keys(("name", "registry", "tag", "template"))
    name = sec.get("name", str)
    if not name:
        raise ConfigError(f"{sec.where}: {sec.key('name')} is required", hint="e.g. name: ioc-mydevice")
    template = sec.get("template", str, DEFAULT_TEMPLATE)
    for placeholder in re.findall(r"\{([^}]*)\}", template):
        if placeholder not in {"registry", "name", "image_ext", "stage", "tag", "epics_arch"}:
            raise ConfigError(
                f"{sec.where}: {sec.key('template')} uses unknown placeholder {{{placeholder}}}",
                hint="placeholders: {registry} {name} {image_ext} {stage} {tag} {epics_arch}",
            )
    return ImageSpec(
        name=name,
        registry=str(sec.get("registry", str, "")).rstrip("/"),
        tag=str(sec.get("tag", (str, int, float), "latest")),
        template=template,
    )


def _load_build(sec: _Section, base_dir: Path) -> BuildSpec:
    sec.check_keys(("context", "dockerfile", "stages", "run_stage", "args"))
    if not sec.data:
        return BuildSpec()
    context = (base_dir / sec.get("context", str, ".")).resolve()
    dockerfile = (context / sec.get("dockerfile", str, "Dockerfile")).resolve()
    stages = sec.str_list("stages") or BuildSpec.stages
    run_stage = sec.get("run_stage", str, stages[-1])
    if run_stage not in stages:
        raise ConfigError(
            f"{sec.where}: {sec.key('run_stage')} is {run_stage!r}, not one of the stages",
            hint="stages: " + ", ".join(stages),
        )
    return BuildSpec(
        context=context,
        dockerfile=dockerfile,
        stages=stages,
        run_stage=run_stage,
        args=sec.str_map("args"),
    )


def _load_ioc(sec: _Section, base: IocSpec) -> IocSpec:
    sec.check_keys(_IOC_KEYS)
    command = sec.str_list("command")
    timeout = sec.get("start_timeout", (int, float))
    if timeout is not None and timeout <= 0:
        raise ConfigError(f"{sec.where}: {sec.key('start_timeout')} must be a positive number of seconds")
    changes: dict[str, Any] = {
        "command": command,
        "startup": sec.get("startup", str),
        "workdir": sec.get("workdir", str),
        "ready_pv": sec.get("ready_pv", str),
        "start_timeout": float(timeout) if timeout is not None else None,
    }
    changes = {k: v for k, v in changes.items() if v is not None}
    if "environment" in sec.data:
        changes["environment"] = {**base.environment, **sec.str_map("environment")}
    return replace(base, **changes)


def _load_requires(sec: _Section) -> tuple[Requirement, ...]:
    value = sec.get("requires", list, [])
    result = []
    for index, item in enumerate(value):
        entry = _Section(item, sec.where, f"{sec.key('requires')}[{index}]")
        entry.check_keys(("image", "hint"))
        image = entry.get("image", str)
        if not image:
            raise ConfigError(f"{sec.where}: {entry.path}.image is required (an image reference)")
        result.append(Requirement(image=image, hint=entry.get("hint", str, "")))
    return tuple(result)


class ConfigCache:
    """Loads each config file once per session; maps test paths to their config."""

    def __init__(self, explicit: Path | None, loader: Callable[[Path], ProjectConfig] = load_config) -> None:
        self.explicit = explicit
        self._loader = loader
        self._by_path: dict[Path | None, ProjectConfig] = {}

    def for_path(self, start: Path) -> ProjectConfig:
        path = self.explicit if self.explicit is not None else find_config(start)
        key = path.resolve() if path is not None else None
        if key not in self._by_path:
            self._by_path[key] = self._loader(key) if key is not None else default_config()
        return self._by_path[key]

    def load(self, path: Path) -> ProjectConfig:
        key = path.resolve()
        if key not in self._by_path:
            self._by_path[key] = self._loader(key)
        return self._by_path[key]
