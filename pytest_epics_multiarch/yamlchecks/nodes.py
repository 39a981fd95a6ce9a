"""The pytest side of YAML checks: a file collector and one item per check per target.

Items get their IOC from the session's shared pool (:meth:`EpicsSession.shared_ioc`), so files
and Python tests (under ``--epics-ioc-scope=session``) with the same configuration reuse one IOC.
They carry the target like parametrized Python tests do (``item.stash``, the ``target`` user
property), so the matrix, the report and the IOC log attached to failures work the same way.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker.errors
import pytest

from ..config import IocSpec, ProjectConfig
from ..errors import (
    ConfigError,
    EngineUnavailable,
    EpicsMultiarchError,
    ImageError,
    PrerequisiteMissing,
    tail_lines,
)
from ..images import ImageResult
from ..ioc import Ioc
from ..runners.profiles import build_only_reason
from ..session import EpicsSession
from ..stash import item_iocs_key, item_target_key, session_key
from ..targets import Target
from .model import Check, CheckFile, CheckFileError, IocOverrides
from .parser import FILE_GLOB, load_check_file
from .runner import StepFailed, format_failure, run_check

#: Lines of the IOC's log shown in a failed check's report (the whole log is a report section).
LOG_TAIL_LINES = 10

#: Images named by files' ``ioc.image`` (ref -> result or error), resolved once per session.
_override_images_key = pytest.StashKey[dict[str, "ImageResult | EpicsMultiarchError"]]()
#: Shared-IOC configurations that failed to start: the next check fails at once, not after a wait.
_failed_starts_key = pytest.StashKey[dict[tuple[str, str, str, str], EpicsMultiarchError]]()


def collect_file(file_path: Path, parent: pytest.Collector) -> IocCheckFile | None:
    """The collector of a ``test_*.ioc.yaml`` file; None for any other file."""
    if fnmatch.fnmatch(file_path.name, FILE_GLOB):
        return IocCheckFile.from_parent(parent, path=file_path)
    return None


def _display(config: pytest.Config, path: Path) -> str:
    """The file as errors name it: relative to where pytest runs (or its rootdir) when below it."""
    for base in (config.invocation_params.dir, config.rootpath):
        if path.is_relative_to(base):
            return str(path.relative_to(base))
    return str(path)


class IocCheckFile(pytest.File):
    """A ``test_*.ioc.yaml`` file: one item per check per selected target."""

    def collect(self) -> Iterator[pytest.Item]:
        where = _display(self.config, self.path)
        try:
            spec = load_check_file(self.path, where)
        except CheckFileError as exc:
            raise self.CollectError(str(exc)) from None
        session = self.config.stash[session_key]
        try:
            project = session.config_for(self.path)
            targets = project.registry.resolve(session.target_names(project))
        except ConfigError as exc:
            raise self.CollectError(f"{where}: {exc}") from None
        try:
            chosen = _filter_targets(spec, project, targets)
        except CheckFileError as exc:
            raise self.CollectError(str(exc)) from None
        if not chosen:
            assert spec.targets is not None
            reason = (
                f"this file runs on {', '.join(spec.targets)}; "
                f"the selected targets are {', '.join(t.name for t in targets)}"
            )
            for check in spec.checks:
                item = IocCheckItem.from_parent(
                    self, name=f"{check.name}[no-target]", check=check, spec=spec, target=""
                )
                item.add_marker(pytest.mark.skip(reason=reason))
                yield item
            return
        for target in chosen:
            for check in spec.checks:
                item = IocCheckItem.from_parent(
                    self, name=f"{check.name}[{target.name}]", check=check, spec=spec, target=target.name
                )
                item.stash[item_target_key] = target.name
                # JUnit XML and the matrix read the target from here, as for Python tests.
                item.user_properties.append(("target", target.name))
                yield item


def _filter_targets(spec: CheckFile, project: ProjectConfig, targets: list[Target]) -> list[Target]:
    if spec.targets is None:
        return targets
    for name in spec.targets:
        if project.registry.get_or_none(name) is None:
            raise CheckFileError(
                spec.where,
                spec.targets_line,
                "targets",
                f"unknown target {name!r}; expected one of: {', '.join(project.registry.names())}",
            )
    return [target for target in targets if target.name in spec.targets]


class IocCheckItem(pytest.Item):
    """One check of a YAML file on one target: its steps run against the shared IOC."""

    def __init__(self, *, check: Check, spec: CheckFile, target: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.check = check
        self.spec = spec
        self.target_name = target
        self.ioc: Ioc | None = None

    def setup(self) -> None:
        session = self.config.stash[session_key]
        try:
            project = session.config_for(self.path)
            target = project.target(self.target_name)
        except ConfigError as exc:
            pytest.fail(str(exc), pytrace=False)
        if not target.can_run:
            pytest.skip(build_only_reason(target))
        try:
            self.ioc = self._shared_ioc(session, project, target)
        except (PrerequisiteMissing, EngineUnavailable) as exc:
            pytest.skip(str(exc))
        self.stash[item_iocs_key] = [self.ioc]

    def _shared_ioc(self, session: EpicsSession, project: ProjectConfig, target: Target) -> Ioc:
        overrides = self.spec.ioc
        if overrides.image is None:
            image = session.image(project, target)
        else:
            image = _override_image(self.config, session, target, overrides.image, self.spec.where)
        ioc_spec = ioc_spec_for(project.ioc_for(target), overrides)
        key = (project.where, target.name, image.ref, repr(ioc_spec))
        failed = self.config.stash.setdefault(_failed_starts_key, {})
        if key in failed:
            raise failed[key]
        try:
            return session.shared_ioc(project, target, image, ioc_spec)
        except EpicsMultiarchError as exc:
            failed[key] = exc
            raise

    def runtest(self) -> None:
        assert self.ioc is not None
        run_check(self.check, self.ioc)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        if not isinstance(excinfo.value, StepFailed):
            return super().repr_failure(excinfo, style)
        tail: list[str] = []
        if self.ioc is not None:
            try:
                tail = tail_lines(self.ioc.logs(), LOG_TAIL_LINES)
            except Exception as exc:  # a dead engine must not hide the check's own failure
                tail = [f"(log unavailable: {exc})"]
        return format_failure(
            excinfo.value, where=self.spec.where, check=self.check, target=self.target_name, log_tail=tail
        )

    def reportinfo(self) -> tuple[os.PathLike[str] | str, int | None, str]:
        return self.path, self.check.line - 1, self.name


def ioc_spec_for(base: IocSpec, overrides: IocOverrides) -> IocSpec:
    """The config's IOC with the file's ``startup``/``environment``; ``base`` itself when equal.

    The environment is sorted so that files listing the same variables in another order share
    one IOC (the session keys shared IOCs by the spec's repr).
    """
    environment = {**base.environment, **overrides.environment}
    spec = dataclasses.replace(
        base,
        startup=overrides.startup or base.startup,
        environment=dict(sorted(environment.items())),
    )
    return base if spec == base else spec


def _override_image(
    config: pytest.Config, session: EpicsSession, target: Target, template: str, where: str
) -> ImageResult:
    """The image a file's ``ioc.image`` names: the local one, else pulled once per session."""
    ref = template.format(image_ext=target.image_ext, epics_arch=target.epics_arch)
    images = config.stash.setdefault(_override_images_key, {})
    if ref not in images:
        try:
            images[ref] = _local_or_pulled(session, target, ref, where)
        except EpicsMultiarchError as exc:
            images[ref] = exc
    result = images[ref]
    if isinstance(result, EpicsMultiarchError):
        raise result
    return dataclasses.replace(result, target=target)


def _local_or_pulled(session: EpicsSession, target: Target, ref: str, where: str) -> ImageResult:
    engine = session.engine()
    image_id = engine.image_id(ref)
    if image_id is not None:
        return ImageResult(ref, target, "local", 0.0, image_id, image_id)
    started = time.monotonic()
    session.progress(f"{target.name}: pulling {ref} (ioc.image of {where})")
    try:
        engine.pull(ref, target.platform)
    except docker.errors.APIError as exc:
        raise ImageError(
            f"could not pull {ref}, the ioc.image of {where}",
            target=target.name,
            seen=str(exc.explanation or exc),
            hint="ioc.image must name an image this engine has or can pull; build it first, "
            "or leave ioc.image out to use the image of epics-multiarch.yaml",
        ) from exc
    image_id = engine.image_id(ref) or ""
    return ImageResult(ref, target, "pulled", time.monotonic() - started, image_id, image_id)
